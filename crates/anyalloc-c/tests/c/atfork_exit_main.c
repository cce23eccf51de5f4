/* Forks once in main; the library atfork_exit_lib.c forks again in its
 * destructor, after libanyalloc's finalisers have run. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    pid_t p = fork();
    if (p == 0)
        _exit(0);
    int st;
    if (p < 0 || waitpid(p, &st, 0) != p)
        return 1;
    printf("atfork_exit: fork in main ok\n");
    fflush(stdout);
    return 0;
}
