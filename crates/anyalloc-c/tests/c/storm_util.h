/* Helpers shared by the C storm programs (static functions: each program
 * includes this once).
 *
 * - die: one line on stderr with write(2) (safe in a signal handler), then
 *   abort.
 * - storm_timers_start / storm_timers_stop: two POSIX timers aimed at the
 *   calling thread (SIGEV_THREAD_ID), SIGUSR1 every period_ns and SIGUSR2
 *   every 7/3 of it, so their handlers interrupt each other at shifting
 *   points; stopping blocks both signals first.
 * - storm_block_signals: blocks or unblocks SIGUSR1 and SIGUSR2.
 * - storm_spawn_true: posix_spawn of /bin/true (retried on EINTR).
 * - storm_handle_signals: blocks SIGUSR1 and SIGUSR2 on the calling thread
 *   (the threads it starts inherit the mask and unblock once their timers
 *   run) and installs one handler for both.
 * - storm_counters_back: whether mallinfo2's counters came back after a
 *   storm, allowing for what glibc keeps. */
#ifndef STORM_UTIL_H
#define STORM_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <signal.h>
#include <spawn.h>
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

__attribute__((unused)) static void die(const char *what) {
    ssize_t r = write(2, what, strlen(what));
    (void)r;
    abort();
}

__attribute__((unused)) static void storm_block_signals(int how) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(how, &s, NULL);
}

/* The calling thread's two timers into t[0] and t[1]; `prog` names the
 * program in the message if the OS refuses one. */
__attribute__((unused)) static void storm_timers_start(timer_t t[2], long period_ns, const char *prog) {
    pid_t tid = (pid_t)syscall(SYS_gettid);
    for (int s = 0; s < 2; s++) {
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = s ? SIGUSR2 : SIGUSR1;
        sev.sigev_notify_thread_id = tid;
        long ns = s ? period_ns * 7 / 3 : period_ns;
        struct itimerspec its = {{0, ns}, {0, ns}};
        if (timer_create(CLOCK_MONOTONIC, &sev, &t[s]) || timer_settime(t[s], 0, &its, NULL)) {
            ssize_t r = write(2, prog, strlen(prog));
            (void)r;
            die(": timer_create or timer_settime failed\n");
        }
    }
}

__attribute__((unused)) static void storm_timers_stop(timer_t t[2]) {
    storm_block_signals(SIG_BLOCK);
    for (int s = 0; s < 2; s++) timer_delete(t[s]);
}

/* Starts /bin/true with posix_spawn (retried while a signal interrupts
 * it); returns its pid, for the caller to wait for. Dies naming `prog`. */
extern char **environ;
__attribute__((unused)) static pid_t storm_spawn_true(const char *prog) {
    pid_t pid;
    char *argv[] = {"true", NULL};
    int e;
    while ((e = posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ)) == EINTR)
        ;
    if (e) {
        ssize_t r = write(2, prog, strlen(prog));
        (void)r;
        die(": posix_spawn failed\n");
    }
    return pid;
}

/* See the list above; dies naming `prog` if sigaction fails. */
__attribute__((unused)) static void storm_handle_signals(void (*handler)(int), const char *prog) {
    storm_block_signals(SIG_BLOCK);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGUSR2, &sa, NULL)) {
        ssize_t r = write(2, prog, strlen(prog));
        (void)r;
        die(": sigaction failed\n");
    }
}

/* Whether the heap's counters are back where they were after a storm
 * (both read after malloc_trim): every block the program made is freed,
 * but glibc keeps some allocations of its own for good, each cached
 * thread stack's TLS vector (320 bytes here) above all. One made while
 * another thread's fork held the heap's locks was mapped beside the heap
 * (HeapStats::fork_mapped) and counts as a huge block of one page: seen
 * as "huge blocks 0 -> 1" with 320 bytes fewer in use than in the runs
 * where all three kept vectors were objects. So the bytes in use, objects
 * and huge blocks together, must be within 64 KiB of before, and no huge
 * block may have gone: a huge block the program left live (4 MiB and
 * more) or a count taken off twice still fails. */
__attribute__((unused)) static int storm_counters_back(const struct mallinfo2 *before,
                                                       const struct mallinfo2 *after) {
    size_t was = before->uordblks + before->hblkhd, now = after->uordblks + after->hblkhd;
    return after->hblks >= before->hblks && now <= was + 65536;
}

#endif
