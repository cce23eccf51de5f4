//! Running the shrinkers never waits for the shrinker registry, even when an
//! allocation made while they run needs reclaim itself.
//!
//! `Global` is this test binary's allocator, so every `Vec` or `Box` the
//! heap's own code might allocate comes from the same heap. The scenario runs
//! in a child process (this binary re-executed by `tests/watchdog`) with a
//! small global heap that cannot grow, and the parent is a watchdog: a child
//! that does not finish within a minute is killed and the test fails (a
//! deadlock fails the test instead of hanging CI).
//!
//! The child registers some shrinkers (20 to 80), takes the heap below its min watermark
//! with nolock page allocations of every per-CPU order (which never reclaim), and then makes one normal
//! allocation of a size class that has no slab yet. Its new slab comes from
//! the min reserve, which asks for reclaim, and the allocation runs the
//! shrinkers. The registry used to copy its list of shrinkers into a new
//! `Vec` (16 bytes per entry: an object of another slab-less class) under
//! its spin lock; that copy's allocation needed a slab from the reserve too,
//! asked for reclaim, ran the shrinkers again and spun forever on the lock
//! its own outer frame held. One shrinker also allocates while it runs (a
//! reclaim nested in a shrinker, which must not call the shrinkers again).

mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

#[global_allocator]
static A: anyalloc::Global = anyalloc::Global;

/// Page blocks the shrinkers give back (address | order).
static STASH: [AtomicUsize; 4096] = [const { AtomicUsize::new(0) }; 4096];
/// Shrinkers free the stash only once armed (not while the child fills it).
static ARMED: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);
static IN_SHRINKER: AtomicBool = AtomicBool::new(false);

fn heap() -> &'static anyalloc::Heap {
    anyalloc::global_heap().expect("the global heap exists")
}

fn stash(p: NonNull<u8>, order: u32) -> bool {
    let v = p.as_ptr() as usize | order as usize;
    STASH.iter().any(|s| {
        s.compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    })
}

/// The shrinker: frees every stashed allocation (normal context).
fn shrink(_want: usize) -> usize {
    CALLS.fetch_add(1, Ordering::Relaxed);
    if IN_SHRINKER.load(Ordering::Relaxed) {
        NESTED.fetch_add(1, Ordering::Relaxed);
    }
    if !ARMED.load(Ordering::Relaxed) {
        return 0;
    }
    IN_SHRINKER.store(true, Ordering::Relaxed);
    let mut freed = 0;
    for s in &STASH {
        let v = s.swap(0, Ordering::Relaxed);
        if v != 0 {
            let (p, order) = (v & !4095, (v & 4095) as u32);
            freed += 4096 << order;
            // SAFETY: a live block of the global heap's pages of this order,
            // owned by the stash until the swap above.
            unsafe {
                heap()
                    .pages()
                    .free_pages(NonNull::new(p as *mut u8).unwrap(), order)
            };
        }
    }
    // A shrinker that allocates: the reclaim this may start must not call
    // the shrinkers again on this thread.
    let v: Vec<u8> = Vec::with_capacity(3000);
    drop(v);
    IN_SHRINKER.store(false, Ordering::Relaxed);
    freed
}

fn child() {
    let h = heap();
    h.drain();
    let before = h.stats();
    let slabless = |size: usize| {
        before
            .classes
            .iter()
            .find(|c| c.size >= size)
            .is_some_and(|c| c.slabs == 0)
    };
    // How many shrinkers: the old registry's copy of n entries (16 bytes
    // each) must need a slab-less class (and the n pushes' own Vec, whose
    // capacity is a power of two, another one). The trigger's class is
    // slab-less too.
    let n = [20, 24, 28, 40, 48, 56, 80]
        .into_iter()
        .find(|&n| slabless(16 * n))
        .expect("precondition: a slab-less class for the registry copy");
    let trigger = [3300, 2200, 6000, 7000, 4500]
        .into_iter()
        .find(|&s| slabless(s))
        .expect("precondition: a slab-less class for the trigger");
    for _ in 0..n {
        h.register_shrinker(shrink);
    }
    println!("{n} shrinkers, trigger {trigger} bytes");
    // Below the min watermark with nolock allocations, which never reclaim:
    // every order until none is left on any list.
    let mut stashed = 0;
    loop {
        let mut got = false;
        for order in (0..=3).rev() {
            if let Some(p) = h.pages().alloc_pages_nolock(order) {
                assert!(stash(p, order), "stash full");
                stashed += 1;
                got = true;
            }
        }
        if !got {
            break;
        }
    }
    let pages = h.stats().pages;
    println!("stashed {stashed} page blocks; pages: {pages:?}");
    assert_eq!(pages.percpu_pages, 0, "precondition: no per-CPU stock left");
    ARMED.store(true, Ordering::Relaxed);
    let reclaims = h.stats().reclaims;
    // A new slab from the min reserve: the allocation runs the shrinkers.
    let p = h
        .alloc(Layout::from_size_align(trigger, 8).unwrap())
        .expect("memory after reclaim");
    // SAFETY: just allocated.
    unsafe { h.free(p) };
    let after = h.stats();
    println!(
        "reclaims {} -> {}, shrinker calls {}, nested calls {}, freed {} bytes",
        reclaims,
        after.reclaims,
        CALLS.load(Ordering::Relaxed),
        NESTED.load(Ordering::Relaxed),
        after.shrinker_freed_bytes
    );
    assert!(after.reclaims > reclaims, "the allocation did not reclaim");
    assert!(
        after.shrinker_freed_bytes > 0,
        "the shrinkers freed nothing"
    );
    assert_eq!(
        NESTED.load(Ordering::Relaxed),
        0,
        "the shrinkers ran inside a shrinker"
    );
    println!("CHILD DONE");
}

#[test]
fn running_shrinkers_never_waits_for_the_registry() {
    if watchdog::in_child() {
        child();
        return;
    }
    // The watchdog: a deadlocked child is killed (not a timing assertion:
    // the child needs milliseconds; a minute only bounds a hang).
    let watchdog::Outcome { stdout, stderr, .. } = watchdog::run_ok(
        "running_shrinkers_never_waits_for_the_registry",
        &[
            ("ANYALLOC_MEMORY", "8m"),
            ("ANYALLOC_GROW", "0"),
            ("ANYALLOC_MAINTENANCE", "0"),
            ("ANYALLOC_CPUS", "1"),
        ],
        Duration::from_secs(60),
        "running the shrinkers",
    );
    println!("child stdout:\n{stdout}\nchild stderr:\n{stderr}");
    assert!(stdout.contains("CHILD DONE"));
}
