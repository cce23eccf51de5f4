/* A library whose constructor allocates before libanyalloc's own
 * constructor has run: the heap is then created from inside this malloc. */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

size_t early_usable;
int early_ok;

__attribute__((constructor)) static void early(void) {
    char *p = malloc(100);
    char *q = calloc(10, 10);
    if (!p || !q) return;
    early_usable = malloc_usable_size(p);
    memset(p, 1, 100);
    p = realloc(p, 5000);
    early_ok = p && q[99] == 0;
    free(p);
    free(q);
}
