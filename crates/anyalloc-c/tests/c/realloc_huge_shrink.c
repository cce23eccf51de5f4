/* realloc of a huge block (above 4 MiB, mmap'ed) to a smaller huge size
 * gives the tail back to the OS, as glibc's (mremap) does: a 100 MiB block,
 * every page resident, shrunk to 51 MiB must lower the RSS by more than
 * 40 MiB, keep its contents, and stay usable. Kept in place (it is more
 * than half used), the whole 100 MiB stayed resident. And a huge block
 * grown by 4 KiB at a time moves a few times, not once per call. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) {
            v = atol(line + 6);
            break;
        }
    if (f)
        fclose(f);
    return v;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const size_t old = 100 << 20, new = 51 << 20;
    unsigned char *p = malloc(old);
    if (!p) {
        printf("FAIL: malloc(%zu)\n", old);
        return 1;
    }
    for (size_t i = 0; i < old; i++)
        p[i] = (unsigned char)(i * 7 + 3);
    long full = rss_kib();
    unsigned char *q = realloc(p, new);
    long shrunk = rss_kib();
    if (!q) {
        printf("FAIL: realloc to %zu\n", new);
        return 1;
    }
    for (size_t i = 0; i < new; i += 4093)
        if (q[i] != (unsigned char)(i * 7 + 3)) {
            printf("FAIL: byte %zu changed\n", i);
            return 1;
        }
    memset(q, 1, new);
    free(q);
    printf("RSS %ld MiB with the block, %ld MiB once shrunk\n", full >> 10, shrunk >> 10);
    if (full - shrunk <= 40 << 10) {
        printf("FAIL: the shrink gave back %ld MiB\n", (full - shrunk) >> 10);
        return 1;
    }
    /* A huge block grown by a page at a time moves a logarithmic number
     * of times (a growth takes half as much again, a size within the block
     * keeps it): before, every call was an mremap and two signal-mask
     * calls. Counted by the usable size, which changes at every move. */
    size_t n = 5 << 20;
    unsigned char *g = malloc(n);
    if (!g) {
        printf("FAIL: malloc(%zu)\n", n);
        return 1;
    }
    g[0] = 9;
    size_t usable = malloc_usable_size(g);
    int moves = 0;
    while (n < (20 << 20)) {
        n += 4096;
        g = realloc(g, n);
        if (!g) {
            printf("FAIL: realloc to %zu\n", n);
            return 1;
        }
        g[n - 1] = 1;
        if (malloc_usable_size(g) != usable) {
            moves++;
            usable = malloc_usable_size(g);
        }
    }
    if (g[0] != 9) {
        printf("FAIL: the grown block lost its first byte\n");
        return 1;
    }
    free(g);
    printf("%d remaps to grow a block from 5 to 20 MiB by 4 KiB steps\n", moves);
    if (moves > 8) {
        printf("FAIL: a remap per step\n");
        return 1;
    }
    printf("realloc_huge_shrink: ok\n");
    return 0;
}
