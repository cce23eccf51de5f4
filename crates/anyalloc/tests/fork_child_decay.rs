//! A forked child of a heap that runs a maintenance thread: the thread
//! stayed in the parent, so the child's own calls give its idle memory back
//! (the inline decay, `Config::decay`). Before, such a child gave nothing
//! back until it called `trim` (or `forget_maintainer_after_fork`): a
//! pre-forked worker kept every burst it freed resident for good.
//!
//! Nothing here asserts a duration: the child loops (up to a generous
//! limit) until the memory went back.

mod watchdog;

use std::alloc::Layout;
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

const BLOCK: usize = 300_000;

/// In the forked child: a 64 MB burst of 300 KB blocks, freed, then normal
/// calls until three quarters of it went back to the OS. Exit status 0 when
/// it did, 1 when not even a pass ran, 2 when passes gave too little back.
fn child(heap: &Heap) -> i32 {
    let l = Layout::from_size_align(BLOCK, 8).unwrap();
    let burst: Vec<_> = (0..(64 << 20) / BLOCK)
        .map(|i| {
            let p = heap.alloc(l).expect("memory to spare");
            // SAFETY: a live block of BLOCK bytes, ours.
            unsafe { std::ptr::write_bytes(p.as_ptr(), i as u8 | 1, BLOCK) };
            p
        })
        .collect();
    for p in burst {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    let enough = (48u64) << 20;
    let start = Instant::now();
    while heap.stats().released_to_os_bytes < enough && start.elapsed() < Duration::from_secs(30) {
        let p = heap.alloc(l).expect("memory to spare");
        // SAFETY: a live block of BLOCK bytes, ours, freed once.
        unsafe {
            std::ptr::write_bytes(p.as_ptr(), 7, 4096);
            heap.free(p);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = heap.stats();
    eprintln!(
        "child: {} passes, {} MiB released",
        s.maintenance_passes,
        s.released_to_os_bytes >> 20
    );
    if s.maintenance_passes == 0 {
        1
    } else if s.released_to_os_bytes < enough {
        2
    } else {
        0
    }
}

#[test]
fn a_forked_child_gives_idle_memory_back_from_its_own_calls() {
    if watchdog::ran_in_child(
        "a_forked_child_gives_idle_memory_back_from_its_own_calls",
        Duration::from_secs(120),
        "a forked child of a heap with a maintenance thread",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(256 << 20)).unwrap();
    assert!(
        heap.start_maintenance(),
        "the heap runs a maintenance thread"
    );
    // SAFETY: fork has no preconditions; the child only uses the heap (whose
    // fork handlers ran) and exits without unwinding.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = child(&heap);
        // SAFETY: ends the child at once, without the parent's test harness.
        unsafe { libc::_exit(code) };
    }
    let status = watchdog::wait_child(pid, Duration::from_secs(90)).expect("the child finished");
    assert!(
        watchdog::exited_ok(status),
        "the child's idle memory did not go back (status {status:#x}: exit 1 no pass ran, 2 too little released)"
    );
}
