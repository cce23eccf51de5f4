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
    /// 1: the thread that holds the zone lock; 2: the thread that allocates.
    static ROLE: Cell<u8> = const { Cell::new(0) };
}
/// 0: armed; 1: the zone lock is held; 2: a cell is emptied, its order not
/// marked.
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
        (2, Site::StockTaken) if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            wait_for(|| FORKED.load(SeqCst));
        }
        _ => {}
    }
}

#[test]
fn fork_between_a_stock_take_and_its_mark() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_between_a_stock_take_and_its_mark",
            &[],
            Duration::from_secs(60),
            "fork between a stock take and its mark",
        );
        print!("{}", out.stdout);
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
    set_hook(Some(hook));
    let status = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            ROLE.set(1);
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
        });
        wait_for(|| STEP.load(SeqCst) == 1);
        assert_eq!(STEP.load(SeqCst), 1, "the zone lock was not held");
        let taker = s.spawn(|| {
            ROLE.set(2);
            pages
                .alloc_pages_nolock(ORDER)
                .expect("a stocked block")
                .as_ptr() as usize
        });
        wait_for(|| STEP.load(SeqCst) == 2);
        assert_eq!(
            STEP.load(SeqCst),
            2,
            "the allocation did not stop between its take and its mark"
        );
        // H finishes (the fork waits for the zone lock it holds).
        RELEASED.store(true, SeqCst);
        holder.join().unwrap();
        // SAFETY: the child uses the heap, reads its statistics and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // One zone-lock holder: it fills the stock's empty cells.
            zone_holder::allocate_under_the_zone_lock(pages, ORDER + 1);
            let stocked = pages.stats().stock_pages;
            if stocked != full {
                eprintln!("the child's stock: {stocked} pages, not {full}");
            }
            let code = if stocked == full { 0 } else { 3 };
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        let taken = taker.join().unwrap();
        // SAFETY: allocated above with ORDER, freed once.
        unsafe { pages.free_pages(NonNull::new(taken as *mut u8).unwrap(), ORDER) };
        status
    });
    set_hook(None);
    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(block, ORDER) };
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
        "the child's zone-lock holder left its stock short (3)"
    );
}
