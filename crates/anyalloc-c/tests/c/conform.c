/* Conformance of the C allocation functions under odd but legal requests,
 * on the normal path and (argument "nolock") inside an anyalloc nolock
 * scope: alignment to 1 GiB, calloc's zeroing after every kind of reuse,
 * realloc's contents across every class boundary and move, usable sizes
 * that are really usable, errno rules. Prints "conform: N checks passed". */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anyalloc.h"

/* C23 (glibc >= 2.39 declares them). */
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t alignment, size_t size);

static int checks, failures;
static int nolock;

#define CHECK(cond)                                                            \
    do {                                                                       \
        checks++;                                                              \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            if (failures < 40)                                                 \
                printf("FAIL line %d: %s (errno %d)\n", __LINE__, #cond,       \
                       errno);                                                 \
        }                                                                      \
    } while (0)

#define NOLOCK_MAX ((size_t)4 << 20)
#define WHOLE ((size_t)16 << 20)

static unsigned char pat(unsigned seed, size_t i) {
    return (unsigned char)(seed ^ (i * 31) ^ (i >> 8) ^ (i >> 16));
}

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = pat(seed, i);
}

static int intact(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != pat(seed, i)) return 0;
    return 1;
}

static int all_zero(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

/* Whether the current route serves size bytes aligned to align (the nolock
 * path serves at most 2^10 pages). */
static int served(size_t size, size_t align) {
    size_t b = size > align ? size : align;
    return !nolock || b <= NOLOCK_MAX;
}

/* Writes and checks a block's usable bytes (its edges and one byte per MiB
 * when it is above 16 MiB). */
static void touch(unsigned char *p, size_t n, unsigned seed) {
    if (n <= WHOLE) {
        fill(p, n, seed);
        CHECK(intact(p, n, seed));
        return;
    }
    fill(p, 65536, seed);
    fill(p + n - 65536, 65536, seed);
    for (size_t off = 65536; off < n - 65536; off += 1 << 20) p[off] = (unsigned char)seed;
    CHECK(intact(p, 65536, seed) && intact(p + n - 65536, 65536, seed));
}

static const size_t classes[] = {8,   12,   16,   20,   24,   28,   32,   40,   48,   56,
                                 64,  80,   96,   112,  128,  160,  192,  224,  256,  320,
                                 384, 448,  512,  640,  768,  896,  1024, 1280, 1536, 1792,
                                 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192};
#define NCLASSES (sizeof classes / sizeof classes[0])

static void test_alignment(void) {
    for (int k = 0; k <= 30; k++) {
        size_t a = (size_t)1 << k;
        size_t sizes[] = {0, 1, a / 2, a - 1, a, a + 1, 8191, 8193, NOLOCK_MAX - 1, NOLOCK_MAX + 1};
        for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
            size_t s = sizes[j];
            if (s > NOLOCK_MAX + 1 && s > a + 1) continue;
            for (int f = 0; f < 3; f++) {
                void *p = NULL;
                errno = 77;
                if (f == 0) {
                    int r = posix_memalign(&p, a < sizeof(void *) ? sizeof(void *) : a, s);
                    CHECK(errno == 77);
                    if (!served(s, a)) {
                        CHECK(r == ENOMEM);
                        continue;
                    }
                    CHECK(r == 0);
                } else if (f == 1) {
                    p = aligned_alloc(a, s);
                } else {
                    p = memalign(a, s);
                }
                if (!served(s, a)) {
                    CHECK(p == NULL && errno == ENOMEM);
                    continue;
                }
                CHECK(p != NULL);
                if (!p) {
                    printf("  (%d) %zu bytes aligned %zu\n", f, s, a);
                    continue;
                }
                CHECK(((uintptr_t)p & (a - 1)) == 0);
                size_t u = malloc_usable_size(p);
                CHECK(u >= s);
                touch(p, u, (unsigned)(k + j));
                /* The sized frees name the request (checked against the
                 * block's usable size with debug-checks). */
                if (f == 1)
                    free_aligned_sized(p, a, s);
                else
                    free(p);
            }
        }
    }
    /* valloc / pvalloc at odd sizes. */
    size_t vs[] = {0, 1, 4095, 4096, 4097, 8193, NOLOCK_MAX, NOLOCK_MAX + 1};
    for (size_t j = 0; j < sizeof vs / sizeof vs[0]; j++) {
        unsigned char *p = valloc(vs[j]);
        unsigned char *q = pvalloc(vs[j]);
        size_t rounded = vs[j] ? (vs[j] + 4095) & ~(size_t)4095 : 4096;
        if (served(vs[j], 4096)) {
            CHECK(p != NULL && ((uintptr_t)p & 4095) == 0 && malloc_usable_size(p) >= vs[j]);
            if (p) touch(p, malloc_usable_size(p), 3);
        }
        if (served(rounded, 4096)) {
            CHECK(q != NULL && ((uintptr_t)q & 4095) == 0 && malloc_usable_size(q) >= rounded);
            if (q) touch(q, malloc_usable_size(q), 4);
        }
        free(p);
        free(q);
    }
}

/* calloc after dirty reuse of the same class, page block, after trim. */
static void test_calloc_reuse(void) {
    size_t sizes[NCLASSES * 2 + 16];
    size_t n = 0;
    for (size_t i = 0; i < NCLASSES; i++) {
        sizes[n++] = classes[i];
        sizes[n++] = classes[i] - 3;
    }
    for (int o = 0; o <= 10; o++) sizes[n++] = ((size_t)4096 << o) - 16;
    sizes[n++] = NOLOCK_MAX + 1;
    for (int round = 0; round < 2; round++) {
        for (size_t i = 0; i < n; i++) {
            size_t s = sizes[i];
            if (!served(s, 16)) {
                errno = 0;
                CHECK(calloc(1, s) == NULL && errno == ENOMEM);
                continue;
            }
            int count = s <= 8192 ? 64 : 3;
            void *ps[64];
            for (int j = 0; j < count; j++) {
                ps[j] = malloc(s);
                CHECK(ps[j] != NULL);
                if (ps[j]) memset(ps[j], 0xff, malloc_usable_size(ps[j]));
            }
            for (int j = count - 1; j >= 0; j--) free(ps[j]);
            if (round == 1 && !nolock) malloc_trim(0);
            for (int j = 0; j < count; j++) {
                /* calloc(n, size) with the product's factors split. */
                ps[j] = (j & 1) ? calloc(s, 1) : calloc(1, s);
                CHECK(ps[j] != NULL && all_zero(ps[j], s));
                if (ps[j]) memset(ps[j], 0xee, malloc_usable_size(ps[j]));
            }
            for (int j = 0; j < count; j++) free(ps[j]);
        }
    }
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(calloc(PTRDIFF_MAX, 1) == NULL && errno == ENOMEM);
}

/* realloc up and down through every boundary: contents kept to the smaller
 * size, realloc to the same size keeps the block, the result usable. */
static void test_realloc_walk(void) {
    size_t steps[NCLASSES * 3 + 40];
    size_t n = 0;
    for (size_t i = 0; i < NCLASSES; i++) {
        steps[n++] = classes[i] - 1;
        steps[n++] = classes[i];
        steps[n++] = classes[i] + 1;
    }
    for (int o = 1; o <= 10; o++) {
        steps[n++] = ((size_t)4096 << o) - 1;
        steps[n++] = ((size_t)4096 << o) + 1;
    }
    steps[n++] = NOLOCK_MAX * 3;
    steps[n++] = NOLOCK_MAX * 5 + 123;
    unsigned char *p = malloc(1);
    size_t cur = 1;
    CHECK(p != NULL);
    fill(p, 1, 1);
    for (size_t k = 0; k < 2 * n; k++) {
        size_t s = k < n ? steps[k] : steps[2 * n - 1 - k];
        errno = 0;
        unsigned char *q = realloc(p, s);
        if (!served(s, 16)) {
            CHECK(q == NULL && errno == ENOMEM && intact(p, cur, (unsigned)cur));
            continue;
        }
        CHECK(q != NULL);
        if (!q) break;
        size_t keep = cur < s ? cur : s;
        CHECK(intact(q, keep, (unsigned)cur));
        CHECK(malloc_usable_size(q) >= s);
        /* The same size again: the block is kept. */
        CHECK(realloc(q, s) == q);
        fill(q, malloc_usable_size(q), (unsigned)s);
        p = q;
        cur = malloc_usable_size(q);
        /* The model: all usable bytes hold the pattern of seed s. */
        fill(p, cur, (unsigned)cur);
    }
    free(p);
    /* reallocarray: overflow leaves p as it was. */
    p = malloc(100);
    fill(p, 100, 5);
    errno = 0;
    CHECK(reallocarray(p, SIZE_MAX / 4, 8) == NULL && errno == ENOMEM && intact(p, 100, 5));
    unsigned char *q = reallocarray(p, 50, 40);
    CHECK(q != NULL && intact(q, 100, 5) && malloc_usable_size(q) >= 2000);
    free(q);
    /* realloc(NULL, n) and realloc(p, 0). */
    p = realloc(NULL, 300);
    CHECK(p != NULL && malloc_usable_size(p) >= 300);
    errno = 0;
    CHECK(realloc(p, 0) == NULL && errno == 0);
    free(NULL);
}

/* Many live blocks of every class and alignment, each written over its whole
 * usable size, then checked: a usable size reaching into a neighbour shows. */
static void test_usable(void) {
    enum { PER = 6 };
    static void *blocks[NCLASSES * 3 * 4 * PER];
    static size_t usable[NCLASSES * 3 * 4 * PER];
    size_t n = 0;
    size_t aligns[] = {0, 32, 256, 4096};
    for (size_t i = 0; i < NCLASSES; i++)
        for (int d = -1; d <= 1; d++)
            for (int a = 0; a < 4; a++)
                for (int r = 0; r < PER; r++) {
                    size_t s = classes[i] + d;
                    void *p = aligns[a] ? memalign(aligns[a], s) : malloc(s);
                    CHECK(p != NULL);
                    if (!p) continue;
                    usable[n] = malloc_usable_size(p);
                    CHECK(usable[n] >= s);
                    fill(p, usable[n], (unsigned)n);
                    blocks[n++] = p;
                }
    for (size_t i = 0; i < n; i++) {
        CHECK(intact(blocks[i], usable[i], (unsigned)i));
        /* malloc's blocks (every fourth) freed with their size. */
        if (i / PER % 4 == 0)
            free_sized(blocks[i], classes[i / (PER * 4 * 3)] + (int)(i / (PER * 4) % 3) - 1);
        else
            free(blocks[i]);
    }
}

int main(int argc, char **argv) {
    nolock = argc > 1 && strcmp(argv[1], "nolock") == 0;
    if (nolock) anyalloc_nolock_enter();
    test_alignment();
    test_calloc_reuse();
    test_realloc_walk();
    test_usable();
    if (nolock) anyalloc_nolock_exit();
    printf("conform%s: %d checks, %d failed\n", nolock ? " (nolock)" : "", checks, failures);
    if (failures == 0) printf("conform: %d checks passed\n", checks);
    return failures != 0;
}
