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

mod script;
mod watchdog;
mod zone_holder;

use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The block the second thread frees with the nolock path (256 KiB: above
/// the per-CPU lists, so a busy zone lock defers it).
const ORDER: u32 = 6;

/// Role 1 holds the zone lock (step 1) until role 2's free is counted and
/// paused before its push (step 2), which waits for the fork (step 3).
static SCRIPT: [Pause; 2] = [
    Pause::new(1, Site::ZoneAlloc, 0, 2),
    Pause::new(2, Site::DeferredPush, 1, 3),
];

#[test]
fn fork_between_a_deferred_free_count_and_its_push() {
    if watchdog::ran_in_child(
        "fork_between_a_deferred_free_count_and_its_push",
        Duration::from_secs(60),
        "fork between a deferred free's count and its push",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    let block = pages.alloc_pages(ORDER).expect("a block").as_ptr() as usize;
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            script::act(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        s.spawn(|| {
            script::act(2);
            script::wait_step(1);
            // SAFETY: allocated by the main thread with ORDER, freed once.
            unsafe { pages.free_pages_nolock(NonNull::new(block as *mut u8).unwrap(), ORDER) };
        });
        holder.join().unwrap();
        script::reached(2, "the free paused before its push");
        script::fork_child(3, || {
            pages.drain();
            if pages.check_invariants().is_err() {
                4
            } else if pages.stats().deferred_pages != 0 {
                3
            } else {
                0
            }
        })
    });
    script::end();
    pages.drain();
    let s = pages.stats();
    assert_eq!(s.deferred_pages, 0);
    assert_eq!(s.free_pages, s.total_pages);
    script::assert_child_ok(
        status,
        "the child's drain left deferred pages counted (3) or an invariant broken (4)",
    );
}
