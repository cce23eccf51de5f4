//! The inline decay (`Config::decay`) where the kernel refuses to take
//! memory back: a free block whose pages are locked (`mlock`, as a
//! real-time program's `mlockall` locks the whole heap) makes `madvise`
//! fail with `EINVAL`.
//!
//! The pass runs inside an ordinary allocation or free of the program's
//! (for the C library, a `malloc`), so:
//! * the failed `madvise` must leave the thread's `errno` alone: an
//!   allocation that succeeds does not change it (`errno_kept.rs`), and C
//!   code relies on that;
//! * the bytes it did not give back are not counted as given back
//!   (`released_to_os_bytes`).
//!
//! Before the fix, the call that ran the pass returned with `errno` set to
//! `EINVAL`, and `released_to_os_bytes` counted the locked block.
//!
//! No duration is asserted: the calls go on until enough passes have run
//! that the locked block was certainly taken up (its idle age is five
//! epochs, and each pass advances the epoch by one at least).

#![cfg(target_os = "linux")]

use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn errno() -> i32 {
    // SAFETY: libc's accessor returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
}

/// A block of `bytes`, every page touched.
fn touched(heap: &Heap, bytes: usize) -> std::ptr::NonNull<u8> {
    let p = heap
        .alloc(Layout::from_size_align(bytes, 8).unwrap())
        .expect("memory to spare");
    // SAFETY: a live block of `bytes` bytes, ours.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5a, bytes) };
    p
}

#[test]
fn a_pass_whose_madvise_is_refused_keeps_errno_and_counts_nothing() {
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    // The locked block: 1 MiB (order 8), from the zone's first 4 MiB.
    let locked = touched(&heap, MIB);
    // SAFETY: the block's own pages, mapped and ours.
    let r = unsafe { libc::mlock(locked.as_ptr().cast(), MIB) };
    assert_eq!(r, 0, "mlock of 1 MiB: {}", std::io::Error::last_os_error());
    // The control block: 4 MiB (order 10, the next untouched 4 MiB), which
    // goes back to the OS normally, so the passes are seen to release.
    let control = touched(&heap, 4 * MIB);
    // SAFETY: allocated above, freed once each; the locked one first (the
    // older of the two free blocks of order 10 it merges into).
    unsafe {
        heap.free(locked);
        heap.free(control);
    }
    // More slow-path calls, each checked: blocks above 4 MiB (a mapping of
    // their own: they leave the zone alone), allocated and freed.
    let huge = Layout::from_size_align(5 * MIB, 8).unwrap();
    const SENTINEL: i32 = 4242;
    let start = Instant::now();
    let mut calls = 0u64;
    while heap.stats().maintenance_passes < 8 && start.elapsed() < Duration::from_secs(60) {
        set_errno(SENTINEL);
        let p = heap.alloc(huge).expect("a mapping");
        assert_eq!(errno(), SENTINEL, "an allocation that succeeded set errno");
        // SAFETY: allocated just above, freed once.
        unsafe { heap.free(p) };
        assert_eq!(errno(), SENTINEL, "a free set errno");
        calls += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = heap.stats();
    // SAFETY: the range locked above (munlock of free memory is harmless).
    unsafe { libc::munlock(locked.as_ptr().cast(), MIB) };
    println!(
        "{calls} calls, {} passes, {} bytes released",
        s.maintenance_passes, s.released_to_os_bytes
    );
    assert!(s.maintenance_passes >= 8, "the calls ran passes");
    // The control block's 4 MiB went back; the locked one's 1 MiB (the
    // only touched part of its block) did not.
    assert_eq!(
        s.released_to_os_bytes,
        4 * MIB as u64,
        "released: the control block only"
    );
}
