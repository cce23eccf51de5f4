/* A signal storm: worker threads churn on malloc/realloc/free while two
 * different signals interrupt them, and the handlers call malloc, calloc and
 * free themselves. SIGUSR1 comes from a per-thread POSIX timer
 * (SIGEV_THREAD_ID), SIGUSR2 from a killer thread's pthread_kill. Each
 * handler masks only its own signal (no SA_NODEFER), so either can interrupt
 * the other: nesting is bounded at two. Meanwhile the main thread churns
 * short-lived threads. Every block is filled with a pattern that is checked
 * when it is freed.
 *
 * Standard C and POSIX only, so the same binary runs under glibc's malloc
 * (where a handler that interrupted malloc calls malloc: expect a deadlock or
 * heap corruption) and under LD_PRELOAD=libanyalloc.so (where it must finish
 * clean). Usage: storm SECONDS. Prints "storm: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
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

#define WORKERS 4
#define SLOTS 256
#define HSLOTS 8
#define TIMER_NS 250000 /* 4 kHz per worker */

struct blk {
    unsigned char *p;
    size_t n;
    unsigned char tag;
};

static atomic_int stop_workers, stop_killer;
static atomic_long sig_handled[2], h_ok, h_fail, w_ops, short_threads;
static pthread_t workers[WORKERS];

static inline unsigned rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static void fill(struct blk *b) { memset(b->p, b->tag, b->n); }

/* Checks the head, the tail and a stride of the block. */
static void check(const struct blk *b) {
    size_t step = b->n > 4096 ? b->n / 64 : 1;
    for (size_t i = 0; i < b->n; i += (i < 64 || b->n - i <= 64) ? 1 : step)
        if (b->p[i] != b->tag) die("storm: pattern violated: a block was overwritten\n");
}

static size_t pick_size(unsigned *s, int in_handler) {
    unsigned r = rnd(s);
    if (r % 64 == 0) return in_handler ? 16384 + r % 16384 : 65536 + r % (1 << 20);
    if (r % 8 == 0) return 1024 + r % 7168;
    return 1 + r % 512;
}

/* Per-thread handler state (static TLS of the executable: plain memory). */
static __thread struct blk hring[2][HSLOTS];
static __thread unsigned hseed[2];

static void handler(int sig) {
    int saved = errno;
    int k = sig == SIGUSR1 ? 0 : 1;
    atomic_fetch_add_explicit(&sig_handled[k], 1, memory_order_relaxed);
    if (!hseed[k]) hseed[k] = (unsigned)(uintptr_t)&hring[k][0] ^ (unsigned)k;
    for (int round = 0; round < 2; round++) {
        struct blk *b = &hring[k][rnd(&hseed[k]) % HSLOTS];
        if (b->p) {
            check(b);
            free(b->p);
            b->p = NULL;
        }
        size_t n = pick_size(&hseed[k], 1);
        unsigned char *p = k == 0 ? malloc(n) : calloc(1, n);
        if (!p) {
            /* The nolock path may say "not now": allowed, counted. */
            atomic_fetch_add_explicit(&h_fail, 1, memory_order_relaxed);
            continue;
        }
        if (k == 1 && (p[0] || p[n - 1] || p[n / 2])) die("storm: calloc memory not zeroed\n");
        b->p = p;
        b->n = n;
        b->tag = (unsigned char)(0x80 | rnd(&hseed[k]));
        fill(b);
        atomic_fetch_add_explicit(&h_ok, 1, memory_order_relaxed);
    }
    errno = saved;
}

static void *worker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 1;
    struct blk *slots = calloc(SLOTS, sizeof *slots);
    if (!slots) die("storm: calloc failed\n");
    sigset_t storm;
    sigemptyset(&storm);
    sigaddset(&storm, SIGUSR1);
    sigaddset(&storm, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &storm, NULL);

    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer)) die("storm: timer_create failed\n");
    struct itimerspec its = {{0, TIMER_NS}, {0, TIMER_NS}};
    if (timer_settime(timer, 0, &its, NULL)) die("storm: timer_settime failed\n");

    long ops = 0;
    while (!atomic_load_explicit(&stop_workers, memory_order_relaxed)) {
        struct blk *b = &slots[rnd(&seed) % SLOTS];
        if (b->p) {
            check(b);
            if (rnd(&seed) % 8 == 0) {
                size_t n = pick_size(&seed, 0);
                unsigned char *q = realloc(b->p, n);
                if (!q) die("storm: realloc failed in a worker\n");
                b->p = q;
                size_t keep = n < b->n ? n : b->n;
                for (size_t i = 0; i < keep; i += 97)
                    if (q[i] != b->tag) die("storm: realloc lost the contents\n");
                b->n = n;
                fill(b);
            } else {
                free(b->p);
                b->p = NULL;
            }
        } else {
            b->n = pick_size(&seed, 0);
            b->p = malloc(b->n);
            if (!b->p) die("storm: malloc failed in a worker\n");
            b->tag = (unsigned char)rnd(&seed);
            fill(b);
        }
        ops++;
    }

    /* Quiesce: no more signals on this thread, then clean up. */
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
    atomic_fetch_add(&w_ops, ops);
    return NULL;
}

static void *killer(void *arg) {
    (void)arg;
    struct timespec ts = {0, 50000};
    while (!atomic_load_explicit(&stop_killer, memory_order_relaxed)) {
        for (int i = 0; i < WORKERS; i++) pthread_kill(workers[i], SIGUSR2);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *short_lived(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *keep[64];
    for (int i = 0; i < 64; i++) {
        keep[i] = malloc(pick_size(&seed, 0));
        if (!keep[i]) die("storm: malloc failed in a short-lived thread\n");
    }
    for (int i = 0; i < 64; i++) free(keep[i]);
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 2.0;
    setvbuf(stdout, NULL, _IONBF, 0);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask); /* each masks only itself while it runs */
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGUSR2, &sa, NULL)) die("storm: sigaction\n");

    sigset_t storm;
    sigemptyset(&storm);
    sigaddset(&storm, SIGUSR1);
    sigaddset(&storm, SIGUSR2);
    /* Main, the killer and the short-lived threads never take the signals
     * (they inherit this mask); the workers unblock them for themselves. */
    pthread_sigmask(SIG_BLOCK, &storm, NULL);
    for (long i = 0; i < WORKERS; i++) {
        if (pthread_create(&workers[i], NULL, worker, (void *)(i + 1))) die("storm: pthread_create\n");
    }
    pthread_t k;
    if (pthread_create(&k, NULL, killer, NULL)) die("storm: pthread_create\n");

    double end = now() + seconds;
    long n = 0;
    while (now() < end) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, (void *)(n + 1)) == 0) {
            pthread_join(t, NULL);
            n++;
        }
    }
    atomic_store(&stop_killer, 1);
    pthread_join(k, NULL);
    atomic_store(&stop_workers, 1);
    for (int i = 0; i < WORKERS; i++) pthread_join(workers[i], NULL);
    short_threads = n;

    /* A storm without signals proves nothing: each kind must have arrived,
     * and handlers must have allocated. */
    int stormed = sig_handled[0] > 0 && sig_handled[1] > 0 && h_ok > 0 && w_ops > 0;
    printf("storm: %s: %ld worker ops, %ld timer + %ld kill signals handled, "
           "%ld handler allocations (%ld got NULL), %ld short-lived threads\n",
           stormed ? "ok" : "FAILED (no storm)", (long)w_ops, (long)sig_handled[0],
           (long)sig_handled[1], (long)h_ok, (long)h_fail, (long)short_threads);
    return stormed ? 0 : 1;
}
