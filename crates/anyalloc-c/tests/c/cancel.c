/* A thread with a pending pthread_cancel allocates until the heap grows,
 * under a limit on address space (growth then reads /proc/self/statm).
 * malloc has no cancellation point in glibc, so the thread finishes its
 * loop; were the heap's file reads cancellation points, the thread would
 * be cancelled inside malloc with the growth lock held, and the next
 * growth (main's loop below) would wait for ever. Run with
 * ANYALLOC_MEMORY=16m: a small first zone, so both loops grow the heap. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static pthread_barrier_t bar;

static void *worker(void *arg) {
    (void)arg;
    pthread_barrier_wait(&bar); /* not a cancellation point */
    for (int i = 0; i < 64; i++) {
        void *p = malloc(4 << 20); /* page blocks, from zones: the heap grows */
        if (p != NULL)
            memset(p, 1, 4096);
    }
    return (void *)1;
}

int main(void) {
    struct rlimit l = {(rlim_t)1 << 40, RLIM_INFINITY};
    if (setrlimit(RLIMIT_AS, &l) != 0) {
        puts("cancel: setrlimit failed");
        return 1;
    }
    pthread_barrier_init(&bar, NULL, 2);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) {
        puts("cancel: pthread_create failed");
        return 1;
    }
    pthread_cancel(t); /* pending until the worker's first cancellation point */
    pthread_barrier_wait(&bar);
    void *r;
    pthread_join(t, &r);
    printf("cancel: worker %s\n", r == PTHREAD_CANCELED ? "cancelled" : "finished");
    fflush(stdout);
    for (int i = 0; i < 64; i++) {
        if (malloc(4 << 20) == NULL) {
            puts("cancel: malloc failed");
            return 1;
        }
    }
    puts("cancel: ok");
    return 0;
}
