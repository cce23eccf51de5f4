//! The heap's frees, and the lookup of what a pointer is.
//!
//! `free` is layout-blind (the page descriptor's owner names the cache);
//! `free_sized` is told the layout, which names the cache at once, and the
//! page lookup then only checks it. The page lookup of their fast routes
//! is the first zone's window inline, then (out of line) the zone map of
//! the zones growth added: a few loads either way, never a walk over the
//! zones. Both validate every pointer before it
//! reaches a cache: it must lie in a zone, on a page a cache or the large
//! blocks own, at an object's start, and not be free already (the key word;
//! see the `cache` module). `classify` is the lookup that the general
//! paths, `usable_size` and the reports of bad pointers share.

use super::*;

impl HeapCore {
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
    pub(super) unsafe fn free_by_owner<const NOLOCK: bool>(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_by_owner_in::<NOLOCK, false>(ptr) }
    }

    /// `free_by_owner` for a pointer outside the first zone: the same
    /// route, its page found through the zone map.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(never)]
    unsafe fn free_by_owner_grown<const NOLOCK: bool>(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_by_owner_in::<NOLOCK, true>(ptr) }
    }

    /// The body of `free_by_owner`: the page found in the first zone's
    /// window (else one tail call to `free_by_owner_grown`), or with
    /// `GROWN` in the zone map (else the general path).
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(always)]
    unsafe fn free_by_owner_in<const NOLOCK: bool, const GROWN: bool>(&self, ptr: NonNull<u8>) {
        let addr = ptr.as_ptr() as usize;
        let found = self.locate::<GROWN>(addr);
        if !GROWN && found.is_none() {
            // SAFETY: forwarded contract.
            return unsafe { self.free_by_owner_grown::<NOLOCK>(ptr) };
        }
        if let Some((zone, d)) = found {
            // Hidden from the optimiser (`opaque_index`): told that the
            // tag has 16 bits, it makes the range test below one in 16
            // bits, with a zero extension more.
            let owner = crate::sync::rseq::opaque_index(d.owner.load(Ordering::Acquire) as usize);
            // One comparison for "a plain class with its key at 8"; the
            // tiny classes take `free_plain`'s out-of-line copy. (A
            // descriptor holds 0, a cache's tag or the large marker, so a
            // value in a range of tags is a tag.)
            let first = cache::FIRST_KEYED_TAG;
            let last = class::tag_of(CLASSES - 1);
            if owner.wrapping_sub(first) <= last - first {
                // SAFETY: forwarded contract.
                return unsafe { self.free_in_cache::<NOLOCK>(owner, addr) };
            }
            let plain = class::tag_of(0);
            if owner.wrapping_sub(plain) <= last - plain {
                // SAFETY: forwarded contract.
                return unsafe { self.free_plain::<NOLOCK>(owner, addr) };
            }
            if owner == LARGE_OWNER as usize {
                // SAFETY: forwarded contract; `zone` (if any) holds `ptr`.
                return unsafe { self.free_large_of::<NOLOCK>(ptr, d, zone) };
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
    pub(super) unsafe fn free_general(&self, ptr: NonNull<u8>) {
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
        // SAFETY: forwarded contract.
        unsafe { self.free_sized_in::<NOLOCK, false>(ptr, layout) }
    }

    /// `free_sized` for a pointer outside the first zone (or null): the
    /// same route, its page found through the zone map.
    ///
    /// # Safety
    /// As for `Heap::free`, or null.
    #[inline(never)]
    unsafe fn free_sized_grown<const NOLOCK: bool>(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.free_sized_in::<NOLOCK, true>(ptr, layout) }
    }

    /// The body of `free_sized`: each arm finds the page in the first
    /// zone's window (else one tail call to `free_sized_grown`, so the
    /// first zone's route makes no call that returns), or with `GROWN` in
    /// the zone map (else the general path).
    ///
    /// # Safety
    /// As for `Heap::free`, or null.
    #[inline(always)]
    unsafe fn free_sized_in<const NOLOCK: bool, const GROWN: bool>(
        &self,
        ptr: *mut u8,
        layout: Layout,
    ) {
        let addr = ptr as usize;
        // The size alone names the class (`tag_hint`, the owner tag of its
        // plain cache: the page's owner decides). Two separate arms, not one
        // lookup shared by both: each tests its own owner value, and neither
        // carries a "which arm" flag.
        match self.tables().tag_hint(layout.size()) {
            Some(k) => {
                let found = self.locate::<GROWN>(addr);
                if !GROWN && found.is_none() {
                    // SAFETY: forwarded contract.
                    return unsafe { self.free_sized_grown::<NOLOCK>(ptr, layout) };
                }
                if let Some((_, d)) = found {
                    let owner = d.owner.load(Ordering::Acquire);
                    // A keyed class: one comparison. The hint table holds
                    // keyed tags and tiny tags with `TINY_HINT` set, and no
                    // owner tag has that bit but `LARGE_OWNER`, which is
                    // above any entry (const-asserted beside `TINY_HINT`).
                    // So `k` is keyed here, which makes the key word's
                    // place a constant. (`k` is a table entry, a `u16`:
                    // `as u16` keeps it whole.)
                    if owner == k as u16 {
                        let keyed = cache::FIRST_KEYED_TAG;
                        crate::check!(k >= keyed, "a tiny owner tag");
                        // SAFETY: forwarded contract; `k` is keyed (above).
                        return unsafe {
                            core::hint::assert_unchecked(k >= keyed);
                            self.free_in_cache::<NOLOCK>(k, addr)
                        };
                    }
                    if owner as usize | class::TINY_HINT == k {
                        // SAFETY: forwarded contract.
                        return unsafe { self.free_tiny::<NOLOCK>(owner as usize, addr) };
                    }
                }
            }
            None => {
                let found = self.locate::<GROWN>(addr);
                if !GROWN && found.is_none() {
                    // SAFETY: forwarded contract.
                    return unsafe { self.free_sized_grown::<NOLOCK>(ptr, layout) };
                }
                if let Some((zone, d)) = found {
                    if d.owner.load(Ordering::Acquire) == LARGE_OWNER {
                        // SAFETY: forwarded contract; inside a zone, so
                        // not null; `zone` (if any) holds it.
                        return unsafe {
                            self.free_large_of::<NOLOCK>(NonNull::new_unchecked(ptr), d, zone)
                        };
                    }
                }
            }
        }
        match NonNull::new(ptr) {
            // SAFETY: forwarded contract.
            Some(p) => unsafe { self.free_general_of::<NOLOCK>(p) },
            None => nothing_to_free(),
        }
    }

    /// The descriptor of the page holding `addr`, for the fast routes: in
    /// the first zone's window (no zone named), or with `GROWN` in the zone
    /// map of the others (`PageAllocator::locate_grown`: its zone too, for
    /// a large block's page free). `None`: not there.
    #[inline(always)]
    fn locate<const GROWN: bool>(
        &self,
        addr: usize,
    ) -> Option<(Option<&Zone>, &crate::page::PageDesc)> {
        if GROWN {
            self.pages.locate_grown(addr).map(|(z, d)| (Some(z), d))
        } else {
            self.pages.locate_first(addr).map(|(_, d)| (None, d))
        }
    }

    /// `free_nolock` beyond its fast route.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(never)]
    pub(super) unsafe fn free_nolock_general(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in(ptr, Mode::NoLock) };
    }

    /// The free of an object of the plain cache whose owner tag is `owner`
    /// (`class::tag_of` its class, as page descriptors and the size tables
    /// hold it), in any zone: validated (the start of an object, not already free), then
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
    pub(super) unsafe fn free_plain<const NOLOCK: bool>(&self, owner: usize, addr: usize) {
        // The test on the tag itself: the callers have it, and it is the
        // sequences' index as it is.
        if owner < cache::FIRST_KEYED_TAG {
            // SAFETY: forwarded contract.
            return unsafe { self.free_tiny::<NOLOCK>(owner, addr) };
        }
        // SAFETY: forwarded contract.
        unsafe { self.free_in_cache::<NOLOCK>(owner, addr) }
    }

    /// `free_plain` for a tiny class (cold: see `alloc_tiny`).
    ///
    /// # Safety
    /// As for `free_plain`.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn free_tiny<const NOLOCK: bool>(&self, tag: usize, addr: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.free_in_cache::<NOLOCK>(tag, addr) }
    }

    /// The body of `free_plain`.
    ///
    /// # Safety
    /// As for `free_plain`.
    #[inline(always)]
    pub(super) unsafe fn free_in_cache<const NOLOCK: bool>(&self, tag: usize, addr: usize) {
        let mode = if NOLOCK { Mode::NoLock } else { Mode::Normal };
        let (cache, base, idx) = self.cache_at(tag);
        if !cache.is_object_start(addr) {
            // SAFETY: forwarded contract; `addr` is the caller's non-null
            // pointer (it is inside a zone).
            return unsafe {
                self.free_general_of::<NOLOCK>(NonNull::new_unchecked(addr as *mut u8))
            };
        }
        #[cfg(feature = "debug-checks")]
        {
            let (_, zone, page) = self.pages.locate_known(addr);
            cache.mark(&self.pages, zone, page, addr, false);
        }
        if !cache.check_free_quick(&self.pages, addr, tag) {
            return self.free_checked_at(idx, addr, mode);
        }
        // SAFETY: `cache_at` names `cache`; `addr` was validated above.
        if !unsafe { Cache::seq_push_at(base, idx, addr, mode) } {
            self.free_miss_at(idx, addr, mode);
        }
    }

    /// `Cache::free_checked` of the cache `cache_at` gave `idx` for,
    /// called with the core and that index (already in registers), so that
    /// the fast path forms no cache pointer for its exits.
    #[cold]
    #[inline(never)]
    fn free_checked_at(&self, idx: usize, addr: usize, mode: Mode) {
        self.cache_of_idx(idx).free_checked(&self.pages, addr, mode)
    }

    /// `Cache::free_miss` of the cache `cache_at` gave `idx` for (see
    /// `free_checked_at`).
    #[inline(never)]
    fn free_miss_at(&self, idx: usize, addr: usize, mode: Mode) {
        self.cache_of_idx(idx).free_miss(&self.pages, addr, mode)
    }

    /// `free_large` of the zone `locate` found: the first zone's (`None`)
    /// or a grown one's.
    ///
    /// # Safety
    /// As for `Heap::free`; `zone`, if any, holds `ptr`.
    #[inline(always)]
    unsafe fn free_large_of<const NOLOCK: bool>(
        &self,
        ptr: NonNull<u8>,
        d: &crate::page::PageDesc,
        zone: Option<&Zone>,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            match zone {
                None => self.free_large::<NOLOCK>(ptr, d),
                Some(z) => self.free_large_grown::<NOLOCK>(ptr, d, z),
            }
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
    pub(super) unsafe fn free_large<const NOLOCK: bool>(
        &self,
        ptr: NonNull<u8>,
        d: &crate::page::PageDesc,
    ) {
        // SAFETY: forwarded contract.
        unsafe { self.free_large_in::<NOLOCK>(ptr, d, None) }
    }

    /// `free_large` for a block of the grown zone `zone` (found by the
    /// heap's own lookup, which the page free then need not repeat).
    ///
    /// # Safety
    /// As for `Heap::free`; `zone` holds `ptr`.
    #[inline(never)]
    unsafe fn free_large_grown<const NOLOCK: bool>(
        &self,
        ptr: NonNull<u8>,
        d: &crate::page::PageDesc,
        zone: &Zone,
    ) {
        // SAFETY: forwarded contract.
        unsafe { self.free_large_in::<NOLOCK>(ptr, d, Some(zone)) }
    }

    /// The body of `free_large` and `free_large_grown`.
    ///
    /// # Safety
    /// As for `free_large_of`.
    #[inline(always)]
    unsafe fn free_large_in<const NOLOCK: bool>(
        &self,
        ptr: NonNull<u8>,
        d: &crate::page::PageDesc,
        zone: Option<&Zone>,
    ) {
        let order = crate::page::order_of_state(d.load());
        let addr = ptr.as_ptr() as usize;
        if !addr.is_multiple_of(PAGE_SIZE << order) || d.freelist.load(Ordering::Relaxed) != 0 {
            // SAFETY: forwarded contract.
            return unsafe { self.free_general_of::<NOLOCK>(ptr) };
        }
        d.owner.store(0, Ordering::Release);
        // SAFETY: a live, unaccounted large block of this order (its head
        // descriptor says so, and the page free's claim catches a racing
        // second free); `zone`, if any, holds it.
        unsafe {
            match zone {
                None => self.pages.free_pages_fast(ptr, order, NOLOCK),
                Some(z) => self.pages.free_pages_fast_grown(z, d, ptr, order, NOLOCK),
            }
        }
    }

    /// The general free of the mode, `free_general` or `free_nolock_general`.
    ///
    /// # Safety
    /// As for `Heap::free`.
    #[inline(always)]
    pub(super) unsafe fn free_general_of<const NOLOCK: bool>(&self, ptr: NonNull<u8>) {
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
    pub(super) unsafe fn free_in(&self, ptr: NonNull<u8>, mode: Mode) {
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort(addr) {
            Kind::Object(cache, zone, idx) => {
                #[cfg(feature = "debug-checks")]
                cache.mark(&self.pages, zone, idx, addr, false);
                let goes_on = cache.check_free(&self.pages, addr, mode);
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

    pub(super) fn uncharge_object(&self, cache: &Cache, zone: &Zone, idx: u32, addr: usize) {
        let g = cache.owner_of(zone, idx, addr).swap(0, Ordering::AcqRel);
        self.uncharge(g, cache.size());
    }

    /// Uncharges `bytes` from the group reference `g` (0: none) and
    /// releases the reference. Any context.
    pub(super) fn uncharge(&self, g: usize, bytes: usize) {
        if g != 0 {
            // SAFETY: `g` is a reference from `account::retain`, stored with
            // the object and taken out exactly once (swap to 0).
            unsafe {
                (*(g as *const Group)).uncharge(bytes, self.cpu());
                account::release(g, &self.released_groups);
            }
        }
    }

    pub(super) fn unmark_large(&self, zone: &Zone, idx: u32, order: u32) {
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
    pub(super) fn free_huge(&self, addr: usize, mode: Mode) {
        // From the remove to the count, inside the allocator (see
        // `HugeCountWindow`; a nolock free too: one in a nolock scope is
        // not inside it otherwise, and a mark is no system call).
        let window = HugeCountWindow::enter();
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
        drop(window);
        self.uncharge(group, size);
        match mode {
            Mode::Normal => {
                // SAFETY: a registered huge allocation, now unregistered, so
                // nothing else will release it.
                unsafe { self.huge_unmap(addr, size) };
                // Blocks parked by nolock frees go too: without a
                // maintenance thread, a program that goes on with small
                // blocks only would keep them mapped for good.
                if !self.huge_deferred.is_empty() {
                    self.drain_huge_deferred();
                }
                self.pages.decay_tick();
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

    // ----- lookup --------------------------------------------------------------------

    #[inline]
    pub(super) fn classify(&self, addr: usize) -> Option<Kind<'_>> {
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
            return Some(Kind::Object(
                self.cache(class::index_of_tag(owner as usize)),
                zone,
                idx,
            ));
        }
        #[cfg(feature = "std")]
        if let Some(size) = self.huge.size_of(addr) {
            return Some(Kind::Huge(size));
        }
        None
    }

    #[inline(always)]
    pub(super) fn classify_or_abort(&self, addr: usize) -> Kind<'_> {
        self.classify_or_abort_for(addr, "free")
    }

    /// `classify`, aborting with a message that names the call `what`
    /// (`free`, `usable_size`) when `addr` is not a block of this heap.
    #[inline(always)]
    pub(super) fn classify_or_abort_for(&self, addr: usize, what: &str) -> Kind<'_> {
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
            None if self.is_page_block(addr) => self.bad_pointer(
                what,
                addr,
                ", which is a block of the heap's page allocator that no cache owns (from pages().alloc_pages? free it with free_pages)",
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
    pub(super) fn is_free_block(&self, addr: usize) -> bool {
        addr.is_multiple_of(PAGE_SIZE)
            && self
                .pages
                .locate_indexed(addr)
                .is_some_and(|(_, zone, idx)| {
                    crate::page::is_free_block_state(zone.desc(idx).load())
                })
    }

    /// Whether `addr` is the head page of a block of pages handed out that
    /// no cache owns: a block of the page allocator's own public API
    /// (`Heap::pages`), passed to a call of the heap's. (A slab or large
    /// block has an owner from just after its pages are taken until just
    /// before they are freed.) For reports.
    pub(super) fn is_page_block(&self, addr: usize) -> bool {
        addr.is_multiple_of(PAGE_SIZE)
            && self
                .pages
                .locate_indexed(addr)
                .is_some_and(|(_, zone, idx)| {
                    let d = zone.desc(idx);
                    crate::page::is_allocated_state(d.load())
                        && d.owner.load(Ordering::Acquire) == 0
                })
    }

    /// The one-line report of a pointer that call `what` cannot take.
    #[cold]
    pub(super) fn bad_pointer(&self, what: &str, addr: usize, why: &str) -> ! {
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
    pub(super) fn usable_size_for(&self, ptr: NonNull<u8>, what: &str) -> usize {
        let addr = ptr.as_ptr() as usize;
        match self.classify_or_abort_for(addr, what) {
            Kind::Object(cache, _, _) => {
                if cache.is_freed(&self.pages, addr) {
                    self.bad_pointer(what, addr, ", which is a freed object (use after free?)");
                }
                cache.size()
            }
            Kind::Large(_, _, order) => PAGE_SIZE << order,
            #[cfg(feature = "std")]
            Kind::Huge(size) => size,
        }
    }
}

/// A sized free with nothing to free (a null pointer, or `Global` before
/// its heap exists). A call of its own, out of line (the fence keeps the
/// compiler from dropping it): so that no empty arm shares the fast
/// paths' `ret`, which would end each of them in a jump to it.
#[cold]
#[inline(never)]
pub(crate) fn nothing_to_free() {
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}
