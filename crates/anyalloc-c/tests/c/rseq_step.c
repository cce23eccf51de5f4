/* Re-entry at every instruction of every restartable sequence of
 * libanyalloc.so: the C library's own copies of the fast paths (its
 * malloc, free, calloc, realloc, free_sized, anyalloc_malloc_nolock and
 * anyalloc_free_nolock), which the Rust tests never run.
 *
 * The trap flag cannot step through a sequence (every step would abort
 * it); an execution breakpoint can: one armed at address a (a debug
 * register, through perf_event_open with sigtrap) raises SIGTRAP exactly
 * when the thread is about to execute a. The program finds the library's
 * __rseq_cs section in its file, and for every byte of every sequence
 * (from its restart point to 8 bytes past its commit, and its abort
 * handler's first jump) arms a breakpoint there and runs a round of calls
 * that executes the fast paths: after malloc_trim (which empties the
 * per-CPU caches) a refill, pops, pushes and a flush of 64 B objects, 8 B
 * objects, 16 KiB blocks, calloc, realloc across classes, the nolock pair.
 * When the breakpoint fires, the handler disarms it and calls malloc,
 * free, calloc and the nolock pair itself on the same (pinned) CPU, as a
 * signal handler in a C program would.
 *
 * Prints one line of figures and "rseq step: ok", or "rseq step: skipped:
 * <why>" when glibc registered no rseq area (the library then uses its
 * try-locked slots) or the kernel refuses execution breakpoints; exits 1
 * on a violation. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "anyalloc.h"

/* C23's, which the library exports and glibc's headers may not declare
 * (as api.c and conform.c declare it). */
void free_sized(void *ptr, size_t size);

#define PAST_COMMIT 8
#define OBJ 64
#define TINY 8
#define LARGE (16 << 10)


static volatile int bp_fd = -1;
/* Traps taken while armed: a breakpoint is armed only around a round of
 * calls. */
static volatile unsigned long fired, at_abort, ok, nulls, violations;
static void *volatile carry;       /* the handler's 64 B object (malloc) */
static void *volatile large_carry; /* the handler's 16 KiB block (malloc) */

/* The pattern byte at offset i of a block filled when it was at key. */
static unsigned char pattern(uintptr_t key, size_t i, unsigned char tag) {
    return (unsigned char)(key ^ (i * 29) ^ tag);
}

static void fill(unsigned char *p, size_t n, unsigned char tag) {
    for (size_t i = 0; i < n; i++) p[i] = pattern((uintptr_t)p, i, tag);
}

/* Whether the first n bytes at p hold the pattern filled at key (p
 * itself, or where a realloc moved it from). */
static int intact_from(const unsigned char *p, uintptr_t key, size_t n, unsigned char tag) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != pattern(key, i, tag)) return 0;
    return 1;
}

/* The first and last OBJ bytes of a block (all of a smaller one). */
static void fill_ends(unsigned char *p, size_t n, unsigned char tag) {
    size_t k = n < OBJ ? n : OBJ;
    fill(p, k, tag);
    for (size_t i = n - k; i < n; i++) p[i] = pattern((uintptr_t)p, i, tag);
}

static int intact_ends(const unsigned char *p, size_t n, unsigned char tag) {
    size_t k = n < OBJ ? n : OBJ;
    if (!intact_from(p, (uintptr_t)p, k, tag)) return 0;
    for (size_t i = n - k; i < n; i++)
        if (p[i] != pattern((uintptr_t)p, i, tag)) return 0;
    return 1;
}

#define HANDLER_TAG 0x69
#define MAIN_TAG 0x96

static void served(void *p) {
    if (p)
        __atomic_fetch_add(&ok, 1, __ATOMIC_RELAXED);
    else
        __atomic_fetch_add(&nulls, 1, __ATOMIC_RELAXED);
}

static void swap_carry(void *volatile *slot, void *p, size_t n) {
    void *old = *slot;
    *slot = p;
    if (!old) return;
    if (!intact_ends(old, n, HANDLER_TAG)) violations++;
    free(old);
}

static void on_trap(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)si;
    int saved = errno;
    int fd = bp_fd;
    bp_fd = -1;
    if (fd < 0) {
        errno = saved;
        return;
    }
    /* Disarm first: the handler's own calls run the same sequences. */
    ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
    fired++;
    uintptr_t rip = (uintptr_t)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP];
    uint32_t before;
    memcpy(&before, (const void *)(rip - 4), 4);
    if (before == RSEQ_SIG) at_abort++;

    unsigned char *p = malloc(OBJ);
    served(p);
    if (p) {
        fill(p, OBJ, HANDLER_TAG);
        swap_carry(&carry, p, OBJ);
    }
    unsigned char *z = calloc(1, OBJ);
    served(z);
    if (z) {
        for (int i = 0; i < OBJ; i++)
            if (z[i]) violations++;
        free(z);
    }
    void *n = anyalloc_malloc_nolock(OBJ);
    served(n);
    if (n) anyalloc_free_nolock(n);
    unsigned char *l = malloc(LARGE);
    served(l);
    if (l) {
        fill_ends(l, LARGE, HANDLER_TAG);
        swap_carry(&large_carry, l, LARGE);
    }
    errno = saved;
}

#define MAX_LIVE 128
static struct {
    unsigned char *p;
    size_t n;
} live[MAX_LIVE];

static void check_new(unsigned char *p) {
    if (!p) {
        fprintf(stderr, "rseq step: a null with memory to spare\n");
        exit(1);
    }
    if (p == carry || p == large_carry) violations++;
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i].p == p) violations++;
}

/* The calls whose fast paths the walk interrupts. */
static void round_of_calls(void) {
    int k = 0;
    /* 71 x 64 B (a refill, then pops; the frees push, then flush), 8 B
     * objects (a tiny class), 16 KiB blocks (the page lists), through
     * malloc, calloc and the nolock entry point. */
    for (int i = 0; i < 71 + 8 + 4; i++) {
        size_t n = i < 71 ? OBJ : i < 79 ? TINY : LARGE;
        unsigned char *p;
        switch (i % 3) {
        case 0: p = malloc(n); break;
        case 1: p = calloc(1, n); break;
        default: p = anyalloc_malloc_nolock(n); break;
        }
        check_new(p);
        fill_ends(p, n, MAIN_TAG);
        live[k].p = p;
        live[k].n = n;
        k++;
    }
    for (int i = 0; i < k; i++) {
        if (!intact_ends(live[i].p, live[i].n, MAIN_TAG)) violations++;
        switch (i % 3) {
        case 0: free(live[i].p); break;
        case 1: free_sized(live[i].p, live[i].n); break;
        default: anyalloc_free_nolock(live[i].p); break;
        }
        live[i].p = NULL;
    }
    /* realloc across classes: 64 B -> 200 B -> 24 B, contents kept. */
    unsigned char *p = malloc(OBJ);
    check_new(p);
    fill(p, OBJ, MAIN_TAG);
    uintptr_t key = (uintptr_t)p;
    unsigned char *q = realloc(p, 200);
    check_new(q);
    unsigned char *r = realloc(q, 24);
    if (!r || !intact_from(r, key, 24, MAIN_TAG)) violations++;
    free(r);
}

static int arm(uintptr_t addr) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = PERF_TYPE_BREAKPOINT;
    a.size = sizeof a;
    a.sample_period = 1;
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    a.remove_on_exec = 1;
    a.sigtrap = 1;
    a.bp_type = HW_BREAKPOINT_X;
    a.bp_addr = addr;
    a.bp_len = sizeof(long);
    return (int)syscall(SYS_perf_event_open, &a, 0, -1, -1, 0);
}

/* The library's __rseq_cs section, found in its file through the program
 * headers of the loaded object: its address in memory (relocated) and its
 * size. */
static struct {
    const char *path;
    uintptr_t base;
} lib;

static int find_lib(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    (void)data;
    if (info->dlpi_name && strstr(info->dlpi_name, "libanyalloc.so")) {
        lib.path = info->dlpi_name;
        lib.base = info->dlpi_addr;
        return 1;
    }
    return 0;
}

static int rseq_section(uintptr_t *addr, size_t *size) {
    dl_iterate_phdr(find_lib, NULL);
    if (!lib.path) return 0;
    int fd = open(lib.path, O_RDONLY);
    if (fd < 0) return 0;
    struct stat st;
    fstat(fd, &st);
    const unsigned char *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f == MAP_FAILED) return 0;
    const Elf64_Ehdr *eh = (const void *)f;
    const Elf64_Shdr *sh = (const void *)(f + eh->e_shoff);
    const char *names = (const char *)(f + sh[eh->e_shstrndx].sh_offset);
    int found = 0;
    for (int i = 0; i < eh->e_shnum; i++) {
        if (!strcmp(names + sh[i].sh_name, "__rseq_cs")) {
            *addr = lib.base + sh[i].sh_addr;
            *size = sh[i].sh_size;
            found = 1;
        }
    }
    munmap((void *)f, st.st_size);
    return found;
}

/* The restart point and the end of the first jump of the abort handler at
 * `at` (a jmp; for a counting pop, a jnc then the jnz to the restart
 * point). */
static int jump_at(uintptr_t at, int *kind, uintptr_t *target, uintptr_t *end) {
    const unsigned char *c = (const unsigned char *)at;
    if (c[0] == 0xeb || c[0] == 0x73 || c[0] == 0x75) {
        *kind = c[0] == 0xeb ? 0 : c[0] == 0x73 ? 1 : 2;
        *end = at + 2;
        *target = *end + (int8_t)c[1];
        return 1;
    }
    int32_t rel;
    if (c[0] == 0xe9) {
        *kind = 0;
        memcpy(&rel, c + 1, 4);
        *end = at + 5;
    } else if (c[0] == 0x0f && (c[1] == 0x83 || c[1] == 0x85)) {
        *kind = c[1] == 0x83 ? 1 : 2;
        memcpy(&rel, c + 2, 4);
        *end = at + 6;
    } else {
        return 0;
    }
    *target = *end + rel;
    return 1;
}

static void restart_and_end(uintptr_t abort_ip, uintptr_t *first, uintptr_t *last) {
    int kind;
    uintptr_t target, end;
    if (!jump_at(abort_ip, &kind, &target, &end) || kind == 2) {
        fprintf(stderr, "rseq step: no jmp or jnc at the abort handler %#lx\n",
                (unsigned long)abort_ip);
        exit(1);
    }
    if (kind == 1 && (!jump_at(end, &kind, &target, &end) || kind != 2)) {
        fprintf(stderr, "rseq step: no jnz after the jnc at %#lx\n", (unsigned long)abort_ip);
        exit(1);
    }
    *first = target;
    *last = end;
}

int main(void) {
    /* glibc registered rseq for this thread: the library's fast path is
     * the sequences (else the try-locked slots, and nothing to walk). */
    if (__rseq_size == 0) {
        puts("rseq step: skipped: glibc registered no rseq area here");
        return 0;
    }
    uintptr_t sec;
    size_t sec_size;
    if (!rseq_section(&sec, &sec_size) || sec_size % sizeof(struct rseq_cs)) {
        fprintf(stderr, "rseq step: no __rseq_cs section in libanyalloc.so\n");
        return 1;
    }
    const struct rseq_cs *descs = (const void *)sec;
    size_t n = sec_size / sizeof(struct rseq_cs);

    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu(), &one);
    if (sched_setaffinity(0, sizeof one, &one)) {
        perror("rseq step: sched_setaffinity");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTRAP, &sa, NULL);
    int probe = arm((uintptr_t)round_of_calls);
    if (probe < 0) {
        puts("rseq step: skipped: perf_event_open refused an execution breakpoint");
        return 0;
    }
    close(probe);

    /* A first round outside the walk, then the heap at rest. */
    round_of_calls();
    malloc_trim(0);
    size_t in_use = mallinfo2().uordblks;

    unsigned long bytes = 0, fired_addrs = 0, fired_descs = 0, inside = 0;
    for (size_t d = 0; d < n; d++) {
        uintptr_t first, last;
        restart_and_end(descs[d].abort_ip, &first, &last);
        uintptr_t start = descs[d].start_ip, end = start + descs[d].post_commit_offset;
        if (!(first < start && start - first <= 32)) {
            fprintf(stderr, "rseq step: restart point %#lx not just before %#lx\n",
                    (unsigned long)first, (unsigned long)start);
            return 1;
        }
        unsigned long here = 0;
        for (uintptr_t a = first; a < last; a++) {
            /* The section (and just past its commit), then the abort
             * handler's jump. */
            if (a == end + PAST_COMMIT) a = descs[d].abort_ip;
            bytes++;
            malloc_trim(0);
            int fd = arm(a);
            if (fd < 0) {
                perror("rseq step: perf_event_open");
                return 1;
            }
            unsigned long before = fired;
            bp_fd = fd;
            round_of_calls();
            bp_fd = -1;
            close(fd);
            if (fired > before) {
                here++;
                fired_addrs++;
                inside += a >= start && a < end;
            }
        }
        fired_descs += here > 0;
    }
    swap_carry(&carry, NULL, OBJ);
    swap_carry(&large_carry, NULL, LARGE);
    malloc_trim(0);
    size_t in_use_after = mallinfo2().uordblks;

    printf("rseq step: %zu sequences in libanyalloc.so, %lu executed; %lu bytes armed, %lu "
           "instruction addresses interrupted (%lu inside a critical section, %lu seen by the "
           "handler at the abort address); handler calls %lu served, %lu null; bytes in use "
           "%zu before the walk, %zu after\n",
           n, fired_descs, bytes, fired_addrs, inside, at_abort, ok, nulls, in_use,
           in_use_after);
    int bad = 0;
    if (violations) bad = fprintf(stderr, "rseq step: %lu violations\n", violations);
    if (fired_descs < 5) bad = fprintf(stderr, "rseq step: only %lu sequences ran\n", fired_descs);
    if (inside < 30) bad = fprintf(stderr, "rseq step: only %lu inside sections\n", inside);
    if (at_abort < inside) bad = fprintf(stderr, "rseq step: interruptions not restarted\n");
    if (ok < fired_addrs * 4 / 2 || nulls > ok / 10)
        bad = fprintf(stderr, "rseq step: the handler's calls failed: %lu ok, %lu null\n", ok,
                      nulls);
    if (in_use_after != in_use) bad = fprintf(stderr, "rseq step: bytes in use changed\n");
    if (bad) return 1;
    puts("rseq step: ok");
    return 0;
}
