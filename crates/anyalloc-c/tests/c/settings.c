/* The ANYALLOC_* settings in effect: allocates 1 MiB blocks until malloc
 * fails (at most 512), prints how many it got, and writes the heap's
 * summary (malloc_stats: its zones) to stderr. */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
static void *blocks[512];
int main(void) {
    int n = 0;
    while (n < 512 && (blocks[n] = malloc(1 << 20)) != 0) n++;
    printf("settings: %d blocks\n", n);
    fflush(stdout);
    malloc_stats();
    for (int i = 0; i < n; i++) free(blocks[i]);
    return 0;
}
