/* A plugin that links libanyalloc (to use include/anyalloc.h, say) and
 * registers fork handlers in its constructor. pthread_atfork from
 * libc_nonshared.a registers them with this object's __dso_handle, so that
 * dlclose unregisters them before the code is unmapped; a pthread_atfork
 * that the link binds elsewhere must do the same. */
#include <pthread.h>
#include <stdlib.h>

static void *kept;

static void prepare(void) { kept = malloc(32); }
static void release(void) { free(kept); kept = 0; }

__attribute__((constructor)) static void register_handlers(void) {
    pthread_atfork(prepare, release, release);
}

int atfork_dlclose_lib_loaded(void) { return 1; }
