//! A trim whose thread became an orphaned child (the `fork` module's
//! "Orphaned locks") while it returned a block to the OS must not abort.
//!
//! `Heap::trim` returns each free block to the OS without the zone lock
//! (the block off every list, `RELEASING`), then takes the lock again to
//! put it back. Here the main thread is in that window (paused at
//! `Site::ReleaseWindow`) when thread H takes the zone lock (paused at
//! `Site::ZoneAlloc`, inside a normal allocation) and the main thread's
//! own hook raises a signal whose handler forks: the fork's prepare takes
//! nothing (the thread is inside the allocator), and in the child H's lock
//! stays held for good. Once the handler returned, the child's trim took
//! the lock again with a bare `lock`, which gave way after
//! `fork::ORPHAN_PATIENCE` and aborted ("a lock stayed held in the child
//! of a fork made by a signal handler...": 3 of 3 before the fix). Now the
//! block stays out of the lists in that child (what an orphaned lock
//! guards is never touched again), the trim ends, and the child goes on:
//! it allocates and frees from the heap, trims again and exits 0.

mod handler_fork;
mod watchdog;
mod zone_holder;

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// H's block (256 KiB: above the per-CPU lists, so the zone's).
const ORDER: u32 = 6;

const HOLDER: u8 = 1;
const TRIMMER: u8 = 2;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// 0: the trim has not reached its window; 1: it has (H may take the
/// lock); 2: H holds the zone lock; 3: H may go on.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// The child's exit status, as the parent's hook saw it (-1: hung).
static STATUS: AtomicI32 = AtomicI32::new(-2);

fn wait_step(at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while STEP.load(SeqCst) < at_least && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

fn hook(site: Site) {
    match (ROLE.get(), site) {
        (HOLDER, Site::ZoneAlloc) if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            wait_step(3);
        }
        (TRIMMER, Site::ReleaseWindow) if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            wait_step(2);
            handler_fork::raise();
            if handler_fork::in_child() {
                return;
            }
            // The parent: the trim takes the lock again once H is done,
            // after the child.
            let pid = handler_fork::child();
            let status = if pid > 0 {
                watchdog::wait_child(pid, Duration::from_secs(20)).unwrap_or(-1)
            } else {
                -3
            };
            STATUS.store(status, SeqCst);
            STEP.store(3, SeqCst);
        }
        _ => {}
    }
}

/// The child's life after its trim: blocks of every order from the heap
/// (served by the nolock path where the zone lock is needed), a second
/// trim, and exit status 0 if everything came back.
fn child_work(a: &Heap) -> i32 {
    let mut code = 0;
    for order in 0..=10 {
        match a.pages().alloc_pages(order) {
            // SAFETY: allocated just above with this order, freed once.
            Some(p) => unsafe { a.pages().free_pages(p, order) },
            None => {
                handler_fork::say("child: a block missing\n");
                code = 1;
            }
        }
    }
    a.trim();
    if code == 0 {
        handler_fork::say("child: trimmed, allocated and trimmed again\n");
    }
    code
}

#[test]
fn a_handler_forks_while_trim_returns_a_block() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_trim_returns_a_block",
        Duration::from_secs(90),
        "a fork in a handler while trim returns a block without the zone lock",
    ) {
        return;
    }
    let a = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    handler_fork::install();
    // A free block that is with the process: one for the trim to return.
    let p = a.pages().alloc_pages(10).expect("a 4 MiB block");
    // SAFETY: the block is 4 MiB, ours; freed once with its order.
    unsafe {
        p.as_ptr().write_bytes(1, 4 << 20);
        a.pages().free_pages(p, 10);
    }
    set_hook(Some(hook));
    let trimmed = std::thread::scope(|s| {
        let h = s.spawn(|| {
            wait_step(1);
            ROLE.set(HOLDER);
            zone_holder::allocate_under_the_zone_lock(a.pages(), ORDER);
        });
        ROLE.set(TRIMMER);
        let trimmed = a.trim();
        ROLE.set(0);
        handler_fork::finish_in_child(|| child_work(&a));
        h.join().unwrap();
        trimmed
    });
    set_hook(None);
    assert!(trimmed > 0, "the trim returned nothing");
    let status = STATUS.load(SeqCst);
    assert_ne!(status, -3, "the handler did not fork");
    assert_ne!(
        status, -1,
        "the child hung: it waited for a lock held by a thread it does not have"
    );
    assert!(
        watchdog::exited_ok(status),
        "the child failed: status {status:#x}"
    );
}
