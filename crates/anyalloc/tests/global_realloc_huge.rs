//! `Global::realloc` of a huge block (above 4 MiB, `mmap`ed) to another huge
//! size moves its pages with `mremap`, as C's `realloc` does, instead of
//! copying them or keeping them: a `Vec<u8>` grown past 4 MiB, or a buffer
//! grown by `realloc`, must not hold the old and the new block resident at
//! once, and one shrunk (`shrink_to_fit`) gives its tail back to the OS.
//!
//! Growth is measured by the peak RSS (`VmHWM`), reset just before the
//! `realloc` (`/proc/self/clear_refs` `5`): a copy faults in every page of
//! the new block while the old one is still resident (+64 MiB here); a move
//! faults in nothing. A shrink by the RSS after it: a block kept in place
//! stays resident whole. One test, so that no other test thread adds to the
//! RSS while it is measured.

mod proc_self;

use anyalloc::Global;
use proc_self::status_kib;
use std::alloc::{GlobalAlloc, Layout};

#[global_allocator]
static ALLOC: Global = Global;

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[test]
fn huge_reallocs_move_the_pages() {
    a_huge_growth_moves_the_pages_instead_of_copying_them();
    a_huge_shrink_gives_the_tail_back();
    a_huge_block_aligned_beyond_a_page_keeps_its_alignment();
    a_huge_block_grown_a_page_at_a_time_moves_a_few_times();
}

/// A huge block grown by a page at a time (a buffer that `realloc`s by a
/// constant step) is remapped a logarithmic number of times: each growth
/// takes half as much again, and a size within the block keeps it. Before,
/// every step was an `mremap` and two signal-mask calls (3.7 ms to grow a
/// C buffer to 10 MiB by 4 KiB steps, against 0.06 ms for glibc). Counted
/// by the block's usable size, which changes at every remap.
fn a_huge_block_grown_a_page_at_a_time_moves_a_few_times() {
    const START: usize = 5 << 20;
    const END: usize = 20 << 20;
    let heap = anyalloc::global_heap().unwrap();
    let mut layout = Layout::from_size_align(START, 8).unwrap();
    // SAFETY: a non-zero size.
    let mut p = unsafe { ALLOC.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: a live block of START bytes.
    unsafe { p.write(9) };
    let mut usable = heap.usable_size(std::ptr::NonNull::new(p).unwrap());
    let mut remaps = 0;
    while layout.size() < END {
        let size = layout.size() + 4096;
        // SAFETY: `p` is live with `layout`; `size` is valid.
        p = unsafe { ALLOC.realloc(p, layout, size) };
        assert!(!p.is_null());
        layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: the block's last byte, inside it.
        unsafe { p.add(size - 1).write(1) };
        let now = heap.usable_size(std::ptr::NonNull::new(p).unwrap());
        if now != usable {
            remaps += 1;
            usable = now;
        }
    }
    // SAFETY: the first byte survived every move; `p` is freed once.
    unsafe {
        assert_eq!(*p, 9);
        ALLOC.dealloc(p, layout);
    }
    assert!(
        remaps <= 8,
        "{remaps} remaps to grow a block from {} to {} MiB by 4 KiB steps",
        START >> 20,
        END >> 20
    );
}

fn a_huge_shrink_gives_the_tail_back() {
    const OLD: usize = 100 << 20;
    const NEW: usize = 51 << 20;
    let layout = Layout::from_size_align(OLD, 8).unwrap();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: `p` is a live block of OLD bytes: every page made resident.
    unsafe { std::ptr::write_bytes(p, 0x6b, OLD) };
    let full = status_kib("VmRSS:");
    // SAFETY: `p` is live with `layout`; NEW is a valid size.
    let q = unsafe { ALLOC.realloc(p, layout, NEW) };
    assert!(!q.is_null());
    let shrunk = status_kib("VmRSS:");
    // SAFETY: `q` is live for NEW bytes, all preserved; freed once.
    unsafe {
        assert_eq!(*q, 0x6b);
        assert_eq!(*q.add(NEW - 1), 0x6b);
        ALLOC.dealloc(q, Layout::from_size_align(NEW, 8).unwrap());
    }
    assert!(
        full.saturating_sub(shrunk) > 40 << 10,
        "RSS {} MiB with the {} MiB block, {} MiB once shrunk to {} MiB",
        full >> 10,
        OLD >> 20,
        shrunk >> 10,
        NEW >> 20
    );
}

fn a_huge_growth_moves_the_pages_instead_of_copying_them() {
    const OLD: usize = 64 << 20;
    const NEW: usize = 128 << 20;
    let layout = Layout::from_size_align(OLD, 8).unwrap();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: `p` is a live block of OLD bytes: every page made resident.
    unsafe { std::ptr::write_bytes(p, 0x5a, OLD) };
    reset_peak();
    let base = status_kib("VmHWM:");
    // SAFETY: `p` is live with `layout`; NEW is a valid size.
    let q = unsafe { ALLOC.realloc(p, layout, NEW) };
    assert!(!q.is_null());
    let grew_kib = status_kib("VmHWM:") - base;
    // SAFETY: `q` is live for NEW bytes, its first OLD preserved.
    unsafe {
        assert_eq!(*q, 0x5a);
        assert_eq!(*q.add(OLD / 2), 0x5a);
        assert_eq!(*q.add(OLD - 1), 0x5a);
        q.add(NEW - 1).write(1);
        ALLOC.dealloc(q, Layout::from_size_align(NEW, 8).unwrap());
    }
    assert!(
        grew_kib < 16 << 10,
        "the peak RSS grew by {} MiB over a realloc of a resident {} MiB block",
        grew_kib >> 10,
        OLD >> 20
    );
}

/// A block aligned beyond a page keeps its alignment across the realloc (a
/// move returns a page-aligned address only).
fn a_huge_block_aligned_beyond_a_page_keeps_its_alignment() {
    let big_align = Layout::from_size_align(8 << 20, 2 << 20).unwrap();
    for size in [16 << 20, 24 << 20, 6 << 20] {
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(big_align) };
        assert!(
            !p.is_null() && (p as usize).is_multiple_of(2 << 20),
            "{p:p}"
        );
        // SAFETY: `p` is live for 8 MiB.
        unsafe { p.write(7) };
        // SAFETY: `p` is live with `big_align`; `size` is valid.
        let q = unsafe { ALLOC.realloc(p, big_align, size) };
        assert!(
            !q.is_null() && (q as usize).is_multiple_of(2 << 20),
            "{q:p}"
        );
        // SAFETY: `q` is live with this size, its first byte preserved;
        // freed once.
        unsafe {
            assert_eq!(*q, 7);
            ALLOC.dealloc(q, Layout::from_size_align(size, 2 << 20).unwrap());
        }
    }
}
