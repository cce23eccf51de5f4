//! A thread that the fork does not wait for allocates many small blocks,
//! or pages, while a slow fork holds every heap lock.
//!
//! Since normal-path waiters give way to a fork, an allocation that misses
//! while a fork holds the locks waits for it only `FORK_PATIENCE`, then
//! maps its block beside the heap, registered in the heap's table of huge
//! blocks. That table is finite: a fork that takes longer than the
//! patience (page tables of a large process, other libraries' handlers),
//! with a thread allocating meanwhile, must not make its allocations fail
//! once the table is full. Nor may a page allocator's `alloc_pages`, whose
//! pages cannot be mapped beside it, fail while the fork holds its zone
//! locks. Here a prepare handler registered before
//! `Global`'s (so it runs after it, with the locks held) makes the fork
//! slow, and waits for nobody. The scenario runs in a child process under
//! a watchdog.

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::Global;

#[global_allocator]
static A: Global = Global;

/// Set by the scenario: the handler does nothing in other forks.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by the handler: the fork holds every heap lock now.
static FORK_HOLDS: AtomicBool = AtomicBool::new(false);

/// Runs after `Global`'s prepare handler: a slow fork (300 ms), waiting
/// for nobody.
extern "C" fn late_prepare() {
    if !ACTIVE.load(SeqCst) {
        return;
    }
    FORK_HOLDS.store(true, SeqCst);
    std::thread::sleep(Duration::from_millis(300));
}

extern "C" fn register_early() {
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe { libc::pthread_atfork(Some(late_prepare), None, None) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

/// More small blocks than the heap's table of huge blocks has entries.
const BLOCKS: usize = 10_000;

#[test]
fn a_slow_fork_does_not_fail_other_threads_allocations() {
    if watchdog::ran_in_child(
        "a_slow_fork_does_not_fail_other_threads_allocations",
        Duration::from_secs(60),
        "allocations during a slow fork",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    // Other threads' first, long-lived blocks (the test harness's main
    // thread sets up its waiting state once it blocks) before any fork:
    // made while a fork holds the locks, they would be mapped beside the
    // heap and stay, and the last check would count them.
    std::thread::sleep(Duration::from_millis(200));
    let settled = heap.stats().huge_in_use;
    let failed = during_a_slow_fork(move || {
        let l = Layout::from_size_align(48, 8).unwrap();
        let mut live = Vec::with_capacity(BLOCKS);
        let mut failed = 0usize;
        for _ in 0..BLOCKS {
            match heap.alloc(l) {
                Some(p) => live.push(p),
                None => failed += 1,
            }
        }
        // Whether the heap's table of huge blocks filled (reported: on a
        // slow machine the fork may end first).
        let during = heap.stats().huge_in_use > 4000;
        println!("table of huge blocks filled: {during}");
        for p in live {
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(p) };
        }
        failed
    });
    println!("{failed} of {BLOCKS} allocations failed during the slow fork");
    assert_eq!(failed, 0, "allocations failed while a fork held the locks");
    heap.drain();
    assert_eq!(heap.stats().huge_in_use, settled);
}

/// Pages allocated during the fork.
const PAGES: usize = 3000;

#[test]
fn a_slow_fork_does_not_fail_other_threads_page_allocations() {
    if watchdog::ran_in_child(
        "a_slow_fork_does_not_fail_other_threads_page_allocations",
        Duration::from_secs(60),
        "page allocations during a slow fork",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let failed = during_a_slow_fork(move || {
        let pages = heap.pages();
        let mut live = Vec::with_capacity(PAGES);
        let mut failed = 0usize;
        for _ in 0..PAGES {
            match pages.alloc_pages(0) {
                Some(p) => live.push(p),
                None => failed += 1,
            }
        }
        for p in live {
            // SAFETY: allocated above with order 0, freed once.
            unsafe { pages.free_pages(p, 0) };
        }
        failed
    });
    println!("{failed} of {PAGES} page allocations failed during the slow fork");
    assert_eq!(
        failed, 0,
        "page allocations failed while a fork held the locks"
    );
}

/// Runs `work` on another thread once a slow fork holds the heap's locks
/// (the fork's child exits at once); returns what it returned.
fn during_a_slow_fork(work: impl FnOnce() -> usize + Send + 'static) -> usize {
    FORK_HOLDS.store(false, SeqCst);
    ACTIVE.store(true, SeqCst);
    let worker = std::thread::spawn(move || {
        while !FORK_HOLDS.load(SeqCst) {
            std::thread::yield_now();
        }
        work()
    });
    // SAFETY: the child only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    ACTIVE.store(false, SeqCst);
    let result = worker.join().expect("the working thread");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
    result
}
