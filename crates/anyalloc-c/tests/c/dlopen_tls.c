/* dlopen (and dlclose) more TLS modules than a thread's DTV has room for,
 * from threads that then touch their TLS: __tls_get_addr grows each
 * thread's DTV with malloc and frees closed modules' blocks with free,
 * i.e. calls into the allocator from inside a TLS access. anyalloc keeps
 * its own per-thread words in initial-exec TLS so that this cannot recurse.
 * Usage: dlopen_tls DIR N (DIR holds libtls0.so ... libtls{N-1}.so). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define MAXN 64
static void *h[MAXN];
static long (*fn[MAXN])(long);
static int n;
static pthread_barrier_t bar;

static void *worker(void *arg) {
    long sum = 0;
    for (int round = 0; round < 3; round++) {
        pthread_barrier_wait(&bar); /* everything (re)opened */
        for (int i = 0; i < n; i++) sum += fn[i](i + round);
        void *p = malloc(64);
        free(p);
        pthread_barrier_wait(&bar); /* main may close now */
    }
    return (void *)sum;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    n = atoi(argv[2]);
    if (n > MAXN) n = MAXN;
    pthread_t t[4];
    pthread_barrier_init(&bar, NULL, 5);
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < n; i++) {
            char name[4096];
            snprintf(name, sizeof name, "%s/libtls%d.so", argv[1], i);
            h[i] = dlopen(name, RTLD_NOW | RTLD_LOCAL);
            if (!h[i]) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 1; }
            fn[i] = (long (*)(long))dlsym(h[i], "touch");
        }
        pthread_barrier_wait(&bar);
        pthread_barrier_wait(&bar);
        for (int i = 0; i < n; i++) dlclose(h[i]);
    }
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("dlopen_tls: ok %d modules x 3 rounds\n", n);
    return 0;
}
