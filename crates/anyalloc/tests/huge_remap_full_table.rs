//! `Heap::remap_huge` with the huge table full: another thread's huge
//! allocation must not take the remapped block's entry while it moves.

use anyalloc::{Config, Heap, PAGE_SIZE};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// The sizes the block alternates between.
const SMALL: usize = 5 * MIB;
const LARGE: usize = 13 * MIB;

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Sets the flag when dropped: the other thread stops even if an assertion
/// of the main thread fails (the scope waits for it).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Fills the page at `off` of the block with `seed`.
fn mark(p: NonNull<u8>, off: usize, seed: u8) {
    // SAFETY: the block is a live allocation of more than `off + PAGE_SIZE`
    // bytes, owned by this test's main thread.
    unsafe { std::ptr::write_bytes(p.as_ptr().add(off), seed, PAGE_SIZE) };
}

/// Whether the page at `off` of the block still holds `seed`.
fn marked(p: NonNull<u8>, off: usize, seed: u8) -> bool {
    // SAFETY: as in `mark`.
    let s = unsafe { std::slice::from_raw_parts(p.as_ptr().add(off), PAGE_SIZE) };
    s.iter().all(|&b| b == seed)
}

#[test]
fn remap_huge_with_the_table_full_keeps_its_entry_from_other_threads() {
    let heap = Heap::new(Config::default().memory(64 << 20).cpus(2)).unwrap();
    // Huge blocks of 4 MiB + 4 KiB until the table is full (the mappings
    // are reserved, never touched: virtual memory only).
    let filler = layout(4 * MIB + PAGE_SIZE);
    let mut blocks = Vec::new();
    while let Some(p) = heap.alloc(filler) {
        blocks.push(p);
        assert!(blocks.len() <= 100_000, "the huge table never filled");
    }
    // One entry free, for the block to remap: then the table is full.
    // SAFETY: a live allocation of this heap, owned here.
    unsafe { heap.free(blocks.pop().unwrap()) };
    let mut x = heap.alloc(layout(SMALL)).unwrap();
    assert!(heap.alloc(layout(SMALL)).is_none(), "the table is full");
    // The first page and the last page of the block at its smaller size:
    // both lie inside the block at either size.
    mark(x, 0, 0xA5);
    mark(x, SMALL - PAGE_SIZE, 0x5A);

    let stop = AtomicBool::new(false);
    let grabbed = AtomicUsize::new(0);
    let mut remaps = 0usize;
    let mut size = SMALL;
    std::thread::scope(|s| {
        // Another thread's huge allocations: they fail while the table is
        // full, and would succeed in any entry a remap let go.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = heap.alloc(layout(SMALL)) {
                    grabbed.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: just allocated by this thread.
                    unsafe { heap.free(p) };
                }
            }
        });
        let _stop = StopOnDrop(&stop);
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            let want = if size == SMALL { LARGE } else { SMALL };
            // SAFETY: `x` is a live allocation of this heap, owned here;
            // after `Some` only the result is used.
            if let Some(q) = unsafe { heap.remap_huge(x, want) } {
                x = q;
                size = want;
                remaps += 1;
                if size == LARGE {
                    // The grown tail is mapped and writable.
                    mark(x, size - PAGE_SIZE, 0x3C);
                    assert!(marked(x, size - PAGE_SIZE, 0x3C));
                }
            }
            assert!(marked(x, 0, 0xA5), "first page lost after {remaps} remaps");
            assert!(
                marked(x, SMALL - PAGE_SIZE, 0x5A),
                "last page lost after {remaps} remaps"
            );
        }
    });

    assert!(remaps > 0, "no remap succeeded");
    assert_eq!(heap.usable_size(x), size);
    assert_eq!(
        grabbed.load(Ordering::Relaxed),
        0,
        "another thread allocated in the remapped block's entry"
    );
    assert!(
        heap.alloc(layout(SMALL)).is_none(),
        "the table is still full"
    );
    let stats = heap.stats();
    assert_eq!(stats.huge_bytes, blocks.len() * filler.size() + size);
    // SAFETY: live allocations of this heap, owned here.
    unsafe {
        heap.free(x);
        for p in blocks {
            heap.free(p);
        }
    }
    assert_eq!(heap.stats().huge_bytes, 0);
}
