//! The object allocator: kmalloc-style size classes with per-CPU sheaves.
//!
//! [`Heap`] serves objects of 8 bytes to 8 KiB from size-class caches (see
//! [`cache`] for sheaves, barn and slabs), larger ones from the page
//! allocator (orders up to [`MAX_ORDER`](crate::MAX_ORDER), the order kept in
//! the page descriptor so `free` needs no size), and on std anything above
//! 4 MiB from `mmap` (normal path only).
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

extern crate alloc;

pub mod cache;
mod class;
#[cfg(feature = "std")]
mod huge;
#[cfg(all(test, loom))]
mod loom_model;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::account::{self, Group};
use crate::config::{Config, Error};
use crate::page::{Fail, Mode, PageAllocator, PageStats, Zone};
use crate::platform::FatalMessage;
use crate::sync::{IndexStack, SlotLock};
use crate::{MAX_ORDER, NOLOCK_MAX_ORDER, PAGE_SIZE};
pub use cache::ClassStats;
use cache::{cache_meta_bytes, Cache};
pub(crate) use class::CLASSES;

/// `owner` of the head page of a large (page-backed) allocation.
const LARGE_OWNER: u16 = u16::MAX;
/// Caches: one plain and one accounted per class.
const CACHES: usize = 2 * CLASSES;
/// Bytes a shrinker is asked for when the heap reclaims.
const RECLAIM_BYTES: usize = 4 << 20;

/// A snapshot of a heap's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Per size class, smallest first (plain and accounted caches together).
    pub classes: [ClassStats; CLASSES],
    /// Small objects in use, over all classes.
    pub objects_in_use: usize,
    /// Large (page-backed) allocations in use.
    pub large_in_use: usize,
    /// Huge (mmap'd) allocations in use.
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
    /// because the request is too large for the nolock path, or because an
    /// accounting limit refused the charge.
    pub nolock_alloc_fail_empty: u64,
    /// Nolock frees parked on a deferred stack.
    pub nolock_free_deferred: u64,
    /// Times the heap ran its shrinkers.
    pub reclaims: u64,
    /// Bytes the shrinkers said they freed.
    pub shrinker_freed_bytes: u64,
    /// Maintenance passes (by the maintenance thread or `maintain()`).
    pub maintenance_passes: u64,
    /// Bytes of idle max-order blocks given back to the OS.
    pub released_to_os_bytes: u64,
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

type Shrinker = Arc<dyn Fn(usize) -> usize + Send + Sync>;

/// The registered shrinkers; the lock is only taken in normal context.
struct Shrinkers {
    lock: SlotLock,
    list: core::cell::UnsafeCell<Vec<Shrinker>>,
}

impl Shrinkers {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<Shrinker>) -> R) -> R {
        let _g = loop {
            if let Some(g) = self.lock.try_lock() {
                break g;
            }
            core::hint::spin_loop();
        };
        // SAFETY: the lock is held for the whole access.
        f(unsafe { &mut *self.list.get() })
    }
}

/// The heap's state, at a stable address (see the module documentation).
/// (Internal; public only for the maintainer module's type signatures.)
pub(crate) struct HeapCore {
    pages: PageAllocator,
    caches: *const Cache,
    #[cfg(feature = "std")]
    huge: huge::HugeTable,
    #[cfg(feature = "std")]
    huge_deferred: IndexStack,
    /// Accounting groups whose references were released (see `account`).
    released_groups: IndexStack,
    shrinkers: Shrinkers,
    large_live: AtomicUsize,
    huge_live: AtomicUsize,
    large_bytes: AtomicUsize,
    huge_bytes: AtomicUsize,
    nolock_large_ok: AtomicU64,
    fail_busy: AtomicU64,
    fail_empty: AtomicU64,
    reclaims: AtomicU64,
    shrinker_freed: AtomicU64,
    /// Serialises `drain` and maintenance (normal context only): a
    /// maintenance pass never holds a slot that a drain would skip.
    maint_lock: crate::sync::ZoneLock,
    /// The maintainer's wake word and stop flag.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) wake: AtomicU32,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) stop: AtomicBool,
    passes: AtomicU64,
    epoch: AtomicUsize,
    released_bytes: AtomicU64,
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

/// Offsets in the metadata area: (caches, bytes per cache's slots and
/// sheaves, huge table, total).
fn meta_layout(cpus: usize) -> (usize, usize, usize, usize) {
    let caches = core::mem::size_of::<HeapCore>().next_multiple_of(64);
    let per_cache = cache_meta_bytes(cpus).next_multiple_of(64);
    let huge =
        caches + (CACHES * core::mem::size_of::<Cache>()).next_multiple_of(64) + CACHES * per_cache;
    #[cfg(feature = "std")]
    let total = huge + huge::HugeTable::BYTES;
    #[cfg(not(feature = "std"))]
    let total = huge;
    (caches, per_cache, huge, total)
}

impl Heap {
    /// Creates a heap over a new [`PageAllocator`] configured by `config`,
    /// and (unless `config.maintenance(false)`) starts its maintenance
    /// thread.
    #[cfg(feature = "std")]
    pub fn new(config: Config) -> Result<Heap, Error> {
        let heap = Self::new_without_maintainer(config)?;
        if config.maintenance {
            heap.start_maintenance();
        }
        Ok(heap)
    }

    #[cfg(feature = "std")]
    pub(crate) fn new_without_maintainer(config: Config) -> Result<Heap, Error> {
        let pages = PageAllocator::new(config)?;
        let len = meta_layout(pages.cpus()).3.next_multiple_of(PAGE_SIZE);
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
    /// # Safety
    /// As for [`PageAllocator::from_region`].
    pub unsafe fn from_region(
        region: NonNull<u8>,
        len: usize,
        platform: &'static dyn crate::Platform,
        config: Config,
    ) -> Result<Heap, Error> {
        let cpus = config.cpus.unwrap_or_else(|| platform.cpu_count()).max(1);
        let start = (region.as_ptr() as usize).next_multiple_of(64);
        let meta_len = meta_layout(cpus).3;
        let rest = start + meta_len;
        let end = region.as_ptr() as usize + len;
        if rest >= end {
            return Err(Error::Region {
                len,
                reason: "too small for the heap's metadata",
            });
        }
        // SAFETY: [rest, end) is part of the caller's exclusive region.
        let pages = unsafe {
            PageAllocator::from_region(
                NonNull::new_unchecked(rest as *mut u8),
                end - rest,
                platform,
                config,
            )?
        };
        // SAFETY: [start, rest) is part of the caller's exclusive region; it
        // is zeroed here as `build` requires.
        unsafe {
            core::ptr::write_bytes(start as *mut u8, 0, meta_len);
            Ok(Self::build(pages, start as *mut u8, (0, 0)))
        }
    }

    /// # Safety
    /// `meta` is 64-aligned, zero-filled, `meta_layout(cpus).3` bytes long,
    /// and lives (unused by others) as long as the heap.
    unsafe fn build(pages: PageAllocator, meta: *mut u8, mapping: (usize, usize)) -> Heap {
        let cpus = pages.cpus();
        let (caches_off, per_cache, huge_off, _) = meta_layout(cpus);
        let caches = meta.wrapping_add(caches_off) as *mut Cache;
        let areas = caches_off + (CACHES * core::mem::size_of::<Cache>()).next_multiple_of(64);
        for i in 0..CACHES {
            let (class, accounted) = (i % CLASSES, i >= CLASSES);
            // SAFETY: cache `i` and its slot/sheaf area lie inside `meta`
            // (meta_layout), suitably aligned and zeroed.
            unsafe {
                Cache::init(
                    caches.add(i),
                    i,
                    class,
                    accounted,
                    cpus,
                    meta.add(areas + i * per_cache),
                )
            };
        }
        #[cfg(not(feature = "std"))]
        let _ = huge_off;
        let core = HeapCore {
            pages,
            caches,
            #[cfg(feature = "std")]
            // SAFETY: the table's bytes are the zeroed tail of `meta`.
            huge: unsafe { huge::HugeTable::new(meta.add(huge_off)) },
            #[cfg(feature = "std")]
            huge_deferred: IndexStack::new(),
            released_groups: IndexStack::new(),
            shrinkers: Shrinkers {
                lock: SlotLock::new(),
                list: core::cell::UnsafeCell::new(Vec::new()),
            },
            large_live: AtomicUsize::new(0),
            huge_live: AtomicUsize::new(0),
            large_bytes: AtomicUsize::new(0),
            huge_bytes: AtomicUsize::new(0),
            nolock_large_ok: AtomicU64::new(0),
            fail_busy: AtomicU64::new(0),
            fail_empty: AtomicU64::new(0),
            reclaims: AtomicU64::new(0),
            shrinker_freed: AtomicU64::new(0),
            maint_lock: crate::sync::ZoneLock::new(),
            wake: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            passes: AtomicU64::new(0),
            epoch: AtomicUsize::new(0),
            released_bytes: AtomicU64::new(0),
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

    #[inline(always)]
    pub(crate) fn core(&self) -> &HeapCore {
        // SAFETY: the core lives in the metadata area until `drop`.
        unsafe { self.core.as_ref() }
    }

    /// Starts the maintenance thread if it is not running (std). It drains
    /// deferred frees promptly, keeps per-CPU caches that saw demand stocked,
    /// runs shrinkers below the low watermark, and returns idle memory to
    /// the OS. Returns whether a thread is running afterwards.
    #[cfg(feature = "std")]
    pub fn start_maintenance(&self) -> bool {
        let core = self.core.as_ptr() as usize;
        let started = self.maintainer.start(core);
        if started {
            self.core().pages.set_waker(&self.core().wake);
        }
        started
    }

    /// In a forked child, before anything else uses the heap: the
    /// maintenance thread stayed in the parent; forget it so that
    /// [`start_maintenance`](Self::start_maintenance) starts a new one.
    /// Returns whether one ran in the parent.
    #[cfg(feature = "std")]
    pub fn forget_maintainer_after_fork(&self) -> bool {
        self.maintainer.forget_after_fork()
    }

    /// The page allocator underneath (its memory is shared with the heap).
    pub fn pages(&self) -> &PageAllocator {
        &self.core().pages
    }

    /// Allocates memory for `layout` (any power-of-two alignment; objects up
    /// to 8 KiB come from size classes). Normal context: may wait on a lock,
    /// reclaim and grow. `None` when memory is exhausted.
    #[inline]
    pub fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc(layout)
    }

    /// Allocates zeroed memory; skips the zeroing for fresh `mmap` memory,
    /// which the OS zeroed. Normal context.
    pub fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc_zeroed(layout)
    }

    /// Allocates from any context: only `try_lock`s, never waits, never
    /// makes a syscall, never grows the heap. Large requests are served up to
    /// [`NOLOCK_MAX_ORDER`] pages (32 KiB). `None` means "no memory for you
    /// in this context now".
    #[inline]
    pub fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.core().alloc_nolock(layout)
    }

    /// Allocates and charges `group` (and its ancestors). Normal context: over
    /// a limit, runs reclaim once and retries. The charge is released when
    /// the memory is freed, with `free` or `free_nolock`.
    pub fn alloc_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.core().alloc_in(layout, group)
    }

    /// Allocates and charges `group` from any context; `None` (and a failure
    /// counted on the group that refused) when a limit would be exceeded.
    pub fn alloc_nolock_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.core().alloc_nolock_in(layout, group)
    }

    /// Frees memory from any of this heap's allocation functions. Normal
    /// context. No size is needed: the page descriptor says who owns it.
    ///
    /// # Safety
    /// `ptr` must have come from this heap and not be used afterwards.
    /// Detected violations (a pointer outside the heap, an interior pointer,
    /// a page no cache owns, a double free where detectable) abort with a
    /// one-line message.
    #[inline]
    pub unsafe fn free(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.core().free(ptr) }
    }

    /// Frees any object of this heap from any context. Never waits, never
    /// fails: what cannot take a lock is parked on a deferred stack.
    ///
    /// # Safety
    /// As for [`free`](Self::free).
    #[inline]
    pub unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.core().free_nolock(ptr) }
    }

    /// How many bytes the allocation at `ptr` can use (at least the size it
    /// was asked for). Aborts like [`free`](Self::free) if `ptr` is not a
    /// live allocation of this heap.
    pub fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        self.core().usable_size(ptr)
    }

    /// Resizes a huge allocation (above 4 MiB, `mmap`ed) to `size` bytes
    /// with `mremap`: the pages move, the contents are not copied. Normal
    /// context. `None`, with `ptr` untouched, when `ptr` is not a huge
    /// allocation, `size` is not above 4 MiB, the allocation is charged to
    /// a group, or the OS refuses. The result is page-aligned.
    ///
    /// # Safety
    /// `ptr` is a live allocation of this heap; after `Some`, only the
    /// result is.
    #[cfg(feature = "std")]
    pub unsafe fn remap_huge(&self, ptr: NonNull<u8>, size: usize) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::remap_huge");
        let core = self.core();
        let addr = ptr.as_ptr() as usize;
        let new = size.checked_next_multiple_of(PAGE_SIZE)?;
        if new <= PAGE_SIZE << MAX_ORDER {
            return None;
        }
        let (old, group) = core.huge.remove(addr)?;
        let moved = match group {
            // SAFETY: a registered huge allocation, unregistered while it moves.
            0 => unsafe { crate::platform::os_remap(ptr.as_ptr(), old, new) },
            _ => None,
        };
        let (at, len) = moved.map_or((addr, old), |p| (p as usize, new));
        if !core.huge.insert(at, len, group) {
            core.pages
                .fatal(FatalMessage::new().text("anyalloc: huge table full in remap_huge"));
        }
        core.huge_bytes.fetch_add(len, Ordering::Relaxed);
        core.huge_bytes.fetch_sub(old, Ordering::Relaxed);
        moved.and_then(NonNull::new)
    }

    /// Registers a shrinker: a normal-context callback asked to free up to
    /// the given number of bytes of the caller's own caches, returning how
    /// many it freed. The heap runs shrinkers when a zone falls below its
    /// min watermark, when an accounting group is over its limit, and (the
    /// maintainer) below the low watermark. A shrinker must not register
    /// shrinkers.
    pub fn register_shrinker(&self, shrinker: impl Fn(usize) -> usize + Send + Sync + 'static) {
        let s: Shrinker = Arc::new(shrinker);
        self.core().shrinkers.with(|l| l.push(s));
    }

    /// Normal context: every cached and deferred object back to its slab,
    /// every empty slab back to the page allocator, then the page
    /// allocator's own drain. With nothing allocated, every page is free
    /// in the buddy lists afterwards.
    pub fn drain(&self) {
        self.core().drain();
    }

    /// One maintenance pass (normal context): what the maintenance thread
    /// does, for `no_std` embedders to run from a deferred context (and for
    /// tests). Each call counts as one epoch: memory idle for two calls
    /// goes back (cached objects to their slabs, free blocks to the OS).
    pub fn maintain(&self) {
        let core = self.core();
        let epoch = core.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        core.maintain_pass(epoch, 2, 2);
    }

    /// Normal context: [`drain`](Self::drain), then every free block of
    /// 256 KiB or more goes back to the OS now, not after it stayed idle
    /// (C's `malloc_trim`). Returns the bytes given back.
    #[cfg(feature = "std")]
    pub fn trim(&self) -> usize {
        self.drain();
        let bytes = self.core().pages.release_free_blocks();
        let released = &self.core().released_bytes;
        released.fetch_add(bytes as u64, Ordering::Relaxed);
        bytes
    }

    /// A snapshot of the heap's counters; see [`HeapStats`].
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
    pub(crate) unsafe fn unlock_all(&self) {
        // SAFETY: forwarded contract.
        unsafe { self.core().unlock_all() };
    }
}

impl HeapCore {
    #[inline]
    fn cache(&self, i: usize) -> &Cache {
        debug_assert!(i < CACHES);
        // SAFETY: `caches` has CACHES initialised entries (build) that live
        // as long as the heap.
        unsafe { &*self.caches.add(i) }
    }

    #[inline(always)]
    fn cpu(&self) -> usize {
        self.pages.cpu()
    }

    // ----- normal path -----------------------------------------------------------

    #[inline]
    fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc");
        let p = self.alloc_once(layout, 0);
        if self.pages.take_reclaim_request() {
            self.reclaim();
        }
        match p {
            Some(p) => Some(p),
            None => self.alloc_after_reclaim(layout),
        }
    }

    #[cold]
    fn alloc_after_reclaim(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.reclaim();
        self.alloc_once(layout, 0)
    }

    /// One normal allocation attempt from cache set `base` (0: plain,
    /// CLASSES: accounted).
    #[inline]
    fn alloc_once(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let obj = self.cache(base + c).alloc(&self.pages, self.cpu())?;
                Some(self.hand_out(obj))
            }
            None => self.alloc_large(layout),
        }
    }

    fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
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

    #[inline]
    fn hand_out(&self, obj: usize) -> NonNull<u8> {
        #[cfg(feature = "debug-checks")]
        if let Some(Kind::Object(cache, zone, idx)) = self.classify(obj) {
            cache.mark(&self.pages, zone, idx, obj, true);
        }
        // SAFETY: objects live in zones, whose addresses are never null.
        unsafe { NonNull::new_unchecked(obj as *mut u8) }
    }

    #[cold]
    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        match large_order(layout) {
            Some(order) => {
                let p = self.pages.alloc_pages(order)?;
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
        self.large_live.fetch_add(1, Ordering::Relaxed);
        let bytes = PAGE_SIZE << crate::page::order_of_state(d.load());
        self.large_bytes.fetch_add(bytes, Ordering::Relaxed);
        p
    }

    #[cfg(feature = "std")]
    fn alloc_huge(&self, layout: Layout) -> Option<NonNull<u8>> {
        let size = layout.size().checked_next_multiple_of(PAGE_SIZE)?;
        let align = layout.align().max(PAGE_SIZE);
        let p = crate::platform::os_reserve(size, align)?;
        if !self.huge.insert(p as usize, size, 0) {
            // SAFETY: the reservation was just made and nothing refers to it.
            unsafe { crate::platform::os_release(p, size) };
            return None;
        }
        self.huge_live.fetch_add(1, Ordering::Relaxed);
        self.huge_bytes.fetch_add(size, Ordering::Relaxed);
        NonNull::new(p)
    }

    #[inline]
    unsafe fn free(&self, ptr: NonNull<u8>) {
        crate::context::might_wait("Heap::free");
        // SAFETY: forwarded contract.
        unsafe { self.free_in(ptr, Mode::Normal) };
        if !self.released_groups.is_empty() {
            account::drop_released(&self.released_groups);
        }
    }

    #[inline]
    unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in(ptr, Mode::NoLock) };
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
                if cache.accounted {
                    self.uncharge_object(cache, zone, idx, addr);
                }
                match mode {
                    Mode::Normal => cache.free(&self.pages, self.cpu(), addr),
                    Mode::NoLock => cache.free_nolock(&self.pages, self.cpu(), addr),
                }
            }
            Kind::Large(zone, idx, order) => {
                self.unmark_large(zone, idx, order);
                // SAFETY: a live large allocation of this order (classify).
                unsafe { self.pages.free_pages_in(ptr, order, mode) }
            }
            #[cfg(feature = "std")]
            Kind::Huge(_) => self.free_huge(addr, mode),
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
        let g = d.freelist.swap(0, Ordering::AcqRel);
        self.uncharge(g, PAGE_SIZE << order);
        d.owner.store(0, Ordering::Release);
        self.large_live.fetch_sub(1, Ordering::Relaxed);
        self.large_bytes
            .fetch_sub(PAGE_SIZE << order, Ordering::Relaxed);
    }

    /// Unregisters a huge allocation and unmaps it; the nolock path parks
    /// it instead (munmap can block): the link and size go in the mapping's
    /// first two words, and the maintainer is woken.
    #[cfg(feature = "std")]
    fn free_huge(&self, addr: usize, mode: Mode) {
        let Some((size, group)) = self.huge.remove(addr) else {
            self.bad_free(
                addr,
                ", which is not a live allocation of this heap (double free?)",
            )
        };
        self.huge_live.fetch_sub(1, Ordering::Relaxed);
        self.huge_bytes.fetch_sub(size, Ordering::Relaxed);
        self.uncharge(group, size);
        match mode {
            // SAFETY: a registered huge allocation, now unregistered, so
            // nothing else will release it.
            Mode::Normal => unsafe { crate::platform::os_release(addr as *mut u8, size) },
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

    #[inline]
    fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.alloc_nolock_from(layout, 0)
    }

    #[inline]
    fn alloc_nolock_from(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let cpu = self.cpu();
                let r = match self.cache(base + c).alloc_nolock(&self.pages, cpu) {
                    Err(Fail::Busy) => match class::next_class(c, layout.align()) {
                        // Re-entered this class everywhere: the next class up.
                        Some(n) => self.cache(base + n).alloc_nolock(&self.pages, cpu),
                        None => Err(Fail::Busy),
                    },
                    r => r,
                };
                match r {
                    Ok(obj) => Some(self.hand_out(obj)),
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
            Some(order) if order <= NOLOCK_MAX_ORDER => {
                match self.pages.alloc_pages_nolock_why(order) {
                    Ok(p) => {
                        self.nolock_large_ok.fetch_add(1, Ordering::Relaxed);
                        Some(self.mark_large(p))
                    }
                    Err(f) => self.count_fail(f),
                }
            }
            _ => self.count_fail(Fail::Empty),
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
            // SAFETY: the mapping was unregistered by free_nolock; only this
            // drain (which took the whole stack) releases it.
            unsafe { crate::platform::os_release(a as *mut u8, size) };
            a = next;
        }
    }

    // ----- accounting --------------------------------------------------------------

    fn alloc_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc_in");
        if !self.released_groups.is_empty() {
            account::drop_released(&self.released_groups);
        }
        if let Some(p) = self.try_alloc_in(layout, group, false) {
            return Some(p);
        }
        // Over a limit or out of memory: reclaim once, then retry.
        let mut g = Some(&**group);
        while let Some(x) = g {
            x.flush_stocks();
            g = x.parent_group();
        }
        self.reclaim();
        self.try_alloc_in(layout, group, false)
    }

    fn alloc_nolock_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        self.try_alloc_in(layout, group, true)
    }

    /// Allocates from the accounted caches (or pages, or mmap), charges the
    /// usable size to `group`, and records the group with the memory.
    fn try_alloc_in(
        &self,
        layout: Layout,
        group: &Arc<Group>,
        nolock: bool,
    ) -> Option<NonNull<u8>> {
        #[cfg(feature = "std")]
        let is_huge = class::class_for(layout.size(), layout.align()).is_none()
            && large_order(layout).is_none();
        #[cfg(feature = "std")]
        if is_huge && !nolock {
            return self.alloc_huge_in(layout, group);
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
        if !group.try_charge(bytes, cpu) {
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
                self.fail_empty.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        slot.store(account::retain(group), Ordering::Release);
        Some(p)
    }

    #[cfg(feature = "std")]
    fn alloc_huge_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
        let size = layout.size().checked_next_multiple_of(PAGE_SIZE)?;
        if !group.try_charge(size, self.cpu()) {
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
        self.drain();
    }

    fn run_shrinkers(&self) {
        self.reclaims.fetch_add(1, Ordering::Relaxed);
        let list: Vec<Shrinker> = self.shrinkers.with(|l| l.clone());
        for s in list {
            let freed = s(RECLAIM_BYTES);
            self.shrinker_freed
                .fetch_add(freed as u64, Ordering::Relaxed);
        }
    }

    fn drain(&self) {
        crate::context::might_wait("Heap::drain");
        let _serial = self.maint_lock.lock(self.pages.platform());
        for i in 0..CACHES {
            self.cache(i).drain(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        account::drop_released(&self.released_groups);
        self.pages.drain();
    }

    /// One maintenance pass at `epoch`: free blocks idle for `idle_epochs`
    /// epochs go back to the OS, caches unchanged for `idle_passes` passes
    /// go back to the slabs and the page allocator.
    pub(crate) fn maintain_pass(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) {
        let serial = self.maint_lock.lock(self.pages.platform());
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

    /// Wakes the maintenance thread (any context).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn wake_maintainer(&self) {
        self.pages.wake_maintainer();
    }

    /// The maintainer's quick duty after a wake: deferred frees only.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn drain_deferred_only(&self) {
        let _serial = self.maint_lock.lock(self.pages.platform());
        for i in 0..CACHES {
            self.cache(i).drain_deferred(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        for zone in self.pages.zones() {
            let g = zone.lock.lock(zone.platform());
            zone.drain_deferred(&g);
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
                if addr % PAGE_SIZE != 0 {
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
        match self.classify(addr) {
            Some(k @ Kind::Object(cache, zone, idx)) => {
                cache.validate(&self.pages, zone, idx, addr);
                k
            }
            Some(k) => k,
            None if self.pages.contains(addr) => self.bad_free(
                addr,
                ", which is not a live object of this heap (its page is not owned by a cache: double free or interior pointer?)",
            ),
            None => self.bad_free(addr, ", which is outside the heap's memory"),
        }
    }

    #[cold]
    fn bad_free(&self, addr: usize, why: &str) -> ! {
        self.pages.fatal(
            FatalMessage::new()
                .text("anyalloc: free of ")
                .hex(addr)
                .text(why),
        )
    }

    fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        match self.classify_or_abort(ptr.as_ptr() as usize) {
            Kind::Object(cache, _, _) => cache.size(),
            Kind::Large(_, _, order) => PAGE_SIZE << order,
            #[cfg(feature = "std")]
            Kind::Huge(size) => size,
        }
    }

    fn stats(&self) -> HeapStats {
        let mut s = HeapStats {
            classes: [ClassStats::default(); CLASSES],
            objects_in_use: 0,
            large_in_use: self.large_live.load(Ordering::Relaxed),
            huge_in_use: self.huge_live.load(Ordering::Relaxed),
            large_bytes: self.large_bytes.load(Ordering::Relaxed),
            huge_bytes: self.huge_bytes.load(Ordering::Relaxed),
            nolock_alloc_ok: self.nolock_large_ok.load(Ordering::Relaxed),
            nolock_alloc_fail_busy: self.fail_busy.load(Ordering::Relaxed),
            nolock_alloc_fail_empty: self.fail_empty.load(Ordering::Relaxed),
            nolock_free_deferred: 0,
            reclaims: self.reclaims.load(Ordering::Relaxed),
            shrinker_freed_bytes: self.shrinker_freed.load(Ordering::Relaxed),
            maintenance_passes: self.passes.load(Ordering::Relaxed),
            released_to_os_bytes: self.released_bytes.load(Ordering::Relaxed),
            pages: self.pages.stats(),
        };
        for i in 0..CACHES {
            let cache = self.cache(i);
            let cs = cache.stats();
            let c = &mut s.classes[i % CLASSES];
            c.size = cs.size;
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
        s
    }

    /// Lock order: maintenance, cache nodes, then the page allocator's
    /// (drain, growth, zones).
    #[cfg(feature = "std")]
    fn lock_all(&self) {
        self.maint_lock.lock_raw(self.pages.platform());
        for i in 0..CACHES {
            self.cache(i).lock_node_raw(&self.pages);
        }
        self.pages.lock_all();
    }

    #[cfg(feature = "std")]
    unsafe fn unlock_all(&self) {
        // SAFETY: per the caller (Heap::unlock_all).
        unsafe { self.pages.unlock_all() };
        for i in 0..CACHES {
            // SAFETY: per the caller.
            unsafe { self.cache(i).unlock_node_raw(&self.pages) };
        }
        // SAFETY: per the caller.
        unsafe { self.maint_lock.force_unlock(self.pages.platform()) };
    }
}

/// The page order serving a large request, or `None` beyond MAX_ORDER.
fn large_order(layout: Layout) -> Option<u32> {
    let bytes = layout.size().max(layout.align()).max(1);
    let pages = bytes.div_ceil(PAGE_SIZE).next_power_of_two();
    let order = pages.trailing_zeros();
    (order <= MAX_ORDER).then_some(order)
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
        self.maintainer.stop(self.core());
        let core = self.core();
        #[cfg(feature = "std")]
        core.drain_huge_deferred();
        account::drop_released(&core.released_groups);
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
