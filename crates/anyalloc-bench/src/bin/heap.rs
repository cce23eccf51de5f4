//! `heap`: object allocator cost, anyalloc `Heap` (normal and nolock paths)
//! against glibc, mimalloc and jemalloc, interleaved over several rounds.
//! The workloads live in the library (`anyalloc_bench::heap`), shared with
//! `anyalloc bench`.

fn main() {
    anyalloc_bench::heap::bin_main();
}
