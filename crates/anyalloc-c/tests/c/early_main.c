#include <stdio.h>
#include <stdlib.h>
extern size_t early_usable;
extern int early_ok;
int main(void) {
    printf("early: ok=%d usable=%zu\n", early_ok, early_usable);
    return early_ok && early_usable == 112 ? 0 : 1;
}
