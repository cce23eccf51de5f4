//! `Heap::maintain` and the maintenance thread count epochs on one clock.
//!
//! A free block goes back to the OS once it has stayed free for some
//! epochs: the zone stamps it with the current epoch when it is freed, and
//! a pass releases the blocks whose stamp is old enough. `maintain()`
//! counted its calls and the thread the time since it started, and each
//! pass set the zone's epoch from its own clock: so a block freed after one
//! clock's pass was judged by the other's, and went back late (stamped
//! by the calls' count, ahead of the thread's time) or never by the calls
//! (stamped by the thread's time, ahead of the calls' count).

use std::alloc::Layout;
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

/// A block the passes release (at least 256 KiB).
const BLOCK: usize = 1 << 20;

/// Waits (up to a watchdog's limit, not a timing requirement: it takes a
/// fraction of a second) until the maintenance thread has made `n` passes.
fn wait_for_passes(heap: &Heap, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while heap.stats().maintenance_passes < n {
        assert!(
            Instant::now() < deadline,
            "the maintenance thread made no passes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After the thread has run a while (its clock ahead of the calls'), a
/// block freed and then left alone for three `maintain()` calls goes back
/// (the rustdoc: "memory idle for two calls goes back").
#[test]
fn calls_after_the_thread_release_what_they_saw_idle() {
    let heap = Heap::new(Config::default().memory(64 << 20)).unwrap();
    assert!(heap.start_maintenance());
    // About 2 s of the thread's time: its epoch is about 20.
    wait_for_passes(&heap, 40);
    let layout = Layout::from_size_align(BLOCK, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    heap.drain();
    let before = heap.stats().released_to_os_bytes;
    for _ in 0..3 {
        heap.maintain();
    }
    let released = heap.stats().released_to_os_bytes - before;
    assert!(
        released >= BLOCK as u64,
        "three maintain() calls after the free released {released} bytes, not the idle block"
    );
}

/// After many `maintain()` calls (their count ahead of the thread's
/// clock), a block freed goes back within the thread's usual idle time,
/// not after as many epochs of the thread as there were calls.
#[test]
fn the_thread_after_many_calls_releases_in_its_usual_time() {
    const CALLS: usize = 20_000;
    let heap = Heap::new(Config::default().memory(64 << 20)).unwrap();
    assert!(heap.start_maintenance());
    let layout = Layout::from_size_align(BLOCK, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    for _ in 0..CALLS {
        heap.maintain();
    }
    let before = heap.stats().released_to_os_bytes;
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    heap.drain();
    // The thread releases an idle block after about half a second; 20,000
    // of its epochs are more than half an hour. A minute is a watchdog.
    let deadline = Instant::now() + Duration::from_secs(60);
    while heap.stats().released_to_os_bytes - before < BLOCK as u64 {
        assert!(
            Instant::now() < deadline,
            "the block freed after {CALLS} maintain() calls did not go back in a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
