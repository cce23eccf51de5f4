/* Idle memory goes back to the OS without the maintenance thread (the
 * library's default): 200 MB of 300 KB blocks filled and freed, then the
 * program goes on with more malloc/free calls (one 300 KB block each, a
 * millisecond apart). "back": loops until three quarters of the burst have
 * left the resident set (at most 60 s; no duration is checked) and prints
 * "ok". "kept" (ANYALLOC_DECAY=0): makes the same calls for 1.5 s and at
 * least 500 times, and prints "ok" if the resident set stayed within a
 * quarter of the burst of its peak. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 300000L
#define BURST (200L << 20)

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char l[256];
    long v = -1;
    if (!f) return -1;
    while (fgets(l, sizeof l, f))
        if (!strncmp(l, "VmRSS:", 6)) v = atol(l + 6);
    fclose(f);
    return v;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void one_more_call(void) {
    char *q = malloc(BLOCK);
    if (!q) { puts("malloc failed"); exit(1); }
    memset(q, 7, 4096);
    free(q);
    usleep(1000);
}

int main(int argc, char **argv) {
    int kept = argc > 1 && !strcmp(argv[1], "kept");
    long n = BURST / BLOCK;
    static char *p[BURST / BLOCK];
    for (long i = 0; i < n; i++) {
        p[i] = malloc(BLOCK);
        if (!p[i]) { puts("malloc failed"); return 1; }
        memset(p[i], 1, BLOCK);
    }
    long peak = rss_kib();
    for (long i = 0; i < n; i++) free(p[i]);
    long burst = BURST / 1024, calls = 0;
    double t0 = now();
    if (kept) {
        while (calls < 500 || now() - t0 < 1.5) { one_more_call(); calls++; }
        long r = rss_kib();
        printf("%s: peak %ld MiB, %ld MiB after %ld calls\n",
               r + burst / 4 >= peak ? "ok" : "given back", peak >> 10, r >> 10, calls);
        return r + burst / 4 >= peak ? 0 : 1;
    }
    while (rss_kib() + burst * 3 / 4 > peak && now() - t0 < 60) { one_more_call(); calls++; }
    long r = rss_kib();
    int ok = r + burst * 3 / 4 <= peak;
    printf("%s: peak %ld MiB, %ld MiB after %ld calls (%.1f s)\n", ok ? "ok" : "no give-back",
           peak >> 10, r >> 10, calls, now() - t0);
    return ok ? 0 : 1;
}
