//! `fork` while another thread's nolock free of pages is between its count
//! and its push onto the zone's deferred stack: the child's count of
//! deferred pages must match its stacks.
//!
//! A nolock free that finds the zone lock busy parks its block on the
//! deferred stack: it counts the pages (`deferred_pages`), then pushes the
//! block. The fork holds the zone locks but not these lock-free steps, so
//! a clone between the two leaves the child a count for a block that is on
//! no stack (the block itself is lost to the child, as any block another
//! thread of the parent held). The child's `drain` then never brings the
//! count back to 0: its statistics report pages parked forever, and count
//! the lost block among the free pages.
//!
//! Deterministic, with interrupt points: a thread holds the zone lock
//! (paused at `Site::ZoneAlloc` of a normal allocation) while a second
//! thread nolock-frees a 256 KiB block, which is deferred; that thread
//! pauses at `Site::DeferredPush` (counted, not yet pushed) while the first
//! one releases the zone lock and the main thread forks. The child drains
//! and must find no deferred pages left, and every invariant holding.

mod watchdog;
mod zone_holder;

use watchdog::wait_for;

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The block the second thread frees with the nolock path (256 KiB: above
/// the per-CPU lists, so a busy zone lock defers it).
const ORDER: u32 = 6;

thread_local! {
    /// 1: the thread that holds the zone lock; 2: the thread that frees.
    static ROLE: Cell<u8> = const { Cell::new(0) };
}
/// 0: armed; 1: the zone lock is held (the freer may go); 2: the free is
/// counted and paused before its push.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    match (ROLE.get(), site) {
        (1, Site::ZoneAlloc) if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            wait_for(|| STEP.load(SeqCst) == 2);
        }
        (2, Site::DeferredPush) if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            wait_for(|| FORKED.load(SeqCst));
        }
        _ => {}
    }
}

#[test]
fn fork_between_a_deferred_free_count_and_its_push() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_between_a_deferred_free_count_and_its_push",
            &[],
            Duration::from_secs(60),
            "fork between a deferred free's count and its push",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    let block = pages.alloc_pages(ORDER).expect("a block").as_ptr() as usize;
    set_hook(Some(hook));
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            ROLE.set(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        s.spawn(|| {
            ROLE.set(2);
            wait_for(|| STEP.load(SeqCst) == 1);
            // SAFETY: allocated by the main thread with ORDER, freed once.
            unsafe { pages.free_pages_nolock(NonNull::new(block as *mut u8).unwrap(), ORDER) };
        });
        holder.join().unwrap();
        wait_for(|| STEP.load(SeqCst) == 2);
        assert_eq!(
            STEP.load(SeqCst),
            2,
            "the free did not pause before its push"
        );
        // SAFETY: the child uses the heap, reads its statistics and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            pages.drain();
            let s = pages.stats();
            let code = if pages.check_invariants().is_err() {
                4
            } else if s.deferred_pages != 0 {
                3
            } else {
                0
            };
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung")
    });
    set_hook(None);
    pages.drain();
    let s = pages.stats();
    assert_eq!(s.deferred_pages, 0);
    assert_eq!(s.free_pages, s.total_pages);
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's drain left deferred pages counted (3) or an invariant broken (4)"
    );
}
