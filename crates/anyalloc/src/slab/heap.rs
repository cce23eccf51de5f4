//! [`Heap`], the handle: its public API (creation, the allocation and free
//! functions of both paths, resizing, accounting, shrinkers, statistics,
//! draining and maintenance), each a thin layer over `HeapCore` (see the
//! module documentation of `slab` for where the state lives).

use super::*;

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
        let barn = BarnSize::for_memory(config.memory_bytes());
        let len = meta_layout(pages.cpus(), barn)
            .total
            .next_multiple_of(PAGE_SIZE);
        let meta =
            crate::platform::os_reserve(len, PAGE_SIZE).ok_or(Error::Reserve { bytes: len })?;
        // SAFETY: `meta` is a fresh, zero-filled, page-aligned reservation of
        // `len` bytes that only this heap uses, laid out for `barn`.
        let heap = unsafe { Self::build(pages, meta, (meta as usize, len), barn) };
        // No maintainer yet: the slow paths give idle memory back until
        // one starts (`Config::decay`).
        heap.core().decays.store(config.decay, Ordering::Relaxed);
        heap.set_decay(config.decay);
        Ok(heap)
    }

    /// Installs (`on`) or removes the inline decay of a heap that no
    /// maintainer serves (`Config::decay`).
    #[cfg(feature = "std")]
    fn set_decay(&self, on: bool) {
        self.core().install_decay(on);
    }

    /// Creates a heap over an embedder's memory region (`no_std`): the heap's
    /// metadata is carved from the start of the region, the rest becomes the
    /// page allocator's zone. There is no maintenance thread: call
    /// [`maintain`](Self::maintain) from a deferred context. Its caches'
    /// barns are the smallest, whatever the region's size (16 sheaves and
    /// 256 KiB of free objects each, see
    /// [`ClassStats::barn_capacity`](crate::ClassStats::barn_capacity)):
    /// their sheaves are metadata, which the region pays for.
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
        // The smallest barn: its sheaves come out of the region (zeroed
        // here), not out of address space that stays untouched until used.
        let barn = BarnSize::MIN;
        let meta_len = meta_layout(cpus, barn).total;
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
            Ok(Self::build(pages, start as *mut u8, (0, 0), barn))
        }
    }

    /// # Safety
    /// `meta` is page-aligned, zero-filled, `meta_layout(cpus, barn).total` bytes long,
    /// and lives (unused by others) as long as the heap. The caches' fast
    /// path follows the page allocator's choice (restartable sequences or
    /// not).
    pub(super) unsafe fn build(
        pages: PageAllocator,
        meta: *mut u8,
        mapping: (usize, usize),
        barn: BarnSize,
    ) -> Heap {
        // Every cache's fast path runs its sequences, rseq or not (see
        // `sync::rseq::prepare_offset`).
        crate::sync::rseq::prepare_offset();
        let cpus = pages.cpus();
        let rseq_off = pages.rseq_off();
        let m = meta_layout(cpus, barn);
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
                        barn,
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
            #[cfg(feature = "std")]
            huge_cache: huge_cache::HugeCache::new(),
            #[cfg(feature = "std")]
            huge_maps: AtomicU64::new(0),
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
            #[cfg(feature = "std")]
            decay_epoch: AtomicU64::new(0),
            #[cfg(feature = "std")]
            decays: core::sync::atomic::AtomicBool::new(false),
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
        // Only the call that made the thread switches the inline decay off:
        // one that found another call's start in progress would leave the
        // heap with neither if that start then failed.
        self.maintainer.start(self.core(), || {
            self.core().pages.set_waker(&self.core().wake);
            // The thread gives idle memory back from now on, not the slow
            // paths (`Config::decay`).
            self.set_decay(false);
        })
    }

    /// In a forked child, before anything else uses the heap: the
    /// maintenance thread stayed in the parent; forget it so that
    /// [`start_maintenance`](Self::start_maintenance) starts a new one.
    /// Returns whether one ran in the parent. (Dropping the heap in the
    /// child needs nothing: it finds the thread was the parent's.) In the
    /// process that started the thread it does nothing and returns
    /// `false`: the thread runs there, and the heap's drop stops it. (Until
    /// a thread starts here, the child's own calls give idle memory back:
    /// `Config::decay`.)
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
        let ran = self.maintainer.forget_if_forked();
        if ran {
            // No thread here: the slow paths give idle memory back until
            // one starts again (`Config::decay`).
            self.set_decay(self.core().decays.load(Ordering::Relaxed));
        }
        ran
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

    /// [`usable_size`](Self::usable_size), its report naming the call
    /// `what` instead: the C library's `realloc` and `malloc_usable_size`
    /// read the usable size first, and a report of a foreign pointer there
    /// should name the function the program called, not this one.
    #[doc(hidden)]
    pub fn usable_size_for(&self, ptr: NonNull<u8>, what: &str) -> usize {
        self.core().usable_size_for(ptr, what)
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

    /// The largest object of a size class that an allocation for `layout`
    /// can be given on any path, or `None` when no class serves the
    /// layout (a page block or a mapping does): its class, or on the nolock
    /// route, when that class is re-entered on every level, the next larger
    /// class that keeps the alignment (the class's own up to 16 bytes: a
    /// 9-byte request may get 32 bytes). At most twice the class's size.
    /// For the C library's size checks.
    ///
    /// ```
    /// use anyalloc::Heap;
    /// use core::alloc::Layout;
    /// let l = Layout::from_size_align(462, 4096).unwrap();
    /// assert_eq!(Heap::largest_object_for(l), Some(8192));
    /// assert_eq!(Heap::largest_object_for(Layout::new::<[u8; 10000]>()), None);
    /// ```
    #[doc(hidden)]
    pub fn largest_object_for(layout: Layout) -> Option<usize> {
        class::largest_for(layout.size(), layout.align())
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
    /// with `mremap`: the pages move, the contents are not copied (a growth
    /// takes at least half the old size more, address space that costs
    /// nothing until touched, so the usable size may exceed `size`). Normal
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
        if new <= crate::page::MAX_BLOCK {
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
        // A growth takes at least half the old size more (address space
        // only: the new pages cost nothing until touched), so that a block
        // grown a little at a time (C's `realloc(p, n + 4096)` in a loop)
        // moves a logarithmic number of times (`Global::realloc` and C's
        // `realloc` keep a huge block in place for a size it holds within
        // a third of it), rather than make an
        // `mremap` and two signal-mask calls per step. If the OS refuses
        // that much, the exact size.
        let grown = if new > old {
            old.saturating_add(old / 2)
                .next_multiple_of(PAGE_SIZE)
                .max(new)
        } else {
            new
        };
        let moved = match group {
            // SAFETY: a registered huge allocation, its entry claimed while it
            // moves: nothing else looks it up or frees it.
            0 => unsafe { crate::platform::os_remap(ptr.as_ptr(), old, grown) }
                .map(|p| (p, grown))
                .or_else(|| {
                    if grown == new {
                        return None;
                    }
                    // SAFETY: as above (the failed call left it untouched).
                    unsafe { crate::platform::os_remap(ptr.as_ptr(), old, new) }.map(|p| (p, new))
                }),
            _ => None,
        };
        // Moved or not, the block goes back in the table: in the claimed
        // entry or a free one before it on the probe path, so it cannot fail.
        let (at, len) = moved.map_or((addr, old), |(p, len)| (p as usize, len));
        let moved = moved.map(|(p, _)| p);
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
    /// While a `fork` on another thread holds the heap's locks, it waits
    /// for that fork at most a second, then returns with the rest of its
    /// work undone: the fork may be waiting for this very thread (a drain
    /// in a signal handler that interrupted the holder of one of the locks
    /// glibc's `fork` takes after its prepare handlers).
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
    /// tests). (With std, a heap without a maintenance thread also gives
    /// idle memory back from its own slow paths: `Config::decay`.) Each call counts as one epoch: memory idle for two calls
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
    /// idle, a bounded number per pass), and so do the freed huge mappings
    /// kept for reuse. Returns the bytes given back: the free blocks' (as
    /// `released_to_os_bytes` counts them) and the kept mappings'. Called by a
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
        // The freed huge mappings kept for reuse first (`drain` would unmap
        // them too, and not say how much).
        let kept = self.core().release_kept_huge();
        self.drain();
        let bytes = self.core().pages.release_free_blocks();
        let released = &self.core().released_bytes;
        released.fetch_add(bytes as u64, Ordering::Relaxed);
        bytes + kept
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
