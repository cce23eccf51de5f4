//! `pages`: page allocator alloc+free cost, anyalloc (normal and nolock
//! paths) against `buddy_system_allocator`, interleaved over several rounds.
//! The workloads live in the library (`anyalloc_bench::pages`), shared with
//! `anyalloc bench`.

fn main() {
    anyalloc_bench::pages::bin_main();
}
