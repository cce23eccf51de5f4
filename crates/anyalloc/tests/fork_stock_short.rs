//! `fork` while another thread's nolock allocation has emptied a stock
//! cell but not yet marked its order short: the child's zone-lock holders
//! must fill the cell again.
//!
//! A nolock allocation of a large block that finds the zone lock busy takes
//! a block out of the zone's stock: it empties a cell (a swap), uncounts
//! it, then marks the order in `stock_short`, which tells the zone-lock
//! holders which orders have an empty cell to fill (the others are not
//! looked at). A fork cloned between the swap and the mark left the child
//! an empty cell of an order marked full: no holder there filled it again,
//! so the child's nolock allocations of the order had one block fewer to
//! fall back on, until a drain or maintenance pass happened to give the
//! whole stock back. The child now marks every order short when it
//! recounts its stock (`Zone::recount_stock_after_fork`).
//!
//! Deterministic, with interrupt points: thread H holds the zone lock
//! (paused at `Site::ZoneAlloc`); thread A's nolock allocation of the order
//! takes a stocked block and pauses at `Site::StockTaken`; H goes on (its
//! refill finds no order marked) and the main thread forks. The child takes
//! the zone lock once (a normal allocation and free) and must find its
//! stock full again.

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

/// Role 1 holds the zone lock (step 1) until step 3; role 2's allocation
/// stops between its take and its mark (step 2) until the fork (step 4).
static SCRIPT: [Pause; 2] = [
    Pause::new(1, Site::ZoneAlloc, 0, 3),
    Pause::new(2, Site::StockTaken, 1, 4),
];

#[test]
fn fork_between_a_stock_take_and_its_mark() {
    if watchdog::ran_in_child(
        "fork_between_a_stock_take_and_its_mark",
        Duration::from_secs(60),
        "fork between a stock take and its mark",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    // A nolock allocation of the order: the order is wanted from now on,
    // and the next zone-lock holder fills its cells.
    let block = pages.alloc_pages_nolock(ORDER).expect("a block");
    zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
    let full = pages.stats().stock_pages;
    assert!(full >= 1 << ORDER, "no block stocked ({full} pages)");
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            script::act(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        script::reached(1, "the zone lock is held");
        let taker = s.spawn(|| {
            script::act(2);
            pages
                .alloc_pages_nolock(ORDER)
                .expect("a stocked block")
                .as_ptr() as usize
        });
        script::reached(2, "the allocation stopped between its take and its mark");
        // H finishes (the fork waits for the zone lock it holds).
        script::advance_to(3);
        holder.join().unwrap();
        let status = script::fork_child(4, || {
            // One zone-lock holder: it fills the stock's empty cells.
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
            let stocked = pages.stats().stock_pages;
            if stocked != full {
                eprintln!("the child's stock: {stocked} pages, not {full}");
                return 3;
            }
            0
        });
        let taken = taker.join().unwrap();
        // SAFETY: allocated above with ORDER, freed once.
        unsafe { pages.free_pages(NonNull::new(taken as *mut u8).unwrap(), ORDER) };
        status
    });
    script::end();
    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(block, ORDER) };
    pages.drain();
    let s = pages.stats();
    assert_eq!(s.stock_pages, 0);
    assert_eq!(s.free_pages, s.total_pages);
    script::assert_child_ok(
        status,
        "the child's zone-lock holder left its stock short (3)",
    );
}
