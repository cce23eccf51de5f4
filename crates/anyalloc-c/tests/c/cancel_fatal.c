/* A thread with a pending (deferred) pthread_cancel frees a block twice, or
 * frees a pointer anyalloc never handed out. Either must abort the process
 * with anyalloc's one-line message, as it does without the cancel (and as
 * glibc's malloc does). The message was written with libc's write(2), a
 * cancellation point: the pending cancel acted there, before the message
 * and the abort, and the thread was cancelled quietly, with the heap
 * corrupt and the process running on.
 *
 * argv[1]: "double" (a double free) or "foreign" (a foreign pointer). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_barrier_t bar;
static int foreign;
static char not_ours[64];

static void *worker(void *arg) {
    (void)arg;
    /* volatile: the compiler must not drop the calls. */
    char *volatile p = malloc(32);
    pthread_barrier_wait(&bar); /* not a cancellation point */
    if (foreign) {
        free(not_ours + 16);
    } else {
        free(p);
        free(p);
    }
    return (void *)1;
}

int main(int argc, char **argv) {
    foreign = argc > 1 && strcmp(argv[1], "foreign") == 0;
    pthread_barrier_init(&bar, NULL, 2);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) {
        puts("cancel_fatal: pthread_create failed");
        return 1;
    }
    pthread_cancel(t); /* pending until the worker's next cancellation point */
    pthread_barrier_wait(&bar);
    void *r;
    pthread_join(t, &r);
    printf("cancel_fatal: not caught, worker %s\n", r == PTHREAD_CANCELED ? "cancelled" : "finished");
    return 0;
}
