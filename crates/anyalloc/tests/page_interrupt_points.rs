//! Interrupt points (feature `interrupt-points`): re-entry at every critical
//! section of the page allocator, deterministically.
//!
//! A hook installed with `interrupt::set_hook` runs where a signal handler
//! could land: at each site it allocates orders 0..=3 and one order of 4..=10
//! (64 KiB to 4 MiB, the zone try-lock path) with the nolock path, frees them
//! with the nolock path (keeping one, sometimes, to free at the *next*
//! site), and, at sites where the interrupted operation holds the
//! zone lock, nolock-frees a prepared order-4 block: order 4 has no per-CPU
//! list and the zone lock is held by the interrupted operation itself, so
//! that free is deferred every time, which makes the `DeferredPush` site
//! (and the following `DeferredDrain`) fire deterministically. The hook
//! nests two deep (a handler inside a handler), as two signals can.
//!
//! The driver runs normal-path and nolock operations that reach every site:
//! per-CPU hits and refills, a slot over `high` draining, direct zone
//! allocations and frees above order 3 on both paths (the nolock ones hold
//! the zone through a try-lock: `NolockZoneAlloc`, `NolockZoneFree`), splits
//! and merges. Asserted: every declared page site fired and saw nolock
//! successes; inside a nolock zone try-lock section (zone held by the
//! interrupted call: waiting would hang the thread on its own lock) the
//! hook's large allocations were still served, from the zone's nolock stock
//! or deferred stack, and with only a slot held they were served; patterns
//! intact, conservation every round, and after freeing everything and
//! `drain()` every page back on the buddy lists with every invariant holding.

mod common;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, PageAllocator, MAX_ORDER, PCP_MAX_ORDER};
use anyalloc_storm::{Stash, XorShift};
use common::{check, fill, pack, unpack};

const SITES: usize = 17;
/// Hook nesting: the driver's operation (depth 0) and two handler levels.
const MAX_DEPTH: usize = 2;

static PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
static DEPTH: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static FIRED: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static REENTERED: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static OK: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static FAIL: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
/// The hook's large (order 4..=10) nolock allocations at depth 0, by site.
static LARGE_OK: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static LARGE_FAIL: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// Kinds of the blocks' owner tags (`common::pack`): the driver's, the
/// hook's, the prepared order-4 blocks, the steal chain's block.
const KIND_DRIVER: usize = 0;
const KIND_HOOK: usize = 1;
const KIND_BIG: usize = 2;
const KIND_CHAIN: usize = 3;
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

/// What the hook does: `PROBE` (the re-entry above at every site), `CHAIN`
/// (the deterministic steal, see `chain`), `WAKE` (the contended unlock,
/// see `wake_phase`).
const PROBE: usize = 0;
const CHAIN: usize = 1;
const WAKE: usize = 2;
/// Only the `StockHandlerLevels` site re-enters (see the stocking step).
const STOCK: usize = 3;
/// No re-entry (a drain that must leave every slot empty).
const OFF: usize = 4;
static MODE: AtomicUsize = AtomicUsize::new(PROBE);
static STAGE: AtomicUsize = AtomicUsize::new(0);
/// The chain's order-0 block (prepared by the driver) and whether its free
/// with every slot and the zone held was deferred.
static CHAIN_BLOCK: AtomicUsize = AtomicUsize::new(0);
static CHAIN_PARKED: AtomicU64 = AtomicU64::new(0);
/// Deferred frees made by the hook at the `StealDeferred` site.
static STEAL_SITE_DEFERRED: AtomicU64 = AtomicU64::new(0);
/// WAKE: the helper thread may start, and is waiting on the zone lock.
static GO: AtomicBool = AtomicBool::new(false);
static WAITING: AtomicBool = AtomicBool::new(false);
/// Set once the hook at `ZoneWake` has done its nolock work (or the wake
/// phase's allocation returned): until then the waiter keeps waiting, so it
/// cannot take the zone lock away from the hook's allocations.
static WAKE_SERVED: AtomicBool = AtomicBool::new(false);

std::thread_local! {
    /// Only the test thread's critical sections are re-entered (the WAKE
    /// phase has a helper thread).
    static DRIVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

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
            | Site::NolockZoneAlloc
            | Site::NolockZoneFree
            | Site::BuddySplit
            | Site::BuddyMerge
            | Site::DeferredDrain
            | Site::StockHandlerLevels
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
    if !DRIVER.get() {
        return;
    }
    FIRED[i].fetch_add(1, Ordering::Relaxed);
    let depth = DEPTH.load(Ordering::Relaxed);
    match MODE.load(Ordering::Relaxed) {
        CHAIN => {
            DEPTH.store(depth + 1, Ordering::Relaxed);
            chain(site, i, depth);
            DEPTH.store(depth, Ordering::Relaxed);
            return;
        }
        STOCK if site != Site::StockHandlerLevels => return,
        OFF => return,
        WAKE if site != Site::ZoneWake => {
            if site == Site::ZoneAlloc && STAGE.load(Ordering::Relaxed) == 0 {
                // The test thread holds the zone lock: let the helper
                // thread wait for it (the lock becomes contended).
                STAGE.store(1, Ordering::Relaxed);
                GO.store(true, Ordering::Release);
                while !WAITING.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
            }
            return;
        }
        _ => {}
    }
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
    if site == Site::ZoneWake {
        WAKE_SERVED.store(true, Ordering::Release);
    }
}

/// What a handler that landed at `site` does.
fn reenter(site: Site, i: usize, depth: usize) {
    REENTERED[i].fetch_add(1, Ordering::Relaxed);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let pa = pa();
    // Orders 0..=3 from the per-CPU lists, then every fourth time one large
    // order (the zone try-lock path), a different one each time.
    let large = PCP_MAX_ORDER + 1 + (n / 4 % u64::from(MAX_ORDER - PCP_MAX_ORDER)) as u32;
    let mut got = [0usize; PCP_MAX_ORDER as usize + 2];
    let orders = (0..=PCP_MAX_ORDER).chain(n.is_multiple_of(4).then_some(large));
    for (k, order) in orders.enumerate() {
        let p = pa.alloc_pages_nolock(order);
        if order == large && depth == 0 {
            let count = if p.is_some() { &LARGE_OK } else { &LARGE_FAIL };
            count[i].fetch_add(1, Ordering::Relaxed);
        }
        match p {
            Some(p) => {
                OK[i].fetch_add(1, Ordering::Relaxed);
                let h = pack(p.as_ptr() as usize, order, KIND_HOOK);
                // SAFETY: just allocated: owned here.
                unsafe { fill(h) };
                got[k] = h;
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
        let keep = n.is_multiple_of(3) && k as u64 == n % 5;
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

/// Nolock-allocates one block of `order` at `site` and frees it again
/// (counted like `reenter`'s allocations).
fn alloc_free(i: usize, order: u32) {
    match pa().alloc_pages_nolock(order) {
        Some(p) => {
            OK[i].fetch_add(1, Ordering::Relaxed);
            let h = pack(p.as_ptr() as usize, order, KIND_HOOK);
            // SAFETY: just allocated: owned here.
            unsafe { fill(h) };
            nolock_free_checked(h);
        }
        None => {
            FAIL[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The deterministic steal. The driver's order-0 refill holds the level-0
/// slot and the zone lock (`PcpRefill`); a handler there allocates: the
/// level-1 slot (`PcpAlloc`), where a nested handler allocates: level 2
/// (`PcpAlloc`), where a third one, with every slot and the zone held,
/// frees an order-0 block (parked on the deferred stack: there is nowhere
/// else) and allocates one: the only place left is the deferred stack, so it
/// steals the block back (`StealDeferred`). There a fourth handler
/// allocates (nothing to find) and frees an order-4 block, which is
/// deferred too, while the steal is in progress.
fn chain(site: Site, i: usize, depth: usize) {
    let stage = STAGE.load(Ordering::Relaxed);
    match (stage, depth, site) {
        (0, 0, Site::PcpRefill) | (1, 1, Site::PcpAlloc) => {
            STAGE.store(stage + 1, Ordering::Relaxed);
            REENTERED[i].fetch_add(1, Ordering::Relaxed);
            alloc_free(i, 0);
        }
        (2, 2, Site::PcpAlloc) => {
            STAGE.store(3, Ordering::Relaxed);
            REENTERED[i].fetch_add(1, Ordering::Relaxed);
            let before = pa().stats().nolock_free_deferred;
            nolock_free_checked(CHAIN_BLOCK.swap(0, Ordering::Relaxed));
            CHAIN_PARKED.store(
                pa().stats().nolock_free_deferred - before,
                Ordering::Relaxed,
            );
            alloc_free(i, 0);
        }
        (3, 3, Site::StealDeferred) => {
            STAGE.store(4, Ordering::Relaxed);
            REENTERED[i].fetch_add(1, Ordering::Relaxed);
            for order in 0..=PCP_MAX_ORDER {
                alloc_free(i, order);
            }
            let before = pa().stats().nolock_free_deferred;
            let h = BIG.take(1).expect("an order-4 block");
            nolock_free_checked(h);
            STEAL_SITE_DEFERRED.store(
                pa().stats().nolock_free_deferred - before,
                Ordering::Relaxed,
            );
        }
        _ => {}
    }
}

/// Blocks the driver holds (packed handles).
struct Held(Vec<usize>);

impl Held {
    fn alloc(&mut self, pa: &PageAllocator, order: u32, nolock: bool) {
        let p = if nolock {
            pa.alloc_pages_nolock(order)
        } else {
            Some(pa.alloc_pages(order).expect("memory to spare"))
        };
        if let Some(p) = p {
            let h = pack(p.as_ptr() as usize, order, KIND_DRIVER);
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

/// Growth: an allocator that starts small grows a zone; the hook re-enters
/// with the growth lock held (`ZoneGrow`). Afterwards every page of both
/// zones is back.
fn grow_phase() {
    let small: &'static PageAllocator = Box::leak(Box::new(
        PageAllocator::new(Config::default().memory(4 << 20).cpus(1)).unwrap(),
    ));
    PA.store(
        small as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    interrupt::set_hook(Some(hook));
    let mut held = Held(Vec::new());
    while small.stats().zones < 2 {
        held.alloc(small, 7, false);
    }
    interrupt::set_hook(None);
    while !held.0.is_empty() {
        held.free(small, 0, false);
    }
    if let h @ 1.. = CARRY.swap(0, Ordering::AcqRel) {
        nolock_free_checked(h);
    }
    small.drain();
    let s = small.stats();
    assert_eq!(s.zones, 2);
    assert_eq!(s.free_pages, s.total_pages, "growth: pages lost");
    assert_eq!(small.check_invariants(), Ok(()));
}

/// A platform whose `wait` says that a waiter is waiting (and spins until
/// the word changes): the test knows when the zone lock is contended. It
/// also spins until the hook at `ZoneWake` is served (`WAKE_SERVED`):
/// otherwise the waiter, which sees the unlock before the wake, could take
/// the zone lock while the hook's nolock allocations need it.
struct WaitPlatform;
impl anyalloc::Platform for WaitPlatform {
    fn cpu_id(&self) -> usize {
        0
    }
    fn cpu_count(&self) -> usize {
        1
    }
    fn wait(&self, word: &std::sync::atomic::AtomicU32, expected: u32) {
        WAITING.store(true, Ordering::Release);
        while word.load(Ordering::Acquire) == expected || !WAKE_SERVED.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
}
static WAIT_PLATFORM: WaitPlatform = WaitPlatform;

/// The zone guard's wake: the test thread holds the zone lock (a direct
/// allocation, `ZoneAlloc`) until a helper thread waits for it, so its
/// unlock wakes a waiter and the hook re-enters there (`ZoneWake`).
fn wake_phase() {
    let region: &'static mut [u8] = Box::leak(vec![0u8; 16 << 20].into_boxed_slice());
    // SAFETY: a leaked region only this allocator uses.
    let pa2: &'static PageAllocator = Box::leak(Box::new(
        unsafe {
            PageAllocator::from_region(
                NonNull::new(region.as_mut_ptr()).unwrap(),
                region.len(),
                &WAIT_PLATFORM,
                Config::default(),
            )
        }
        .unwrap(),
    ));
    PA.store(
        pa2 as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    let helper = std::thread::spawn(move || {
        while !GO.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let p = pa2.alloc_pages(5).expect("memory to spare");
        // SAFETY: allocated just above with order 5.
        unsafe { pa2.free_pages(p, 5) };
    });
    let wake = site_index(Site::ZoneWake).unwrap();
    let before = FIRED[wake].load(Ordering::Relaxed);
    MODE.store(WAKE, Ordering::Relaxed);
    STAGE.store(0, Ordering::Relaxed);
    interrupt::set_hook(Some(hook));
    let p = pa2.alloc_pages(5).expect("memory to spare");
    interrupt::set_hook(None);
    // If the hook never ran at `ZoneWake`, the waiter must not wait forever
    // (the assertion below reports it).
    WAKE_SERVED.store(true, Ordering::Release);
    MODE.store(PROBE, Ordering::Relaxed);
    helper.join().unwrap();
    assert!(
        FIRED[wake].load(Ordering::Relaxed) > before,
        "the unlock did not wake the waiter"
    );
    // SAFETY: allocated just above with order 5.
    unsafe { pa2.free_pages(p, 5) };
    if let h @ 1.. = CARRY.swap(0, Ordering::AcqRel) {
        nolock_free_checked(h);
    }
    pa2.drain();
    let s = pa2.stats();
    assert_eq!(s.free_pages, s.total_pages, "wake: pages lost");
    assert_eq!(pa2.check_invariants(), Ok(()));
}

#[test]
fn nolock_reentry_at_every_page_site() {
    DRIVER.set(true);
    assert_eq!(Site::PAGE.len(), SITES);
    // One CPU slot set: every step lands on the same slots, run to run.
    let pa: &'static PageAllocator = Box::leak(Box::new(
        PageAllocator::new(Config::default().memory(32 << 20).cpus(1).grow(false)).unwrap(),
    ));
    PA.store(
        pa as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    let total = pa.stats().total_pages;
    let mut held = Held(Vec::new());
    let mut rng = XorShift::new(7);
    interrupt::set_hook(Some(hook));

    // The most pages the nolock stock held between rounds.
    let mut stock_seen = 0;
    for round in 0..40u32 {
        // Prepared order-4 blocks for deferred frees (direct zone allocs).
        BIG_ARMED.store(false, Ordering::Relaxed);
        stock_big(pa);
        BIG_ARMED.store(true, Ordering::Relaxed);
        // Per-CPU hits and refills, orders 0..=3, both paths.
        for k in 0..12 {
            held.alloc(pa, k % 4, k % 3 == 2);
        }
        // Direct zone allocations (orders above 3): ZoneAlloc, splits; on
        // the nolock path a zone try-lock (NolockZoneAlloc), up to 4 MiB.
        for order in 4..=6 {
            held.alloc(pa, order, false);
        }
        for order in PCP_MAX_ORDER + 1..=MAX_ORDER {
            if order <= 7 || round % 4 == order % 4 {
                held.alloc(pa, order, true);
            }
        }
        // A slot over `high` drains (PcpDrain, merges).
        let base = held.0.len();
        for _ in 0..120 {
            held.alloc(pa, 0, false);
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
        stock_seen = stock_seen.max(s.stock_pages);
        assert_eq!(
            s.free_pages + outside_pages(&held),
            total,
            "round {round}: pages lost or duplicated"
        );
        assert_eq!(pa.check_invariants(), Ok(()), "round {round}");
    }

    // Stocking the handler levels: after a drain every slot is empty, so
    // the next normal refill stocks levels 1 and 2 (the hook re-enters only
    // there: at level 2, level 1 was just stocked).
    MODE.store(OFF, Ordering::Relaxed);
    pa.drain();
    MODE.store(STOCK, Ordering::Relaxed);
    held.alloc(pa, 0, false);
    MODE.store(PROBE, Ordering::Relaxed);

    // The deterministic steal (see `chain`), from empty slots.
    BIG_ARMED.store(false, Ordering::Relaxed);
    stock_big(pa);
    let p = pa.alloc_pages(0).expect("memory to spare");
    let h = pack(p.as_ptr() as usize, 0, KIND_CHAIN);
    // SAFETY: just allocated: owned, then handed to the chain.
    unsafe { fill(h) };
    CHAIN_BLOCK.store(h, Ordering::Relaxed);
    MODE.store(OFF, Ordering::Relaxed);
    pa.drain();
    MODE.store(CHAIN, Ordering::Relaxed);
    STAGE.store(0, Ordering::Relaxed);
    held.alloc(pa, 0, false);
    MODE.store(PROBE, Ordering::Relaxed);
    assert_eq!(STAGE.load(Ordering::Relaxed), 4, "the steal chain ran");
    assert_eq!(
        CHAIN_PARKED.load(Ordering::Relaxed),
        1,
        "a free with every slot and the zone held was not deferred"
    );
    assert_eq!(
        STEAL_SITE_DEFERRED.load(Ordering::Relaxed),
        1,
        "a free inside the steal was not deferred"
    );
    pa.drain();
    let s = pa.stats();
    assert_eq!(
        s.free_pages + outside_pages(&held),
        total,
        "after the steal"
    );
    assert_eq!(pa.check_invariants(), Ok(()), "after the steal");

    interrupt::set_hook(None);
    let stats = pa.stats();
    println!("site             fired  reentered  nolock ok  nolock fail  large ok/fail (depth 0)");
    for (i, site) in Site::PAGE.iter().enumerate() {
        println!(
            "{:<15} {:>6} {:>10} {:>10} {:>12}  {}/{}",
            format!("{site:?}"),
            FIRED[i].load(Ordering::Relaxed),
            REENTERED[i].load(Ordering::Relaxed),
            OK[i].load(Ordering::Relaxed),
            FAIL[i].load(Ordering::Relaxed),
            LARGE_OK[i].load(Ordering::Relaxed),
            LARGE_FAIL[i].load(Ordering::Relaxed)
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
        let nolock = held.0.len().is_multiple_of(2);
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

    grow_phase();
    wake_phase();
    for (i, site) in Site::PAGE.iter().enumerate() {
        println!(
            "{site:?}: fired {}, reentered {}, nolock ok {}, fail {}",
            FIRED[i].load(Ordering::Relaxed),
            REENTERED[i].load(Ordering::Relaxed),
            OK[i].load(Ordering::Relaxed),
            FAIL[i].load(Ordering::Relaxed)
        );
    }
    for (i, site) in Site::PAGE.iter().enumerate() {
        assert!(
            FIRED[i].load(Ordering::Relaxed) > 0,
            "site {site:?} never fired"
        );
        assert!(
            REENTERED[i].load(Ordering::Relaxed) > 0,
            "no nolock work was done at {site:?}"
        );
        // Inside the steal every slot and the zone are held by the contexts
        // below (by construction): nothing can be found there.
        if *site != Site::StealDeferred {
            assert!(
                OK[i].load(Ordering::Relaxed) > 0,
                "no nolock allocation succeeded at {site:?}"
            );
        }
    }
    assert!(stats.nolock_free_deferred > 0, "no free was deferred");
    // The zone try-lock path: inside a nolock zone section the zone is held
    // by the interrupted call itself, so a large allocation there cannot use
    // the buddy lists; it is served from the stock or the deferred stack
    // (the thread would hang had it waited). With only a slot held the zone
    // is free and large allocations are served from it.
    let at = |s: Site| site_index(s).unwrap();
    for s in [Site::NolockZoneAlloc, Site::NolockZoneFree] {
        assert!(
            LARGE_OK[at(s)].load(Ordering::Relaxed) > 0,
            "no large nolock allocation was served inside {s:?} (zone held)"
        );
    }
    assert!(stock_seen > 0, "the nolock stock was never filled");
    for s in [Site::PcpAlloc, Site::PcpFree] {
        assert!(
            LARGE_OK[at(s)].load(Ordering::Relaxed) > 0,
            "no large nolock allocation succeeded at {s:?} (zone lock free)"
        );
    }
    assert!(stats.nolock_alloc_fail_busy > 0, "no busy zone was seen");
    assert_eq!(
        stats.nolock_large_alloc_fail_empty, 0,
        "a large nolock allocation found no memory with 32 MiB"
    );
    assert!(CARRIED.load(Ordering::Relaxed) > 0);
}

/// Fills the stash of prepared order-4 blocks for deferred frees (direct
/// zone allocations) up to 8.
fn stock_big(pa: &PageAllocator) {
    while BIG.len() < 8 {
        let p = pa.alloc_pages(4).expect("memory to spare");
        let h = pack(p.as_ptr() as usize, 4, KIND_BIG);
        // SAFETY: just allocated: owned, then handed to the stash.
        unsafe { fill(h) };
        assert!(BIG.put(h, 0));
    }
}
