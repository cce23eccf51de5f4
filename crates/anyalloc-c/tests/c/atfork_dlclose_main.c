/* dlopen a plugin whose constructor registers fork handlers, dlclose it,
 * then fork: the plugin's handlers must be gone with its code (a fork
 * that still calls them jumps into unmapped memory). argv[1]: the plugin. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    for (int round = 0; round < 3; round++) {
        void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            printf("dlopen: %s\n", dlerror());
            return 2;
        }
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        int st;
        if (p < 0 || waitpid(p, &st, 0) != p || !WIFEXITED(st))
            return 3;
        if (dlclose(h) != 0) {
            printf("dlclose: %s\n", dlerror());
            return 2;
        }
        p = fork();
        if (p == 0)
            _exit(0);
        if (p < 0 || waitpid(p, &st, 0) != p || !WIFEXITED(st))
            return 3;
    }
    printf("atfork_dlclose: ok\n");
    return 0;
}
