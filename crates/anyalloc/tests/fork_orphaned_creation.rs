//! A signal handler's fork (which takes nothing: its thread is inside the
//! allocator) while another thread creates the global heap: its child,
//! which goes on once the handler returns, must find or make the heap,
//! never wait for a creator that is not there.
//!
//! The fork handler's prepare waits for a creation in progress before it
//! clones, but a prepare that takes nothing (called by a signal handler
//! that interrupted the allocator) does not, and its child inherited the
//! heap "being made" (`INITIALIZING`) by a thread of the parent: its first
//! `init` (or normal-path allocation through `Global`) waited for ever
//! (hung, 1 of 1 before the fix). Now the creation records the process
//! it runs in, and a caller in another process takes the creation over.
//!
//! This binary's allocator is the system's, so the global heap is made by
//! the first `anyalloc::init`, on thread T, which parks in `getenv` (this
//! binary's own, as in `fork_global_creation`) until the child is checked.
//! The main thread, inside heap B's zone lock (its interrupt hook at
//! `Site::ZoneAlloc`), raises a signal whose handler forks; the child
//! calls `init`, allocates and frees, under a watchdog.

mod handler_fork;
mod parked_creation;
mod watchdog;
mod zone_holder;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The main thread raises the signal at its next `Site::ZoneAlloc`.
static RAISE: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    if site == Site::ZoneAlloc && RAISE.swap(false, SeqCst) {
        handler_fork::raise();
    }
}

#[test]
fn a_handler_forks_while_another_thread_creates_the_global_heap() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_another_thread_creates_the_global_heap",
        Duration::from_secs(60),
        "a fork in a handler while another thread creates the global heap",
    ) {
        return;
    }
    assert!(anyalloc::global_heap().is_none(), "no heap before the test");
    let b = Heap::new(Config::default().memory(16 << 20).maintenance(false)).expect("heap");
    handler_fork::install();
    parked_creation::arm(Duration::from_secs(20));
    let t = std::thread::spawn(|| anyalloc::init().is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !parked_creation::parked() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(parked_creation::parked(), "T's creation did not park");
    set_hook(Some(hook));
    RAISE.store(true, SeqCst);
    zone_holder::allocate_under_the_zone_lock(b.pages(), 6);
    if handler_fork::in_child() {
        set_hook(None);
        parked_creation::disarm();
        let ok = parked_creation::init_and_allocate();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    set_hook(None);
    let pid = handler_fork::child();
    assert!(pid > 0, "the handler did not fork");
    let status = watchdog::wait_child(pid, Duration::from_secs(20));
    parked_creation::release();
    assert!(t.join().unwrap(), "the heap was created in the parent");
    let status = status.expect("the child hung: it waited for a creator it does not have");
    assert!(
        watchdog::exited_ok(status),
        "the child failed (status {status:#x})"
    );
}
