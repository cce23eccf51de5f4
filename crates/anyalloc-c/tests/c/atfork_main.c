/* Forks while other threads allocate and while a per-thread timer's
 * signal handler allocates on the forking thread; atfork_lib.c's fork
 * handlers (registered before the heap's) allocate small, 64 KiB and huge
 * blocks inside the heap's fork window, in the parent and in the child.
 * Prints "atfork: ok N" when every allocation there succeeded and kept its
 * contents. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern int atfork_prepare_bad, atfork_parent_bad, atfork_child_bad;
extern long atfork_prepare_n, atfork_parent_n, atfork_child_n;

#define FORKS 20

static atomic_int stop;
static atomic_long handled;

static void on_timer(int sig) {
    (void)sig;
    /* Interrupts the forking thread anywhere, also inside the handlers'
     * allocations in the fork window: it may get NULL, never hang. */
    void *p = malloc(48);
    if (p) { memset(p, 7, 48); free(p); }
    atomic_fetch_add(&handled, 1);
}

static void *busy(void *arg) {
    unsigned seed = (unsigned)(size_t)arg;
    void *keep[64] = {0};
    while (!atomic_load(&stop)) {
        seed = seed * 1103515245u + 12345u;
        int k = (seed >> 8) % 64;
        free(keep[k]);
        size_t n = (seed >> 12) % 2000 + 1;
        keep[k] = malloc(n);
        if (!keep[k]) abort();
        memset(keep[k], k, n);
    }
    for (int k = 0; k < 64; k++) free(keep[k]);
    return NULL;
}

int main(void) {
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, busy, (void *)(i + 1));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_timer;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGUSR1;
    ev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    timer_t timer;
    if (timer_create(CLOCK_MONOTONIC, &ev, &timer)) { perror("timer_create"); return 1; }
    struct itimerspec its = {{0, 50000}, {0, 50000}};
    timer_settime(timer, 0, &its, NULL);
    int failed = 0;
    for (int i = 0; i < FORKS; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            int bad = atfork_prepare_bad + atfork_child_bad;
            if (bad || atfork_child_n == 0) {
                printf("child %d: %d failures in the fork handlers (%ld allocations)\n", i, bad,
                       atfork_child_n);
                fflush(stdout);
                _exit(1);
            }
            _exit(0);
        }
        if (pid < 0) { perror("fork"); return 1; }
        int st;
        while (waitpid(pid, &st, 0) < 0) {}
        if (!WIFEXITED(st) || WEXITSTATUS(st)) failed++;
    }
    timer_delete(timer);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    printf("prepare: %ld allocations, %d failures; parent: %ld, %d; children failed: %d; "
           "%ld signals handled\n",
           atfork_prepare_n, atfork_prepare_bad, atfork_parent_n, atfork_parent_bad, failed,
           atomic_load(&handled));
    if (atfork_prepare_bad || atfork_parent_bad || failed || atfork_prepare_n == 0) return 1;
    printf("atfork: ok %d\n", FORKS);
    return 0;
}
