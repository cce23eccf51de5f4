//! Interrupt points of the object allocator (feature `interrupt-points`).
//!
//! A hook installed with [`anyalloc::interrupt::set_hook`] runs nolock
//! allocations and frees on the same heap *at* every critical section, as a
//! signal handler that interrupted the thread there would, and nests: the
//! hook's own operations reach sites too, where the hook runs again (up to a
//! bounded depth), so up to four contexts of one thread are inside the heap
//! at once and hold every level slot of a class.
//!
//! The test drives normal and nolock operations so that every site in
//! [`Site::HEAP`] fires, makes a deferred object free happen
//! deterministically (a handler nested two deep inside a flush, with every
//! level slot of the class and its node lock held by the contexts below it),
//! checks every object's pattern when it is freed, and at the end, after
//! `drain()`, requires every page back on the buddy lists.
//!
//! Runs single-threaded on a `Config::cpus(1)` heap without a maintenance
//! thread: every context maps to the same CPU's slots whatever CPU the
//! thread runs on, so the nesting is exact (maintenance passes run on the
//! driver thread, with `Heap::maintain`).

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::{mix64, Stash};

// ----- objects: handles and patterns ----------------------------------------

/// An object's handle: the storm kit's [`Entry`] (its address and an owner
/// tag with a fresh nonce), the object filled with the kit's owner-tagged
/// pattern for `size` bytes (the size is in the pattern's header).
///
/// # Safety
/// The caller owns the object behind `p`, at least `size >= 8` bytes.
unsafe fn filled(p: NonNull<u8>, size: usize) -> usize {
    let e = Entry::fresh(p.as_ptr() as usize, 0);
    // SAFETY: per the caller.
    unsafe { pattern::fill(e, size) };
    e.0
}

/// Whether the object behind `h` still holds its owner's pattern.
///
/// # Safety
/// The caller owns the object behind `h`, filled by [`filled`].
unsafe fn intact(h: usize) -> bool {
    // SAFETY: per the caller.
    unsafe { pattern::verify(Entry(h)) }.is_ok()
}

/// The object behind a handle.
fn ptr(h: usize) -> NonNull<u8> {
    // SAFETY: an entry's address is a live object's, never null.
    unsafe { NonNull::new_unchecked(Entry(h).ptr()) }
}

// ----- the hook's state --------------------------------------------------------

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());

const OFF: usize = 0;
/// At every site: nolock allocations and frees of several sizes, nesting.
const PROBE: usize = 1;
/// The deterministic deferred-free chain (see `chain`).
const CHAIN: usize = 2;
static MODE: AtomicUsize = AtomicUsize::new(OFF);
/// Request size of the class the driver is operating on.
static DRIVEN: AtomicUsize = AtomicUsize::new(64);
/// How many hook invocations of the driver thread are active.
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// Deepest hook invocation that runs heap operations.
const MAX_OP_DEPTH: usize = 2;
static RNG: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Only the driver thread's critical sections are re-entered.
    static DRIVER: Cell<bool> = const { Cell::new(false) };
}

const SITES: usize = 64;
/// Site hits: at any depth, and at depth 0 (inside a driver operation).
static FIRED: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static FIRED_DEPTH0: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
/// Nolock allocations tried / served by the hook, per site it ran at.
static TRIES: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static OKS: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
/// Objects whose pattern was damaged when they were freed.
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// Kept objects of any size / of the driven class, freed at a later site.
static KEEP: Stash<64> = Stash::new();
static KEEP_DRIVEN: Stash<64> = Stash::new();
/// Frees of kept driven-class objects in nested hooks (deferred when every
/// level slot and the node are held below).
static NESTED_FREES: AtomicU64 = AtomicU64::new(0);
const NESTED_FREE_BUDGET: u64 = 4000;
/// Whether the depth-0 site is one where the driver holds the node lock of
/// the driven class.
static DEPTH0_HOLDS_NODE: AtomicBool = AtomicBool::new(false);
/// Competing pushes made while another deferred push was half done.
static PUSH_RACES: AtomicU64 = AtomicU64::new(0);
const PUSH_RACE_BUDGET: u64 = 200;

/// A huge allocation the hook frees (nolock) at a huge-table site, while
/// the driver is in the middle of another huge allocation or free.
static KEEP_HUGE: AtomicUsize = AtomicUsize::new(0);
static HUGE_FREES: AtomicU64 = AtomicU64::new(0);

/// The chain's progress and results.
static CHAIN_STAGE: AtomicUsize = AtomicUsize::new(0);
static CHAIN_VICTIM: AtomicUsize = AtomicUsize::new(0);
static CHAIN_HELD: Stash<4> = Stash::new();
static CHAIN_DEFERRED_DELTA: AtomicU64 = AtomicU64::new(u64::MAX);
/// Objects of the driven class the chain frees after its victim (see
/// `chain`).
static CHAIN_DECOYS: [AtomicUsize; 512] = [const { AtomicUsize::new(0) }; 512];

/// Failed hook allocations by request size: `(size, at heap sites, at page
/// sites)`.
static FAILURES: [(AtomicUsize, AtomicU64, AtomicU64); 16] =
    [const { (AtomicUsize::new(0), AtomicU64::new(0), AtomicU64::new(0)) }; 16];

fn count_failure(size: usize, heap_site: bool) {
    for (s, at_heap, at_page) in &FAILURES {
        if s.compare_exchange(0, size, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            || s.load(Ordering::Relaxed) == size
        {
            bump(if heap_site { at_heap } else { at_page });
            return;
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn heap() -> &'static Heap {
    // SAFETY: set (to a leaked heap) before the hook is installed.
    unsafe { &*HEAP.load(Ordering::Acquire) }
}

fn random() -> u64 {
    mix64(RNG.fetch_add(1, Ordering::Relaxed))
}

/// A nolock allocation by the hook at `site`, filled with its pattern.
fn hook_alloc(site: Site, size: usize, align: usize) -> Option<usize> {
    bump(&TRIES[site as usize]);
    let Some(p) = heap().alloc_nolock(Layout::from_size_align(size, align).unwrap()) else {
        count_failure(size, Site::HEAP.contains(&site));
        return None;
    };
    bump(&OKS[site as usize]);
    if !(p.as_ptr() as usize).is_multiple_of(align) || heap().usable_size(p) < size {
        bump(&VIOLATIONS);
    }
    // SAFETY: just allocated: the hook owns it.
    Some(unsafe { filled(p, size) })
}

/// Checks and nolock-frees a hook-owned object.
fn hook_free(h: usize) {
    // SAFETY: the hook owns `h` (allocated by it, or taken out of a stash
    // with one swap).
    if !unsafe { intact(h) } {
        bump(&VIOLATIONS);
    }
    // SAFETY: a live object of this heap, owned here.
    unsafe { heap().free_nolock(ptr(h)) };
}

fn deferred_frees() -> u64 {
    heap().stats().nolock_free_deferred
}

/// Hook depth 0 (the driver is inside the heap): several sizes, the driven
/// class among them; keep some objects for later sites, free some kept ones.
fn probe(site: Site) {
    if matches!(site, Site::HugeBusy | Site::FreeHuge) {
        let h = KEEP_HUGE.swap(0, Ordering::Relaxed);
        if h != 0 {
            bump(&HUGE_FREES);
            // SAFETY: a live huge allocation of this heap, owned by the
            // stash until the swap above.
            unsafe { heap().free_nolock(NonNull::new_unchecked(h as *mut u8)) };
        }
    }
    let driven = DRIVEN.load(Ordering::Relaxed);
    for size in [8, driven, 100, 1000, 5000, 20000] {
        let r = random();
        let align = if size == driven {
            1
        } else {
            [1, 8, 16, 64][(r % 4) as usize]
        };
        if let Some(h) = hook_alloc(site, size, align) {
            let keep = (r >> 8).is_multiple_of(4);
            let kept = keep
                && if size == driven {
                    KEEP_DRIVEN.put(h, 0)
                } else {
                    KEEP.put(h, 0)
                };
            if !kept {
                hook_free(h);
            }
        }
    }
    if let Some(h) = KEEP.take(0) {
        hook_free(h);
    }
}

/// Hook depths 1 and 2: allocate an object of the driven class (falls back
/// to the next class when every level slot is held below us) and keep or
/// free it. At depth 2 inside a driver operation that holds the class's node
/// lock (refill, flush, slab list), also free a kept object of the class:
/// the driver, depth 0 and depth 1 may hold all three level slots, and then
/// the free is parked on the deferred stack. Those frees have a budget: a
/// deferred object is drained by the driver's next operation, whose sites
/// would defer more, and so on.
fn step(site: Site, depth: usize) {
    let driven = DRIVEN.load(Ordering::Relaxed);
    if depth == MAX_OP_DEPTH
        && DEPTH0_HOLDS_NODE.load(Ordering::Relaxed)
        && NESTED_FREES.load(Ordering::Relaxed) < NESTED_FREE_BUDGET
    {
        if let Some(h) = KEEP_DRIVEN.take(0) {
            bump(&NESTED_FREES);
            hook_free(h);
        }
    }
    if let Some(h) = hook_alloc(site, driven, 8) {
        if random().is_multiple_of(2) || !KEEP_DRIVEN.put(h, 0) {
            hook_free(h);
        }
    }
}

/// The deterministic deferred free. The driver allocates from the driven
/// class with its sheaves and barn drained, so the allocation refills from
/// the slabs: at that `SheafRefill` site it holds the class's level-0 slot
/// and its node lock (the barn, without a full sheaf, let go). Hook depth
/// 0 allocates: the level-1 slot (busy: level 0) is taken, and at its
/// `SheafAlloc` site hook depth 1 allocates again: level 2. At that `SheafAlloc` site hook depth 2
/// frees an object of the class: every level slot of this CPU is held and so
/// is the node lock, so the free must be parked on the deferred stack. It
/// frees the decoys after it: the two nested allocations, finding the node
/// lock held when they return, take objects off the deferred stack (one
/// each, and a main sheaf's worth at most), and the decoys keep the victim
/// below what they take, so objects stay parked for the drain below.
fn chain(site: Site, depth: usize) {
    let driven = DRIVEN.load(Ordering::Relaxed);
    let stage = CHAIN_STAGE.load(Ordering::Relaxed);
    match (depth, stage, site) {
        (0, 0, Site::SheafRefill) | (1, 1, Site::SheafAlloc) => {
            CHAIN_STAGE.store(stage + 1, Ordering::Relaxed);
            if let Some(h) = hook_alloc(site, driven, 8) {
                assert!(CHAIN_HELD.put(h, 0));
            }
        }
        (2, 2, Site::SheafAlloc) => {
            CHAIN_STAGE.store(3, Ordering::Relaxed);
            let victim = CHAIN_VICTIM.swap(0, Ordering::Relaxed);
            let before = deferred_frees();
            hook_free(victim);
            CHAIN_DEFERRED_DELTA.store(deferred_frees() - before, Ordering::Relaxed);
            for d in &CHAIN_DECOYS {
                let d = d.swap(0, Ordering::Relaxed);
                if d != 0 {
                    hook_free(d);
                }
            }
        }
        _ => {}
    }
}

fn hook(site: Site) {
    if !DRIVER.with(|d| d.get()) {
        return;
    }
    let depth = DEPTH.fetch_add(1, Ordering::Relaxed);
    bump(&FIRED[site as usize]);
    if depth == 0 {
        bump(&FIRED_DEPTH0[site as usize]);
    }
    match MODE.load(Ordering::Relaxed) {
        PROBE => {
            if depth == 0 {
                DEPTH0_HOLDS_NODE.store(
                    matches!(
                        site,
                        Site::SheafRefill | Site::SheafFlush | Site::PartialLocked
                    ),
                    Ordering::Relaxed,
                );
                probe(site);
            } else if depth <= MAX_OP_DEPTH {
                step(site, depth);
            }
            if site == Site::ObjectDeferredPush && depth <= MAX_OP_DEPTH + 1 {
                // A deferred push has linked its object but not published
                // it: push another one onto the same stack right now.
                if PUSH_RACES.load(Ordering::Relaxed) < PUSH_RACE_BUDGET {
                    if let Some(h) = KEEP_DRIVEN.take(0) {
                        bump(&PUSH_RACES);
                        hook_free(h);
                    }
                }
                // And allocate there.
                if let Some(h) = hook_alloc(site, DRIVEN.load(Ordering::Relaxed), 8) {
                    hook_free(h);
                }
            }
        }
        CHAIN => chain(site, depth),
        _ => {}
    }
    DEPTH.fetch_sub(1, Ordering::Relaxed);
}

// ----- the driver ----------------------------------------------------------------

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

fn driver_alloc(size: usize, nolock: bool) -> usize {
    let h = heap();
    let p = if nolock {
        h.alloc_nolock(layout(size))
    } else {
        h.alloc(layout(size))
    };
    // SAFETY: just allocated: the driver owns it.
    unsafe { filled(p.expect("driver allocation"), size) }
}

fn driver_free(h: usize, nolock: bool) {
    // SAFETY: the driver owns `h`.
    assert!(unsafe { intact(h) }, "driver object damaged");
    // SAFETY: a live object of this heap, owned here.
    unsafe {
        let p = ptr(h);
        if nolock {
            heap().free_nolock(p)
        } else {
            heap().free(p)
        }
    }
}

fn class_deferred(size: usize) -> usize {
    let s = heap().stats();
    let c = s.classes.iter().find(|c| c.size >= size).unwrap();
    c.deferred
}

fn site_name(i: usize) -> String {
    let all = Site::PAGE
        .iter()
        .chain(Site::HEAP)
        .chain(Site::RELEASE)
        .chain(Site::ACCOUNT);
    all.clone()
        .find(|s| **s as usize == i)
        .map_or(format!("site {i}"), |s| format!("{s:?}"))
}

#[test]
fn every_heap_site_survives_nolock_reentry() {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(64 << 20)
                .cpus(1)
                .grow(false)
                .maintenance(false),
        )
        .unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    DRIVER.with(|d| d.set(true));
    set_hook(Some(hook));

    // 1. The deterministic deferred free, on a fresh heap.
    let driven = 64;
    DRIVEN.store(driven, Ordering::Relaxed);
    CHAIN_VICTIM.store(driver_alloc(driven, false), Ordering::Relaxed);
    let cap = heap
        .stats()
        .classes
        .iter()
        .find(|c| c.size >= driven)
        .unwrap()
        .sheaf_capacity;
    assert!(2 * cap + 4 <= CHAIN_DECOYS.len());
    for d in &CHAIN_DECOYS[..2 * cap + 4] {
        d.store(driver_alloc(driven, false), Ordering::Relaxed);
    }
    // The class's sheaves and barn back to the slabs: the next allocation
    // refills from the slabs (and the chain runs inside it).
    heap.drain();
    MODE.store(CHAIN, Ordering::Relaxed);
    let objs = [driver_alloc(driven, false)];
    MODE.store(OFF, Ordering::Relaxed);
    assert_eq!(
        CHAIN_STAGE.load(Ordering::Relaxed),
        3,
        "the chain did not reach a free with every level slot held"
    );
    assert_eq!(
        CHAIN_DEFERRED_DELTA.load(Ordering::Relaxed),
        1,
        "a nolock free with every slot and the node held was not deferred"
    );
    let parked = class_deferred(driven);
    assert!(parked >= 1, "no deferred object is parked");
    // The nested allocations (node lock held) took objects off the stack.
    assert!(
        parked < 1 + 2 * cap + 4,
        "a nolock allocation with the node lock held took nothing deferred"
    );
    let drains_before = load(&FIRED[Site::ObjectDeferredDrain as usize]);
    // The next normal operation on the class drains the deferred stack.
    let h = driver_alloc(driven, false);
    assert_eq!(
        class_deferred(driven),
        0,
        "the deferred stack was not drained"
    );
    assert_eq!(
        load(&FIRED[Site::ObjectDeferredDrain as usize]),
        drains_before + parked as u64,
        "one drain site per parked object"
    );
    driver_free(h, false);
    for h in objs {
        driver_free(h, false);
    }
    while let Some(h) = CHAIN_HELD.take(0) {
        driver_free(h, false);
    }
    println!("chain: the nested free was deferred and then drained");
    let deferred_after_chain = deferred_frees();

    // 2. Probe every site while driving each class through its sheaves, the
    //    barn and the slabs, on both paths.
    MODE.store(PROBE, Ordering::Relaxed);
    for (round, driven) in [64usize, 8, 12, 1000, 4096, 8192].into_iter().enumerate() {
        DRIVEN.store(driven, Ordering::Relaxed);
        // More than main + spare + the barn hold for the larger classes
        // (whose barn is capped by bytes: 1110 objects of 1 KiB), 700 to
        // 1200 objects: flushes return objects to their slabs, refills take
        // them from the slabs.
        let class = *heap
            .stats()
            .classes
            .iter()
            .find(|c| c.size >= driven)
            .unwrap();
        let n = (class.barn_capacity + 3 * class.sheaf_capacity).clamp(700, 1200);
        let mut objs: Vec<usize> = (0..n).map(|i| driver_alloc(driven, i % 5 == 4)).collect();
        for (i, h) in objs.drain(..).enumerate() {
            driver_free(h, i % 3 == 2);
        }
        objs.extend((0..n).map(|i| driver_alloc(driven, i % 2 == 0)));
        // Free in a different order than allocated.
        let r = mix64(round as u64);
        let k = (r % n as u64) as usize;
        objs.rotate_left(k);
        for (i, h) in objs.drain(..).enumerate() {
            driver_free(h, i % 2 == 1);
        }
        // A maintenance pass stocks the slots that ran empty (with the
        // probe running at its refill sites).
        heap.maintain();
        // Large allocations on both paths (the page allocator's sites too).
        for (i, size) in [9000, 20000, 32768, 100_000].into_iter().enumerate() {
            let h = driver_alloc(size, i % 2 == 0 || size > 32768);
            driver_free(h, i % 2 == 1);
        }
    }
    // Huge allocations (the huge table's sites), on both free paths; the
    // hook frees a kept one inside the others' table operations, and the
    // parked nolock frees are unmapped by the next large allocation.
    for i in 0..6 {
        let p = heap.alloc(layout(5 << 20)).expect("huge allocation");
        if i % 2 == 0 {
            KEEP_HUGE.store(p.as_ptr() as usize, Ordering::Relaxed);
        } else {
            // SAFETY: just allocated here.
            unsafe { heap.free_nolock(p) };
        }
        let q = heap.alloc(layout(6 << 20)).expect("huge allocation");
        // SAFETY: just allocated here.
        unsafe { heap.free(q) };
    }
    if let h @ 1.. = KEEP_HUGE.swap(0, Ordering::Relaxed) {
        // SAFETY: a live huge allocation, owned by the stash until the swap.
        unsafe { heap.free(NonNull::new_unchecked(h as *mut u8)) };
    }
    // Blocks of 256 KiB and more, freed and idle for two maintenance
    // passes, go back to the OS (the release sites).
    let big: Vec<NonNull<u8>> = (0..4)
        .map(|_| heap.alloc(layout(300_000)).expect("a large allocation"))
        .collect();
    for p in big {
        // SAFETY: allocated just above.
        unsafe { heap.free(p) };
    }
    for _ in 0..3 {
        heap.maintain();
    }
    // User data equal to the double-free key: the exact check runs (and
    // finds nothing).
    let probe_obj = heap.alloc(layout(64)).unwrap();
    // SAFETY: just allocated here.
    unsafe { heap.free(probe_obj) };
    // SAFETY: the freed object's memory stays mapped: read its key word.
    let key = unsafe { probe_obj.as_ptr().add(8).cast::<usize>().read() };
    let x = heap.alloc(layout(64)).unwrap();
    // SAFETY: `x` is live, 64 bytes.
    unsafe {
        x.as_ptr().add(8).cast::<usize>().write(key);
        heap.free(x);
    }
    // Shrinkers: registered, then run by an accounted allocation over its
    // group's limit.
    heap.register_shrinker(|_| 0);
    let tiny_group = anyalloc::Group::new("tiny", Some(4096), None);
    assert!(heap.alloc_in(layout(8192), &tiny_group).is_none());

    // Draining with the probe on: drain's own sites are re-entered too.
    DRIVEN.store(64, Ordering::Relaxed);
    heap.drain();

    // 3. Done: give back what the hook kept, drain, count.
    MODE.store(OFF, Ordering::Relaxed);
    set_hook(None);
    while let Some(h) = KEEP.take(0).or_else(|| KEEP_DRIVEN.take(0)) {
        driver_free(h, false);
    }
    heap.drain();
    let s = heap.stats();
    let p = s.pages;
    let invariants = heap.pages().check_invariants();

    let mut report = String::new();
    let (mut heap_tries, mut heap_oks, mut page_tries, mut page_oks) = (0, 0, 0, 0);
    for i in 0..SITES {
        let fired = load(&FIRED[i]);
        if fired == 0 {
            continue;
        }
        let (t, o) = (load(&TRIES[i]), load(&OKS[i]));
        let is_heap = Site::HEAP.iter().any(|s| *s as usize == i);
        if is_heap {
            heap_tries += t;
            heap_oks += o;
        } else {
            page_tries += t;
            page_oks += o;
        }
        report += &format!(
            "  {:<20} fired {fired:>8} (at depth 0: {:>7}); hook nolock allocs {o}/{t}\n",
            site_name(i),
            load(&FIRED_DEPTH0[i]),
        );
    }
    println!(
        "interrupt points (hook depths 0..={MAX_OP_DEPTH} run operations):\n{report}\
         hook nolock allocs at heap sites: {heap_oks}/{heap_tries} ({:.4}%), at page sites: {page_oks}/{page_tries} ({:.4}%)\n\
         nested frees of kept objects: {}; competing deferred pushes: {}; \
         heap nolock frees deferred: {} ({} while probing); fail busy {}, empty {}\n\
         violations {}; after drain: objects {} large {}; pages total {} free {} buddy {}; invariants {invariants:?}",
        100.0 * heap_oks as f64 / heap_tries.max(1) as f64,
        100.0 * page_oks as f64 / page_tries.max(1) as f64,
        load(&NESTED_FREES),
        load(&PUSH_RACES),
        s.nolock_free_deferred,
        s.nolock_free_deferred - deferred_after_chain,
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
        load(&VIOLATIONS),
        s.objects_in_use,
        s.large_in_use,
        p.total_pages,
        p.free_pages,
        p.buddy_pages,
    );

    for (size, at_heap, at_page) in &FAILURES {
        let size = size.load(Ordering::Relaxed);
        if size != 0 {
            println!(
                "  failed hook allocations of {size} bytes: {} at heap sites, {} at page sites",
                load(at_heap),
                load(at_page)
            );
        }
    }
    println!(
        "page allocator: nolock ok {}, fail busy {}, fail empty {}, frees deferred {}",
        p.nolock_alloc_ok,
        p.nolock_alloc_fail_busy,
        p.nolock_alloc_fail_empty,
        p.nolock_free_deferred
    );

    for &site in Site::HEAP.iter().chain(Site::RELEASE) {
        assert!(load(&FIRED[site as usize]) > 0, "{site:?} never fired");
        // Everything but a deferred push also happens inside a plain
        // (non-nested) operation of the driver.
        if site != Site::ObjectDeferredPush {
            assert!(
                load(&FIRED_DEPTH0[site as usize]) > 0,
                "{site:?} never fired inside a driver operation"
            );
        }
        assert!(
            load(&TRIES[site as usize]) > 0,
            "the hook never allocated at {site:?}"
        );
    }
    assert!(
        s.nolock_free_deferred > deferred_after_chain,
        "probing never deferred a free"
    );
    assert!(
        load(&PUSH_RACES) > 0,
        "no push raced a half-done deferred push"
    );
    assert_eq!(load(&VIOLATIONS), 0, "damaged or misplaced objects");
    assert_eq!(
        heap_oks, heap_tries,
        "nolock allocations failed at heap sites with memory to spare"
    );
    assert!(
        load(&HUGE_FREES) > 0,
        "no huge free inside a huge-table operation"
    );
    assert!(
        s.released_to_os_bytes > 0,
        "no idle block went back to the OS"
    );
    assert_eq!((s.objects_in_use, s.large_in_use, s.huge_in_use), (0, 0, 0));
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(p.buddy_pages, p.total_pages, "pages off the buddy lists");
    assert_eq!(invariants, Ok(()));
}
