/* The main thread ends with pthread_exit while a worker still runs: the
 * process must exit (status 0) when the worker returns, as it does under
 * glibc, even with the maintenance thread on (it used to keep the process
 * alive for ever, with every signal blocked). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *worker(void *arg) {
    (void)arg;
    usleep(200 * 1000);
    for (int i = 0; i < 1000; i++) {
        char *p = malloc(64 + i);
        if (!p) {
            puts("main_exits_first: malloc failed");
            exit(1);
        }
        memset(p, 1, 64 + i);
        free(p);
    }
    puts("main_exits_first: worker done");
    fflush(stdout);
    return NULL;
}

int main(void) {
    pthread_t t;
    free(malloc(10));
    if (pthread_create(&t, NULL, worker, NULL) != 0) {
        puts("main_exits_first: pthread_create failed");
        return 1;
    }
    pthread_exit(NULL);
}
