/* Under a limit on address space, the heap starts smaller instead of
 * failing every malloc of the process (a limit too small for the default
 * first zone, 256 MiB of address space), and leaves room for the
 * program's other mappings (a limit the default would just fit under):
 * a 64 MiB block (mapped apart) and four threads (their stacks). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static void *worker(void *arg) {
    void *p = malloc(1000);
    free(p);
    return arg;
}
int main(void) {
    void *a = malloc(100), *b = malloc(1 << 20), *c = malloc(64 << 20);
    if (!a || !b || !c) { puts("rlimit: malloc failed"); return 1; }
    memset(c, 1, 64 << 20);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        if (pthread_create(&t[i], 0, worker, 0) != 0) { puts("rlimit: pthread_create failed"); return 1; }
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    free(a); free(b); free(c);
    puts("rlimit: ok");
    return 0;
}
