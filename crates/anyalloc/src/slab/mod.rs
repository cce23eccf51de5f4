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
//! deferred stack when every lock is held). When every slot of a class is
//! busy, a nolock allocation retries once in the next larger class, as
//! upstream's `kmalloc_nolock` does.
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

pub mod cache;
mod class;
#[cfg(feature = "std")]
mod huge;

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::config::{Config, Error};
use crate::page::{Fail, PageAllocator, PageStats, Zone};
use crate::platform::FatalMessage;
use crate::{MAX_ORDER, NOLOCK_MAX_ORDER, PAGE_SIZE};
pub use cache::ClassStats;
use cache::{cache_meta_bytes, Cache};
pub(crate) use class::CLASSES;

/// `owner` of the head page of a large (page-backed) allocation.
const LARGE_OWNER: u16 = u16::MAX;

/// A snapshot of a heap's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Per size class, smallest first.
    pub classes: [ClassStats; CLASSES],
    /// Small objects in use, over all classes.
    pub objects_in_use: usize,
    /// Large (page-backed) allocations in use.
    pub large_in_use: usize,
    /// Huge (mmap'd) allocations in use.
    pub huge_in_use: usize,
    /// Successful nolock allocations.
    pub nolock_alloc_ok: u64,
    /// Nolock allocations that failed because every lock they needed was held.
    pub nolock_alloc_fail_busy: u64,
    /// Nolock allocations that failed for lack of memory above the watermark
    /// (or because the request is too large for the nolock path).
    pub nolock_alloc_fail_empty: u64,
    /// Nolock frees parked on a deferred stack.
    pub nolock_free_deferred: u64,
    /// The page allocator underneath.
    pub pages: PageStats,
}

/// What a freed pointer is.
enum Kind<'a> {
    Object(&'a Cache, &'a Zone, u32),
    Large(u32),
    #[cfg(feature = "std")]
    Huge(usize),
}

/// The object allocator. See the module documentation.
pub struct Heap {
    pages: PageAllocator,
    caches: *const Cache,
    #[cfg(feature = "std")]
    huge: huge::HugeTable,
    #[cfg(feature = "std")]
    huge_deferred: crate::sync::IndexStack,
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    meta: (usize, usize),
    large_live: AtomicUsize,
    huge_live: AtomicUsize,
    nolock_large_ok: AtomicU64,
    fail_busy: AtomicU64,
    fail_empty: AtomicU64,
}

// SAFETY: the caches the raw pointer refers to are shared only through
// atomics and the locks documented in `cache`.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}

impl core::fmt::Debug for Heap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

fn meta_layout(cpus: usize) -> (usize, usize, usize) {
    let caches = (CLASSES * core::mem::size_of::<Cache>()).next_multiple_of(64);
    let per_cache = cache_meta_bytes(cpus).next_multiple_of(64);
    #[cfg(feature = "std")]
    let huge = huge::HugeTable::BYTES;
    #[cfg(not(feature = "std"))]
    let huge = 0;
    (caches, per_cache, caches + CLASSES * per_cache + huge)
}

impl Heap {
    /// Creates a heap over a new [`PageAllocator`] configured by `config`.
    #[cfg(feature = "std")]
    pub fn new(config: Config) -> Result<Heap, Error> {
        let pages = PageAllocator::new(config)?;
        let (_, _, len) = meta_layout(pages.cpus());
        let len = len.next_multiple_of(PAGE_SIZE);
        let meta =
            crate::platform::os_reserve(len, PAGE_SIZE).ok_or(Error::Reserve { bytes: len })?;
        // SAFETY: `meta` is a fresh, zero-filled, page-aligned reservation of
        // `len` bytes that only this heap uses.
        Ok(unsafe { Self::build(pages, meta, (meta as usize, len)) })
    }

    /// Creates a heap over an embedder's memory region (`no_std`): the heap's
    /// metadata is carved from the start of the region, the rest becomes the
    /// page allocator's zone.
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
        let (_, _, meta_len) = meta_layout(cpus);
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
    /// `meta` is 64-aligned, zero-filled, `meta_layout(cpus).2` bytes long,
    /// and lives (unused by others) as long as the heap.
    unsafe fn build(pages: PageAllocator, meta: *mut u8, mapping: (usize, usize)) -> Heap {
        let cpus = pages.cpus();
        let (caches_len, per_cache, _) = meta_layout(cpus);
        let caches = meta as *mut Cache;
        for c in 0..CLASSES {
            // SAFETY: cache `c` and its slot/sheaf area lie inside `meta`
            // (meta_layout), suitably aligned and zeroed.
            unsafe { Cache::init(caches.add(c), c, cpus, meta.add(caches_len + c * per_cache)) };
        }
        Heap {
            pages,
            caches,
            #[cfg(feature = "std")]
            // SAFETY: the table's bytes are the zeroed tail of `meta`.
            huge: unsafe { huge::HugeTable::new(meta.add(caches_len + CLASSES * per_cache)) },
            #[cfg(feature = "std")]
            huge_deferred: crate::sync::IndexStack::new(),
            meta: mapping,
            large_live: AtomicUsize::new(0),
            huge_live: AtomicUsize::new(0),
            nolock_large_ok: AtomicU64::new(0),
            fail_busy: AtomicU64::new(0),
            fail_empty: AtomicU64::new(0),
        }
    }

    /// The page allocator underneath (its memory is shared with the heap).
    pub fn pages(&self) -> &PageAllocator {
        &self.pages
    }

    #[inline]
    fn cache(&self, c: usize) -> &Cache {
        debug_assert!(c < CLASSES);
        // SAFETY: `caches` has CLASSES initialised entries (build) that live
        // as long as the heap.
        unsafe { &*self.caches.add(c) }
    }

    #[inline]
    fn cpu(&self) -> usize {
        self.pages.platform().cpu_id()
    }

    // ----- normal path -----------------------------------------------------------

    /// Allocates memory for `layout` (any power-of-two alignment; objects up
    /// to 8 KiB come from size classes). Normal context: may wait on a lock,
    /// reclaim and grow. `None` when memory is exhausted.
    #[inline]
    pub fn alloc(&self, layout: Layout) -> Option<NonNull<u8>> {
        crate::context::might_wait("Heap::alloc");
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let obj = self.cache(c).alloc(&self.pages, self.cpu())?;
                Some(self.hand_out(obj))
            }
            None => self.alloc_large(layout),
        }
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

    fn large_order(layout: Layout) -> Option<u32> {
        let bytes = layout.size().max(layout.align()).max(1);
        let pages = bytes.div_ceil(PAGE_SIZE).next_power_of_two();
        let order = pages.trailing_zeros();
        (order <= MAX_ORDER).then_some(order)
    }

    #[cold]
    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        match Self::large_order(layout) {
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
        zone.desc(idx).owner.store(LARGE_OWNER, Ordering::Release);
        self.large_live.fetch_add(1, Ordering::Relaxed);
        p
    }

    #[cfg(feature = "std")]
    fn alloc_huge(&self, layout: Layout) -> Option<NonNull<u8>> {
        let size = layout.size().checked_next_multiple_of(PAGE_SIZE)?;
        let align = layout.align().max(PAGE_SIZE);
        let p = crate::platform::os_reserve(size, align)?;
        if !self.huge.insert(p as usize, size) {
            // SAFETY: the reservation was just made and nothing refers to it.
            unsafe { crate::platform::os_release(p, size) };
            return None;
        }
        self.huge_live.fetch_add(1, Ordering::Relaxed);
        NonNull::new(p)
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
        crate::context::might_wait("Heap::free");
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort(addr) {
            Kind::Object(cache, _zone, _idx) => {
                #[cfg(feature = "debug-checks")]
                cache.mark(&self.pages, _zone, _idx, addr, false);
                cache.free(&self.pages, self.cpu(), addr);
            }
            Kind::Large(order) => {
                self.unmark_large(addr);
                // SAFETY: a live large allocation of this order (classify).
                unsafe { self.pages.free_pages(ptr, order) };
            }
            #[cfg(feature = "std")]
            Kind::Huge(_) => self.free_huge(addr),
        }
    }

    fn unmark_large(&self, addr: usize) {
        let (_, zone, idx) = self.pages.locate_known(addr);
        zone.desc(idx).owner.store(0, Ordering::Release);
        self.large_live.fetch_sub(1, Ordering::Relaxed);
    }

    #[cfg(feature = "std")]
    fn free_huge(&self, addr: usize) {
        match self.huge.remove(addr) {
            Some(size) => {
                self.huge_live.fetch_sub(1, Ordering::Relaxed);
                // SAFETY: a registered huge allocation, now unregistered, so
                // nothing else will release it.
                unsafe { crate::platform::os_release(addr as *mut u8, size) };
            }
            None => self.bad_free(
                addr,
                ", which is not a live allocation of this heap (double free?)",
            ),
        }
    }

    // ----- nolock path -----------------------------------------------------------

    /// Allocates from any context: only `try_lock`s, never waits, never
    /// makes a syscall, never grows the heap. Large requests are served up to
    /// [`NOLOCK_MAX_ORDER`] pages (32 KiB). `None` means "no memory for you
    /// in this context now".
    #[inline]
    pub fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        match class::class_for(layout.size(), layout.align()) {
            Some(c) => {
                let cpu = self.cpu();
                let r = match self.cache(c).alloc_nolock(&self.pages, cpu) {
                    Err(Fail::Busy) => match class::next_class(c, layout.align()) {
                        // Re-entered this class everywhere: the next class up.
                        Some(n) => self.cache(n).alloc_nolock(&self.pages, cpu),
                        None => Err(Fail::Busy),
                    },
                    r => r,
                };
                match r {
                    Ok(obj) => Some(self.hand_out(obj)),
                    Err(f) => self.count_fail(f),
                }
            }
            None => match Self::large_order(layout) {
                Some(order) if order <= NOLOCK_MAX_ORDER => {
                    match self.pages.alloc_pages_nolock(order) {
                        Some(p) => {
                            self.nolock_large_ok.fetch_add(1, Ordering::Relaxed);
                            Some(self.mark_large(p))
                        }
                        None => self.count_fail(Fail::Empty),
                    }
                }
                _ => self.count_fail(Fail::Empty),
            },
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

    /// Frees any object of this heap from any context. Never waits, never
    /// fails: what cannot take a lock is parked on a deferred stack.
    ///
    /// # Safety
    /// As for [`free`](Self::free).
    pub unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort(addr) {
            Kind::Object(cache, _zone, _idx) => {
                #[cfg(feature = "debug-checks")]
                cache.mark(&self.pages, _zone, _idx, addr, false);
                cache.free_nolock(&self.pages, self.cpu(), addr);
            }
            Kind::Large(order) => {
                self.unmark_large(addr);
                // SAFETY: a live large allocation of this order (classify).
                unsafe { self.pages.free_pages_nolock(ptr, order) };
            }
            #[cfg(feature = "std")]
            Kind::Huge(_) => match self.huge.remove(addr) {
                Some(size) => {
                    self.huge_live.fetch_sub(1, Ordering::Relaxed);
                    // munmap can block: park it; the link and size go in the
                    // mapping's first two words (it is ours now).
                    // SAFETY: the mapping is at least a page, writable, and no
                    // longer registered, so nothing else uses it.
                    unsafe { (addr as *mut usize).add(1).write(size) };
                    self.huge_deferred.push(addr, |a, next| {
                        // SAFETY: as above.
                        unsafe { (a as *mut usize).write(next) }
                    });
                }
                None => self.bad_free(
                    addr,
                    ", which is not a live allocation of this heap (double free?)",
                ),
            },
        }
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

    // ----- lookup --------------------------------------------------------------

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
                return Some(Kind::Large(order));
            }
            return Some(Kind::Object(self.cache(owner as usize - 1), zone, idx));
        }
        #[cfg(feature = "std")]
        if let Some(size) = self.huge.size_of(addr) {
            return Some(Kind::Huge(size));
        }
        None
    }

    #[inline]
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

    /// How many bytes the allocation at `ptr` can use (at least the size it
    /// was asked for). Aborts like [`free`](Self::free) if `ptr` is not a
    /// live allocation of this heap.
    pub fn usable_size(&self, ptr: NonNull<u8>) -> usize {
        match self.classify_or_abort(ptr.as_ptr() as usize) {
            Kind::Object(cache, _, _) => cache.size(),
            Kind::Large(order) => PAGE_SIZE << order,
            #[cfg(feature = "std")]
            Kind::Huge(size) => size,
        }
    }

    // ----- maintenance -----------------------------------------------------------

    /// Normal context: every cached and deferred object back to its slab,
    /// every empty slab back to the page allocator, then the page
    /// allocator's own drain. With nothing allocated, every page is free
    /// in the buddy lists afterwards.
    pub fn drain(&self) {
        crate::context::might_wait("Heap::drain");
        for c in 0..CLASSES {
            self.cache(c).drain(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        self.pages.drain();
    }

    /// Fork support: takes every lock that can be waited on (cache nodes,
    /// then the page allocator's), in lock order. Normal context.
    #[cfg(feature = "std")]
    pub(crate) fn lock_all(&self) {
        for c in 0..CLASSES {
            self.cache(c).lock_node_raw(&self.pages);
        }
        self.pages.lock_all();
    }

    /// Releases what [`lock_all`](Self::lock_all) took.
    ///
    /// # Safety
    /// `lock_all` was called (here or in the parent of this forked child) and
    /// not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all(&self) {
        // SAFETY: per the caller.
        unsafe { self.pages.unlock_all() };
        for c in 0..CLASSES {
            // SAFETY: per the caller.
            unsafe { self.cache(c).unlock_node_raw(&self.pages) };
        }
    }

    /// Allocates zeroed memory; skips the zeroing for fresh `mmap` memory,
    /// which the OS zeroed. Normal context.
    pub fn alloc_zeroed(&self, layout: Layout) -> Option<NonNull<u8>> {
        let p = self.alloc(layout)?;
        #[cfg(feature = "std")]
        if class::class_for(layout.size(), layout.align()).is_none()
            && Self::large_order(layout).is_none()
        {
            return Some(p); // huge: a fresh mapping, zero-filled by the OS
        }
        // SAFETY: `p` is a fresh allocation of at least `layout.size()` bytes.
        unsafe { core::ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
        Some(p)
    }

    /// A snapshot of the heap's counters; see [`HeapStats`].
    pub fn stats(&self) -> HeapStats {
        let mut s = HeapStats {
            classes: [ClassStats::default(); CLASSES],
            objects_in_use: 0,
            large_in_use: self.large_live.load(Ordering::Relaxed),
            huge_in_use: self.huge_live.load(Ordering::Relaxed),
            nolock_alloc_ok: self.nolock_large_ok.load(Ordering::Relaxed),
            nolock_alloc_fail_busy: self.fail_busy.load(Ordering::Relaxed),
            nolock_alloc_fail_empty: self.fail_empty.load(Ordering::Relaxed),
            nolock_free_deferred: 0,
            pages: self.pages.stats(),
        };
        for c in 0..CLASSES {
            let cache = self.cache(c);
            s.classes[c] = cache.stats();
            s.objects_in_use += s.classes[c].objects_in_use;
            s.nolock_alloc_ok += cache.nolock_ok();
            s.nolock_alloc_fail_busy += cache.fail_busy.load(Ordering::Relaxed);
            s.nolock_alloc_fail_empty += cache.fail_empty.load(Ordering::Relaxed);
            s.nolock_free_deferred += cache.free_deferred.load(Ordering::Relaxed);
        }
        s
    }
}

impl Drop for Heap {
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        {
            self.drain_huge_deferred();
            if self.meta.1 != 0 {
                // SAFETY: the metadata reservation made in `new`; the heap is
                // going away, so nothing uses it any more.
                unsafe { crate::platform::os_release(self.meta.0 as *mut u8, self.meta.1) };
            }
        }
    }
}
