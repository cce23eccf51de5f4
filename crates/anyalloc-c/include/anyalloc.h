/*
 * anyalloc.h: the explicit any-context calls of libanyalloc.so.
 *
 * libanyalloc.so replaces malloc, free, calloc, realloc, reallocarray,
 * posix_memalign, aligned_alloc, memalign, valloc, pvalloc,
 * malloc_usable_size, free_sized, free_aligned_sized, the __libc_* names,
 * malloc_trim, mallinfo2, mallinfo, malloc_stats, malloc_info and mallopt
 * (declared by <stdlib.h> and <malloc.h>). The allocation functions are
 * already safe to call from a signal handler, even one that interrupted the
 * allocator on the same thread: such a call takes the "nolock" path, which
 * never waits for a lock and never blocks, and may fail (NULL, errno ENOMEM).
 *
 * The functions below make that choice explicit. Link with -lanyalloc (or
 * preload the library) to use them.
 */
#ifndef ANYALLOC_H
#define ANYALLOC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Allocates size bytes (aligned like malloc: 16 bytes, 8 below 16 bytes)
 * with the nolock path, from any context: a signal handler, a real-time
 * thread, a tracing hook. Never waits, never blocks, never makes a system
 * call once the heap exists. Blocks up to 4 MiB only.
 *
 * Returns NULL when there is no memory for this context now (every lock it
 * could use is held, or the request is too large for the nolock path). The
 * caller must not spin on NULL. errno is never changed.
 *
 * The block is freed with free() or anyalloc_free_nolock().
 */
void *anyalloc_malloc_nolock(size_t size);

/*
 * Frees a block from any allocation function of this library, from any
 * context. Never waits, never fails: a block whose locks are all held is
 * parked on a lock-free list and given back by a later call (or the
 * maintenance thread, which it then wakes: one futex wake, which never
 * blocks). NULL does nothing. A pointer this library did not hand out aborts the process with
 * a one-line message.
 */
void anyalloc_free_nolock(void *ptr);

/*
 * Opens a nolock scope on the calling thread: until the matching
 * anyalloc_nolock_exit(), every allocation function called by this thread
 * (malloc, free, calloc, realloc, ... included) takes the nolock path. For
 * real-time code: nothing in the scope waits or makes a system call, and
 * allocations may fail (those above 4 MiB always do). Scopes nest.
 */
void anyalloc_nolock_enter(void);

/*
 * Closes the innermost nolock scope of the calling thread. Calling it
 * without an open scope aborts with a one-line message.
 */
void anyalloc_nolock_exit(void);

#ifdef __cplusplus
}
#endif

#endif /* ANYALLOC_H */
