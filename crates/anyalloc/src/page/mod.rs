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

mod desc;
mod zone;

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
use zone::MAX_BLOCK;

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

/// Maintainer wake word: work was announced since the maintainer last
/// looked (set by any context, cleared by the maintainer).
pub(crate) const WAKE_OWED: u32 = 1;
/// Maintainer wake word: the maintainer is (about to be) asleep on the word.
pub(crate) const MAINTAINER_SLEEPING: u32 = 2;

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
    /// Successful nolock allocations.
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
pub struct PageAllocator {
    platform: &'static dyn Platform,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    config: Config,
    cpus: usize,
    zones: [AtomicPtr<Zone>; MAX_ZONES],
    nzones: AtomicUsize,
    /// The first zone's lookup window, copied when the allocator is built.
    first: FirstZone,
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
        pa.add_os_zone(config.memory, false)?;
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
    /// adds it: see `grow`).
    #[cfg(feature = "std")]
    fn add_os_zone(&self, bytes: usize, fork_held: bool) -> Result<(), Error> {
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
        self.publish_zone(z as *mut Zone);
        Ok(())
    }

    fn publish_zone(&self, z: *mut Zone) {
        // SAFETY: initialised by `Zone::init`, not shared yet.
        unsafe {
            (*z).lock.set_polling(!self.config.nolock_syscalls);
            (*z).set_rseq(self.rseq_off);
        }
        let n = self.nzones.load(Ordering::Relaxed);
        self.zones[n].store(z, Ordering::Release);
        // Release: a reader that sees the new count sees the zone pointer and
        // the zone's initialised contents.
        self.nzones.store(n + 1, Ordering::Release);
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
        self.zones()
            .enumerate()
            .skip(1)
            .find(|(_, z)| z.contains(addr))
            .map(|(i, z)| (i, z, z.index_of(addr)))
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
        // `f` is the first zone's window (`FirstZone::of`, set before the
        // allocator was returned), and page `k` of it is inside the zone.
        // SAFETY: so its descriptor is inside the zone's `descs`, which live
        // as long as `self`.
        unsafe { Some((f.first + k as u32, &*f.descs.add(k))) }
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

    // ----- normal path ---------------------------------------------------

    /// Allocates `2^order` contiguous pages, aligned to their size. Normal
    /// context: may wait on a lock, reclaim, and grow the heap. `None` when
    /// `order > MAX_ORDER` or memory is exhausted.
    ///
    /// Called by a thread already inside the allocator (a signal handler
    /// that interrupted it) or inside a nolock scope, it takes the nolock
    /// path instead (the crate's `context` module).
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator, MAX_ORDER, PAGE_SIZE};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(2).expect("memory to spare"); // 4 pages, 16 KiB
    /// assert_eq!(p.as_ptr() as usize % (4 * PAGE_SIZE), 0, "aligned to its size");
    /// assert!(pages.alloc_pages(MAX_ORDER + 1).is_none());
    /// // SAFETY: allocated above with order 2, freed once.
    /// unsafe { pages.free_pages(p, 2) };
    /// ```
    #[inline]
    pub fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        crate::context::might_wait("PageAllocator::alloc_pages");
        // Every context shares the rseq fast path; the rest is one call.
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_routed(order)
    }

    /// `alloc_pages` beyond its fast path: routed by the thread's context.
    #[inline(never)]
    fn alloc_pages_routed(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        if crate::context::nested() {
            return self.alloc_pages_nolock(order);
        }
        #[cfg(feature = "std")]
        loop {
            let mark = crate::fork::fork_mark();
            match self.alloc_pages_normal(order) {
                None if crate::fork::forked_elsewhere_since(mark) => {}
                p => return p,
            }
            // A fork on another thread holds the locks (the miss may be
            // theirs, not memory's; see the `fork` module's "Other threads
            // give way"): wait for the fork (pages cannot be served beside
            // the allocator), at most `FORK_PATIENCE_LAST`, and try again.
            // (Not the nolock path: an allocation in progress on a nolock
            // level's list at the clone would leave it held in the child.)
            if !crate::fork::wait_for_fork_at_most(crate::fork::FORK_PATIENCE_LAST) {
                return None;
            }
        }
        #[cfg(not(feature = "std"))]
        self.alloc_pages_normal(order)
    }

    /// The normal path of `alloc_pages`, for callers that decided the
    /// route already (the heap). Not routed: a caller holding a lock of the
    /// heap is marked inside, and still means the normal path.
    #[inline]
    pub(crate) fn alloc_pages_normal(&self, order: u32) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_normal_slow(order)
    }

    #[inline(never)]
    fn alloc_pages_normal_slow(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        if let Some(p) = self.alloc_normal_once(order, true) {
            return Some(p);
        }
        self.alloc_slow(order, true)
    }

    /// As `alloc_pages`, but never runs the owner's reclaim callback (for
    /// callers that hold a lock a shrinker might need).
    pub(crate) fn alloc_pages_without_reclaim(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        if let Some(p) = self.alloc_normal_once(order, true) {
            return Some(p);
        }
        self.alloc_slow(order, false)
    }

    #[cold]
    fn alloc_slow(&self, order: u32, may_reclaim: bool) -> Option<NonNull<u8>> {
        // A fork on another thread holds the locks, which the attempt gave
        // way to: draining, growing and reclaiming would give way too, or
        // run the shrinkers for nothing. The callers wait for the fork or
        // go round it (see the `fork` module's "Other threads give way").
        #[cfg(feature = "std")]
        if crate::fork::fork_mark().forking_elsewhere() {
            return None;
        }
        // Reclaim: every per-CPU list and deferred stack back to the buddy
        // lists, then try again above the watermark.
        self.drain_normal();
        if let Some(p) = self.alloc_normal_once(order, true) {
            return Some(p);
        }
        #[cfg(feature = "std")]
        if self.config.grow && self.grow() {
            if let Some(p) = self.alloc_normal_once(order, true) {
                return Some(p);
            }
        }
        // Below the min watermark with no zone to add: ask the owner's
        // shrinkers to give memory back, drain again, retry.
        if !may_reclaim {
            // The caller holds a lock a shrinker may need: ask the owner to
            // reclaim once that lock is released.
            if !self.reclaimer.load(Ordering::Relaxed).is_null() {
                self.reclaim_wanted.store(true, Ordering::Relaxed);
            }
        } else if self.run_reclaimer() {
            self.drain_normal();
            if let Some(p) = self.alloc_normal_once(order, true) {
                return Some(p);
            }
        }
        // Last resort of a caller that has reclaimed: the min reserve.
        self.alloc_normal_once(order, false)
    }

    /// Installs the owner's reclaim callback (`f(ctx)` runs shrinkers; normal
    /// context). `ctx` must stay valid as long as the allocator.
    pub(crate) fn set_reclaimer(&self, f: fn(*const ()), ctx: *const ()) {
        self.reclaim_ctx.store(ctx as *mut (), Ordering::Relaxed);
        self.reclaimer.store(f as *mut (), Ordering::Release);
    }

    fn run_reclaimer(&self) -> bool {
        let f = self.reclaimer.load(Ordering::Acquire);
        if f.is_null() {
            return false;
        }
        // SAFETY: only `set_reclaimer` stores non-null values, and it stores
        // `fn(*const ())` pointers.
        let f: fn(*const ()) = unsafe { core::mem::transmute::<*mut (), fn(*const ())>(f) };
        f(self.reclaim_ctx.load(Ordering::Relaxed));
        true
    }

    /// Whether an allocation asked for reclaim it could not run (a hint;
    /// does not clear the request).
    #[inline]
    pub(crate) fn reclaim_requested(&self) -> bool {
        self.reclaim_wanted.load(Ordering::Relaxed)
    }

    /// Whether an allocation asked for reclaim it could not run (and clears
    /// the request).
    #[inline]
    pub(crate) fn take_reclaim_request(&self) -> bool {
        self.reclaim_wanted.load(Ordering::Relaxed)
            && self.reclaim_wanted.swap(false, Ordering::Relaxed)
    }

    /// Installs the maintainer's wake word: a deferred free wakes it.
    /// `word` must stay valid as long as the allocator.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn set_waker(&self, word: *const core::sync::atomic::AtomicU32) {
        self.waker.store(word as *mut _, Ordering::Release);
    }

    /// Whether the nolock path may make system calls (see
    /// `Config::nolock_syscalls`).
    #[inline]
    pub(crate) fn nolock_syscalls(&self) -> bool {
        self.config.nolock_syscalls
    }

    /// Tells the maintainer, if there is one, that it has work. Any context:
    /// one atomic OR on the wake word (`WAKE_OWED`); only the 0 -> 1
    /// transition of a *sleeping* maintainer (`MAINTAINER_SLEEPING` set)
    /// issues the platform's wake (a futex wake on std: never blocks), so
    /// at most one per maintainer sleep; none with `nolock_syscalls` off
    /// (the maintainer polls then).
    #[inline]
    pub(crate) fn wake_maintainer(&self) {
        let w = self.waker.load(Ordering::Acquire);
        if !w.is_null() {
            // SAFETY: set_waker's contract keeps the word alive.
            let w = unsafe { &*w };
            let old = w.fetch_or(WAKE_OWED, Ordering::AcqRel);
            if old == MAINTAINER_SLEEPING && self.config.nolock_syscalls {
                self.platform.wake_one(w);
            }
        }
    }

    /// Normal context (stopping the maintainer): owes it a wake and wakes
    /// it whatever its state.
    #[cfg(feature = "std")]
    pub(crate) fn wake_maintainer_now(&self) {
        let w = self.waker.load(Ordering::Acquire);
        if !w.is_null() {
            // SAFETY: set_waker's contract keeps the word alive.
            let w = unsafe { &*w };
            w.fetch_or(WAKE_OWED, Ordering::AcqRel);
            self.platform.wake_one(w);
        }
    }

    /// One maintenance pass (normal context): merges deferred frees, keeps
    /// per-CPU lists that ran empty on the nolock path stocked (and returns
    /// idle ones, see `Zone::maintain_slots`), and (std) returns free blocks
    /// idle for `idle_epochs` epochs to the OS. Returns the bytes released.
    #[cfg_attr(not(feature = "std"), allow(unused_mut))]
    pub(crate) fn maintain(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) -> usize {
        let Some(_serial) = self.drain_lock.lock_in(Mode::Normal, self.platform) else {
            return 0;
        };
        let mut released = 0;
        for zone in self.zones() {
            // Never back: passes that advanced the epoch one after the
            // other may get here the other way round.
            zone.epoch.fetch_max(epoch, Ordering::Relaxed);
            if let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) {
                zone.drain_deferred(&g);
                zone.stock_maintain(idle_passes, &g);
            }
            zone.maintain_slots(idle_passes);
            #[cfg(feature = "std")]
            {
                let small = zone::RELEASE_MIN_ORDER;
                released +=
                    zone.release_idle_blocks(small..=MAX_ORDER, epoch, idle_epochs, RELEASE_BUDGET);
                released += zone.release_idle_blocks(
                    0..=small - 1,
                    epoch,
                    idle_epochs * zone::SMALL_AGE_FACTOR,
                    SMALL_RELEASE_BUDGET,
                );
            }
            #[cfg(not(feature = "std"))]
            let _ = idle_epochs;
        }
        released
    }

    /// Normal context: every free block on the buddy lists that is not yet
    /// returned to the OS goes back now, whatever its order (`malloc_trim`).
    /// Returns the bytes.
    #[cfg(feature = "std")]
    pub(crate) fn release_free_blocks(&self) -> usize {
        let _serial = self.drain_lock.lock(self.platform);
        self.zones().map(|z| z.release_all_free_blocks()).sum()
    }

    /// Whether some zone's free buddy pages are below twice its min
    /// watermark (the "low" mark at which shrinkers run).
    pub(crate) fn below_low(&self) -> bool {
        self.zones().any(|z| z.free_buddy() < 2 * z.min)
    }

    fn alloc_normal_once(&self, order: u32, above_min: bool) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        let cpu = self.cpu();
        for zone in self.zones() {
            let reserve = if above_min { zone.min } else { 0 };
            if order <= PCP_MAX_ORDER {
                if let Some((slot, s)) = zone.lock_own(cpu, 0) {
                    match zone.pcp_alloc(slot, &s, order, Mode::Normal, reserve, Some(cpu)) {
                        Ok(idx) => return Some(self.ptr(zone, idx)),
                        Err(_) => continue,
                    }
                }
                // The slot is held by another context (a preempted thread):
                // go to the zone directly.
            }
            // (`None`: this thread holds the lock itself; next zone.)
            let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) else {
                continue;
            };
            zone.drain_deferred(&g);
            crate::interrupt_point!(ZoneAlloc);
            if let Some(idx) = zone.buddy_alloc(order, reserve, &g) {
                zone.stock_refill(&g);
                return Some(self.ptr(zone, idx));
            }
        }
        None
    }

    /// Adds a zone from the OS; `true` if there is a new zone to try.
    #[cfg(feature = "std")]
    #[cold]
    fn grow(&self) -> bool {
        let before = self.nzones.load(Ordering::Acquire);
        let Some(g) = self.grow_lock.lock_in(Mode::Normal, self.platform) else {
            return false;
        };
        let now = self.nzones.load(Ordering::Acquire);
        if now != before {
            return true; // another thread grew the heap meanwhile
        }
        if now >= MAX_ZONES {
            return false;
        }
        // Each new zone doubles the previous one (capped at 64 GiB, far
        // below what a zone's 32-bit page indices can number).
        const GROWN_MAX: usize = 64 << 30;
        const _: () = assert!(GROWN_MAX <= crate::MAX_MEMORY);
        let doubled = self
            .config
            .memory
            .max(MAX_BLOCK)
            .saturating_mul(1usize << now.min(16))
            .min(GROWN_MAX);
        crate::interrupt_point!(ZoneGrow);
        let mut bytes = growth_size(doubled, crate::platform::address_space_headroom());
        loop {
            // Borrowed: this is the fork window, every zone is held across
            // the fork, and so must the new one be, from before any other
            // thread can see it (their nolock paths try every zone).
            if self.add_os_zone(bytes, g.borrowed()).is_ok() {
                return true;
            }
            // Refused (a limit on address space, or no room left in it):
            // halve, down to one largest block, before reporting no memory.
            if bytes <= MAX_BLOCK {
                return false;
            }
            bytes = (bytes / 2).next_multiple_of(MAX_BLOCK).max(MAX_BLOCK);
        }
    }

    /// The rseq fast path of every allocation of at most `PCP_MAX_ORDER`:
    /// the first zone's level-0 list of this CPU. `None`: the slow path.
    /// Any context may call it (it is a restartable sequence, or nothing
    /// without rseq).
    #[inline(always)]
    pub(crate) fn seq_alloc<const COUNT_NOLOCK: bool>(&self, order: u32) -> Option<NonNull<u8>> {
        if order > PCP_MAX_ORDER {
            return None;
        }
        self.seq_alloc_counted::<COUNT_NOLOCK, { layout::PCP_NOLOCK_OK }>(order)
    }

    /// `seq_alloc::<false>` for a heap's large block on the normal path:
    /// also [`HEAP_PCP_ORDER`] (64 KiB), whose list only a heap's large
    /// frees fill ([`free_pages_fast`](Self::free_pages_fast)). Any context
    /// may pop it (a restartable sequence); beyond this fast path, 64 KiB
    /// is a large order like any other (buddy lists, stock, and for a
    /// nested or nolock call the large nolock counters).
    #[inline(always)]
    pub(crate) fn seq_alloc_heap(&self, order: u32) -> Option<NonNull<u8>> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        self.seq_alloc_counted::<false, { layout::PCP_NOLOCK_OK }>(order)
    }

    /// `seq_alloc::<true>` for a heap's nolock large block (orders up to
    /// [`HEAP_PCP_ORDER`], as `seq_alloc_heap`), counted apart
    /// from the page allocator's own nolock successes (it still counts in
    /// [`PageStats::nolock_alloc_ok`]): see [`heap_large_nolock_ok`](Self::heap_large_nolock_ok).
    #[inline(always)]
    pub(crate) fn seq_alloc_heap_large(&self, order: u32) -> Option<NonNull<u8>> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        self.seq_alloc_counted::<true, { layout::PCP_HEAP_NOLOCK_OK }>(order)
    }

    /// The above, for an order with a per-CPU list: the counter a counting
    /// pop adds to is the page slot's field at offset `COUNTER` (see
    /// `Zone::seq_alloc`).
    #[inline(always)]
    fn seq_alloc_counted<const COUNT: bool, const COUNTER: usize>(
        &self,
        order: u32,
    ) -> Option<NonNull<u8>> {
        let zone = self.first_zone();
        let idx = zone.seq_alloc::<COUNT, COUNTER>(order)?;
        Some(self.ptr(zone, idx))
    }

    /// How many blocks [`seq_alloc_heap_large`](Self::seq_alloc_heap_large)
    /// handed out (racy while they run).
    pub(crate) fn heap_large_nolock_ok(&self) -> u64 {
        slot_count_total(
            self.zones()
                .flat_map(|z| z.slots())
                .map(|s| s.heap_nolock_ok.load(Ordering::Relaxed)),
        )
    }

    /// Whether `addr` lies in the first zone (its window: no zone pointer
    /// followed).
    #[inline(always)]
    pub(crate) fn in_first_zone(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.first.start) < self.first.len
    }

    /// The first zone (always present once the allocator is built).
    #[inline(always)]
    pub(crate) fn first_zone(&self) -> &Zone {
        // SAFETY: `first` was copied from zone 0 before the allocator was
        // returned, and the zone lives as long as `self`.
        unsafe { &*self.first.zone }
    }

    #[inline]
    fn ptr(&self, zone: &Zone, idx: u32) -> NonNull<u8> {
        // SAFETY: a zone's page addresses are never null.
        unsafe { NonNull::new_unchecked(zone.addr_of(idx) as *mut u8) }
    }

    /// Frees a block from [`alloc_pages`](Self::alloc_pages) or
    /// [`alloc_pages_nolock`](Self::alloc_pages_nolock). Normal context.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(1).unwrap();
    /// assert_eq!(pages.stats().free_pages, pages.stats().total_pages - 2);
    /// // SAFETY: allocated above with order 1, not used afterwards.
    /// unsafe { pages.free_pages(p, 1) };
    /// assert_eq!(pages.stats().free_pages, pages.stats().total_pages);
    /// ```
    ///
    /// # Safety
    /// `ptr` must have been returned by this allocator for `order` and not be
    /// used afterwards. Violations that can be detected (a pointer outside
    /// managed memory, misaligned, already free, freed with another order,
    /// or a block of a heap built on this allocator, such as a slab page or
    /// a large allocation of [`Heap`](crate::Heap)) abort the process with a
    /// one-line message.
    ///
    /// Called by a thread already inside the allocator (a signal handler
    /// that interrupted it) or inside a nolock scope, it takes the nolock
    /// path instead (the crate's `context` module).
    #[inline]
    pub unsafe fn free_pages(&self, ptr: NonNull<u8>, order: u32) {
        crate::context::might_wait("PageAllocator::free_pages");
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, true>(ptr, order, FreeRoute::Routed) };
    }

    /// `free_pages` without its context check, for the heap's large-block
    /// fast path: routed by the thread's context (`nolock`: the nolock
    /// path). Its rseq fast path also takes blocks of [`HEAP_PCP_ORDER`]
    /// (for `seq_alloc_heap`), in every context; beyond that fast path they
    /// are a large order like any other.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(always)]
    pub(crate) unsafe fn free_pages_fast(&self, ptr: NonNull<u8>, order: u32, nolock: bool) {
        let route = if nolock {
            FreeRoute::NoLock
        } else {
            FreeRoute::Routed
        };
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<HEAP_PCP_ORDER, false>(ptr, order, route) };
    }

    /// The normal path of `free_pages` (not routed, as `alloc_pages_normal`).
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub(crate) unsafe fn free_pages_normal(&self, ptr: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, false>(ptr, order, FreeRoute::Normal) };
    }

    /// Every free of pages: the inline fast path, then one out-of-line call.
    /// The fast path is the same for every route: the block is claimed, and
    /// this CPU's level-0 slot has room (a nolock free's condition); only a
    /// slot left over `high` asks the route (a normal free drains a batch).
    /// `route` is a constant at each call site, and so are `FAST_MAX`, the
    /// largest order the fast path takes, and `PUBLIC`: a free through the
    /// public API (`free_pages`, `free_pages_nolock`), which may be handed
    /// a block of a heap built on this allocator by mistake, and checks its
    /// owner (see [`claim_fast`](Self::claim_fast)). The heap's own frees
    /// clear the owner first and skip the check.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(always)]
    unsafe fn free_pages_via<const FAST_MAX: u32, const PUBLIC: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
    ) {
        // This CPU's page count (a hint) is read before the claim: the
        // claim's locked instruction waits for earlier stores to drain, and
        // these loads run meanwhile instead of after it.
        let first = self.first_zone();
        let pages = if order <= FAST_MAX && first.uses_rseq() {
            first.pages_here()
        } else {
            usize::MAX
        };
        // When the block will go onto this CPU's list, the claim marks it
        // PCP at once (a racing free fails its claim just the same), so the
        // fast path stores no state of its own. (`usize::MAX`, no fast
        // path, never has room.)
        let room = first.room_for(pages);
        let kind = if room { desc::PCP } else { desc::FREEING };
        let Some((zone, idx, d)) = self.claim_fast::<PUBLIC>(ptr, order, kind) else {
            // SAFETY: forwarded contract.
            return unsafe { self.free_pages_slow(ptr, order, route, PUBLIC) };
        };
        if room && zone.seq_free(idx, d, order) {
            if route != FreeRoute::NoLock && zone.over_high(pages + (1 << order)) {
                return self.trim_after_free(zone, route);
            }
            return;
        }
        self.free_claimed(zone, idx, order, route);
    }

    /// After a fast free put this CPU's slot over `high`: a normal free
    /// drains a batch; a nested one leaves it (nolock frees may overshoot).
    #[cold]
    #[inline(never)]
    fn trim_after_free(&self, zone: &Zone, route: FreeRoute) {
        if route == FreeRoute::Normal || !crate::context::nested() {
            zone.trim_own(self.cpu());
        }
    }

    /// A free whose inline claim could not decide: the full claim (which
    /// reports a bad free; `public`: a free through the public API, see
    /// `free_pages_via`), then the slow path.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(never)]
    unsafe fn free_pages_slow(&self, ptr: NonNull<u8>, order: u32, route: FreeRoute, public: bool) {
        let (zone, idx) = self.claim_slow(ptr, order, public);
        self.free_claimed(zone, idx, order, route);
    }

    /// A claimed block, beyond the fast path, by `route`.
    #[inline(never)]
    fn free_claimed(&self, zone: &Zone, idx: u32, order: u32, route: FreeRoute) {
        let nolock = match route {
            FreeRoute::Normal => false,
            FreeRoute::NoLock => true,
            FreeRoute::Routed => crate::context::nested(),
        };
        if nolock {
            self.free_claimed_nolock(zone, idx, order)
        } else {
            self.free_claimed_normal(zone, idx, order)
        }
    }

    /// The normal free of a claimed block, beyond the fast path.
    #[inline(never)]
    fn free_claimed_normal(&self, zone: &Zone, idx: u32, order: u32) {
        if order <= PCP_MAX_ORDER {
            if let Some((slot, s)) = zone.lock_own(self.cpu(), 0) {
                zone.pcp_free(slot, &s, idx, order, Mode::Normal);
                return;
            }
        }
        let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) else {
            // A stalled fork on another thread holds it: the nolock free
            // (see `fork::fork_stalled`).
            #[cfg(feature = "std")]
            if crate::fork::fork_stalled() {
                return self.free_claimed_nolock(zone, idx, order);
            }
            // This thread holds the zone lock itself, or a fork on another
            // thread does: park the block (one CAS; not a nolock level's
            // list, which a free in progress at the clone would leave held
            // in the child).
            zone.defer_free(idx, order);
            self.nolock_free_deferred.fetch_add(1, Ordering::Relaxed);
            self.wake_maintainer();
            return;
        };
        crate::interrupt_point!(ZoneFree);
        zone.buddy_free(idx, order, &g);
        zone.drain_deferred(&g);
        zone.stock_refill(&g);
    }

    /// The heap's free of a block of its own (a slab, a large block) whose
    /// owner it cleared: `free_pages_normal` or `free_pages_nolock_owned`,
    /// as `mode` says.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub(crate) unsafe fn free_pages_in(&self, ptr: NonNull<u8>, order: u32, mode: Mode) {
        // SAFETY: forwarded contract.
        unsafe {
            match mode {
                Mode::Normal => self.free_pages_normal(ptr, order),
                Mode::NoLock => self.free_pages_nolock_owned(ptr, order),
            }
        }
    }

    // ----- nolock path -----------------------------------------------------

    /// Allocates `2^order` pages (order at most [`MAX_ORDER`]) from any
    /// context: never waits, makes no blocking system call (at most a
    /// `FUTEX_WAKE`, none with [`Config::nolock_syscalls`] off), never
    /// reclaims, never grows the heap, never takes a zone below its min
    /// watermark. Orders up to [`PCP_MAX_ORDER`] come from the per-CPU lists
    /// first; larger ones from the buddy lists of a zone whose lock could be
    /// *tried* (a busy zone: its nolock stock, its deferred stack, then the
    /// next zone). `None` means "no memory for you in this context now";
    /// don't spin on it.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// // In a signal handler, `None` is an answer to handle, not a reason to retry.
    /// let Some(p) = pages.alloc_pages_nolock(0) else { return };
    /// assert_eq!(pages.stats().nolock_alloc_ok, 1);
    /// // SAFETY: allocated above with order 0, freed once.
    /// unsafe { pages.free_pages_nolock(p, 0) };
    /// ```
    #[inline]
    pub fn alloc_pages_nolock(&self, order: u32) -> Option<NonNull<u8>> {
        self.alloc_pages_nolock_why(order).ok()
    }

    /// As [`alloc_pages_nolock`](Self::alloc_pages_nolock), saying why it
    /// failed (and counting the failure).
    #[inline]
    pub(crate) fn alloc_pages_nolock_why(&self, order: u32) -> Result<NonNull<u8>, Fail> {
        if let Some(p) = self.seq_alloc::<true>(order) {
            return Ok(p);
        }
        self.alloc_pages_nolock_slow(order)
    }

    #[inline(never)]
    fn alloc_pages_nolock_slow(&self, order: u32) -> Result<NonNull<u8>, Fail> {
        if order > MAX_ORDER {
            return Err(Fail::Empty); // refused, not counted: not a memory shortage
        }
        let cpu = self.cpu();
        let mut busy = false;
        let large = order > PCP_MAX_ORDER;
        for zone in self.zones() {
            match self.nolock_from_zone(zone, cpu, order) {
                // (A large success was counted where it was found.)
                Ok(p) => return Ok(p),
                Err(Fail::Busy) => busy = true,
                Err(Fail::Empty) => {}
            }
        }
        let (counter, why) = if busy {
            (&self.nolock_fail_busy, Fail::Busy)
        } else {
            (&self.nolock_fail_empty, Fail::Empty)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if large {
            self.nolock_large[if busy { 1 } else { 2 }].fetch_add(1, Ordering::Relaxed);
        }
        Err(why)
    }

    #[inline]
    fn nolock_from_zone(&self, zone: &Zone, cpu: usize, order: u32) -> Result<NonNull<u8>, Fail> {
        if order > PCP_MAX_ORDER {
            return self.nolock_large_from_zone(zone, order);
        }
        let mut busy = false;
        // Zone lock observed busy: later steps don't try it again.
        let mut zone_busy = false;
        // 1 + 2: this CPU's slots, one per context level; refill when empty.
        for level in 0..LEVELS {
            let Some((slot, s)) = zone.lock_own(cpu, level) else {
                busy = true;
                continue;
            };
            let reserve = if zone_busy { usize::MAX } else { zone.min };
            let got = if zone_busy {
                // Only the slot's own stock: refilling needs the zone lock.
                zone.pcp_alloc(slot, &s, order, Mode::NoLock, reserve, None)
                    .ok()
            } else {
                match zone.pcp_alloc(slot, &s, order, Mode::NoLock, reserve, None) {
                    Ok(idx) => Some(idx),
                    Err(Fail::Busy) => {
                        zone_busy = true;
                        busy = true;
                        None
                    }
                    Err(Fail::Empty) => None,
                }
            };
            if let Some(idx) = got {
                bump(&slot.nolock_ok, &s);
                return Ok(self.ptr(zone, idx));
            }
        }
        // 3: the other CPUs' stock.
        for other in (0..self.cpus).filter(|&c| c != cpu % self.cpus) {
            for level in (0..LEVELS).filter(|&l| zone.remote_nolock_ok(l)) {
                let slot = zone.slot(other, level);
                if slot.pages() == 0 {
                    continue;
                }
                let Some(s) = slot.lock.try_lock() else {
                    busy = true;
                    continue;
                };
                if let Ok(idx) = zone.pcp_alloc(slot, &s, order, Mode::NoLock, usize::MAX, None) {
                    bump(&slot.nolock_ok, &s);
                    return Ok(self.ptr(zone, idx));
                }
            }
        }
        // 4: the zone directly.
        if !zone_busy {
            if let Some(g) = zone.lock.try_lock(zone.platform()) {
                zone.drain_deferred_bounded(&g);
                crate::interrupt_point!(NolockZoneAlloc);
                if let Some(idx) = zone.buddy_alloc(order, zone.min, &g) {
                    g.add(&zone.nolock_ok_locked, 1);
                    return Ok(self.ptr(zone, idx));
                }
                return Err(if busy { Fail::Busy } else { Fail::Empty });
            }
        }
        // 5: a block of this order parked on the deferred stack.
        if let Some(idx) = zone.steal_deferred(order) {
            self.nolock_ok_direct.fetch_add(1, Ordering::Relaxed);
            return Ok(self.ptr(zone, idx));
        }
        Err(Fail::Busy)
    }

    /// Orders above the per-CPU lists, from one zone: the buddy lists under a
    /// *tried* zone lock (above the min watermark); when the lock is busy
    /// (held by another thread, or by the very code this handler
    /// interrupted), the zone's nolock stock, a block of this order parked
    /// on the deferred stack, then a larger stocked block split without the
    /// lock. Never waits.
    fn nolock_large_from_zone(&self, zone: &Zone, order: u32) -> Result<NonNull<u8>, Fail> {
        zone.stock_wanted(order);
        let (got, why) = match zone.lock.try_lock(zone.platform()) {
            Some(g) => {
                zone.drain_deferred_bounded(&g);
                crate::interrupt_point!(NolockZoneAlloc);
                let got = zone.buddy_alloc(order, zone.min, &g);
                if got.is_some() {
                    g.add(&zone.nolock_ok_locked, 1);
                    g.add(&zone.nolock_large_ok_locked, 1);
                }
                zone.stock_refill(&g);
                drop(g);
                if let Some(idx) = got {
                    return Ok(self.ptr(zone, idx));
                }
                (zone.stock_take(order), Fail::Empty)
            }
            None => {
                let got = zone
                    .stock_take(order)
                    .or_else(|| zone.steal_deferred(order));
                let got = got.or_else(|| {
                    let (idx, deferred) = zone.stock_take_split(order)?;
                    if deferred {
                        self.wake_maintainer();
                    }
                    Some(idx)
                });
                (got, Fail::Busy)
            }
        };
        match got {
            Some(idx) => {
                self.nolock_ok_direct.fetch_add(1, Ordering::Relaxed);
                self.nolock_large[0].fetch_add(1, Ordering::Relaxed);
                Ok(self.ptr(zone, idx))
            }
            None => Err(why),
        }
    }

    /// Frees a block from any context, whichever path allocated it. Never
    /// waits and never fails: when every lock is held the block is parked on
    /// the zone's deferred stack until the next zone-lock holder merges it.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(3).unwrap(); // normal path...
    /// // SAFETY: allocated above with order 3, not used afterwards.
    /// unsafe { pages.free_pages_nolock(p, 3) }; // ...freed from any context
    /// assert_eq!(pages.stats().free_pages, pages.stats().total_pages);
    /// ```
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub unsafe fn free_pages_nolock(&self, ptr: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, true>(ptr, order, FreeRoute::NoLock) };
    }

    /// The nolock free of a block the heap owned, after the heap cleared
    /// its owner (not checked again, as `free_pages_normal`).
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub(crate) unsafe fn free_pages_nolock_owned(&self, ptr: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, false>(ptr, order, FreeRoute::NoLock) };
    }

    /// The nolock free of a claimed block, beyond the fast path.
    #[inline(never)]
    fn free_claimed_nolock(&self, zone: &Zone, idx: u32, order: u32) {
        // Whether the zone lock was tried (and found busy) already.
        let mut zone_tried = false;
        if order <= PCP_MAX_ORDER {
            let cpu = self.cpu();
            for level in 0..LEVELS {
                // A full level-0 slot is still taken: the block may go to
                // the buddy lists with a batch of it.
                if level > 0 && !zone.pcp_has_room(zone.slot(cpu, level)) {
                    continue;
                }
                if let Some((slot, s)) = zone.lock_own(cpu, level) {
                    if zone.pcp_has_room(slot) {
                        zone.pcp_free(slot, &s, idx, order, Mode::NoLock);
                        return;
                    }
                    if level == 0 {
                        if zone.pcp_trim_nolock(slot, &s, idx, order) {
                            return;
                        }
                        zone_tried = true;
                    }
                }
            }
        }
        // (Busy a moment ago: straight on to the lock-free places.)
        let g = if zone_tried {
            None
        } else {
            zone.lock.try_lock(zone.platform())
        };
        if let Some(g) = g {
            zone.buddy_free_nolock(idx, order, &g);
            return;
        }
        // A large block refills an empty stock cell of its order, if wanted.
        if order > PCP_MAX_ORDER && zone.stock_put(idx, order) {
            return;
        }
        zone.defer_free(idx, order);
        self.nolock_free_deferred.fetch_add(1, Ordering::Relaxed);
        self.wake_maintainer();
    }

    /// The inline half of a free's claim: a block of the first zone,
    /// aligned for `order`, claimed (`ALLOCATED -> kind`: `FREEING`, or
    /// `PCP` for a block about to be pushed onto this CPU's list). `None`:
    /// ask [`claim_slow`](Self::claim_slow), which decides and reports.
    ///
    /// `PUBLIC` (a free through the public API): a block whose descriptor
    /// names an owner is not claimed either. The owner is the object
    /// allocator's word (`desc`): set on every page of a slab and on the
    /// head page of a large allocation by a heap built on this allocator,
    /// for as long as the heap holds the block, and cleared by the heap
    /// before its own free of the block (which skips this check), so it is
    /// 0 on every block a caller of `alloc_pages` got. A block it names is
    /// the heap's, handed to `heap.pages().free_pages` by mistake: claimed,
    /// it would go onto a free list while the heap still uses it (a slab's
    /// objects handed out again, a page given out twice). The check is one
    /// load and compare of the descriptor the claim's CAS has just written
    /// (same 32 bytes, same cache line), after the CAS: that way it costs
    /// the order-0 page pair nothing measurable (before the CAS, the load
    /// sat on the way to the locked instruction: about 0.8 ns of 9.5 in
    /// `anyalloc bench --filter pages`). A block it names is put back
    /// (`ALLOCATED` again, nothing else was touched) and `claim_slow`
    /// reports it. Between the claim and the put-back a racing free of the
    /// heap's would report a double free instead: either way the program
    /// freed a block of the heap's through the page allocator, and dies.
    #[inline(always)]
    fn claim_fast<const PUBLIC: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        kind: u32,
    ) -> Option<(&Zone, u32, &PageDesc)> {
        // The common case inline: a well-aligned block of the first zone
        // whose claim succeeds. Anything else (other zones, every report)
        // is `claim_slow`, which starts over: a failed CAS changed nothing.
        let addr = ptr.as_ptr() as usize;
        if order > MAX_ORDER || addr & ((PAGE_SIZE << order) - 1) != 0 {
            return None;
        }
        let (idx, d) = self.locate_first(addr)?;
        let zone = self.first_zone();
        d.state
            .compare_exchange(
                desc::state(desc::ALLOCATED, order),
                desc::state(kind, order),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        if PUBLIC && d.owner.load(Ordering::Relaxed) != 0 {
            // A heap's block: put back as it was, for `claim_slow`'s report.
            d.set(desc::state(desc::ALLOCATED, order));
            return None;
        }
        crate::interrupt_point!(PageClaimed);
        Some((zone, idx, d))
    }

    /// Validates a free and claims the block (`ALLOCATED -> FREEING`), or
    /// reports the corruption and aborts. `public`: a free through the
    /// public API, which must not name a block a heap owns (see
    /// `claim_fast`).
    #[inline(never)]
    fn claim_slow(&self, ptr: NonNull<u8>, order: u32, public: bool) -> (&Zone, u32) {
        let addr = ptr.as_ptr() as usize;
        if order > MAX_ORDER {
            self.corrupt(
                "free of page ",
                addr,
                " with an order above MAX_ORDER (order ",
                order,
            );
        }
        let Some((zone, idx)) = self.locate(addr) else {
            self.corrupt(
                "free of ",
                addr,
                ", which is outside managed memory (order ",
                order,
            );
        };
        if public && zone.desc(idx).owner.load(Ordering::Relaxed) != 0 {
            // Any address in a page the heap owns: a slab's every page, a
            // large block's head (its other pages report as interior).
            self.corrupt(
                "page free of ",
                addr,
                ", which a heap owns (a slab or a large allocation: free it with the heap) (order ",
                order,
            );
        }
        if addr & ((PAGE_SIZE << order) - 1) != 0 {
            self.corrupt(
                "free of ",
                addr,
                ", which is misaligned for its order (order ",
                order,
            );
        }
        let d = zone.desc(idx);
        let want = desc::state(desc::ALLOCATED, order);
        match d.state.compare_exchange(
            want,
            desc::state(desc::FREEING, order),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                // FREEING: a racing (wrong) free of the block fails its claim.
                crate::interrupt_point!(PageClaimed);
                (zone, idx)
            }
            Err(actual) => self.bad_claim(addr, order, actual),
        }
    }

    #[cold]
    fn bad_claim(&self, addr: usize, order: u32, actual: u32) -> ! {
        match desc::kind_of(actual) {
            desc::ALLOCATED => {
                let msg = FatalMessage::new()
                    .text("anyalloc: free of page ")
                    .hex(addr)
                    .text(" with order ")
                    .dec(order as usize)
                    .text(", but it was allocated with order ")
                    .dec(desc::order_of(actual) as usize);
                self.fatal(msg)
            }
            desc::TAIL => self.corrupt(
                "free of ",
                addr,
                ", which is not the start of an allocated block: double free or interior pointer (order ",
                order,
            ),
            desc::RELEASING => self.corrupt(
                "double free of page ",
                addr,
                ", a free block being returned to the OS (order ",
                order,
            ),
            _ => self.corrupt("double free of page ", addr, " (order ", order),
        }
    }

    #[cold]
    fn corrupt(&self, what: &str, addr: usize, middle: &str, order: u32) -> ! {
        let msg = FatalMessage::new()
            .text("anyalloc: ")
            .text(what)
            .hex(addr)
            .text(middle)
            .dec(order as usize)
            .text(")");
        self.fatal(msg)
    }

    #[cold]
    pub(crate) fn fatal(&self, mut msg: FatalMessage) -> ! {
        self.platform.fatal(msg.line())
    }

    /// `fatal` with the line `before`, `addr` in hexadecimal, `after`,
    /// built in this function's own frame. For the checks of the nolock
    /// paths' hot functions: a message built in place is a 512-byte buffer
    /// (copied once per builder call) in *their* frames, reserved on every
    /// call, fatal or not, which nested handlers on a small alternate
    /// signal stack pay for.
    #[cold]
    #[inline(never)]
    pub(crate) fn fatal_at(&self, before: &str, addr: usize, after: &str) -> ! {
        self.fatal(FatalMessage::new().text(before).hex(addr).text(after))
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
    /// last); of the nolock counters, only its slots' successes.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let first = pages.zone_stats(0).expect("there is always a first zone");
    /// assert_eq!(first.total_pages, pages.stats().total_pages); // the only one so far
    /// assert!(pages.zone_stats(1).is_none());
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
    use super::{default_cpus, growth_size, MAX_BLOCK};

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
