//! A `fork` whose child inherits the global heap half made, by a creation
//! that another thread began after the fork's prepare handler looked for
//! it, must not wait for that creation when the child forks in turn.
//!
//! The prepare handler waits for a creation in progress before it looks
//! for the global heap, then takes every heap's locks. A creation that
//! another thread begins after that look (here: while prepare waits for
//! heap A's zone lock) is cloned half made, `INITIALIZING` by a thread
//! that the child does not have. The child is not orphaned (its fork's
//! prepare took every lock), so its own fork's prepare waits for a
//! creation in progress: it must see that this one runs in another
//! process (`global::creator_gone`) and go on, leaving the creation to
//! the child's first normal call, which takes it over. Before that check,
//! the child's fork waited for ever (1 of 1 with the check reverted: the
//! watchdog killed it).
//!
//! Thread H holds A's zone lock (paused at `Site::ZoneAlloc`); the main
//! thread forks, and its prepare waits for that lock. Once `/proc` shows
//! it asleep there, thread S starts thread T's `anyalloc::init`, which
//! parks in `getenv` (this binary's own, as in `fork_global_creation`),
//! then lets H go on. The child forks (its own child only exits), then
//! calls `init` and allocates, under a watchdog.

mod handler_fork;
mod parked_creation;
mod watchdog;
mod zone_holder;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

thread_local! {
    /// H: pauses at `Site::ZoneAlloc` with A's zone lock held.
    static HOLDER: Cell<bool> = const { Cell::new(false) };
}

/// H holds A's zone lock.
static HOLDING: AtomicBool = AtomicBool::new(false);
/// H may go on.
static GO_ON: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    if site == Site::ZoneAlloc && HOLDER.get() && !HOLDING.load(SeqCst) {
        HOLDING.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !GO_ON.load(SeqCst) && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}

/// The child's part: a fork (whose prepare must not wait for the
/// creation of the parent's T), then `init` and an allocation. Returns
/// the exit code.
fn child_work() -> i32 {
    // SAFETY: the grandchild only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    if pid < 0
        || !watchdog::wait_child(pid, Duration::from_secs(20)).is_some_and(watchdog::exited_ok)
    {
        handler_fork::say("child: its own fork failed\n");
        return 1;
    }
    parked_creation::disarm();
    if !parked_creation::init_and_allocate() {
        handler_fork::say("child: no heap, or no allocation\n");
        return 2;
    }
    0
}

#[test]
fn a_fork_in_the_child_of_a_fork_that_cloned_a_late_creation() {
    if watchdog::ran_in_child(
        "a_fork_in_the_child_of_a_fork_that_cloned_a_late_creation",
        Duration::from_secs(60),
        "a fork in a child that inherited a global heap being made by its parent's thread",
    ) {
        return;
    }
    assert!(anyalloc::global_heap().is_none(), "no heap before the test");
    let a = Heap::new(Config::default().memory(16 << 20).maintenance(false)).expect("heap");
    set_hook(Some(hook));
    // SAFETY: gettid has no preconditions.
    let main_tid = unsafe { libc::gettid() };
    parked_creation::arm(Duration::from_secs(20));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            HOLDER.set(true);
            zone_holder::allocate_under_the_zone_lock(a.pages(), 6);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !HOLDING.load(SeqCst) && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(HOLDING.load(SeqCst), "H did not pause with A's zone lock");
        // S: once the main thread's prepare waits for A's zone lock (its
        // only futex wait there), T's creation begins and parks; then H
        // goes on, and so does the prepare, which looked for the heap
        // before T began.
        let signaller = s.spawn(move || {
            handler_fork::wait_until_in_futex(main_tid, "the main thread's prepare did not wait");
            let t = std::thread::spawn(|| anyalloc::init().is_ok());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !parked_creation::parked() && Instant::now() < deadline {
                std::thread::yield_now();
            }
            assert!(parked_creation::parked(), "T's creation did not park");
            GO_ON.store(true, SeqCst);
            t
        });
        // SAFETY: the child runs `child_work` and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            set_hook(None);
            let code = child_work();
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(30));
        let t = signaller.join().unwrap();
        parked_creation::release();
        h.join().unwrap();
        assert!(t.join().unwrap(), "the heap was created in the parent");
        let status =
            status.expect("the child hung: its fork waited for a creator it does not have");
        assert!(
            watchdog::exited_ok(status),
            "the child failed (status {status:#x})"
        );
    });
    set_hook(None);
}
