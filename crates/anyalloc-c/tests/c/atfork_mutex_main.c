/* Forks 2000 times while another thread calls atfork_mutex_lib.c's
 * `mutex_lib_log` (malloc and free under the library's mutex, which its
 * fork handlers take). Each child uses the library once and exits.
 * Prints "atfork_mutex: ok 2000" when every fork finished. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

void mutex_lib_log(unsigned i);

#define FORKS 2000

static atomic_int stop;

static void *logger(void *arg) {
    (void)arg;
    for (unsigned i = 0; !atomic_load(&stop); i++) mutex_lib_log(i);
    return NULL;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, logger, NULL) != 0) return 1;
    for (int i = 0; i < FORKS; i++) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); return 1; }
        if (p == 0) {
            mutex_lib_log((unsigned)i);
            _exit(0);
        }
        int status;
        if (waitpid(p, &status, 0) != p || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("atfork_mutex: child %d failed (status %#x)\n", i, status);
            return 1;
        }
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    printf("atfork_mutex: ok %d\n", FORKS);
    return 0;
}
