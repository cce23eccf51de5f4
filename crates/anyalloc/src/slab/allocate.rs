//! The heap's allocations: the routed normal path (the class fast path,
//! the general path, misses and the retry after reclaim, allocations made
//! inside a fork window), large and huge blocks, and the nolock path.
//!
//! Every allocation starts on the fast path of its class (an rseq pop from
//! this CPU's sheaf, or the slot try-lock of the fallback); only what that
//! cannot serve reaches the out-of-line functions here, which read the
//! thread's context to decide between the normal and the nolock slow path.

use super::*;

impl HeapCore {
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
    pub(super) fn alloc_by_class<const NOLOCK: bool>(&self, layout: Layout) -> Option<NonNull<u8>> {
        // The table gives the owner tag (see `class::ClassTables`).
        if let Some(k) = self.tables().tag_fast(layout.size(), layout.align()) {
            if k < cache::FIRST_KEYED_TAG {
                return self.alloc_tiny::<NOLOCK>(k);
            }
            return self.alloc_in_cache::<NOLOCK>(k);
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
    pub(super) fn alloc_tiny<const NOLOCK: bool>(&self, tag: usize) -> Option<NonNull<u8>> {
        self.alloc_in_cache::<NOLOCK>(tag)
    }

    /// The allocation fast path for the plain cache whose owner tag is
    /// `tag`: this CPU's main sheaf, or one tail call to the general path
    /// of the mode.
    #[inline(always)]
    pub(super) fn alloc_in_cache<const NOLOCK: bool>(&self, tag: usize) -> Option<NonNull<u8>> {
        let (cache, base, idx) = self.cache_at(tag);
        // SAFETY: `cache_at` names `cache`.
        if let Some(obj) = unsafe { Cache::seq_pop_at::<NOLOCK>(base, idx) } {
            cache.clear_free_mark_of(obj, tag);
            return Some(self.handed_out(obj));
        }
        self.alloc_class_general::<NOLOCK>(cache)
    }

    /// The general path of the mode for a request that `cache`'s class
    /// serves. Taking only the cache (at hand in a register) keeps the
    /// caller's layout out of the registers the fast path needs across its
    /// sequence.
    ///
    /// A normal allocation with rseq goes straight to the cache's slow path:
    /// its sequence just missed, and the general path would find the class
    /// again from a layout and run the sequence once more first. (Without
    /// rseq the general path runs the try-locked fast path.)
    #[inline(never)]
    pub(super) fn alloc_class_general<const NOLOCK: bool>(
        &self,
        cache: &Cache,
    ) -> Option<NonNull<u8>> {
        let c = cache.class();
        if !NOLOCK && cache.uses_rseq() {
            let served = cache
                .alloc_slow(&self.pages, self.pages.cpu())
                .map(|o| self.hand_out(cache, o));
            return self.after_normal_slow(served, class::layout_of(c));
        }
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
    /// (`seq_alloc_heap`), then the same in the zones growth added.
    #[inline(never)]
    pub(super) fn alloc_general(&self, layout: Layout) -> Option<NonNull<u8>> {
        if layout.size() > class::MAX_SMALL {
            if let Some(o) = large_order(layout) {
                if let Some((p, d)) = self.pages.seq_alloc_heap(o) {
                    return Some(mark_large_at(p, d));
                }
                if let Some((p, d)) = self.pages.seq_alloc_heap_grown(o) {
                    return Some(mark_large_at(p, d));
                }
            }
        }
        self.after_normal_slow(self.alloc_once(layout, 0), layout)
    }

    /// The end of a normal allocation's slow path, `served` or not: the
    /// reclaim its page allocations asked for (see `alloc_general`), or
    /// [`alloc_miss`](Self::alloc_miss) for `layout`.
    #[inline(always)]
    fn after_normal_slow(
        &self,
        served: Option<NonNull<u8>>,
        layout: Layout,
    ) -> Option<NonNull<u8>> {
        match served {
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
    pub(super) fn alloc_miss(&self, layout: Layout) -> Option<NonNull<u8>> {
        if crate::context::nested() {
            return self.alloc_nolock(layout);
        }
        if never_served(layout) {
            return None;
        }
        let p = self.retry_after_miss(
            layout,
            None,
            || {
                self.pages.take_reclaim_request();
                self.reclaim();
            },
            || self.alloc_once(layout, 0),
        );
        #[cfg(feature = "std")]
        if p.is_none() && crate::fork::orphaned() {
            return self.alloc_orphaned(layout, None);
        }
        p
    }

    /// A normal allocation (into `group`, if any) that missed in a process
    /// that may hold orphaned locks (the `fork` module's "Orphaned
    /// locks"): a lock it gave way to may never be released here (a zone's,
    /// or the growth lock, so the heap cannot grow). What the nolock path
    /// serves; else the block is mapped beside the heap and registered like
    /// a huge block, as during a stalled fork (`HeapStats::fork_mapped`),
    /// while the huge table has room. `None` only when memory or the
    /// table ran out, or the group's limit refuses it.
    #[cfg(feature = "std")]
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_orphaned(
        &self,
        layout: Layout,
        group: Option<&Arc<Group>>,
    ) -> Option<NonNull<u8>> {
        let p = match group {
            None => self.alloc_nolock(layout),
            Some(g) => self.alloc_nolock_in(layout, g),
        };
        if p.is_some() {
            return p;
        }
        let p = match group {
            None => self.alloc_huge(layout),
            Some(g) => self.alloc_huge_in(layout, g, true),
        };
        if p.is_some() {
            self.fork_mapped.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    /// A normal allocation's last attempts after a miss (into `group`, if
    /// any): reclaim once, then `attempt` again, around other threads'
    /// forks. Reclaim runs only in an attempt that starts with no fork in
    /// progress: during a fork every allocation misses, the miss is most
    /// likely the fork's, and the shrinkers would give back memory for
    /// nothing. An attempt that failed while a fork held the locks at any
    /// time during it (it may have given way) goes on in
    /// `alloc_while_forking`, and is tried again once the fork has ended.
    pub(super) fn retry_after_miss(
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
    /// 3. else wait for the fork longer, at most `FORK_PATIENCE_LAST`
    ///    (not at all once such a wait for the same fork ran out): `None`
    ///    when it ended;
    /// 4. else map the block beside the heap with the rest of the table,
    ///    or fail (`Some(None)`).
    ///
    /// The nolock path only once the fork is stalled: an allocation in
    /// progress on a nolock level's sheaf at the clone would leave that
    /// slot held, and its objects out of reach, in the child.
    #[cfg(feature = "std")]
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_while_forking(
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
        if crate::fork::wait_for_fork_last() {
            return None;
        }
        Some(beside())
    }

    /// The forks in progress before a normal-path attempt, for
    /// [`fork_gave_way`](Self::fork_gave_way) (without std: no fork).
    #[inline]
    pub(super) fn fork_mark() -> ForkMark {
        #[cfg(feature = "std")]
        return crate::fork::fork_mark();
        #[cfg(not(feature = "std"))]
        ForkMark
    }

    /// Whether a `fork` on another thread held (or was taking) the locks
    /// when `mark` was taken.
    #[inline]
    pub(super) fn forking(mark: ForkMark) -> bool {
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
    pub(super) fn fork_gave_way(mark: ForkMark) -> bool {
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
    pub(super) fn reclaim_requested_now(&self) {
        if !crate::context::nested() && self.pages.take_reclaim_request() {
            self.reclaim();
        }
    }

    /// One normal allocation attempt from cache set `base` (0: plain,
    /// CLASSES: accounted).
    #[inline]
    pub(super) fn alloc_once(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
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
        #[cfg(feature = "std")]
        if class::class_for(layout.size(), layout.align()).is_none()
            && large_order(layout).is_none()
            && !crate::context::nested()
        {
            // Huge: a fresh mapping, which the OS zeroed, or a kept one,
            // which is zeroed here. (Should that fail, the general path
            // below zeroes whatever it finds.)
            self.drain_huge_deferred();
            if let Some(p) = self.alloc_huge_zeroed(layout, true) {
                return Some(p);
            }
        }
        let p = self.alloc(layout)?;
        // SAFETY: `p` is a fresh allocation of at least `layout.size()` bytes.
        unsafe { core::ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
        Some(p)
    }

    #[inline(always)]
    pub(super) fn hand_out(&self, cache: &Cache, obj: usize) -> NonNull<u8> {
        cache.clear_free_mark(obj);
        self.handed_out(obj)
    }

    /// `hand_out` after the key word was cleared.
    #[inline(always)]
    pub(super) fn handed_out(&self, obj: usize) -> NonNull<u8> {
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
    pub(super) fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
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

    pub(super) fn mark_large(&self, p: NonNull<u8>) -> NonNull<u8> {
        let (_, zone, idx) = self.pages.locate_known(p.as_ptr() as usize);
        mark_large_at(p, zone.desc(idx))
    }

    #[cfg(feature = "std")]
    pub(super) fn alloc_huge(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.alloc_huge_zeroed(layout, false)
    }

    /// `alloc_huge`, its memory zeroed if `zero` (a fresh mapping is, a
    /// kept one is zeroed here). The block may be a kept mapping of up to
    /// twice the size asked for (see `huge_map`).
    #[cfg(feature = "std")]
    pub(super) fn alloc_huge_zeroed(&self, layout: Layout, zero: bool) -> Option<NonNull<u8>> {
        let size = huge_size(layout)?;
        let align = layout.align().max(PAGE_SIZE);
        // A kept mapping comes whole while the block stays more than half
        // used: at most twice the bytes asked for (see `huge_map`).
        let whole = layout.size().saturating_mul(2);
        let (p, len) = self.huge_map(size, align, zero, whole)?;
        // From the insert to the count, inside the allocator (see
        // `HugeCountWindow`).
        let window = HugeCountWindow::enter();
        if !self.huge.insert(p as usize, len, 0) {
            drop(window);
            // SAFETY: the mapping was just made (or taken) and nothing
            // refers to it.
            unsafe { self.huge_unmap(p as usize, len) };
            return None;
        }
        crate::interrupt_point!(HugeCount);
        self.huge_live.fetch_add(1, Ordering::Relaxed);
        self.huge_bytes.fetch_add(len, Ordering::Relaxed);
        drop(window);
        self.pages.decay_tick();
        NonNull::new(p)
    }

    // ----- nolock path -----------------------------------------------------------

    #[inline(always)]
    pub(crate) fn alloc_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        self.alloc_by_class::<true>(layout)
    }

    /// `alloc_nolock` beyond its fast path.
    #[inline(never)]
    pub(super) fn alloc_nolock_general(&self, layout: Layout) -> Option<NonNull<u8>> {
        // A large block goes straight to the large path (as
        // `alloc_nolock_from` would send it, after a class search that
        // cannot succeed), which tries the page fast path first.
        if layout.size() > class::MAX_SMALL {
            return self.alloc_large_nolock(layout);
        }
        self.alloc_nolock_from(layout, 0)
    }

    #[inline]
    pub(super) fn alloc_nolock_from(&self, layout: Layout, base: usize) -> Option<NonNull<u8>> {
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

    pub(super) fn alloc_large_nolock(&self, layout: Layout) -> Option<NonNull<u8>> {
        match large_order(layout) {
            Some(order) => {
                // The fast path counts the success in this CPU's page slot
                // (no locked instruction); the slow path here.
                if let Some((p, d)) = self.pages.seq_alloc_heap_large(order) {
                    return Some(mark_large_at(p, d));
                }
                if let Some((p, d)) = self.pages.seq_alloc_heap_large_grown(order) {
                    return Some(mark_large_at(p, d));
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
    pub(super) fn count_fail(&self, f: Fail) -> Option<NonNull<u8>> {
        match f {
            Fail::Busy => self.fail_busy.fetch_add(1, Ordering::Relaxed),
            Fail::Empty => self.fail_empty.fetch_add(1, Ordering::Relaxed),
        };
        None
    }
}

/// Marks the new large block `p`, whose head descriptor is `d`, as the
/// heap's: owned by the large blocks, in no accounting group yet.
#[inline]
fn mark_large_at(p: NonNull<u8>, d: &crate::page::PageDesc) -> NonNull<u8> {
    d.freelist.store(0, Ordering::Relaxed); // no group yet
    d.owner.store(LARGE_OWNER, Ordering::Release);
    p
}
