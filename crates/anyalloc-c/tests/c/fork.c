/* fork() while other threads allocate: the child must be able to allocate
 * (no lock inherited from a thread that does not exist in it), and so must
 * its own threads and children. Prints "fork: ok N". */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int stop;

static void churn(unsigned seed, int rounds) {
    void *keep[128] = {0};
    for (int i = 0; i < rounds; i++) {
        seed = seed * 1103515245u + 12345u;
        int k = (seed >> 8) % 128;
        free(keep[k]);
        size_t n = (seed >> 4) % 64 == 0 ? 100000 : (seed >> 12) % 3000 + 1;
        keep[k] = malloc(n);
        if (!keep[k]) abort();
        memset(keep[k], k, n);
    }
    for (int k = 0; k < 128; k++) free(keep[k]);
}

static void *busy(void *arg) {
    unsigned seed = (unsigned)(size_t)arg;
    while (!atomic_load(&stop)) churn(seed++, 1000);
    return NULL;
}

static void *child_thread(void *arg) {
    churn((unsigned)(size_t)arg, 2000);
    return NULL;
}

int main(void) {
    pthread_t t[3];
    for (size_t i = 0; i < 3; i++) pthread_create(&t[i], NULL, busy, (void *)(i + 1));
    int forks = 0;
    for (int i = 0; i < 60; i++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            churn(i, 3000);
            pthread_t c;
            if (pthread_create(&c, NULL, child_thread, (void *)(size_t)i)) _exit(3);
            churn(i + 7, 3000);
            pthread_join(c, NULL);
            if (i % 10 == 0) { /* a grandchild too */
                pid_t g = fork();
                if (g == 0) { churn(i, 1000); _exit(0); }
                int gs;
                if (waitpid(g, &gs, 0) != g || !WIFEXITED(gs) || WEXITSTATUS(gs)) _exit(4);
            }
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
            fprintf(stderr, "fork: child %d failed (status 0x%x)\n", i, status);
            return 1;
        }
        forks++;
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    printf("fork: ok %d\n", forks);
    return 0;
}
