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

mod watchdog;
mod zone_holder;

use watchdog::wait_for;

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The block's order (256 KiB: above the per-CPU lists, so the stock's).
const ORDER: u32 = 6;

thread_local! {
    /// 1: the thread that holds the zone lock; 2: the thread that frees.
    static ROLE: Cell<u8> = const { Cell::new(0) };
}
/// 0: armed; 1: the zone lock is held; 2: the free is counted, not in its
/// cell.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// H may go on.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    match (ROLE.get(), site) {
        (1, Site::ZoneAlloc) if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            wait_for(|| RELEASED.load(SeqCst));
        }
        (2, Site::StockCounted) if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            wait_for(|| FORKED.load(SeqCst));
        }
        _ => {}
    }
}

#[test]
fn fork_between_a_stock_count_and_its_cell() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_between_a_stock_count_and_its_cell",
            &[],
            Duration::from_secs(60),
            "fork between a stock put's count and its cell",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let pages = heap.pages();
    // A nolock allocation of the order: the order is wanted from now on.
    let block = pages.alloc_pages_nolock(ORDER).expect("a block").as_ptr() as usize;
    set_hook(Some(hook));
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            ROLE.set(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        wait_for(|| STEP.load(SeqCst) == 1);
        assert_eq!(STEP.load(SeqCst), 1, "the zone lock was not held");
        // The zone lock busy, nolock allocations of the order take the
        // stock's blocks until it is empty.
        let mut taken = Vec::new();
        while let Some(p) = pages.alloc_pages_nolock(ORDER) {
            taken.push(p.as_ptr() as usize);
        }
        let freer = s.spawn(|| {
            ROLE.set(2);
            let p = NonNull::new(block as *mut u8).unwrap();
            // SAFETY: allocated by the main thread with ORDER, freed once.
            unsafe { pages.free_pages_nolock(p, ORDER) };
        });
        wait_for(|| STEP.load(SeqCst) == 2);
        assert_eq!(
            STEP.load(SeqCst),
            2,
            "the free did not stop between count and cell"
        );
        // H finishes (the fork waits for the zone lock it holds).
        RELEASED.store(true, SeqCst);
        holder.join().unwrap();
        // SAFETY: the child uses the heap, reads its statistics and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            pages.drain();
            let code = if pages.stats().stock_pages != 0 { 3 } else { 0 };
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        freer.join().unwrap();
        for p in taken {
            // SAFETY: allocated above with ORDER, freed once.
            unsafe { pages.free_pages(NonNull::new(p as *mut u8).unwrap(), ORDER) };
        }
        status
    });
    set_hook(None);
    pages.drain();
    let s = pages.stats();
    assert_eq!(s.stock_pages, 0);
    assert_eq!(s.free_pages, s.total_pages);
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's drain left stocked pages counted (3)"
    );
}
