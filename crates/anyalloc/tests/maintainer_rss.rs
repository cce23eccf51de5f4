//! The maintenance thread returns idle memory to the OS: RSS falls after a
//! large burst is freed.

mod proc_self;

use anyalloc::{Config, Heap};
use proc_self::rss_bytes;
use std::alloc::Layout;
use std::time::{Duration, Instant};

#[test]
fn rss_falls_after_a_256_mib_burst_is_freed() {
    let heap = Heap::new(Config::default().memory(512 << 20)).unwrap();
    let before = rss_bytes();
    let layout = Layout::from_size_align(64 << 10, 8).unwrap();
    let blocks: Vec<_> = (0..4096)
        .map(|i| {
            let p = heap.alloc(layout).unwrap();
            // Touch every page so the burst is resident.
            // SAFETY: the block is a live allocation of at least that many bytes, owned by this test.
            unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8, 64 << 10) };
            p
        })
        .collect();
    let peak = rss_bytes();
    assert!(
        peak >= before + (240 << 20),
        "the burst is resident: {before} -> {peak}"
    );
    for p in blocks {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { heap.free(p) };
    }
    let freed_at = Instant::now();
    let burst = peak - before;
    let mut back = None;
    while freed_at.elapsed() < Duration::from_secs(10) {
        let now = rss_bytes();
        if peak - now.min(peak) >= burst * 3 / 4 {
            back = Some((freed_at.elapsed(), now));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (took, after) = back.expect("most of the burst went back to the OS");
    println!(
        "RSS before {} MiB, peak {} MiB, after {} MiB; 75% back after {took:?}; released {} MiB",
        before >> 20,
        peak >> 20,
        after >> 20,
        heap.stats().released_to_os_bytes >> 20
    );
    // The memory is still usable afterwards (reads as zero, then written).
    let p = heap.alloc(layout).unwrap();
    // SAFETY: the block is a live allocation of at least that many bytes, owned by this test.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 1, 64 << 10) };
    unsafe { heap.free(p) };
}
