//! A large block that a nolock free parks in the stock just after a drain
//! of the stock goes back all the same once the stock stays unused.
//!
//! A nolock free of a large block that finds the zone lock busy parks it
//! in an empty stock cell of its order if that order is wanted
//! (`Zone::stock_put`). It reads the "wanted" bit, then fills a cell, with
//! no lock: a drain of the stock (which clears the bit, then empties the
//! cells) between the two left the block stocked with its order no longer
//! wanted. Maintenance drained an unused stock only while some order was
//! wanted, so the block stayed there, neither given back to the buddy lists
//! nor to the OS, until a `drain()` or a nolock allocation of that order.
//!
//! Deterministic, with interrupt points: a thread holds the zone lock
//! (paused at `Site::ZoneAlloc`) while a second one's nolock free of a
//! 256 KiB block, its order wanted, pauses at `Site::StockPut`; the first
//! thread goes on, the main thread drains, then the free fills a cell.
//! Three `Heap::maintain()` passes (the stock unused for two) must give
//! the block back.

mod script;
mod watchdog;
mod zone_holder;

use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The block's order (256 KiB: above the per-CPU lists, so the stock's).
const ORDER: u32 = 6;

/// Role 1 holds the zone lock (step 1) until step 3; role 2's free pauses
/// before its cell (step 2) until the stock is drained (step 4).
static SCRIPT: [Pause; 2] = [
    Pause::new(1, Site::ZoneAlloc, 0, 3),
    Pause::new(2, Site::StockPut, 1, 4),
];

#[test]
fn a_block_stocked_after_a_drain_goes_back() {
    if watchdog::ran_in_child(
        "a_block_stocked_after_a_drain_goes_back",
        Duration::from_secs(60),
        "a block stocked just after a drain of the stock",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    // A nolock allocation of the order: the order is wanted from now on.
    let block = pages.alloc_pages_nolock(ORDER).expect("a block").as_ptr() as usize;
    script::play(&SCRIPT);
    std::thread::scope(|s| {
        let holder = s.spawn(|| {
            script::act(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        let freer = s.spawn(|| {
            script::act(2);
            script::wait_step(1);
            let p = std::ptr::NonNull::new(block as *mut u8).unwrap();
            // SAFETY: allocated by the main thread with ORDER, freed once.
            unsafe { pages.free_pages_nolock(p, ORDER) };
        });
        script::reached(2, "the free paused at its cell");
        script::advance_to(3);
        holder.join().unwrap();
        // The stock drained (its order no longer wanted), then the free
        // fills a cell.
        pages.drain();
        script::advance_to(4);
        freer.join().unwrap();
    });
    script::end();
    assert_eq!(
        pages.stats().stock_pages,
        1 << ORDER,
        "the free did not park its block in the stock"
    );
    for _ in 0..3 {
        heap.maintain();
    }
    let s = pages.stats();
    assert_eq!(
        s.stock_pages, 0,
        "the block parked after the drain stayed in the unused stock"
    );
    assert_eq!(s.free_pages, s.total_pages);
    pages.check_invariants().expect("invariants");
}
