/* Thousands of threads allocate and exit: anyalloc's caches are per CPU,
 * not per thread, so nothing is stranded when a thread exits and the peak
 * RSS stays near what one wave of threads uses. Prints the peak RSS. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static void *work(void *arg) {
    unsigned seed = (unsigned)(size_t)arg;
    void *keep[256];
    for (int i = 0; i < 256; i++) {
        seed = seed * 1103515245u + 12345u;
        size_t n = (seed >> 8) % 2048 + 1;
        keep[i] = malloc(n);
        if (!keep[i]) abort();
        memset(keep[i], i, n);
    }
    for (int i = 0; i < 256; i++) free(keep[i]);
    return NULL;
}

int main(void) {
    for (int wave = 0; wave < 500; wave++) {
        pthread_t t[8];
        for (size_t i = 0; i < 8; i++)
            if (pthread_create(&t[i], NULL, work, (void *)(wave * 8 + i))) return 1;
        for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("thread_exit: 4000 threads, peak rss %ld KiB\n", ru.ru_maxrss);
    return 0;
}
