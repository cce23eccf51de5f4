//! Interrupt points: deterministic re-entry at every critical section.
//!
//! With the test-only feature `interrupt-points`, every critical section of
//! the allocator (a slot held, a zone lock held, the middle of a list
//! operation) calls [`point`] with its [`Site`]. A test installs a hook with
//! [`set_hook`] that runs nolock allocations and frees *there*, exactly as a
//! signal handler that interrupted the thread at that instruction would.
//! Without the feature the calls compile to nothing.

use core::sync::atomic::{AtomicPtr, Ordering};

/// A place in the allocator where re-entry is tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Site {
    /// Page allocator: a per-CPU page list slot is held (alloc).
    PcpAlloc,
    /// Page allocator: slot held and zone locked, refilling the slot.
    PcpRefill,
    /// Page allocator: a per-CPU page list slot is held (free).
    PcpFree,
    /// Page allocator: slot held and zone locked, draining the slot.
    PcpDrain,
    /// Page allocator: zone locked for a direct (non-per-CPU) allocation.
    ZoneAlloc,
    /// Page allocator: zone locked for a direct free.
    ZoneFree,
    /// Page allocator: zone *tried* and held by a nolock allocation (every
    /// order above the per-CPU lists, and small orders the lists could not
    /// serve).
    NolockZoneAlloc,
    /// Page allocator: zone *tried* and held by a nolock free (every order
    /// above the per-CPU lists, and small blocks no slot took).
    NolockZoneFree,
    /// Page allocator: in the middle of splitting a buddy block.
    BuddySplit,
    /// Page allocator: in the middle of merging buddies.
    BuddyMerge,
    /// Page allocator: a deferred free has linked its page but not yet
    /// published it.
    DeferredPush,
    /// Page allocator: zone locked, draining the deferred list.
    DeferredDrain,
    /// Object allocator: a sheaf slot is held (alloc).
    SheafAlloc,
    /// Object allocator: a sheaf slot is held (free).
    SheafFree,
    /// Object allocator: slot held and the node locked, mid-refill from
    /// the slabs.
    SheafRefill,
    /// Object allocator: slot held and the node locked, mid-flush to the
    /// slabs.
    SheafFlush,
    /// Object allocator: the cache's partial-slab list is locked.
    PartialLocked,
    /// Object allocator: slot held, a refill that found no slab with a
    /// free object has taken and touched a new slab's pages, the node lock
    /// not yet taken.
    SlabTouch,
    /// Object allocator: an object deferred-free has linked but not published.
    ObjectDeferredPush,
    /// Object allocator: the cache is draining its deferred list, or its
    /// parked double-free suspects (the whole stack taken, each object
    /// checked again).
    ObjectDeferredDrain,
    /// Accounting: a group's per-CPU charge stock is held (or was busy and
    /// the counters are charged directly), or a counter's charge is between
    /// its load and its compare-and-swap.
    AccountCharge,
    /// Accounting: a released group reference is linked on the heap's
    /// release list but not published, or the list is being drained.
    GroupRelease,
    /// Accounting: a group's children registry lock is held.
    GroupChildren,
    /// Page allocator: the nolock path took the whole deferred stack to
    /// steal a block of its order, and is pushing the rest back.
    StealDeferred,
    /// Page allocator: a normal refill (slot and zone held) holds a handler
    /// level's slot too, stocking it.
    StockHandlerLevels,
    /// Page allocator: a free has claimed its block (`FREEING`) and not yet
    /// put it anywhere.
    PageClaimed,
    /// A zone lock's holder is waking a waiter as it unlocks.
    ZoneWake,
    /// Page allocator: the growth lock is held, a new zone about to be added.
    ZoneGrow,
    /// Page allocator (maintenance): zone locked, an idle free block taken
    /// off its list to be returned to the OS (or put back afterwards).
    ReleaseIdle,
    /// Page allocator (maintenance): the `madvise` window: an idle block is
    /// `RELEASING`, off every list, and the zone lock is not held.
    ReleaseWindow,
    /// Object allocator: a slab is being released (off the partial list, no
    /// owner, node lock held), its pages not yet freed.
    ReleaseSlab,
    /// Object allocator: `Cache::drain` walks the partial lists (node lock
    /// held) releasing empty slabs.
    CacheDrain,
    /// Object allocator: a huge allocation is unregistered, not yet unmapped
    /// or parked.
    FreeHuge,
    /// Object allocator: the deferred huge frees are being unmapped.
    HugeDeferredDrain,
    /// Object allocator: a huge-table entry is `BUSY` (being filled, or
    /// claimed while its block is being moved).
    HugeBusy,
    /// Object allocator: a free found the double-free key in the object and
    /// is checking whether it really is free; it has taken the deferred
    /// stack to walk it and not yet put it back.
    DoubleFreeCheck,
    /// Object allocator: a shrinker is being linked into the registry, or
    /// the registry is being walked to run the shrinkers.
    ShrinkerRegistry,
    /// Object allocator: slot held and the barn locked, trading a sheaf
    /// with the barn (a refill or a flush), the node lock not held.
    BarnTrade,
    /// Fork: the heap registry is held, a heap being linked into it
    /// (`Heap::new`) or unlinked (dropping a heap).
    HeapRegistry,
    /// Fork: a huge allocation is in the table of huge blocks, not yet
    /// counted in the heap's statistics (for the child's recount).
    HugeCount,
    /// Object allocator: a free has found room for its huge mapping in the
    /// cache of kept mappings and not yet filled a slot (a put), or a huge
    /// allocation has emptied the slot of the mapping it takes (a take).
    HugeCached,
    /// Page allocator: a nolock free is about to park a large block in an
    /// empty stock cell of its order, having seen the order wanted.
    StockPut,
    /// Page allocator: a nolock free has counted its block in the stock,
    /// not yet put it in the cell (for a forked child's recount).
    StockCounted,
    /// Page allocator: a nolock allocation has emptied a stock cell, not
    /// yet marked its order short (for a forked child's marks).
    StockTaken,
    /// The global heap is being created (`INITIALIZING`): this thread won
    /// the creation, other normal callers wait for it to end.
    GlobalCreation,
    /// This call won the start of a heap's maintenance thread and is about
    /// to spawn it (a start in progress for every other call).
    MaintainerSpawn,
    /// A heap's maintenance thread was spawned, its start not yet
    /// published (`RUNNING`): a start in progress for every other call,
    /// and for a forked child.
    MaintainerSpawned,
}

impl Site {
    /// Every site of the page allocator.
    pub const PAGE: &'static [Site] = &[
        Site::PcpAlloc,
        Site::PcpRefill,
        Site::PcpFree,
        Site::PcpDrain,
        Site::ZoneAlloc,
        Site::ZoneFree,
        Site::NolockZoneAlloc,
        Site::NolockZoneFree,
        Site::BuddySplit,
        Site::BuddyMerge,
        Site::DeferredPush,
        Site::DeferredDrain,
        Site::StealDeferred,
        Site::StockHandlerLevels,
        Site::PageClaimed,
        Site::ZoneWake,
        Site::ZoneGrow,
    ];
    /// The page allocator's maintenance sites (reached through
    /// `Heap::maintain`, so driven by the heap's tests).
    pub const RELEASE: &'static [Site] = &[Site::ReleaseIdle, Site::ReleaseWindow];
    /// Every site of the accounting layer.
    pub const ACCOUNT: &'static [Site] =
        &[Site::AccountCharge, Site::GroupRelease, Site::GroupChildren];
    /// Every site of the object allocator.
    pub const HEAP: &'static [Site] = &[
        Site::SheafAlloc,
        Site::SheafFree,
        Site::SheafRefill,
        Site::SheafFlush,
        Site::BarnTrade,
        Site::PartialLocked,
        Site::SlabTouch,
        Site::ObjectDeferredPush,
        Site::ObjectDeferredDrain,
        Site::ReleaseSlab,
        Site::CacheDrain,
        Site::FreeHuge,
        Site::HugeDeferredDrain,
        Site::HugeBusy,
        Site::DoubleFreeCheck,
        Site::ShrinkerRegistry,
    ];
}

static HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Installs (or with `None` removes) the hook called at every site.
///
/// ```
/// use anyalloc::interrupt::{self, Site};
/// use anyalloc::{Config, PageAllocator};
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// static HITS: AtomicUsize = AtomicUsize::new(0);
/// // Runs inside the allocator's critical sections: a test would allocate
/// // with the nolock path here, as a signal handler would.
/// fn hook(_site: Site) {
///     HITS.fetch_add(1, Ordering::Relaxed);
/// }
/// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
/// interrupt::set_hook(Some(hook));
/// let p = pages.alloc_pages(0).unwrap(); // a fresh allocator: fills a per-CPU list
/// interrupt::set_hook(None);
/// assert!(HITS.load(Ordering::Relaxed) > 0);
/// // SAFETY: allocated above, freed once.
/// unsafe { pages.free_pages(p, 0) };
/// ```
pub fn set_hook(hook: Option<fn(Site)>) {
    let p = match hook {
        Some(f) => f as *mut (),
        None => core::ptr::null_mut(),
    };
    HOOK.store(p, Ordering::SeqCst);
}

/// Calls the installed hook, if any.
///
/// ```
/// use anyalloc::interrupt::{self, Site};
/// use std::sync::atomic::{AtomicBool, Ordering};
/// static SEEN: AtomicBool = AtomicBool::new(false);
/// fn hook(site: Site) {
///     if site == Site::ZoneAlloc {
///         SEEN.store(true, Ordering::Relaxed);
///     }
/// }
/// interrupt::point(Site::ZoneAlloc); // no hook: nothing happens
/// assert!(!SEEN.load(Ordering::Relaxed));
/// interrupt::set_hook(Some(hook));
/// interrupt::point(Site::ZoneAlloc);
/// interrupt::set_hook(None);
/// assert!(SEEN.load(Ordering::Relaxed));
/// ```
#[inline(never)]
pub fn point(site: Site) {
    let p = HOOK.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: only `set_hook` stores non-null values, and it stores
        // `fn(Site)` pointers cast to `*mut ()`.
        let f: fn(Site) = unsafe { core::mem::transmute::<*mut (), fn(Site)>(p) };
        f(site);
    }
}
