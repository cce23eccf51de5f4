//! `fork` while another thread holds a private heap's lock: the child must
//! be able to use every heap it inherited.
//!
//! A forked child has only the forking thread. A lock that another thread
//! held at the fork stays held in the child forever, so a heap whose locks
//! are not taken across the fork deadlocks the child's first allocation
//! that needs one (glibc's malloc takes all its arenas' locks for the same
//! reason). The global heap's locks always were; a heap made with
//! `Heap::new` now is too.
//!
//! Deterministic, with an interrupt point: a thread allocating 256 KiB
//! blocks (a zone-locked allocation) from a private heap pauses inside the
//! zone section (`Site::ZoneAlloc`) until the main thread has forked, or
//! for 50 ms. Without the heap's locks taken across the fork, the fork
//! happens during the pause and the child's own 256 KiB allocation waits
//! for ever for the paused thread's lock. With them, the fork waits for the
//! lock (the pause ends after 50 ms) and the child allocates. A child that
//! has not exited after 5 s is counted as hung; the scenario also runs
//! under a watchdog.

mod fork_pause;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

const ROUNDS: usize = 10;
const BLOCK: usize = 256 << 10;

fn block() -> Layout {
    Layout::from_size_align(BLOCK, 8).unwrap()
}

#[test]
fn fork_while_another_thread_holds_a_private_heaps_lock() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_holds_a_private_heaps_lock",
        Duration::from_secs(120),
        "fork while another thread holds a private heap's lock",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20)).expect("heap");
    let stop = AtomicBool::new(false);
    let mut forks = None;
    std::thread::scope(|s| {
        s.spawn(|| {
            fork_pause::become_pauser();
            while !stop.load(SeqCst) {
                let p = heap.alloc(block()).expect("a 256 KiB block");
                // SAFETY: allocated just above from this heap, freed once.
                unsafe { heap.free(p) };
            }
        });
        // Each child allocates from the heap (whose fork handling is under
        // test).
        forks = Some(fork_pause::fork_during_pauses(
            Site::ZoneAlloc,
            ROUNDS,
            || heap.alloc(block()).is_some(),
        ));
        stop.store(true, SeqCst);
    });
    let forks = forks.expect("the forks ran");
    println!(
        "{} forks during a zone section of another thread: {} children hung, {} failed",
        forks.paused, forks.hung, forks.failed
    );
    assert_eq!(
        forks.hung, 0,
        "a forked child hung on a lock of a private heap"
    );
    assert_eq!(forks.failed, 0, "a forked child could not allocate");
}

/// A heap whose maintenance thread stayed in the parent can be dropped in
/// the child without `forget_maintainer_after_fork`: there is no thread to
/// join there (joining its handle reported the thread dead: a panic inside
/// `drop`, and an abort).
#[test]
fn a_child_drops_a_heap_whose_maintainer_stayed_in_the_parent() {
    let heap = Heap::new(Config::default().memory(16 << 20)).expect("heap");
    let p = heap.alloc(block()).expect("a block");
    // SAFETY: the child frees a block it inherited, drops the heap and
    // _exits; it starts no thread.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: allocated from this heap above, freed once (in this
        // process).
        unsafe { heap.free(p) };
        // A panic must not unwind into the test harness's copy here.
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(heap)));
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if dropped.is_ok() { 0 } else { 1 }) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
    assert!(
        watchdog::exited_ok(status),
        "the child could not drop the heap: status {status:#x}"
    );
    // SAFETY: allocated above, freed once in this process.
    unsafe { heap.free(p) };
}
