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

mod late_prepare;
mod watchdog;

use std::alloc::Layout;
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

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
    late_prepare::arm();
    let forker = std::thread::spawn(late_prepare::fork_and_wait);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !late_prepare::held() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        late_prepare::held(),
        "the fork never reached the test's prepare"
    );
    // The fork holds the heap's locks and waits for this thread.
    let start = Instant::now();
    heap.drain();
    println!("the drain returned after {:?}", start.elapsed());
    assert!(
        !late_prepare::gave_up(),
        "the drain waited for the fork that waited for it (until the test's prepare gave up)"
    );
    late_prepare::release();
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
