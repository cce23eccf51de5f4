/* Blocks served while another thread's fork holds every heap lock, freed
 * with free_sized and free_aligned_sized.
 *
 * A prepare handler registered before the library's (see register_early)
 * stands for a lock that glibc's fork takes after every prepare handler: it
 * waits until the holder thread has allocated, written and freed its blocks.
 * Those allocations miss (the caches' locks give way to the fork) and are
 * served with a page or more of usable size each: by the nolock route's
 * page blocks, or, the fork still holding the locks, mapped beside the
 * heap. Their frees with the size they were allocated with must free them:
 * with the debug-checks feature, the size check aborted ("allocated with
 * another size"), as for a block of 64 bytes with 4096 usable.
 *
 * alarm(WATCHDOG) turns a hang into a failure. Prints
 * "fork_free_sized: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* The library's (found at run time: preloaded, the executable is not
 * linked against it, and glibc may not have them). */
static void (*free_sized)(void *p, size_t size);
static void (*free_aligned_sized)(void *p, size_t align, size_t size);

enum { ROUNDS = 3, BLOCKS = 2000, WATCHDOG = 40 };

static atomic_int active, fork_holds, held;
static atomic_long bad, paged;

static void late_prepare(void) {
    if (!atomic_load(&active))
        return;
    atomic_store(&fork_holds, 1);
    while (atomic_load(&held))
        sched_yield();
}

/* glibc's own __register_atfork, not the library's (which registers the
 * heap's handlers first, so that every other prepare handler runs before
 * the heap's): registered from .preinit_array, before the library's
 * constructor registers the heap's, this prepare handler runs after the
 * heap's, with the heap's locks held, as glibc's own fork locking does. */
typedef int (*register_atfork_fn)(void (*)(void), void (*)(void), void (*)(void), void *);

static void register_early(void) {
    void *libc = dlopen("libc.so.6", RTLD_NOLOAD | RTLD_LAZY);
    register_atfork_fn real = libc ? (register_atfork_fn)dlsym(libc, "__register_atfork") : NULL;
    if (real)
        real(late_prepare, NULL, NULL, NULL);
}

__attribute__((section(".preinit_array"), used)) static void (*preinit)(void) = register_early;

static void *holder(void *arg) {
    (void)arg;
    static void *live[BLOCKS];
    static const size_t sizes[] = {8, 24, 48, 200, 1000, 3000};
    while (!atomic_load(&fork_holds))
        sched_yield();
    /* Odd: malloc(n); even: aligned_alloc(64, n), n a multiple of 64. */
    for (int i = 0; i < BLOCKS; i++) {
        size_t n = i % 2 ? sizes[i % 6] : (sizes[i % 6] + 63) / 64 * 64;
        live[i] = i % 2 ? malloc(n) : aligned_alloc(64, n);
        if (!live[i])
            atomic_fetch_add(&bad, 1);
        else {
            memset(live[i], i, n);
            /* A page of usable size for a small block: mapped beside the
             * heap, or a page block of the nolock route. */
            if (n < 4096 && malloc_usable_size(live[i]) >= 4096)
                atomic_fetch_add(&paged, 1);
        }
    }
    for (int i = 0; i < BLOCKS; i++) {
        size_t n = i % 2 ? sizes[i % 6] : (sizes[i % 6] + 63) / 64 * 64;
        if (!live[i])
            continue;
        if (i % 2)
            free_sized(live[i], n);
        else
            free_aligned_sized(live[i], 64, n);
    }
    atomic_store(&held, 0);
    return NULL;
}

int main(void) {
    alarm(WATCHDOG);
    free_sized = (void (*)(void *, size_t))dlsym(RTLD_DEFAULT, "free_sized");
    free_aligned_sized =
        (void (*)(void *, size_t, size_t))dlsym(RTLD_DEFAULT, "free_aligned_sized");
    if (!free_sized || !free_aligned_sized)
        return 6;
    for (int round = 0; round < ROUNDS; round++) {
        atomic_store(&held, 1);
        atomic_store(&fork_holds, 0);
        atomic_store(&active, 1);
        pthread_t t;
        if (pthread_create(&t, NULL, holder, NULL) != 0)
            return 2;
        pid_t pid = fork();
        if (pid == 0)
            _exit(0);
        if (pid < 0)
            return 3;
        atomic_store(&active, 0);
        pthread_join(t, NULL);
        int status;
        while (waitpid(pid, &status, 0) < 0)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 4;
    }
    if (atomic_load(&paged) == 0) {
        printf("fork_free_sized: no small block had a page of usable size\n");
        return 7;
    }
    if (atomic_load(&bad) != 0) {
        printf("fork_free_sized: %ld allocations failed\n", atomic_load(&bad));
        return 5;
    }
    printf("fork_free_sized: ok (%d rounds, %ld small blocks with a page or more)\n", ROUNDS,
           atomic_load(&paged));
    return 0;
}
