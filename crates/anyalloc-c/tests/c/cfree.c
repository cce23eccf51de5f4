/* A program linked before glibc 2.26 calls cfree: bound to glibc's compat
 * symbol cfree@GLIBC_2.2.5 (an alias of glibc's own free), or to
 * libanyalloc's cfree when that library defines one. Blocks of every kind
 * (object, page block, mmap'ed) are freed with it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cfree(void *);
#if defined(__x86_64__)
__asm__(".symver cfree,cfree@GLIBC_2.2.5");
#elif defined(__aarch64__)
__asm__(".symver cfree,cfree@GLIBC_2.17");
#endif

int main(void) {
    size_t sizes[] = {1, 100, 4000, 100000, 6 << 20};
    for (int round = 0; round < 3; round++) {
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            char *p = malloc(sizes[i]);
            if (p == NULL)
                return 1;
            memset(p, 1, sizes[i]);
            cfree(p);
        }
    }
    cfree(NULL);
    printf("cfree: ok\n");
    return 0;
}
