/* Under a limit on address space, the heap grows into nearly all of it.
 *
 * usage: rlimit_fill HEADROOM_MIB BLOCK_BYTES [nofds]
 *
 * A forked child limits its address space (RLIMIT_AS) to what the process
 * maps now plus HEADROOM_MIB, then allocates blocks of BLOCK_BYTES until malloc fails, and reports how much
 * it got (the blocks are never touched: the limit is on address space,
 * not memory): "rlimit_fill: <allocated MiB> of <headroom MiB>". Growth used
 * to double the heap's zones and give up when the next doubling did not
 * fit, leaving up to half of the room unused. The child then frees every
 * block and allocates again, and checks that errno was ENOMEM (and stayed
 * 0 through every malloc that succeeded before). With "nofds", the child
 * first fills its table of file descriptors, so that the heap's reads of
 * /proc/self/statm as it grows fail (EMFILE): those mallocs succeed too,
 * and leave errno alone as well. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_BLOCKS (1 << 20)
static void *blocks[MAX_BLOCKS];

static size_t mapped_bytes(void) {
    char buf[128];
    FILE *f = fopen("/proc/self/statm", "r");
    size_t pages = 0;
    if (!f || !fgets(buf, sizeof buf, f) || sscanf(buf, "%zu", &pages) != 1) {
        puts("rlimit_fill: cannot read /proc/self/statm");
        exit(2);
    }
    fclose(f);
    return pages * (size_t)sysconf(_SC_PAGESIZE);
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "nofds") == 0)) return 2;
    size_t headroom = strtoull(argv[1], 0, 0) << 20;
    size_t block = strtoull(argv[2], 0, 0);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
        size_t now = mapped_bytes();
        struct rlimit l = {now + headroom, now + headroom};
        if (setrlimit(RLIMIT_AS, &l) != 0) { puts("rlimit_fill: setrlimit failed"); _exit(2); }
        if (argc == 4) {
            struct rlimit f = {32, 32};
            if (setrlimit(RLIMIT_NOFILE, &f) != 0) { puts("rlimit_fill: setrlimit failed"); _exit(2); }
            while (dup(1) >= 0) {}
            if (errno != EMFILE) { puts("rlimit_fill: the descriptors did not run out"); _exit(2); }
        }
        size_t n = 0;
        errno = 0;
        while (n < MAX_BLOCKS) {
            char *p = malloc(block);
            if (!p) break;
            blocks[n++] = p;
            /* As glibc's: a malloc that succeeds leaves errno alone, even
             * when the heap's growth had a mapping refused on the way (and
             * retried it smaller). */
            if (errno != 0) {
                printf("rlimit_fill: errno %d after the successful malloc of block %zu\n", errno, n);
                fflush(stdout);
                _exit(1);
            }
        }
        int err = errno;
        if (n == MAX_BLOCKS) { puts("rlimit_fill: never failed"); _exit(2); }
        if (err != ENOMEM) { printf("rlimit_fill: errno %d, not ENOMEM\n", err); fflush(stdout); _exit(1); }
        size_t got = n * block;
        for (size_t i = 0; i < n; i++) free(blocks[i]);
        /* What was freed can be allocated again. */
        size_t again = 0;
        while (again < n && (blocks[again] = malloc(block)) != 0) again++;
        if (again < n * 9 / 10) {
            printf("rlimit_fill: after freeing %zu blocks only %zu could be allocated again\n", n, again);
            fflush(stdout);
            _exit(1);
        }
        printf("rlimit_fill: %zu of %zu MiB\n", got >> 20, headroom >> 20);
        fflush(stdout);
        _exit(0);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid) return 2;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 3;
}
