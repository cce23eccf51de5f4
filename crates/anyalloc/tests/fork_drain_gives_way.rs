//! An explicit drain that another thread's `fork` is waiting for gives
//! way instead of waiting for that fork.
//!
//! glibc's `fork` takes locks of its own (stdio's list lock, malloc's
//! arenas) after every prepare handler, so after the heap's, which holds
//! the heap's locks. A signal handler that interrupted the holder of one of
//! them and called `Heap::drain` waited for the heap's maintenance lock,
//! held by the fork, while the fork waited for the handler's thread: a
//! deadlock (`global_all_at_once` hung so once: a thread inside glibc's
//! `calloc`, interrupted by a handler whose drain waited, and a fork on
//! another thread).
//!
//! Here a prepare handler of the test's own stands for that lock of
//! glibc's. It is registered before the crate's (at an earlier init
//! priority than the crate's start-up constructor), so it runs after the
//! crate's prepare, with the heap's locks held, and it holds the fork until
//! the main thread's drain has returned. The drain must give way (after
//! the crate's patience, a second) and the fork then end. Before, the
//! drain waited for ever and the watchdog ended the child.
//!
//! Runs in a child process under a watchdog.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

/// The next fork's prepare handler holds the fork (set by the test).
static ARMED: AtomicBool = AtomicBool::new(false);
/// The prepare handler runs: the fork holds the heap's locks.
static HELD: AtomicBool = AtomicBool::new(false);
/// The main thread's drain has returned.
static DRAINED: AtomicBool = AtomicBool::new(false);
/// The prepare handler stopped holding the fork before the drain returned.
static GAVE_UP: AtomicBool = AtomicBool::new(false);

/// Runs after the crate's prepare handler (registered before it): as
/// glibc's `fork` waiting for its lock, it waits for the drain to return,
/// at most 20 s (then it notes that it gave up, and the fork goes on).
extern "C" fn prepare() {
    if !ARMED.swap(false, SeqCst) {
        return;
    }
    HELD.store(true, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !DRAINED.load(SeqCst) {
        if Instant::now() >= deadline {
            GAVE_UP.store(true, SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

extern "C" fn register_prepare() {
    // SAFETY: `prepare` is an `extern "C"` function of the main program,
    // which is never unloaded.
    unsafe { libc::pthread_atfork(Some(prepare), None, None) };
}

/// Before the crate's start-up constructor (`.init_array`, no priority):
/// prepare handlers run in the reverse order of registration.
#[used]
#[link_section = ".init_array.00099"]
static REGISTER_PREPARE: extern "C" fn() = register_prepare;

#[test]
fn a_drain_that_a_fork_waits_for_gives_way() {
    if watchdog::ran_in_child(
        "a_drain_that_a_fork_waits_for_gives_way",
        Duration::from_secs(60),
        "a drain that a fork waits for gives way",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    let layout = Layout::from_size_align(64, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    ARMED.store(true, SeqCst);
    let forker = std::thread::spawn(|| {
        // SAFETY: the child only `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: no preconditions.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: our child; `status` is ours to write.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !HELD.load(SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        HELD.load(SeqCst),
        "the fork never reached the test's prepare"
    );
    // The fork holds the heap's locks and waits for this thread.
    let start = Instant::now();
    heap.drain();
    println!("the drain returned after {:?}", start.elapsed());
    assert!(
        !GAVE_UP.load(SeqCst),
        "the drain waited for the fork that waited for it (until the test's prepare gave up)"
    );
    DRAINED.store(true, SeqCst);
    let status = forker.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the fork's child failed: status {status}"
    );
    // The fork over, a drain does its work.
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(
        s.pages.buddy_pages, s.pages.total_pages,
        "the drain did not"
    );
}
