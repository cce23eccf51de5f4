/* Thread churn under a signal storm: the main thread creates THREADS
 * short-lived threads (joinable ones that return or pthread_exit from a
 * nested call, detached ones), at most LIVE at a time, while a killer thread
 * sends SIGUSR1 to the process (it lands on whichever thread does not block
 * it: one starting, one running, one exiting, the main thread inside
 * pthread_create) and SIGUSR2 to the most recently started threads by tid.
 * Each thread allocates, hands blocks to a shared pool (freed later by other
 * threads, after their allocator exited), and leaves behind a pthread key
 * value and a thread_local-style destructor (__cxa_thread_atexit_impl) whose
 * destructors free (and allocate once more) while the thread exits. The
 * handlers swap blocks in and out of a shared pool too: they free blocks
 * other threads allocated and allocate blocks other threads free.
 *
 * Every block describes itself (size and tag in a header) and carries a
 * pattern, checked before it is freed. Bounded by counts; alarm(WATCHDOG)
 * turns a hang into a failure. Usage: storm_threads [THREADS].
 * Prints "storm_threads: ok ..." and exits 0. */
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

#define LIVE 12
#define POOL 512
#define HPOOL 256
#define TIDS 16
#define WATCHDOG 30

extern void *__dso_handle;
extern int __cxa_thread_atexit_impl(void (*)(void *), void *, void *);

struct hdr {
    size_t n;
    unsigned tag;
    unsigned magic;
};
#define MAGIC 0x5ca1ab1eu

static _Atomic(struct hdr *) pool[POOL];   /* threads' blocks, freed by others */
static _Atomic(struct hdr *) hpool[HPOOL]; /* handlers' blocks */
static atomic_int live, stop_killer;
static atomic_long sig_handled[2], h_ok, h_null, created, key_dtors, tls_dtors, foreign_frees;
static atomic_int tids[TIDS];
static atomic_uint tid_next;
static pthread_key_t key;

static void watchdog(int sig) {
    (void)sig;
    die("storm_threads: watchdog: hung\n");
}

static inline unsigned rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static struct hdr *make(size_t n, unsigned tag, int may_fail) {
    if (n < sizeof(struct hdr)) n = sizeof(struct hdr);
    struct hdr *h = malloc(n);
    if (!h) {
        if (may_fail) return NULL;
        die("storm_threads: malloc failed outside a handler\n");
    }
    h->n = n;
    h->tag = tag & 0xff;
    h->magic = MAGIC;
    memset(h + 1, (int)h->tag, n - sizeof *h);
    return h;
}

static void check(const struct hdr *h) {
    if (h->magic != MAGIC) die("storm_threads: a block's header was overwritten\n");
    const unsigned char *p = (const unsigned char *)(h + 1);
    for (size_t i = 0; i < h->n - sizeof *h; i++)
        if (p[i] != h->tag) die("storm_threads: pattern violated: a block was overwritten\n");
}

static void drop(struct hdr *h) {
    if (!h) return;
    check(h);
    h->magic = 0;
    free(h);
}

static size_t pick_size(unsigned *s) {
    unsigned r = rnd(s);
    if (r % 32 == 0) return 4096 + r % 60000;
    return 16 + r % 1000;
}

static void handler(int sig) {
    int saved = errno;
    int k = sig == SIGUSR1 ? 0 : 1;
    atomic_fetch_add_explicit(&sig_handled[k], 1, memory_order_relaxed);
    unsigned seed = (unsigned)(uintptr_t)&seed ^ (unsigned)syscall(SYS_gettid) ^
                    (unsigned)atomic_load_explicit(&sig_handled[k], memory_order_relaxed) * 2654435761u;
    for (int round = 0; round < 2; round++) {
        /* A block some thread (maybe exited) allocated, out of the pool. */
        drop(atomic_exchange(&pool[rnd(&seed) % POOL], NULL));
        struct hdr *h = make(pick_size(&seed), 0x80 | rnd(&seed), 1);
        if (!h) {
            atomic_fetch_add_explicit(&h_null, 1, memory_order_relaxed);
            continue;
        }
        atomic_fetch_add_explicit(&h_ok, 1, memory_order_relaxed);
        drop(atomic_exchange(&hpool[rnd(&seed) % HPOOL], h));
    }
    errno = saved;
}

static void key_dtor(void *v) {
    struct hdr *h = v;
    atomic_fetch_add_explicit(&key_dtors, 1, memory_order_relaxed);
    int again = h->tag == 1;
    drop(h);
    if (again) /* allocate while exiting: the next destructor round frees it */
        pthread_setspecific(key, make(100, 2, 0));
}

static void tls_dtor(void *v) {
    atomic_fetch_add_explicit(&tls_dtors, 1, memory_order_relaxed);
    drop(v);
    struct hdr *h = make(300, 3, 0);
    drop(atomic_exchange(&pool[(uintptr_t)h / 64 % POOL], h));
}

static __attribute__((noinline)) void nested_exit(struct hdr **keep, int n) {
    for (int i = 0; i < n; i++) drop(keep[i]);
    pthread_exit(NULL);
}

static void *thread_main(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 17;
    int tid = (int)syscall(SYS_gettid);
    atomic_store(&tids[atomic_fetch_add(&tid_next, 1) % TIDS], tid);
    pthread_setspecific(key, make(64, rnd(&seed) % 2, 0));
    __cxa_thread_atexit_impl(tls_dtor, make(200, 4, 0), &__dso_handle);
    struct hdr *keep[32];
    int n = 0;
    for (int i = 0; i < 96; i++) {
        struct hdr *h = make(pick_size(&seed), rnd(&seed) & 0x7f, 0);
        if (rnd(&seed) % 3 == 0) {
            struct hdr *old = atomic_exchange(&pool[rnd(&seed) % POOL], h);
            if (old) atomic_fetch_add_explicit(&foreign_frees, 1, memory_order_relaxed);
            drop(old);
        } else if (n < 32) {
            keep[n++] = h;
        } else {
            drop(h);
        }
    }
    atomic_fetch_sub(&live, 1);
    if ((uintptr_t)arg % 3 == 0) nested_exit(keep, n);
    for (int i = 0; i < n; i++) drop(keep[i]);
    return NULL;
}

static void *killer(void *arg) {
    (void)arg;
    struct timespec ts = {0, 20000};
    pid_t pid = getpid();
    unsigned i = 0;
    while (!atomic_load_explicit(&stop_killer, memory_order_relaxed)) {
        kill(pid, SIGUSR1);
        int t = atomic_load(&tids[i++ % TIDS]);
        if (t) syscall(SYS_tgkill, pid, t, SIGUSR2); /* ESRCH when gone: fine */
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    long threads = argc > 1 ? atol(argv[1]) : 6000;
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    alarm(WATCHDOG);
    if (pthread_key_create(&key, key_dtor)) die("storm_threads: pthread_key_create\n");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGUSR2, &sa, NULL)) die("storm_threads: sigaction\n");

    /* The killer blocks both signals; everybody else takes them. */
    sigset_t storm, old;
    sigemptyset(&storm);
    sigaddset(&storm, SIGUSR1);
    sigaddset(&storm, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &storm, &old);
    pthread_t k;
    if (pthread_create(&k, NULL, killer, NULL)) die("storm_threads: pthread_create\n");
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    pthread_t joinable[LIVE];
    int nj = 0;
    for (long i = 1; i <= threads; i++) {
        while (atomic_load(&live) >= LIVE) sched_yield();
        atomic_fetch_add(&live, 1);
        int det = i % 2 == 0;
        pthread_t t;
        int e;
        while ((e = pthread_create(&t, det ? &detached : NULL, thread_main, (void *)i)) == EAGAIN)
            sched_yield();
        if (e) die("storm_threads: pthread_create failed\n");
        atomic_fetch_add(&created, 1);
        if (!det) {
            joinable[nj++] = t;
            if (nj == LIVE / 2) {
                for (int j = 0; j < nj; j++) pthread_join(joinable[j], NULL);
                nj = 0;
            }
        }
    }
    for (int j = 0; j < nj; j++) pthread_join(joinable[j], NULL);
    /* Detached threads still exiting: `live` drops before their exit path,
     * so let them finish under the storm before stopping it. */
    while (atomic_load(&live) > 0) sched_yield();
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL);
    atomic_store(&stop_killer, 1);
    pthread_join(k, NULL);

    pthread_sigmask(SIG_BLOCK, &storm, NULL);
    long left = 0;
    for (int i = 0; i < POOL; i++) {
        struct hdr *h = atomic_exchange(&pool[i], NULL);
        left += h != NULL;
        drop(h);
    }
    for (int i = 0; i < HPOOL; i++) drop(atomic_exchange(&hpool[i], NULL));

    int stormed = sig_handled[0] > 0 && sig_handled[1] > 0 && h_ok > 0 && key_dtors > 0 && tls_dtors > 0;
    printf("storm_threads: %s: %ld threads, %ld process + %ld thread signals handled, "
           "%ld handler allocations (%ld NULL), %ld key + %ld thread_local destructors, "
           "%ld blocks freed by another thread than their allocator's, %ld left in the pool\n",
           stormed ? "ok" : "FAILED (no storm)", (long)created, (long)sig_handled[0],
           (long)sig_handled[1], (long)h_ok, (long)h_null, (long)key_dtors, (long)tls_dtors,
           (long)foreign_frees, left);
    return stormed ? 0 : 1;
}
