//! The object allocator: kmalloc-style size classes with per-CPU sheaves.
//!
//! [`Heap`] serves objects of 8 bytes to 8 KiB from size-class caches (see
//! [`cache`] for sheaves, barn and slabs), larger ones from the page
//! allocator (orders up to [`MAX_ORDER`], the order kept in
//! the page descriptor so `free` needs no size), and on std anything above
//! 4 MiB from `mmap` (normal path only). The nolock path serves the page
//! orders too, up to 4 MiB.
//!
//! Like the page allocator it has a normal path ([`Heap::alloc`],
//! [`Heap::free`]) and a nolock path ([`Heap::alloc_nolock`],
//! [`Heap::free_nolock`]) that only tries locks: it may fail, but never
//! waits, and a nolock free never fails (it parks the object on the cache's
//! deferred stack when every lock is held, and wakes the maintainer). When
//! every slot of a class is busy, a nolock allocation retries once in the
//! next larger class, as upstream's `kmalloc_nolock` does.
//!
//! Accounted allocations ([`Heap::alloc_in`], [`Heap::alloc_nolock_in`])
//! come from a second set of caches whose slabs end with one owner word per
//! object (as the kernel's `kmalloc-cg-*` caches); see [`crate::account`].
//!
//! # Where the heap lives
//!
//! A `Heap` is a handle. Its state (`HeapCore`: the page allocator, the
//! caches, the registries) sits at the start of the heap's metadata area, at
//! a stable address, so the maintenance thread and the page allocator's
//! callbacks can refer to it while the handle moves. Dropping the handle
//! stops the maintainer and releases everything.
//!
//! ```
//! use anyalloc::{Config, Heap};
//! use core::alloc::Layout;
//! let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
//! let layout = Layout::from_size_align(100, 8).unwrap();
//! let a = heap.alloc(layout).unwrap();
//! let b = heap.alloc_nolock(layout).unwrap(); // from any context
//! assert!(heap.usable_size(a) >= 100);
//! unsafe {
//!     heap.free(a); // no size needed
//!     heap.free_nolock(b);
//! }
//! heap.drain();
//! let pages = heap.pages().stats();
//! assert_eq!(pages.free_pages, pages.total_pages);
//! ```
//!
//! # Reading the code
//!
//! One concept per submodule, top-down:
//!
//! - this module: the state (`HeapCore`, the metadata area's layout), the
//!   statistics, what a `fork` takes and gives back;
//! - `heap`: the [`Heap`] handle and its public API;
//! - `allocate` and `free`: the paths of an allocation and of a free, both
//!   modes, and the lookup of what a pointer is;
//! - `accounted`: allocations charged to an accounting group;
//! - `reclaim`: shrinkers, `drain` and the maintenance pass;
//! - [`cache`]: one size class (its sheaves, barn, slabs and the
//!   double-free key), `class`: the size classes, `huge`: the table of
//!   `mmap`ed blocks.
//!
//! # Giving memory back on demand: shrinkers
//!
//! A program that keeps memory it could give up (a cache of spare buffers)
//! registers a shrinker. The heap calls it on the normal path when memory
//! runs low or an accounting group is over its limit, then retries once:
//!
//! ```
//! use anyalloc::{Config, Group, Heap};
//! use core::alloc::Layout;
//! use core::ptr::NonNull;
//! use std::sync::Mutex;
//!
//! // A heap that lives as long as the program, so the shrinker may use it.
//! let heap: &'static Heap = Box::leak(Box::new(Heap::new(Config::default()).unwrap()));
//! let buffer = Layout::from_size_align(16 << 10, 8).unwrap();
//! static SPARE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
//! heap.register_shrinker(move |wanted| {
//!     let mut freed = 0;
//!     while freed < wanted {
//!         let Some(p) = SPARE.lock().unwrap().pop() else { break };
//!         // SAFETY: the spare buffers came from `heap` and nothing else uses them.
//!         unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
//!         freed += buffer.size();
//!     }
//!     freed
//! });
//!
//! // Four spare buffers fill a 64 KiB group...
//! let group = Group::new("buffers", Some(64 << 10), None);
//! for _ in 0..4 {
//!     let p = heap.alloc_in(buffer, &group).unwrap();
//!     SPARE.lock().unwrap().push(p.as_ptr() as usize);
//! }
//! // ...so the next allocation runs the shrinker, which frees spares.
//! let p = heap.alloc_in(buffer, &group).expect("the shrinker made room");
//! assert!(SPARE.lock().unwrap().len() < 4);
//! assert!(group.usage() <= 64 << 10);
//! # unsafe { heap.free(p) };
//! ```

extern crate alloc;

mod accounted;
mod allocate;
pub mod cache;
mod class;
mod free;
#[cfg(feature = "std")]
pub(crate) use free::nothing_to_free;
mod heap;
#[cfg(feature = "std")]
mod huge;
#[cfg(feature = "std")]
mod huge_cache;
#[cfg(all(test, loom))]
mod loom_model;
mod reclaim;

use alloc::sync::Arc;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::account::{self, Group};
use crate::config::{Config, Error};
use crate::page::{Fail, FastPath, Mode, PageAllocator, PageStats, Zone};
use crate::platform::FatalMessage;
use crate::sync::IndexStack;
#[cfg(feature = "std")]
use crate::sync::SlotLock;
use crate::{MAX_ORDER, PAGE_SIZE};
pub use cache::ClassStats;
use cache::{cache_sheaf_bytes, cache_slot_bytes, BarnSize, Cache, CacheSetup};
pub(crate) use class::CLASSES;
use reclaim::{ShrinkerNode, Shrinkers};

/// `owner` of the head page of a large (page-backed) allocation.
const LARGE_OWNER: u16 = u16::MAX;
// An owner tag is the sequences' cache index (`HeapCore::cache_at`), and
// every cache's tag fits a descriptor below the large marker.
const _: () = {
    assert!(cache::SLOT_BYTES == 1 << class::TAG_SHIFT);
    assert!(class::tag_of(CACHES - 1) < LARGE_OWNER as usize);
};
/// Caches: one plain and one accounted per class.
const CACHES: usize = 2 * CLASSES;
/// Bytes a shrinker is asked for when the heap reclaims.
const RECLAIM_BYTES: usize = 4 << 20;

/// A snapshot of a heap's counters, read one after another while other
/// threads (the maintenance thread included) may be moving objects: exact
/// when the heap is quiet, otherwise off by the objects in flight (a
/// maintenance pass stocking a sheaf between two reads, say). A test that
/// checks exact counts runs its heap with `Config::maintenance(false)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// The fast path's mechanism.
    pub fast_path: FastPath,
    /// Per size class, smallest first (plain and accounted caches together).
    pub classes: [ClassStats; CLASSES],
    /// Small objects in use, over all classes.
    pub objects_in_use: usize,
    /// Large (page-backed) allocations in use, counted from the page
    /// descriptors when the statistics are taken (a scan of every page's
    /// descriptor: cheap next to a large allocation, and nothing on the
    /// allocation paths). This includes small nolock requests served by a
    /// page block: one that finds its class and the next class up busy (a
    /// lock held by the context it interrupted, or by the maintainer) gets
    /// the smallest page block that fits instead of failing. So the
    /// allocations in use are `objects_in_use + large_in_use +
    /// huge_in_use`.
    pub large_in_use: usize,
    /// Huge (mmap'd) allocations in use: those above 4 MiB, and (std) any
    /// block of a normal-path allocation that was mapped on its own because
    /// another thread's `fork` held the heap's locks for too long.
    pub huge_in_use: usize,
    /// Bytes of the large allocations in use (whole page blocks).
    pub large_bytes: usize,
    /// Bytes of the huge allocations in use: their mappings' lengths
    /// (whole pages), which may be more than was asked for (std): a freed
    /// mapping reused whole (up to twice the request) and a `remap_huge`
    /// growth (at least half the old size more) count in full. Freed
    /// mappings kept for reuse are not in use: `huge_cached_bytes`.
    pub huge_bytes: usize,
    /// Successful nolock allocations: every success of a nolock call
    /// (`alloc_nolock*`, `NoLock`). A normal-path call
    /// routed to the nolock path (re-entry, a `nolock_scope`) counts only
    /// when it misses the per-CPU sheaf: that fast path, which never
    /// waits, is the same on both routes and counts neither.
    pub nolock_alloc_ok: u64,
    /// Nolock allocations that failed because every lock they needed was held.
    pub nolock_alloc_fail_busy: u64,
    /// Nolock allocations that failed for lack of memory above the watermark,
    /// or because an accounting limit refused the charge.
    pub nolock_alloc_fail_empty: u64,
    /// Nolock allocations refused because the request is above 4 MiB
    /// ([`MAX_ORDER`] pages): huge blocks come from `mmap`, normal path only.
    pub nolock_alloc_fail_too_large: u64,
    /// Nolock frees parked on a deferred stack.
    pub nolock_free_deferred: u64,
    /// Times the heap ran its shrinkers.
    pub reclaims: u64,
    /// Bytes the shrinkers said they freed.
    pub shrinker_freed_bytes: u64,
    /// Maintenance passes (by the maintenance thread or `maintain()`, and
    /// without a maintenance thread the inline decay's passes, run by the
    /// allocation calls: `Config::decay`).
    pub maintenance_passes: u64,
    /// Bytes of free blocks given back to the OS (the page allocator's;
    /// not the freed huge mappings kept for reuse): idle ones by maintenance
    /// (a maintenance thread, `maintain()`, or the inline decay), and every
    /// other by `Heap::trim` (std). Memory never touched and
    /// memory already given back do not count (again), also when a block
    /// freed merged with such memory and goes back whole. Memory handed out
    /// and freed counts as touched, all of it.
    pub released_to_os_bytes: u64,
    /// Allocations served by a mapping of their own, beside the heap,
    /// because a `fork` on another thread held the heap's locks and did not
    /// end in time (it may have been waiting for the allocating thread; see
    /// the README's notes on `fork`). Counted in `huge_in_use` while live.
    pub fork_mapped: u64,
    /// Mappings made for huge blocks (std): `mmap` calls, each one for a
    /// huge allocation that found no freed mapping to reuse (or for a
    /// block mapped beside the heap during a fork).
    pub huge_maps: u64,
    /// Bytes of freed huge mappings kept for reuse (std): up to 64 MiB, in
    /// blocks of up to 32 MiB, resident as they were left. The maintainer
    /// (without one, the inline decay: `Config::decay`) unmaps them once
    /// they stayed unused for half a second, `Heap::drain` and `Heap::trim`
    /// at once.
    pub huge_cached_bytes: usize,
    /// The page allocator underneath.
    pub pages: PageStats,
}

/// What a freed pointer is.
enum Kind<'a> {
    Object(&'a Cache, &'a Zone, u32),
    Large(&'a Zone, u32, u32),
    #[cfg(feature = "std")]
    Huge(usize),
}

/// The heap's state, at a stable address (see the module documentation).
/// (The maintenance thread sees it as a `maintain::Maintained`.)
pub(crate) struct HeapCore {
    pages: PageAllocator,
    caches: *const Cache,
    #[cfg(feature = "std")]
    huge: huge::HugeTable,
    #[cfg(feature = "std")]
    huge_deferred: IndexStack,
    /// Freed huge mappings kept for reuse (see `huge_cache`).
    #[cfg(feature = "std")]
    huge_cache: huge_cache::HugeCache,
    /// Mappings made for huge blocks (`os_reserve` calls that succeeded).
    #[cfg(feature = "std")]
    huge_maps: AtomicU64,
    /// Accounting groups whose references were released (see `account`).
    released_groups: IndexStack,
    /// Whether an accounted object or large block was ever handed out:
    /// only then does a drop look for live ones to uncharge.
    accounted_used: AtomicBool,
    shrinkers: Shrinkers,
    huge_live: AtomicUsize,
    huge_bytes: AtomicUsize,
    /// Allocations mapped beside the heap during another thread's fork
    /// (`alloc_while_forking`).
    fork_mapped: AtomicU64,
    nolock_large_ok: AtomicU64,
    fail_busy: AtomicU64,
    fail_empty: AtomicU64,
    /// Nolock allocations that succeeded (and counted a success where they
    /// were served) but whose charge a group limit refused.
    nolock_refused: AtomicU64,
    fail_too_large: AtomicU64,
    reclaims: AtomicU64,
    shrinker_freed: AtomicU64,
    /// Serialises `drain` and maintenance (normal context only): a
    /// maintenance pass never holds a slot that a drain would skip.
    maint_lock: crate::sync::ZoneLock,
    /// Whether `lock_all` holds every cache's level-0 slots.
    #[cfg(feature = "std")]
    fork_slots: core::sync::atomic::AtomicBool,
    /// `remap_huge` calls between their count and their end (see there):
    /// a fork's `lock_all` waits for none to be in progress, so that no
    /// block is cloned halfway through its move, its table entry claimed
    /// (`BUSY`) for ever in the child.
    #[cfg(feature = "std")]
    remaps: AtomicU32,
    /// The maintainer's wake word and stop flag.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) wake: AtomicU32,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) stop: AtomicBool,
    passes: AtomicU64,
    epoch: AtomicUsize,
    /// The inline decay's clock (`Config::decay`): the monotonic clock's
    /// epoch (`maintain::EPOCH`s since boot) at its last pass, 0 before the
    /// first look at it.
    #[cfg(feature = "std")]
    decay_epoch: AtomicU64,
    /// Whether the heap gives idle memory back from its own calls when no
    /// maintenance thread runs (`Config::decay`, a heap over memory from
    /// the OS): set once, at creation. The decay is installed exactly
    /// while this holds and no thread has taken the work over.
    #[cfg(feature = "std")]
    decays: core::sync::atomic::AtomicBool,
    released_bytes: AtomicU64,
    /// Its place in the registry of heaps whose locks `fork` takes.
    #[cfg(feature = "std")]
    fork: crate::fork::ForkLink,
}

/// The object allocator. See the module documentation.
///
/// # Dropping
///
/// Dropping a heap ends every block it handed out, live or not: it stops
/// the maintainer, releases the charges (and group references) of the
/// accounted blocks still live, and gives its memory back (std: its zones,
/// huge blocks and metadata are unmapped; a heap made with
/// [`from_region`](Heap::from_region) leaves its region to the caller). A
/// block of a dropped heap must not be used or freed afterwards. Freed
/// into another heap, it is a foreign pointer there, reported in one line
/// before an abort, as long as that heap has no memory at the block's
/// address; a heap made later may have been given that very address by the
/// OS (or the same region), and then a block of its own there is freed in
/// its place: a use after free that no heap can tell apart.
pub struct Heap {
    core: NonNull<HeapCore>,
    /// The metadata reservation to release on drop (std; `(0, 0)` for a
    /// region handed in by an embedder).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    mapping: (usize, usize),
    #[cfg(feature = "std")]
    maintainer: crate::maintain::MaintainerSlot,
}

// SAFETY: the core is shared only through atomics and the locks documented
// in `cache` and `page`; the maintainer slot is synchronised by its state.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}
// SAFETY: HeapCore's raw pointers refer to its own metadata area, shared
// under the same discipline.
unsafe impl Send for HeapCore {}
// SAFETY: as above.
unsafe impl Sync for HeapCore {}

impl core::fmt::Debug for Heap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap")
            .field("pages", &self.core().pages)
            .finish_non_exhaustive()
    }
}

/// Where the caches start in the metadata area, from its start (the core,
/// page-aligned): the first multiple of a cache's alignment (512) after the
/// core, so that every `&Cache` is aligned as its type says.
const CACHES_OFF: usize =
    core::mem::size_of::<HeapCore>().next_multiple_of(core::mem::align_of::<Cache>());

/// The constant of [`HeapCore::cache_at`]'s cache: cache `i` is at
/// `core + 8 * idx + CACHE_DISP`, with `idx = (i + 1) * SLOT_BYTES`.
pub(crate) const CACHE_DISP: usize = CACHES_OFF - core::mem::size_of::<Cache>();
/// The constant of [`HeapCore::cache_at`]'s slots: CPU `c`'s level-0 slot
/// of cache `i` is at `core + idx + (c << LEVEL0_SHIFT) + LEVEL0_DISP`
/// (the per-CPU region's layout, `LEVEL0_OFF`).
pub(crate) const LEVEL0_DISP: usize = LEVEL0_OFF - cache::SLOT_BYTES;
const _: () = assert!(core::mem::size_of::<Cache>() == 8 * cache::SLOT_BYTES || cfg!(loom));

/// Where the heap's copy of the size-to-class tables starts in the
/// metadata area (`HeapCore::tables`): after the caches, so the fast paths
/// read an entry at a constant offset from the core pointer.
const TABLES_OFF: usize =
    (CACHES_OFF + CACHES * core::mem::size_of::<Cache>()).next_multiple_of(64);

/// Where the per-CPU region starts in the metadata area: for each CPU, the
/// level-0 slot of every cache, `cache::SLOT_BYTES` apart in cache order
/// (`cache::LEVEL0_STRIDE` bytes per CPU). Each cache keeps the address of
/// its CPU 0 slot in its first line (`level0`), next to the fast paths'
/// other fields.
const LEVEL0_OFF: usize =
    (TABLES_OFF + core::mem::size_of::<class::ClassTables>()).next_multiple_of(64);

/// Where things are in the metadata area (bytes from its start, where the
/// core is): the caches, the size-to-class tables (`TABLES_OFF`), the
/// per-CPU region of level-0 slots
/// (`LEVEL0_OFF`), every cache's other slots packed together (they are
/// written when the heap is built, so packing keeps that to a few pages),
/// every cache's sheaves (written only once used), the huge table, and the
/// total length.
struct MetaLayout {
    caches: usize,
    level0: usize,
    slots: usize,
    slots_per_cache: usize,
    sheaves: usize,
    sheaves_per_cache: usize,
    huge: usize,
    total: usize,
}

fn meta_layout(cpus: usize, barn: BarnSize) -> MetaLayout {
    let caches = CACHES_OFF;
    let level0 = LEVEL0_OFF;
    let slots = level0 + cpus * cache::LEVEL0_STRIDE;
    let slots_per_cache = cache_slot_bytes(cpus).next_multiple_of(64);
    let sheaves = (slots + CACHES * slots_per_cache).next_multiple_of(PAGE_SIZE);
    let sheaves_per_cache = cache_sheaf_bytes(cpus, barn).next_multiple_of(64);
    let huge = sheaves + CACHES * sheaves_per_cache;
    #[cfg(feature = "std")]
    let total = huge + huge::HugeTable::BYTES;
    #[cfg(not(feature = "std"))]
    let total = huge;
    MetaLayout {
        caches,
        level0,
        slots,
        slots_per_cache,
        sheaves,
        sheaves_per_cache,
        huge,
        total,
    }
}

impl HeapCore {
    /// Cache `i`. The caches follow the core in the metadata area at a
    /// fixed offset (`meta_layout`), so the fast path computes the address
    /// instead of loading `caches`.
    #[inline(always)]
    fn cache(&self, i: usize) -> &Cache {
        crate::check!(i < CACHES, "a cache index out of range");
        let caches = (self as *const HeapCore).wrapping_byte_add(CACHES_OFF) as *const Cache;
        crate::check!(caches == self.caches, "the caches moved");
        // SAFETY: `caches` (= self.caches, build) has CACHES initialised
        // entries that live as long as the heap.
        unsafe { &*caches.add(i) }
    }

    /// The cache whose owner tag is `tag` (as [`cache`](Self::cache)
    /// finds it), with the two registers that name it and its level-0
    /// slots to the fast-path sequences: the core's address and `idx =
    /// tag`, the cache's index plus one times `SLOT_BYTES`. The cache is at
    /// `core + 8 * idx + CACHE_DISP`, CPU `c`'s level-0 slot of it at `core
    /// + idx + (c << LEVEL0_SHIFT) + LEVEL0_DISP` (`meta_layout`). The fast
    /// paths hold owner tags (from the size tables or a page's
    /// descriptor), which are that index as they are, and the sequences
    /// address the cache's fields and compute the slot's address from the
    /// two registers, loading neither the cache's address nor its `level0`.
    #[inline(always)]
    fn cache_at(&self, tag: usize) -> (&Cache, *const u8, usize) {
        // The cache itself from the same index (`cache_of_idx` checks its
        // range), so that the caller's other uses of it share it (no
        // second form of the index).
        let base = (self as *const HeapCore).cast::<u8>();
        let cache = self.cache_of_idx(tag);
        crate::check!(
            cache.level0_addr() == base.wrapping_add(tag + LEVEL0_DISP),
            "the level-0 slots moved"
        );
        (cache, base, tag)
    }

    /// The cache that [`cache_at`](Self::cache_at) gave `idx` for.
    #[inline(always)]
    fn cache_of_idx(&self, idx: usize) -> &Cache {
        let size = cache::SLOT_BYTES;
        crate::check!(
            idx.is_multiple_of(size) && (1..=CACHES).contains(&(idx / size)),
            "a cache index out of range"
        );
        let cache =
            (self as *const HeapCore).wrapping_byte_add(8 * idx + CACHE_DISP) as *const Cache;
        // SAFETY: `CACHES_OFF + (idx / size - 1) * size_of::<Cache>()`:
        // cache `idx / size - 1`, as `cache` finds it.
        unsafe { &*cache }
    }

    /// The heap's copy of the size-to-class tables (see
    /// [`class::ClassTables`]), at a fixed offset from the core.
    #[inline(always)]
    fn tables(&self) -> &class::ClassTables {
        let t = (self as *const HeapCore).wrapping_byte_add(TABLES_OFF);
        // SAFETY: `build` copied the tables there; they live, unchanged,
        // as long as the heap.
        unsafe { &*(t as *const class::ClassTables) }
    }

    #[inline(always)]
    fn cpu(&self) -> usize {
        self.pages.cpu()
    }

    /// Its place in the registry of heaps whose locks `fork` takes.
    #[cfg(feature = "std")]
    pub(crate) fn fork_link(&self) -> &crate::fork::ForkLink {
        &self.fork
    }

    #[cfg(feature = "std")]
    fn drain_huge_deferred(&self) {
        let mut a = self.huge_deferred.take_all();
        while a != crate::sync::NIL {
            // SAFETY: pushed by free_nolock, which wrote link and size into
            // the (still mapped) allocation's first two words.
            let (next, size) = unsafe {
                (
                    (a as *const usize).read(),
                    (a as *const usize).add(1).read(),
                )
            };
            crate::interrupt_point!(HugeDeferredDrain);
            // Not kept for reuse: a program whose handlers free huge blocks
            // gets them unmapped as before (see `huge_cache`).
            // SAFETY: the mapping was unregistered by free_nolock; only this
            // drain (which took the whole stack) releases it.
            unsafe { crate::platform::os_release(a as *mut u8, size) };
            a = next;
        }
    }

    /// A huge block's mapping for `size` bytes (whole pages) aligned to
    /// `align` (a power of two, at least a page), and its length: a freed
    /// one from the cache when one fits, else a new one, which the OS
    /// zeroed. A kept mapping of at most `whole` bytes comes whole (a block
    /// then grown into it by `realloc` faults nothing in); a longer one
    /// gives its tail back. The caller passes twice the bytes asked for
    /// (more than half used, the rule `realloc` keeps a block by, and the
    /// most usable bytes C's `free_sized` check allows: twice `size`, the
    /// request rounded up to pages, can be two pages more), or 0 for an
    /// exact mapping. With `zero` the mapping is exact and zeroed. Normal
    /// context.
    #[cfg(feature = "std")]
    fn huge_map(
        &self,
        size: usize,
        align: usize,
        zero: bool,
        whole: usize,
    ) -> Option<(*mut u8, usize)> {
        if let Some((addr, kept)) = self.huge_cache.take(size, align) {
            let len = if zero || kept > whole { size } else { kept };
            if kept > len {
                // SAFETY: the tail of a kept mapping, whole pages (both
                // lengths are), which nothing uses.
                unsafe { crate::platform::os_release((addr + len) as *mut u8, kept - len) };
            }
            if zero {
                // SAFETY: `size` bytes of a mapping that is ours alone.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size) };
            }
            return Some((addr as *mut u8, len));
        }
        let p = crate::platform::os_reserve(size, align)?;
        self.huge_maps.fetch_add(1, Ordering::Relaxed);
        Some((p, size))
    }

    /// Gives back the mapping of a freed huge block: kept for reuse while
    /// the cache has room, else unmapped. Normal context.
    ///
    /// # Safety
    /// `[addr, addr + size)` is one whole mapping from `huge_map` (or what
    /// `remap_huge` made of one) that nothing uses any more.
    #[cfg(feature = "std")]
    unsafe fn huge_unmap(&self, addr: usize, size: usize) {
        if !self
            .huge_cache
            .put(addr, size, self.epoch.load(Ordering::Relaxed))
        {
            // SAFETY: forwarded contract.
            unsafe { crate::platform::os_release(addr as *mut u8, size) };
        }
    }

    /// Unmaps the kept huge mappings: those unused for `idle` epochs at
    /// `epoch`, or every one when `all`; returns their bytes. Normal
    /// context.
    #[cfg(feature = "std")]
    fn release_huge_cache(&self, epoch: usize, idle: usize, all: bool) -> usize {
        let mut bytes = 0;
        self.huge_cache.take_idle(epoch, idle, all, |addr, size| {
            // SAFETY: a whole mapping the cache held, now taken out of it;
            // nothing uses it.
            unsafe { crate::platform::os_release(addr as *mut u8, size) };
            bytes += size;
        });
        bytes
    }

    /// `Heap::trim`'s part for the kept huge mappings: unmaps them all,
    /// returns their bytes. Normal context.
    #[cfg(feature = "std")]
    pub(crate) fn release_kept_huge(&self) -> usize {
        self.release_huge_cache(0, 0, true)
    }

    /// A heap going away (`Drop`, nothing else uses it): unmaps the huge
    /// blocks still live, and takes the charges and group references of
    /// every accounted block still live (huge, large and objects), which
    /// would otherwise keep their groups' usage, and the groups, for good.
    fn release_at_drop(&self) {
        #[cfg(feature = "std")]
        {
            self.drain_huge_deferred();
            self.huge.take_all(|addr, size, group| {
                self.huge_live.fetch_sub(1, Ordering::Relaxed);
                self.huge_bytes.fetch_sub(size, Ordering::Relaxed);
                self.uncharge(group, size);
                // SAFETY: a live huge allocation of this heap, now out of
                // its table; the heap is going away, and the memory with it.
                unsafe { crate::platform::os_release(addr as *mut u8, size) };
            });
            self.release_huge_cache(0, 0, true);
        }
        if self.accounted_used.load(Ordering::Relaxed) {
            for zone in self.pages.zones() {
                for (idx, d) in zone.block_heads() {
                    let state = d.load();
                    if !crate::page::is_allocated_state(state) {
                        continue;
                    }
                    let owner = d.owner.load(Ordering::Acquire);
                    if owner == LARGE_OWNER {
                        let g = d.freelist.swap(0, Ordering::AcqRel);
                        self.uncharge(g, PAGE_SIZE << crate::page::order_of_state(state));
                    } else if owner != 0
                        && (class::index_of_tag(owner as usize)).wrapping_sub(CLASSES) < CLASSES
                    {
                        // A slab of an accounted cache (indices from CLASSES).
                        let cache = self.cache(class::index_of_tag(owner as usize));
                        cache.take_owners(zone, idx, |g| self.uncharge(g, cache.size()));
                    }
                }
            }
        }
        account::drop_released(&self.released_groups);
    }

    fn stats(&self) -> HeapStats {
        let mut s = HeapStats {
            fast_path: if self.cache(0).uses_rseq() {
                FastPath::Rseq
            } else {
                FastPath::SlotLock
            },
            classes: [ClassStats::default(); CLASSES],
            objects_in_use: 0,
            large_in_use: 0,
            huge_in_use: self.huge_live.load(Ordering::Relaxed),
            large_bytes: 0,
            huge_bytes: self.huge_bytes.load(Ordering::Relaxed),
            nolock_alloc_ok: self.nolock_large_ok.load(Ordering::Relaxed)
                + self.pages.heap_large_nolock_ok(),
            nolock_alloc_fail_busy: self.fail_busy.load(Ordering::Relaxed),
            nolock_alloc_fail_empty: self.fail_empty.load(Ordering::Relaxed),
            nolock_alloc_fail_too_large: self.fail_too_large.load(Ordering::Relaxed),
            nolock_free_deferred: 0,
            reclaims: self.reclaims.load(Ordering::Relaxed),
            shrinker_freed_bytes: self.shrinker_freed.load(Ordering::Relaxed),
            maintenance_passes: self.passes.load(Ordering::Relaxed),
            released_to_os_bytes: self.released_bytes.load(Ordering::Relaxed),
            fork_mapped: self.fork_mapped.load(Ordering::Relaxed),
            #[cfg(feature = "std")]
            huge_maps: self.huge_maps.load(Ordering::Relaxed),
            #[cfg(not(feature = "std"))]
            huge_maps: 0,
            #[cfg(feature = "std")]
            huge_cached_bytes: self.huge_cache.bytes(),
            #[cfg(not(feature = "std"))]
            huge_cached_bytes: 0,
            pages: self.pages.stats(),
        };
        // Large blocks are counted by a scan of the descriptors (their head
        // page's owner says "large"), not by counters: two shared counters
        // updated on every large allocation and free cost four locked
        // instructions per pair, more than half of a 16 KiB pair.
        for zone in self.pages.zones() {
            for d in zone.descs() {
                if d.owner.load(Ordering::Relaxed) == LARGE_OWNER {
                    s.large_in_use += 1;
                    s.large_bytes += PAGE_SIZE << crate::page::order_of_state(d.load());
                }
            }
        }
        for i in 0..CACHES {
            let cache = self.cache(i);
            let cs = cache.stats();
            let c = &mut s.classes[i % CLASSES];
            c.size = cs.size;
            c.sheaf_capacity = cs.sheaf_capacity;
            c.objects_in_use += cs.objects_in_use;
            c.slabs += cs.slabs;
            c.cached_in_sheaves += cs.cached_in_sheaves;
            c.cached_in_barn += cs.cached_in_barn;
            c.barn_capacity = cs.barn_capacity;
            c.deferred += cs.deferred;
            s.objects_in_use += cs.objects_in_use;
            s.nolock_alloc_ok += cache.nolock_ok();
            s.nolock_alloc_fail_busy += cache.fail_busy.load(Ordering::Relaxed);
            s.nolock_alloc_fail_empty += cache.fail_empty.load(Ordering::Relaxed);
            s.nolock_free_deferred += cache.free_deferred.load(Ordering::Relaxed);
        }
        // Served, counted, then refused by a group's limit: failures.
        s.nolock_alloc_ok = s
            .nolock_alloc_ok
            .saturating_sub(self.nolock_refused.load(Ordering::Relaxed));
        s
    }

    /// Lock order: the caches' level-0 slots, maintenance, cache nodes,
    /// then the page allocator's (drain, growth, its level-0 slots, zones).
    /// The shrinker registry is lock-free: nothing to take.
    ///
    /// The level-0 slots (the normal path's) come first
    /// (`SlotLock::hold_all`): their holders may wait for a node lock, or
    /// in a refill for the page allocator's growth and zone locks, all
    /// taken after them; the maintenance lock's holders take slots only
    /// with `try_lock`, and hold none once it is taken. The other levels'
    /// holders are nolock contexts, which never wait: those slots stay
    /// free for other threads' signal handlers during the fork.
    #[cfg(feature = "std")]
    pub(crate) fn lock_all(&self) {
        // `remap_huge` calls in progress end without waiting for anything
        // (a system call and the table's atomics); any that starts from
        // here sees the fork and moves nothing (see there). No signal
        // handler runs inside a counted move (it blocks them). But the wait
        // has an end, as `SlotLock::hold_all`'s: the child of a fork whose
        // prepare took nothing inherits the counts of moves on threads it
        // does not have. Past it, the fork may clone a move half done.
        // So are the drains of the caches' deferred stacks in progress
        // (the chain taken, its objects being freed), and of their parked
        // double-free suspects, and the exact double-free checks that
        // search both stacks: cloned halfway, the rest of the chain would
        // be lost to the child. Any that starts
        // from here leaves the stack alone (`Cache::deferred_taker`); the
        // normal path's drains block signals while counted; a nolock one
        // that a signal handler interrupts, if the handler forks, holds that
        // fork up to the patience below (see the `fork` module's notes).
        let start = std::time::Instant::now();
        while (self.remaps.load(Ordering::SeqCst) != 0
            || (0..CACHES).any(|i| self.cache(i).deferred_takers() != 0))
            && start.elapsed() <= crate::fork::SLOT_PATIENCE
        {
            // (A sleep: see `SlotLock::hold_all`.)
            crate::platform::nap();
        }
        let slots = SlotLock::hold_all(self.level0_slot_locks(), crate::fork::SLOT_PATIENCE);
        self.fork_slots.store(slots, Ordering::Relaxed);
        self.maint_lock.lock_raw(self.pages.platform());
        for i in 0..CACHES {
            self.cache(i).lock_node_raw(&self.pages);
        }
        self.pages.lock_all();
    }

    /// Every cache's level-0 slot locks.
    #[cfg(feature = "std")]
    fn level0_slot_locks(&self) -> impl Iterator<Item = &SlotLock> + Clone {
        (0..CACHES).flat_map(move |i| self.cache(i).level0_locks())
    }

    /// Releases what [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// `lock_all` was called (in this process or the parent of this forked
    /// child) and not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all(&self, child: bool) {
        if child {
            // The only thread: a count left by a `remap_huge` that saw the
            // fork and was cloned before it took its count back belongs
            // to a thread the child does not have.
            self.remaps.store(0, Ordering::Relaxed);
            // Nor are the counts that other threads' lock-free steps change
            // one after the other (a table or stack, then its count): they
            // may have been cloned in between. What they count is the
            // truth, and it is counted again, before the locks go. No
            // signal handler runs meanwhile: a free of its would change a
            // table or stack and its count behind the walk.
            let _quiet = crate::platform::SignalsBlocked::new();
            let (live, bytes) = self.huge.live();
            self.huge_live.store(live, Ordering::Relaxed);
            self.huge_bytes.store(bytes, Ordering::Relaxed);
            for i in 0..CACHES {
                self.cache(i).recount_deferred_after_fork(&self.pages);
            }
            self.pages.recount_after_fork();
            // A heap that decays had it switched off only by a maintenance
            // thread taking the work over, and that thread stayed in the
            // parent: the child's own calls give idle memory back instead,
            // until a thread starts here (`forget_maintainer_after_fork`,
            // then `start_maintenance`, switches it off again).
            if self.decays.load(Ordering::Relaxed) {
                self.install_decay(true);
            }
        }
        // SAFETY: per the caller.
        unsafe { self.pages.unlock_all() };
        for i in 0..CACHES {
            // SAFETY: per the caller.
            unsafe { self.cache(i).unlock_node_raw(&self.pages) };
        }
        // SAFETY: per the caller.
        unsafe { self.maint_lock.force_unlock(self.pages.platform()) };
        if self.fork_slots.swap(false, Ordering::Relaxed) {
            // SAFETY: held since `lock_all`, per the caller.
            unsafe { SlotLock::release_all(self.level0_slot_locks()) };
        }
    }
}

/// The window of a normal-path huge allocation or free between the table
/// of huge blocks and the heap's counts of them (`huge_in_use`,
/// `huge_bytes`): inside the allocator.
///
/// A `fork` on another thread may clone the window half done: the child,
/// which does not have that thread, counts the blocks again from the
/// table (`unlock_all`). But a signal handler that forks could interrupt
/// the window on the forking thread itself: with no lock held there, its
/// fork was an ordinary one, and the child recounted too, before its
/// thread finished the step. It then counted the block twice (an
/// allocation), or took it off twice (a free: the counts wrapped below
/// zero, and the child could no longer map a block beside the heap during
/// a fork). Inside the allocator, the handler's fork is one that
/// interrupted it (its prepare takes nothing, its child counts nothing
/// again: the step ends there as in the parent), and its other calls take
/// the nolock path. A mark on this thread, no system call (blocking the
/// signals instead, as `remap_huge` does, cost an alloc and free of a kept
/// mapping seven times as much).
#[cfg(feature = "std")]
pub(super) type HugeCountWindow = crate::context::Inside;

/// One `remap_huge` call in a heap's count of them (see
/// `HeapCore::remaps`), from creation to drop.
#[cfg(feature = "std")]
struct RemapCount<'a>(&'a AtomicU32);

#[cfg(feature = "std")]
impl<'a> RemapCount<'a> {
    fn new(count: &'a AtomicU32) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        RemapCount(count)
    }
}

#[cfg(feature = "std")]
impl Drop for RemapCount<'_> {
    fn drop(&mut self) {
        // Release: the block is back in the table before a fork that
        // reads 0 here goes on.
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// What `HeapCore::fork_mark` notes: the forks in progress (none
/// without std).
#[cfg(feature = "std")]
use crate::fork::ForkMark;
#[cfg(not(feature = "std"))]
#[derive(Clone, Copy)]
struct ForkMark;

/// The route of a free asked for in `mode`: a normal free by a thread inside
/// the allocator or in a nolock scope takes the nolock path.
#[inline]
fn routed(mode: Mode) -> Mode {
    if mode == Mode::Normal && crate::context::nested() {
        Mode::NoLock
    } else {
        mode
    }
}

/// The heap's double-free key (see `cache`'s "Double-free detection"): a
/// mix of the heap's address, a stack address and a process-wide counter,
/// made non-canonical (top 16 bits 0xa5c3) so that it is never an address
/// the heap manages.
fn free_key(seed: usize) -> usize {
    static COUNTER: AtomicUsize = AtomicUsize::new(0x2545_f491_4f6c_dd1d);
    let local = 0u8;
    let mut x = (seed
        ^ (&local as *const u8 as usize).rotate_left(29)
        ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)) as u64;
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    #[cfg(target_pointer_width = "64")]
    return (x as usize & ((1 << 48) - 1)) | 0xa5c3 << 48;
    #[cfg(not(target_pointer_width = "64"))]
    return x as usize | 3; // never 4-aligned: never an object's address
}

/// Whether no allocation of `layout` can ever succeed, so that a miss
/// must not reclaim: without std, a request above 4 MiB (`mmap` with std)
/// has nothing to serve it, and running every shrinker and draining every
/// CPU's caches would only empty them for nothing.
#[inline]
fn never_served(layout: Layout) -> bool {
    !cfg!(feature = "std")
        && class::class_for(layout.size(), layout.align()).is_none()
        && large_order(layout).is_none()
}

/// The page order serving a large request, or `None` beyond MAX_ORDER.
fn large_order(layout: Layout) -> Option<u32> {
    let bytes = layout.size().max(layout.align()).max(1);
    let pages = bytes.div_ceil(PAGE_SIZE).next_power_of_two();
    let order = pages.trailing_zeros();
    (order <= MAX_ORDER).then_some(order)
}

/// The bytes of a huge block (its mapping): the size in whole pages, and at
/// least one page. A zero-size layout gets a page too: an empty mapping
/// would leave its address free for the OS to hand to anything else while
/// the huge table still held it. `None` when the size overflows.
#[cfg(feature = "std")]
fn huge_size(layout: Layout) -> Option<usize> {
    layout.size().max(1).checked_next_multiple_of(PAGE_SIZE)
}

#[cold]
fn unreachable_kind(pages: &PageAllocator, addr: usize) -> ! {
    pages.fatal(
        FatalMessage::new()
            .text("anyalloc: internal error: fresh allocation ")
            .hex(addr)
            .text(" has no owner"),
    )
}

#[cfg(feature = "std")]
impl crate::maintain::Maintained for HeapCore {
    fn wake_word(&self) -> &AtomicU32 {
        &self.wake
    }

    fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    fn wake_now(&self) {
        self.wake_maintainer_now();
    }

    fn nolock_syscalls(&self) -> bool {
        HeapCore::nolock_syscalls(self)
    }

    fn drain_deferred(&self) {
        self.drain_deferred_only();
    }

    fn pass(&self, elapsed: usize, idle_epochs: usize, idle_passes: u32) {
        let epoch = self.advance_epoch(elapsed);
        self.maintain_pass(epoch, idle_epochs, idle_passes);
    }
}
