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

pub mod cache;
mod class;
#[cfg(feature = "std")]
mod huge;
#[cfg(all(test, loom))]
mod loom_model;

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
use cache::{cache_sheaf_bytes, cache_slot_bytes, Cache, CacheSetup};
pub(crate) use class::CLASSES;

/// `owner` of the head page of a large (page-backed) allocation.
const LARGE_OWNER: u16 = u16::MAX;
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
    /// Bytes of the huge allocations in use (whole pages).
    pub huge_bytes: usize,
    /// Successful nolock allocations.
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
    /// Maintenance passes (by the maintenance thread or `maintain()`).
    pub maintenance_passes: u64,
    /// Bytes of free blocks given back to the OS: idle ones by maintenance,
    /// and every other by `Heap::trim` (std). Memory never touched and
    /// memory already given back do not count (again), also when a block
    /// freed merged with such memory and goes back whole. Memory handed out
    /// and freed counts as touched, all of it.
    pub released_to_os_bytes: u64,
    /// Allocations served by a mapping of their own, beside the heap,
    /// because a `fork` on another thread held the heap's locks and did not
    /// end in time (it may have been waiting for the allocating thread; see
    /// the README's notes on `fork`). Counted in `huge_in_use` while live.
    pub fork_mapped: u64,
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

/// One registered shrinker: a node of the registry's append-only list.
struct ShrinkerNode {
    f: alloc::boxed::Box<dyn Fn(usize) -> usize + Send + Sync>,
    next: *mut ShrinkerNode,
}

/// The registered shrinkers: an append-only lock-free list (Treiber push,
/// no removal until the heap is dropped, so no ABA and no reclamation
/// problem). Registering allocates the node *before* linking it, and
/// running the shrinkers walks the list without a lock and without
/// allocating: an allocation made on the way (a shrinker's own, or a
/// nested reclaim's) can never wait for this registry.
struct Shrinkers {
    head: AtomicPtr<ShrinkerNode>,
    /// Without std (no per-thread state): whether some context runs the
    /// shrinkers; a reclaim meanwhile (one nested in a shrinker, which
    /// allocated) does not run them again, so reclaim cannot recurse
    /// without bound. With std, each thread's shrinker mark does this
    /// (see `run_shrinkers`).
    #[cfg(not(feature = "std"))]
    running: AtomicBool,
}

impl Shrinkers {
    const fn new() -> Self {
        Shrinkers {
            head: AtomicPtr::new(core::ptr::null_mut()),
            #[cfg(not(feature = "std"))]
            running: AtomicBool::new(false),
        }
    }

    /// Links a node allocated by the caller (no lock is held while it was
    /// allocated).
    fn push(&self, node: alloc::boxed::Box<ShrinkerNode>) {
        let node = alloc::boxed::Box::into_raw(node);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the CAS below publishes it.
            unsafe { (*node).next = head };
            crate::interrupt_point!(ShrinkerRegistry);
            // Release: the node's contents are visible to every walker.
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Calls `f` on every registered shrinker (newest first).
    fn for_each(&self, mut f: impl FnMut(&(dyn Fn(usize) -> usize + Send + Sync))) {
        let mut n = self.head.load(Ordering::Acquire);
        while !n.is_null() {
            crate::interrupt_point!(ShrinkerRegistry);
            // SAFETY: published nodes are never freed before the heap is
            // dropped (`Drop` below), and never change after publication.
            let node = unsafe { &*n };
            f(&*node.f);
            n = node.next;
        }
    }
}

impl Drop for Shrinkers {
    fn drop(&mut self) {
        let mut n = *self.head.get_mut();
        while !n.is_null() {
            // SAFETY: every node was leaked from a Box by `push` and is
            // reachable only from this list, which nobody uses any more.
            let node = unsafe { alloc::boxed::Box::from_raw(n) };
            n = node.next;
        }
    }
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
    released_bytes: AtomicU64,
    /// Its place in the registry of heaps whose locks `fork` takes.
    #[cfg(feature = "std")]
    fork: crate::fork::ForkLink,
}

/// The object allocator. See the module documentation.
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

fn meta_layout(cpus: usize) -> MetaLayout {
    let caches = CACHES_OFF;
    let level0 = LEVEL0_OFF;
    let slots = level0 + cpus * cache::LEVEL0_STRIDE;
    let slots_per_cache = cache_slot_bytes(cpus).next_multiple_of(64);
    let sheaves = (slots + CACHES * slots_per_cache).next_multiple_of(PAGE_SIZE);
    let sheaves_per_cache = cache_sheaf_bytes(cpus).next_multiple_of(64);
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

impl Heap {
    /// Creates a heap over a new [`PageAllocator`] configured by `config`,
    /// and (unless `config.maintenance(false)`) starts its maintenance
    /// thread. Its locks are held across `fork` (a forked child can use it
    /// whatever other threads were doing), until it is dropped; its
    /// maintenance thread does not survive in the child
    /// ([`forget_maintainer_after_fork`](Self::forget_maintainer_after_fork)
    /// says what to do there).
    ///
    /// ```
    /// use anyalloc::{Config, Error, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = heap.alloc(Layout::new::<[u32; 16]>()).expect("memory to spare");
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// let bad = Heap::new(Config::default().memory(16 << 20).min_reserve(9 << 20));
    /// assert!(matches!(bad, Err(Error::Config { setting: "Config::min_reserve", .. })));
    /// ```
    #[cfg(feature = "std")]
    pub fn new(config: Config) -> Result<Heap, Error> {
        let heap = Self::new_without_maintainer(config)?;
        // Its locks are held across `fork` from now on (the global heap,
        // made by `new_without_maintainer`, is taken by the fork handler
        // directly).
        crate::fork::register(heap.core());
        if config.maintenance {
            heap.start_maintenance();
        }
        Ok(heap)
    }

    #[cfg(feature = "std")]
    pub(crate) fn new_without_maintainer(config: Config) -> Result<Heap, Error> {
        let pages = PageAllocator::new(config)?;
        let len = meta_layout(pages.cpus()).total.next_multiple_of(PAGE_SIZE);
        let meta =
            crate::platform::os_reserve(len, PAGE_SIZE).ok_or(Error::Reserve { bytes: len })?;
        // SAFETY: `meta` is a fresh, zero-filled, page-aligned reservation of
        // `len` bytes that only this heap uses.
        Ok(unsafe { Self::build(pages, meta, (meta as usize, len)) })
    }

    /// Creates a heap over an embedder's memory region (`no_std`): the heap's
    /// metadata is carved from the start of the region, the rest becomes the
    /// page allocator's zone. There is no maintenance thread: call
    /// [`maintain`](Self::maintain) from a deferred context.
    ///
    /// Errors (nothing of the region is touched then):
    /// [`Error::Config`] naming the setting: `Config::cpus` of 0 or above
    /// [`MAX_CPUS`](crate::MAX_CPUS), `Platform::cpu_count` above it when
    /// `Config::cpus` is not set, `Config::min_reserve` above half the
    /// region's pages; [`Error::Region`] naming the region's length: it
    /// wraps around the address space (or ends at its very top), or is too
    /// small for the heap's metadata, then for the zone's and 16 pages.
    ///
    /// An embedding in brief (a kernel would take the region from its boot
    /// memory map, and give the platform its real CPU id):
    ///
    /// ```
    /// use anyalloc::{Config, Heap, Platform};
    /// use core::alloc::Layout;
    /// use core::ptr::NonNull;
    ///
    /// struct OneCpu;
    /// impl Platform for OneCpu {
    ///     fn cpu_id(&self) -> usize { 0 }
    ///     fn cpu_count(&self) -> usize { 1 }
    /// }
    /// static PLATFORM: OneCpu = OneCpu;
    ///
    /// // 8 MiB that belong to the heap for good (here: leaked from the process heap).
    /// let len = 8 << 20;
    /// let region = NonNull::from(Box::leak(vec![0u8; len].into_boxed_slice())).cast::<u8>();
    /// // SAFETY: the region is ours alone, valid for reads and writes, never freed.
    /// let heap = unsafe { Heap::from_region(region, len, &PLATFORM, Config::default()) }.unwrap();
    ///
    /// let p = heap.alloc_nolock(Layout::new::<[u64; 8]>()).expect("memory to spare");
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free_nolock(p) };
    /// heap.maintain(); // no thread here: a deferred context of the embedder calls this
    /// ```
    ///
    /// # Safety
    /// As for [`PageAllocator::from_region`].
    pub unsafe fn from_region(
        region: NonNull<u8>,
        len: usize,
        platform: &'static dyn crate::Platform,
        config: Config,
    ) -> Result<Heap, Error> {
        let cpus = config.region_cpus(platform)?;
        let wraps = Error::Region {
            len,
            reason: "the region wraps around the address space",
        };
        let end = (region.as_ptr() as usize)
            .checked_add(len)
            .ok_or(wraps.clone())?;
        // Page-aligned, as `build` requires: the layout places the caches
        // (512-byte aligned) and the rest at offsets from this start. (A
        // region in the address space's last page has none.)
        let start = (region.as_ptr() as usize)
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(wraps)?;
        let meta_len = meta_layout(cpus).total;
        let rest = start.saturating_add(meta_len);
        if rest >= end {
            return Err(Error::Region {
                len,
                reason: "too small for the heap's metadata",
            });
        }
        // SAFETY: [rest, end) is part of the caller's exclusive region.
        // With the count the metadata was laid out for: the platform's
        // count is read once (it may change between calls).
        let pages = unsafe {
            PageAllocator::from_region(
                NonNull::new_unchecked(rest as *mut u8),
                end - rest,
                platform,
                config.cpus(cpus),
            )
        }
        // A refusal of the part after the metadata names the caller's region
        // (its length, not the part's).
        .map_err(|e| match e {
            Error::Region { .. } => Error::Region {
                len,
                reason: "too small: after the heap's metadata, at least 16 pages plus their metadata are needed",
            },
            e => e,
        })?;
        // SAFETY: [start, rest) is part of the caller's exclusive region; it
        // is zeroed here as `build` requires.
        unsafe {
            core::ptr::write_bytes(start as *mut u8, 0, meta_len);
            Ok(Self::build(pages, start as *mut u8, (0, 0)))
        }
    }

    /// # Safety
    /// `meta` is page-aligned, zero-filled, `meta_layout(cpus).total` bytes long,
    /// and lives (unused by others) as long as the heap. The caches' fast
    /// path follows the page allocator's choice (restartable sequences or
    /// not).
    unsafe fn build(pages: PageAllocator, meta: *mut u8, mapping: (usize, usize)) -> Heap {
        // Every cache's fast path runs its sequences, rseq or not (see
        // `sync::rseq::prepare_offset`).
        crate::sync::rseq::prepare_offset();
        let cpus = pages.cpus();
        let rseq_off = pages.rseq_off();
        let m = meta_layout(cpus);
        // Checked in every build (once per heap): the caches' alignment,
        // and with it every `&Cache`, rests on it.
        crate::check!(
            always: (meta as usize).is_multiple_of(PAGE_SIZE),
            "the heap's metadata is not page-aligned"
        );
        let caches = meta.wrapping_add(m.caches) as *mut Cache;
        // SAFETY: the tables' place lies inside `meta` (meta_layout, which
        // puts nothing else there), not shared yet; `ClassTables` is plain
        // bytes (alignment 1), copied whole from the original.
        unsafe {
            core::ptr::copy_nonoverlapping(
                &class::TABLES,
                meta.wrapping_add(TABLES_OFF) as *mut class::ClassTables,
                1,
            )
        };
        let key = free_key(meta as usize);
        for i in 0..CACHES {
            let (class, accounted) = (i % CLASSES, i >= CLASSES);
            // SAFETY: cache `i` and its slot and sheaf areas lie inside
            // `meta` (meta_layout), 64-byte aligned and zeroed.
            unsafe {
                Cache::init(
                    caches.add(i),
                    CacheSetup {
                        index: i,
                        class,
                        accounted,
                        cpus,
                        rseq_off,
                        key,
                    },
                    meta.add(m.level0 + i * cache::SLOT_BYTES),
                    meta.add(m.slots + i * m.slots_per_cache),
                    meta.add(m.sheaves + i * m.sheaves_per_cache),
                )
            };
        }
        for i in 0..CACHES {
            // SAFETY: initialised just above, not shared yet.
            unsafe { (*caches.add(i)).set_polling(!pages.nolock_syscalls()) };
        }
        #[cfg(not(feature = "std"))]
        let _ = m.huge;
        let core = HeapCore {
            pages,
            caches,
            #[cfg(feature = "std")]
            // SAFETY: the table's bytes are the zeroed tail of `meta`.
            huge: unsafe { huge::HugeTable::new(meta.add(m.huge)) },
            #[cfg(feature = "std")]
            huge_deferred: IndexStack::new(),
            released_groups: IndexStack::new(),
            accounted_used: AtomicBool::new(false),
            shrinkers: Shrinkers::new(),
            huge_live: AtomicUsize::new(0),
            fork_mapped: AtomicU64::new(0),
            huge_bytes: AtomicUsize::new(0),
            nolock_large_ok: AtomicU64::new(0),
            fail_busy: AtomicU64::new(0),
            fail_empty: AtomicU64::new(0),
            nolock_refused: AtomicU64::new(0),
            fail_too_large: AtomicU64::new(0),
            reclaims: AtomicU64::new(0),
            shrinker_freed: AtomicU64::new(0),
            maint_lock: crate::sync::ZoneLock::new(),
            #[cfg(feature = "std")]
            fork_slots: core::sync::atomic::AtomicBool::new(false),
            #[cfg(feature = "std")]
            remaps: AtomicU32::new(0),
            wake: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            passes: AtomicU64::new(0),
            epoch: AtomicUsize::new(0),
            released_bytes: AtomicU64::new(0),
            #[cfg(feature = "std")]
            fork: crate::fork::ForkLink::new(),
        };
        let core_ptr = meta as *mut HeapCore;
        // SAFETY: the core's place is the start of `meta`, aligned and ours.
        unsafe { core_ptr.write(core) };
        // SAFETY: just written; it stays at this address for the heap's life.
        let c = unsafe { &*core_ptr };
        c.pages
            .set_reclaimer(HeapCore::reclaim_callback, core_ptr as *const ());
        Heap {
            // SAFETY: `meta` is not null.
            core: unsafe { NonNull::new_unchecked(core_ptr) },
            mapping,
            #[cfg(feature = "std")]
            maintainer: crate::maintain::MaintainerSlot::new(),
        }
    }

    /// The core's address, for `Global`, which keeps it in one word.
    #[cfg(feature = "std")]
    pub(crate) fn core_ptr(&self) -> *const HeapCore {
        self.core.as_ptr()
    }

    #[inline(always)]
    pub(crate) fn core(&self) -> &HeapCore {
        // SAFETY: the core lives in the metadata area until `drop`.
        unsafe { self.core.as_ref() }
    }

    /// Starts the maintenance thread if it is not running (std). It drains
    /// deferred frees promptly, keeps per-CPU caches that ran empty on the
    /// nolock path stocked, runs shrinkers below the low watermark, and
    /// returns idle memory to the OS. Returns whether a thread is running
    /// afterwards.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    /// // Later, from ordinary code (it spawns a thread):
    /// if heap.start_maintenance() {
    ///     assert!(heap.start_maintenance(), "still running: not started twice");
    /// }
    /// ```
    #[cfg(feature = "std")]
    pub fn start_maintenance(&self) -> bool {
        let started = self.maintainer.start(self.core());
        if started {
            self.core().pages.set_waker(&self.core().wake);
        }
        started
    }

    /// In a forked child, before anything else uses the heap: the
    /// maintenance thread stayed in the parent; forget it so that
    /// [`start_maintenance`](Self::start_maintenance) starts a new one.
    /// Returns whether one ran in the parent. (Dropping the heap in the
    /// child needs nothing: it finds the thread was the parent's.) In the
    /// process that started the thread it does nothing and returns
    /// `false`: the thread runs there, and the heap's drop stops it.
    ///
    /// Starting a thread in the child of a multithreaded process is outside
    /// what POSIX promises there, and Rust's `std::thread` can wait forever
    /// for a lock of its own that another thread held at the fork: in such a
    /// child, prefer heaps without maintenance, or `exec` first.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let ran = heap.start_maintenance(); // running already, unless the OS refused the thread
    /// // SAFETY: the child only uses the heap and `_exit`s; it runs no destructor.
    /// let pid = unsafe { libc::fork() };
    /// assert!(pid >= 0, "fork failed");
    /// if pid == 0 {
    ///     // The child: first thing, forget the parent's maintainer.
    ///     let ok = heap.forget_maintainer_after_fork() == ran
    ///         && heap.alloc(Layout::new::<u64>()).is_some();
    ///     // SAFETY: `_exit` ends the child at once, as a forked child should.
    ///     unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    /// }
    /// let mut status = 0;
    /// // SAFETY: `pid` is our child; `status` is a valid place to write.
    /// assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    /// assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    /// ```
    #[cfg(feature = "std")]
    pub fn forget_maintainer_after_fork(&self) -> bool {
        self.maintainer.forget_if_forked()
    }

    /// The page allocator underneath (its memory is shared with the heap).
    ///
    /// ```
    /// use anyalloc::{Config, Heap, PAGE_SIZE};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// assert_eq!(heap.pages().stats().total_pages, (16 << 20) / PAGE_SIZE);
    /// let p = heap.alloc(Layout::new::<u64>()).unwrap();
    /// assert!(heap.pages().contains(p.as_ptr() as usize));
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// ```
    pub fn pages(&self) -> &PageAllocator {
        &self.core().pages
    }

    /// Allocates memory for `layout` (any power-of-two alignment; objects up
    /// to 8 KiB come from size classes). Normal context: may wait on a lock,
    /// reclaim and grow. `None` when memory is exhausted.
    ///
    /// Called by a thread already inside the allocator (a signal handler
    /// that interrupted it) or inside a nolock scope, it takes the nolock
    /// path instead (the crate's `context` module); so do `alloc_zeroed`,
    /// `alloc_in` and `free`, while `drain` and `maintain` do nothing.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let layout = Layout::from_size_align(100, 64).unwrap();
    /// let p = heap.alloc(layout).expect("memory to spare");
    /// assert_eq!(p.as_ptr() as usize % 64, 0);
    /// // SAFETY: `p` is valid for `layout.size()` bytes, allocated above and freed once.
    /// unsafe {
    ///     p.as_ptr().write_bytes(0xab, layout.size());
    ///     heap.free(p);
    /// }
    /// ```
    #[inline]
    pub fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc");
        self.core().alloc(layout)
    }

    /// Allocates zeroed memory; skips the zeroing for fresh `mmap` memory,
    /// which the OS zeroed. Normal context.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let layout = Layout::new::<[u8; 256]>();
    /// let p = heap.alloc_zeroed(layout).unwrap();
    /// // SAFETY: `p` is valid for 256 initialised (zeroed) bytes until it is freed.
    /// let bytes = unsafe { core::slice::from_raw_parts(p.as_ptr(), layout.size()) };
    /// assert!(bytes.iter().all(|&b| b == 0));
    /// // SAFETY: allocated above, freed once (`bytes` is not used afterwards).
    /// unsafe { heap.free(p) };
    /// ```
    pub fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc_zeroed");
        self.core().alloc_zeroed(layout)
    }

    /// `alloc` for `Global`: routed the same way, without the debug checker
    /// (a nolock scope is a route for `Global`, not a violation).
    #[cfg(feature = "std")]
    #[inline(always)]
    pub(crate) fn alloc_routed(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc(layout)
    }

    /// `alloc_zeroed` for `Global` (see `alloc_routed`).
    #[cfg(feature = "std")]
    pub(crate) fn alloc_zeroed_routed(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc_zeroed(layout)
    }

    /// Allocates from any context: only `try_lock`s, never waits, makes no
    /// blocking system call (at most a `FUTEX_WAKE`, none with
    /// [`Config::nolock_syscalls`] off), never grows the heap. Large requests are served up to
    /// [`MAX_ORDER`] pages (4 MiB), from a zone whose lock could be tried;
    /// above 4 MiB (`mmap`, normal path only) it returns `None`, counted in
    /// [`HeapStats::nolock_alloc_fail_too_large`]. `None` means "no memory
    /// for you in this context now".
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let ring = heap.alloc_nolock(Layout::from_size_align(1 << 20, 64).unwrap());
    /// let ring = ring.expect("1 MiB from any context, with memory to spare");
    /// assert!(heap.alloc_nolock(Layout::from_size_align(8 << 20, 8).unwrap()).is_none());
    /// assert_eq!(heap.stats().nolock_alloc_fail_too_large, 1);
    /// unsafe { heap.free_nolock(ring) };
    /// ```
    #[inline]
    pub fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc_nolock(layout)
    }

    /// Allocates and charges `group` (and its ancestors). Normal context: over
    /// a limit, runs reclaim once and retries. The charge is released when
    /// the memory is freed, with `free` or `free_nolock`.
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let group = Group::new("requests", Some(1 << 20), None);
    /// let p = heap.alloc_in(Layout::from_size_align(4096, 8).unwrap(), &group).unwrap();
    /// assert!(group.usage() >= 4096);
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) }; // releases the charge
    /// assert_eq!(group.usage(), 0);
    /// ```
    pub fn alloc_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.core().alloc_in(layout, group)
    }

    /// Allocates and charges `group` from any context; `None` (and a failure
    /// counted on the group that refused) when a limit would be exceeded.
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let group = Group::new("handlers", Some(4096), None);
    /// let p = heap.alloc_nolock_in(Layout::from_size_align(1000, 8).unwrap(), &group);
    /// let p = p.expect("within the limit, with memory to spare");
    /// // Over the limit: refused at once, and counted on the group.
    /// assert!(heap.alloc_nolock_in(Layout::from_size_align(8192, 8).unwrap(), &group).is_none());
    /// assert!(group.failcnt() >= 1);
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free_nolock(p) };
    /// ```
    pub fn alloc_nolock_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.core().alloc_nolock_in(layout, group)
    }

    /// Frees memory from any of this heap's allocation functions. Normal
    /// context. No size is needed: the page descriptor says who owns it.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let small = heap.alloc(Layout::new::<[u64; 2]>()).unwrap();
    /// let large = heap.alloc(Layout::from_size_align(100_000, 8).unwrap()).unwrap();
    /// assert_eq!((heap.stats().objects_in_use, heap.stats().large_in_use), (1, 1));
    /// // SAFETY: both allocated above, freed once; no size is needed.
    /// unsafe {
    ///     heap.free(small);
    ///     heap.free(large);
    /// }
    /// assert_eq!((heap.stats().objects_in_use, heap.stats().large_in_use), (0, 0));
    /// ```
    ///
    /// # Safety
    /// `ptr` must have come from this heap and not be used afterwards.
    /// Detected violations (a pointer outside the heap, an interior pointer,
    /// a page no cache owns, a double free where detectable) abort with a
    /// one-line message.
    #[inline]
    pub unsafe fn free(&self, ptr: NonNull<u8>) {
        crate::context::might_wait("Heap::free");
        // SAFETY: forwarded contract.
        unsafe { self.core().free(ptr) }
    }

    /// Frees any object of this heap from any context. Never waits, never
    /// fails: what cannot take a lock is parked on a deferred stack.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = heap.alloc(Layout::new::<[u64; 2]>()).unwrap(); // normal path...
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free_nolock(p) }; // ...freed from any context
    /// assert_eq!(heap.stats().objects_in_use, 0);
    /// ```
    ///
    /// # Safety
    /// As for [`free`](Self::free).
    #[inline]
    pub unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.core().free_nolock(ptr) }
    }

    /// [`free`](Self::free), told the layout the block was allocated with
    /// (as C23's `free_sized` and Rust's `GlobalAlloc::dealloc` are): the
    /// layout names the size class at once, so the free need not wait for
    /// the page's descriptor to learn it. The descriptor is still read, and
    /// decides: a layout that names another class than the block's costs
    /// speed (the free falls back to `free`'s path), never safety, and every
    /// check `free` makes is made.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let layout = Layout::new::<[u64; 8]>();
    /// let p = heap.alloc(layout).unwrap();
    /// unsafe { heap.free_sized(p, layout) };
    /// ```
    ///
    /// # Safety
    /// As for [`free`](Self::free); `layout` should be the one the block
    /// was allocated with.
    #[inline]
    pub unsafe fn free_sized(&self, ptr: NonNull<u8>, layout: Layout) {
        crate::context::might_wait("Heap::free_sized");
        // SAFETY: forwarded contract.
        unsafe { self.core().free_sized::<false>(ptr.as_ptr(), layout) }
    }

    /// [`free_nolock`](Self::free_nolock), told the layout: from any
    /// context, as fast as [`free_sized`](Self::free_sized) and with the
    /// same checks.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let layout = Layout::from_size_align(200, 8).unwrap();
    /// let p = heap.alloc_nolock(layout).expect("a fresh heap has memory");
    /// unsafe { heap.free_nolock_sized(p, layout) };
    /// ```
    ///
    /// # Safety
    /// As for [`free_sized`](Self::free_sized).
    #[inline]
    pub unsafe fn free_nolock_sized(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.core().free_sized::<true>(ptr.as_ptr(), layout) }
    }

    /// How many bytes the allocation at `ptr` can use (at least the size it
    /// was asked for). Any context. Aborts like [`free`](Self::free), with
    /// a one-line message naming `usable_size`, if `ptr` is not a live
    /// allocation of this heap: a freed object too, as a double free of it
    /// would be caught (its key word still says "free").
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = heap.alloc(Layout::from_size_align(100, 8).unwrap()).unwrap();
    /// let usable = heap.usable_size(p);
    /// assert!(usable >= 100);
    /// // SAFETY: every one of the usable bytes may be written; `p` is freed once.
    /// unsafe {
    ///     p.as_ptr().write_bytes(0, usable);
    ///     heap.free(p);
    /// }
    /// ```
    pub fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        self.core().usable_size(ptr)
    }

    /// Whether the live allocation at `ptr` is whole pages (a page block
    /// or a mapping) rather than an object of a size class: its usable
    /// size is its request rounded up to pages, however small the request
    /// (the nolock route serves small requests from page blocks when their
    /// classes are busy, and a miss while another thread's `fork` holds
    /// the heap's locks may map its block beside the heap). For the C
    /// library's size checks. Any context; `false` for a pointer that is
    /// not a live block of this heap.
    #[doc(hidden)]
    pub fn is_paged(&self, ptr: NonNull<u8>) -> bool {
        match self.core().classify(ptr.as_ptr() as usize) {
            Some(Kind::Object(..)) | None => false,
            Some(_) => true,
        }
    }

    /// Entries of the table of huge blocks claimed right now (`BUSY`: a
    /// block being moved by [`remap_huge`](Self::remap_huge), or an entry
    /// being filled by a huge allocation). For tests: in a forked child, a
    /// claimed entry belongs to a thread the child does not have, and the
    /// block it stood for can never be freed. Any context; walks the whole
    /// table.
    #[doc(hidden)]
    #[cfg(feature = "std")]
    pub fn huge_entries_claimed(&self) -> usize {
        self.core().huge.claimed()
    }

    /// Resizes a huge allocation (above 4 MiB, `mmap`ed) to `size` bytes
    /// with `mremap`: the pages move, the contents are not copied. Normal
    /// context. `None`, with `ptr` untouched, when `ptr` is not a huge
    /// allocation, `size` is not above 4 MiB, the allocation is charged to
    /// a group, the OS refuses, or the caller is inside the allocator or a
    /// nolock scope (routed like the other normal-path calls: the nolock
    /// path makes no `mremap`), or another thread's `fork` is in progress
    /// (a fork waits for moves that started before it; see the crate's
    /// notes on `fork`). The result is page-aligned. A pointer that is not
    /// a live block of this heap (freed, foreign, interior) is reported
    /// and aborts, as its free would.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let mut p = heap.alloc(Layout::from_size_align(8 << 20, 8).unwrap()).unwrap(); // huge
    /// // SAFETY: `p` is valid for 8 MiB.
    /// unsafe { p.as_ptr().write(42) };
    /// // SAFETY: `p` is a live allocation of `heap`; after `Some`, only the result is.
    /// if let Some(q) = unsafe { heap.remap_huge(p, 16 << 20) } {
    ///     // SAFETY: the contents moved with the pages.
    ///     assert_eq!(unsafe { q.as_ptr().read() }, 42);
    ///     assert!(heap.usable_size(q) >= 16 << 20);
    ///     p = q;
    /// } // else `p` is untouched: copy to a new block instead
    /// // Not a huge allocation: never remapped.
    /// let small = heap.alloc(Layout::new::<u64>()).unwrap();
    /// // SAFETY: a live allocation; it stays live after `None`.
    /// assert!(unsafe { heap.remap_huge(small, 16 << 20) }.is_none());
    /// // SAFETY: both live, freed once.
    /// unsafe {
    ///     heap.free(small);
    ///     heap.free(p);
    /// }
    /// ```
    ///
    /// # Safety
    /// `ptr` is a live allocation of this heap; after `Some`, only the
    /// result is.
    #[cfg(feature = "std")]
    pub unsafe fn remap_huge(&self, ptr: NonNull<u8>, size: usize) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::remap_huge");
        if crate::context::nested() {
            return None;
        }
        let core = self.core();
        let addr = ptr.as_ptr() as usize;
        let new = size.checked_next_multiple_of(PAGE_SIZE)?;
        if new <= PAGE_SIZE << MAX_ORDER {
            return None;
        }
        // Inside the allocator (a `fork` from a signal handler that
        // interrupted this call takes no lock and waits for nothing, as for
        // any call it interrupts), and counted, so that a fork on another
        // thread waits (in `lock_all`) until the block is back in the
        // table. Counted first, then the forks read (both SeqCst, as
        // `prepare` counts itself in `FORKING` before it reads `remaps`):
        // either that fork sees this call, or this call sees the fork and
        // leaves the block where it is (the caller copies instead, which
        // gives way to the fork as every allocation does).
        let _inside = crate::context::Inside::enter();
        // And no signal handler runs on this thread while the move is
        // counted (signals that come meanwhile are handled once the count
        // is taken back): a handler that forks, or waits for a fork, would
        // hold up another thread's fork, which waits for the count.
        let _quiet = crate::platform::SignalsBlocked::new();
        let _counted = RemapCount::new(&core.remaps);
        if crate::fork::fork_mark().forking_elsewhere() {
            return None;
        }
        // The entry stays ours (`BUSY`) while the block moves: another
        // thread's huge allocation cannot take it meanwhile.
        let Some(claimed) = core.huge.claim(addr) else {
            // Not a huge block: a live block of this heap gets `None` (the
            // caller copies), anything else (freed, foreign, interior) is
            // reported as a free of it would be, rather than left for the
            // caller to copy from.
            core.usable_size_for(ptr, "remap_huge");
            return None;
        };
        let (old, group) = (claimed.size, claimed.group);
        let moved = match group {
            // SAFETY: a registered huge allocation, its entry claimed while it
            // moves: nothing else looks it up or frees it.
            0 => unsafe { crate::platform::os_remap(ptr.as_ptr(), old, new) },
            _ => None,
        };
        // Moved or not, the block goes back in the table: in the claimed
        // entry or a free one before it on the probe path, so it cannot fail.
        let (at, len) = moved.map_or((addr, old), |p| (p as usize, new));
        core.huge.insert_claimed(claimed, at, len, group);
        core.huge_bytes.fetch_add(len, Ordering::Relaxed);
        core.huge_bytes.fetch_sub(old, Ordering::Relaxed);
        moved.and_then(NonNull::new)
    }

    /// Registers a shrinker: a normal-context callback asked to free up to
    /// the given number of bytes of the caller's own caches, returning how
    /// many it freed. The heap runs shrinkers when a zone falls below its
    /// min watermark, when an accounting group is over its limit, and (the
    /// maintainer) below the low watermark. Shrinkers may run on several
    /// threads at once; a reclaim started inside a shrinker (it allocated),
    /// from this heap or another, does not call shrinkers again on that
    /// thread, however many threads reclaim at once. Normal context
    /// (it allocates; no lock is held meanwhile).
    ///
    /// A shrinker runs on the thread whose allocation reclaims, in whatever
    /// context that allocation was made: a signal handler that allocates
    /// through the normal path (`Global`, `Heap::alloc`) without having
    /// interrupted the allocator itself runs it inside the handler (only
    /// nolock calls and calls routed to the nolock path never reclaim).
    /// So a shrinker that takes a lock which its own thread may hold where
    /// such a handler can interrupt it should take it with `try_lock` and
    /// free nothing when it is busy.
    ///
    /// A shrinker must not panic: it runs inside allocations (perhaps a
    /// `GlobalAlloc` call, which must not unwind) and on the maintenance
    /// thread, so with std a panic in it aborts the process with the line
    /// `anyalloc: a shrinker panicked (...)` after the panic's own message.
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// static CALLS: AtomicUsize = AtomicUsize::new(0);
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    /// heap.register_shrinker(|_wanted| {
    ///     CALLS.fetch_add(1, Ordering::Relaxed);
    ///     0 // this one has nothing to give back
    /// });
    /// let group = Group::new("full", Some(16 << 10), None);
    /// let layout = Layout::from_size_align(16 << 10, 8).unwrap();
    /// let p = heap.alloc_in(layout, &group).unwrap();
    /// // Over the limit: the normal path runs the shrinkers, then gives up.
    /// assert!(heap.alloc_in(layout, &group).is_none());
    /// assert!(CALLS.load(Ordering::Relaxed) >= 1);
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// ```
    pub fn register_shrinker(&self, shrinker: impl Fn(usize) -> usize + Send + Sync + 'static) {
        let node = alloc::boxed::Box::new(ShrinkerNode {
            f: alloc::boxed::Box::new(shrinker),
            next: core::ptr::null_mut(),
        });
        self.core().shrinkers.push(node);
    }

    /// Normal context: every cached and deferred object back to its slab,
    /// every empty slab back to the page allocator, then the page
    /// allocator's own drain. With nothing allocated, every page is free
    /// in the buddy lists afterwards.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = heap.alloc(Layout::new::<[u8; 48]>()).unwrap();
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// heap.drain();
    /// let pages = heap.pages().stats();
    /// assert_eq!(pages.buddy_pages, pages.total_pages);
    /// ```
    pub fn drain(&self) {
        self.core().drain(true);
    }

    /// One maintenance pass (normal context): what the maintenance thread
    /// does, for `no_std` embedders to run from a deferred context (and for
    /// tests). Each call counts as one epoch: memory idle for two calls
    /// goes back (cached objects to their slabs, free blocks to the OS;
    /// free blocks below 256 KiB after eight calls, at most 256 per zone
    /// per call).
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    /// for _ in 0..3 {
    ///     heap.maintain(); // e.g. from the embedder's timer
    /// }
    /// assert_eq!(heap.stats().maintenance_passes, 3);
    /// ```
    pub fn maintain(&self) {
        if crate::context::nested() {
            return;
        }
        let core = self.core();
        let epoch = core.advance_epoch(1);
        core.maintain_pass(epoch, 2, 2);
    }

    /// Normal context: [`drain`](Self::drain), then every free block of the
    /// buddy lists goes back to the OS now, whatever its size, not after it
    /// stayed idle (C's `malloc_trim`, which also returns every free page;
    /// maintenance returns the free pages that the few survivors of a burst
    /// of small objects leave between their slabs only after two seconds
    /// idle, a bounded number per pass). Returns the bytes given back. Called by a
    /// thread already inside the allocator or inside a nolock scope, it
    /// does nothing (as `drain`): it may hold the drain lock.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    /// let p = heap.alloc(Layout::from_size_align(1 << 20, 8).unwrap()).unwrap();
    /// // SAFETY: `p` is valid for 1 MiB, and freed once.
    /// unsafe {
    ///     p.as_ptr().write_bytes(1, 1 << 20); // touched: memory the OS committed
    ///     heap.free(p);
    /// }
    /// let given_back = heap.trim();
    /// assert_eq!(heap.stats().released_to_os_bytes, given_back as u64);
    /// ```
    #[cfg(feature = "std")]
    pub fn trim(&self) -> usize {
        crate::context::might_wait("Heap::trim");
        if crate::context::nested() {
            return 0;
        }
        self.drain();
        let bytes = self.core().pages.release_free_blocks();
        let released = &self.core().released_bytes;
        released.fetch_add(bytes as u64, Ordering::Relaxed);
        bytes
    }

    /// A snapshot of the heap's counters; see [`HeapStats`].
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = heap.alloc(Layout::new::<[u64; 4]>()).unwrap();
    /// let s = heap.stats();
    /// assert_eq!(s.objects_in_use, 1);
    /// assert_eq!(s.pages.total_pages, heap.pages().stats().total_pages);
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// assert_eq!(heap.stats().objects_in_use, 0);
    /// ```
    pub fn stats(&self) -> HeapStats {
        self.core().stats()
    }

    /// Fork support: takes every waitable lock. Normal context.
    #[cfg(feature = "std")]
    pub(crate) fn lock_all(&self) {
        self.core().lock_all();
    }

    /// Releases what [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// `lock_all` was called (here or in the parent of this forked child) and
    /// not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all(&self, child: bool) {
        // SAFETY: forwarded contract.
        unsafe { self.core().unlock_all(child) };
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

    // ----- normal path -----------------------------------------------------------

    /// The normal path, routed: the fast path is the same for both routes
    /// (it holds only this CPU's slot try-lock); the slow paths read the
    /// thread's context, and a thread inside the allocator or in a nolock
    /// scope takes the nolock path (`alloc_once` then returns `None`).
    #[inline(always)]
    pub(crate) fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.alloc_by_class::<false>(layout)
    }

    /// Both allocation paths' fast path: a table class, and this CPU's main
    /// sheaf. Every other case is one tail call to the general path of the
    /// mode, so the fast path needs no stack frame of its own.
    ///
    /// The tiny classes (8 and 12 bytes), whose key word is at offset 0
    /// rather than 8, take an out-of-line copy of it (`alloc_tiny`), so that
    /// here the key word's place is a constant: one predicted branch instead
    /// of computing an address from the class.
    #[inline(always)]
    fn alloc_by_class<const NOLOCK: bool>(&self, layout: Layout) -> Option<NonNull<u8>> {
        // The table gives the owner id, class + 1 (see `class::ClassTables`).
        if let Some(k) = self.tables().owner_fast(layout.size(), layout.align()) {
            if k <= cache::FIRST_KEYED_CLASS {
                return self.alloc_tiny::<NOLOCK>(k - 1);
            }
            return self.alloc_in_class::<NOLOCK>(k - 1);
        }
        if NOLOCK {
            self.alloc_nolock_general(layout)
        } else {
            self.alloc_general(layout)
        }
    }

    /// `alloc_by_class` for a tiny class (see there). Marked cold so that
    /// the fast path's code falls through for the other classes.
    #[cold]
    #[inline(never)]
    fn alloc_tiny<const NOLOCK: bool>(&self, c: usize) -> Option<NonNull<u8>> {
        self.alloc_in_class::<NOLOCK>(c)
    }

    /// The allocation fast path for class `c`: this CPU's main sheaf, or
    /// one tail call to the general path of the mode.
    #[inline(always)]
    fn alloc_in_class<const NOLOCK: bool>(&self, c: usize) -> Option<NonNull<u8>> {
        let cache = self.cache(c);
        if let Some(obj) = cache.seq_pop::<NOLOCK>() {
            cache.clear_free_mark_of(obj, c);
            return Some(self.handed_out(obj));
        }
        self.alloc_class_general::<NOLOCK>(cache)
    }

    /// The general path of the mode for a request that `cache`'s class
    /// serves. Taking only the cache (at hand in a register) keeps the
    /// caller's layout out of the registers the fast path needs across its
    /// sequence.
    #[inline(never)]
    fn alloc_class_general<const NOLOCK: bool>(&self, cache: &Cache) -> Option<NonNull<u8>> {
        let c = cache.class();
        if NOLOCK {
            self.alloc_nolock_general(class::layout_of(c))
        } else {
            self.alloc_general(class::layout_of(c))
        }
    }

    /// `alloc` beyond its fast path: any class, the slow paths, routing.
    ///
    /// Reclaim requests are run here, not on the fast path: only a slow path
    /// makes one (a page allocation below the watermark while a cache's
    /// node lock is held, which must not run shrinkers), and the allocation
    /// that made it runs it once that lock is released, right here (or in
    /// `alloc_in`); a nested context leaves it for the next one.
    ///
    /// A large block of a per-CPU list's order (16 to 64 KiB) first tries
    /// the page allocator's rseq fast path, which any context may run
    /// (`seq_alloc_heap`).
    #[inline(never)]
    fn alloc_general(&self, layout: Layout) -> Option<NonNull<u8>> {
        if layout.size() > class::MAX_SMALL {
            if let Some(p) = large_order(layout).and_then(|o| self.pages.seq_alloc_heap(o)) {
                return Some(self.mark_large(p));
            }
        }
        match self.alloc_once(layout, 0) {
            Some(p) => {
                if self.pages.reclaim_requested() {
                    self.reclaim_requested_now();
                }
                Some(p)
            }
            None => self.alloc_miss(layout),
        }
    }

    #[cold]
    fn alloc_miss(&self, layout: Layout) -> Option<NonNull<u8>> {
        if crate::context::nested() {
            return self.alloc_nolock(layout);
        }
        if never_served(layout) {
            return None;
        }
        self.retry_after_miss(
            layout,
            None,
            || {
                self.pages.take_reclaim_request();
                self.reclaim();
            },
            || self.alloc_once(layout, 0),
        )
    }

    /// A normal allocation's last attempts after a miss (into `group`, if
    /// any): reclaim once, then `attempt` again, around other threads'
    /// forks. Reclaim runs only in an attempt that starts with no fork in
    /// progress: during a fork every allocation misses, the miss is most
    /// likely the fork's, and the shrinkers would give back memory for
    /// nothing. An attempt that failed while a fork held the locks at any
    /// time during it (it may have given way) goes on in
    /// `alloc_while_forking`, and is tried again once the fork has ended.
    fn retry_after_miss(
        &self,
        layout: Layout,
        group: Option<&Arc<Group>>,
        reclaim: impl Fn(),
        attempt: impl Fn() -> Option<NonNull<u8>>,
    ) -> Option<NonNull<u8>> {
        #[cfg(not(feature = "std"))]
        let _ = (layout, group);
        let mut reclaimed = false;
        loop {
            let mark = Self::fork_mark();
            if !reclaimed && !Self::forking(mark) {
                reclaim();
                reclaimed = true;
            }
            match attempt() {
                None if Self::fork_gave_way(mark) => {}
                p => return p,
            }
            #[cfg(feature = "std")]
            if let Some(p) = self.alloc_while_forking(layout, group) {
                return p;
            }
        }
    }

    /// A normal allocation (into `group`, if any) that missed while a
    /// `fork` on another thread held, or was taking, the heap's locks,
    /// which its normal path gave way to (see the `fork` module's "Other
    /// threads give way"):
    ///
    /// 1. wait for the fork to end, at most `FORK_PATIENCE` (not at all
    ///    once a wait for the same fork ran out): `None` when it ended, and
    ///    the caller tries its normal path again;
    /// 2. else the fork is stalled, and may be waiting for this very
    ///    thread: the nolock path (see `fork::fork_stalled`); else map the block
    ///    on its own, beside the heap (registered like a huge block), while
    ///    less than half the huge table is in use (a slow fork that waits
    ///    for nobody, with threads allocating on, would fill it);
    /// 3. else wait for the fork longer, at most `FORK_PATIENCE_LAST`:
    ///    `None` when it ended;
    /// 4. else map the block beside the heap with the rest of the table,
    ///    or fail (`Some(None)`).
    ///
    /// The nolock path only once the fork is stalled: an allocation in
    /// progress on a nolock level's sheaf at the clone would leave that
    /// slot held, and its objects out of reach, in the child.
    #[cfg(feature = "std")]
    #[cold]
    #[inline(never)]
    fn alloc_while_forking(
        &self,
        layout: Layout,
        group: Option<&Arc<Group>>,
    ) -> Option<Option<NonNull<u8>>> {
        if crate::fork::wait_for_fork() {
            return None;
        }
        // A stalled fork (see `fork::fork_stalled`): the nolock path first.
        let p = match group {
            None => self.alloc_nolock(layout),
            Some(g) => self.alloc_nolock_in(layout, g),
        };
        if p.is_some() {
            return Some(p);
        }
        let beside = || {
            let p = match group {
                None => self.alloc_huge(layout),
                Some(g) => self.alloc_huge_in(layout, g, true),
            };
            if p.is_some() {
                self.fork_mapped.fetch_add(1, Ordering::Relaxed);
            }
            p
        };
        if self.huge_live.load(Ordering::Relaxed) < huge::HUGE_ENTRIES / 2 {
            if let Some(p) = beside() {
                return Some(Some(p));
            }
        }
        if crate::fork::wait_for_fork_at_most(crate::fork::FORK_PATIENCE_LAST) {
            return None;
        }
        Some(beside())
    }

    /// The forks in progress before a normal-path attempt, for
    /// [`fork_gave_way`](Self::fork_gave_way) (without std: no fork).
    #[inline]
    fn fork_mark() -> ForkMark {
        #[cfg(feature = "std")]
        return crate::fork::fork_mark();
        #[cfg(not(feature = "std"))]
        ForkMark
    }

    /// Whether a `fork` on another thread held (or was taking) the locks
    /// when `mark` was taken.
    #[inline]
    fn forking(mark: ForkMark) -> bool {
        #[cfg(feature = "std")]
        return mark.forking_elsewhere();
        #[cfg(not(feature = "std"))]
        {
            let _ = mark;
            false
        }
    }

    /// Whether a `fork` on another thread held (or was taking) the locks
    /// at some time since `mark`, so that a normal-path miss may be the
    /// locks giving way rather than memory running out (see the `fork`
    /// module's "Other threads give way"), even if that fork has ended
    /// since.
    #[inline]
    fn fork_gave_way(mark: ForkMark) -> bool {
        #[cfg(feature = "std")]
        return crate::fork::forked_elsewhere_since(mark);
        #[cfg(not(feature = "std"))]
        {
            let _ = mark;
            false
        }
    }

    /// An allocation asked for reclaim it could not run: run it, unless this
    /// thread is inside the allocator (then the request stays for later).
    #[cold]
    fn reclaim_requested_now(&self) {
        if !crate::context::nested() && self.pages.take_reclaim_request() {
            self.reclaim();
        }
    }

    /// One normal allocation attempt from cache set `base` (0: plain,
    /// CLASSES: accounted).
    #[inline]
    fn alloc_once(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let cache = self.cache(base + c);
                let obj = cache.alloc(&self.pages)?;
                Some(self.hand_out(cache, obj))
            }
            None => self.alloc_large(layout),
        }
    }

    pub(crate) fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
        let p = self.alloc(layout)?;
        #[cfg(feature = "std")]
        if class::class_for(layout.size(), layout.align()).is_none()
            && large_order(layout).is_none()
        {
            return Some(p); // huge: a fresh mapping, zero-filled by the OS
        }
        // SAFETY: `p` is a fresh allocation of at least `layout.size()` bytes.
        unsafe { core::ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
        Some(p)
    }

    #[inline(always)]
    fn hand_out(&self, cache: &Cache, obj: usize) -> NonNull<u8> {
        cache.clear_free_mark(obj);
        self.handed_out(obj)
    }

    /// `hand_out` after the key word was cleared.
    #[inline(always)]
    fn handed_out(&self, obj: usize) -> NonNull<u8> {
        #[cfg(feature = "debug-checks")]
        if let Some(Kind::Object(cache, zone, idx)) = self.classify(obj) {
            cache.mark(&self.pages, zone, idx, obj, true);
        }
        // SAFETY: objects live in zones, whose addresses are never null.
        unsafe { NonNull::new_unchecked(obj as *mut u8) }
    }

    /// The normal large path; `None` at once for a thread inside the
    /// allocator or in a nolock scope (the caller takes the nolock path).
    #[cold]
    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        if crate::context::nested() {
            return None;
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        match large_order(layout) {
            Some(order) => {
                let p = self.pages.alloc_pages_normal(order)?;
                Some(self.mark_large(p))
            }
            #[cfg(feature = "std")]
            None => self.alloc_huge(layout),
            #[cfg(not(feature = "std"))]
            None => None,
        }
    }

    fn mark_large(&self, p: NonNull<u8>) -> NonNull<u8> {
        let (_, zone, idx) = self.pages.locate_known(p.as_ptr() as usize);
        let d = zone.desc(idx);
        d.freelist.store(0, Ordering::Relaxed); // no group yet
        d.owner.store(LARGE_OWNER, Ordering::Release);
        p
    }

    #[cfg(feature = "std")]
    fn alloc_huge(&self, layout: Layout) -> Option<NonNull<u8>> {
        let size = huge_size(layout)?;
        let align = layout.align().max(PAGE_SIZE);
        let p = crate::platform::os_reserve(size, align)?;
        if !self.huge.insert(p as usize, size, 0) {
            // SAFETY: the reservation was just made and nothing refers to it.
            unsafe { crate::platform::os_release(p, size) };
            return None;
        }
        crate::interrupt_point!(HugeCount);
        self.huge_live.fetch_add(1, Ordering::Relaxed);
        self.huge_bytes.fetch_add(size, Ordering::Relaxed);
        NonNull::new(p)
    }

    /// The normal free, routed like `alloc`: the object fast path is the
    /// same for both routes; the slow paths of a thread inside the allocator
    /// or in a nolock scope take the nolock path.
    #[inline(always)]
    pub(crate) unsafe fn free(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_by_owner::<false>(ptr) }
    }

    #[inline(always)]
    pub(crate) unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_by_owner::<true>(ptr) }
    }

    /// Both layout-blind frees: the page's owner names the cache; a plain
    /// (unaccounted) cache's object takes the fast route, everything else
    /// the general path of the mode.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(always)]
    unsafe fn free_by_owner<const NOLOCK: bool>(&self, ptr: NonNull<u8>) {
        let addr = ptr.as_ptr() as usize;
        if let Some((_, d)) = self.pages.locate_first(addr) {
            let owner = d.owner.load(Ordering::Acquire) as usize;
            // One comparison for "a plain class with its key at 8"; the
            // tiny classes take `free_plain`'s out-of-line copy.
            let first = cache::FIRST_KEYED_CLASS + 1;
            if owner.wrapping_sub(first) < CLASSES + 1 - first {
                // SAFETY: forwarded contract.
                return unsafe { self.free_in_class::<NOLOCK>(owner - 1, addr) };
            }
            if owner.wrapping_sub(1) < CLASSES {
                // SAFETY: forwarded contract.
                return unsafe { self.free_plain::<NOLOCK>(owner, addr) };
            }
            if owner == LARGE_OWNER as usize {
                // SAFETY: forwarded contract.
                return unsafe { self.free_large::<NOLOCK>(ptr, d) };
            }
        }
        // SAFETY: forwarded contract.
        unsafe { self.free_general_of::<NOLOCK>(ptr) }
    }

    /// `free` beyond its fast route: every kind of block, and the release
    /// of accounting groups owed to a normal context.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(never)]
    unsafe fn free_general(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in(ptr, Mode::Normal) };
        if !self.released_groups.is_empty() && !crate::context::nested() {
            account::drop_released(&self.released_groups);
        }
    }

    /// A free that is told the allocation's layout (`GlobalAlloc`'s
    /// `dealloc`, `Heap::free_sized`), of the mode `NOLOCK` names. The
    /// layout names the cache, so the object goes to that cache's fast path
    /// without waiting for the page lookup; the lookup still runs, as a
    /// check: the page must belong to that cache, or the free takes the
    /// full, layout-blind path of the mode (which validates and reports
    /// exactly as `free` does). So a wrong layout costs speed, never safety.
    /// Routed like `free`. A null `ptr` is ignored (it lies in no zone, so
    /// only the path beyond the fast arms tells it apart).
    ///
    /// # Safety
    /// As for `Heap::free`, or null.
    #[inline(always)]
    pub(crate) unsafe fn free_sized<const NOLOCK: bool>(&self, ptr: *mut u8, layout: Layout) {
        let addr = ptr as usize;
        // The size alone names the class (`owner_hint`, the owner id of its
        // plain cache: the page's owner decides). Two separate arms, not one
        // lookup shared by both: each tests its own owner value, and neither
        // carries a "which arm" flag.
        match self.tables().owner_hint(layout.size()) {
            Some(k) => {
                if let Some((_, d)) = self.pages.locate_first(addr) {
                    let owner = d.owner.load(Ordering::Acquire);
                    // A keyed class: one comparison. The hint table holds
                    // keyed ids and tiny ids with `TINY_HINT` set, and no
                    // owner id has that bit but `LARGE_OWNER`, which is
                    // above any entry (const-asserted beside `TINY_HINT`).
                    // So `k` is keyed here, which makes the key word's
                    // place a constant. (`k` is a table byte: `as u16`
                    // keeps it whole.)
                    if owner == k as u16 {
                        crate::check!(k > cache::FIRST_KEYED_CLASS, "a tiny owner id");
                        // SAFETY: forwarded contract; `k` is keyed (above).
                        return unsafe {
                            core::hint::assert_unchecked(k > cache::FIRST_KEYED_CLASS);
                            self.free_in_class::<NOLOCK>(k - 1, addr)
                        };
                    }
                    if owner as usize | class::TINY_HINT == k {
                        // SAFETY: forwarded contract.
                        return unsafe { self.free_tiny::<NOLOCK>(owner as usize - 1, addr) };
                    }
                }
            }
            None => {
                if let Some((_, d)) = self.pages.locate_first(addr) {
                    if d.owner.load(Ordering::Acquire) == LARGE_OWNER {
                        // SAFETY: forwarded contract; inside a zone, so
                        // not null.
                        return unsafe {
                            self.free_large::<NOLOCK>(NonNull::new_unchecked(ptr), d)
                        };
                    }
                }
            }
        }
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: forwarded contract.
            unsafe { self.free_general_of::<NOLOCK>(p) }
        }
    }

    /// `free_nolock` beyond its fast route.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(never)]
    unsafe fn free_nolock_general(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in(ptr, Mode::NoLock) };
    }

    /// The free of an object of the plain cache whose owner id is `owner`
    /// (its class + 1, as page descriptors and the size tables hold it), in
    /// the first zone: validated (the start of an object, not already free), then
    /// pushed on this CPU's main sheaf, or handed to the cache's slow path
    /// in one tail call. Not the start of an object: the general path of
    /// the mode, which validates again and reports it (so the fast path
    /// makes no call that returns and needs no stack frame).
    ///
    /// Tiny classes take an out-of-line copy (`free_tiny`), as in
    /// `alloc_by_class`, so that here the key word's place is a constant.
    ///
    /// # Safety
    /// As for `Heap::free`, for `addr`.
    #[inline(always)]
    unsafe fn free_plain<const NOLOCK: bool>(&self, owner: usize, addr: usize) {
        // The test and the `- 1` on the owner id itself: the callers have
        // the id, and the `- 1` folds into the cache's offsets.
        if owner <= cache::FIRST_KEYED_CLASS {
            // SAFETY: forwarded contract.
            return unsafe { self.free_tiny::<NOLOCK>(owner - 1, addr) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.free_in_class::<NOLOCK>(owner - 1, addr) }
    }

    /// `free_plain` for a tiny class (cold: see `alloc_tiny`).
    ///
    /// # Safety
    /// As for `free_plain`.
    #[cold]
    #[inline(never)]
    unsafe fn free_tiny<const NOLOCK: bool>(&self, class: usize, addr: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in_class::<NOLOCK>(class, addr) }
    }

    /// The body of `free_plain`.
    ///
    /// # Safety
    /// As for `free_plain`.
    #[inline(always)]
    unsafe fn free_in_class<const NOLOCK: bool>(&self, class: usize, addr: usize) {
        let mode = if NOLOCK { Mode::NoLock } else { Mode::Normal };
        let cache = self.cache(class);
        if !cache.is_object_start(addr) {
            // SAFETY: forwarded contract; `addr` is the caller's non-null
            // pointer (it is inside a zone).
            return unsafe {
                self.free_general_of::<NOLOCK>(NonNull::new_unchecked(addr as *mut u8))
            };
        }
        #[cfg(feature = "debug-checks")]
        {
            let (_, zone, idx) = self.pages.locate_known(addr);
            cache.mark(&self.pages, zone, idx, addr, false);
        }
        if !cache.check_free_quick(&self.pages, addr, class) {
            return cache.free_checked(&self.pages, self.pages.first_zone(), addr, mode);
        }
        if !cache.seq_push(addr, mode) {
            cache.free_miss(&self.pages, addr, mode);
        }
    }

    /// The free of a block whose page `d` (in the first zone) says it is
    /// the head of a large block: a plain one aligned to its order goes
    /// straight to the page allocator (its fast path runs in any context,
    /// its slow path is routed by the mode, or by the thread's context for
    /// the normal mode); anything else (misaligned, accounted) takes the
    /// general path of the mode, which validates, reports, uncharges.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(never)]
    unsafe fn free_large<const NOLOCK: bool>(&self, ptr: NonNull<u8>, d: &crate::page::PageDesc) {
        let order = crate::page::order_of_state(d.load());
        let addr = ptr.as_ptr() as usize;
        if !addr.is_multiple_of(PAGE_SIZE << order) || d.freelist.load(Ordering::Relaxed) != 0 {
            // SAFETY: forwarded contract.
            return unsafe { self.free_general_of::<NOLOCK>(ptr) };
        }
        d.owner.store(0, Ordering::Release);
        // SAFETY: a live, unaccounted large block of this order (its head
        // descriptor says so, and the page free's claim catches a racing
        // second free).
        unsafe { self.pages.free_pages_fast(ptr, order, NOLOCK) };
    }

    /// The general free of the mode, `free_general` or `free_nolock_general`.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(always)]
    unsafe fn free_general_of<const NOLOCK: bool>(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe {
            if NOLOCK {
                self.free_nolock_general(ptr)
            } else {
                self.free_general(ptr)
            }
        }
    }

    /// Both free paths: validate, uncharge, then the cache, page or mmap
    /// variant of `mode` (a constant at each call site).
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(always)]
    unsafe fn free_in(&self, ptr: NonNull<u8>, mode: Mode) {
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort(addr) {
            Kind::Object(cache, zone, idx) => {
                #[cfg(feature = "debug-checks")]
                cache.mark(&self.pages, zone, idx, addr, false);
                let goes_on = cache.check_free(&self.pages, zone, addr, mode);
                if cache.accounted {
                    self.uncharge_object(cache, zone, idx, addr);
                }
                if !goes_on {
                    // Parked as a suspect (see `Cache::check_free`).
                    return;
                }
                match mode {
                    Mode::Normal => cache.free(&self.pages, addr),
                    Mode::NoLock => cache.free_nolock(&self.pages, addr),
                }
            }
            Kind::Large(zone, idx, order) => {
                self.unmark_large(zone, idx, order);
                // SAFETY: a live large allocation of this order (classify).
                unsafe { self.pages.free_pages_in(ptr, order, routed(mode)) }
            }
            #[cfg(feature = "std")]
            Kind::Huge(_) => self.free_huge(addr, routed(mode)),
        }
    }

    fn uncharge_object(&self, cache: &Cache, zone: &Zone, idx: u32, addr: usize) {
        let g = cache.owner_of(zone, idx, addr).swap(0, Ordering::AcqRel);
        self.uncharge(g, cache.size());
    }

    /// Uncharges `bytes` from the group reference `g` (0: none) and
    /// releases the reference. Any context.
    fn uncharge(&self, g: usize, bytes: usize) {
        if g != 0 {
            // SAFETY: `g` is a reference from `account::retain`, stored with
            // the object and taken out exactly once (swap to 0).
            unsafe {
                (*(g as *const Group)).uncharge(bytes, self.cpu());
                account::release(g, &self.released_groups);
            }
        }
    }

    fn unmark_large(&self, zone: &Zone, idx: u32, order: u32) {
        let d = zone.desc(idx);
        // The group word: a plain block (none) takes no locked instruction;
        // a charged one is taken with a swap, so that two racing frees of
        // it (the page free's claim then aborts the second) uncharge once.
        if d.freelist.load(Ordering::Relaxed) != 0 {
            let g = d.freelist.swap(0, Ordering::AcqRel);
            self.uncharge(g, PAGE_SIZE << order);
        }
        d.owner.store(0, Ordering::Release);
    }

    /// Unregisters a huge allocation and unmaps it; the nolock path parks
    /// it instead (munmap can block): the link and size go in the mapping's
    /// first two words, and the maintainer is woken.
    #[cfg(feature = "std")]
    fn free_huge(&self, addr: usize, mode: Mode) {
        let Some((size, group)) = self.huge.remove(addr) else {
            self.bad_pointer(
                "free",
                addr,
                ", which is not a live allocation of this heap (double free?)",
            )
        };
        // Unregistered, still mapped, not yet released or parked.
        crate::interrupt_point!(FreeHuge);
        self.huge_live.fetch_sub(1, Ordering::Relaxed);
        self.huge_bytes.fetch_sub(size, Ordering::Relaxed);
        self.uncharge(group, size);
        match mode {
            Mode::Normal => {
                // SAFETY: a registered huge allocation, now unregistered, so
                // nothing else will release it.
                unsafe { crate::platform::os_release(addr as *mut u8, size) };
                // Blocks parked by nolock frees go too: without a
                // maintenance thread, a program that goes on with small
                // blocks only would keep them mapped for good.
                if !self.huge_deferred.is_empty() {
                    self.drain_huge_deferred();
                }
            }
            Mode::NoLock => {
                // SAFETY: the mapping is at least a page, writable, and no
                // longer registered, so nothing else uses it.
                unsafe { (addr as *mut usize).add(1).write(size) };
                self.huge_deferred.push(addr, |a, next| {
                    // SAFETY: as above.
                    unsafe { (a as *mut usize).write(next) }
                });
                self.pages.wake_maintainer();
            }
        }
    }

    // ----- nolock path -----------------------------------------------------------

    #[inline(always)]
    pub(crate) fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.alloc_by_class::<true>(layout)
    }

    /// `alloc_nolock` beyond its fast path.
    #[inline(never)]
    fn alloc_nolock_general(&self, layout: Layout) -> Option<NonNull<u8>> {
        // A large block goes straight to the large path (as
        // `alloc_nolock_from` would send it, after a class search that
        // cannot succeed), which tries the page fast path first.
        if layout.size() > class::MAX_SMALL {
            return self.alloc_large_nolock(layout);
        }
        self.alloc_nolock_from(layout, 0)
    }

    #[inline]
    fn alloc_nolock_from(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let mut cache = self.cache(base + c);
                let r = match cache.alloc_nolock(&self.pages) {
                    Err(Fail::Busy) => match class::next_class(c, layout.align()) {
                        // Re-entered this class everywhere: the next class up.
                        Some(n) => {
                            cache = self.cache(base + n);
                            cache.alloc_nolock(&self.pages)
                        }
                        None => Err(Fail::Busy),
                    },
                    r => r,
                };
                match r {
                    Ok(obj) => Some(self.hand_out(cache, obj)),
                    // Both classes re-entered (or no larger class: 8 KiB):
                    // a page block (at most 2 pages for a small request).
                    Err(Fail::Busy) => self.alloc_large_nolock(layout),
                    Err(f) => self.count_fail(f),
                }
            }
            None => self.alloc_large_nolock(layout),
        }
    }

    fn alloc_large_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        match large_order(layout) {
            Some(order) => {
                // The fast path counts the success in this CPU's page slot
                // (no locked instruction); the slow path here.
                if let Some(p) = self.pages.seq_alloc_heap_large(order) {
                    return Some(self.mark_large(p));
                }
                match self.pages.alloc_pages_nolock_why(order) {
                    Ok(p) => {
                        self.nolock_large_ok.fetch_add(1, Ordering::Relaxed);
                        Some(self.mark_large(p))
                    }
                    Err(f) => self.count_fail(f),
                }
            }
            // Above 4 MiB: `mmap`, which the nolock path never calls.
            None => {
                self.fail_too_large.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    #[cold]
    fn count_fail(&self, f: Fail) -> Option<NonNull<u8>> {
        match f {
            Fail::Busy => self.fail_busy.fetch_add(1, Ordering::Relaxed),
            Fail::Empty => self.fail_empty.fetch_add(1, Ordering::Relaxed),
        };
        None
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
            // SAFETY: the mapping was unregistered by free_nolock; only this
            // drain (which took the whole stack) releases it.
            unsafe { crate::platform::os_release(a as *mut u8, size) };
            a = next;
        }
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
                    } else if (owner as usize).wrapping_sub(CLASSES + 1) < CLASSES {
                        // A slab of an accounted cache (owner ids above CLASSES).
                        let cache = self.cache(owner as usize - 1);
                        cache.take_owners(zone, idx, |g| self.uncharge(g, cache.size()));
                    }
                }
            }
        }
        account::drop_released(&self.released_groups);
    }

    // ----- accounting --------------------------------------------------------------

    fn alloc_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc_in");
        if crate::context::nested() {
            return self.alloc_nolock_in(layout, group);
        }
        if !self.released_groups.is_empty() {
            account::drop_released(&self.released_groups);
        }
        if let Some(p) = self.try_alloc_in(layout, group, false, false) {
            if self.pages.reclaim_requested() {
                self.reclaim_requested_now();
            }
            return Some(p);
        }
        if never_served(layout) {
            return None;
        }
        // Over a limit or out of memory: reclaim once, then retry. The
        // per-CPU stocks of every group of the tree are returned to the
        // counters before (credit parked on other CPUs and in other groups
        // under a shared limit) and after (the shrinkers' frees uncharge
        // into this CPU's stock, and the thread may have moved to another
        // CPU since: the retry would not see that credit).
        self.retry_after_miss(
            layout,
            Some(group),
            || {
                group.flush_tree_stocks();
                self.reclaim();
                group.flush_tree_stocks();
            },
            || self.try_alloc_in(layout, group, false, true),
        )
    }

    fn alloc_nolock_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.try_alloc_in(layout, group, true, true)
    }

    /// Allocates from the accounted caches (or pages, or mmap), charges the
    /// usable size to `group`, and records the group with the memory.
    /// `last`: the caller's last attempt (a refusal counts in the refusing
    /// group's `failcnt`).
    fn try_alloc_in(
        &self,
        layout: Layout,
        group: &Arc<Group>,
        nolock: bool,
        last: bool,
    ) -> Option<NonNull<u8>> {
        #[cfg(feature = "std")]
        let is_huge = class::class_for(layout.size(), layout.align()).is_none()
            && large_order(layout).is_none();
        #[cfg(feature = "std")]
        if is_huge && !nolock {
            return self.alloc_huge_in(layout, group, last);
        }
        let p = if nolock {
            self.alloc_nolock_from(layout, CLASSES)?
        } else {
            self.alloc_once(layout, CLASSES)?
        };
        let addr = p.as_ptr() as usize;
        let cpu = self.cpu();
        let (slot, bytes) = match self.classify(addr) {
            Some(Kind::Object(cache, zone, idx)) => (cache.owner_of(zone, idx, addr), cache.size()),
            Some(Kind::Large(zone, idx, order)) => (&zone.desc(idx).freelist, PAGE_SIZE << order),
            _ => unreachable_kind(&self.pages, addr),
        };
        if !group.try_charge(bytes, cpu, last, &self.released_groups) {
            // Refused by a limit: give the memory back unaccounted.
            // SAFETY: `p` was just allocated here and has no owner yet.
            unsafe {
                if nolock {
                    self.free_nolock(p);
                } else {
                    self.free(p);
                }
            }
            if nolock {
                // The allocation counted a success: a refusal is a failure.
                self.nolock_refused.fetch_add(1, Ordering::Relaxed);
                self.fail_empty.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        slot.store(account::retain(group), Ordering::Release);
        if !self.accounted_used.load(Ordering::Relaxed) {
            self.accounted_used.store(true, Ordering::Relaxed);
        }
        Some(p)
    }

    #[cfg(feature = "std")]
    fn alloc_huge_in(&self, layout: Layout, group: &Arc<Group>, last: bool) -> Option<NonNull<u8>> {
        let size = huge_size(layout)?;
        if !group.try_charge(size, self.cpu(), last, &self.released_groups) {
            return None;
        }
        let align = layout.align().max(PAGE_SIZE);
        let reserved = crate::platform::os_reserve(size, align);
        let g = account::retain(group);
        match reserved {
            Some(p) if self.huge.insert(p as usize, size, g) => {
                self.huge_live.fetch_add(1, Ordering::Relaxed);
                self.huge_bytes.fetch_add(size, Ordering::Relaxed);
                NonNull::new(p)
            }
            other => {
                if let Some(p) = other {
                    // SAFETY: just reserved, never handed out.
                    unsafe { crate::platform::os_release(p, size) };
                }
                self.uncharge(g, size);
                None
            }
        }
    }

    // ----- reclaim and maintenance -------------------------------------------------

    fn reclaim_callback(ctx: *const ()) {
        // SAFETY: installed by `build` with the core's stable address.
        let core = unsafe { &*(ctx as *const HeapCore) };
        core.run_shrinkers();
    }

    /// Runs every shrinker, then drains every CPU's caches. Normal context,
    /// no allocator lock held.
    fn reclaim(&self) {
        self.run_shrinkers();
        // Not patient: the allocation that reclaims may be one a fork on
        // another thread waits for (see the `fork` module).
        self.drain(false);
    }

    /// Calls every shrinker: no lock held, nothing allocated here. A call
    /// nested in a shrinker on the same thread (the shrinker allocated and
    /// the allocation reclaimed), of this heap or another one, returns at
    /// once: with std, this thread's shrinker mark
    /// ([`context::Shrinking`](crate::context::Shrinking)) says so, for
    /// any number of threads reclaiming at once; without std (no
    /// per-thread state), the heap's `running` flag does, and a reclaim
    /// anywhere while the shrinkers run skips them.
    fn run_shrinkers(&self) {
        #[cfg(feature = "std")]
        let Some(_mark) = crate::context::Shrinking::enter() else {
            return; // inside a shrinker on this thread
        };
        #[cfg(not(feature = "std"))]
        let _running = {
            let running = &self.shrinkers.running;
            if running.swap(true, Ordering::Acquire) {
                return; // inside a shrinker (or another context runs them)
            }
            /// Clears the flag even if a shrinker unwinds.
            struct Running<'a>(&'a AtomicBool);
            impl Drop for Running<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            Running(running)
        };
        self.reclaims.fetch_add(1, Ordering::Relaxed);
        self.shrinkers.for_each(|s| {
            let freed = self.call_shrinker(s);
            self.shrinker_freed
                .fetch_add(freed as u64, Ordering::Relaxed);
        });
    }

    /// Runs one shrinker. A shrinker runs inside an allocation (perhaps a
    /// `GlobalAlloc` call, which must not unwind) or on the maintenance
    /// thread, so a panic in it ends the process with a one-line message
    /// (after the panic's own), rather than unwind through the allocator.
    #[cfg(feature = "std")]
    fn call_shrinker(&self, s: &(dyn Fn(usize) -> usize + Send + Sync)) -> usize {
        match std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| s(RECLAIM_BYTES))) {
            Ok(freed) => freed,
            // The payload is not dropped (that would free through the
            // global allocator): `fatal` does not return.
            Err(_payload) => self.pages.fatal(
                FatalMessage::new()
                    .text("anyalloc: a shrinker panicked (shrinkers run inside allocations and must not unwind)"),
            ),
        }
    }

    /// Runs one shrinker (without std, a panic is the embedder's panic
    /// handler's to deal with).
    #[cfg(not(feature = "std"))]
    fn call_shrinker(&self, s: &(dyn Fn(usize) -> usize + Send + Sync)) -> usize {
        s(RECLAIM_BYTES)
    }

    /// `patient`: waits for the maintenance lock even while a `fork` on
    /// another thread holds it (`Heap::drain`), rather than give way and
    /// skip the drain (reclaim inside an allocation).
    fn drain(&self, patient: bool) {
        crate::context::might_wait("Heap::drain");
        if crate::context::nested() {
            return;
        }
        let platform = self.pages.platform();
        let serial = if patient {
            self.maint_lock.lock_patient(platform)
        } else {
            self.maint_lock.lock_in(Mode::Normal, platform)
        };
        // `None`: this thread is draining already (it interrupted itself),
        // or (not patient) a fork holds the lock.
        let Some(_serial) = serial else {
            return;
        };
        for i in 0..CACHES {
            self.cache(i).drain(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        account::drop_released(&self.released_groups);
        self.pages.drain_normal();
    }

    /// Advances the heap's maintenance epoch by `n` and returns it: the one
    /// clock of `Heap::maintain` (one per call) and the maintenance thread
    /// (one per `EPOCH` of its time), which each pass gives the zones to
    /// stamp the blocks freed from then on.
    pub(crate) fn advance_epoch(&self, n: usize) -> usize {
        self.epoch.fetch_add(n, Ordering::Relaxed) + n
    }

    /// One maintenance pass at `epoch`: free blocks idle for `idle_epochs`
    /// epochs go back to the OS, caches unchanged for `idle_passes` passes
    /// go back to the slabs and the page allocator.
    pub(crate) fn maintain_pass(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) {
        let Some(serial) = self.maint_lock.lock_in(Mode::Normal, self.pages.platform()) else {
            return;
        };
        self.passes.fetch_add(1, Ordering::Relaxed);
        account::drop_released(&self.released_groups);
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        for i in 0..CACHES {
            self.cache(i).maintain_slots(&self.pages, idle_passes);
        }
        let released = self.pages.maintain(epoch, idle_epochs, idle_passes);
        self.released_bytes
            .fetch_add(released as u64, Ordering::Relaxed);
        drop(serial);
        // Shrinkers run without the maintenance lock: they may drain.
        if self.pages.below_low() {
            self.run_shrinkers();
        }
    }

    /// Wakes the maintenance thread whatever its state (normal context:
    /// stopping it).
    #[cfg(feature = "std")]
    pub(crate) fn wake_maintainer_now(&self) {
        self.pages.wake_maintainer_now();
    }

    /// Whether the nolock path may make system calls (else the maintainer
    /// polls).
    #[cfg(feature = "std")]
    pub(crate) fn nolock_syscalls(&self) -> bool {
        self.pages.nolock_syscalls()
    }

    /// The maintainer's quick duty after a wake: deferred frees only.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn drain_deferred_only(&self) {
        let Some(_serial) = self.maint_lock.lock_in(Mode::Normal, self.pages.platform()) else {
            return;
        };
        for i in 0..CACHES {
            self.cache(i).drain_deferred(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        for zone in self.pages.zones() {
            if let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) {
                zone.drain_deferred(&g);
            }
        }
    }

    // ----- lookup --------------------------------------------------------------------

    #[inline]
    fn classify(&self, addr: usize) -> Option<Kind<'_>> {
        if let Some((_, zone, idx)) = self.pages.locate_indexed(addr) {
            let owner = zone.desc(idx).owner.load(Ordering::Acquire);
            if owner == 0 {
                return None;
            }
            if owner == LARGE_OWNER {
                if !addr.is_multiple_of(PAGE_SIZE) {
                    return None;
                }
                let order = crate::page::order_of_state(zone.desc(idx).load());
                return Some(Kind::Large(zone, idx, order));
            }
            return Some(Kind::Object(self.cache(owner as usize - 1), zone, idx));
        }
        #[cfg(feature = "std")]
        if let Some(size) = self.huge.size_of(addr) {
            return Some(Kind::Huge(size));
        }
        None
    }

    #[inline(always)]
    fn classify_or_abort(&self, addr: usize) -> Kind<'_> {
        self.classify_or_abort_for(addr, "free")
    }

    /// `classify`, aborting with a message that names the call `what`
    /// (`free`, `usable_size`) when `addr` is not a block of this heap.
    #[inline(always)]
    fn classify_or_abort_for(&self, addr: usize, what: &str) -> Kind<'_> {
        match self.classify(addr) {
            Some(k @ Kind::Object(cache, ..)) => {
                cache.validate(&self.pages, addr, what);
                k
            }
            Some(k) => k,
            None if self.is_free_block(addr) => self.bad_pointer(
                what,
                addr,
                ", which is a block of pages freed already (double free?)",
            ),
            #[cfg(feature = "std")]
            None if self.huge.holding(addr).is_some() => self.bad_pointer(
                what,
                addr,
                ", which is not the start of a block above 4 MiB (interior pointer)",
            ),
            None if self.pages.contains(addr) => self.bad_pointer(
                what,
                addr,
                ", which is not a live object of this heap (its page is not owned by a cache: double free or interior pointer?)",
            ),
            None => self.bad_pointer(
                what,
                addr,
                ", which is outside the heap's memory (a foreign pointer, or a block above 4 MiB freed already?)",
            ),
        }
    }

    /// Whether `addr` is the head page of a free page block (a large
    /// block freed, on any of the page allocator's lists). For reports.
    fn is_free_block(&self, addr: usize) -> bool {
        addr.is_multiple_of(PAGE_SIZE)
            && self
                .pages
                .locate_indexed(addr)
                .is_some_and(|(_, zone, idx)| {
                    crate::page::is_free_block_state(zone.desc(idx).load())
                })
    }

    /// The one-line report of a pointer that call `what` cannot take.
    #[cold]
    fn bad_pointer(&self, what: &str, addr: usize, why: &str) -> ! {
        self.pages.fatal(
            FatalMessage::new()
                .text("anyalloc: ")
                .text(what)
                .text(" of ")
                .hex(addr)
                .text(why),
        )
    }

    /// Aborts like a bad free (naming `usable_size`) for a pointer that is
    /// not a live block of this heap, a freed object included: the key
    /// test a free makes, without its write (an object whose key word
    /// holds the key, or a tiny one whose first word looks like a free
    /// link, takes the exact search).
    pub(crate) fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        self.usable_size_for(ptr, "usable_size")
    }

    /// `usable_size`, its report naming the call `what`.
    fn usable_size_for(&self, ptr: NonNull<u8>, what: &str) -> usize {
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort_for(addr, what) {
            Kind::Object(cache, zone, _) => {
                if cache.is_freed(&self.pages, zone, addr) {
                    self.bad_pointer(what, addr, ", which is a freed object (use after free?)");
                }
                cache.size()
            }
            Kind::Large(_, _, order) => PAGE_SIZE << order,
            #[cfg(feature = "std")]
            Kind::Huge(size) => size,
        }
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
            std::thread::yield_now();
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

impl Drop for Heap {
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        crate::fork::unregister(self.core());
        #[cfg(feature = "std")]
        self.maintainer.stop(self.core());
        self.core().release_at_drop();
        // SAFETY: the maintainer is stopped and the handle is going away:
        // nothing uses the core any more; it was written by `build`.
        unsafe { core::ptr::drop_in_place(self.core.as_ptr()) };
        #[cfg(feature = "std")]
        if self.mapping.1 != 0 {
            // SAFETY: the metadata reservation made in `new`, unused now.
            unsafe { crate::platform::os_release(self.mapping.0 as *mut u8, self.mapping.1) };
        }
    }
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
