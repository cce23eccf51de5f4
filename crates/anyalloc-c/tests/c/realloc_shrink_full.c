/* realloc to a smaller size must not fail when no memory is left: glibc's
 * realloc fails only to make a block bigger (its manual: "realloc may return
 * a null pointer if no memory space is available to make the block
 * bigger"), so programs shrink buffers without a fallback. Run with a hard
 * cap (ANYALLOC_MEMORY=8m ANYALLOC_GROW=0): blocks of several kinds (objects,
 * page blocks, an aligned one, a huge one) are filled with a pattern, the
 * heap is filled until every size class returns NULL, then each block is
 * shrunk to less than half its size (which would move it to a smaller class
 * when memory allows): the result must be non-NULL, keep the contents and
 * errno, and hold the new size. It is then freed with free_sized and its new
 * size, as C23 allows for a realloc result (with the debug-checks feature,
 * the size check must accept a block kept larger than twice that size). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
            failures++;                                                        \
        }                                                                      \
    } while (0)

static unsigned char pattern(size_t i, size_t k) { return (unsigned char)(i * 31 + k * 7 + 1); }

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    void (*free_sized)(void *, size_t) =
        (void (*)(void *, size_t))dlsym(RTLD_DEFAULT, "free_sized");
    if (!free_sized) {
        printf("realloc_shrink_full: no free_sized (not running on anyalloc?)\n");
        return 2;
    }
    struct {
        size_t from, to, align;
    } cases[] = {
        {3000, 1000, 0},          /* object -> smaller object */
        {100000, 100, 0},         /* page block -> object */
        {1 << 20, 1000, 0},       /* page block -> object */
        {2000000, 300000, 0},     /* page block -> smaller page block */
        {65536, 200, 4096},       /* aligned page block -> object */
        {8 << 20, 100, 0},        /* huge -> object */
    };
    enum { N = sizeof cases / sizeof cases[0] };
    unsigned char *blocks[N];
    for (size_t k = 0; k < N; k++) {
        blocks[k] = cases[k].align ? memalign(cases[k].align, cases[k].from)
                                   : malloc(cases[k].from);
        if (!blocks[k]) {
            printf("realloc_shrink_full: setup: no block of %zu bytes\n", cases[k].from);
            return 2;
        }
        for (size_t i = 0; i < cases[k].from; i++)
            blocks[k][i] = pattern(i, k);
    }

    /* Fill the capped heap: every size up to 4 MiB until it returns NULL. */
    /* Bounded, so that without the cap this fails instead of eating RAM. */
    void *filled = NULL;
    size_t count = 0, total = 0;
    for (size_t size = 8; size <= (4u << 20); size += size / 8 + 8) {
        void *p;
        while (total < (64u << 20) && (p = malloc(size)) != NULL) {
            *(void **)p = filled;
            filled = p;
            count++;
            total += size;
        }
    }
    if (total >= (64u << 20)) {
        printf("realloc_shrink_full: 64 MiB allocated and the heap is not full "
               "(run with ANYALLOC_MEMORY=8m ANYALLOC_GROW=0)\n");
        return 2;
    }

    for (size_t k = 0; k < N; k++) {
        errno = 1234;
        unsigned char *r = realloc(blocks[k], cases[k].to);
        int e = errno;
        CHECK(r != NULL, "realloc(%zu -> %zu) with the heap full: NULL, errno %d", cases[k].from,
              cases[k].to, e);
        if (!r) {
            cases[k].to = cases[k].from; /* still the old block */
            continue;
        }
        blocks[k] = r;
        CHECK(e == 1234, "realloc(%zu -> %zu) changed errno to %d", cases[k].from, cases[k].to, e);
        CHECK(malloc_usable_size(r) >= cases[k].to, "usable size %zu < %zu",
              malloc_usable_size(r), cases[k].to);
        for (size_t i = 0; i < cases[k].to; i++) {
            if (r[i] != pattern(i, k)) {
                CHECK(0, "realloc(%zu -> %zu) lost byte %zu", cases[k].from, cases[k].to, i);
                break;
            }
        }
    }

    while (filled) {
        void *next = *(void **)filled;
        free(filled);
        filled = next;
    }
    for (size_t k = 0; k < N; k++)
        free_sized(blocks[k], cases[k].to);
    if (failures) {
        printf("realloc_shrink_full: %d failures\n", failures);
        return 1;
    }
    printf("realloc_shrink_full: ok (%zu blocks filled the heap)\n", count);
    return 0;
}
