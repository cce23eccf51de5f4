/* With ANYALLOC_MAINTENANCE=1, a forked child's first normal-path malloc or
 * free starts the maintenance thread again (pthread_create). When that
 * first call is a signal handler's, the thread is spawned from the handler:
 * if the handler interrupted the child's own pthread_create while it held
 * glibc's stack cache lock (get_cached_stack), the handler's pthread_create
 * waits for that lock, held by its own thread, for ever.
 *
 * Driven by gdb (tests/maintainer_restart_in_handler.rs): the child stops
 * in __nptl_stack_list_del (inside get_cached_stack, lock held) and gets
 * SIGUSR1 there. Prints "handler done" and "child done" when it survives. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void handler(int s) {
    (void)s;
    void *volatile p = malloc(64); /* volatile: not optimised away */
    free(p);
    ssize_t r = write(1, "handler done\n", 13);
    (void)r;
}

static void *nothing(void *a) { return a; }

int main(void) {
    signal(SIGUSR1, handler);
    pthread_t t;
    pthread_create(&t, NULL, nothing, NULL);
    pthread_join(t, NULL); /* a cached stack for the child's pthread_create */
    usleep(100000);        /* the maintenance thread (if on) is up */
    pid_t pid = fork();
    if (pid == 0) {
        pthread_create(&t, NULL, nothing, NULL);
        pthread_join(t, NULL);
        ssize_t r = write(1, "child done\n", 11);
        (void)r;
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("parent: child status %x\n", st);
    return 0;
}
