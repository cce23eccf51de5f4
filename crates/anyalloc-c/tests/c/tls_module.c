/* A module with general-dynamic TLS, copied many times for dlopen_tls.c. */
__thread long tls_counter[64];
long touch(long x) {
    tls_counter[x % 64] += x;
    return tls_counter[x % 64];
}
