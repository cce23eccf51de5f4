//! The set-up of the tests that act inside a maintenance release (the
//! `ReleaseWindow` interrupt point): a quiet heap with one free block whose
//! memory is not yet back with the OS.

use std::ptr::NonNull;

use anyalloc::{Config, Heap, MAX_ORDER};

/// A leaked heap of one CPU, no growth and no maintenance thread, and the
/// max-order block it handed out, touched and took back: the only free
/// block whose memory is not yet back with the OS (the untouched ones are
/// marked released), so the next release (`trim`, `maintain`) stops at
/// `ReleaseWindow` with that block.
pub fn heap_with_a_block_to_release() -> (&'static Heap, NonNull<u8>) {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(16 << 20)
                .cpus(1)
                .grow(false)
                .maintenance(false),
        )
        .unwrap(),
    ));
    let p = heap.pages().alloc_pages(MAX_ORDER).unwrap();
    // SAFETY: touching our own block, then a valid free.
    unsafe {
        p.as_ptr().write_bytes(0x5a, 4096);
        heap.pages().free_pages(p, MAX_ORDER);
    }
    (heap, p)
}
