/* A huge block (above 4 MiB) served from a freed mapping kept for reuse,
 * freed with free_sized / free_aligned_sized and the size it was asked
 * for.
 *
 * A kept mapping of up to twice the block's page-rounded size comes whole,
 * so its usable size may be that mapping's length. The size check of the
 * debug-checks feature allows at most twice the size asked for: a request
 * of 5 MiB + 1 byte (5 MiB + 4 KiB of pages) served by a kept mapping of
 * 10 MiB + 8 KiB has more usable bytes than that, and its free_sized
 * aborted ("allocated with another size"). The usable size must stay
 * within twice the request, whatever the cache holds.
 *
 * Prints "huge_free_sized: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void (*free_sized)(void *p, size_t size);
static void (*free_aligned_sized)(void *p, size_t align, size_t size);

int main(void) {
    free_sized = (void (*)(void *, size_t))dlsym(RTLD_DEFAULT, "free_sized");
    free_aligned_sized =
        (void (*)(void *, size_t, size_t))dlsym(RTLD_DEFAULT, "free_aligned_sized");
    if (!free_sized || !free_aligned_sized) {
        printf("huge_free_sized: free_sized not found\n");
        return 1;
    }
    const size_t MIB = 1 << 20, PAGE = 4096;
    size_t most = 0;
    for (int aligned = 0; aligned < 2; aligned++) {
        for (size_t extra = 1; extra <= 2 * PAGE; extra += PAGE - 1) {
            size_t want = 5 * MIB + extra;
            /* A mapping of twice the request's pages, or a page more, freed:
             * kept for reuse. */
            size_t pages = (want + PAGE - 1) / PAGE * PAGE;
            for (size_t kept = 2 * pages - PAGE; kept <= 2 * pages; kept += PAGE) {
                char *big = malloc(kept);
                if (!big) {
                    printf("huge_free_sized: malloc(%zu) failed\n", kept);
                    return 1;
                }
                memset(big, 1, kept);
                free(big);
                char *q = aligned ? aligned_alloc(PAGE, want) : malloc(want);
                if (!q) {
                    printf("huge_free_sized: allocation of %zu failed\n", want);
                    return 1;
                }
                size_t usable = malloc_usable_size(q);
                if (usable > most)
                    most = usable;
                if (usable < want || usable > 2 * want) {
                    printf("huge_free_sized: %zu bytes asked, %zu usable\n", want, usable);
                    return 1;
                }
                memset(q, 2, want);
                if (aligned)
                    free_aligned_sized(q, PAGE, want);
                else
                    free_sized(q, want);
            }
        }
    }
    malloc_trim(0);
    printf("huge_free_sized: ok (largest usable %zu)\n", most);
    return 0;
}
