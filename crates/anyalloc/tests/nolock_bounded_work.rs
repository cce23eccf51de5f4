//! The work of one nolock call does not grow with the
//! backlog of deferred frees (feature `interrupt-points`).
//!
//! While the test's own normal-path allocation holds the zone lock (the
//! `ZoneAlloc` site), the hook frees a hundred order-3 blocks with the
//! nolock path: the per-CPU lists are already full (of order-2 blocks), the
//! zone lock is busy, so every one is parked on the deferred stack. Then:
//!
//! * still inside the hook, a nolock order-3 allocation finds its lists
//!   empty and the zone busy and takes one parked block. It used to take
//!   the whole stack and push every other block back (a `DeferredPush` per
//!   block); now it pops exactly one.
//! * after the hook, a nolock order-0 allocation refills its list under a
//!   tried zone lock. It used to merge the whole backlog (a `DeferredDrain`
//!   per block); now at most a fixed budget.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, PageAllocator};

static PAGES: OnceLock<PageAllocator> = OnceLock::new();
static ORDER2: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static ORDER3: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNTING: AtomicBool = AtomicBool::new(false);
static PUSHES: AtomicUsize = AtomicUsize::new(0);
static DRAINS: AtomicUsize = AtomicUsize::new(0);
static STOLEN: AtomicUsize = AtomicUsize::new(0);

const BACKLOG: usize = 100;
/// What one nolock call may merge at most (the crate's budget is 8).
const BOUND: usize = 8;

fn pages() -> &'static PageAllocator {
    PAGES.get().unwrap()
}

fn hook(site: Site) {
    if COUNTING.load(Ordering::Relaxed) {
        match site {
            Site::DeferredPush => PUSHES.fetch_add(1, Ordering::Relaxed),
            Site::DeferredDrain => DRAINS.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
    if site != Site::ZoneAlloc || !ARMED.swap(false, Ordering::SeqCst) {
        return;
    }
    let pa = pages();
    // Fill every per-CPU list's room with order-2 blocks...
    for p in ORDER2.lock().unwrap().drain(..) {
        // SAFETY: allocated with order 2 by this allocator, freed once.
        unsafe { pa.free_pages_nolock(std::ptr::NonNull::new(p as *mut u8).unwrap(), 2) };
    }
    // ...so the order-3 frees find no room and the zone busy: parked.
    let before = pa.stats().deferred_pages;
    for p in ORDER3.lock().unwrap().drain(..) {
        // SAFETY: allocated with order 3 by this allocator, freed once.
        unsafe { pa.free_pages_nolock(std::ptr::NonNull::new(p as *mut u8).unwrap(), 3) };
    }
    assert!(
        pa.stats().deferred_pages - before >= 8 * (BACKLOG - 50),
        "most order-3 frees were parked"
    );
    // One nolock order-3 allocation: lists empty of order 3, zone busy.
    PUSHES.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let p = pa.alloc_pages_nolock(3);
    COUNTING.store(false, Ordering::Relaxed);
    if let Some(p) = p {
        STOLEN.store(p.as_ptr() as usize, Ordering::Relaxed);
    }
}

#[test]
fn one_nolock_call_does_bounded_work_whatever_the_backlog() {
    let pa = PAGES
        .get_or_init(|| PageAllocator::new(Config::default().memory(32 << 20).cpus(1)).unwrap());
    let mut o2 = Vec::new();
    for _ in 0..60 {
        o2.push(pa.alloc_pages(2).unwrap().as_ptr() as usize);
    }
    *ORDER2.lock().unwrap() = o2;
    let mut o3 = Vec::new();
    for _ in 0..BACKLOG {
        o3.push(pa.alloc_pages(3).unwrap().as_ptr() as usize);
    }
    *ORDER3.lock().unwrap() = o3;
    interrupt::set_hook(Some(hook));
    ARMED.store(true, Ordering::SeqCst);
    // A normal allocation above the per-CPU orders: the zone directly.
    let big = pa.alloc_pages(5).unwrap();
    assert!(!ARMED.load(Ordering::SeqCst), "the hook ran");
    let stolen = STOLEN.load(Ordering::Relaxed);
    assert_ne!(stolen, 0, "the nolock allocation took a parked block");
    assert_eq!(
        PUSHES.load(Ordering::Relaxed),
        0,
        "taking one parked block pushed others back"
    );
    // The backlog is still there; one nolock refill merges a bounded part.
    let backlog = pa.stats().deferred_pages;
    assert!(backlog >= 8 * (BACKLOG - 60), "backlog: {backlog} pages");
    DRAINS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let q = pa.alloc_pages_nolock(0).expect("an order-0 page");
    COUNTING.store(false, Ordering::Relaxed);
    let drained = DRAINS.load(Ordering::Relaxed);
    assert!(
        (1..=BOUND).contains(&drained),
        "one nolock call merged {drained} deferred blocks (backlog {} blocks)",
        backlog / 8
    );
    interrupt::set_hook(None);
    // SAFETY: each allocated above with its order, freed once.
    unsafe {
        pa.free_pages(q, 0);
        pa.free_pages(big, 5);
        pa.free_pages(std::ptr::NonNull::new(stolen as *mut u8).unwrap(), 3);
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    assert_eq!(s.buddy_pages, s.total_pages);
    pa.check_invariants().unwrap();
}
