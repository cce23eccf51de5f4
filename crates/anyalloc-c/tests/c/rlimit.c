/* Under a limit on address space too small for the default first zone
 * (256 MiB of address space), the heap starts smaller instead of failing
 * every malloc of the process. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void){ void *a=malloc(100), *b=malloc(1<<20), *c=malloc(64<<20);
 if(!a||!b||!c){puts("rlimit: malloc failed");return 1;} memset(c,1,64<<20); free(a);free(b);free(c); puts("rlimit: ok"); return 0;}
