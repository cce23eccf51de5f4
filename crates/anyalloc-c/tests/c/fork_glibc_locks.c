/* fork() against glibc's own locks that its fork takes after every
 * pthread_atfork prepare handler ran, so after the heap's, which holds
 * every heap lock (glibc's malloc takes its own locks after them, for this
 * reason). A thread that holds such a lock and is interrupted by a signal
 * handler that calls free or malloc must not wait for a heap lock held by
 * the fork, which waits for that lock (before normal-path waiters gave way
 * to a fork's hold, both waited for ever). Two of them:
 *
 * - stdio: the list of open streams (_IO_list_lock; fopen links its
 *   stream in, fclose unlinks it, fflush(NULL) holds it while it writes
 *   every stream). The main loop writes to STREAMS streams, flushes them
 *   all, and opens and closes one.
 * - nss: the NSS database lock (__nss_database_fork_prepare_parent;
 *   getpwuid holds it in nss_database_check_reload_and_get). Internal to
 *   glibc (not exported, not recursive): the library cannot even take it
 *   first. The main loop calls getpwuid(0).
 *
 * FORKERS threads fork FORKS times each (the child allocates, frees and
 * exits) while the main thread runs its loop under a fast per-thread timer
 * whose handler allocates and frees. Most runs hung before that fix.
 *
 * Bounded by counts; alarm(WATCHDOG) turns a hang into a failure. Usage:
 * fork_glibc_locks stdio|nss [FORKS]. Prints "fork_glibc_locks <lock>: ok
 * ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "storm_util.h"

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define FORKERS 2
#define TIMER_NS 20000
#define WATCHDOG 20
#define STREAMS 64

static atomic_long handled, forks, opens;
static atomic_int forkers_done;

static void watchdog(int sig) {
    (void)sig;
    die("fork_glibc_locks: watchdog: hung\n");
}

/* The handler keeps a ring of blocks of many sizes: its frees and
 * allocations reach the slow paths that take a zone lock. */
static void *ring[64];
static unsigned seed = 1;

static void handler(int sig) {
    (void)sig;
    int saved = errno;
    atomic_fetch_add_explicit(&handled, 1, memory_order_relaxed);
    for (int round = 0; round < 4; round++) {
        seed = seed * 1103515245u + 12345u;
        unsigned r = seed >> 8;
        void **slot = &ring[r % 64];
        free(*slot);
        *slot = malloc(r % 16 == 0 ? 8192 + r % 300000 : 1 + r % 2000);
    }
    errno = saved;
}

static long forks_each = 200;

static void *forker(void *arg) {
    (void)arg;
    for (long i = 0; i < forks_each; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            alarm(WATCHDOG);
            void *p = malloc(200);
            if (!p) _exit(2);
            memset(p, 1, 200);
            free(p);
            _exit(0);
        }
        if (pid < 0) die("fork_glibc_locks: fork failed\n");
        int st;
        while (waitpid(pid, &st, 0) < 0)
            if (errno != EINTR) die("fork_glibc_locks: waitpid failed\n");
        if (!WIFEXITED(st) || WEXITSTATUS(st)) die("fork_glibc_locks: a child failed\n");
        atomic_fetch_add(&forks, 1);
    }
    atomic_fetch_add(&forkers_done, 1);
    return NULL;
}

int main(int argc, char **argv) {
    int nss = argc > 1 && strcmp(argv[1], "nss") == 0;
    if (argc < 2 || (!nss && strcmp(argv[1], "stdio") != 0))
        die("usage: fork_glibc_locks stdio|nss [FORKS]\n");
    if (argc > 2) forks_each = atol(argv[2]);
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, watchdog);
    alarm(WATCHDOG);

    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, NULL); /* the forkers never take it */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL)) die("fork_glibc_locks: sigaction\n");
    pthread_t f[FORKERS];
    for (int i = 0; i < FORKERS; i++)
        if (pthread_create(&f[i], NULL, forker, NULL)) die("fork_glibc_locks: pthread_create\n");

    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer)) die("fork_glibc_locks: timer_create\n");
    struct itimerspec its = {{0, TIMER_NS}, {0, TIMER_NS}};
    if (timer_settime(timer, 0, &its, NULL)) die("fork_glibc_locks: timer_settime\n");
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    FILE *streams[STREAMS];
    for (int i = 0; !nss && i < STREAMS; i++)
        if (!(streams[i] = fopen("/dev/null", "w"))) die("fork_glibc_locks: fopen failed\n");
    while (atomic_load(&forkers_done) < FORKERS) {
        if (nss) {
            if (!getpwuid(0)) die("fork_glibc_locks: getpwuid failed\n");
        } else {
            /* fflush(NULL) holds the list lock while it writes every stream. */
            for (int i = 0; i < STREAMS; i++) fputs("x", streams[i]);
            fflush(NULL);
            FILE *fp = fopen("/dev/null", "r");
            if (!fp) die("fork_glibc_locks: fopen failed\n");
            fclose(fp);
        }
        atomic_fetch_add_explicit(&opens, 1, memory_order_relaxed);
    }
    for (int i = 0; !nss && i < STREAMS; i++) fclose(streams[i]);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    timer_delete(timer);
    for (int i = 0; i < FORKERS; i++) pthread_join(f[i], NULL);
    for (int i = 0; i < 64; i++) free(ring[i]);
    int ok = handled > 0 && forks == FORKERS * forks_each;
    printf("fork_glibc_locks %s: %s: %ld forks, %ld rounds of %s, %ld signals handled\n",
           argv[1], ok ? "ok" : "FAILED (no storm)", (long)forks, (long)opens,
           nss ? "getpwuid" : "fflush(NULL), fopen, fclose", (long)handled);
    return ok ? 0 : 1;
}
