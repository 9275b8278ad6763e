/* A native leak as a C extension's would be: memory kept outside Python's allocators.
 * Built by the test that needs it: cc -shared -fPIC -g -o libnative_leak.so native_leak.c */
#include <stdlib.h>
#include <string.h>

void *native_keep(size_t size)
{
    void *block = malloc(size); /* never freed */
    if (block != NULL)
        memset(block, 1, size);
    return block;
}
