/* Signals during fork, from several threads at once. FORKERS threads each
 * make ITERS rounds of fork() (the child allocates, checks, frees and
 * _exits), posix_spawn of `true` and, now and then, system(), while a
 * per-thread timer interrupts them with a handler that allocates and frees
 * and, now and then, forks itself (its child allocates and frees too; the
 * handler waits for it) or runs posix_spawn and system. CHURNERS threads
 * keep the heap's locks busy, and the main thread (the signal blocked
 * there: see main) loops on calls that allocate inside libc: getaddrinfo,
 * strdup, qsort, printf to an open_memstream.
 *
 * Every child must exit 0; every block's pattern is checked before it is
 * freed. A handler forks or spawns only when it did not interrupt its
 * thread's own fork, posix_spawn or system (glibc's fork holds its
 * atfork_lock, a plain lock, for the whole fork: a fork from a handler that
 * interrupted one on the same thread waits for itself in
 * __run_prefork_handlers, whatever the allocator; argv[2] == "nested" lets
 * handlers do it). Bounded by counts; alarm(WATCHDOG) turns a hang into a
 * failure, in the parent and in every child.
 * Usage: storm_fork [ITERS [nested|nosystem]].
 * Prints "storm_fork: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
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

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define FORKERS 3
#define CHURNERS 2
#define HSLOTS 8
#define SLOTS 64
#define TIMER_NS 150000
#define WATCHDOG 30
#define CHILD_WATCHDOG 15

extern char **environ;

struct blk {
    unsigned char *p;
    size_t n;
    unsigned char tag;
};

static atomic_int stop;
static atomic_long sig_handled, h_ok, h_null, h_forks, h_spawns, forks, spawns, systems, libc_rounds, gai_ok;

static void watchdog(int sig) {
    (void)sig;
    die(getpid() == syscall(SYS_gettid) ? "storm_fork: watchdog: hung (main thread or a child)\n"
                                        : "storm_fork: watchdog: hung\n");
}

static inline unsigned rnd(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static void fill(struct blk *b) { memset(b->p, b->tag, b->n); }

static void check(const struct blk *b) {
    for (size_t i = 0; i < b->n; i++)
        if (b->p[i] != b->tag) die("storm_fork: pattern violated: a block was overwritten\n");
}

static size_t pick_size(unsigned *s) {
    unsigned r = rnd(s);
    if (r % 97 == 0) return ((size_t)5 << 20) + r % 65536; /* huge: mmap */
    if (r % 32 == 0) return 8192 + r % 300000;
    return 1 + r % 2000;
}

/* A child's work: allocate, check, free, in the copy of the heap it got;
 * then _exit(0). Any failure aborts (the parent sees it). The child of a
 * handler's fork runs on in that handler: if the handler interrupted the
 * allocator, its calls take the nolock path, which may say "not now" (NULL)
 * and serves nothing above 4 MiB, so there NULL is allowed (a failed
 * realloc's block must be intact). */
static void child_work(unsigned seed, int in_handler) {
    alarm(CHILD_WATCHDOG);
    struct blk b[32];
    for (int i = 0; i < 32; i++) {
        b[i].n = pick_size(&seed);
        b[i].p = i % 2 ? malloc(b[i].n) : calloc(1, b[i].n);
        if (!b[i].p && !in_handler) die("storm_fork: allocation failed in a child\n");
        b[i].tag = (unsigned char)i;
        if (b[i].p) fill(&b[i]);
    }
    for (int i = 0; i < 32; i += 2) {
        if (!b[i].p) continue;
        check(&b[i]);
        unsigned char *q = realloc(b[i].p, b[i].n * 2);
        if (!q && !in_handler) die("storm_fork: realloc failed in a child\n");
        if (q) {
            b[i].p = q;
            check(&b[i]);
        }
    }
    for (int i = 0; i < 32; i++)
        if (b[i].p) {
            check(&b[i]);
            free(b[i].p);
        }
    _exit(0);
}

static void reap(pid_t pid, const char *what) {
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) die("storm_fork: waitpid failed\n");
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) die(what);
}

static __thread struct blk hring[HSLOTS];
static __thread unsigned hseed;
static __thread volatile int in_fork; /* this thread is inside fork & co. */
static int system_in_handlers = 1; /* after each handler's posix_spawn; argv[2] == "nosystem": not */
static int nested_forks; /* argv[2] == "nested": handlers fork inside forks too (glibc deadlocks) */

static void handler(int sig) {
    (void)sig;
    int saved = errno;
    atomic_fetch_add_explicit(&sig_handled, 1, memory_order_relaxed);
    if (!hseed) hseed = (unsigned)(uintptr_t)&hring[0] | 1;
    for (int round = 0; round < 2; round++) {
        struct blk *b = &hring[rnd(&hseed) % HSLOTS];
        if (b->p) {
            check(b);
            free(b->p);
            b->p = NULL;
        }
        size_t n = pick_size(&hseed);
        unsigned char *p = malloc(n);
        if (!p) {
            atomic_fetch_add_explicit(&h_null, 1, memory_order_relaxed);
            continue;
        }
        b->p = p;
        b->n = n;
        b->tag = (unsigned char)(0x80 | rnd(&hseed));
        fill(b);
        atomic_fetch_add_explicit(&h_ok, 1, memory_order_relaxed);
    }
    if ((!in_fork || nested_forks) && rnd(&hseed) % 48 == 0 && !atomic_load_explicit(&stop, memory_order_relaxed)) {
        in_fork = 1;
        pid_t pid = fork();
        if (pid == 0) child_work(hseed, 1);
        if (pid < 0) die("storm_fork: fork failed in a handler\n");
        reap(pid, "storm_fork: the child of a handler's fork failed\n");
        atomic_fetch_add_explicit(&h_forks, 1, memory_order_relaxed);
        in_fork = 0;
    } else if (!in_fork && rnd(&hseed) % 48 == 0 && !atomic_load_explicit(&stop, memory_order_relaxed)) {
        in_fork = 1;
        pid_t pid;
        char *argv[] = {"true", NULL};
        if (posix_spawnp(&pid, "true", NULL, NULL, argv, environ)) die("storm_fork: posix_spawn failed in a handler\n");
        reap(pid, "storm_fork: a handler's spawned true failed\n");
        atomic_fetch_add_explicit(&h_spawns, 1, memory_order_relaxed);
        if (system_in_handlers && system("exit 0") != 0) die("storm_fork: system failed in a handler\n");
        in_fork = 0;
    }
    errno = saved;
}

static timer_t start_timer(void) {
    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer)) die("storm_fork: timer_create failed\n");
    struct itimerspec its = {{0, TIMER_NS}, {0, TIMER_NS}};
    if (timer_settime(timer, 0, &its, NULL)) die("storm_fork: timer_settime failed\n");
    return timer;
}

static void unblock(int how) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(how, &s, NULL);
}

static void free_ring(void) {
    for (int i = 0; i < HSLOTS; i++)
        if (hring[i].p) {
            check(&hring[i]);
            free(hring[i].p);
            hring[i].p = NULL;
        }
}

static long iters = 80;

static void *forker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 5;
    timer_t timer = start_timer();
    unblock(SIG_UNBLOCK);
    struct blk mine[8] = {0};
    for (long i = 0; i < iters; i++) {
        struct blk *b = &mine[rnd(&seed) % 8];
        if (b->p) {
            check(b);
            free(b->p);
        }
        b->n = pick_size(&seed);
        b->p = malloc(b->n);
        if (!b->p) die("storm_fork: malloc failed in a forker\n");
        b->tag = (unsigned char)rnd(&seed) & 0x7f;
        fill(b);

        unsigned what = rnd(&seed) % 16;
        in_fork = 1;
        if (what < 11) {
            pid_t pid = fork();
            if (pid == 0) {
                in_fork = 0;
                for (int j = 0; j < 8; j++) /* the parent's blocks survived */
                    if (mine[j].p) check(&mine[j]);
                child_work(seed, 0);
            }
            if (pid < 0) die("storm_fork: fork failed\n");
            in_fork = 0;
            reap(pid, "storm_fork: a forked child failed\n");
            atomic_fetch_add(&forks, 1);
        } else if (what < 15) {
            pid_t pid;
            char *argv[] = {"true", NULL};
            int e = posix_spawnp(&pid, "true", NULL, NULL, argv, environ);
            in_fork = 0;
            if (e) die("storm_fork: posix_spawn failed\n");
            reap(pid, "storm_fork: a spawned true failed\n");
            atomic_fetch_add(&spawns, 1);
        } else {
            int st = system("exit 0");
            in_fork = 0;
            if (st != 0) die("storm_fork: system failed\n");
            atomic_fetch_add(&systems, 1);
        }
    }
    unblock(SIG_BLOCK);
    timer_delete(timer);
    for (int j = 0; j < 8; j++)
        if (mine[j].p) {
            check(&mine[j]);
            free(mine[j].p);
        }
    free_ring();
    return NULL;
}

static void *churner(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 31u + 7;
    struct blk s[SLOTS] = {0};
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        struct blk *b = &s[rnd(&seed) % SLOTS];
        if (b->p) {
            check(b);
            free(b->p);
            b->p = NULL;
        } else {
            b->n = pick_size(&seed);
            b->p = malloc(b->n);
            if (!b->p) die("storm_fork: malloc failed in a churner\n");
            b->tag = (unsigned char)rnd(&seed);
            fill(b);
        }
    }
    for (int i = 0; i < SLOTS; i++)
        if (s[i].p) {
            check(&s[i]);
            free(s[i].p);
        }
    return NULL;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Calls that allocate inside libc. */
static void libc_round(unsigned *seed) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo("localhost", "80", &hints, &res) == 0) {
        atomic_fetch_add(&gai_ok, 1);
        freeaddrinfo(res);
    }
    enum { N = 600 };
    char *strs[N];
    char buf[32];
    for (int i = 0; i < N; i++) {
        snprintf(buf, sizeof buf, "s%08u", rnd(seed));
        strs[i] = strdup(buf);
        if (!strs[i]) die("storm_fork: strdup failed\n");
    }
    qsort(strs, N, sizeof *strs, cmp_str); /* large enough to malloc its buffer */
    for (int i = 1; i < N; i++)
        if (strcmp(strs[i - 1], strs[i]) > 0) die("storm_fork: qsort misordered\n");
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("storm_fork: open_memstream failed\n");
    for (int i = 0; i < N; i++) fprintf(f, "%d:%s %g\n", i, strs[i], i / 7.0);
    if (fclose(f)) die("storm_fork: fclose of a memstream failed\n");
    if (len < (size_t)N * 10 || strncmp(text, "0:", 2)) die("storm_fork: memstream lost output\n");
    free(text);
    for (int i = 0; i < N; i++) free(strs[i]);
}

int main(int argc, char **argv) {
    if (argc > 1) iters = atol(argv[1]);
    nested_forks = argc > 2 && !strcmp(argv[2], "nested");
    system_in_handlers = !(argc > 2 && !strcmp(argv[2], "nosystem"));
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    alarm(WATCHDOG);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL)) die("storm_fork: sigaction\n");

    unblock(SIG_BLOCK); /* threads unblock for themselves */
    pthread_t f[FORKERS], c[CHURNERS];
    for (long i = 0; i < CHURNERS; i++)
        if (pthread_create(&c[i], NULL, churner, (void *)(i + 1))) die("storm_fork: pthread_create\n");
    for (long i = 0; i < FORKERS; i++)
        if (pthread_create(&f[i], NULL, forker, (void *)(i + 1))) die("storm_fork: pthread_create\n");

    /* The main thread: libc's own allocations until the forkers are done
     * (at least a few rounds), with the storm's signal blocked: a handler
     * that allocates while this thread holds stdio's list lock (fopen of
     * /etc/hosts in getaddrinfo, open_memstream, fclose) or glibc's NSS
     * lock deadlocks against a fork in progress elsewhere (the heap's
     * prepare holds its locks before glibc's fork takes those): a known
     * limitation, reproduced by fork_glibc_locks.c. */
    unsigned seed = 99;
    long done = 0;
    for (;;) {
        libc_round(&seed);
        atomic_fetch_add(&libc_rounds, 1);
        if (done == 0 && atomic_load(&forks) + atomic_load(&spawns) + atomic_load(&systems) >= FORKERS * iters)
            done = 1;
        if (done && atomic_load(&libc_rounds) >= 3) break;
    }
    for (int i = 0; i < FORKERS; i++) pthread_join(f[i], NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < CHURNERS; i++) pthread_join(c[i], NULL);
    free_ring();

    int stormed = sig_handled > 0 && h_ok > 0 && forks > 0 && spawns > 0;
    printf("storm_fork: %s: %ld forks, %ld posix_spawns, %ld systems, %ld forks + %ld posix_spawns in handlers, "
           "%ld signals handled, %ld handler allocations (%ld NULL), %ld libc rounds "
           "(%ld getaddrinfo ok)\n",
           stormed ? "ok" : "FAILED (no storm)", (long)forks, (long)spawns, (long)systems,
           (long)h_forks, (long)h_spawns, (long)sig_handled, (long)h_ok, (long)h_null, (long)libc_rounds,
           (long)gai_ok);
    return stormed ? 0 : 1;
}
