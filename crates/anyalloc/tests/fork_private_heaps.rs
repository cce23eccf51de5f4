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

mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const ROUNDS: usize = 10;
const BLOCK: usize = 256 << 10;

thread_local! {
    /// Set on the thread that pauses inside its zone sections.
    static PAUSER: Cell<bool> = const { Cell::new(false) };
}
/// The pauser is inside a zone section, pausing (this round).
static PAUSED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned (this round).
static FORKED: AtomicBool = AtomicBool::new(false);

fn pause_in_zone_section(site: Site) {
    if site != Site::ZoneAlloc || !PAUSER.get() || PAUSED.load(SeqCst) {
        return;
    }
    PAUSED.store(true, SeqCst);
    let until = Instant::now() + Duration::from_millis(50);
    while !FORKED.load(SeqCst) && Instant::now() < until {
        std::thread::yield_now();
    }
}

fn block() -> Layout {
    Layout::from_size_align(BLOCK, 8).unwrap()
}

#[test]
fn fork_while_another_thread_holds_a_private_heaps_lock() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_while_another_thread_holds_a_private_heaps_lock",
            &[],
            Duration::from_secs(120),
            "fork while another thread holds a private heap's lock",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20)).expect("heap");
    let stop = AtomicBool::new(false);
    let (mut hung, mut failed, mut paused) = (0, 0, 0);
    set_hook(Some(pause_in_zone_section));
    std::thread::scope(|s| {
        s.spawn(|| {
            PAUSER.set(true);
            while !stop.load(SeqCst) {
                let p = heap.alloc(block()).expect("a 256 KiB block");
                // SAFETY: allocated just above from this heap, freed once.
                unsafe { heap.free(p) };
            }
        });
        for _ in 0..ROUNDS {
            FORKED.store(false, SeqCst);
            PAUSED.store(false, SeqCst);
            while !PAUSED.load(SeqCst) {
                std::thread::yield_now();
            }
            paused += 1;
            // SAFETY: the child allocates from the heap (whose fork
            // handling is under test) and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let ok = heap.alloc(block()).is_some();
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            FORKED.store(true, SeqCst);
            assert!(pid > 0, "fork failed");
            match watchdog::wait_child(pid, Duration::from_secs(5)) {
                Some(status) if !watchdog::exited_ok(status) => failed += 1,
                Some(_) => {}
                None => {
                    hung += 1;
                    break;
                }
            }
        }
        stop.store(true, SeqCst);
    });
    set_hook(None);
    println!("{paused} forks during a zone section of another thread: {hung} children hung, {failed} failed");
    assert_eq!(hung, 0, "a forked child hung on a lock of a private heap");
    assert_eq!(failed, 0, "a forked child could not allocate");
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
