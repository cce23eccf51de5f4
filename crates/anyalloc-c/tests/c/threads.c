/* Prints how many threads this process has (the maintenance thread of
 * anyalloc is started only with ANYALLOC_MAINTENANCE=1), after a little
 * allocation work that also exercises the maintainer's wake-ups. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    for (int i = 0; i < 100000; i++) free(malloc(i % 5000 + 1));
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Threads:", 8)) printf("threads: %d\n", atoi(line + 8));
    if (f) fclose(f);
    return 0;
}
