/* A storm against the moves of huge blocks (realloc above 4 MiB to above
 * 4 MiB, with mremap) and the forks that wait for them: REALLOCERS threads
 * each keep BLOCKS blocks and realloc them between sizes above and below
 * 4 MiB, small sizes and back, checking a pattern at the start and the end
 * of each block after every realloc; FORKERS threads do the same with their
 * own blocks, and fork (the child checks, reallocs and frees the blocks of
 * the forking thread, the only one it has, allocates and _exits) and
 * posix_spawn `true`. Every thread runs two per-thread timers (SIGUSR1,
 * SIGUSR2, so handlers nest) whose handlers malloc, realloc (huge too) and
 * free (huge blocks and failures of the nolock path are allowed there:
 * a handler that interrupted the allocator gets none); now and then a
 * handler on the first reallocer, a thread that never forks itself, forks
 * (its child only _exits: the handler may have interrupted the allocator;
 * a handler that interrupted its own thread's fork would wait for ever for
 * glibc's atfork lock, which that fork holds). A failed realloc outside
 * the handlers is a failure.
 *
 * Afterwards every block is checked and freed, every child reaped (each
 * within CHILD_WAIT seconds) and the heap's counters (mallinfo2's hblks,
 * hblkhd and uordblks, after malloc_trim) must be back where they were,
 * but for what glibc keeps (storm_counters_back).
 *
 * Bounded by time: argv[1] milliseconds (default 1500); alarm(WATCHDOG)
 * turns a hang into a failure, in the parent and in every child (unless
 * STORM_NO_WATCHDOG is set, to attach a debugger; a child that hangs is
 * then killed only 2 minutes later). STORM_HANDLER_FORK_EVERY=N: one in N
 * SIGUSR1 handlers there forks (default 64, 0: none). Prints
 * "storm_realloc_huge_fork: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "storm_util.h"

#define REALLOCERS 3
#define FORKERS 2
#define THREADS (REALLOCERS + FORKERS)
#define BLOCKS 3
#define WATCHDOG 30
#define CHILD_WAIT 10
#define EDGE 64
#define MIB ((size_t)1 << 20)
#define MAX_HANDLER_KIDS 4096

extern char **environ;

static atomic_long slowest_fork_us, handler_failed, handled, forks, spawns, reallocs, huge_moves, handler_forks;
static atomic_int stop;
static int no_watchdog;
/* One in this many SIGUSR1 handlers on the first reallocer forks
 * (STORM_HANDLER_FORK_EVERY, default 64; 0: none). */
static int handler_fork_every = 64;

static void watchdog(int sig) {
    (void)sig;
    die("storm_realloc_huge_fork: watchdog: hung\n");
}

static void arm(void) {
    if (!no_watchdog) alarm(WATCHDOG);
}

/* A block with its size and a generation; its first and last EDGE bytes
 * (all of it when smaller) hold bytes derived from both. */
struct block {
    unsigned char *p;
    size_t n;
    unsigned gen;
};

static unsigned char pat(unsigned gen, size_t i) {
    return (unsigned char)(gen * 131u + i * 7u + 1u);
}

static void fill(struct block *b) {
    size_t m = b->n < EDGE ? b->n : EDGE;
    for (size_t i = 0; i < m; i++) b->p[i] = pat(b->gen, i);
    if (b->n > EDGE)
        for (size_t i = b->n - EDGE; i < b->n; i++) b->p[i] = pat(b->gen, i);
}

/* Returns 0 when the first `upto` bytes' edges hold the pattern (the start,
 * and the end of the old block when it is all kept). */
static int check_kept(const struct block *b, const unsigned char *p, size_t kept) {
    size_t m = kept < EDGE ? kept : EDGE;
    for (size_t i = 0; i < m; i++)
        if (p[i] != pat(b->gen, i)) return -1;
    if (kept == b->n && b->n > EDGE)
        for (size_t i = b->n - EDGE; i < b->n; i++)
            if (p[i] != pat(b->gen, i)) return -1;
    return 0;
}

static size_t pick(unsigned r) {
    switch (r % 10) {
    case 0:
    case 1:
    case 2:
    case 3: return 4 * MIB + 4096 + (size_t)(r >> 4) % (20 * MIB); /* huge */
    case 4: return 4 * MIB + 1 + (r >> 4) % 8192;                  /* just above */
    case 5: return 4 * MIB - (r >> 4) % 8192;                      /* just below */
    case 6: return 1 * MIB + (r >> 4) % (3 * MIB);                 /* below */
    case 7: return 8192 + (r >> 4) % 300000;
    default: return 1 + (r >> 4) % 2000;                           /* small */
    }
}

static unsigned next(unsigned *seed) {
    *seed = *seed * 1103515245u + 12345u;
    return *seed >> 8;
}

/* Reallocs b to n, checks what must have been kept, refills. Returns 0, -1
 * on corruption, 1 when realloc failed (the block is kept). */
static int move_block(struct block *b, size_t n) {
    size_t old = b->n;
    unsigned char *q = realloc(b->p, n);
    if (!q) return 1;
    if (old > 4 * MIB && n > 4 * MIB) atomic_fetch_add_explicit(&huge_moves, 1, memory_order_relaxed);
    if (check_kept(b, q, old < n ? old : n)) return -1;
    b->p = q;
    b->n = n;
    b->gen++;
    fill(b);
    return 0;
}

static int new_block(struct block *b, size_t n, unsigned gen) {
    b->p = malloc(n);
    if (!b->p) return -1;
    b->n = n;
    b->gen = gen;
    fill(b);
    return 0;
}

/* Each thread's blocks, where the children of its forks find them. */
static struct block blocks[THREADS][BLOCKS];

/* A handler's blocks: one per thread and signal (a handler interrupts its
 * own thread only; a SIGUSR2 handler may interrupt the SIGUSR1 one). */
struct hstate {
    struct block b;
    unsigned seed;
    int fork_every;
};
static __thread struct hstate hs[2];
static __thread int my_idx = -1;

static pid_t handler_kids[MAX_HANDLER_KIDS];
static atomic_int handler_kid_count;

static void handler(int sig) {
    int saved = errno;
    atomic_fetch_add_explicit(&handled, 1, memory_order_relaxed);
    struct hstate *h = &hs[sig == SIGUSR2];
    for (int k = 0; k < 2; k++) {
        unsigned r = next(&h->seed);
        if (!h->b.p) {
            /* A handler that interrupted the allocator allocates on its
             * nolock path, which serves no huge block: NULL is fine. */
            if (new_block(&h->b, pick(r), r)) h->b.p = NULL;
        } else if (r % 7 == 0) {
            if (check_kept(&h->b, h->b.p, h->b.n)) die("storm_realloc_huge_fork: a handler's block was corrupted\n");
            free(h->b.p);
            h->b.p = NULL;
        } else {
            /* The nolock path serves no huge block: NULL is fine. */
            if (move_block(&h->b, pick(r >> 3)) < 0)
                die("storm_realloc_huge_fork: a handler's realloc lost the contents\n");
        }
        /* The nolock path may fail (a busy slot): counted, not fatal. */
        void *s = malloc(16 + r % 500);
        if (!s) {
            atomic_fetch_add_explicit(&handler_failed, 1, memory_order_relaxed);
            continue;
        }
        memset(s, 0x5a, 16);
        free(s);
    }
    /* Now and then fork from the handler: the child only _exits. */
    if (h->fork_every && next(&h->seed) % h->fork_every == 0 && !atomic_load(&stop)) {
        int slot = atomic_fetch_add(&handler_kid_count, 1);
        if (slot < MAX_HANDLER_KIDS) {
            pid_t pid = fork();
            if (pid == 0) _exit(0);
            if (pid < 0) die("storm_realloc_huge_fork: fork in a handler failed\n");
            handler_kids[slot] = pid;
            atomic_fetch_add(&handler_forks, 1);
        }
    }
    errno = saved;
}

static timer_t timers[THREADS][2];

static void free_handler_blocks(void) {
    for (int s = 0; s < 2; s++)
        if (hs[s].b.p) {
            if (check_kept(&hs[s].b, hs[s].b.p, hs[s].b.n))
                die("storm_realloc_huge_fork: a handler's block was corrupted at the end\n");
            free(hs[s].b.p);
            hs[s].b.p = NULL;
        }
}

static void init_blocks(int idx, unsigned *seed) {
    for (int i = 0; i < BLOCKS; i++)
        if (new_block(&blocks[idx][i], 5 * MIB + (size_t)i * MIB, next(seed)))
            die("storm_realloc_huge_fork: malloc failed\n");
}

/* One realloc of one of the thread's blocks. */
static void churn(int idx, unsigned *seed) {
    unsigned r = next(seed);
    struct block *b = &blocks[idx][r % BLOCKS];
    int e = move_block(b, pick(r >> 2));
    if (e < 0) die("storm_realloc_huge_fork: realloc lost the contents\n");
    if (e > 0) die("storm_realloc_huge_fork: realloc failed\n");
    atomic_fetch_add_explicit(&reallocs, 1, memory_order_relaxed);
}

static void free_blocks(int idx) {
    for (int i = 0; i < BLOCKS; i++) {
        struct block *b = &blocks[idx][i];
        if (check_kept(b, b->p, b->n)) die("storm_realloc_huge_fork: a block was corrupted at the end\n");
        free(b->p);
        b->p = NULL;
    }
}

static void *reallocer(void *arg) {
    int idx = (int)(intptr_t)arg;
    my_idx = idx;
    unsigned seed = 31 + idx;
    hs[0].seed = 7 + idx;
    hs[1].seed = 1000 + idx;
    hs[0].fork_every = idx == 0 ? handler_fork_every : 0; /* this thread never forks itself */
    init_blocks(idx, &seed);
    storm_timers_start(timers[idx], 300000 + 100000 * idx, "storm_realloc_huge_fork");
    storm_block_signals(SIG_UNBLOCK);
    while (!atomic_load(&stop)) churn(idx, &seed);
    storm_timers_stop(timers[idx]);
    free_handler_blocks();
    free_blocks(idx);
    return NULL;
}

/* Waits for pid at most CHILD_WAIT seconds, not under the timers. */
static void wait_child(pid_t pid) {
    int st;
    storm_block_signals(SIG_BLOCK);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (w < 0 && errno != EINTR) die("storm_realloc_huge_fork: waitpid failed\n");
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > CHILD_WAIT) {
            char m[96];
            snprintf(m, sizeof m, "storm_realloc_huge_fork: child %d hung\n", (int)pid);
            if (no_watchdog) {
                ssize_t r = write(2, m, strlen(m));
                (void)r;
                sleep(120);
            }
            kill(pid, SIGKILL);
            die(m);
        }
        struct timespec d = {0, 200000};
        nanosleep(&d, NULL);
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
        char m[96];
        snprintf(m, sizeof m, "storm_realloc_huge_fork: a child failed (status %#x)\n", st);
        die(m);
    }
    storm_block_signals(SIG_UNBLOCK);
}

/* In the child of a forker: the forking thread's blocks are all it has. */
static void child(int idx, unsigned seed) {
    if (!no_watchdog) alarm(WATCHDOG);
    for (int i = 0; i < BLOCKS; i++)
        if (check_kept(&blocks[idx][i], blocks[idx][i].p, blocks[idx][i].n)) _exit(10);
    for (int k = 0; k < 6; k++) {
        unsigned r = next(&seed);
        if (move_block(&blocks[idx][r % BLOCKS], pick(r >> 2))) _exit(11);
    }
    /* Now and then a grandchild: the child's own fork, with the counts of
     * moves and forks it inherited, must not wait for threads it lacks. */
    if (seed % 4 == 0) {
        pid_t g = fork();
        if (g == 0) {
            if (move_block(&blocks[idx][0], 11 * MIB)) _exit(20);
            if (move_block(&blocks[idx][0], 5 * MIB)) _exit(21);
            _exit(0);
        }
        if (g < 0) _exit(22);
        int st;
        for (int t = 0;; t++) {
            pid_t w = waitpid(g, &st, WNOHANG);
            if (w == g) break;
            if (w < 0 && errno != EINTR) _exit(23);
            if (t > CHILD_WAIT * 1000) _exit(24);
            struct timespec d = {0, 1000000};
            nanosleep(&d, NULL);
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st)) _exit(25);
    }
    struct block extra;
    if (new_block(&extra, 6 * MIB, 3)) _exit(12);
    if (move_block(&extra, 13 * MIB)) _exit(13);
    if (move_block(&extra, 100)) _exit(14);
    if (move_block(&extra, 7 * MIB)) _exit(15);
    free(extra.p);
    void *s = malloc(200);
    if (!s) _exit(16);
    free(s);
    for (int i = 0; i < BLOCKS; i++) {
        struct block *b = &blocks[idx][i];
        if (check_kept(b, b->p, b->n)) _exit(17);
        free(b->p);
    }
    _exit(0);
}

static void *forker(void *arg) {
    int idx = (int)(intptr_t)arg;
    my_idx = idx;
    unsigned seed = 77 + idx;
    hs[0].seed = 77 + idx;
    hs[1].seed = 2000 + idx;
    /* No forks from these handlers: one that interrupted this thread's own
     * fork would wait for glibc's atfork lock, which that fork holds. */
    init_blocks(idx, &seed);
    storm_timers_start(timers[idx], 400000 + 200000 * (idx - REALLOCERS), "storm_realloc_huge_fork");
    storm_block_signals(SIG_UNBLOCK);
    /* At least one spawn and one fork, however slow the forks are (one
     * that waits for a move interrupted by a handler that forks takes up
     * to a second). */
    for (long i = 0; i < 2 || !atomic_load(&stop); i++) {
        for (int k = 0; k < 3; k++) churn(idx, &seed);
        if (i % 4 == 0) {
            wait_child(storm_spawn_true("storm_realloc_huge_fork"));
            atomic_fetch_add(&spawns, 1);
            continue;
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        pid_t pid = fork();
        if (pid == 0) child(idx, seed);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
        long seen = atomic_load(&slowest_fork_us);
        while (us > seen && !atomic_compare_exchange_weak(&slowest_fork_us, &seen, us))
            ;
        if (pid < 0) die("storm_realloc_huge_fork: fork failed\n");
        wait_child(pid);
        atomic_fetch_add(&forks, 1);
    }
    storm_timers_stop(timers[idx]);
    free_handler_blocks();
    free_blocks(idx);
    return NULL;
}

static void reap_handler_kids(void) {
    int n = atomic_load(&handler_kid_count);
    if (n > MAX_HANDLER_KIDS) n = MAX_HANDLER_KIDS;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < n; i++) {
        pid_t pid = handler_kids[i];
        if (pid <= 0) continue; /* the slot was taken, the fork not done */
        int st;
        for (;;) {
            pid_t w = waitpid(pid, &st, WNOHANG);
            if (w == pid) break;
            if (w < 0 && errno != EINTR) die("storm_realloc_huge_fork: waitpid (handler child) failed\n");
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - start.tv_sec > CHILD_WAIT) {
                kill(pid, SIGKILL);
                die("storm_realloc_huge_fork: a handler's child hung\n");
            }
            struct timespec d = {0, 200000};
            nanosleep(&d, NULL);
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st)) die("storm_realloc_huge_fork: a handler's child failed\n");
    }
}

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 1500;
    no_watchdog = getenv("STORM_NO_WATCHDOG") != NULL;
    if (getenv("STORM_HANDLER_FORK_EVERY")) handler_fork_every = atoi(getenv("STORM_HANDLER_FORK_EVERY"));
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    arm();
    malloc_trim(0);
    struct mallinfo2 before = mallinfo2();

    storm_handle_signals(handler, "storm_realloc_huge_fork");
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, i < REALLOCERS ? reallocer : forker, (void *)(intptr_t)i))
            die("storm_realloc_huge_fork: pthread_create\n");
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000};
    while (nanosleep(&d, &d) && errno == EINTR)
        ;
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    reap_handler_kids();

    malloc_trim(0);
    struct mallinfo2 after = mallinfo2();
    int leak = !storm_counters_back(&before, &after);
    int ok = handled > 0 && forks > 0 && spawns > 0 && huge_moves > 0 && !leak;
    printf("storm_realloc_huge_fork: %s: %ld forks, %ld handler forks, %ld spawns, %ld reallocs "
           "(%ld huge to huge), %ld signals handled (%ld small mallocs failed); slowest fork %ld ms; huge blocks %zu -> %zu (%zu -> %zu bytes), bytes in use %zu -> %zu\n",
           ok ? "ok" : (leak ? "FAILED (memory not returned)" : "FAILED (no storm)"), (long)forks,
           (long)handler_forks, (long)spawns, (long)reallocs, (long)huge_moves, (long)handled, (long)handler_failed,
           (long)slowest_fork_us / 1000,
           before.hblks, after.hblks, before.hblkhd, after.hblkhd, before.uordblks, after.uordblks);
    return ok ? 0 : 1;
}
