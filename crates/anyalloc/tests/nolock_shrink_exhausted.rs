//! `NoLock::shrink` keeps its promise on an exhausted heap: a shrink fails
//! for want of memory only when it asks for an alignment the block's
//! address lacks. In a binary of its own: its child is forked by the
//! watchdog, and a fork makes the nolock calls of other tests beside it
//! fail by design (while the fork holds the heap's locks).

mod watchdog;

use allocator_api2::alloc::Allocator;
use anyalloc::NoLock;
use std::alloc::Layout;

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// A shrink to a stricter alignment that the block's address already
/// has keeps the block when no smaller one is free: it is aligned, and
/// big enough. (Only a shrink to an alignment the address lacks must
/// move, and fails when this context has no block for it.) In a child,
/// on a global heap of 8 MiB that cannot grow and without a maintenance
/// thread: the 64-byte class (64-byte aligned) is allocated with the
/// nolock path until it fails, then a 256-byte block (at a multiple of
/// 256: its slab is page-aligned) is shrunk to 64 bytes aligned to 64.
#[test]
fn a_shrink_to_a_stricter_alignment_the_address_has_keeps_the_block_with_no_memory_free() {
    let name =
        "a_shrink_to_a_stricter_alignment_the_address_has_keeps_the_block_with_no_memory_free";
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            name,
            &[
                ("ANYALLOC_MEMORY", "8m"),
                ("ANYALLOC_GROW", "0"),
                ("ANYALLOC_MAINTENANCE", "0"),
                ("ANYALLOC_CPUS", "1"),
            ],
            std::time::Duration::from_secs(60),
            "a shrink to a stricter alignment on an exhausted heap",
        );
        print!("{}", out.stdout);
        assert!(out.stdout.contains("CHILD DONE"), "{}", out.stdout);
        return;
    }
    let heap = anyalloc::init().unwrap();
    let old = l(256, 8);
    let new = l(64, 64);
    let p = NoLock.allocate(old).expect("a 256-byte block").cast::<u8>();
    assert_eq!(
        p.as_ptr() as usize % 256,
        0,
        "a 256-byte object off a page-aligned slab"
    );
    // SAFETY: `p` is live, 256 bytes.
    unsafe { p.as_ptr().write_bytes(0x3c, 256) };
    let mut held = std::vec::Vec::new();
    let bound = heap.stats().pages.total_pages * anyalloc::PAGE_SIZE / 64;
    while let Ok(b) = NoLock.allocate(new) {
        held.push(b.cast::<u8>());
        assert!(
            held.len() <= bound,
            "more 64-byte blocks than the heap holds"
        );
    }
    println!("{} blocks of 64 bytes took every free one", held.len());
    assert!(NoLock.allocate(new).is_err(), "no 64-byte block is free");
    // SAFETY: `p` is live with `old`; `new` is not larger.
    let q = unsafe { NoLock.shrink(p, old, new) }
        .expect("a shrink the address allows failed for want of memory")
        .cast::<u8>();
    assert_eq!(q, p, "kept in place");
    // SAFETY: `q` is live, at least 64 bytes.
    assert!((0..64).all(|i| unsafe { *q.as_ptr().add(i) } == 0x3c));
    // SAFETY: each block is live with the layout named.
    unsafe {
        NoLock.deallocate(q, new);
        for b in held {
            NoLock.deallocate(b, new);
        }
    }
    println!("CHILD DONE");
}
