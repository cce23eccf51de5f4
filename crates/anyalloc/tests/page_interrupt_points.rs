//! Interrupt points (feature `interrupt-points`): re-entry at every critical
//! section of the page allocator, deterministically.
//!
//! A hook installed with `interrupt::set_hook` runs where a signal handler
//! could land: at each site it allocates orders 0..=3 with the nolock path,
//! frees them with the nolock path (keeping one, sometimes, to free at the
//! *next* site), and, at sites where the interrupted operation holds the
//! zone lock, nolock-frees a prepared order-4 block: order 4 has no per-CPU
//! list and the zone lock is held by the interrupted operation itself, so
//! that free is deferred every time, which makes the `DeferredPush` site
//! (and the following `DeferredDrain`) fire deterministically. The hook
//! nests two deep (a handler inside a handler), as two signals can.
//!
//! The driver runs normal-path (and some nolock) operations that reach every
//! site: per-CPU hits and refills, a slot over `high` draining, direct zone
//! allocations and frees above order 3, splits and merges. Asserted: every
//! declared page site fired and saw nolock successes, patterns intact,
//! conservation every round, and after freeing everything and `drain()`
//! every page back on the buddy lists with every invariant holding.

mod common;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, PageAllocator, NOLOCK_MAX_ORDER};
use common::{check, fill, pack, unpack, Stash, XorShift};

const SITES: usize = 10;
/// Hook nesting: the driver's operation (depth 0) and two handler levels.
const MAX_DEPTH: usize = 2;

static PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
static DEPTH: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static FIRED: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static REENTERED: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static OK: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static FAIL: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// A block allocated at one site and freed at the next.
static CARRY: AtomicUsize = AtomicUsize::new(0);
static CARRIED: AtomicU64 = AtomicU64::new(0);
/// Order-4 blocks (normal path) for the hook to nolock-free under the zone
/// lock: deferred frees on demand.
static BIG: Stash<16> = Stash::new();
static BIG_FREED: AtomicU64 = AtomicU64::new(0);
/// Off while the driver restocks `BIG` (its own order-4 allocations pass
/// zone-locked sites too).
static BIG_ARMED: AtomicBool = AtomicBool::new(false);
/// A `DeferredPush` re-entry happened at this depth + 1 (0: none pending).
/// The push retries its CAS if the re-entry changed the stack (a steal
/// does), and the retry passes the site again: re-entering at every retry
/// would loop forever, which no real interrupt would do.
static PUSH_REENTERED_AT: AtomicUsize = AtomicUsize::new(0);

fn site_index(site: Site) -> Option<usize> {
    Site::PAGE.iter().position(|&s| s == site)
}

/// Sites where the interrupted (depth-0, normal-path) operation holds the
/// zone lock.
fn zone_locked(site: Site) -> bool {
    matches!(
        site,
        Site::PcpRefill
            | Site::PcpDrain
            | Site::ZoneAlloc
            | Site::ZoneFree
            | Site::BuddySplit
            | Site::BuddyMerge
            | Site::DeferredDrain
    )
}

fn pa() -> &'static PageAllocator {
    // SAFETY: set from a leaked Box before the hook is installed.
    unsafe { &*PA.load(Ordering::Acquire) }
}

fn nolock_free_checked(h: usize) {
    // SAFETY: `h` was taken out of a single owner (local, CARRY, BIG).
    if !unsafe { check(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let (ptr, order, _) = unpack(h);
    // SAFETY: allocated on this allocator with `order`, owned here.
    unsafe { pa().free_pages_nolock(NonNull::new_unchecked(ptr as *mut u8), order) };
}

fn hook(site: Site) {
    let Some(i) = site_index(site) else {
        return;
    };
    FIRED[i].fetch_add(1, Ordering::Relaxed);
    let depth = DEPTH.load(Ordering::Relaxed);
    if depth >= MAX_DEPTH {
        return;
    }
    let pending = PUSH_REENTERED_AT.load(Ordering::Relaxed);
    if site == Site::DeferredPush {
        if pending == depth + 1 {
            return; // a retry of the push we already re-entered
        }
        PUSH_REENTERED_AT.store(depth + 1, Ordering::Relaxed);
    } else if pending != 0 && depth < pending {
        PUSH_REENTERED_AT.store(0, Ordering::Relaxed);
    }
    DEPTH.store(depth + 1, Ordering::Relaxed);
    reenter(site, i, depth);
    DEPTH.store(depth, Ordering::Relaxed);
}

/// What a handler that landed at `site` does.
fn reenter(site: Site, i: usize, depth: usize) {
    REENTERED[i].fetch_add(1, Ordering::Relaxed);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let pa = pa();
    let mut got = [0usize; NOLOCK_MAX_ORDER as usize + 1];
    for order in 0..=NOLOCK_MAX_ORDER {
        match pa.alloc_pages_nolock(order) {
            Some(p) => {
                OK[i].fetch_add(1, Ordering::Relaxed);
                let h = pack(p.as_ptr() as usize, order, (n & 0x1ff) as u32);
                // SAFETY: just allocated: owned here.
                unsafe { fill(h) };
                got[order as usize] = h;
            }
            None => {
                FAIL[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // The block kept at the previous site is freed here.
    let carried = CARRY.swap(0, Ordering::AcqRel);
    if carried != 0 {
        CARRIED.fetch_add(1, Ordering::Relaxed);
        nolock_free_checked(carried);
    }
    for (k, &h) in got.iter().enumerate() {
        if h == 0 {
            continue;
        }
        let keep = n % 3 == 0 && k as u64 == n % 4;
        if keep
            && CARRY
                .compare_exchange(0, h, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            continue;
        }
        nolock_free_checked(h);
    }
    // Under the interrupted operation's zone lock: a deferred free.
    if depth == 0 && zone_locked(site) && BIG_ARMED.load(Ordering::Relaxed) {
        if let Some(h) = BIG.take(n as usize) {
            BIG_FREED.fetch_add(1, Ordering::Relaxed);
            nolock_free_checked(h);
        }
    }
}

/// Blocks the driver holds (packed handles).
struct Held(Vec<usize>);

impl Held {
    fn alloc(&mut self, pa: &PageAllocator, order: u32, nolock: bool, key: u32) {
        let p = if nolock {
            pa.alloc_pages_nolock(order)
        } else {
            Some(pa.alloc_pages(order).expect("memory to spare"))
        };
        if let Some(p) = p {
            let h = pack(p.as_ptr() as usize, order, key & 0x1ff);
            // SAFETY: just allocated: owned by the driver.
            unsafe { fill(h) };
            self.0.push(h);
        }
    }

    fn free(&mut self, pa: &PageAllocator, idx: usize, nolock: bool) {
        let h = self.0.swap_remove(idx);
        // SAFETY: owned by the driver until this free.
        assert!(unsafe { check(h) }, "driver block {h:#x} was overwritten");
        let (ptr, order, _) = unpack(h);
        // SAFETY: allocated on `pa` with `order`, owned by the driver.
        unsafe {
            let p = NonNull::new_unchecked(ptr as *mut u8);
            if nolock {
                pa.free_pages_nolock(p, order)
            } else {
                pa.free_pages(p, order)
            }
        }
    }

    fn pages(&self) -> usize {
        self.0.iter().map(|&h| 1usize << unpack(h).1).sum()
    }
}

/// Pages held outside the allocator: the driver's, the hook's carried block,
/// the prepared order-4 blocks (read only between operations).
fn outside_pages(held: &Held) -> usize {
    let carry = match CARRY.load(Ordering::Relaxed) {
        0 => 0,
        h => 1usize << unpack(h).1,
    };
    let big = BIG.len() << 4;
    held.pages() + carry + big
}

#[test]
fn nolock_reentry_at_every_page_site() {
    // One CPU slot set: every step lands on the same slots, run to run.
    let pa: &'static PageAllocator = Box::leak(Box::new(
        PageAllocator::new(Config::default().memory(16 << 20).cpus(1).grow(false)).unwrap(),
    ));
    PA.store(
        pa as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    let total = pa.stats().total_pages;
    let mut held = Held(Vec::new());
    let mut rng = XorShift::new(7);
    interrupt::set_hook(Some(hook));

    for round in 0..40u32 {
        // Prepared order-4 blocks for deferred frees (direct zone allocs).
        BIG_ARMED.store(false, Ordering::Relaxed);
        while BIG.len() < 8 {
            let p = pa.alloc_pages(4).expect("memory to spare");
            let h = pack(p.as_ptr() as usize, 4, round & 0x1ff);
            // SAFETY: just allocated: owned, then handed to the stash.
            unsafe { fill(h) };
            assert!(BIG.put(h, 0));
        }
        BIG_ARMED.store(true, Ordering::Relaxed);
        // Per-CPU hits and refills, orders 0..=3, both paths.
        for k in 0..12 {
            held.alloc(pa, k % 4, k % 3 == 2, round);
        }
        // Direct zone allocations (orders above 3): ZoneAlloc, splits.
        for order in 4..=6 {
            held.alloc(pa, order, false, round);
        }
        // A slot over `high` drains (PcpDrain, merges).
        let base = held.0.len();
        for _ in 0..120 {
            held.alloc(pa, 0, false, round);
        }
        while held.0.len() > base {
            let last = held.0.len() - 1;
            held.free(pa, last, false);
        }
        // Free a random half, by both paths (PcpFree, ZoneFree, merges).
        let n = held.0.len() / 2;
        for _ in 0..n {
            let idx = rng.below(held.0.len() as u64) as usize;
            let nolock = rng.below(2) == 0;
            held.free(pa, idx, nolock);
        }
        if round % 10 == 9 {
            pa.drain();
        }
        // Between operations: exact conservation and structure.
        let s = pa.stats();
        assert_eq!(
            s.free_pages + outside_pages(&held),
            total,
            "round {round}: pages lost or duplicated"
        );
        assert_eq!(pa.check_invariants(), Ok(()), "round {round}");
    }

    interrupt::set_hook(None);
    let stats = pa.stats();
    println!("site            fired  reentered  nolock ok  nolock fail");
    for (i, site) in Site::PAGE.iter().enumerate() {
        println!(
            "{:<14} {:>6} {:>10} {:>10} {:>12}",
            format!("{site:?}"),
            FIRED[i].load(Ordering::Relaxed),
            REENTERED[i].load(Ordering::Relaxed),
            OK[i].load(Ordering::Relaxed),
            FAIL[i].load(Ordering::Relaxed)
        );
    }
    println!(
        "carried frees {}, order-4 frees under the zone lock {}, deferred frees {}, stats {:?}",
        CARRIED.load(Ordering::Relaxed),
        BIG_FREED.load(Ordering::Relaxed),
        stats.nolock_free_deferred,
        stats
    );

    // Clean up: everything back, all coalesced.
    if let h @ 1.. = CARRY.swap(0, Ordering::AcqRel) {
        held.0.push(h);
    }
    for h in BIG.drain() {
        held.0.push(h);
    }
    while !held.0.is_empty() {
        let nolock = held.0.len() % 2 == 0;
        held.free(pa, 0, nolock);
    }
    pa.drain();
    let end = pa.stats();
    assert_eq!(
        VIOLATIONS.load(Ordering::Relaxed),
        0,
        "a block was overwritten"
    );
    assert_eq!(end.free_pages, end.total_pages);
    assert_eq!(end.buddy_pages, end.total_pages);
    assert_eq!(pa.check_invariants(), Ok(()));

    for (i, site) in Site::PAGE.iter().enumerate() {
        assert!(
            FIRED[i].load(Ordering::Relaxed) > 0,
            "site {site:?} never fired"
        );
        assert!(
            OK[i].load(Ordering::Relaxed) > 0,
            "no nolock allocation succeeded at {site:?}"
        );
    }
    assert!(stats.nolock_free_deferred > 0, "no free was deferred");
    assert!(CARRIED.load(Ordering::Relaxed) > 0);
}
