//! The page allocator: buddy zones with per-CPU page lists, callable from any
//! context.
//!
//! # Two paths
//!
//! * **Normal** ([`PageAllocator::alloc_pages`], [`PageAllocator::free_pages`]):
//!   may wait on a zone lock, may reclaim (drain every per-CPU list and the
//!   deferred stacks) and may grow the heap with a new zone from the OS.
//! * **Nolock** ([`PageAllocator::alloc_pages_nolock`],
//!   [`PageAllocator::free_pages_nolock`]): only `try_lock`s and atomics, so
//!   it can run in a signal handler that interrupted this very allocator. An
//!   allocation may fail (`None`: "no memory for you in this context now"); a
//!   free never fails: what cannot take a lock is parked on the zone's
//!   lock-free deferred stack and merged by the next zone-lock holder.
//!
//! # Where a nolock allocation looks, in order
//!
//! 1. this CPU's slots, one per context level (normal, first handler, nested
//!    handler): a handler that interrupted its own thread inside the level-0
//!    slot finds the level-1 slot free, and it keeps a stock of its own;
//! 2. each slot it holds but finds empty is refilled from the buddy lists if
//!    the zone lock can be *tried*;
//! 3. the other CPUs' slots (their stock, without refilling);
//! 4. the zone directly with `try_lock`;
//! 5. the zone's deferred stack (pages whose free could not take a lock):
//!    a block of the right order is taken from it without any lock.
//!
//! Orders above [`PCP_MAX_ORDER`] (64 KiB to 4 MiB)
//! have no per-CPU lists: they start at step 4. A busy zone means "the
//! zone's nolock stock (a few blocks of each order handlers asked for,
//! refilled by zone-lock holders), then the deferred stack, then a larger
//! stocked block split without the lock, then the next zone, then fail",
//! never waiting; the min watermark (`Config::min_reserve`) holds as for
//! small orders.
//!
//! Upstream stops after the equivalent of steps 1, 2 (one level) and 4; the
//! extra levels and steps 3 and 5 are what keeps a handler that interrupted a
//! refill (slot and zone both held by its own thread) from failing.
//! [`PageStats`] counts the failures that remain by reason.
//!
//! # Reading the code
//!
//! This module holds the allocator's state, its creation over the OS or a
//! region, the lookup of a block's zone, statistics, maintenance and what
//! a `fork` takes; `normal` and `nolock` the two paths; `claim` a free's
//! claim of its block and the reports of bad frees; `zone` one zone (its
//! buddy lists, per-CPU lists, stock and deferred stack); `desc` the page
//! descriptor; `zone_map` the O(1) lookup of the zones growth added (the
//! first zone has an inline window of its own, `FirstZone`).
//!
//! # Example
//!
//! ```
//! use anyalloc::{Config, PageAllocator};
//! let pages = PageAllocator::new(Config::default().memory(8 << 20)).unwrap();
//! let p = pages.alloc_pages(0).unwrap();
//! let q = pages.alloc_pages_nolock(3).unwrap(); // 32 KiB, from any context
//! let r = pages.alloc_pages_nolock(10).unwrap(); // 4 MiB, from any context too
//! unsafe {
//!     pages.free_pages(p, 0);
//!     pages.free_pages_nolock(q, 3);
//!     pages.free_pages_nolock(r, 10);
//! }
//! pages.drain();
//! let stats = pages.stats();
//! assert_eq!(stats.free_pages, stats.total_pages);
//! ```

mod claim;
mod desc;
mod nolock;
mod normal;
mod zone;
#[cfg(feature = "std")]
mod zone_map;

pub(crate) use desc::PageDesc;

/// The order recorded in a descriptor state word.
#[inline]
pub(crate) fn order_of_state(state: u32) -> u32 {
    desc::order_of(state)
}

/// Whether a descriptor state word says "handed out" (`ALLOCATED`).
#[inline]
pub(crate) fn is_allocated_state(state: u32) -> bool {
    desc::kind_of(state) == desc::ALLOCATED
}
/// Whether a descriptor state word says "the head of a free block" (on a
/// buddy, per-CPU or deferred list, in the stock, being freed or being
/// returned to the OS).
#[inline]
pub(crate) fn is_free_block_state(state: u32) -> bool {
    matches!(
        desc::kind_of(state),
        desc::BUDDY | desc::PCP | desc::DEFERRED | desc::FREEING | desc::RELEASING
    )
}
pub(crate) use crate::sync::Mode;
pub(crate) use zone::{slot_index, Fail, Zone, LEVELS, MAX_ZONE_PAGES, NIL};

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::config::{Config, Error};
use crate::platform::{FatalMessage, Platform};
use crate::sync::rseq::layout;
#[cfg(feature = "std")]
use crate::sync::SlotLock;
use crate::sync::ZoneLock;
use crate::{MAX_ORDER, PAGE_SIZE, PCP_MAX_ORDER};
use zone::HEAP_PCP_ORDER;
pub(crate) use zone::MAX_BLOCK;

/// Which path a free of pages takes beyond the shared fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreeRoute {
    /// The normal path (the heap decided the route already).
    Normal,
    /// The nolock path.
    NoLock,
    /// By the thread's context (`free_pages`): nolock when nested.
    Routed,
}

/// Max-order blocks one maintenance pass returns to the OS per zone: keeps a
/// pass short (each madvise of touched memory costs up to milliseconds), so
/// deferred frees queued behind it are drained promptly. At one pass every
/// 50 ms that is still 640 MiB/s.
#[cfg(feature = "std")]
const RELEASE_BUDGET: usize = 8;

/// Blocks below 256 KiB one maintenance pass returns to the OS per zone
/// (each one system call): at most 32 MiB per pass, and in a burst's
/// leftovers (a few slabs still live in every 64 KiB) about 4 MiB.
#[cfg(feature = "std")]
const SMALL_RELEASE_BUDGET: usize = 256;

/// Blocks of 256 KiB or more one inline decay pass (`Config::decay`)
/// returns to the OS per zone: at most 16 MiB, a few milliseconds of
/// `madvise` in the one allocation or free that runs the pass (at most one
/// pass per 100 ms: up to 160 MiB/s while the program keeps calling).
#[cfg(feature = "std")]
const DECAY_RELEASE_BUDGET: usize = 4;

/// Blocks below 256 KiB one inline decay pass returns to the OS per zone
/// (each one system call).
#[cfg(feature = "std")]
const DECAY_SMALL_RELEASE_BUDGET: usize = 64;

/// At most this many zones (the first plus growth).
pub(crate) const MAX_ZONES: usize = 32;

/// The size of the next zone the heap grows by: `doubled` (the growth
/// schedule's), but under a limit on address space (`headroom`, the bytes
/// the process may still map: `platform::address_space_headroom`) at most
/// half of what is left, in whole largest blocks and at least one: a zone
/// that took all the room would leave none for the program's other
/// mappings (thread stacks, libraries, blocks above 4 MiB, which are
/// mapped apart). The next growth takes half of the rest again, so the
/// heap can still reach nearly all of the limit. `grow` halves further
/// when the reservation is refused all the same.
#[cfg(feature = "std")]
fn growth_size(doubled: usize, headroom: Option<usize>) -> usize {
    match headroom {
        Some(room) => doubled.min((room / 2) & !(MAX_BLOCK - 1)).max(MAX_BLOCK),
        None => doubled,
    }
}

/// What [`PageAllocator::grow`] did for a normal-path allocation that
/// found no memory in the zones it had seen.
#[cfg(feature = "std")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Growth {
    /// This call added a zone, which served the caller's block if it
    /// could (above its min watermark).
    Added(Option<NonNull<u8>>),
    /// Another thread added one (or more) since the caller counted the
    /// zones: try those first.
    OthersAdded,
    /// Nothing to try: no zone may be added (`MAX_ZONES`, the OS refused
    /// every size), or a fork on another thread holds the growth lock.
    Refused,
}

/// The slot sets of an allocator `new` creates without `Config::cpus`: the
/// platform's CPU count, or the possible CPU ids if more (`possible`, read
/// when the rseq fast path may be used), at least one and at most
/// [`MAX_CPUS`](crate::MAX_CPUS), as `Config::cpus` allows. A machine with
/// more possible ids (a kernel built for 8192, say) would otherwise give
/// every zone and every heap per-CPU metadata for each of them: a heap's is
/// about 0.5 MiB per CPU, 4 GiB of address space at 8192. Capped, the
/// CPU ids from 4096 up share slots (modulo, `zone::slot_index`) and, as
/// with an explicit `Config::cpus` below the possible count, the fast path
/// is the try-locked slots: the restartable sequences need a slot set of
/// their own for every CPU id (`sync::rseq::available` refuses them).
#[cfg(feature = "std")]
fn default_cpus(count: usize, possible: Option<usize>) -> usize {
    count
        .max(possible.unwrap_or(0))
        .clamp(1, crate::config::MAX_CPUS)
}

/// Increments a per-slot counter of a held slot. A locked add: a counting
/// pop aborted after its count, on another CPU, may be taking its count
/// back from this slot's counter at the same time (see
/// `sync::rseq::sheaf_pop`), which a plain load + store would undo.
#[inline]
pub(crate) fn bump(counter: &AtomicU64, _held: &crate::sync::SlotGuard<'_>) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The total of per-slot counters that the rseq pops count in: a count is
/// taken back from the slot of the CPU its pop's thread runs on after the
/// abort, not always the one it was added to, so a slot's own counter may
/// run below zero (wrapping) and only the sum is meaningful. A sum read
/// while pops run may see a take-back but not its count, one below the
/// true total for a moment: below zero, it reads as 0.
pub(crate) fn slot_count_total(counts: impl Iterator<Item = u64>) -> u64 {
    let total = counts.fold(0u64, u64::wrapping_add);
    if total > i64::MAX as u64 {
        0
    } else {
        total
    }
}

/// How the per-CPU fast paths (page lists, and a heap's object sheaves)
/// are guarded: chosen once, when the page allocator is created, and
/// followed by a heap built on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FastPath {
    /// Restartable sequences: no atomic instruction; an interrupted pop or
    /// push starts over (x86-64 Linux with glibc's rseq registration).
    Rseq,
    /// A try-only lock (one CAS) per operation: everywhere else, and when
    /// [`Config::rseq`](crate::Config::rseq) is off.
    #[default]
    SlotLock,
}

/// A snapshot of a page allocator's state. Exact when nothing runs
/// concurrently; otherwise each field is individually consistent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// The per-CPU fast path's mechanism.
    pub fast_path: FastPath,
    /// Pages managed, in all zones.
    pub total_pages: usize,
    /// Free pages wherever they sit: buddy lists, per-CPU lists, deferred,
    /// the nolock stock.
    pub free_pages: usize,
    /// Free pages on the buddy free lists.
    pub buddy_pages: usize,
    /// Free pages cached on per-CPU lists.
    pub percpu_pages: usize,
    /// Free pages parked on deferred stacks.
    pub deferred_pages: usize,
    /// Free blocks of 64 KiB to 4 MiB kept aside for the nolock path (the
    /// zone's stock: once a nolock allocation asked for an order, zone-lock
    /// holders keep one to four blocks of it ready for when the zone lock is
    /// busy; `drain` returns them).
    pub stock_pages: usize,
    /// Zones (the first, plus those added by growth).
    pub zones: usize,
    /// Successful nolock allocations: every success of a nolock call
    /// (`alloc_pages_nolock`). A normal-path call routed to the nolock
    /// path (re-entry, a `nolock_scope`) counts only when it misses this
    /// CPU's list: that fast path, which never waits, is the same on both
    /// routes and counts neither.
    pub nolock_alloc_ok: u64,
    /// Nolock allocations that failed because every lock they needed was held.
    pub nolock_alloc_fail_busy: u64,
    /// Nolock allocations that failed because no zone had pages above its
    /// min watermark.
    pub nolock_alloc_fail_empty: u64,
    /// Nolock frees that found every lock held and parked on a deferred stack.
    pub nolock_free_deferred: u64,
    /// Of the nolock allocations above, those of orders above
    /// [`PCP_MAX_ORDER`] (64 KiB to 4 MiB, the zone try-lock path): served...
    pub nolock_large_alloc_ok: u64,
    /// ...failed because every zone's lock was held (and neither the zone's
    /// nolock stock nor its deferred stack had a block to give)...
    pub nolock_large_alloc_fail_busy: u64,
    /// ...and failed because no zone had a free block of the order above its
    /// min watermark.
    pub nolock_large_alloc_fail_empty: u64,
}

/// The page allocator. See the module documentation.
///
/// # Dropping
///
/// Dropping a page allocator ends every block it handed out, live or not:
/// an allocator made with `new` (std) unmaps its zones (a block
/// still in use is then unmapped memory), one made with
/// [`from_region`](Self::from_region) leaves its region to the caller. A
/// block of a dropped allocator must not be used or freed afterwards;
/// freed into another allocator it is a foreign pointer there ("outside
/// managed memory", one line before an abort) as long as that allocator
/// has no memory at its address. The allocator of a [`Heap`](crate::Heap)
/// ([`Heap::pages`](crate::Heap::pages)) is borrowed from the heap and
/// cannot outlive it:
///
/// ```compile_fail,E0597
/// use anyalloc::{Config, Heap, PageAllocator};
/// let pages: &PageAllocator = {
///     let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
///     heap.pages() // error: `heap` does not live long enough
/// };
/// let _ = pages.alloc_pages(0);
/// ```
pub struct PageAllocator {
    platform: &'static dyn Platform,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    config: Config,
    cpus: usize,
    zones: [AtomicPtr<Zone>; MAX_ZONES],
    nzones: AtomicUsize,
    /// The first zone's lookup window, copied when the allocator is built.
    first: FirstZone,
    /// Which grown zone (every zone after the first) holds an address, in
    /// O(1) (see `zone_map`).
    #[cfg(feature = "std")]
    map: zone_map::ZoneMap,
    /// The newest grown zone (null before the first growth), where a
    /// grown allocator's allocations mostly come from: the fast paths look
    /// there before the zone map and the other zones (`locate_grown`,
    /// `seq_alloc_newest_block`). Set when a zone is published, after it was
    /// entered in the map; never cleared (zones live as long as `self`).
    #[cfg(feature = "std")]
    newest: AtomicPtr<Zone>,
    /// Serialises `drain`, maintenance passes and invariant checks (normal
    /// context only), so a maintenance pass can never refill a slot that a
    /// concurrent drain skipped.
    drain_lock: ZoneLock,
    /// Serialises growth (normal path only).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    grow_lock: ZoneLock,
    /// How many zones `lock_all` locked: a zone added inside the fork
    /// window (the normal path may grow there) was never locked, so
    /// `unlock_all` must not release it.
    #[cfg(feature = "std")]
    fork_zones: AtomicUsize,
    /// Whether `lock_all` holds every level-0 slot (`SlotLock::hold_all`).
    #[cfg(feature = "std")]
    fork_slots: core::sync::atomic::AtomicBool,
    /// Whether the platform is `StdPlatform` (CPU ids read inline, without
    /// dynamic dispatch).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    std_platform: bool,
    /// Whether the zones are OS reservations to release on drop.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    owns_mappings: bool,
    /// The rseq fast path (chosen once, in `new`): glibc's rseq area
    /// offset; every zone's level-0 page lists then have restartable pop
    /// and push (see `sync::rseq`). `None`: the try-locked slots.
    rseq_off: Option<isize>,
    /// The maintainer's wake word, if a maintainer serves this allocator.
    waker: AtomicPtr<core::sync::atomic::AtomicU32>,
    /// The owner's reclaim callback (runs shrinkers) and its argument.
    reclaimer: AtomicPtr<()>,
    reclaim_ctx: AtomicPtr<()>,
    /// Set when an allocation that could not run the reclaimer needed it.
    reclaim_wanted: core::sync::atomic::AtomicBool,
    /// The owner's inline decay pass (`Config::decay`: a heap that no
    /// maintainer serves) and its argument; null: none (no owner, decay
    /// off, or a maintainer runs). Read by the normal slow paths' ticks.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    decayer: AtomicPtr<()>,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    decay_ctx: AtomicPtr<()>,
    nolock_ok_direct: AtomicU64,
    nolock_fail_busy: AtomicU64,
    nolock_fail_empty: AtomicU64,
    nolock_free_deferred: AtomicU64,
    /// Orders above PCP_MAX_ORDER: [ok, fail busy, fail empty].
    nolock_large: [AtomicU64; 3],
}

impl core::fmt::Debug for PageAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageAllocator")
            .field("cpus", &self.cpus)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

// SAFETY: the zones the raw pointers refer to are shared only through atomics
// and the locks documented in `zone`; the platform is `Sync`.
unsafe impl Send for PageAllocator {}
// SAFETY: as above: every mutable state is behind atomics or locks.
unsafe impl Sync for PageAllocator {}

/// The first zone's lookup window, plain words copied once when the
/// allocator is built (a zone's bounds never change): the fast paths' page
/// lookup reads them from the allocator itself, without following the zone
/// pointer.
#[derive(Clone, Copy)]
struct FirstZone {
    /// The zone's first page.
    start: usize,
    /// Its bytes (`end - start`): `addr - start < len` is the bounds check.
    len: usize,
    /// The page index of `start`.
    first: u32,
    /// The descriptor of `start`'s page.
    descs: *const PageDesc,
    zone: *const Zone,
}

impl FirstZone {
    /// Before the first zone is published: holds no address.
    const NONE: FirstZone = FirstZone {
        start: 0,
        len: 0,
        first: 0,
        descs: core::ptr::null(),
        zone: core::ptr::null(),
    };

    fn of(zone: &Zone) -> FirstZone {
        let (start, first, len, descs) = zone.window();
        FirstZone {
            start,
            len,
            first,
            descs,
            zone,
        }
    }
}

impl PageAllocator {
    fn empty(platform: &'static dyn Platform, config: Config, cpus: usize, owns: bool) -> Self {
        PageAllocator {
            platform,
            config,
            cpus,
            zones: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_ZONES],
            first: FirstZone::NONE,
            nzones: AtomicUsize::new(0),
            #[cfg(feature = "std")]
            map: zone_map::ZoneMap::new(),
            #[cfg(feature = "std")]
            newest: AtomicPtr::new(core::ptr::null_mut()),
            #[cfg(feature = "std")]
            fork_zones: AtomicUsize::new(0),
            #[cfg(feature = "std")]
            fork_slots: core::sync::atomic::AtomicBool::new(false),
            drain_lock: ZoneLock::new(),
            grow_lock: ZoneLock::new(),
            std_platform: false,
            owns_mappings: owns,
            rseq_off: None,
            waker: AtomicPtr::new(core::ptr::null_mut()),
            reclaimer: AtomicPtr::new(core::ptr::null_mut()),
            reclaim_ctx: AtomicPtr::new(core::ptr::null_mut()),
            reclaim_wanted: core::sync::atomic::AtomicBool::new(false),
            decayer: AtomicPtr::new(core::ptr::null_mut()),
            decay_ctx: AtomicPtr::new(core::ptr::null_mut()),
            nolock_ok_direct: AtomicU64::new(0),
            nolock_fail_busy: AtomicU64::new(0),
            nolock_fail_empty: AtomicU64::new(0),
            nolock_free_deferred: AtomicU64::new(0),
            nolock_large: [const { AtomicU64::new(0) }; 3],
        }
    }

    /// Creates a page allocator whose first zone is `config.memory` bytes of
    /// address space reserved with mmap (committed by the OS on first touch).
    ///
    /// Errors: [`Error::Config`], naming the setting and its value (memory
    /// below [`MIN_MEMORY`](crate::MIN_MEMORY) or above
    /// [`MAX_MEMORY`](crate::MAX_MEMORY), zero CPUs or more than
    /// [`MAX_CPUS`](crate::MAX_CPUS), a `min_reserve` above half the
    /// memory), or [`Error::Reserve`]: the OS refused the reservation.
    ///
    /// Unlike a [`Heap`](crate::Heap)'s, the locks of a page allocator used
    /// on its own are not held across `fork`: fork only while no other
    /// thread is inside it, or do not use it in the child.
    ///
    /// ```
    /// use anyalloc::{Config, Error, PageAllocator, PAGE_SIZE};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// assert_eq!(pages.stats().total_pages, (16 << 20) / PAGE_SIZE);
    /// let tiny = PageAllocator::new(Config::default().memory(PAGE_SIZE));
    /// assert!(matches!(tiny, Err(Error::Config { setting: "Config::memory", .. })));
    /// ```
    #[cfg(feature = "std")]
    pub fn new(config: Config) -> Result<PageAllocator, Error> {
        config.validate()?;
        let platform: &'static dyn Platform = crate::platform::StdPlatform::get();
        let cpus = config.cpus.unwrap_or_else(|| {
            // A process allowed fewer CPUs than the machine has (taskset, a
            // cpuset) still runs on CPU ids up to the possible count, and the
            // restartable sequences need a slot set for each of those ids:
            // without them the fast path would be the try-locked one.
            let possible = if config.rseq {
                crate::platform::StdPlatform::possible_cpus()
            } else {
                None
            };
            default_cpus(platform.cpu_count(), possible)
        });
        let mut pa = Self::empty(platform, config, cpus, true);
        pa.std_platform = true;
        if config.rseq && crate::sync::rseq::available(cpus) {
            pa.rseq_off = crate::sync::rseq::area_offset();
        }
        pa.add_os_zone(config.memory, false, None)?;
        pa.first = FirstZone::of(pa.zone_at(0));
        Ok(pa)
    }

    /// Creates a page allocator over an embedder's memory region (`no_std`).
    /// The zone's metadata is carved from the end of the region. `config`'s
    /// memory size and growth settings do not apply (the region is the cap).
    ///
    /// Errors (nothing of the region is touched then):
    /// [`Error::Config`] naming the setting: `Config::cpus` of 0 or above
    /// [`MAX_CPUS`](crate::MAX_CPUS), `Platform::cpu_count` above it when
    /// `Config::cpus` is not set, `Config::min_reserve` above half the
    /// region's pages; [`Error::Region`] naming the region's length: it
    /// wraps around the address space (or ends at its very top), or is too
    /// small for the metadata and 16 pages.
    ///
    /// ```
    /// use anyalloc::{Config, Error, PageAllocator, Platform};
    /// use core::ptr::NonNull;
    ///
    /// struct OneCpu;
    /// impl Platform for OneCpu {
    ///     fn cpu_id(&self) -> usize { 0 }
    ///     fn cpu_count(&self) -> usize { 1 }
    /// }
    /// static PLATFORM: OneCpu = OneCpu;
    ///
    /// // 1 MiB that belongs to the allocator for good (here: leaked from the process heap).
    /// let len = 1 << 20;
    /// let region = NonNull::from(Box::leak(vec![0u8; len].into_boxed_slice())).cast::<u8>();
    /// // SAFETY: the region is ours alone, valid for reads and writes, never freed.
    /// let pages = unsafe { PageAllocator::from_region(region, len, &PLATFORM, Config::default()) }
    ///     .unwrap();
    /// let p = pages.alloc_pages_nolock(0).expect("memory to spare");
    /// assert!(pages.contains(p.as_ptr() as usize));
    /// // SAFETY: allocated above, freed once.
    /// unsafe { pages.free_pages_nolock(p, 0) };
    ///
    /// // A region too small for 16 pages and their metadata is refused.
    /// let small = NonNull::from(Box::leak(vec![0u8; 4096].into_boxed_slice())).cast::<u8>();
    /// // SAFETY: as above.
    /// let refused = unsafe { PageAllocator::from_region(small, 4096, &PLATFORM, Config::default()) };
    /// assert!(matches!(refused, Err(Error::Region { .. })));
    /// ```
    ///
    /// # Safety
    /// `region` must be valid for reads and writes of `len` bytes for as long
    /// as the allocator and any memory it handed out are in use, and must not
    /// be used by anything else.
    pub unsafe fn from_region(
        region: NonNull<u8>,
        len: usize,
        platform: &'static dyn Platform,
        config: Config,
    ) -> Result<PageAllocator, Error> {
        let cpus = config.region_cpus(platform)?;
        let wraps = Error::Region {
            len,
            reason: "the region wraps around the address space",
        };
        let region_start = region.as_ptr() as usize;
        let region_end = region_start.checked_add(len).ok_or(wraps.clone())?;
        // A region in the address space's last page has no page start.
        let start = region_start
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(wraps)?;
        // Checked throughout: a region near the top of the address space
        // must not wrap any of these sums.
        let fits = |n: usize| {
            n.checked_mul(PAGE_SIZE)
                .and_then(|bytes| start.checked_add(bytes))
                .and_then(|end| {
                    let meta = end.checked_next_multiple_of(64)?;
                    meta.checked_add(zone::meta_size(start, end, cpus))
                })
                .is_some_and(|meta_end| meta_end <= region_end)
        };
        // At most the pages 32-bit indices can number (counted from the
        // 4 MiB boundary below `start`): the rest of a larger region is
        // left unused.
        let below = (start & (MAX_BLOCK - 1)) / PAGE_SIZE;
        let mut n = (region_end.saturating_sub(start)
            / (PAGE_SIZE + core::mem::size_of::<PageDesc>()))
        .min(MAX_ZONE_PAGES - below);
        while n > 0 && !fits(n) {
            n -= 1;
        }
        if n < 16 {
            return Err(Error::Region {
                len,
                reason: "too small: at least 16 pages plus their metadata are needed",
            });
        }
        let min_reserve = config.min_reserve.map(|b| b.div_ceil(PAGE_SIZE));
        if min_reserve.is_some_and(|r| r > n / 2) {
            return Err(Error::Config {
                setting: "Config::min_reserve",
                value: config.min_reserve.unwrap_or(0),
                reason: "the reserve may be at most half of the region's pages",
            });
        }
        let end = start + n * PAGE_SIZE;
        // The region is the cap: never grow with OS zones (nor own mappings).
        let mut pa = Self::empty(platform, config.grow(false), cpus, false);
        // SAFETY: metadata [end rounded to 64, region_end) and pages
        // [start, end) lie in the caller's exclusive region (`fits`); its
        // contents are arbitrary, so `zeroed` is false.
        let z = unsafe {
            Zone::init(
                end.next_multiple_of(64) as *mut u8,
                start,
                end,
                cpus,
                platform,
                false,
                (0, 0),
                min_reserve,
            )
        };
        pa.publish_zone(z as *mut Zone);
        pa.first = FirstZone::of(pa.zone_at(0));
        Ok(pa)
    }

    /// Reserves a zone of `bytes` from the OS and publishes it; with
    /// `fork_held`, first takes its lock as `lock_all` does (the fork window
    /// adds it: see `grow`). With `take`, the zone first serves one block
    /// of that order to the caller (above its min watermark, if it can),
    /// before any other thread can see it: a growth serves its grower.
    #[cfg(feature = "std")]
    fn add_os_zone(
        &self,
        bytes: usize,
        fork_held: bool,
        take: Option<u32>,
    ) -> Result<Option<NonNull<u8>>, Error> {
        let pages_len = bytes.next_multiple_of(PAGE_SIZE);
        let meta = zone::meta_size(0, pages_len, self.cpus).next_multiple_of(PAGE_SIZE);
        let total = pages_len + meta;
        let p =
            crate::platform::os_reserve(total, MAX_BLOCK).ok_or(Error::Reserve { bytes: total })?;
        let start = p as usize;
        let end = start + pages_len;
        // The reserve, at most half of the zone (rounded up, as
        // `Config::validate` allows for the first one): a zone added by
        // growth under a limit on address space may be smaller than twice
        // the configured reserve, and a watermark above the zone's own
        // size would keep every page of it from both paths but the last
        // resort.
        let min_reserve = self.config.min_reserve.map(|b| {
            b.div_ceil(PAGE_SIZE)
                .min((pages_len / PAGE_SIZE).div_ceil(2))
        });
        // SAFETY: `os_reserve` gave `total` fresh, zeroed, writable bytes,
        // MAX_BLOCK-aligned, known to nothing else: the pages [start, end),
        // then `meta` bytes of page-aligned metadata.
        let z = unsafe {
            Zone::init(
                end as *mut u8,
                start,
                end,
                self.cpus,
                self.platform,
                true,
                (start, total),
                min_reserve,
            )
        };
        // A grown zone goes into the zone map before anything can see it
        // (the first has its own window, `FirstZone`). Growth is
        // serialised (the growth lock, or `new`), so `nzones` is its place.
        if self.nzones.load(Ordering::Relaxed) > 0 && self.map.insert(z, start, end).is_err() {
            // SAFETY: the reservation made above, which nothing refers to:
            // the map wrote no entry for it (`ZoneMap::insert`).
            unsafe { crate::platform::os_release(p, total) };
            return Err(Error::Reserve { bytes: total });
        }
        if fork_held {
            // Every zone before it is held across the fork (`fork_zones`
            // counts them from the first): so is this one, counted too.
            let n = self.fork_zones.load(Ordering::Relaxed);
            crate::check!(
                n == self.nzones.load(Ordering::Relaxed),
                "a zone of the fork window not held across it"
            );
            // SAFETY: initialised by `Zone::init`, not shared yet.
            let zone = unsafe { &*z };
            zone.lock.lock_raw(self.platform);
            // Its slots too, if the others are held: nobody can hold them
            // yet, so this takes them at once.
            if self.fork_slots.load(Ordering::Relaxed) {
                let held = SlotLock::hold_all(zone.level0_locks(), crate::fork::SLOT_PATIENCE);
                crate::check!(held, "a fresh zone's slot was held");
            }
            self.fork_zones.store(n + 1, Ordering::Relaxed);
        }
        // The grower's block, while no other thread can reach the zone:
        // once published, other threads' allocations (and signal
        // handlers') may split every largest block of it before the grower
        // gets there. (Not in the fork window: its lock is held raw above.)
        let taken = match take {
            Some(order) if !fork_held => {
                // SAFETY: initialised by `Zone::init`, not shared yet.
                let zone = unsafe { &*z };
                let g = zone.lock.lock(self.platform);
                let idx = zone.buddy_alloc(order, zone.min, &g);
                drop(g);
                idx.map(|idx| self.ptr(zone, idx))
            }
            _ => None,
        };
        self.publish_zone(z as *mut Zone);
        Ok(taken)
    }

    fn publish_zone(&self, z: *mut Zone) {
        let n = self.nzones.load(Ordering::Relaxed);
        // SAFETY: initialised by `Zone::init`, not shared yet.
        unsafe {
            (*z).lock.set_polling(!self.config.nolock_syscalls);
            (*z).set_rseq(self.rseq_off);
            (*z).set_position(n);
        }
        self.zones[n].store(z, Ordering::Release);
        // Release: a reader that sees the new count sees the zone pointer and
        // the zone's initialised contents.
        self.nzones.store(n + 1, Ordering::Release);
        // Release too, for readers of `newest` (`newest_grown`). A block of
        // the zone reaches no one before this: the grower's is returned
        // after it, any other is taken from the published zone.
        #[cfg(feature = "std")]
        if n > 0 {
            self.newest.store(z, Ordering::Release);
        }
    }

    /// The newest grown zone, if the allocator grew (see `newest`).
    #[cfg(feature = "std")]
    #[inline(always)]
    pub(super) fn newest_grown(&self) -> Option<&Zone> {
        let z = self.newest.load(Ordering::Acquire);
        // SAFETY: null, or a zone published (Release) after it was
        // initialised, which lives as long as `self`.
        unsafe { z.as_ref() }
    }

    /// The zones, first to last.
    #[inline]
    pub(crate) fn zones(&self) -> impl Iterator<Item = &Zone> + Clone {
        let n = self.nzones.load(Ordering::Acquire);
        self.zones[..n].iter().map(|z| {
            // SAFETY: entries below `nzones` were published (Release) after
            // their zone was initialised; zones live as long as `self`.
            unsafe { &*z.load(Ordering::Acquire) }
        })
    }

    /// The zone holding `addr` and the index of its page.
    #[inline]
    pub(crate) fn locate(&self, addr: usize) -> Option<(&Zone, u32)> {
        self.locate_indexed(addr).map(|(_, z, i)| (z, i))
    }

    /// The zone holding `addr`, its position, and the index of its page.
    #[inline]
    pub(crate) fn locate_indexed(&self, addr: usize) -> Option<(usize, &Zone, u32)> {
        // Fast path: the first zone (always present; most memory is there).
        let z0 = self.zones[0].load(Ordering::Acquire);
        // SAFETY: zone 0 is published before the allocator is returned and
        // lives as long as `self`.
        let z0 = unsafe { &*z0 };
        if z0.contains(addr) {
            return Some((0, z0, z0.index_of(addr)));
        }
        self.grown_zone(addr)
            .map(|z| (z.position(), z, z.index_of(addr)))
    }

    /// The zone after the first that holds `addr`, if any: the zone map,
    /// a few loads (no walk over the zones). Any context.
    #[inline]
    fn grown_zone(&self, addr: usize) -> Option<&Zone> {
        self.locate_grown(addr).map(|(z, _)| z)
    }

    /// Whether a zone after the first holds `addr` (see `grown_zone`).
    #[inline]
    pub(crate) fn in_grown_zone(&self, addr: usize) -> bool {
        self.grown_zone(addr).is_some()
    }

    /// [`locate_first`](Self::locate_first) for the zones after the first:
    /// the newest one's bounds, then the zone map. The heap's fast routes
    /// call it from their out-of-line copies for such pointers, so that a
    /// free into a grown zone takes them too rather than the general path.
    ///
    /// The newest zone first, although the map alone would find it: its
    /// pointer is one load from `self`, the map's cell two (the hot leaf,
    /// then the cell). On an Intel Xeon an order-0 page pair in a grown
    /// zone took 13.1-13.7 ns through the map and 11.0 this way (the
    /// first zone: 8.3); with the allocation's `seq_alloc_newest_block`, 9.4.
    #[inline]
    pub(crate) fn locate_grown(&self, addr: usize) -> Option<(&Zone, &PageDesc)> {
        #[cfg(feature = "std")]
        {
            if let Some(z) = self.newest_grown() {
                if z.contains(addr) {
                    return Some((z, z.desc(z.index_of(addr))));
                }
            }
            self.map.get(addr)
        }
        // Without std there are no grown zones (growth maps memory).
        #[cfg(not(feature = "std"))]
        {
            let _ = addr;
            None
        }
    }

    /// The first zone, the index of the page holding `addr` and its
    /// descriptor, if that zone holds it: the fast paths' lookup (most
    /// memory is there). `None` says only "not in the first zone".
    #[inline(always)]
    pub(crate) fn locate_first(&self, addr: usize) -> Option<(u32, &PageDesc)> {
        let f = &self.first;
        let off = addr.wrapping_sub(f.start);
        if off >= f.len {
            return None;
        }
        let k = off >> crate::PAGE_SHIFT;
        // The descriptor is not at address 0: said to the compiler, so that
        // a caller's test of the result for `None` is the bounds check alone.
        // SAFETY: `f` is the first zone's window (`FirstZone::of`, set
        // before the allocator was returned) and page `k` is inside it, so
        // its descriptor is in the zone's `descs`, which live as long as `self`.
        unsafe {
            let d = f.descs.add(k);
            core::hint::assert_unchecked(!d.is_null());
            Some((f.first + k as u32, &*d))
        }
    }

    /// As `locate_indexed`, for an address known to be managed here (aborts
    /// otherwise: the allocator's own bookkeeping is corrupt).
    #[inline]
    pub(crate) fn locate_known(&self, addr: usize) -> (usize, &Zone, u32) {
        match self.locate_indexed(addr) {
            Some(found) => found,
            None => self.fatal_at(
                "anyalloc: internal error: ",
                addr,
                " should be managed memory",
            ),
        }
    }

    /// How many zones there are.
    #[inline]
    pub(crate) fn zone_count(&self) -> usize {
        self.nzones.load(Ordering::Acquire)
    }

    /// Zone number `i` (below `zone_count()`).
    #[inline]
    pub(crate) fn zone_at(&self, i: usize) -> &Zone {
        crate::check!(i < self.zone_count(), "a zone index out of range");
        // SAFETY: published zones live as long as `self` (see `zones`).
        unsafe { &*self.zones[i].load(Ordering::Acquire) }
    }

    /// Whether `addr` lies in memory this allocator manages.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(0).unwrap();
    /// assert!(pages.contains(p.as_ptr() as usize));
    /// let local = 0u64;
    /// assert!(!pages.contains(&local as *const u64 as usize));
    /// // SAFETY: allocated above, freed once.
    /// unsafe { pages.free_pages(p, 0) };
    /// ```
    pub fn contains(&self, addr: usize) -> bool {
        self.locate(addr).is_some()
    }

    /// The platform this allocator runs on.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// // `new` runs on the std platform, which reports at least one CPU.
    /// assert!(pages.platform().cpu_count() >= 1);
    /// ```
    pub fn platform(&self) -> &'static dyn Platform {
        self.platform
    }

    /// How many CPU slot sets the allocator has.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20).cpus(3)).unwrap();
    /// assert_eq!(pages.cpus(), 3);
    /// ```
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// The rseq area offset if the fast path uses restartable sequences.
    pub(crate) fn rseq_off(&self) -> Option<isize> {
        self.rseq_off
    }

    /// The current CPU id (a hint: the context may migrate right after).
    #[inline(always)]
    pub(crate) fn cpu(&self) -> usize {
        #[cfg(feature = "std")]
        if self.std_platform {
            return crate::platform::StdPlatform::current_cpu();
        }
        self.platform.cpu_id()
    }

    // ----- maintenance ------------------------------------------------------

    /// Normal context: moves every per-CPU list and deferred stack back to the
    /// buddy lists (slots held by other contexts right now are skipped).
    /// Called by a thread already inside the allocator or inside a nolock
    /// scope, it does nothing.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(0).unwrap();
    /// // SAFETY: allocated above with order 0, freed once.
    /// unsafe { pages.free_pages(p, 0) };
    /// pages.drain();
    /// let s = pages.stats();
    /// assert_eq!((s.percpu_pages, s.deferred_pages, s.stock_pages), (0, 0, 0));
    /// assert_eq!(s.buddy_pages, s.total_pages);
    /// ```
    pub fn drain(&self) {
        crate::context::might_wait("PageAllocator::drain");
        if !crate::context::nested() {
            self.drain_normal();
        }
    }

    /// The normal path of `drain` (not routed, as `alloc_pages_normal`).
    pub(crate) fn drain_normal(&self) {
        let Some(_serial) = self.drain_lock.lock_in(Mode::Normal, self.platform) else {
            return; // this thread is draining already (it interrupted itself)
        };
        for zone in self.zones() {
            zone.drain_all();
        }
    }

    /// A snapshot of the allocator's counters; see [`PageStats`].
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator, PAGE_SIZE};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(4).unwrap(); // 16 pages
    /// let s = pages.stats();
    /// assert_eq!(s.zones, 1);
    /// assert_eq!(s.total_pages, (16 << 20) / PAGE_SIZE);
    /// assert_eq!(s.free_pages, s.total_pages - 16);
    /// // SAFETY: allocated above with order 4, freed once.
    /// unsafe { pages.free_pages(p, 4) };
    /// ```
    pub fn stats(&self) -> PageStats {
        let mut s = PageStats {
            fast_path: if self.rseq_off.is_some() {
                FastPath::Rseq
            } else {
                FastPath::SlotLock
            },
            nolock_alloc_ok: self.nolock_ok_direct.load(Ordering::Relaxed),
            nolock_alloc_fail_busy: self.nolock_fail_busy.load(Ordering::Relaxed),
            nolock_alloc_fail_empty: self.nolock_fail_empty.load(Ordering::Relaxed),
            nolock_free_deferred: self.nolock_free_deferred.load(Ordering::Relaxed),
            nolock_large_alloc_ok: self.nolock_large[0].load(Ordering::Relaxed),
            nolock_large_alloc_fail_busy: self.nolock_large[1].load(Ordering::Relaxed),
            nolock_large_alloc_fail_empty: self.nolock_large[2].load(Ordering::Relaxed),
            ..PageStats::default()
        };
        for zone in self.zones() {
            zone_stats(&mut s, zone);
        }
        s.free_pages = s.buddy_pages + s.percpu_pages + s.deferred_pages + s.stock_pages;
        s
    }

    /// The page counts of zone `i` alone (the first is 0; `None` past the
    /// last); of the nolock counters, only the successes the zone counts
    /// itself: those from its slots and from its buddy lists under its
    /// tried lock (not those from its stock or deferred stack while the
    /// lock was busy, nor any failure, which only [`stats`](Self::stats)
    /// counts).
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let first = pages.zone_stats(0).expect("there is always a first zone");
    /// assert_eq!(first.total_pages, pages.stats().total_pages); // the only one so far
    /// assert!(pages.zone_stats(1).is_none());
    /// // A large nolock block, from the buddy lists under the tried lock.
    /// let p = pages.alloc_pages_nolock(5).unwrap();
    /// let first = pages.zone_stats(0).unwrap();
    /// assert_eq!((first.nolock_alloc_ok, first.nolock_large_alloc_ok), (1, 1));
    /// // SAFETY: allocated above with order 5, freed once.
    /// unsafe { pages.free_pages(p, 5) };
    /// ```
    pub fn zone_stats(&self, i: usize) -> Option<PageStats> {
        let mut s = PageStats::default();
        zone_stats(&mut s, self.zones().nth(i)?);
        s.free_pages = s.buddy_pages + s.percpu_pages + s.deferred_pages + s.stock_pages;
        Some(s)
    }

    /// Fork support: takes the drain and growth locks, every CPU's level-0
    /// slot (see `SlotLock::hold_all`; the normal path's, whose holders
    /// wait only for zone locks, taken last) and every zone lock (normal
    /// context, waits for them). Release with
    /// [`unlock_all`](Self::unlock_all).
    #[cfg(feature = "std")]
    pub(crate) fn lock_all(&self) {
        self.drain_lock.lock_raw(self.platform);
        self.grow_lock.lock_raw(self.platform);
        // Under the growth lock no other thread adds a zone until
        // unlock_all (the fork window's own normal path may: `fork_zones`).
        let slots = SlotLock::hold_all(
            self.zones().flat_map(|z| z.level0_locks()),
            crate::fork::SLOT_PATIENCE,
        );
        self.fork_slots.store(slots, Ordering::Relaxed);
        let mut n = 0;
        for zone in self.zones() {
            zone.lock.lock_raw(self.platform);
            n += 1;
        }
        self.fork_zones.store(n, Ordering::Relaxed);
    }

    /// In a forked child, before [`unlock_all`](Self::unlock_all) (the zone
    /// locks still held) and with signals blocked by the caller: counts
    /// again what other threads' nolock calls were changing at the clone,
    /// each zone's stock and deferred pages.
    #[cfg(feature = "std")]
    pub(crate) fn recount_after_fork(&self) {
        for zone in self.zones() {
            zone.recount_stock_after_fork();
            zone.recount_deferred_after_fork();
        }
    }

    /// Releases what [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// `lock_all` was called (in this process or the parent of this forked
    /// child) and not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all(&self) {
        // Only the zones lock_all locked: the fork window's normal path may
        // have added one since (with the borrowed growth lock).
        let n = self.fork_zones.load(Ordering::Relaxed);
        for zone in self.zones().take(n) {
            // SAFETY: taken by lock_all, per the caller.
            unsafe { zone.lock.force_unlock(self.platform) };
        }
        if self.fork_slots.swap(false, Ordering::Relaxed) {
            // SAFETY: held since lock_all (a zone the window added: since
            // `add_os_zone`), per the caller.
            unsafe { SlotLock::release_all(self.zones().take(n).flat_map(|z| z.level0_locks())) };
        }
        // SAFETY: as above.
        unsafe { self.grow_lock.force_unlock(self.platform) };
        // SAFETY: as above.
        unsafe { self.drain_lock.force_unlock(self.platform) };
    }

    /// Checks every structural invariant (buddy lists well-formed and fully
    /// coalesced, counts consistent, per-CPU lists well-formed). Call only
    /// while no other context uses the allocator; meant for tests.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(5).unwrap();
    /// assert_eq!(pages.check_invariants(), Ok(()));
    /// // SAFETY: allocated above with order 5, freed once.
    /// unsafe { pages.free_pages(p, 5) };
    /// assert_eq!(pages.check_invariants(), Ok(()));
    /// ```
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let _serial = self.drain_lock.lock(self.platform);
        for zone in self.zones() {
            zone.check()?;
        }
        Ok(())
    }
}

impl Drop for PageAllocator {
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        self.map.release();
        #[cfg(feature = "std")]
        if self.owns_mappings {
            let zones: [*mut Zone; MAX_ZONES] =
                core::array::from_fn(|i| self.zones[i].load(Ordering::Acquire));
            for z in zones.into_iter().take(self.nzones.load(Ordering::Acquire)) {
                // SAFETY: the zone is initialised and ours; its mapping is the
                // reservation `add_os_zone` made (which also holds the zone
                // struct itself, so read it first).
                unsafe {
                    let (start, len) = (*z).mapping;
                    crate::platform::os_release(start as *mut u8, len);
                }
            }
        }
    }
}

/// Adds `zone`'s page counts to `s` (not `free_pages`).
fn zone_stats(s: &mut PageStats, zone: &Zone) {
    s.zones += 1;
    s.total_pages += zone.total;
    s.buddy_pages += zone.free_buddy();
    s.deferred_pages += zone.deferred_pages();
    s.stock_pages += zone.stock_pages();
    s.nolock_alloc_ok += zone.nolock_ok_locked.load(Ordering::Relaxed) as u64;
    s.nolock_large_alloc_ok += zone.nolock_large_ok_locked.load(Ordering::Relaxed) as u64;
    for slot in zone.slots() {
        s.percpu_pages += slot.pages();
    }
    s.nolock_alloc_ok += slot_count_total(zone.slots().flat_map(|slot| {
        [
            slot.nolock_ok.load(Ordering::Relaxed),
            slot.heap_nolock_ok.load(Ordering::Relaxed),
        ]
    }));
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::{default_cpus, growth_size, PageAllocator, MAX_BLOCK};
    use crate::{Config, PAGE_SIZE};

    /// A grown zone whose pages end inside a granule (a first zone of
    /// 5 MiB doubles to 10 MiB: two whole granules, then half of one,
    /// whose rest is the zone's metadata): every page of it is found, with
    /// its own descriptor, through the whole granules' biased descriptors
    /// and the last granule's bounds check, and no address past its last
    /// page is.
    #[test]
    fn zone_map_finds_every_page_of_a_zone_ending_inside_a_granule() {
        let pa = PageAllocator::new(Config::default().memory(5 << 20).min_reserve(0)).unwrap();
        let mut held = std::vec::Vec::new();
        while pa.zone_count() < 2 {
            held.push(pa.alloc_pages(0).expect("the allocator grows"));
        }
        let z = pa.zone_at(1);
        let (start, end) = (z.start, z.end);
        assert_eq!(end - start, 10 << 20, "the first grown zone doubles 5 MiB");
        assert!(
            !end.is_multiple_of(MAX_BLOCK),
            "its pages end inside a granule"
        );
        for addr in (start..end)
            .step_by(PAGE_SIZE)
            .flat_map(|a| [a, a + PAGE_SIZE - 1])
        {
            let (found, d) = pa.locate_grown(addr).expect("a page of the grown zone");
            assert!(core::ptr::eq(found, z));
            assert!(core::ptr::eq(d, z.desc(z.index_of(addr))), "{addr:#x}");
        }
        for addr in (end..end.next_multiple_of(MAX_BLOCK)).step_by(PAGE_SIZE) {
            assert!(
                pa.locate_grown(addr).is_none(),
                "{addr:#x} is past the pages"
            );
            assert!(!pa.contains(addr));
        }
        assert!(pa.locate_grown(start - 1).is_none());
        for p in held {
            // SAFETY: allocated above with order 0, freed once.
            unsafe { pa.free_pages(p, 0) };
        }
    }

    /// With several grown zones, every page of each is found with its own
    /// descriptor: the newest zone's by its bounds (`newest_grown`, the
    /// zone published last), the older ones' through the zone map; no
    /// page of the first zone, and nothing past a zone's last page, is
    /// found as a grown zone's.
    #[test]
    fn grown_zones_are_found_the_newest_first_then_through_the_map() {
        let pa = PageAllocator::new(Config::default().memory(4 << 20).min_reserve(0)).unwrap();
        assert!(pa.newest_grown().is_none(), "no growth yet");
        let mut held = std::vec::Vec::new();
        while pa.zone_count() < 4 {
            held.push(pa.alloc_pages(0).expect("the allocator grows"));
        }
        let n = pa.zone_count();
        let newest = pa.newest_grown().expect("grown");
        assert!(core::ptr::eq(newest, pa.zone_at(n - 1)));
        for i in 1..n {
            let z = pa.zone_at(i);
            for addr in (z.start..z.end).step_by(PAGE_SIZE) {
                let (found, d) = pa.locate_grown(addr + 8).expect("a page of a grown zone");
                assert!(core::ptr::eq(found, z), "zone {i}, {addr:#x}");
                assert!(core::ptr::eq(d, z.desc(z.index_of(addr))), "{addr:#x}");
            }
            if let Some((other, _)) = pa.locate_grown(z.end) {
                assert!(!core::ptr::eq(other, z), "past zone {i}'s last page");
            }
        }
        let first = pa.zone_at(0);
        for addr in (first.start..first.end).step_by(64 * PAGE_SIZE) {
            assert!(
                pa.locate_grown(addr).is_none(),
                "{addr:#x} is the first zone's"
            );
        }
        for p in held {
            // SAFETY: allocated above with order 0, freed once.
            unsafe { pa.free_pages(p, 0) };
        }
    }

    /// Before its first grown zone a map looks everything up in the shared
    /// all-null root: nothing is found, whatever the address, and another
    /// allocator's growth (its own root) changes nothing for it. Dropping
    /// either releases only what it reserved.
    #[test]
    fn zone_map_without_grown_zones_finds_nothing() {
        let idle = PageAllocator::new(Config::default().memory(4 << 20)).unwrap();
        let growing = PageAllocator::new(Config::default().memory(4 << 20).min_reserve(0)).unwrap();
        let first = idle.zone_at(0).start;
        let probes = [
            0,
            1,
            first,
            first + PAGE_SIZE,
            (1 << 48) - 1,
            1 << 48,
            usize::MAX,
        ];
        for addr in probes {
            assert!(idle.locate_grown(addr).is_none(), "{addr:#x}");
        }
        let mut held = std::vec::Vec::new();
        while growing.zone_count() < 2 {
            held.push(growing.alloc_pages(0).expect("the allocator grows"));
        }
        let grown = growing.zone_at(1).start;
        assert!(growing.locate_grown(grown).is_some());
        assert!(
            idle.locate_grown(grown).is_none(),
            "another allocator's zone"
        );
        for addr in probes {
            assert!(idle.locate_grown(addr).is_none(), "{addr:#x}");
        }
        for p in held {
            // SAFETY: allocated above with order 0, freed once.
            unsafe { growing.free_pages(p, 0) };
        }
        drop(growing);
        drop(idle);
        let again = PageAllocator::new(Config::default().memory(4 << 20)).unwrap();
        assert!(again.locate_grown(grown).is_none());
    }

    #[test]
    fn default_cpus_covers_the_possible_ids_up_to_max_cpus() {
        // The larger of the count and the possible ids.
        assert_eq!(default_cpus(2, None), 2);
        assert_eq!(default_cpus(2, Some(8)), 8);
        assert_eq!(default_cpus(8, Some(2)), 8);
        assert_eq!(default_cpus(0, None), 1);
        assert_eq!(default_cpus(4096, Some(4096)), 4096);
        // More possible ids (or CPUs) than slot sets are supported: capped.
        assert_eq!(default_cpus(64, Some(8192)), 4096);
        assert_eq!(default_cpus(5000, None), 4096);
    }

    #[test]
    fn growth_takes_at_most_half_of_the_room_a_limit_leaves() {
        const MIB: usize = 1 << 20;
        // No limit: the doubling schedule.
        assert_eq!(growth_size(512 * MIB, None), 512 * MIB);
        // Room enough: the same.
        assert_eq!(growth_size(512 * MIB, Some(4096 * MIB)), 512 * MIB);
        // Half of the room, in whole 4 MiB blocks.
        assert_eq!(growth_size(512 * MIB, Some(600 * MIB)), 300 * MIB);
        assert_eq!(growth_size(512 * MIB, Some(602 * MIB)), 300 * MIB);
        // At least one largest block (`grow` then finds out).
        assert_eq!(growth_size(512 * MIB, Some(5 * MIB)), MAX_BLOCK);
        assert_eq!(growth_size(512 * MIB, Some(0)), MAX_BLOCK);
    }
}
