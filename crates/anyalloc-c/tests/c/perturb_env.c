/* glibc's environment switch for M_PERTURB (MALLOC_PERTURB_, or
 * GLIBC_TUNABLES=glibc.malloc.perturb=N): a small block dirtied and freed,
 * then a small block, a page block and a calloc block; prints byte 60 of
 * the first, byte 100000 of the second and byte 50 of the third as hex:
 * "perturb_env: P B C". With the switch on, P and B are the complement of
 * its byte and C is 0; off, P is 33 (the dirt) or 00 (a fresh block). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    unsigned char *d = malloc(100);
    if (!d) return 2;
    memset(d, 0x33, 100);
    free(d);
    unsigned char *p = malloc(100), *b = malloc(200000), *c = calloc(1, 100);
    if (!p || !b || !c) return 2;
    printf("perturb_env: %02x %02x %02x\n", p[60], b[100000], c[50]);
    free(p);
    free(b);
    free(c);
    return 0;
}
