/* A fork while a signal handler that interrupted a huge realloc forks too.
 *
 * A thread resizes a huge block back and forth (realloc moves it with
 * mremap: Heap::remap_huge, counted in the heap's `remaps`); the main
 * thread sends it SIGUSR1, whose handler forks, and forks itself. A
 * pthread_atfork handler takes a mutex in prepare and releases it in the
 * parent and the child (the usual idiom; registered after the heap's, so
 * its prepare runs before the heap's). The main thread's fork holds the
 * mutex while the heap's prepare waits for the move to end; the mover's
 * handler, its move counted, forks and waits in that prepare handler for
 * the mutex. With an unbounded wait: deadlock at once; with the wait
 * bounded, each round cost the fork's patience (1 s). A move now blocks
 * signals while it is counted, so the handler runs outside it and no round
 * waits. With glibc's malloc: no wait.
 * Usage: fork_handler_forks_in_realloc [ROUNDS] */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static pthread_mutex_t lib_mutex = PTHREAD_MUTEX_INITIALIZER;
static void lib_prepare(void) { pthread_mutex_lock(&lib_mutex); }
static void lib_release(void) { pthread_mutex_unlock(&lib_mutex); }

static volatile int stop;
static volatile pid_t mover_tid;

static void fork_in_handler(int sig) {
    (void)sig;
    pid_t p = fork();
    if (p == 0)
        _exit(0);
    if (p > 0)
        waitpid(p, NULL, 0);
}

static void *mover(void *arg) {
    (void)arg;
    size_t small = 5u << 20, large = 13u << 20, size = small;
    char *p = malloc(size);
    mover_tid = (pid_t)syscall(SYS_gettid);
    while (!stop) {
        size_t want = size == small ? large : small;
        char *q = realloc(p, want);
        if (q) {
            p = q;
            size = want;
        }
    }
    free(p);
    return NULL;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    pthread_atfork(lib_prepare, lib_release, lib_release);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fork_in_handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, mover, NULL);
    while (!mover_tid)
        ;
    for (int i = 0; i < rounds; i++) {
        syscall(SYS_tgkill, getpid(), mover_tid, SIGUSR1);
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        if (p < 0) {
            perror("fork");
            return 1;
        }
        waitpid(p, NULL, 0);
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("fork_handler_forks_in_realloc: ok\n");
    return 0;
}
