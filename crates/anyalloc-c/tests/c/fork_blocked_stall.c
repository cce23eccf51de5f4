/* A fork that a third thread keeps waiting, and a thread that allocates
 * meanwhile. A writer thread's fflush(NULL) holds stdio's list lock while
 * it writes to a full pipe; another thread forks, and the fork (after
 * every prepare handler, so while the heap's locks are held) waits for
 * that lock. The main thread is the pipe's reader: it reads the lines with
 * getline into blocks it keeps, which is what lets fflush, and so the
 * fork, go on. glibc's malloc takes its locks after stdio's: nothing
 * waits. Here every allocation that misses during the fork gives way
 * (FORK_PATIENCE, then a mapping of its own beside the heap); past half
 * the huge table each one waits FORK_PATIENCE_LAST (1 s) for the fork.
 * Usage: fork_blocked_stall [LINES]. Prints "fork_blocked_stall: ok ..."
 * when every line was read within LIMIT seconds, else "... SLOW ...". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LIMIT 5.0

static FILE *out;
static volatile int flushing;
static long lines = 20000;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *writer(void *a) {
    (void)a;
    for (long i = 0; i < lines; i++) fprintf(out, "line %ld\n", i);
    /* The stream's buffer is as big as the text: this holds the list lock
     * until the reader has taken all but a pipe's worth. */
    flushing = 1;
    fflush(NULL);
    fclose(out);
    return NULL;
}

static void *forker(void *a) {
    (void)a;
    while (!flushing) usleep(1000);
    usleep(20000); /* the writer is inside fflush(NULL) by now */
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) lines = atol(argv[1]);
    setvbuf(stdout, NULL, _IONBF, 0);
    alarm(60);
    int p[2];
    if (pipe(p)) return 2;
    out = fdopen(p[1], "w");
    FILE *in = fdopen(p[0], "r");
    if (!out || !in) return 2;
    if (setvbuf(out, malloc((size_t)lines * 16), _IOFBF, (size_t)lines * 16)) return 2;
    char **kept = calloc(lines, sizeof *kept);
    pthread_t w, f;
    pthread_create(&w, NULL, writer, NULL);
    pthread_create(&f, NULL, forker, NULL);
    while (!flushing) usleep(1000);
    usleep(100000); /* the fork waits for the list lock by now */
    double t0 = now(), worst = 0;
    long n = 0;
    for (;;) {
        char *line = NULL;
        size_t cap = 0;
        double a = now();
        ssize_t r = getline(&line, &cap, in);
        double d = now() - a;
        if (d > worst) worst = d;
        if (r < 0) {
            free(line);
            break;
        }
        kept[n++] = line;
        if (now() - t0 > LIMIT) break;
    }
    double took = now() - t0;
    int ok = n == lines;
    if (!ok) {
        /* Let the writer and the fork finish: drain without allocating. */
        char buf[4096];
        while (read(p[0], buf, sizeof buf) > 0)
            ;
    }
    pthread_join(w, NULL);
    pthread_join(f, NULL);
    for (long i = 0; i < n; i++) free(kept[i]);
    printf("fork_blocked_stall: %s: %ld of %ld lines read in %.2f s, slowest getline %.3f s\n",
           ok ? "ok" : "SLOW", n, lines, took, worst);
    return ok ? 0 : 1;
}
