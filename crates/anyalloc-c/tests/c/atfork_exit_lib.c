/* A library initialised before libanyalloc (listed after it), so finalised
 * after it at exit: its destructor forks, as another thread of an exiting
 * process may. The heap's fork handlers must still run for that fork. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((destructor)) static void fork_at_exit(void) {
    pid_t p = fork();
    if (p == 0) {
        free(malloc(100));
        _exit(0);
    }
    int st;
    if (p > 0 && waitpid(p, &st, 0) == p && WIFEXITED(st) && WEXITSTATUS(st) == 0)
        printf("atfork_exit: fork at exit ok\n");
    fflush(stdout);
}
