//! A signal handler that forks while its thread drops a `Heap` and waits
//! for the heap's maintenance thread to end: the child, which goes on once
//! the handler returns, must finish the drop.
//!
//! The drop joins the maintenance thread. Cloned in that wait, the child
//! has no such thread, and glibc's `pthread_join` there returns at once (the
//! child's copy of the thread's descriptor reads as ended); std's
//! `JoinHandle::join` then found no result from the thread and panicked
//! ("threads should not terminate unexpectedly"), in the middle of the
//! heap's drop (1 of 1 before the fix; found by a storm of forking
//! handlers whose children went on). Here the maintenance thread is held
//! in a shrinker (the heap is full, so its pass runs them) while the main
//! thread drops the heap, and another thread signals the main thread once
//! it waits; the handler forks. The child must come out of the drop and
//! exit 0 under a watchdog.

mod handler_fork;
mod watchdog;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

/// The maintenance thread is inside the shrinker.
static IN_SHRINKER: AtomicBool = AtomicBool::new(false);
/// The shrinker may return.
static RELEASE: AtomicBool = AtomicBool::new(false);

#[test]
fn a_handler_forks_while_a_heap_drop_joins_its_maintainer() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_a_heap_drop_joins_its_maintainer",
        Duration::from_secs(60),
        "a fork in a handler while a heap's drop joins its maintenance thread",
    ) {
        return;
    }
    handler_fork::install();
    let heap = Heap::new(Config::default().memory(4 << 20).grow(false)).expect("heap");
    heap.register_shrinker(|_| {
        if std::thread::current().name() == Some("anyalloc-maintainer") {
            IN_SHRINKER.store(true, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !RELEASE.load(SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        0
    });
    // Full: the maintenance thread's next pass runs the shrinkers (the
    // blocks go with the heap).
    while heap.pages().alloc_pages(0).is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while !IN_SHRINKER.load(SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        IN_SHRINKER.load(SeqCst),
        "the maintenance thread ran no shrinker"
    );
    // SAFETY: gettid and pthread_self have no preconditions.
    let (main_tid, main) = unsafe { (libc::gettid(), libc::pthread_self() as usize) };
    let dropping = AtomicBool::new(false);
    let status = std::thread::scope(|s| {
        let signaller = s.spawn(|| {
            while !dropping.load(SeqCst) {
                std::thread::yield_now();
            }
            // The drop's only futex wait: the join.
            handler_fork::wait_until_in_futex(main_tid, "the drop did not wait for the thread");
            let status = handler_fork::signal_and_reap(main);
            RELEASE.store(true, SeqCst);
            status
        });
        dropping.store(true, SeqCst);
        let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| drop(heap)));
        if handler_fork::in_child() {
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if dropped.is_ok() { 0 } else { 1 }) };
        }
        assert!(dropped.is_ok(), "the drop panicked in the parent");
        signaller.join().unwrap()
    });
    // (A child that failed did not finish the heap's drop.)
    handler_fork::assert_child_ok(status);
}
