//! `fork` while another thread's nolock free has counted a large block in
//! the zone's stock but not yet put it in its cell: the child's stock count
//! must match its cells.
//!
//! A nolock free of a large block that finds the zone lock busy parks it in
//! an empty stock cell of its order: it counts the pages (`stock_pages`),
//! then fills the cell. A fork cloned between the two leaves the child a
//! count for a block in no cell, which no drain ever takes off: the child
//! recounts its stock from the cells (`Zone::recount_stock_after_fork`).
//!
//! Deterministic, with interrupt points: thread H holds the zone lock
//! (paused at `Site::ZoneAlloc`); the main thread's nolock allocations of
//! the order empty its stock; thread A's nolock free of a block of that
//! order pauses at `Site::StockCounted`; H goes on and the main thread
//! forks. The child drains and must find no stocked page counted.

mod script;
mod watchdog;
mod zone_holder;

use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The block's order (256 KiB: above the per-CPU lists, so the stock's).
const ORDER: u32 = 6;

/// Role 1 holds the zone lock (step 1) until step 3; role 2's free stops
/// counted but not in its cell (step 2) until the fork (step 4).
static SCRIPT: [Pause; 2] = [
    Pause::new(1, Site::ZoneAlloc, 0, 3),
    Pause::new(2, Site::StockCounted, 1, 4),
];

#[test]
fn fork_between_a_stock_count_and_its_cell() {
    if watchdog::ran_in_child(
        "fork_between_a_stock_count_and_its_cell",
        Duration::from_secs(60),
        "fork between a stock put's count and its cell",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    // A nolock allocation of the order: the order is wanted from now on.
    let block = pages.alloc_pages_nolock(ORDER).expect("a block").as_ptr() as usize;
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            script::act(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        script::reached(1, "the zone lock is held");
        // The zone lock busy, nolock allocations of the order take the
        // stock's blocks until it is empty.
        let mut taken = Vec::new();
        while let Some(p) = pages.alloc_pages_nolock(ORDER) {
            taken.push(p.as_ptr() as usize);
        }
        let freer = s.spawn(|| {
            script::act(2);
            let p = NonNull::new(block as *mut u8).unwrap();
            // SAFETY: allocated by the main thread with ORDER, freed once.
            unsafe { pages.free_pages_nolock(p, ORDER) };
        });
        script::reached(2, "the free stopped between count and cell");
        // H finishes (the fork waits for the zone lock it holds).
        script::advance_to(3);
        holder.join().unwrap();
        let status = script::fork_child(4, || {
            pages.drain();
            if pages.stats().stock_pages != 0 {
                3
            } else {
                0
            }
        });
        freer.join().unwrap();
        for p in taken {
            // SAFETY: allocated above with ORDER, freed once.
            unsafe { pages.free_pages(NonNull::new(p as *mut u8).unwrap(), ORDER) };
        }
        status
    });
    script::end();
    pages.drain();
    let s = pages.stats();
    assert_eq!(s.stock_pages, 0);
    assert_eq!(s.free_pages, s.total_pages);
    script::assert_child_ok(status, "the child's drain left stocked pages counted (3)");
}
