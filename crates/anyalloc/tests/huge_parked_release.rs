//! Blocks above 4 MiB freed on the nolock path are parked (no `munmap`
//! there) until a normal call releases them. Without a maintenance thread
//! (the C library's default), only a later large allocation, `drain`,
//! `maintain` or `trim` did: a program that went on with small blocks and
//! huge frees kept every parked block mapped. A normal free of a huge
//! block now releases the parked ones too.

use anyalloc::{Config, Heap};
use core::alloc::Layout;

/// Whether the page at `p` is mapped (`msync` fails with ENOMEM on an
/// unmapped range).
fn mapped(p: *mut u8) -> bool {
    // SAFETY: msync only inspects the range; `p` is page-aligned.
    unsafe { libc::msync(p.cast(), 4096, libc::MS_ASYNC) == 0 }
}

#[test]
fn a_normal_huge_free_releases_the_blocks_nolock_frees_parked() {
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    let layout = Layout::from_size_align(8 << 20, 8).unwrap();
    let parked: Vec<_> = (0..3).map(|_| heap.alloc(layout).unwrap()).collect();
    let other = heap.alloc(layout).unwrap();
    for p in &parked {
        // SAFETY: a live block of this heap, not used afterwards.
        unsafe { heap.free_nolock(*p) };
    }
    for p in &parked {
        assert!(mapped(p.as_ptr()), "a nolock free unmapped its block");
    }
    // Small blocks only: nothing releases the parked ones.
    let small = Layout::from_size_align(64, 8).unwrap();
    for _ in 0..1000 {
        let q = heap.alloc(small).unwrap();
        // SAFETY: just allocated here.
        unsafe { heap.free(q) };
    }
    assert!(mapped(parked[0].as_ptr()));
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(other) };
    for (i, p) in parked.iter().enumerate() {
        assert!(
            !mapped(p.as_ptr()),
            "parked block {i} still mapped after a normal huge free"
        );
    }
    assert_eq!(heap.stats().huge_in_use, 0);
}
