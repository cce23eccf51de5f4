/* A library initialised before libanyalloc's constructor chooses its own
 * M_PERTURB byte (0x11) in its constructor: glibc applies MALLOC_PERTURB_
 * at start-up, before any constructor, so this later choice is the one in
 * effect. */
#include <malloc.h>

__attribute__((constructor)) static void choose_perturb(void) {
    mallopt(M_PERTURB, 0x11);
}
