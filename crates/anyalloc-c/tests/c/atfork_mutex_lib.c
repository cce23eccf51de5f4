/* A library that guards its state with a mutex and keeps it consistent
 * across fork the usual way: its constructor registers fork handlers that
 * take the mutex in prepare and release it in parent and child. Its
 * constructor runs before the allocator's (it is initialised first), so
 * its handlers would be registered first. Meanwhile its function
 * `mutex_lib_log` allocates and frees while holding the mutex.
 *
 * If the allocator's prepare handler (which takes the heap's locks) ran
 * before this one, a thread holding the mutex could be waiting in malloc
 * for a heap lock held by the forking thread, which would wait for the
 * mutex here: the fork would never finish. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *kept[64];

static void prepare(void) { pthread_mutex_lock(&lock); }
static void release(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void register_handlers(void) {
    pthread_atfork(prepare, release, release);
}

/* Replaces eight of the library's blocks (small, and up to 1 MiB, which
 * takes the heap's zone locks), under the mutex. */
void mutex_lib_log(unsigned i) {
    pthread_mutex_lock(&lock);
    unsigned s = i * 2654435761u;
    for (int k = 0; k < 8; k++) {
        s = s * 1103515245u + 12345u;
        unsigned j = (s >> 8) % 64;
        free(kept[j]);
        size_t n = (s >> 4) % 3 == 0 ? ((s >> 12) % (1u << 20)) + 1 : ((s >> 12) % 4000) + 1;
        kept[j] = malloc(n);
        if (!kept[j]) abort();
        memset(kept[j], 1, n < 64 ? n : 64);
    }
    pthread_mutex_unlock(&lock);
}
