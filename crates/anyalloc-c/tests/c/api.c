/* Edge cases of every function libanyalloc.so exports. Linked with
 * -lanyalloc; compiled with -fno-builtin so the compiler cannot fold the
 * calls. Prints one line per failed check and "api: N checks passed". */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "anyalloc.h"

static int checks, failures;

/* Not declared by this glibc's headers: C23 (glibc >= 2.39) and glibc's
 * internal-but-exported names. */
void free_sized(void *ptr, size_t size);
void free_aligned_sized(void *ptr, size_t alignment, size_t size);
void *__libc_malloc(size_t size);
void __libc_free(void *ptr);
void *__libc_calloc(size_t n, size_t size);
void *__libc_realloc(void *ptr, size_t size);
void *__libc_memalign(size_t alignment, size_t size);
void *__libc_valloc(size_t size);
void *__libc_pvalloc(size_t size);
struct mallinfo __libc_mallinfo(void);
int __libc_mallopt(int param, int value);

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
    p = anyalloc_malloc_nolock(1 << 20); /* up to 4 MiB: the nolock path serves it */
    CHECK(p != NULL && aligned_to(p, 16) && malloc_usable_size(p) >= 1 << 20);
    anyalloc_free_nolock(p);
    errno = 0;
    CHECK(anyalloc_malloc_nolock(5 << 20) == NULL && errno == 0); /* too large for nolock */

    /* A scope routes malloc to the nolock path: > 4 MiB fails inside. */
    anyalloc_nolock_enter();
    void *small = malloc(100);
    CHECK(small != NULL);
    void *mib = malloc(1 << 20);
    CHECK(mib != NULL);
    free(mib);
    errno = 0;
    CHECK(malloc(5 << 20) == NULL && errno == ENOMEM);
    anyalloc_nolock_enter(); /* nested */
    CHECK(malloc(5 << 20) == NULL);
    anyalloc_nolock_exit();
    CHECK(malloc(5 << 20) == NULL); /* still inside the outer scope */
    void *c = calloc(10, 10);
    CHECK(c != NULL && all_zero(c, 100));
    void *r = realloc(c, 3000);
    CHECK(r != NULL && all_zero(r, 100));
    free(r);
    free(small);
    anyalloc_nolock_exit();
    void *big = malloc(5 << 20);
    CHECK(big != NULL); /* normal path again */
    free(big);
}

/* Resident set size in bytes, read without allocating (open/read). */
static long rss_bytes(void) {
    char buf[128];
    int fd = open("/proc/self/statm", O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    long size, rss;
    if (sscanf(buf, "%ld %ld", &size, &rss) != 2) return -1;
    return rss * sysconf(_SC_PAGESIZE);
}

static void test_malloc_trim(void) {
    enum { N = 256, SZ = 64 << 10 };
    static void *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = malloc(SZ);
        CHECK(p[i] != NULL);
        if (p[i]) memset(p[i], 1, SZ);
    }
    long before = rss_bytes();
    for (int i = 0; i < N; i++) free(p[i]);
    errno = 4321;
    int r = malloc_trim(0);
    CHECK(errno == 4321);
    long after = rss_bytes();
    CHECK(r == 1);
    /* 16 MiB were touched and freed: at least half goes back. */
    CHECK(before > 0 && after > 0 && before - after >= 8L << 20);
    CHECK(malloc_trim(0) == 0); /* nothing left to release */
    CHECK(malloc_trim(SIZE_MAX) == 0); /* pad is ignored */
    anyalloc_nolock_enter();
    CHECK(malloc_trim(0) == 0); /* never in a nolock scope */
    anyalloc_nolock_exit();
    void *q = malloc(1 << 20);
    CHECK(q != NULL); /* the heap still works after a trim */
    if (q) memset(q, 2, 1 << 20);
    free(q);
}

static void test_mallinfo(void) {
    struct mallinfo2 m0 = mallinfo2();
    CHECK(m0.usmblks == 0 && m0.smblks == 0);
    CHECK(m0.fordblks == m0.arena - m0.uordblks);
    CHECK(m0.uordblks <= m0.arena);
    enum { SMALL = 1000 };
    static void *s[SMALL];
    for (int i = 0; i < SMALL; i++) s[i] = malloc(100);
    void *l[10];
    for (int i = 0; i < 10; i++) l[i] = malloc(65536);
    void *h1 = malloc(8 << 20), *h2 = malloc((8 << 20) + 1);
    struct mallinfo2 m1 = mallinfo2();
    CHECK(m1.uordblks - m0.uordblks >= SMALL * 100 + 10 * 65536);
    CHECK(m1.uordblks - m0.uordblks <= SMALL * 128 + 10 * 65536);
    CHECK(m1.hblks == m0.hblks + 2);
    CHECK(m1.hblkhd - m0.hblkhd == (16 << 20) + 4096); /* whole pages */
    CHECK(m1.arena > 0 && m1.uordblks <= m1.arena && m1.fordblks == m1.arena - m1.uordblks);
    struct mallinfo m = mallinfo();
    CHECK((size_t)m.hblks == m1.hblks && (size_t)m.hblkhd == m1.hblkhd);
    CHECK((size_t)m.uordblks == m1.uordblks && (size_t)m.arena == m1.arena);
    for (int i = 0; i < SMALL; i++) free(s[i]);
    for (int i = 0; i < 10; i++) free(l[i]);
    free(h1);
    free(h2);
    struct mallinfo2 m2 = mallinfo2();
    CHECK(m2.uordblks == m0.uordblks);
    CHECK(m2.hblks == m0.hblks && m2.hblkhd == m0.hblkhd);
    CHECK(m2.ordblks > 0 && m2.fsmblks >= m2.ordblks * 8); /* cached frees */

    /* More than INT_MAX bytes mapped (untouched): mallinfo saturates. */
    void *g[3];
    for (int i = 0; i < 3; i++) g[i] = malloc((size_t)1 << 30);
    CHECK(g[0] && g[1] && g[2]);
    struct mallinfo2 b2 = mallinfo2();
    struct mallinfo b = mallinfo();
    CHECK(b2.hblkhd >= (size_t)3 << 30);
    CHECK(b.hblkhd == INT_MAX);
    CHECK(b.hblks == (int)b2.hblks && b.arena == (int)b2.arena);
    for (int i = 0; i < 3; i++) free(g[i]);
    CHECK(mallinfo().hblkhd == (int)m0.hblkhd);
}

static void test_malloc_stats(void) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    int saved = dup(2);
    dup2(fds[1], 2);
    errno = 99;
    malloc_stats();
    int e = errno;
    dup2(saved, 2);
    close(saved);
    close(fds[1]);
    char buf[4096];
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    CHECK(n > 0);
    buf[n > 0 ? n : 0] = 0;
    CHECK(strncmp(buf, "anyalloc: ", 10) == 0);
    CHECK(strstr(buf, " zones of ") != NULL);
    CHECK(strstr(buf, "in use ") != NULL);
    CHECK(strstr(buf, " freed kept); ") != NULL);
    CHECK(strstr(buf, "nolock allocations ") != NULL);
    CHECK(buf[n - 1] == '\n');
    CHECK(e == 99);
}

static int count(const char *hay, const char *needle) {
    int c = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p++) c++;
    return c;
}

static void test_malloc_info(void) {
    errno = 0;
    CHECK(malloc_info(1, stdout) == EINVAL && errno == 0); /* as glibc */
    errno = 0;
    CHECK(malloc_info(0, NULL) == -1 && errno == EINVAL);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CHECK(f != NULL);
    if (!f) return;
    CHECK(malloc_info(0, f) == 0);
    fclose(f);
    CHECK(len > 0 && strncmp(buf, "<malloc version=\"1\" allocator=\"anyalloc\">\n", 42) == 0);
    CHECK(len > 10 && strcmp(buf + len - 10, "</malloc>\n") == 0);
    CHECK(count(buf, "<size class=") == 39);
    CHECK(count(buf, "<zone nr=") >= 1 && strstr(buf, "<zone nr=\"0\" pages=\"") != NULL);
    CHECK(count(buf, "<sizes>") == 1 && count(buf, "</sizes>") == 1);
    free(buf);
    FILE *ro = fopen("/dev/null", "r");
    CHECK(ro != NULL);
    if (ro) {
        CHECK(malloc_info(0, ro) == -1); /* the stream refuses writes */
        fclose(ro);
    }
}

static void test_mallopt(void) {
    /* glibc 2.36's return values, parameter by parameter. */
    CHECK(mallopt(M_MXFAST, 0) == 1);
    CHECK(mallopt(M_MXFAST, 160) == 1);
    CHECK(mallopt(M_MXFAST, 161) == 0);
    CHECK(mallopt(M_MXFAST, -1) == 0);
    CHECK(mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1);
    CHECK(mallopt(M_MMAP_THRESHOLD, -1) == 1);
    CHECK(mallopt(M_TRIM_THRESHOLD, -1) == 1);
    CHECK(mallopt(M_TOP_PAD, 0) == 1);
    CHECK(mallopt(M_MMAP_MAX, 0) == 1);
    CHECK(mallopt(M_CHECK_ACTION, 3) == 1);
    CHECK(mallopt(M_ARENA_MAX, 0) == 1);
    CHECK(mallopt(M_ARENA_TEST, -5) == 1);
    CHECK(mallopt(M_NLBLKS, 5) == 1 && mallopt(M_GRAIN, 5) == 1 && mallopt(M_KEEP, 0) == 1);
    CHECK(mallopt(12345, 0) == 1);
    void *big = malloc(1 << 20); /* M_MMAP_MAX 0 has no effect: still works */
    CHECK(big != NULL);
    free(big);

    /* M_PERTURB: allocations filled with ~byte, frees with byte. */
    CHECK(mallopt(M_PERTURB, 0xa5) == 1);
    unsigned char *p = malloc(100), *l = malloc(65536), *z = calloc(10, 10);
    int filled = p && l && z;
    for (int i = 0; filled && i < 100; i++) filled = p[i] == 0x5a && z[i] == 0;
    for (int i = 0; filled && i < 65536; i++) filled = l[i] == 0x5a;
    CHECK(filled);
    free(z);
    free(l);
    free(p);
    /* Reads freed memory on purpose: the fill must be there. */
    CHECK(p[50] == 0xa5 && p[99] == 0xa5);
    /* Any value but 0 turns it on, one whose low byte is 0 too (glibc's
     * manual, and glibc: allocations filled with 0xff, frees with 0). */
    CHECK(mallopt(M_PERTURB, 0x100) == 1);
    p = malloc(100);
    filled = p != NULL;
    for (int i = 0; filled && i < 100; i++) filled = p[i] == 0xff;
    CHECK(filled);
    free(p);
    CHECK(p[50] == 0 && p[99] == 0);
    CHECK(mallopt(M_PERTURB, 0) == 1);
    p = malloc(100);
    CHECK(p != NULL);
    if (p) memset(p, 0, 100);
    free(p);
    CHECK(p[50] == 0); /* no fill once turned off */
}

static void test_libc_names(void) {
    unsigned char *p = __libc_malloc(100);
    CHECK(p != NULL && aligned_to(p, 16) && malloc_usable_size(p) >= 100);
    fill(p, 100, 3);
    p = __libc_realloc(p, 50000);
    CHECK(p != NULL && intact(p, 100, 3));
    free(p); /* ours: free accepts it */
    p = malloc(10);
    __libc_free(p);
    __libc_free(NULL);
    p = __libc_calloc(100, 10);
    CHECK(p != NULL && all_zero(p, 1000));
    __libc_free(p);
    errno = 0;
    CHECK(__libc_calloc(SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(__libc_malloc(SIZE_MAX) == NULL && errno == ENOMEM);
    p = __libc_memalign(256, 100);
    CHECK(p != NULL && aligned_to(p, 256));
    __libc_free(p);
    p = __libc_memalign(24, 100); /* glibc: rounded up to 32 */
    CHECK(p != NULL && aligned_to(p, 32));
    __libc_free(p);
    p = __libc_valloc(10);
    CHECK(p != NULL && aligned_to(p, 4096));
    __libc_free(p);
    p = __libc_pvalloc(5000);
    CHECK(p != NULL && aligned_to(p, 4096) && malloc_usable_size(p) >= 8192);
    __libc_free(p);
    CHECK(__libc_realloc(NULL, 10) != NULL); /* leaked on purpose: tiny */
    /* glibc's two other __libc_ names reach this heap too (glibc's own
     * would read and set its idle arena). */
    p = malloc(10 << 20);
    struct mallinfo mi = __libc_mallinfo();
    CHECK(p != NULL && mi.hblks >= 1 && mi.hblkhd >= 10 << 20);
    free(p);
    CHECK(__libc_mallopt(M_PERTURB, 0x11) == 1);
    p = malloc(100);
    CHECK(p != NULL && p[0] == 0xee && p[99] == 0xee);
    free(p);
    CHECK(__libc_mallopt(M_PERTURB, 0) == 1);
}

static void test_free_sized(void) {
    free_sized(NULL, 10);
    free_aligned_sized(NULL, 64, 10);
    size_t sizes[] = {0, 1, 8, 15, 16, 17, 100, 1000, 4096, 8192, 8193, 65536, (4 << 20) + 1};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        void *p = malloc(sizes[i]);
        CHECK(p != NULL);
        errno = 555;
        free_sized(p, sizes[i]);
        CHECK(errno == 555);
        p = calloc(1, sizes[i]);
        free_sized(p, sizes[i]);
    }
    void *p = malloc(100);
    p = realloc(p, 3000);
    free_sized(p, 3000);
    p = realloc(malloc(3000), 2000); /* kept in place: 2000 is its size now */
    free_sized(p, 2000);
    size_t aligns[] = {1, 8, 16, 64, 4096, 8192, 1 << 20};
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        for (size_t n = 1; n < 40000; n = n * 3 + 1) {
            void *q = aligned_alloc(aligns[i], n);
            CHECK(q != NULL);
            errno = 556;
            free_aligned_sized(q, aligns[i], n);
            CHECK(errno == 556);
        }
    }
    /* Blocks freed with their size come back to the class they came from:
     * churn blocks of many sizes (multiples of 16, which name their class,
     * and others), some from aligned_alloc, each filled with its own byte
     * and checked whole before its sized free. A block freed into another
     * class would be handed out again over a live one. */
    enum { LIVE = 512 };
    static unsigned char *live[LIVE];
    static size_t live_size[LIVE], live_align[LIVE];
    unsigned seed = 12345;
    for (int round = 0; round < 200000; round++) {
        seed = seed * 1103515245u + 12345u;
        unsigned r = seed >> 8;
        size_t i = r % LIVE;
        unsigned char fill = (unsigned char)(i * 7 + 1);
        if (live[i] != NULL) {
            for (size_t k = 0; k < live_size[i]; k++) {
                CHECK(live[i][k] == fill);
            }
            if (live_align[i] != 0) {
                free_aligned_sized(live[i], live_align[i], live_size[i]);
            } else {
                free_sized(live[i], live_size[i]);
            }
            live[i] = NULL;
            continue;
        }
        size_t size = (r >> 9) % 2048 + 1;
        if (r & 0x100) {
            size = (size + 15) & ~(size_t)15;
        }
        size_t align = (r >> 20) % 4 == 0 ? (size_t)32 << ((r >> 22) % 3) : 0;
        live[i] = align != 0 ? aligned_alloc(align, size) : malloc(size);
        CHECK(live[i] != NULL && malloc_usable_size(live[i]) >= size);
        memset(live[i], fill, size);
        live_size[i] = size;
        live_align[i] = align;
    }
    for (size_t i = 0; i < LIVE; i++) {
        if (live[i] != NULL && live_align[i] != 0) {
            free_aligned_sized(live[i], live_align[i], live_size[i]);
        } else if (live[i] != NULL) {
            free_sized(live[i], live_size[i]);
        }
    }
}

/* Interposes the library's munmap (freeing a huge block calls it): it
 * leaves errno set, as an interrupted or failing system call would, so a
 * free that did not preserve errno fails the checks below. */
int munmap(void *addr, size_t len) {
    long r = syscall(SYS_munmap, addr, len);
    errno = EINTR;
    return r == 0 ? 0 : -1;
}

static volatile int stop_churn;
static volatile long errno_changed;

/* Threads contend on the same size class (and its locks: frees in batches
 * fill sheaves and go to the barn); every free must leave errno alone. */
static void *churn(void *arg) {
    (void)arg;
    void *batch[64];
    long changed = 0;
    for (int round = 0; round < 3000 && !stop_churn; round++) {
        for (int i = 0; i < 64; i++) batch[i] = malloc(48);
        for (int i = 0; i < 64; i++) {
            errno = 0x7777;
            free(batch[i]);
            if (errno != 0x7777) changed++;
        }
        void *h = malloc(5 << 20); /* huge: munmap on free */
        errno = 0x7777;
        free(h);
        if (errno != 0x7777) changed++;
    }
    __atomic_add_fetch(&errno_changed, changed, __ATOMIC_RELAXED);
    return NULL;
}

static void test_free_preserves_errno(void) {
    void *p = malloc(100), *l = malloc(65536), *h = malloc(8 << 20);
    errno = EILSEQ;
    free(p);
    CHECK(errno == EILSEQ);
    free(l);
    CHECK(errno == EILSEQ);
    free(h);
    CHECK(errno == EILSEQ);
    free(NULL);
    CHECK(errno == EILSEQ);
    CHECK(realloc(malloc(10), 0) == NULL && errno == EILSEQ);
    anyalloc_free_nolock(malloc(10));
    CHECK(errno == EILSEQ);
    anyalloc_nolock_enter();
    free(malloc(10));
    CHECK(errno == EILSEQ);
    anyalloc_nolock_exit();
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, churn, NULL);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    CHECK(errno_changed == 0);
}

/* Pages of [p, p + len) resident now (mincore). */
static long resident_pages(void *p, size_t len) {
    size_t pages = len / 4096;
    unsigned char *v = malloc(pages);
    if (!v || mincore(p, len, v) != 0) return -1;
    long n = 0;
    for (size_t i = 0; i < pages; i++) n += v[i] & 1;
    free(v);
    return n;
}

static void test_realloc_huge_mremap(void) {
    /* Contents survive growth and shrinking of a huge block. */
    size_t n = 8 << 20;
    unsigned char *a = malloc(n);
    CHECK(a != NULL);
    if (!a) return;
    fill(a, n, 9);
    a = realloc(a, 64 << 20);
    CHECK(a != NULL && malloc_usable_size(a) >= (64 << 20) && intact(a, n, 9));
    a = realloc(a, 12 << 20); /* shrink, still huge */
    CHECK(a != NULL && malloc_usable_size(a) == (12 << 20) && intact(a, n, 9));
    a = realloc(a, 1 << 20); /* no longer huge: copied */
    CHECK(a != NULL && intact(a, 1 << 20, 9));
    free(a);

    /* No copy: only the first and the last 2 MiB of an 8 MiB block are
     * touched (transparent huge pages may fault in 2 MiB at once). A copy
     * would write, and so make resident, every page of the new block;
     * mremap moves the page tables and the middle stays untouched.
     * A fresh mapping: the 12 MiB block freed above is kept for reuse
     * (resident, 8 MiB of it filled), and would serve this one whole
     * unless an inline decay pass happened to unmap it in between. */
    malloc_trim(0);
    unsigned char *b = malloc(n);
    CHECK(b != NULL);
    if (!b) return;
    b[0] = 1;
    b[n - 1] = 2;
    unsigned char *c = realloc(b, 128 << 20);
    CHECK(c != NULL);
    if (!c) return;
    CHECK(c[0] == 1 && c[n - 1] == 2);
    long mid = resident_pages(c + (2 << 20), 4 << 20);
    CHECK(mid == 0);
    long tail = resident_pages(c + n, 64 << 20);
    CHECK(tail == 0);
    free(c);
}

/* Threads of this process named like the maintenance thread, counted with
 * raw system calls (no malloc: the child checks before its first call). */
static int maintainer_threads(void) {
    int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY);
    if (dir < 0) return -1;
    char buf[4096];
    int found = 0;
    long n;
    while ((n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
        for (long off = 0; off < n;) {
            unsigned short reclen = *(unsigned short *)(buf + off + 16);
            const char *name = buf + off + 19;
            off += reclen;
            if (name[0] == '.') continue;
            char path[64], comm[32] = {0};
            snprintf(path, sizeof path, "/proc/self/task/%s/comm", name);
            int fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            ssize_t r = read(fd, comm, sizeof comm - 1);
            close(fd);
            if (r > 0 && strncmp(comm, "anyalloc-mainta", 15) == 0) found++;
        }
    }
    close(dir);
    return found;
}

/* The maintainer names itself when it starts: waits (up to 10 s on a
 * loaded machine) for `want` such threads, returns the last count. */
static int await_maintainers(int want) {
    int n = maintainer_threads();
    for (int i = 0; i < 1000 && n != want; i++) {
        usleep(10000);
        n = maintainer_threads();
    }
    return n;
}

static void *idle_thread(void *arg) {
    (void)arg;
    pause();
    return NULL;
}

/* With ANYALLOC_MAINTENANCE=1: the parent has a maintainer and another
 * thread; a forked child has none until its first malloc, then one. */
static int fork_restarts_maintainer(void) {
    pthread_t t;
    pthread_create(&t, NULL, idle_thread, NULL);
    CHECK(await_maintainers(1) == 1);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int before = maintainer_threads();
        void *p = malloc(100);
        int after = await_maintainers(1);
        free(p);
        void *q = malloc(200); /* the second call starts no other */
        int later = maintainer_threads();
        free(q);
        printf("child: maintainers before the first malloc %d, after %d, later %d\n",
               before, after, later);
        fflush(stdout);
        _exit(before == 0 && after == 1 && later == 1 ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(maintainer_threads() == 1);
    printf("forkmaint: %d of %d checks passed\n", checks - failures, checks);
    return failures != 0;
}

/* Prints malloc_info after allocating 1000 objects of 100 bytes, for the
 * test to validate the XML. */
static int print_info(void) {
    static void *s[1000];
    for (int i = 0; i < 1000; i++) s[i] = malloc(100);
    void *h = malloc(6 << 20);
    int r = malloc_info(0, stdout);
    fflush(stdout);
    for (int i = 0; i < 1000; i++) free(s[i]);
    free(h);
    return r != 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "info") == 0) return print_info();
    if (argc > 1 && strcmp(argv[1], "forkmaint") == 0) return fork_restarts_maintainer();
    if (argc > 1 && strcmp(argv[1], "badsize") == 0) {
        free_sized(malloc(100), 5000); /* aborts with debug-checks */
        printf("badsize: not checked\n");
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "badalignedsize") == 0) {
        free_aligned_sized(aligned_alloc(8, 4096), 8, 1); /* aborts with debug-checks */
        printf("badalignedsize: not checked\n");
        return 0;
    }
    test_malloc();
    test_calloc();
    test_realloc();
    test_reallocarray();
    test_posix_memalign();
    test_aligned_alloc();
    test_memalign_valloc_pvalloc();
    test_usable_size();
    test_nolock_api();
    test_malloc_trim();
    test_mallinfo();
    test_malloc_stats();
    test_malloc_info();
    test_mallopt();
    test_libc_names();
    test_free_sized();
    test_free_preserves_errno();
    test_realloc_huge_mremap();
    if (failures) {
        printf("api: %d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("api: %d checks passed\n", checks);
    return 0;
}
