/* A signal storm over the whole allocation interface: worker threads churn
 * on malloc, calloc, realloc (grow, shrink, across 4 MiB), reallocarray,
 * posix_memalign, aligned_alloc, memalign (alignments up to 64 KiB),
 * malloc_usable_size, free, free_sized and free_aligned_sized, while
 * SIGUSR1 (a per-thread timer) and SIGUSR2 (a killer thread) interrupt them
 * with handlers that make the same calls on their own blocks. Every block
 * carries a pattern, checked before every call that touches it and after
 * every realloc; every result's alignment and usable size are checked. In a
 * handler any allocation may return NULL (the nolock path's "not now"; above
 * 4 MiB it cannot map): counted, and the old block of a failed realloc must
 * be intact. A worker's call never fails.
 *
 * Bounded by counts: each worker makes OPS calls, then the storm stops.
 * alarm(WATCHDOG) turns a hang into a failure. Usage: storm_api [OPS].
 * Prints "storm_api: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "storm_util.h"

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define WORKERS 3
#define SLOTS 128
#define HSLOTS 8
#define TIMER_NS 200000 /* 5 kHz per worker */
#define WATCHDOG 30
#define HUGE ((size_t)4 << 20)

struct blk {
    unsigned char *p;
    size_t n;     /* bytes asked (the last realloc's size) */
    size_t align; /* 0: malloc family; else aligned_alloc & co. */
    unsigned char tag;
};

static void (*free_sized_fn)(void *, size_t);
static void (*free_aligned_sized_fn)(void *, size_t, size_t);

static atomic_int stop_killer;
static atomic_long sig_handled[2], h_ok, h_null, h_huge_null, h_huge_ok, w_ops, w_huge;
static pthread_t workers[WORKERS];

static void watchdog(int sig) {
    (void)sig;
    die("storm_api: watchdog: hung\n");
}

static inline unsigned rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static void fill(struct blk *b) {
    if (b->n <= 65536) {
        memset(b->p, b->tag, b->n);
        return;
    }
    memset(b->p, b->tag, 256);
    memset(b->p + b->n - 256, b->tag, 256);
    for (size_t i = 4093 * 1; i < b->n; i += 4093) b->p[i] = b->tag;
}

/* Checks the bytes below `upto` that fill() wrote for a block of n bytes. */
static void check_upto(const unsigned char *p, size_t n, unsigned char tag, size_t upto) {
    if (n <= 65536) {
        for (size_t i = 0; i < upto; i++)
            if (p[i] != tag) die("storm_api: pattern violated: a block was overwritten\n");
        return;
    }
    for (size_t i = 0; i < 256 && i < upto; i++)
        if (p[i] != tag) die("storm_api: pattern violated at a big block's head\n");
    for (size_t i = n - 256; i < n && i < upto; i++)
        if (p[i] != tag) die("storm_api: pattern violated at a big block's tail\n");
    for (size_t i = 4093; i < n && i < upto; i += 4093)
        if (p[i] != tag) die("storm_api: pattern violated inside a big block\n");
}

static void check(const struct blk *b) {
    check_upto(b->p, b->n, b->tag, b->n);
    size_t a = b->align ? b->align : (b->n < 16 ? 8 : 16);
    if ((uintptr_t)b->p % a) die("storm_api: misaligned block\n");
}

static size_t pick_size(unsigned *s) {
    unsigned r = rnd(s);
    if (r % 64 == 0) return 16384 + r % 200000;
    if (r % 8 == 0) return 513 + r % 7680;
    return r % 513; /* 0 included */
}

static size_t pick_align(unsigned *s) {
    return (size_t)8 << (rnd(s) % 14); /* 8 .. 64 KiB */
}

/* One step on slot b. `ctx` is 0 for a worker, 1 for a handler: in a
 * handler NULL is allowed (counted), in a worker it is fatal. Returns 1 when
 * an allocation succeeded, 0 when it got NULL, -1 when nothing was
 * allocated. */
static int step(struct blk *b, unsigned *seed, int ctx) {
    unsigned r = rnd(seed);
    if (!b->p) {
        size_t n = pick_size(seed);
        size_t align = 0;
        unsigned char *p = NULL;
        int zeroed = 0;
        switch (r % 8) {
        case 0: p = malloc(n); break;
        case 1: p = calloc(1 + n % 7, n / 7 + 1); n = (1 + n % 7) * (n / 7 + 1); zeroed = 1; break;
        case 2: p = realloc(NULL, n); break;
        case 3: p = reallocarray(NULL, n / 4 + 1, 4); n = (n / 4 + 1) * 4; break;
        case 4: {
            align = pick_align(seed);
            void *q;
            int e = posix_memalign(&q, align, n);
            if (e == 0) p = q;
            else if (e != ENOMEM) die("storm_api: posix_memalign: not ENOMEM\n");
            break;
        }
        case 5: align = pick_align(seed); p = aligned_alloc(align, n); break;
        case 6: align = pick_align(seed); p = memalign(align, n); break;
        default:
            if (rnd(seed) % 64 == 0) { /* a huge block: mmap on the normal path */
                n = HUGE + 1 + rnd(seed) % 65536;
                p = malloc(n);
                if (!p && ctx) atomic_fetch_add_explicit(&h_huge_null, 1, memory_order_relaxed);
                if (p && ctx) atomic_fetch_add_explicit(&h_huge_ok, 1, memory_order_relaxed);
                if (p && !ctx) atomic_fetch_add_explicit(&w_huge, 1, memory_order_relaxed);
            } else {
                p = malloc(n);
            }
        }
        if (!p) {
            if (!ctx) die("storm_api: an allocation failed in a worker\n");
            return 0;
        }
        if (zeroed)
            for (size_t i = 0; i < n; i += (i < 64 || n - i <= 64) ? 1 : 61)
                if (p[i]) die("storm_api: calloc memory not zeroed\n");
        b->p = p;
        b->n = n;
        b->align = align;
        b->tag = (unsigned char)(ctx ? 0x80 | r >> 8 : 0x7f & r >> 8);
        size_t u = malloc_usable_size(p);
        if (u < n) die("storm_api: malloc_usable_size below the size asked\n");
        fill(b);
        check(b);
        return 1;
    }

    check(b);
    switch (r % 8) {
    case 0: case 1: { /* realloc: grow or shrink, sometimes across 4 MiB */
        size_t n;
        unsigned w = rnd(seed) % 32;
        if (w == 0) n = HUGE + 1 + rnd(seed) % (1 << 20);     /* up, above 4 MiB */
        else if (w == 1) n = b->n > 64 ? b->n / 2 : b->n + 1; /* shrink (huge: to huge or not) */
        else if (w == 2 && b->n > HUGE) n = 1 + rnd(seed) % 4096; /* down from huge */
        else if (w < 8) n = b->n + 1 + rnd(seed) % 4096;     /* grow */
        else n = pick_size(seed) + 1;
        if (r % 16 == 1) { /* reallocarray, sometimes overflowing: p untouched */
            if (rnd(seed) % 8 == 0) {
                errno = 0;
                if (reallocarray(b->p, SIZE_MAX / 2, 4)) die("storm_api: reallocarray overflow succeeded\n");
                if (errno != ENOMEM) die("storm_api: reallocarray overflow: not ENOMEM\n");
                check(b);
            }
        }
        unsigned char *q = realloc(b->p, n);
        if (!q) {
            if (!ctx) die("storm_api: realloc failed in a worker\n");
            if (n > HUGE) atomic_fetch_add_explicit(&h_huge_null, 1, memory_order_relaxed);
            check(b); /* the old block is untouched */
            return 0;
        }
        if (n > HUGE && ctx) atomic_fetch_add_explicit(&h_huge_ok, 1, memory_order_relaxed);
        if (n > HUGE && !ctx) atomic_fetch_add_explicit(&w_huge, 1, memory_order_relaxed);
        size_t keep = n < b->n ? n : b->n;
        check_upto(q, b->n, b->tag, keep);
        if ((uintptr_t)q % (n < 16 ? 8 : 16)) die("storm_api: realloc result misaligned\n");
        if (malloc_usable_size(q) < n) die("storm_api: usable size below a realloc's size\n");
        b->p = q;
        b->n = n;
        b->align = 0;
        fill(b);
        check(b);
        return 1;
    }
    case 2:
        if (malloc_usable_size(b->p) < b->n) die("storm_api: malloc_usable_size shrank\n");
        return -1;
    case 3: case 4:
        if (b->align && free_aligned_sized_fn) free_aligned_sized_fn(b->p, b->align, b->n);
        else if (!b->align && free_sized_fn) free_sized_fn(b->p, b->n);
        else free(b->p);
        break;
    default:
        free(b->p);
    }
    b->p = NULL;
    return -1;
}

/* Per-thread handler state: one ring per signal (a handler masks only its
 * own signal, so the two may nest, each on its own ring). */
static __thread struct blk hring[2][HSLOTS];
static __thread unsigned hseed[2];

static void handler(int sig) {
    int saved = errno;
    int k = sig == SIGUSR1 ? 0 : 1;
    atomic_fetch_add_explicit(&sig_handled[k], 1, memory_order_relaxed);
    if (!hseed[k]) hseed[k] = (unsigned)(uintptr_t)&hring[k][0] ^ (unsigned)k;
    for (int round = 0; round < 3; round++) {
        int got = step(&hring[k][rnd(&hseed[k]) % HSLOTS], &hseed[k], 1);
        if (got == 1) atomic_fetch_add_explicit(&h_ok, 1, memory_order_relaxed);
        if (got == 0) atomic_fetch_add_explicit(&h_null, 1, memory_order_relaxed);
    }
    errno = saved;
}

static long ops_per_worker = 25000;

static void *worker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 1;
    struct blk *slots = calloc(SLOTS, sizeof *slots);
    if (!slots) die("storm_api: calloc failed\n");
    sigset_t storm;
    sigemptyset(&storm);
    sigaddset(&storm, SIGUSR1);
    sigaddset(&storm, SIGUSR2);

    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer)) die("storm_api: timer_create failed\n");
    struct itimerspec its = {{0, TIMER_NS}, {0, TIMER_NS}};
    if (timer_settime(timer, 0, &its, NULL)) die("storm_api: timer_settime failed\n");
    pthread_sigmask(SIG_UNBLOCK, &storm, NULL);

    for (long ops = 0; ops < ops_per_worker; ops++) step(&slots[rnd(&seed) % SLOTS], &seed, 0);

    pthread_sigmask(SIG_BLOCK, &storm, NULL);
    timer_delete(timer);
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].p) {
            check(&slots[i]);
            free(slots[i].p);
        }
    free(slots);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < HSLOTS; i++)
            if (hring[k][i].p) {
                check(&hring[k][i]);
                free(hring[k][i].p);
            }
    atomic_fetch_add(&w_ops, ops_per_worker);
    return NULL;
}

static void *killer(void *arg) {
    (void)arg;
    struct timespec ts = {0, 100000};
    while (!atomic_load_explicit(&stop_killer, memory_order_relaxed)) {
        for (int i = 0; i < WORKERS; i++) pthread_kill(workers[i], SIGUSR2);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) ops_per_worker = atol(argv[1]);
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    alarm(WATCHDOG);
    free_sized_fn = (void (*)(void *, size_t))dlsym(RTLD_DEFAULT, "free_sized");
    free_aligned_sized_fn = (void (*)(void *, size_t, size_t))dlsym(RTLD_DEFAULT, "free_aligned_sized");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGUSR2, &sa, NULL)) die("storm_api: sigaction\n");

    sigset_t storm;
    sigemptyset(&storm);
    sigaddset(&storm, SIGUSR1);
    sigaddset(&storm, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &storm, NULL);
    for (long i = 0; i < WORKERS; i++)
        if (pthread_create(&workers[i], NULL, worker, (void *)(i + 1))) die("storm_api: pthread_create\n");
    pthread_t k;
    if (pthread_create(&k, NULL, killer, NULL)) die("storm_api: pthread_create\n");
    for (int i = 0; i < WORKERS; i++) pthread_join(workers[i], NULL);
    atomic_store(&stop_killer, 1);
    pthread_join(k, NULL);

    int stormed = sig_handled[0] > 0 && sig_handled[1] > 0 && h_ok > 0;
    printf("storm_api: %s: %ld worker ops (%ld huge), %ld timer + %ld kill signals, "
           "%ld handler allocations, %ld NULL (%ld huge NULL, %ld huge ok), free_sized %s\n",
           stormed ? "ok" : "FAILED (no storm)", (long)w_ops, (long)w_huge, (long)sig_handled[0],
           (long)sig_handled[1], (long)h_ok, (long)h_null, (long)h_huge_null, (long)h_huge_ok,
           free_sized_fn ? "yes" : "no");
    return stormed ? 0 : 1;
}
