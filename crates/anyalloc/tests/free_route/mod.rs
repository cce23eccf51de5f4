//! A heap's four frees, taken in turn by the tests that must run every
//! one of them on the same kind of block (`grown_zones.rs`,
//! `heap_rseq_singlestep.rs`).

#![allow(dead_code)] // each test binary uses its own part

use std::alloc::Layout;
use std::ptr::NonNull;

use anyalloc::Heap;

/// Frees `p` through the heap's free number `route % 4`: `free_sized`,
/// `free`, `free_nolock_sized`, `free_nolock`.
///
/// # Safety
/// `p` was allocated by `h` with `layout` and is not freed again.
pub unsafe fn free_by_route(h: &Heap, p: NonNull<u8>, layout: Layout, route: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        match route % 4 {
            0 => h.free_sized(p, layout),
            1 => h.free(p),
            2 => h.free_nolock_sized(p, layout),
            _ => h.free_nolock(p),
        }
    }
}
