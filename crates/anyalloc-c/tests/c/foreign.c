/* Passes a pointer anyalloc did not hand out to one of its functions:
 * foreign MODE, MODE one of stack, static, interior, realloc, usable,
 * perturb (free with mallopt's M_PERTURB on), nolock. Must abort with a
 * one-line message that names the function called before printing
 * "survived". */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PLAIN /* PLAIN: built without linking libanyalloc (for LD_PRELOAD) */
#include "anyalloc.h"
#endif

static char global_buffer[256];

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "stack";
    char stack_buffer[256];
    /* volatile: keep the compiler from reasoning about the pointers. */
    char *volatile stack = stack_buffer + 16;
    char *volatile global = global_buffer + 32;
    memset(stack_buffer, 1, sizeof stack_buffer);
    if (!strcmp(mode, "stack")) {
        free(stack);
    } else if (!strcmp(mode, "static")) {
        free(global);
    } else if (!strcmp(mode, "interior")) {
        char *p = malloc(100);
        char *volatile inside = p + 8;
        free(inside);
    } else if (!strcmp(mode, "realloc")) {
        void *q = realloc(stack, 1000);
        (void)q;
    } else if (!strcmp(mode, "usable")) {
        printf("%zu\n", malloc_usable_size(stack));
    } else if (!strcmp(mode, "perturb")) {
        mallopt(M_PERTURB, 0x5a);
        free(stack);
#ifndef PLAIN
    } else if (!strcmp(mode, "nolock")) {
        anyalloc_free_nolock(stack);
    } else if (!strcmp(mode, "scope-exit")) {
        anyalloc_nolock_exit(); /* without a scope */
#endif
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    puts("survived");
    return 0;
}
