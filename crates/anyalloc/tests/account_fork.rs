//! `fork` while another thread's charge is halfway up its group's chain:
//! the child may lose that charge's bytes (a charge's worth, as a stock's),
//! but no counter may go below what its descendants hold. The child
//! charged first used to be charged before its parent: cloned between the
//! two, the child group held bytes its parent never got, and dropping the
//! child group (which gives back everything its counter holds) took them
//! from the parent, whose counter wrapped below zero: every later charge
//! of the tree was refused, and its usage read about 2^64.
//!
//! Deterministic, with interrupt points: thread T's accounted allocation
//! into `kid` (a fresh group, empty stock) passes `Site::AccountCharge` in
//! its stock, then at the first level its charge reaches, and pauses at
//! the second; the main thread forks there. The child frees nothing (T's
//! block was never handed out there), drops `kid`, and checks `parent`.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Group, Heap};

use script::Pause;

const LIMIT: usize = 4 << 20;

/// Role 1 passes its stock's point (step 0) and the first level's (step 1),
/// and stops at the second level's (step 2) until the fork (step 4).
static SCRIPT: [Pause; 3] = [
    Pause::new(1, Site::AccountCharge, 0, 1),
    Pause::new(1, Site::AccountCharge, 1, 2),
    Pause::new(1, Site::AccountCharge, 2, 4),
];

#[test]
fn fork_halfway_up_a_charge_leaves_no_counter_below_zero() {
    if watchdog::ran_in_child(
        "fork_halfway_up_a_charge_leaves_no_counter_below_zero",
        Duration::from_secs(60),
        "fork halfway up a charge's chain",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let parent = Group::new("parent", Some(LIMIT), None);
    let kid = Group::new("kid", None, Some(&parent));
    let layout = Layout::from_size_align(1000, 8).unwrap();
    script::play(&SCRIPT);
    let (heap, parent) = (&heap, &parent);
    let status = std::thread::scope(|s| {
        let theirs = kid.clone();
        let t = s.spawn(move || {
            script::act(1);
            heap.alloc_in(layout, &theirs).map(|p| p.as_ptr() as usize)
        });
        script::reached(3, "the charge stopped between two levels");
        let status = script::fork_child(4, move || {
            // T's reference to `kid` is gone in the child (T is not
            // there), and so is T's block, which never had an owner:
            // dropping ours drops `kid`, which gives what its counter
            // holds back to `parent`.
            // SAFETY: T's clone, one strong reference no one here holds.
            unsafe { std::sync::Arc::decrement_strong_count(std::sync::Arc::as_ptr(&kid)) };
            if std::sync::Arc::strong_count(&kid) != 1 {
                return 5;
            }
            drop(kid);
            // At most the charge cloned halfway is lost.
            if parent.usage() > 64 << 10 {
                return 3;
            }
            // And the tree still charges.
            match heap.alloc_in(Layout::from_size_align(LIMIT / 2, 8).unwrap(), parent) {
                Some(p) => {
                    // SAFETY: allocated just above, freed once.
                    unsafe { heap.free(p) };
                    0
                }
                None => 4,
            }
        });
        let p = t.join().unwrap().expect("memory and limit to spare");
        // SAFETY: allocated by T, freed once.
        unsafe { heap.free(std::ptr::NonNull::new(p as *mut u8).unwrap()) };
        status
    });
    script::end();
    assert_eq!(parent.usage(), 0);
    script::assert_child_ok(
        status,
        "after the drop of a child group cloned halfway up a charge, the parent's usage \
         wrapped (3), its tree refused a charge that fits (4), or the group had other references (5)",
    );
}
