//! The inline decay (`Config::decay`) gives an idle nolock stock back, as
//! the maintenance thread does.
//!
//! A nolock allocation of a large block (above 32 KiB: a signal handler's
//! `malloc` that interrupted the allocator, a nolock scope, `NoLock`) makes
//! the zone keep blocks of that order stocked for the nolock path, refilled
//! by every normal zone-lock holder: up to 28 MiB per zone once handlers
//! asked for every size. The maintainer gives a stock that no nolock
//! allocation used for half a second back to the buddy lists (from where
//! idle memory goes back to the OS); the inline decay, which stands in for
//! it in a heap without one (the C library's default), did not: the stock
//! stayed for good, and the memory it held never went back.
//!
//! No duration is asserted: the calls go on until twenty passes have run
//! (the maintainer's idle limit is ten), which must have drained it.

use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::time::{Duration, Instant};

#[test]
fn an_idle_nolock_stock_goes_back_without_a_maintainer() {
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    // A handler's large block (order 6, 256 KiB), on the nolock path: its
    // order is stocked from now on.
    let layout = Layout::from_size_align(256 << 10, 8).unwrap();
    let p = heap.alloc_nolock(layout).expect("memory to spare");
    // SAFETY: allocated just above, freed once.
    unsafe { heap.free_nolock(p) };
    // A normal free under the zone lock refills the stock.
    let q = heap.alloc(layout).expect("memory to spare");
    // SAFETY: allocated just above, freed once.
    unsafe { heap.free(q) };
    let stocked = heap.pages().stats().stock_pages;
    assert!(stocked > 0, "the order is stocked");
    // Normal slow-path calls that leave the zone alone (blocks above 4 MiB
    // are mappings of their own), until twenty passes have run.
    let huge = Layout::from_size_align(5 << 20, 8).unwrap();
    let start = Instant::now();
    while heap.stats().maintenance_passes < 20 && start.elapsed() < Duration::from_secs(60) {
        let p = heap.alloc(huge).expect("a mapping");
        // SAFETY: allocated just above, freed once.
        unsafe { heap.free(p) };
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = heap.stats();
    println!(
        "stock {stocked} pages, then {} after {} passes",
        s.pages.stock_pages, s.maintenance_passes
    );
    assert!(s.maintenance_passes >= 20, "the calls ran passes");
    assert_eq!(
        s.pages.stock_pages, 0,
        "twenty passes with no nolock allocation gave the stock back"
    );
}
