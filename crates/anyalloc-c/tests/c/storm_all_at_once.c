/* Every kind of caller at once, the ones the other storms run apart:
 *
 * - CHURNERS threads malloc, calloc, realloc (across size classes and
 *   4 MiB, both ways), posix_memalign (alignments up to 1 MiB),
 *   aligned_alloc, memalign and free, and trade blocks with every other
 *   thread and handler through a lock-free array of slots;
 * - each runs two per-thread timers (SIGRTMIN, SIGRTMIN + 1) installed with
 *   SA_NODEFER, so a handler also nests in itself (and raises its own
 *   signal now and then, up to 3 deep); handlers do the same calls (and
 *   malloc_trim, now and then), and on a churner or a short-lived thread
 *   one in 300 forks (its child allocates and _exits) and waits for its
 *   child;
 * - a process-wide SIGALRM (setitimer) lands on whichever thread does not
 *   block it: the forkers in their fork (its prepare handler holding the
 *   heap's locks), the trimmer in malloc_trim, a thread being created or
 *   exiting; its handler allocates, reallocs and leaves its block in a slot,
 *   and now and then calls malloc_trim and mallinfo2;
 * - FORKERS threads fork without a pause: the child frees a block of the
 *   forking thread and one of another thread's (from a slot), allocates,
 *   reallocs (huge too), calls malloc_trim and, one time in four, forks a
 *   grandchild that allocates;
 * - a thread starts short-lived threads four at a time (some detached; half
 *   end in pthread_exit), each with its own timer and a key whose
 *   destructor frees and allocates;
 * - a trimmer calls malloc_trim, mallinfo2 and malloc_info without a pause.
 *
 * Every block's usable size is filled (sparsely above 12 KiB) with a byte
 * derived from its address and checked before it is freed and across each
 * realloc. Afterwards every child must have exited 0 within CHILD_WAIT
 * seconds (a child that does not is killed and counted), and the heap's
 * counters must be back (storm_counters_back: no huge block gone, and the
 * bytes in use, objects and huge blocks together, within 64 KiB: glibc
 * keeps each cached thread stack's TLS vector, and one made during a fork
 * is a one-page block mapped beside the heap). glibc loads
 * libgcc_s at the first pthread_exit and keeps what that allocates: it is
 * loaded before the counters are read.
 *
 * Bounded by time: argv[1] milliseconds (default 1500), longer until each
 * kind of work ran once; a watchdog thread turns a hang into a failure
 * after WATCHDOG seconds. Prints
 * "storm_all_at_once: ok ..." and exits 0. */
#define _GNU_SOURCE
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
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "storm_util.h"

#define SLOTS 512
#define CHURNERS 3
#define FORKERS 2
#define OWN 64
#define EDGE 4096
#define WATCHDOG 60
#define CHILD_WAIT 10
#define NAME "storm_all_at_once"

static _Atomic(void *) slots[SLOTS];
static atomic_int stop, handler_forks_on = 1, alarm_off;
static atomic_long handled, nested, handler_ok, handler_null, forks, handler_forks, threads_done,
    trims, handler_trims, bad_children, live_threads, alarms_running;
/* Short-lived threads' key values not yet freed by their destructor: a
 * thread counts out of live_threads before it returns, and its destructor
 * runs after that (a detached one's, under load, whenever it is scheduled
 * again). Its block is huge one time in 33, so the final counters wait for
 * this to be 0, not for a pause: after 100 ms they read "huge blocks
 * 0 -> 1" under a loaded CI run, the destructor's block still live. */
static atomic_long keys_held;
static __thread int depth;
static int sig_a, sig_b;

static uint64_t rnd(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static unsigned char pattern_of(uintptr_t a) { return (unsigned char)((a >> 4) * 31 + 7); }
static unsigned char pattern(void *p) { return pattern_of((uintptr_t)p); }

/* Fills a block's usable size: whole up to 3 * EDGE, else its first and
 * last EDGE bytes and one byte a page in between. Its first word is the
 * size asked for. */
static void fill(void *p, size_t n) {
    size_t u = malloc_usable_size(p);
    if (u < n) die(NAME ": malloc_usable_size below the size asked for\n");
    unsigned char b = pattern(p), *c = p;
    if (u <= 3 * EDGE) {
        memset(c, b, u);
    } else {
        memset(c, b, EDGE);
        memset(c + u - EDGE, b, EDGE);
        for (size_t i = EDGE; i < u - EDGE; i += 4096) c[i] = b;
    }
    if (u >= 8) memcpy(p, &n, sizeof n);
}

static void check(void *p, const char *who) {
    size_t u = malloc_usable_size(p);
    unsigned char b = pattern(p), *c = p;
    size_t start = u >= 8 ? 8 : 0;
    int bad = 0;
    for (size_t i = start; i < u && i < EDGE; i++) bad |= c[i] != b;
    for (size_t i = u > EDGE ? u - EDGE : start; i < u; i++) bad |= c[i] != b;
    if (u > 3 * EDGE)
        for (size_t i = EDGE; i < u - EDGE; i += 4096) bad |= c[i] != b;
    if (bad) {
        ssize_t r = write(2, who, strlen(who));
        (void)r;
        die(": a block's contents changed\n");
    }
}

static size_t pick_size(uint64_t *s, int handler) {
    uint64_t k = rnd(s) % 100;
    if (k < 65) return 1 + rnd(s) % 2048;
    if (k < 85) return 4096 + rnd(s) % 61440;
    if (k < 97) return 65536 + rnd(s) % (1u << 20);
    if (handler && k < 99) return 1 + rnd(s) % 4096;
    return (4u << 20) + rnd(s) % (handler ? (2u << 20) : (8u << 20));
}

static void *alloc_any(uint64_t *s, size_t n) {
    void *p = NULL;
    size_t a;
    switch (rnd(s) % 6) {
    case 0:
        p = calloc(1, n);
        if (p) {
            /* Zeroed: its first and last EDGE bytes (all of it up to 2 * EDGE). */
            unsigned char *c = p, nz = 0;
            for (size_t i = 0; i < n && i < EDGE; i++) nz |= c[i];
            for (size_t i = n > EDGE ? n - EDGE : 0; i < n; i++) nz |= c[i];
            if (nz) die(NAME ": calloc's block is not zeroed\n");
        }
        break;
    case 1:
        a = (size_t)16 << (rnd(s) % 17);
        if (posix_memalign(&p, a, n)) p = NULL;
        if (p && ((uintptr_t)p & (a - 1))) die(NAME ": posix_memalign misaligned\n");
        break;
    case 2:
        a = (size_t)8 << (rnd(s) % 14);
        p = aligned_alloc(a, n);
        if (p && ((uintptr_t)p & (a - 1))) die(NAME ": aligned_alloc misaligned\n");
        break;
    case 3:
        a = (size_t)64 << (rnd(s) % 8);
        p = memalign(a, n);
        if (p && ((uintptr_t)p & (a - 1))) die(NAME ": memalign misaligned\n");
        break;
    default:
        p = malloc(n);
    }
    if (p) fill(p, n);
    return p;
}

/* realloc, checking that the old block's first EDGE bytes and (when it
 * grew) its last EDGE bytes came along. NULL: `p` untouched. */
static void *realloc_checked(void *p, size_t n, const char *who) {
    size_t old, u = malloc_usable_size(p);
    memcpy(&old, p, sizeof old);
    unsigned char b = pattern_of((uintptr_t)p);
    void *q = realloc(p, n);
    if (!q) return NULL;
    size_t keep = u < n ? u : n;
    unsigned char *c = q;
    int bad = 0;
    if (keep >= 8) {
        size_t o;
        memcpy(&o, q, sizeof o);
        bad |= o != old;
        for (size_t i = 8; i < keep && i < EDGE; i++) bad |= c[i] != b;
        if (keep == u)
            for (size_t i = u > EDGE ? u - EDGE : 8; i < u; i++) bad |= c[i] != b;
    }
    if (bad) {
        ssize_t r = write(2, who, strlen(who));
        (void)r;
        die(": realloc lost the block's contents\n");
    }
    fill(q, n);
    return q;
}

static void put(void *p, uint64_t *s, const char *who) {
    void *old = atomic_exchange(&slots[rnd(s) % SLOTS], p);
    if (old) {
        check(old, who);
        free(old);
    }
}

static void *take(uint64_t *s) { return atomic_exchange(&slots[rnd(s) % SLOTS], NULL); }

/* Waits up to CHILD_WAIT seconds for `pid` (polling: also in handlers);
 * kills and counts one that does not exit 0 in time. */
static void reap(pid_t pid) {
    int st;
    for (long ms = 0;; ms++) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                atomic_fetch_add(&bad_children, 1);
                char m[64];
                int k = snprintf(m, sizeof m, NAME ": a child ended with status %#x\n", st);
                ssize_t w = write(2, m, k);
                (void)w;
            }
            return;
        }
        if (r < 0 && errno != EINTR) die(NAME ": waitpid failed\n");
        if (ms > CHILD_WAIT * 1000L) {
            atomic_fetch_add(&bad_children, 1);
            ssize_t w = write(2, NAME ": a child hangs\n", strlen(NAME ": a child hangs\n"));
            (void)w;
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

static _Noreturn void child_work(uint64_t seed, int from_thread, int grandchild) {
    uint64_t s = seed | 1;
    atomic_store(&bad_children, 0);
    for (int i = 0; i < 30; i++) {
        /* A handler's child may have interrupted the allocator: its calls
         * may get NULL; a forking thread's child may not. */
        void *p = alloc_any(&s, pick_size(&s, !from_thread));
        if (!p) {
            if (from_thread) _exit(3);
            continue;
        }
        if (rnd(&s) & 1) {
            void *q = realloc_checked(p, pick_size(&s, !from_thread), "child");
            if (q) p = q;
            else if (from_thread) _exit(4);
        }
        check(p, "child");
        free(p);
    }
    if (from_thread) {
        void *p = take(&s);
        if (p) {
            check(p, "child's slot");
            free(p);
        }
        malloc_trim(0);
        if (grandchild) {
            pid_t g = fork();
            if (g == 0) {
                void *q = malloc(100);
                if (!q) _exit(5);
                free(q);
                _exit(0);
            }
            if (g < 0) _exit(6);
            reap(g);
            if (atomic_load(&bad_children)) _exit(7);
        }
    }
    _exit(0);
}

static void handler(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    int e = errno;
    atomic_fetch_add(&handled, 1);
    int d = ++depth;
    if (d > 1) atomic_fetch_add(&nested, 1);
    uint64_t s = ((uint64_t)(uintptr_t)si->si_value.sival_ptr * 0x9E3779B97F4A7C15ULL) ^
                 (uint64_t)clock() ^ ((uint64_t)d << 40) ^ (uintptr_t)&s;
    s |= 1;
    if (d <= 4) {
        void *mine[4] = {0};
        for (int i = 0; i < 4; i++) {
            mine[i] = alloc_any(&s, pick_size(&s, 1));
            atomic_fetch_add(mine[i] ? &handler_ok : &handler_null, 1);
        }
        for (int i = 0; i < 4; i++)
            if (mine[i] && (rnd(&s) & 1)) {
                void *q = realloc_checked(mine[i], pick_size(&s, 1), "handler");
                if (q) mine[i] = q;
            }
        void *p = take(&s);
        if (p) {
            check(p, "handler's slot");
            if (rnd(&s) & 1) {
                free(p);
            } else {
                void *q = realloc_checked(p, pick_size(&s, 1), "handler's slot");
                put(q ? q : p, &s, "handler");
            }
        }
        for (int i = 0; i < 4; i++) {
            if (!mine[i]) continue;
            if (rnd(&s) % 3 == 0) {
                put(mine[i], &s, "handler");
            } else {
                check(mine[i], "handler");
                free(mine[i]);
            }
        }
        if (rnd(&s) % 512 == 0) {
            atomic_fetch_add(&handler_trims, 1);
            malloc_trim(0);
        }
        if (d < 3 && rnd(&s) % 16 == 0) syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), sig);
        /* Timer A's signals land only on churners and short-lived threads,
         * which never fork themselves (a handler that interrupted its own
         * thread's fork would wait for glibc's fork lock). */
        if (sig == sig_a && d == 1 && atomic_load(&handler_forks_on) && rnd(&s) % 300 == 0) {
            pid_t pid = fork();
            if (pid == 0) child_work(rnd(&s), 0, 0);
            if (pid > 0) {
                atomic_fetch_add(&handler_forks, 1);
                reap(pid);
            }
        }
    }
    depth--;
    errno = e;
}

static void alarm_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig, (void)si, (void)uc;
    int e = errno;
    atomic_fetch_add(&alarms_running, 1);
    if (!atomic_load(&alarm_off)) {
        atomic_fetch_add(&handled, 1);
        uint64_t s = (uint64_t)clock() ^ (uintptr_t)&s;
        s |= 1;
        if (rnd(&s) % 32 == 0) {
            atomic_fetch_add(&handler_trims, 1);
            malloc_trim(0);
            struct mallinfo2 mi = mallinfo2();
            (void)mi;
        }
        void *p = alloc_any(&s, pick_size(&s, 1));
        if (p) {
            atomic_fetch_add(&handler_ok, 1);
            void *q = realloc_checked(p, pick_size(&s, 1), "SIGALRM handler");
            put(q ? q : p, &s, "SIGALRM handler");
        } else {
            atomic_fetch_add(&handler_null, 1);
        }
    }
    atomic_fetch_sub(&alarms_running, 1);
    errno = e;
}

static timer_t start_timer(int sig, long ns, long value) {
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    sev.sigev_value.sival_ptr = (void *)value;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    timer_t t;
    struct itimerspec its = {{0, ns}, {0, ns}};
    if (timer_create(CLOCK_MONOTONIC, &sev, &t) || timer_settime(t, 0, &its, NULL))
        die(NAME ": timer_create or timer_settime failed\n");
    return t;
}

static void *churn(void *arg) {
    long id = (long)arg;
    timer_t ta = start_timer(sig_a, 297000 + id * 13000, id * 2 + 1);
    timer_t tb = start_timer(sig_b, 451000 + id * 7000, id * 2 + 2);
    uint64_t s = 0x12345 + id * 7919;
    void *own[OWN] = {0};
    while (!atomic_load(&stop)) {
        int i = rnd(&s) % OWN;
        void *p, *q;
        switch (rnd(&s) % 8) {
        case 0:
        case 1:
        case 2:
            if (own[i]) {
                check(own[i], "churner");
                free(own[i]);
            }
            own[i] = alloc_any(&s, pick_size(&s, 0));
            if (!own[i]) die(NAME ": a thread's allocation failed\n");
            break;
        case 3:
        case 4:
            if (own[i]) {
                q = realloc_checked(own[i], pick_size(&s, 0), "churner");
                if (!q) die(NAME ": a thread's realloc failed\n");
                own[i] = q;
            }
            break;
        case 5:
            p = alloc_any(&s, pick_size(&s, 0));
            if (!p) die(NAME ": a thread's allocation failed\n");
            put(p, &s, "churner");
            break;
        case 6:
            if ((p = take(&s))) {
                check(p, "churner's slot");
                free(p);
            }
            break;
        default:
            if ((p = take(&s))) {
                q = realloc_checked(p, pick_size(&s, 0), "churner's slot");
                if (!q) die(NAME ": a thread's realloc failed\n");
                put(q, &s, "churner");
            }
        }
    }
    timer_delete(ta);
    timer_delete(tb);
    for (int i = 0; i < OWN; i++)
        if (own[i]) {
            check(own[i], "churner");
            free(own[i]);
        }
    return NULL;
}

static void *forker(void *arg) {
    long id = (long)arg;
    /* Timer B only: its handler never forks. */
    timer_t tb = start_timer(sig_b, 211000, 100 + id);
    uint64_t s = 777 + id;
    while (!atomic_load(&stop)) {
        void *keep = alloc_any(&s, pick_size(&s, 0));
        if (!keep) die(NAME ": a forker's allocation failed\n");
        pid_t pid = fork();
        if (pid == 0) {
            check(keep, "child");
            free(keep);
            child_work(rnd(&s), 1, rnd(&s) % 4 == 0);
        }
        if (pid < 0) die(NAME ": fork failed\n");
        atomic_fetch_add(&forks, 1);
        reap(pid);
        check(keep, "forker");
        free(keep);
    }
    timer_delete(tb);
    return NULL;
}

static pthread_key_t key;

static void key_destructor(void *p) {
    check(p, "key destructor");
    free(p);
    free(malloc(100));
    atomic_fetch_sub(&keys_held, 1);
}

static void *short_lived(void *arg) {
    long n = (long)arg;
    timer_t t = start_timer(sig_a, 1000000 + (n % 5) * 100000, 1000 + n);
    uint64_t s = n * 31 + 1;
    void *k = alloc_any(&s, pick_size(&s, 0));
    if (!k) die(NAME ": a thread's allocation failed\n");
    atomic_fetch_add(&keys_held, 1);
    pthread_setspecific(key, k);
    for (int i = 0; i < 40; i++) {
        void *p = alloc_any(&s, 16 + rnd(&s) % 3000);
        if (!p) die(NAME ": a thread's allocation failed\n");
        put(p, &s, "short-lived thread");
        if ((p = take(&s))) {
            check(p, "short-lived thread's slot");
            free(p);
        }
    }
    timer_delete(t);
    atomic_fetch_add(&threads_done, 1);
    atomic_fetch_sub(&live_threads, 1);
    if (n & 1) pthread_exit(NULL);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    long n = 0;
    while (!atomic_load(&stop)) {
        pthread_t t[4];
        int joinable[4];
        for (int i = 0; i < 4; i++) {
            pthread_attr_t at;
            pthread_attr_init(&at);
            joinable[i] = n % 3 != 0;
            if (!joinable[i]) pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            atomic_fetch_add(&live_threads, 1);
            if (pthread_create(&t[i], &at, short_lived, (void *)n++)) die(NAME ": pthread_create failed\n");
            pthread_attr_destroy(&at);
        }
        for (int i = 0; i < 4; i++)
            if (joinable[i]) pthread_join(t[i], NULL);
    }
    return NULL;
}

static void *trimmer(void *arg) {
    (void)arg;
    FILE *devnull = fopen("/dev/null", "w");
    if (!devnull) die(NAME ": cannot open /dev/null\n");
    for (long k = 0; !atomic_load(&stop); k++) {
        switch (k % 3) {
        case 0:
            malloc_trim(0);
            break;
        case 1: {
            struct mallinfo2 mi = mallinfo2();
            (void)mi;
            break;
        }
        default:
            malloc_info(0, devnull);
        }
        atomic_fetch_add(&trims, 1);
        usleep(300);
    }
    fclose(devnull);
    return NULL;
}

static void *watchdog(void *arg) {
    sleep((unsigned)(long)arg);
    die(NAME ": watchdog: hung\n");
    return NULL;
}

static void *exits(void *arg) { pthread_exit(arg); }

static void install(int sig, void (*h)(int, siginfo_t *, void *), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | flags;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL)) die(NAME ": sigaction failed\n");
}

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 1500;
    sig_a = SIGRTMIN;
    sig_b = SIGRTMIN + 1;
    if (pthread_key_create(&key, key_destructor)) die(NAME ": pthread_key_create failed\n");
    sigset_t alrm;
    sigemptyset(&alrm);
    sigaddset(&alrm, SIGALRM);
    /* The watchdog and the main thread never take SIGALRM. */
    pthread_sigmask(SIG_BLOCK, &alrm, NULL);
    pthread_t w;
    pthread_create(&w, NULL, watchdog, (void *)(long)(ms / 1000 + WATCHDOG));
    pthread_detach(w);
    install(sig_a, handler, SA_NODEFER);
    install(sig_b, handler, SA_NODEFER);
    install(SIGALRM, alarm_handler, 0);

    pthread_t first;
    pthread_create(&first, NULL, exits, NULL);
    pthread_join(first, NULL);
    malloc_trim(0);
    struct mallinfo2 before = mallinfo2();

    /* Threads started with SIGALRM unblocked: it lands on any of them. */
    pthread_sigmask(SIG_UNBLOCK, &alrm, NULL);
    pthread_t th[CHURNERS + FORKERS + 2];
    int n = 0;
    for (long i = 0; i < CHURNERS; i++) pthread_create(&th[n++], NULL, churn, (void *)i);
    for (long i = 0; i < FORKERS; i++) pthread_create(&th[n++], NULL, forker, (void *)i);
    pthread_create(&th[n++], NULL, spawner, NULL);
    pthread_create(&th[n++], NULL, trimmer, NULL);
    pthread_sigmask(SIG_BLOCK, &alrm, NULL);
    struct itimerval on = {{0, 700}, {0, 700}}, off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &on, NULL);
    usleep(ms * 1000);
    /* The storm lasts at least `ms`, and until every kind of work has run
     * at least once: on a loaded machine a thread may not have been
     * scheduled yet (the trimmer counted 0 trims in 3 of 36 one-second
     * storms), which says nothing about the heap. One that never runs is
     * a hang, which the watchdog reports. */
    while (!(atomic_load(&handled) && atomic_load(&nested) && atomic_load(&forks) &&
             atomic_load(&threads_done) && atomic_load(&trims)))
        usleep(10000);
    atomic_store(&handler_forks_on, 0);
    atomic_store(&stop, 1);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    while (atomic_load(&live_threads)) usleep(1000);
    /* Every key destructor has freed its block (see keys_held; a hang here
     * is the watchdog's). */
    while (atomic_load(&keys_held)) usleep(1000);
    setitimer(ITIMER_REAL, &off, NULL);
    /* A SIGALRM sent before the timer stopped may still land on a detached
     * thread on its way out: from now on its handler leaves nothing
     * behind; wait for one already running, and for the detached threads
     * to be gone (their key destructors run after they counted out). */
    atomic_store(&alarm_off, 1);
    while (atomic_load(&alarms_running)) usleep(1000);
    usleep(100000);
    for (int i = 0; i < SLOTS; i++) {
        void *p = atomic_exchange(&slots[i], NULL);
        if (p) {
            check(p, "final");
            free(p);
        }
    }
    malloc_trim(0);
    struct mallinfo2 after = mallinfo2();
    int ok = !bad_children && storm_counters_back(&before, &after) &&
             handled && nested && forks && threads_done && trims;
    printf(NAME ": %s: %ld signals (%ld nested), handler allocations %ld ok / %ld NULL, %ld handler trims, "
           "%ld forks + %ld from handlers, %ld bad children, %ld short-lived threads, %ld trims; "
           "huge blocks %zu -> %zu (%zu -> %zu bytes), bytes in use %zu -> %zu\n",
           ok ? "ok" : "FAILED", handled, nested, handler_ok, handler_null, handler_trims, forks, handler_forks,
           bad_children, threads_done, trims, before.hblks, after.hblks, before.hblkhd, after.hblkhd, before.uordblks, after.uordblks);
    return ok ? 0 : 1;
}
