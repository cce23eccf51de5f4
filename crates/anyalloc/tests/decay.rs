//! The inline decay (`Config::decay`): a heap that no maintenance thread
//! serves gives idle memory back to the OS from its own normal-path slow
//! calls, and never from the nolock path.
//!
//! Nothing here asserts a duration: a wait loops (with a generous limit)
//! until the memory has gone back, and the checks that nothing went back
//! hold however long the calls took.

mod proc_self;

use anyalloc::{Config, Heap};
use proc_self::rss_bytes;
use std::alloc::Layout;
use std::time::{Duration, Instant};

const BLOCK: usize = 300_000;

fn layout() -> Layout {
    Layout::from_size_align(BLOCK, 8).unwrap()
}

/// Allocates `bytes` in 300 KB blocks, each touched (resident), through
/// `alloc`.
fn fill(heap: &Heap, bytes: usize, nolock: bool) -> Vec<std::ptr::NonNull<u8>> {
    (0..bytes / BLOCK)
        .map(|i| {
            let p = if nolock {
                heap.alloc_nolock(layout())
            } else {
                heap.alloc(layout())
            }
            .expect("memory to spare");
            // SAFETY: a live block of BLOCK bytes, ours.
            unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8 | 1, BLOCK) };
            p
        })
        .collect()
}

/// One more call of a program that goes on working: a 300 KB block
/// allocated, touched and freed (normal path: a page block beyond the
/// per-CPU lists, a slow path each way), then a millisecond's pause.
fn one_more_call(heap: &Heap) {
    let p = heap.alloc(layout()).expect("memory to spare");
    // SAFETY: a live block of BLOCK bytes, ours, freed once.
    unsafe {
        std::ptr::write_bytes(p.as_ptr(), 7, 4096);
        heap.free(p);
    }
    std::thread::sleep(Duration::from_millis(1));
}

/// 200 MB of 300 KB blocks filled and freed with no maintenance thread:
/// the heap's own later calls give the memory back (the resident set and
/// the heap's count of bytes released both show it). Before the inline
/// decay, the resident set stayed at its peak for good.
#[test]
fn idle_memory_goes_back_without_a_maintainer() {
    let heap = Heap::new(Config::default().memory(512 << 20).maintenance(false)).unwrap();
    const BURST: usize = 200 << 20;
    let blocks = fill(&heap, BURST, false);
    let peak = rss_bytes();
    for p in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    let start = Instant::now();
    let mut calls = 0u64;
    let gone = |heap: &Heap| {
        heap.stats().released_to_os_bytes >= (BURST as u64) * 3 / 4
            && rss_bytes() + BURST * 3 / 4 <= peak
    };
    while !gone(&heap) && start.elapsed() < Duration::from_secs(60) {
        one_more_call(&heap);
        calls += 1;
    }
    let s = heap.stats();
    println!(
        "peak {} MiB, now {} MiB after {calls} more calls ({:?}); released {} MiB in {} passes",
        peak >> 20,
        rss_bytes() >> 20,
        start.elapsed(),
        s.released_to_os_bytes >> 20,
        s.maintenance_passes
    );
    assert!(
        gone(&heap),
        "no maintenance thread, {calls} more calls: 3/4 of the 200 MB burst went back to the OS \
         (released {} MiB, RSS {} MiB from a peak of {} MiB)",
        s.released_to_os_bytes >> 20,
        rss_bytes() >> 20,
        peak >> 20
    );
    assert!(s.maintenance_passes > 0, "the calls ran passes");
    // The memory given back is usable again.
    let again = fill(&heap, 32 << 20, false);
    for p in again {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
}

/// The calls must keep going past the idle age (half a second) for
/// anything to go back: at least this long, and this many calls.
fn calls_for_a_while(heap: &Heap, nolock: bool) -> u64 {
    let start = Instant::now();
    let mut calls = 0;
    while calls < 500 || start.elapsed() < Duration::from_millis(1500) {
        if nolock {
            let p = heap.alloc_nolock(layout()).expect("memory to spare");
            // SAFETY: allocated above, freed once.
            unsafe { heap.free_nolock(p) };
            std::thread::sleep(Duration::from_millis(1));
        } else {
            one_more_call(heap);
        }
        calls += 1;
    }
    calls
}

/// `Config::decay(false)`: the same calls give nothing back.
#[test]
fn decay_off_gives_nothing_back() {
    let heap = Heap::new(
        Config::default()
            .memory(128 << 20)
            .maintenance(false)
            .decay(false),
    )
    .unwrap();
    for p in fill(&heap, 32 << 20, false) {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    let calls = calls_for_a_while(&heap, false);
    let s = heap.stats();
    assert_eq!(
        (s.released_to_os_bytes, s.maintenance_passes),
        (0, 0),
        "decay off: nothing went back, and no pass ran, in {calls} calls"
    );
}

/// Calls on the nolock path (`alloc_nolock` / `free_nolock`) never run a
/// pass; the same memory goes back once normal-path calls follow. (Calls
/// routed to the nolock path, as a signal handler's that interrupted the
/// allocator: `decay_routed.rs`.)
#[test]
fn the_nolock_path_never_gives_back() {
    let heap = Heap::new(Config::default().memory(128 << 20).maintenance(false)).unwrap();
    for p in fill(&heap, 32 << 20, true) {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free_nolock(p) };
    }
    let calls = calls_for_a_while(&heap, true);
    let s = heap.stats();
    assert_eq!(
        (s.released_to_os_bytes, s.maintenance_passes),
        (0, 0),
        "{calls} nolock calls: no pass ran"
    );
    // Then the normal path gives it back.
    let start = Instant::now();
    while heap.stats().released_to_os_bytes < 16 << 20 && start.elapsed() < Duration::from_secs(60)
    {
        one_more_call(&heap);
    }
    assert!(
        heap.stats().released_to_os_bytes >= 16 << 20,
        "normal calls gave the idle memory back ({} bytes)",
        heap.stats().released_to_os_bytes
    );
}

/// Huge blocks (above 4 MiB) freed on the normal path stay mapped for
/// reuse (`HeapStats::huge_cached_bytes`, resident); with no maintenance
/// thread, the heap's later calls unmap them once they stayed unused. (Before
/// the decay pass took them, 16 MiB stayed cached and resident for good.)
#[test]
fn kept_huge_mappings_go_back_without_a_maintainer() {
    let heap = Heap::new(Config::default().memory(128 << 20).maintenance(false)).unwrap();
    let l = Layout::from_size_align(16 << 20, 8).unwrap();
    let p = heap.alloc(l).expect("a huge block");
    // SAFETY: a live block of 16 MiB, ours, freed once.
    unsafe {
        std::ptr::write_bytes(p.as_ptr(), 1, 16 << 20);
        heap.free(p);
    }
    assert_eq!(heap.stats().huge_cached_bytes, 16 << 20, "kept for reuse");
    let start = Instant::now();
    let mut calls = 0u64;
    while heap.stats().huge_cached_bytes != 0 && start.elapsed() < Duration::from_secs(60) {
        one_more_call(&heap);
        calls += 1;
    }
    let s = heap.stats();
    assert_eq!(
        (s.huge_cached_bytes, s.huge_in_use),
        (0, 0),
        "{calls} more calls and {} passes: the kept mapping was unmapped",
        s.maintenance_passes
    );
}
