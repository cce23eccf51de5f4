//! The zone's nolock stock of large blocks, made deterministic with
//! interrupt points (feature `interrupt-points`).
//!
//! A nolock allocation above the per-CPU orders that finds the zone lock
//! held (here: a handler that interrupted its own thread inside a nolock
//! zone section) takes a block from the stock, without the lock. The next
//! holder of the zone lock must fill that cell again, or the next handler
//! finds the stock empty. Refills look only at the orders marked short, so
//! this checks that a lock-free take marks its order short, and that a
//! refill that could not fill a cell leaves its order marked. The 2 and
//! 4 MiB orders, which nothing larger can be split for, keep four cells:
//! a busy zone of 256 MiB gives four 4 MiB blocks without its lock.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, PageAllocator, PAGE_SIZE};

/// An order above the per-CPU lists (those take orders 0 to 3).
const ORDER: u32 = 6;
const BLOCK_PAGES: usize = 1 << ORDER;
/// 32 MiB: two stock cells for order 6.
const MEMORY: usize = 32 << 20;

static PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
/// Whether the hook takes a block (once) at the nolock zone section.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The block the hook took (address), 0 if none.
static TAKEN: AtomicUsize = AtomicUsize::new(0);
/// The tests share the statics above and the hook: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pages() -> &'static PageAllocator {
    // SAFETY: set before the hook is installed, leaked.
    unsafe { &*PA.load(Ordering::Acquire) }
}

/// Armed for [`hook`] to take, instead of one block of `ORDER`, every
/// block of this order the stock gives (0: not armed).
static TAKE_ALL: AtomicU32 = AtomicU32::new(0);
/// The blocks the hook took that way (addresses), in order.
static TAKEN_ALL: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

fn hook(site: Site) {
    if site != Site::NolockZoneAlloc {
        return;
    }
    let order = TAKE_ALL.swap(0, Ordering::Relaxed);
    if order != 0 {
        for cell in &TAKEN_ALL {
            match pages().alloc_pages_nolock(order) {
                Some(p) => cell.store(p.as_ptr() as usize, Ordering::Relaxed),
                None => break,
            }
        }
        return;
    }
    if ARMED.swap(false, Ordering::Relaxed) {
        // This thread holds the zone lock: the stock is the only place a
        // large block can come from here.
        let p = pages().alloc_pages_nolock(ORDER).expect("a stocked block");
        TAKEN.store(p.as_ptr() as usize, Ordering::Relaxed);
    }
}

fn new_pages(memory: usize) -> &'static PageAllocator {
    let pa: &'static PageAllocator = Box::leak(Box::new(
        PageAllocator::new(
            Config::default()
                .memory(memory)
                .cpus(1)
                .grow(false)
                .maintenance(false),
        )
        .unwrap(),
    ));
    PA.store(pa as *const _ as *mut _, Ordering::Release);
    pa
}

/// Allocates with the hook armed: the hook takes one block from the stock
/// while this call holds the zone lock. Returns (the call's block, the
/// hook's block).
fn alloc_with_a_take(pa: &PageAllocator) -> (NonNull<u8>, NonNull<u8>) {
    TAKEN.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let outer = pa.alloc_pages_nolock(ORDER).expect("memory to spare");
    assert!(!ARMED.load(Ordering::Relaxed), "the hook did not run");
    let inner = NonNull::new(TAKEN.load(Ordering::Relaxed) as *mut u8).unwrap();
    (outer, inner)
}

/// Frees `held` (blocks of `order` from `pa`) and checks that every page
/// is free again and the structures hold.
fn free_all(pa: &PageAllocator, held: Vec<NonNull<u8>>, order: u32) {
    for p in held {
        // SAFETY: the caller allocated each block with `order`; each is
        // freed once, here.
        unsafe { pa.free_pages_nolock(p, order) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages, "{s:?}");
    assert_eq!(pa.check_invariants(), Ok(()));
}

#[test]
fn a_block_taken_from_the_stock_without_the_lock_is_restocked_by_the_holder() {
    let _s = serial();
    let pa = new_pages(MEMORY);
    set_hook(Some(hook));
    // The first nolock request of the order asks for a stock, which the
    // holder fills before it releases the lock.
    let first = pa.alloc_pages_nolock(ORDER).expect("memory to spare");
    let full = pa.stats().stock_pages;
    assert!(
        full >= BLOCK_PAGES,
        "order {ORDER} stocked: {:?}",
        pa.stats()
    );
    assert_eq!(full % BLOCK_PAGES, 0);
    // Twice: the second take finds the cell the first refill filled.
    let mut held = vec![first];
    for round in 0..2 {
        let (outer, inner) = alloc_with_a_take(pa);
        assert_ne!(outer, inner);
        held.extend([outer, inner]);
        // The interrupted call refilled the emptied cell before it released
        // the lock.
        assert_eq!(
            pa.stats().stock_pages,
            full,
            "round {round}: the cell the handler emptied stayed empty"
        );
    }
    set_hook(None);
    free_all(pa, held, ORDER);
}

/// A refill that finds no memory for a cell leaves its order marked
/// short, so the next holder, once a block is back, fills it.
#[test]
fn a_stock_cell_left_empty_for_want_of_memory_is_filled_later() {
    let _s = serial();
    // Order 10 in 32 MiB: one stock cell.
    const BIG: u32 = 10;
    let pa = new_pages(MEMORY);
    // Nolock allocations of the order until none is left: the buddy lists
    // run out above the watermark first, then the stock's block goes (its
    // order marked short), then a refill finds no memory, and the request
    // fails.
    let mut held = Vec::new();
    while let Some(p) = pa.alloc_pages_nolock(BIG) {
        held.push(p);
        assert!(
            held.len() <= MEMORY / (PAGE_SIZE << BIG),
            "more blocks than memory"
        );
    }
    assert!(held.len() >= 2, "{:?}", pa.stats());
    assert_eq!(
        pa.stats().stock_pages,
        0,
        "the stock's block was taken last"
    );
    // One block back, through the zone lock: the holder refills the cell.
    let p = held.pop().unwrap();
    // SAFETY: allocated above with `BIG`, freed once.
    unsafe { pa.free_pages_nolock(p, BIG) };
    let s = pa.stats();
    assert_eq!(
        s.stock_pages,
        1 << BIG,
        "the cell a refill could not fill stayed empty: {s:?}"
    );
    free_all(pa, held, BIG);
}

/// The two largest orders keep four cells on a zone of 256 MiB (the others
/// two): nothing larger can be split for them while the zone is busy, so a
/// handler that interrupted a zone section (or a preempted lock holder's
/// neighbours) finds four 4 MiB blocks, and the fifth request fails busy.
#[test]
fn a_busy_zone_of_256_mib_still_gives_four_blocks_of_4_mib() {
    let _s = serial();
    const BIG: u32 = 10;
    const CELLS: usize = 4;
    let pa = new_pages(256 << 20);
    set_hook(Some(hook));
    // The first request asks for the stock; its holder fills the cells.
    let first = pa.alloc_pages_nolock(BIG).expect("memory to spare");
    let full = pa.stats().stock_pages;
    assert_eq!(full, CELLS << BIG, "{:?}", pa.stats());
    for cell in &TAKEN_ALL {
        cell.store(0, Ordering::Relaxed);
    }
    let busy = pa.stats().nolock_large_alloc_fail_busy;
    TAKE_ALL.store(BIG, Ordering::Relaxed);
    let outer = pa.alloc_pages_nolock(BIG).expect("memory to spare");
    assert_eq!(TAKE_ALL.load(Ordering::Relaxed), 0, "the hook did not run");
    let taken: Vec<NonNull<u8>> = TAKEN_ALL
        .iter()
        .filter_map(|c| NonNull::new(c.load(Ordering::Relaxed) as *mut u8))
        .collect();
    assert_eq!(taken.len(), CELLS, "blocks the busy zone gave: {taken:?}");
    let s = pa.stats();
    assert_eq!(
        s.nolock_large_alloc_fail_busy,
        busy + 1,
        "the request after the stock ran out failed, and as busy: {s:?}"
    );
    // The interrupted call refilled all four before it released the lock.
    assert_eq!(s.stock_pages, full, "{s:?}");
    set_hook(None);
    let mut held = vec![first, outer];
    held.extend(taken);
    free_all(pa, held, BIG);
}
