//! A cache's allocations: the fast path (this CPU's main sheaf, through a
//! restartable sequence or the slot try-lock), the slow path of each mode
//! (the spare sheaf, a full sheaf from the barn, a refill from the slabs),
//! and the carving of new slabs. A refill that needs a new slab takes its
//! pages and touches them before the node lock (`touched_slab`): their
//! page faults are not taken holding the lock that nolock refills only
//! try.

use super::*;

impl Cache {
    /// Normal-path allocation. Fast path: nothing deferred, and an object in
    /// the main sheaf of this CPU's level-0 slot.
    #[inline(always)]
    pub(crate) fn alloc(&self, pages: &PageAllocator) -> Option<usize> {
        if self.normal_fast_ok() {
            if let Some(o) = self.fast_pop::<false>(pages) {
                return Some(o);
            }
        }
        self.alloc_slow(pages, pages.cpu())
    }

    /// Whether a normal operation may try the fast path: with rseq always
    /// (the sequences apply the gate, `normal_cpus`), otherwise when nothing
    /// is deferred.
    #[inline(always)]
    pub(super) fn normal_fast_ok(&self) -> bool {
        self.rseq || self.deferred.is_empty()
    }

    /// A validated free of `mode` that [`seq_push`](Self::seq_push) did
    /// not take (or, after the exact double-free check, did not try): with
    /// rseq the mode's slow path at once (another push would find what the
    /// first one found), without it the whole free, whose fast path is the
    /// try-locked one.
    #[inline(never)]
    pub(crate) fn free_miss(&self, pages: &PageAllocator, obj: usize, mode: Mode) {
        match mode {
            Mode::Normal if self.rseq => self.free_slow(pages, pages.cpu(), obj),
            Mode::NoLock if self.rseq => self.free_nolock_slow(pages, pages.cpu(), obj),
            Mode::Normal => self.free(pages, obj),
            Mode::NoLock => self.free_nolock(pages, obj),
        }
    }

    /// The fast path of both allocation paths: pop from the main sheaf of
    /// this CPU's level-0 slot, if the slot is free and main is not empty.
    /// With rseq, a restartable sequence (no atomic instruction); otherwise
    /// under the slot's try-lock.
    #[inline(always)]
    pub(super) fn fast_pop<const COUNT_NOLOCK: bool>(
        &self,
        pages: &PageAllocator,
    ) -> Option<usize> {
        if self.rseq {
            return self.seq_pop::<COUNT_NOLOCK>();
        }
        self.locked_pop::<COUNT_NOLOCK>(pages)
    }

    /// The allocation fast path alone: `fast_pop` with rseq, the gate of
    /// the mode applied (`normal_cpus`, `nolock_cpus`). `None`, at once when
    /// the gate is closed or without rseq: take [`alloc`](Self::alloc) or
    /// [`alloc_nolock`](Self::alloc_nolock) (which keeps the try-locked
    /// variant and its call out of the callers' fast path).
    #[inline(always)]
    pub(crate) fn seq_pop<const COUNT_NOLOCK: bool>(&self) -> Option<usize> {
        let (base, idx) = self.core_and_idx();
        // SAFETY: `core_and_idx` names this cache.
        unsafe { Self::seq_pop_at::<COUNT_NOLOCK>(base, idx) }
    }

    /// [`seq_pop`](Self::seq_pop) of the cache that `base` (its heap's
    /// core) and `idx` name, as [`HeapCore::cache_at`](super::super::HeapCore)
    /// gives them: the fast paths' form, which needs no cache pointer and
    /// loads no slot address (see `sync::rseq::sheaf_pop`).
    ///
    /// # Safety
    /// `(base, idx)` is what `cache_at` returned for a live heap's cache.
    #[inline(always)]
    pub(crate) unsafe fn seq_pop_at<const COUNT_NOLOCK: bool>(
        base: *const u8,
        idx: usize,
    ) -> Option<usize> {
        // `raw_offset` is glibc's area offset (the heap's build ran
        // `prepare_offset`). The target is the cache at
        // `base + 8 * idx + CACHE_DISP`, whose head the sequences read as
        // `sync::rseq::layout` says (asserted beside the type): a non-zero
        // CPU count of the mode's gate means `rseq` was chosen at init, so
        // the area is registered (the cache's `rseq_off`), and the heap's
        // per-CPU region holds the cache's level-0 slot of each of those
        // CPUs at `base + idx + (cpu << LEVEL0_SHIFT) + LEVEL0_DISP`
        // (`meta_layout`, checked by `cache_at`), laid out as the sequences
        // expect (asserted beside `SheafSlot`), living as long as the heap.
        // Its sheaves sit in the heap's metadata, after the slots
        // (`meta_layout`), so the 8 bytes before each are readable.
        // SAFETY: as just said (with 0 CPUs the sequence touches only this
        // thread's rseq area); level-0 slots are changed only by sequences
        // and by lock holders, as `sync::rseq` prescribes.
        unsafe {
            use crate::sync::rseq::{layout, raw_offset, sheaf_pop};
            if COUNT_NOLOCK {
                sheaf_pop::<
                    true,
                    LEVEL0_SHIFT,
                    { layout::SHEAF_NOLOCK_CPUS },
                    { crate::slab::CACHE_DISP },
                    { crate::slab::LEVEL0_DISP },
                >(raw_offset(), base, idx)
            } else {
                sheaf_pop::<
                    false,
                    LEVEL0_SHIFT,
                    { layout::SHEAF_NORMAL_CPUS },
                    { crate::slab::CACHE_DISP },
                    { crate::slab::LEVEL0_DISP },
                >(raw_offset(), base, idx)
            }
        }
    }

    /// `fast_pop` without rseq: under the slot's try-lock. Out of line, so
    /// that the rseq fast path around it needs no stack frame.
    #[inline(never)]
    pub(super) fn locked_pop<const COUNT_NOLOCK: bool>(
        &self,
        pages: &PageAllocator,
    ) -> Option<usize> {
        let slot = self.slot(pages.cpu(), 0);
        let g = slot.lock.try_lock()?;
        crate::interrupt_point!(SheafAlloc);
        let o = slot.main_pop(&g)?;
        if COUNT_NOLOCK {
            crate::page::bump(&slot.nolock_ok, &g);
        }
        Some(o)
    }

    /// The fast path of both free paths: push onto the main sheaf of this
    /// CPU's level-0 slot, if the slot is free and main has room. (A double
    /// free never gets here: the key test before it sent it to the exact
    /// search.)
    #[inline(always)]
    pub(super) fn fast_push(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> bool {
        if self.rseq {
            return self.seq_push(obj, mode);
        }
        self.locked_push(pages, obj)
    }

    /// The free fast path of a validated object alone: `fast_push` with
    /// rseq, the gate of `mode` applied (see `seq_pop`). `false`: the
    /// object is still the caller's; hand it to
    /// [`free_miss`](Self::free_miss).
    #[inline(always)]
    pub(crate) fn seq_push(&self, obj: usize, mode: Mode) -> bool {
        let (base, idx) = self.core_and_idx();
        // SAFETY: `core_and_idx` names this cache; `obj` is a validated
        // object of it being freed (the callers').
        unsafe { Self::seq_push_at(base, idx, obj, mode) }
    }

    /// [`seq_push`](Self::seq_push) of the cache that `base` and `idx`
    /// name (see [`seq_pop_at`](Self::seq_pop_at)).
    ///
    /// # Safety
    /// `(base, idx)` is what `HeapCore::cache_at` returned for a live
    /// heap's cache; `obj` is a validated object of that cache being freed.
    #[inline(always)]
    pub(crate) unsafe fn seq_push_at(base: *const u8, idx: usize, obj: usize, mode: Mode) -> bool {
        // SAFETY: as in `seq_pop`; `obj` is a validated object of this
        // cache being freed.
        unsafe {
            use crate::sync::rseq::{layout, raw_offset, sheaf_push};
            match mode {
                Mode::Normal => sheaf_push::<
                    LEVEL0_SHIFT,
                    { layout::SHEAF_NORMAL_CPUS },
                    { crate::slab::CACHE_DISP },
                    { crate::slab::LEVEL0_DISP },
                >(raw_offset(), base, idx, obj),
                Mode::NoLock => sheaf_push::<
                    LEVEL0_SHIFT,
                    { layout::SHEAF_NOLOCK_CPUS },
                    { crate::slab::CACHE_DISP },
                    { crate::slab::LEVEL0_DISP },
                >(raw_offset(), base, idx, obj),
            }
        }
    }

    /// `fast_push` without rseq: under the slot's try-lock, out of line.
    #[inline(never)]
    pub(super) fn locked_push(&self, pages: &PageAllocator, obj: usize) -> bool {
        let slot = self.slot(pages.cpu(), 0);
        let Some(g) = slot.lock.try_lock() else {
            return false;
        };
        crate::interrupt_point!(SheafFree);
        slot.main_push(obj, &g)
    }

    /// Normal-path allocation: deferred frees first, then the slot (spare,
    /// refill), or the slabs directly when the slot is busy. `None` at once
    /// for a thread inside the allocator or in a nolock scope: the caller
    /// takes the nolock path (see [`crate::context`]).
    #[cold]
    #[inline(never)]
    pub(in crate::slab) fn alloc_slow(&self, pages: &PageAllocator, cpu: usize) -> Option<usize> {
        if crate::context::nested() {
            return None;
        }
        self.drain_and_reopen(pages);
        let o = self.alloc_normal(pages, cpu);
        // Every lock let go: a tick of the inline decay.
        pages.decay_tick();
        o
    }

    /// The normal allocation's slow path proper: the slot (spare, refill),
    /// or the slabs directly when the slot is busy.
    #[inline]
    pub(super) fn alloc_normal(&self, pages: &PageAllocator, cpu: usize) -> Option<usize> {
        if let Some((slot, g)) = self.lock_own(cpu, 0) {
            crate::interrupt_point!(SheafAlloc);
            if let Some(o) = self.pop_slot(slot, &g) {
                return Some(o);
            }
            return self.refill(slot, &g, pages, Mode::Normal).ok();
        }
        // The slot is held by another context: straight to the slabs.
        let node = self.node.lock.lock_in(Mode::Normal, pages.platform())?;
        self.take_object(&node, pages, Mode::Normal).ok()
    }

    /// Nolock allocation. Fast path: this CPU's level-0 slot has an object
    /// in its main sheaf. Otherwise [`alloc_nolock_slow`](Self::alloc_nolock_slow).
    #[inline(always)]
    pub(crate) fn alloc_nolock(&self, pages: &PageAllocator) -> Result<usize, Fail> {
        match self.fast_pop::<true>(pages) {
            Some(o) => Ok(o),
            None => self.alloc_nolock_slow(pages, pages.cpu()),
        }
    }

    /// Nolock allocation, the whole search: every level of this CPU's slots
    /// (spare sheaves, refills with a tried node lock), the other CPUs'
    /// sheaves, then the slabs directly, all with `try_lock`.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_nolock_slow(
        &self,
        pages: &PageAllocator,
        cpu: usize,
    ) -> Result<usize, Fail> {
        let mut busy = false;
        let mut node_busy = false;
        for level in 0..LEVELS {
            let Some((slot, g)) = self.lock_own(cpu, level) else {
                busy = true;
                continue;
            };
            crate::interrupt_point!(SheafAlloc);
            if let Some(o) = self.pop_slot(slot, &g) {
                crate::page::bump(&slot.nolock_ok, &g);
                return Ok(o);
            }
            if node_busy {
                continue;
            }
            match self.refill(slot, &g, pages, Mode::NoLock) {
                Ok(o) => {
                    crate::page::bump(&slot.nolock_ok, &g);
                    return Ok(o);
                }
                Err(Fail::Busy) => {
                    busy = true;
                    node_busy = true;
                }
                Err(Fail::Empty) => {}
            }
        }
        for other in (0..self.cpus).filter(|&c| c != cpu % self.cpus) {
            for level in (0..LEVELS).filter(|&l| self.remote_nolock_ok(l)) {
                let i = slot_index(other, self.cpus, level);
                let slot = self.slot_at(i);
                if slot.cached() == 0 {
                    continue;
                }
                let Some(g) = slot.lock.try_lock() else {
                    busy = true;
                    continue;
                };
                self.prepare(i, slot, &g);
                if let Some(o) = self.pop_slot(slot, &g) {
                    crate::page::bump(&slot.nolock_ok, &g);
                    return Ok(o);
                }
            }
        }
        if !node_busy {
            if let Some(node) = self.node.lock.try_lock(pages.platform()) {
                let r = self.take_object(&node, pages, Mode::NoLock);
                if r.is_ok() {
                    self.nolock_ok_slotless.fetch_add(1, Ordering::Relaxed);
                }
                return r.map_err(|e| if busy { Fail::Busy } else { e });
            }
        }
        let o = self.alloc_deferred(pages, cpu).ok_or(Fail::Busy)?;
        self.nolock_ok_slotless.fetch_add(1, Ordering::Relaxed);
        Ok(o)
    }

    /// Nolock allocation while the node lock is held elsewhere (another
    /// CPU's refill or flush, the maintainer, or the context this one
    /// interrupted): the objects that frees parked on the deferred stack
    /// meanwhile, waiting for a normal context to return them to their
    /// slabs, are free objects of this cache like a sheaf's. Takes the
    /// stack, keeps its first object, moves as many of the rest as the main
    /// sheaf of a slot of this CPU has room for (if one can be locked), and
    /// puts the remainder back without walking it
    /// ([`IndexStack::put_back`]), so the work does not grow with the
    /// backlog. Then, as `defer` does after a push, it closes the normal
    /// fast path, so the next normal operation drains what was put back.
    ///
    /// Without this, the two CPUs' bursts of nolock allocations, each
    /// holding the node lock in turn for its refills, sent each other to
    /// the next class up while their frees piled up here: memory that no
    /// allocation could reuse until a normal context drained it.
    ///
    /// (Accounted caches too: a free uncharges before the cache sees the
    /// object, and an allocation charges whatever object it is given.)
    #[cold]
    pub(super) fn alloc_deferred(&self, pages: &PageAllocator, cpu: usize) -> Option<usize> {
        // Every object below is on a chain this context took (`take_all`,
        // or `put_back`'s own take) and owns.
        let link = |o: usize| self.deferred_link(pages, o);
        let _taker = self.deferred_taker()?;
        let first = self.deferred.take_all();
        if first == crate::sync::NIL {
            return None;
        }
        crate::interrupt_point!(ObjectDeferredDrain);
        let mut rest = link(first);
        let mut taken = 1;
        if rest != crate::sync::NIL {
            if let Some((slot, g)) = (0..LEVELS).find_map(|l| self.lock_own(cpu, l)) {
                while rest != crate::sync::NIL && slot.main_len() < self.cap {
                    let next = link(rest);
                    if !slot.main_push(rest, &g) {
                        break;
                    }
                    // A free object in a sheaf carries the key in its key
                    // word: for tiny classes that word held the link.
                    self.set_free_mark(rest);
                    crate::interrupt_point!(ObjectDeferredDrain);
                    taken += 1;
                    rest = next;
                }
            }
        }
        self.deferred_count.fetch_sub(taken, Ordering::Relaxed);
        if rest != crate::sync::NIL {
            self.put_back_deferred(pages, rest);
        }
        Some(first)
    }

    #[inline]
    pub(super) fn pop_slot(&self, slot: &SheafSlot, g: &SlotGuard<'_>) -> Option<usize> {
        if let Some(o) = slot.main_pop(g) {
            return Some(o);
        }
        if slot.spare().len() > 0 {
            slot.swap(g);
            return slot.main_pop(g);
        }
        None
    }

    /// Main and spare are empty: trade main for a full sheaf from the barn
    /// (barn lock), or fill it from the slabs (node lock, taken after the
    /// barn's is let go). Returns one object. A nolock refill that finds
    /// the barn busy goes to the slabs, and one that finds the node busy
    /// (a slab operation of the context it interrupted, say) still trades
    /// with the barn; `Err(Busy)` when it needed the node lock and found
    /// it busy.
    #[cold]
    pub(super) fn refill(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<usize, Fail> {
        // This slot ran empty on the nolock path: the maintainer keeps it
        // stocked from now on.
        if mode == Mode::NoLock {
            slot.demand.store(1, Ordering::Relaxed);
        }
        if let Some(barn) = self.lock_barn(mode, pages) {
            crate::interrupt_point!(BarnTrade);
            if self.trade_main_for_full(slot, g, &barn) {
                // Refill runs when the spare is empty too: trade it as well
                // when the barn has another full sheaf, so the next refill
                // (and its lock) comes two sheaves later instead of one.
                if slot.spare().len() == 0 {
                    self.trade_spare_for_full(slot, g, &barn);
                }
                return slot.main_pop(g).ok_or(Fail::Empty);
            }
        }
        // No slab has a free object: the new slab's pages are taken and
        // touched before the node lock (see `touched_slab`).
        let mut fresh = if self.partial_is_empty(pages) {
            self.touched_slab(pages, mode)
        } else {
            None
        };
        let got = match self.node.lock.lock_in(mode, pages.platform()) {
            Some(node) => self.fill_from_slabs(slot, g, &node, pages, mode, &mut fresh),
            None => Err(Fail::Busy),
        };
        // Unused (the node lock let go): the lock was busy, or another
        // context made a slab, or freed objects to one, while this one
        // touched its pages.
        self.give_back_slab(pages, fresh, mode);
        got
    }

    /// The refill from the slabs, node lock held: one object to return,
    /// main filled from the slabs that have free objects (no new slab is
    /// made just to fill a sheaf). A new slab, if the first object needs
    /// one, is made of `fresh` when the refill brought it.
    ///
    /// Main is filled a slab at a time (`take_run`): a working set larger
    /// than the barn refills a sheaf from the slabs on every slow
    /// allocation, and taking its objects one by one (the partial lists
    /// searched, the slab's descriptor read and written, for each) was most
    /// of that refill's time.
    fn fill_from_slabs(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        node: &ZoneGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
        fresh: &mut Option<NonNull<u8>>,
    ) -> Result<usize, Fail> {
        crate::interrupt_point!(SheafRefill);
        let first = self.take_object_with(node, pages, mode, fresh)?;
        while slot.main_len() < self.cap {
            let Some((zi, head)) = self.first_partial(pages) else {
                break;
            };
            crate::interrupt_point!(SheafRefill);
            let room = self.cap - slot.main_len();
            self.take_run(pages.zone_at(zi), zi, head, node, room, |o| {
                let pushed = slot.main_push(o, g);
                crate::check!(pushed, "a refill's run beyond main's room");
            });
        }
        Ok(first)
    }

    /// A new slab's pages for a refill that found no slab with a free
    /// object, taken from the page allocator (in `mode`) and touched, one
    /// write per page, before the refill takes the node lock. A new slab's
    /// first touch is its carving's (each object's key word), and each page
    /// it touches first faults: microseconds under a VM, which were spent
    /// holding the node lock. A nolock refill only tries that lock, so a
    /// burst of signal handlers on two CPUs, each making new slabs, found
    /// it held by the other's faults and spilled to the next class up.
    /// `None` when the page allocator has nothing (the refill then makes
    /// the slab under the lock as before, or fails there).
    fn touched_slab(&self, pages: &PageAllocator, mode: Mode) -> Option<NonNull<u8>> {
        // Marked inside the allocator, as the node lock marked the page
        // calls when they ran under it: a normal page call made while a
        // slot is held must not run the inline decay pass (the thread holds
        // a lock of the allocator), and a signal handler takes the nolock
        // route.
        let _inside = crate::context::Inside::enter();
        let p = self.slab_pages(pages, mode).ok()?;
        for i in 0..(1usize << self.order) {
            // SAFETY: page `i` of the block of `self.order` just allocated,
            // which no one else uses until `init_slab` or `give_back_slab`.
            unsafe { p.as_ptr().add(i * PAGE_SIZE).write_volatile(0) };
        }
        crate::interrupt_point!(SlabTouch);
        Some(p)
    }

    /// A new slab's pages from the page allocator, in `mode`; a normal
    /// call runs no shrinkers (see `take_object_with`).
    fn slab_pages(&self, pages: &PageAllocator, mode: Mode) -> Result<NonNull<u8>, Fail> {
        match mode {
            Mode::Normal => pages
                .alloc_pages_without_reclaim(self.order)
                .ok_or(Fail::Empty),
            Mode::NoLock => pages.alloc_pages_nolock_why(self.order),
        }
    }

    /// Returns the pages of an unused `touched_slab` to the page allocator
    /// (in `mode`). The node lock is not held.
    fn give_back_slab(&self, pages: &PageAllocator, slab: Option<NonNull<u8>>, mode: Mode) {
        let Some(p) = slab else { return };
        // (As in `touched_slab`.)
        let _inside = crate::context::Inside::enter();
        // SAFETY: a block of `self.order` that `touched_slab` allocated and
        // nothing else has seen (no cache owns it).
        unsafe { pages.free_pages_in(p, self.order, mode) }
    }

    pub(super) fn partial_is_empty(&self, pages: &PageAllocator) -> bool {
        self.first_partial(pages).is_none()
    }

    /// The first zone with a partial slab, and that slab's head page (node
    /// lock held, or a hint without it).
    fn first_partial(&self, pages: &PageAllocator) -> Option<(usize, u32)> {
        (0..pages.zone_count()).find_map(|zi| {
            let head = self.node.partial[zi].load(Ordering::Relaxed);
            (head != NIL).then_some((zi, head))
        })
    }

    /// Takes one object from a partial slab, making a new slab if none has
    /// free objects (through the nolock page path in nolock mode).
    pub(super) fn take_object(
        &self,
        node: &ZoneGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<usize, Fail> {
        self.take_object_with(node, pages, mode, &mut None)
    }

    /// [`take_object`](Self::take_object), whose new slab, if it makes
    /// one, is `fresh`'s pages when there are some (`touched_slab`).
    fn take_object_with(
        &self,
        node: &ZoneGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
        fresh: &mut Option<NonNull<u8>>,
    ) -> Result<usize, Fail> {
        crate::interrupt_point!(PartialLocked);
        if let Some((zi, head)) = self.first_partial(pages) {
            return Ok(self.take_from_slab(pages.zone_at(zi), zi, head, node));
        }
        // Normal mode holds the node lock here, so the page allocator must
        // not run shrinkers (one could free into this very cache): the heap
        // runs them itself, with no lock held, when this fails.
        let slab = match fresh.take() {
            Some(slab) => slab,
            None => self.slab_pages(pages, mode)?,
        };
        let (zi, zone, head) = pages.locate_known(slab.as_ptr() as usize);
        self.init_slab(zone, zi, head, node);
        Ok(self.take_from_slab(zone, zi, head, node))
    }

    pub(super) fn init_slab(&self, zone: &Zone, zi: usize, head: u32, node: &ZoneGuard<'_>) {
        for i in 0..(1u32 << self.order) {
            zone.desc(head + i)
                .owner
                .store(super::class::tag_of(self.index) as u16, Ordering::Relaxed);
        }
        let d = zone.desc(head);
        d.inuse.store(0, Ordering::Relaxed);
        d.freelist.store(0, Ordering::Relaxed);
        d.carved.store(0, Ordering::Relaxed);
        #[cfg(feature = "debug-checks")]
        {
            let (words, _) = self.bitmap(zone.addr_of(head));
            for w in words {
                w.store(0, Ordering::Relaxed);
            }
        }
        if self.accounted {
            // The owner array may hold stale words from the pages' last use.
            for i in 0..self.objs {
                self.owner_word(zone.addr_of(head), i)
                    .store(0, Ordering::Relaxed);
            }
        }
        node.add(&self.slabs, 1);
        node.add(&self.node.empty_slabs, 1);
        self.partial_push(zone, zi, head, node);
    }

    /// One object of a slab with free objects (node lock held): a run of
    /// one.
    pub(super) fn take_from_slab(
        &self,
        zone: &Zone,
        zi: usize,
        head: u32,
        node: &ZoneGuard<'_>,
    ) -> usize {
        let mut obj = 0;
        let taken = self.take_run(zone, zi, head, node, 1, |o| obj = o);
        crate::check!(taken == 1, "a run of one took none");
        obj
    }

    /// Up to `max` objects of a slab with free objects (a partial slab, or
    /// one just made; node lock held), each handed to `put`: the slab's free
    /// list first, then its untouched tail, with its descriptor and the
    /// cache's counters written once for the run. Returns how many it took
    /// (at least one when `max` is).
    fn take_run(
        &self,
        zone: &Zone,
        zi: usize,
        head: u32,
        node: &ZoneGuard<'_>,
        max: usize,
        mut put: impl FnMut(usize),
    ) -> usize {
        let d = zone.desc(head);
        let inuse = d.inuse.load(Ordering::Relaxed) as usize;
        crate::check!(inuse < self.objs, "a full slab on a partial list");
        // Every object of the slab not out is on its free list or not yet
        // carved (`carved - inuse` of them on the list).
        let n = max.min(self.objs - inuse);
        let carved = d.carved.load(Ordering::Relaxed);
        let mut free = d.freelist.load(Ordering::Relaxed);
        let mut taken = 0;
        while taken < n && free != 0 {
            let next = self.slab_link(free, carved, zone.platform());
            put(free);
            free = next;
            taken += 1;
        }
        d.freelist.store(free, Ordering::Relaxed);
        if taken < n {
            let base = zone.addr_of(head);
            let mut c = carved;
            while taken < n {
                crate::check!(c < self.objs, "carving beyond a full slab");
                let obj = base + c * self.size;
                // Free, as every object off a slab is (its key word says
                // so, as a free leaves it), until an allocation hands it
                // out: so a free of it while it waits in a sheaf is the
                // double free it is (with a stale or zero key word it was
                // taken, and the object was later handed out twice).
                self.set_free_mark(obj);
                put(obj);
                c += 1;
                taken += 1;
            }
            d.carved.store(c, Ordering::Relaxed);
        }
        let now = inuse + taken;
        d.inuse.store(now as u16, Ordering::Relaxed);
        if inuse == 0 {
            node.add(&self.node.empty_slabs, 1usize.wrapping_neg());
        }
        if now == self.objs {
            self.partial_remove(zone, zi, head, node);
        }
        node.add(&self.out_of_slabs, taken);
        taken
    }
}
