/* Edge cases of every function libanyalloc.so exports. Linked with
 * -lanyalloc; compiled with -fno-builtin so the compiler cannot fold the
 * calls. Prints one line per failed check and "api: N checks passed". */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anyalloc.h"

static int checks, failures;

#define CHECK(cond)                                                            \
    do {                                                                       \
        checks++;                                                              \
        if (!(cond)) {                                                         \
            failures++;                                                        \
            printf("FAIL line %d: %s (errno %d)\n", __LINE__, #cond, errno);  \
        }                                                                      \
    } while (0)

static int aligned_to(const void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 31 + seed);
}

static int intact(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 31 + seed)) return 0;
    return 1;
}

static int all_zero(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static void test_malloc(void) {
    void *a = malloc(0), *b = malloc(0);
    CHECK(a != NULL && b != NULL && a != b); /* unique, freeable */
    free(a);
    free(b);
    free(NULL); /* no-op */

    errno = 0;
    CHECK(malloc(SIZE_MAX) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(PTRDIFF_MAX) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc((size_t)PTRDIFF_MAX + 1) == NULL && errno == ENOMEM);

    /* Alignment: 16 from 16 bytes up, 8 below. */
    for (size_t n = 1; n < 20000; n += (n < 300 ? 1 : 97)) {
        unsigned char *p = malloc(n);
        CHECK(p != NULL);
        if (!p) continue;
        CHECK(aligned_to(p, n < 16 ? 8 : 16));
        CHECK(malloc_usable_size(p) >= n);
        fill(p, n, (unsigned)n);
        CHECK(intact(p, n, (unsigned)n));
        free(p);
    }
    /* Large (page allocator) and huge (mmap) blocks. */
    size_t big[] = {8193, 65536, 1 << 20, (4 << 20) + 1, 20 << 20};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        unsigned char *p = malloc(big[i]);
        CHECK(p != NULL && aligned_to(p, 16));
        if (!p) continue;
        CHECK(malloc_usable_size(p) >= big[i]);
        fill(p, big[i], 7);
        CHECK(intact(p, big[i], 7));
        free(p);
    }
}

static void test_calloc(void) {
    size_t sizes[] = {1, 8, 24, 100, 1000, 5000, 8192, 100000, 5 << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        /* Dirty a block of the same size first so the zeroing is tested. */
        unsigned char *d = malloc(sizes[i]);
        if (d) memset(d, 0xAA, sizes[i]);
        free(d);
        unsigned char *p = calloc(1, sizes[i]);
        CHECK(p != NULL && all_zero(p, sizes[i]));
        free(p);
        p = calloc(sizes[i], 3);
        CHECK(p != NULL && all_zero(p, sizes[i] * 3));
        free(p);
    }
    void *z = calloc(0, 10), *z2 = calloc(10, 0);
    CHECK(z != NULL && z2 != NULL && z != z2);
    free(z);
    free(z2);
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM); /* overflow */
    errno = 0;
    CHECK(calloc((size_t)1 << 33, (size_t)1 << 33) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(calloc(1, SIZE_MAX) == NULL && errno == ENOMEM);
}

static void test_realloc(void) {
    unsigned char *p = realloc(NULL, 100); /* = malloc */
    CHECK(p != NULL && malloc_usable_size(p) >= 100);
    fill(p, 100, 1);
    /* Growth through small classes, pages and mmap, contents preserved. */
    size_t n = 100;
    size_t steps[] = {101, 200, 1000, 4000, 8192, 9000, 30000, 100000, 1 << 20, 6 << 20, 12 << 20};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        unsigned char *q = realloc(p, steps[i]);
        CHECK(q != NULL);
        if (!q) break;
        CHECK(intact(q, n, 1));
        CHECK(malloc_usable_size(q) >= steps[i]);
        fill(q, steps[i], 1);
        p = q;
        n = steps[i];
    }
    /* Shrink, prefix preserved. */
    size_t down[] = {5 << 20, 50000, 3000, 100, 9, 1};
    for (size_t i = 0; i < sizeof down / sizeof down[0]; i++) {
        unsigned char *q = realloc(p, down[i]);
        CHECK(q != NULL && intact(q, down[i], 1));
        if (!q) break;
        p = q;
    }
    /* In place within the block's usable size. */
    unsigned char *a = malloc(100);
    size_t u = malloc_usable_size(a);
    CHECK(realloc(a, u) == a);
    /* Failure leaves the block alone. */
    fill(a, 100, 9);
    errno = 0;
    CHECK(realloc(a, SIZE_MAX) == NULL && errno == ENOMEM);
    CHECK(intact(a, 100, 9));
    errno = 0;
    CHECK(realloc(a, PTRDIFF_MAX) == NULL && errno == ENOMEM);
    CHECK(intact(a, 100, 9));
    /* realloc(p, 0) frees and returns NULL (glibc's behaviour). */
    errno = 0;
    CHECK(realloc(a, 0) == NULL && errno == 0);
    CHECK(realloc(p, 0) == NULL);
    /* realloc(NULL, 0) is malloc(0): a unique pointer. */
    void *z = realloc(NULL, 0);
    CHECK(z != NULL);
    free(z);
}

static void test_reallocarray(void) {
    unsigned char *p = reallocarray(NULL, 10, 10);
    CHECK(p != NULL && malloc_usable_size(p) >= 100);
    fill(p, 100, 3);
    errno = 0;
    CHECK(reallocarray(p, SIZE_MAX / 2, 3) == NULL && errno == ENOMEM); /* overflow */
    CHECK(intact(p, 100, 3));
    unsigned char *q = reallocarray(p, 1000, 10);
    CHECK(q != NULL && intact(q, 100, 3) && malloc_usable_size(q) >= 10000);
    free(q);
}

static void test_posix_memalign(void) {
    void *sentinel = (void *)0x1234, *p = sentinel;
    size_t bad[] = {0, 1, 2, 3, 4, 12, 24, 48, 100, 4095};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 77;
        p = sentinel;
        CHECK(posix_memalign(&p, bad[i], 64) == EINVAL && p == sentinel && errno == 77);
    }
    size_t good[] = {8, 16, 32, 64, 256, 4096, 8192, 65536, 1 << 21, 1 << 23};
    size_t sizes[] = {0, 1, 7, 100, 5000, 40000, 5 << 20};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
            errno = 77;
            p = sentinel;
            CHECK(posix_memalign(&p, good[i], sizes[j]) == 0 && p != sentinel && p != NULL);
            CHECK(errno == 77);
            CHECK(aligned_to(p, good[i]));
            CHECK(malloc_usable_size(p) >= sizes[j]);
            memset(p, 0x5A, sizes[j]);
            free(p);
        }
    p = sentinel;
    CHECK(posix_memalign(&p, 64, SIZE_MAX) == ENOMEM && p == sentinel);
    CHECK(posix_memalign(&p, 64, PTRDIFF_MAX) == ENOMEM && p == sentinel);
}

static void test_aligned_alloc(void) {
    size_t bad[] = {0, 3, 12, 24, 100, 6000};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        errno = 0;
        CHECK(aligned_alloc(bad[i], 64) == NULL && errno == EINVAL);
    }
    size_t good[] = {1, 2, 4, 8, 16, 64, 4096, 16384, 1 << 22};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        void *p = aligned_alloc(good[i], 100); /* C17: any size */
        CHECK(p != NULL && aligned_to(p, good[i]) && malloc_usable_size(p) >= 100);
        free(p);
    }
    errno = 0;
    CHECK(aligned_alloc(64, SIZE_MAX) == NULL && errno == ENOMEM);
}

static void test_memalign_valloc_pvalloc(void) {
    void *p = memalign(24, 10); /* glibc: rounded up to a power of two */
    CHECK(p != NULL && aligned_to(p, 32));
    free(p);
    p = memalign(0, 10);
    CHECK(p != NULL);
    free(p);
    p = memalign(1 << 16, 1000);
    CHECK(p != NULL && aligned_to(p, 1 << 16));
    free(p);
    errno = 0;
    CHECK(memalign(SIZE_MAX / 2 + 2, 10) == NULL && errno == EINVAL);
    errno = 0;
    CHECK(memalign(64, SIZE_MAX) == NULL && errno == ENOMEM);

    p = valloc(1);
    CHECK(p != NULL && aligned_to(p, 4096));
    free(p);
    p = valloc(10000);
    CHECK(p != NULL && aligned_to(p, 4096) && malloc_usable_size(p) >= 10000);
    free(p);

    p = pvalloc(1);
    CHECK(p != NULL && aligned_to(p, 4096) && malloc_usable_size(p) >= 4096);
    free(p);
    p = pvalloc(0);
    CHECK(p != NULL && aligned_to(p, 4096) && malloc_usable_size(p) >= 4096);
    free(p);
    p = pvalloc(4097);
    CHECK(p != NULL && aligned_to(p, 4096) && malloc_usable_size(p) >= 8192);
    free(p);
    errno = 0;
    CHECK(pvalloc(SIZE_MAX - 100) == NULL && errno == ENOMEM);
}

static void test_usable_size(void) {
    CHECK(malloc_usable_size(NULL) == 0);
    unsigned char *p = malloc(100);
    /* anyalloc's size class for 100 bytes is 112 (glibc would say 104):
     * proof that these calls reached libanyalloc.so. */
    CHECK(malloc_usable_size(p) == 112);
    memset(p, 1, malloc_usable_size(p)); /* every usable byte is writable */
    free(p);
}

static void test_nolock_api(void) {
    void *p = anyalloc_malloc_nolock(64);
    CHECK(p != NULL && aligned_to(p, 16) && malloc_usable_size(p) >= 64);
    free(p); /* nolock blocks go to free() too */
    p = anyalloc_malloc_nolock(0);
    CHECK(p != NULL);
    anyalloc_free_nolock(p);
    p = malloc(5000);
    anyalloc_free_nolock(p); /* and malloc blocks to anyalloc_free_nolock() */
    anyalloc_free_nolock(NULL);
    p = malloc(20 << 20); /* huge: the nolock free parks the unmapping */
    anyalloc_free_nolock(p);
    errno = 0;
    CHECK(anyalloc_malloc_nolock(1 << 20) == NULL && errno == 0); /* too large for nolock */

    /* A scope routes malloc to the nolock path: > 32 KiB fails inside. */
    anyalloc_nolock_enter();
    void *small = malloc(100);
    CHECK(small != NULL);
    errno = 0;
    CHECK(malloc(1 << 20) == NULL && errno == ENOMEM);
    anyalloc_nolock_enter(); /* nested */
    CHECK(malloc(1 << 20) == NULL);
    anyalloc_nolock_exit();
    CHECK(malloc(1 << 20) == NULL); /* still inside the outer scope */
    void *c = calloc(10, 10);
    CHECK(c != NULL && all_zero(c, 100));
    void *r = realloc(c, 3000);
    CHECK(r != NULL && all_zero(r, 100));
    free(r);
    free(small);
    anyalloc_nolock_exit();
    void *big = malloc(1 << 20);
    CHECK(big != NULL); /* normal path again */
    free(big);
}

int main(void) {
    test_malloc();
    test_calloc();
    test_realloc();
    test_reallocarray();
    test_posix_memalign();
    test_aligned_alloc();
    test_memalign_valloc_pvalloc();
    test_usable_size();
    test_nolock_api();
    if (failures) {
        printf("api: %d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("api: %d checks passed\n", checks);
    return 0;
}
