/* Resident memory after the heap's creation with a big first zone
 * (ANYALLOC_MEMORY=64G: address space only): "big_zone: rss <KiB> KiB",
 * read from /proc/self/statm after some allocations and the statistics
 * (mallinfo2, which scans the zone's page descriptors). */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    void *p[64];
    for (int i = 0; i < 64; i++) p[i] = malloc(i < 32 ? 100 : 4 << 20);
    struct mallinfo2 m = mallinfo2();
    for (int i = 0; i < 64; i++) free(p[i]);
    long size = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &size, &rss) != 2) { puts("big_zone: no statm"); return 2; }
    printf("big_zone: rss %ld KiB, arena %zu\n", rss * (sysconf(_SC_PAGESIZE) / 1024), m.arena);
    return 0;
}
