//! A nolock allocation that finds its own slots empty looks at the other
//! CPUs' slots for a block they hold (step 3 of the page module's "Where a
//! nolock allocation looks"): their stock only, without refilling them
//! (feature `interrupt-points`, to count the refills).
//!
//! It used to call the refill path for every such slot that held pages but
//! none of the order asked for: each took the zone lock, merged up to
//! `NOLOCK_DRAIN_BUDGET` deferred blocks and refilled the stock, only to
//! find it may take nothing (its reserve is "everything"), and marked that
//! remote slot as wanted by a nolock allocation (so maintenance would
//! stock it). One nolock call's work grew with the CPU count (up to
//! `MAX_CPUS` times three levels). Now a refill is tried on this CPU's own
//! slots only: at most `LEVELS` (3) per call, whatever the CPU count.
//!
//! Deterministic: an embedder's platform whose CPU id the test sets.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, PageAllocator, Platform};

const CPUS: usize = 16;
/// Context levels per CPU (normal, first handler, nested handler).
const LEVELS: usize = 3;

static CPU: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);
static REFILLS: AtomicUsize = AtomicUsize::new(0);

struct SetCpu;
impl Platform for SetCpu {
    fn cpu_id(&self) -> usize {
        CPU.load(Ordering::Relaxed)
    }
    fn cpu_count(&self) -> usize {
        CPUS
    }
}
static PLATFORM: SetCpu = SetCpu;

fn hook(site: Site) {
    if site == Site::PcpRefill && COUNTING.load(Ordering::Relaxed) {
        REFILLS.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_nolock_miss_refills_only_its_own_cpus_slots() {
    let len = 16 << 20;
    let region: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
    // SAFETY: a leaked region, ours alone, never freed.
    let pa = unsafe {
        PageAllocator::from_region(
            NonNull::new(region.as_mut_ptr()).unwrap(),
            len,
            &PLATFORM,
            Config::default().cpus(CPUS).min_reserve(4 << 20),
        )
    }
    .unwrap();
    // Every page allocated (the normal path's last resort takes the
    // reserve too), from CPU 0.
    let mut held = Vec::new();
    while let Some(p) = pa.alloc_pages(0) {
        held.push(p);
    }
    // One order-0 page on each other CPU's level-0 list.
    for cpu in 1..CPUS {
        CPU.store(cpu, Ordering::Relaxed);
        // SAFETY: allocated above with order 0, freed once.
        unsafe { pa.free_pages(held.pop().unwrap(), 0) };
    }
    CPU.store(0, Ordering::Relaxed);
    assert_eq!(pa.stats().percpu_pages, CPUS - 1);

    // An order-1 nolock allocation on CPU 0: nothing anywhere to give.
    interrupt::set_hook(Some(hook));
    COUNTING.store(true, Ordering::Relaxed);
    let got = pa.alloc_pages_nolock(1);
    COUNTING.store(false, Ordering::Relaxed);
    interrupt::set_hook(None);
    assert!(got.is_none(), "no order-1 block is free");
    let refills = REFILLS.load(Ordering::Relaxed);
    assert!(
        refills <= LEVELS,
        "one nolock call refilled {refills} slots (zone lock, deferred merges, stock \
         refill each): more than its own CPU's {LEVELS}, with {CPUS} CPUs"
    );
    // The other CPUs' pages are still theirs, and an order-0 request still
    // takes one of them.
    assert_eq!(pa.stats().percpu_pages, CPUS - 1);
    let p = pa
        .alloc_pages_nolock(0)
        .expect("another CPU's order-0 page");
    held.push(p);

    for p in held {
        // SAFETY: each allocated above with order 0, freed once.
        unsafe { pa.free_pages(p, 0) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    assert_eq!(s.buddy_pages, s.total_pages);
    pa.check_invariants().unwrap();
}
