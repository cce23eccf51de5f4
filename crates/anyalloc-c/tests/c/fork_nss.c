/* fork() against glibc's NSS database lock. glibc's fork takes that lock
 * (__nss_database_fork_prepare_parent) after every pthread_atfork prepare
 * handler ran, so after the heap's, which holds every heap lock; glibc's
 * malloc takes its own locks after it. A thread inside an NSS lookup
 * (getpwuid: nss_database_check_reload_and_get holds the lock) interrupted
 * by a signal handler that calls free or malloc waits for a heap lock held
 * by the forking thread, which waits for the NSS lock: both for ever. The
 * lock is internal to glibc (not exported, not recursive): the library
 * cannot even take it first (fork_stdio.c: the same with stdio's lock).
 * FORKERS threads fork FORKS times each while the main thread calls
 * getpwuid(0) in a loop under a fast per-thread timer whose handler
 * allocates and frees. Most runs hang (tests/fork_nss.rs is ignored).
 *
 * Bounded by counts; alarm(WATCHDOG) turns a hang into a failure. Usage:
 * fork_nss [FORKS]. Prints "fork_nss: ok ..." and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <pwd.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

#define FORKERS 2
#define TIMER_NS 20000
#define WATCHDOG 10

static atomic_long handled, forks, opens;
static atomic_int forkers_done;

static void die(const char *what) {
    ssize_t r = write(2, what, strlen(what));
    (void)r;
    abort();
}

static void watchdog(int sig) {
    (void)sig;
    die("fork_nss: watchdog: hung\n");
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
        if (pid < 0) die("fork_nss: fork failed\n");
        int st;
        while (waitpid(pid, &st, 0) < 0)
            if (errno != EINTR) die("fork_nss: waitpid failed\n");
        if (!WIFEXITED(st) || WEXITSTATUS(st)) die("fork_nss: a child failed\n");
        atomic_fetch_add(&forks, 1);
    }
    atomic_fetch_add(&forkers_done, 1);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) forks_each = atol(argv[1]);
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
    if (sigaction(SIGUSR1, &sa, NULL)) die("fork_nss: sigaction\n");
    pthread_t f[FORKERS];
    for (int i = 0; i < FORKERS; i++)
        if (pthread_create(&f[i], NULL, forker, NULL)) die("fork_nss: pthread_create\n");

    timer_t timer;
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGUSR1;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer)) die("fork_nss: timer_create\n");
    struct itimerspec its = {{0, TIMER_NS}, {0, TIMER_NS}};
    if (timer_settime(timer, 0, &its, NULL)) die("fork_nss: timer_settime\n");
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    while (atomic_load(&forkers_done) < FORKERS) {
        struct passwd *pw = getpwuid(0);
        if (!pw) die("fork_nss: getpwuid failed\n");
        atomic_fetch_add_explicit(&opens, 1, memory_order_relaxed);
    }
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    timer_delete(timer);
    for (int i = 0; i < FORKERS; i++) pthread_join(f[i], NULL);
    for (int i = 0; i < 64; i++) free(ring[i]);
    int ok = handled > 0 && forks == FORKERS * forks_each;
    printf("fork_nss: %s: %ld forks, %ld getpwuid calls, %ld signals handled\n",
           ok ? "ok" : "FAILED (no storm)", (long)forks, (long)opens, (long)handled);
    return ok ? 0 : 1;
}
