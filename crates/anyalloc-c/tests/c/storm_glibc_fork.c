/* A storm against glibc's own locks that its fork takes after every
 * pthread_atfork prepare handler (the stdio list lock, the NSS database
 * lock): WORKERS threads loop on calls that hold them (fopen, fprintf,
 * fclose, fflush(NULL), getpwuid, getaddrinfo("localhost")), each under two
 * per-thread timers (SIGUSR1 and SIGUSR2, so handlers also nest) whose
 * handlers malloc, calloc, realloc (growing across 4 MiB), posix_memalign
 * and free; FORKERS threads fork (the child allocates small and huge
 * blocks and _exits) and posix_spawn `true`, under the same timers. The
 * heap's prepare handler holds every heap lock before glibc takes its own:
 * no handler that interrupted a holder of glibc's locks may wait for the
 * fork.
 *
 * Afterwards every block is freed and the heap's counters (mallinfo2's
 * uordblks, hblks and hblkhd, after malloc_trim) must be back where they
 * were, but for what glibc keeps (storm_counters_back).
 *
 * Bounded by time: argv[1] milliseconds (default 1200); alarm(WATCHDOG)
 * turns a hang into a failure, in the parent and in every child. Prints
 * "storm_glibc_fork: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <netdb.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "storm_util.h"

#define WORKERS 3
#define FORKERS 2
#define WATCHDOG 20
#define RING 32

extern char **environ;

static atomic_long handled, forks, spawns, rounds;
static atomic_int stop;

static void watchdog(int sig) {
    (void)sig;
    die("storm_glibc_fork: watchdog: hung\n");
}

/* One ring of blocks per thread and signal (a handler interrupts its own
 * thread only, and a SIGUSR2 handler may interrupt the SIGUSR1 one). Each
 * block starts with its size and is filled with a byte derived from it. */
struct ring {
    void *b[RING];
    unsigned seed;
};
static __thread struct ring rings[2];

static void fill(unsigned char *p, size_t n) {
    memcpy(p, &n, sizeof n);
    size_t m = n < 256 ? n : 256;
    for (size_t i = sizeof n; i < m; i++) p[i] = (unsigned char)(n + i);
    if (n > 256) p[n - 1] = (unsigned char)n;
}

static void check(unsigned char *p) {
    size_t n;
    memcpy(&n, p, sizeof n);
    size_t m = n < 256 ? n : 256;
    for (size_t i = sizeof n; i < m; i++)
        if (p[i] != (unsigned char)(n + i)) die("storm_glibc_fork: a block was corrupted\n");
    if (n > 256 && p[n - 1] != (unsigned char)n) die("storm_glibc_fork: a block's end was corrupted\n");
}

static size_t pick(unsigned r) {
    switch (r % 16) {
    case 0: return (size_t)4 * 1024 * 1024 - 4096 + r % 8192; /* across 4 MiB */
    case 1:
    case 2: return 8192 + r % 300000;
    default: return 16 + r % 2000;
    }
}

static void churn(struct ring *g, int rounds_n) {
    for (int round = 0; round < rounds_n; round++) {
        g->seed = g->seed * 1103515245u + 12345u;
        unsigned r = g->seed >> 8;
        void **slot = &g->b[r % RING];
        unsigned char *old = *slot;
        if (old) check(old);
        size_t n = pick(r >> 4);
        unsigned char *p = NULL;
        switch ((r >> 2) % 5) {
        case 0:
            free(old);
            p = malloc(n);
            break;
        case 1:
            free(old);
            p = calloc(1, n);
            if (p && n <= 4096)
                for (size_t i = 0; i < n; i++)
                    if (p[i]) die("storm_glibc_fork: calloc returned dirty memory\n");
            break;
        case 2:
            /* realloc keeps the old contents: check the prefix after. */
            p = realloc(old, n);
            if (!p) {
                *slot = old;
                return;
            }
            break;
        case 3:
            free(old);
            if (posix_memalign((void **)&p, (size_t)64 << (r % 7), n)) p = NULL;
            if (p && ((uintptr_t)p & (((size_t)64 << (r % 7)) - 1)))
                die("storm_glibc_fork: posix_memalign misaligned\n");
            break;
        default:
            free(old);
            p = NULL;
            break;
        }
        if (p) fill(p, n);
        *slot = p;
    }
}

static void handler(int sig) {
    int saved = errno;
    atomic_fetch_add_explicit(&handled, 1, memory_order_relaxed);
    churn(&rings[sig == SIGUSR2], 3);
    errno = saved;
}

static void free_rings(void) {
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < RING; i++) {
            if (rings[s].b[i]) check(rings[s].b[i]);
            free(rings[s].b[i]);
            rings[s].b[i] = NULL;
        }
}

static timer_t timers[WORKERS + FORKERS][2];

static void *worker(void *arg) {
    int idx = (int)(intptr_t)arg;
    rings[0].seed = 7 + idx;
    rings[1].seed = 1000 + idx;
    storm_timers_start(timers[idx], 20000 + 20000 * idx, "storm_glibc_fork");
    storm_block_signals(SIG_UNBLOCK);
    char path[64];
    snprintf(path, sizeof path, "/tmp/storm_glibc_fork.%d.%d", (int)getpid(), idx);
    FILE *keep[8];
    for (int i = 0; i < 8; i++)
        if (!(keep[i] = fopen("/dev/null", "w"))) die("storm_glibc_fork: fopen failed\n");
    for (long i = 0; !atomic_load(&stop); i++) {
        switch ((i + idx) % 4) {
        case 0: {
            FILE *fp = fopen(path, "w+");
            if (!fp) die("storm_glibc_fork: fopen failed\n");
            for (int k = 0; k < 20; k++) fprintf(fp, "%ld %d %s\n", i, k, "storm");
            fclose(fp);
            break;
        }
        case 1:
            for (int k = 0; k < 8; k++) fprintf(keep[k], "%ld\n", i);
            fflush(NULL);
            break;
        case 2:
            if (!getpwuid(0)) die("storm_glibc_fork: getpwuid failed\n");
            break;
        default: {
            struct addrinfo hints, *res = NULL;
            memset(&hints, 0, sizeof hints);
            hints.ai_socktype = SOCK_STREAM;
            if (getaddrinfo("localhost", "80", &hints, &res) == 0) freeaddrinfo(res);
            break;
        }
        }
        atomic_fetch_add_explicit(&rounds, 1, memory_order_relaxed);
    }
    storm_timers_stop(timers[idx]);
    for (int i = 0; i < 8; i++) fclose(keep[i]);
    unlink(path);
    free_rings();
    return NULL;
}

/* Not under the timers: a thread whose handlers take longer than their
 * period (a loaded machine) would never get back to its own waitpid (seen
 * with the Rust storm's sleeping wait). */
static void wait_child(pid_t pid) {
    int st;
    storm_block_signals(SIG_BLOCK);
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) die("storm_glibc_fork: waitpid failed\n");
    if (!WIFEXITED(st) || WEXITSTATUS(st)) die("storm_glibc_fork: a child failed\n");
    storm_block_signals(SIG_UNBLOCK);
}

static void *forker(void *arg) {
    int idx = (int)(intptr_t)arg;
    rings[0].seed = 77 + idx;
    rings[1].seed = 2000 + idx;
    storm_timers_start(timers[idx], 50000 + 50000 * (idx - WORKERS), "storm_glibc_fork");
    storm_block_signals(SIG_UNBLOCK);
    for (long i = 0; !atomic_load(&stop); i++) {
        if (i % 4 == 3) {
            wait_child(storm_spawn_true("storm_glibc_fork"));
            atomic_fetch_add(&spawns, 1);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            alarm(WATCHDOG);
            void *small = malloc(200);
            void *big = malloc((size_t)5 << 20);
            void *mid = calloc(1, 100000);
            if (!small || !big || !mid) _exit(2);
            memset(small, 1, 200);
            memset(big, 2, (size_t)5 << 20);
            big = realloc(big, (size_t)9 << 20);
            if (!big) _exit(3);
            free(small);
            free(big);
            free(mid);
            /* stdio in the child: its list lock was reset by fork. */
            FILE *fp = fopen("/dev/null", "w");
            if (!fp) _exit(4);
            fprintf(fp, "child\n");
            fclose(fp);
            _exit(0);
        }
        if (pid < 0) die("storm_glibc_fork: fork failed\n");
        wait_child(pid);
        atomic_fetch_add(&forks, 1);
    }
    storm_timers_stop(timers[idx]);
    free_rings();
    return NULL;
}

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 1200;
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    alarm(WATCHDOG);
    /* Warm up stdio, NSS and the resolver before the baseline. */
    {
        getpwuid(0);
        struct addrinfo *res = NULL;
        if (getaddrinfo("localhost", "80", NULL, &res) == 0) freeaddrinfo(res);
        FILE *fp = fopen("/dev/null", "w");
        if (fp) fclose(fp);
    }
    malloc_trim(0);
    struct mallinfo2 before = mallinfo2();

    storm_handle_signals(handler, "storm_glibc_fork");
    pthread_t t[WORKERS + FORKERS];
    for (int i = 0; i < WORKERS + FORKERS; i++)
        if (pthread_create(&t[i], NULL, i < WORKERS ? worker : forker, (void *)(intptr_t)i))
            die("storm_glibc_fork: pthread_create\n");
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000};
    while (nanosleep(&d, &d) && errno == EINTR)
        ;
    atomic_store(&stop, 1);
    for (int i = 0; i < WORKERS + FORKERS; i++) pthread_join(t[i], NULL);

    malloc_trim(0);
    struct mallinfo2 after = mallinfo2();
    int leak = !storm_counters_back(&before, &after);
    int ok = handled > 0 && forks > 0 && spawns > 0 && rounds > 0 && !leak;
    printf("storm_glibc_fork: %s: %ld forks, %ld spawns, %ld rounds, %ld signals handled; "
           "huge blocks %zu -> %zu (%zu -> %zu bytes), bytes in use %zu -> %zu\n",
           ok ? "ok" : (leak ? "FAILED (memory not returned)" : "FAILED (no storm)"), (long)forks,
           (long)spawns, (long)rounds, (long)handled, before.hblks, after.hblks, before.hblkhd,
           after.hblkhd, before.uordblks, after.uordblks);
    return ok ? 0 : 1;
}
