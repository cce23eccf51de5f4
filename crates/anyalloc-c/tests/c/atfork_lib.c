/* A library whose constructor registers fork handlers that allocate, and
 * runs before the allocator's own constructor (it is initialised first):
 * its handlers are registered before the heap's, so its prepare handler
 * runs after the heap took its locks and its parent and child handlers run
 * before the heap released them. glibc's malloc lets such handlers
 * allocate anything; so must the allocator. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Failures (a NULL or a changed byte) per handler; read by atfork_main.c. */
int atfork_prepare_bad, atfork_parent_bad, atfork_child_bad;
/* Allocations made per handler, to show that the handlers ran. */
long atfork_prepare_n, atfork_parent_n, atfork_child_n;

static unsigned char *kept; /* from prepare, freed in parent and child */
#define KEPT (8u << 20)     /* huge: served only on the normal path */

/* Allocates `n` blocks of `size` bytes, fills each, checks and frees them;
 * returns the failures. */
static int churn(int n, size_t size, long *made) {
    static void *v[4096];
    int bad = 0;
    if (n > 4096) n = 4096;
    for (int i = 0; i < n; i++) {
        v[i] = malloc(size);
        if (!v[i]) { bad++; continue; }
        memset(v[i], (int)(((uintptr_t)v[i] >> 4) & 0xff), size);
        ++*made;
    }
    for (int i = 0; i < n; i++) {
        if (!v[i]) continue;
        unsigned char want = (unsigned char)(((uintptr_t)v[i] >> 4) & 0xff);
        const unsigned char *b = v[i];
        if (b[0] != want || b[size / 2] != want || b[size - 1] != want) bad++;
        free(v[i]);
    }
    return bad;
}

static void prepare(void) {
    kept = malloc(KEPT);
    if (!kept) { atfork_prepare_bad++; return; }
    memset(kept, 0x5a, KEPT);
    atfork_prepare_n++;
    atfork_prepare_bad += churn(2000, 200, &atfork_prepare_n);
    atfork_prepare_bad += churn(50, 64 << 10, &atfork_prepare_n);
}

static int after(long *made) {
    int bad = 0;
    if (kept) {
        if (kept[0] != 0x5a || kept[KEPT - 1] != 0x5a) bad++;
        free(kept);
        kept = NULL;
    }
    void *big = malloc(6u << 20);
    if (!big) bad++; else { memset(big, 1, 6u << 20); ++*made; free(big); }
    bad += churn(4000, 200, made);
    bad += churn(200, 64 << 10, made);
    return bad;
}

static void parent(void) { atfork_parent_bad += after(&atfork_parent_n); }
static void child(void) { atfork_child_bad += after(&atfork_child_n); }

__attribute__((constructor)) static void register_handlers(void) {
    extern int pthread_atfork(void (*)(void), void (*)(void), void (*)(void));
    pthread_atfork(prepare, parent, child);
}
