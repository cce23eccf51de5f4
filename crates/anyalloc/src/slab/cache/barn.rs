//! Where sheaves come from and go: the exchanges between a slot's sheaves
//! and the barn (full for empty, empty for full), flushes of sheaves back
//! to their slabs, the slabs' partial lists (node lock held), the release
//! of empty slabs, and the per-CPU maintenance and `drain` of a cache.

use super::*;

impl Cache {
    // ----- partial lists (node lock held) -------------------------------------

    pub(super) fn partial_push(&self, zone: &Zone, zi: usize, head: u32, _node: &ZoneGuard<'_>) {
        let list = &self.node.partial[zi];
        let old = list.load(Ordering::Relaxed);
        let d = zone.desc(head);
        d.next.store(old, Ordering::Relaxed);
        d.prev.store(NIL, Ordering::Relaxed);
        if old != NIL {
            zone.desc(old).prev.store(head, Ordering::Relaxed);
        }
        list.store(head, Ordering::Relaxed);
    }

    pub(super) fn partial_remove(&self, zone: &Zone, zi: usize, head: u32, _node: &ZoneGuard<'_>) {
        let d = zone.desc(head);
        let next = d.next.load(Ordering::Relaxed);
        let prev = d.prev.load(Ordering::Relaxed);
        if prev == NIL {
            self.node.partial[zi].store(next, Ordering::Relaxed);
        } else {
            zone.desc(prev).next.store(next, Ordering::Relaxed);
        }
        if next != NIL {
            zone.desc(next).prev.store(prev, Ordering::Relaxed);
        }
    }

    /// Pushes onto a held slot: main, else spare, else trade the full main for
    /// an empty barn sheaf, else flush main to the slabs. `Err` when the node
    /// lock was needed and busy (nolock).
    #[inline]
    pub(super) fn push_slot(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        obj: usize,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<(), Fail> {
        if slot.main_last() == obj {
            pages.fatal_at("anyalloc: double free of object ", obj, "");
        }
        if slot.main_push(obj, g) {
            return Ok(());
        }
        if slot.spare().len() < self.cap {
            slot.swap(g);
            slot.main_push(obj, g);
            return Ok(());
        }
        self.flush(slot, g, pages, mode)?;
        slot.main_push(obj, g);
        Ok(())
    }

    /// Main and spare are full: give main to the barn for an empty sheaf
    /// (barn lock), or return main's objects to their slabs (node lock,
    /// taken after the barn's is let go). A nolock flush that finds the
    /// barn busy goes to the slabs; `Err` when the node lock is busy too.
    #[cold]
    pub(super) fn flush(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<(), Fail> {
        if let Some(barn) = self.lock_barn(mode, pages) {
            crate::interrupt_point!(BarnTrade);
            if self.trade_main_for_empty(slot, g, &barn) {
                // Flush runs when the spare is full too: trade it as well
                // when the barn has room, so the next flush comes two
                // sheaves later.
                if slot.spare().len() >= self.cap {
                    self.trade_spare_for_empty(slot, g, &barn);
                }
                return Ok(());
            }
        }
        let node = self
            .node
            .lock
            .lock_in(mode, pages.platform())
            .ok_or(Fail::Busy)?;
        crate::interrupt_point!(SheafFlush);
        self.flush_main(slot, g, pages, &node, mode);
        Ok(())
    }

    /// Barn lock held, and `slot` held by the caller (`g`), its main sheaf
    /// empty: a full barn sheaf becomes main, the old main joining the
    /// barn's empty list. `false` when the barn has no full sheaf.
    pub(super) fn trade_main_for_full(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        barn: &BarnGuard<'_>,
    ) -> bool {
        let Some(full) = self.take_full(barn) else {
            return false;
        };
        let old = slot.detach_main(g);
        slot.set_main(full, g);
        self.give_empty(old, barn);
        true
    }

    /// Barn lock held, and `slot` held by the caller (`g`): an empty barn
    /// sheaf becomes main, the old main joining the barn's full list.
    /// `false` when the barn has no room (`BarnSize::bytes`) or no empty sheaf.
    pub(super) fn trade_main_for_empty(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        barn: &BarnGuard<'_>,
    ) -> bool {
        let Some(empty) = self.barn_empty_with_room(barn) else {
            return false;
        };
        let old = slot.detach_main(g);
        slot.set_main(empty, g);
        self.give_full(old, barn);
        true
    }

    /// Barn lock held, and `slot` held by the caller (`_g`), its spare
    /// sheaf empty: trades the spare for a full barn sheaf, the old one
    /// joining the barn's empty list. `false` when the barn has no full
    /// sheaf.
    pub(super) fn trade_spare_for_full(
        &self,
        slot: &SheafSlot,
        _g: &SlotGuard<'_>,
        barn: &BarnGuard<'_>,
    ) -> bool {
        let Some(full) = self.take_full(barn) else {
            return false;
        };
        // (A load and a store: the slot lock is held, no locked swap needed.)
        let old = slot.spare.load(Ordering::Relaxed);
        slot.spare.store(full, Ordering::Release);
        self.give_empty(old, barn);
        true
    }

    /// Barn lock held, and `slot` held by the caller (`_g`): trades its
    /// spare sheaf for an empty barn sheaf, the old one joining the barn's
    /// full list. `false` when the barn has no room (`BarnSize::bytes`) or no
    /// empty sheaf.
    pub(super) fn trade_spare_for_empty(
        &self,
        slot: &SheafSlot,
        _g: &SlotGuard<'_>,
        barn: &BarnGuard<'_>,
    ) -> bool {
        let Some(empty) = self.barn_empty_with_room(barn) else {
            return false;
        };
        let old = slot.spare.load(Ordering::Relaxed);
        slot.spare.store(empty, Ordering::Release);
        self.give_full(old, barn);
        true
    }

    /// Takes the barn's first full sheaf off its list (barn lock held),
    /// counting its objects out of the barn and one exchange.
    pub(super) fn take_full(&self, barn: &BarnGuard<'_>) -> Option<*mut Sheaf> {
        let full = self.barn.full.load(Ordering::Relaxed);
        // SAFETY: barn sheaves are cache sheaves (live as long as the
        // heap); the barn lock gives us the barn lists.
        let f = unsafe { full.as_ref() }?;
        self.barn
            .full
            .store(f.next.load(Ordering::Relaxed), Ordering::Relaxed);
        barn.add(&self.barn.objects, f.len().wrapping_neg());
        barn.add(&self.barn.ops, 1);
        Some(full)
    }

    /// Puts `sheaf`, now empty, on the barn's empty list (barn lock held).
    pub(super) fn give_empty(&self, sheaf: *mut Sheaf, _barn: &BarnGuard<'_>) {
        // SAFETY: a cache sheaf the caller took out of a slot or the barn.
        let e = unsafe { &*sheaf };
        e.next
            .store(self.barn.empty.load(Ordering::Relaxed), Ordering::Relaxed);
        self.barn.empty.store(sheaf, Ordering::Relaxed);
    }

    /// Puts `sheaf`, now full, on the barn's full list (barn lock held),
    /// counting its objects into the barn and one exchange.
    pub(super) fn give_full(&self, sheaf: *mut Sheaf, barn: &BarnGuard<'_>) {
        // SAFETY: as in `give_empty`.
        let f = unsafe { &*sheaf };
        barn.add(&self.barn.objects, f.len());
        barn.add(&self.barn.ops, 1);
        f.next
            .store(self.barn.full.load(Ordering::Relaxed), Ordering::Relaxed);
        self.barn.full.store(sheaf, Ordering::Relaxed);
    }

    /// An empty barn sheaf to take a sheaf's worth of objects, if the barn
    /// has room for them (`BarnSize::bytes`) and an empty sheaf (barn lock
    /// held).
    pub(super) fn barn_empty_with_room(&self, barn: &BarnGuard<'_>) -> Option<*mut Sheaf> {
        let room = (self.barn.objects.load(Ordering::Relaxed) + self.cap) * self.size
            <= self.barn.size.bytes;
        if !room {
            return None;
        }
        let empty = self.take_empty(barn);
        (!empty.is_null()).then_some(empty)
    }

    /// Returns every object of a held slot's main sheaf to its slab (node
    /// lock held).
    pub(super) fn flush_main(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        let mut next = slot.main_pop(g);
        while let Some(o) = next {
            crate::interrupt_point!(SheafFlush);
            next = self.return_run(o, || slot.main_pop(g), pages, node, mode);
        }
    }

    pub(super) fn flush_sheaf(
        &self,
        sheaf: &Sheaf,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        let mut next = sheaf.pop();
        while let Some(o) = next {
            crate::interrupt_point!(SheafFlush);
            next = self.return_run(o, || sheaf.pop(), pages, node, mode);
        }
    }

    /// Returns an object to its slab (node lock held); releases the slab to
    /// the page allocator when it empties beyond the reserve.
    pub(super) fn return_to_slab(
        &self,
        obj: usize,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        let rest = self.return_run(obj, || None, pages, node, mode);
        crate::check!(rest.is_none(), "a run of one object left another");
    }

    /// [`return_to_slab`](Self::return_to_slab) of `first`, then of each
    /// object `more` gives while they lie in `first`'s slab, with the slab's
    /// descriptor and the cache's counters written once for the run (a
    /// flush's objects were mostly freed in the order they were taken, so
    /// runs are long). Returns the first object of another slab, which
    /// `more` gave and this did not take, or `None` once `more` ran dry.
    pub(super) fn return_run(
        &self,
        first: usize,
        mut more: impl FnMut() -> Option<usize>,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) -> Option<usize> {
        crate::interrupt_point!(PartialLocked);
        let (zi, zone, idx) = pages.locate_known(first);
        let head = idx & !((1u32 << self.order) - 1);
        let d = zone.desc(head);
        let before = d.inuse.load(Ordering::Relaxed) as usize;
        let mut inuse = before;
        let mut list = d.freelist.load(Ordering::Relaxed);
        // Slabs are naturally aligned blocks: an object of this cache is in
        // `first`'s slab exactly when it is in the same block.
        let block = !(self.slab_mask as usize);
        let slab = first & block;
        let mut obj = first;
        let other = loop {
            if inuse == 0 {
                // More objects came back than went out: a double free that
                // the key did not catch (two racing frees of one object).
                pages.fatal_at(
                    "anyalloc: double free of object ",
                    obj,
                    " (its slab has no object in use)",
                );
            }
            // SAFETY: `obj` is a free object of this slab (validated by
            // the caller), at least 8 bytes; its first word becomes the
            // list link (XOR the key, see "Double-free detection").
            unsafe { (obj as *mut usize).write_unaligned(list ^ self.key) };
            list = obj;
            inuse -= 1;
            match more() {
                Some(o) if o & block == slab => obj = o,
                other => break other,
            }
        };
        d.freelist.store(list, Ordering::Relaxed);
        d.inuse.store(inuse as u16, Ordering::Relaxed);
        node.add(&self.out_of_slabs, (before - inuse).wrapping_neg());
        if before == self.objs {
            self.partial_push(zone, zi, head, node);
        }
        if inuse == 0 {
            node.add(&self.node.empty_slabs, 1);
            let empties = self.node.empty_slabs.load(Ordering::Relaxed);
            if empties > EMPTY_SLAB_RESERVE {
                self.release_slab(zone, zi, head, pages, node, mode);
            }
        }
        other
    }

    pub(super) fn release_slab(
        &self,
        zone: &Zone,
        zi: usize,
        head: u32,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        self.partial_remove(zone, zi, head, node);
        node.add(&self.node.empty_slabs, 1usize.wrapping_neg());
        node.add(&self.slabs, 1usize.wrapping_neg());
        for i in 0..(1u32 << self.order) {
            zone.desc(head + i).owner.store(0, Ordering::Relaxed);
        }
        // Off the partial list, no cache owns its pages, not yet freed.
        crate::interrupt_point!(ReleaseSlab);
        // SAFETY: the non-null slab address was allocated with this order and
        // every object is back (inuse == 0); nothing refers to it any more.
        unsafe {
            let p = NonNull::new_unchecked(zone.addr_of(head) as *mut u8);
            pages.free_pages_in(p, self.order, mode)
        }
    }

    /// Returns every object in the barn's full sheaves to its slab (node
    /// and barn locks held); the sheaves become empty barn sheaves.
    pub(super) fn flush_barn(
        &self,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        barn: &BarnGuard<'_>,
    ) {
        let mut s = self
            .barn
            .full
            .swap(core::ptr::null_mut(), Ordering::Relaxed);
        while !s.is_null() {
            // SAFETY: barn sheaves are cache sheaves; barn lock held.
            let sh = unsafe { &*s };
            let next = sh.next.load(Ordering::Relaxed);
            barn.add(&self.barn.objects, sh.len().wrapping_neg());
            self.flush_sheaf(sh, pages, node, Mode::Normal);
            self.give_empty(s, barn);
            s = next;
        }
    }

    /// Maintenance (normal context):
    /// - a barn that has seen no exchange for `idle_passes` passes returns
    ///   its objects to their slabs (free objects cached there pin their
    ///   slabs' pages);
    /// - a slot whose sheaves have not changed for `idle_passes` passes is
    ///   flushed to the slabs and forgets its demand;
    /// - a slot that a nolock allocation found empty (`demand`) and that
    ///   holds less than half a sheaf gets its spare filled (from the barn or
    ///   the slabs), so a burst of nolock allocations finds objects ready.
    ///
    /// Without `upkeep` (the inline decay, `Config::decay`), only the
    /// first two: idle caches give back, nothing is stocked.
    pub(crate) fn maintain_slots(&self, pages: &PageAllocator, idle_passes: u32, upkeep: bool) {
        self.drain_and_reopen(pages);
        let idle = self
            .barn
            .idle
            .observe(self.barn.ops.load(Ordering::Relaxed));
        if idle >= idle_passes && self.barn.objects.load(Ordering::Relaxed) > 0 {
            if let Some((node, barn)) = self.lock_node_and_barn(Mode::Normal, pages) {
                self.flush_barn(pages, &node, &barn);
            }
        }
        for (i, slot) in self.slots().enumerate() {
            // Never taken (every sequence fails on a slot never prepared):
            // nothing to watch.
            if slot.cap.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let idle = slot.idle.observe(
                slot.spare.load(Ordering::Relaxed) as usize
                    ^ slot.top.load(Ordering::Relaxed).rotate_left(16)
                    ^ slot.main_last()
                    ^ slot.spare_if_any().map_or(0, Sheaf::len) << 56,
            );
            if idle >= idle_passes && slot.cached() > 0 {
                let Some((_, g)) = self.lock_remote(i) else {
                    continue;
                };
                let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) else {
                    return;
                };
                self.flush_main(slot, &g, pages, &node, Mode::Normal);
                self.flush_sheaf(slot.spare(), pages, &node, Mode::Normal);
                slot.demand.store(0, Ordering::Relaxed);
                continue;
            }
            if !upkeep || slot.demand.load(Ordering::Relaxed) == 0 || slot.cached() >= self.cap / 2
            {
                continue;
            }
            let Some((_, g)) = self.lock_remote(i) else {
                continue;
            };
            if slot.spare().len() > 0 {
                continue;
            }
            // Fill the empty spare the way a refill fills an empty main.
            slot.swap(&g);
            let filled = self.refill(slot, &g, pages, Mode::Normal);
            if let Ok(o) = filled {
                // A refill from the slabs can fill the sheaf completely
                // besides the object it returns: then that one goes back.
                if !slot.main_push(o, &g) && !slot.spare().push(o, self.cap) {
                    match self.node.lock.lock_in(Mode::Normal, pages.platform()) {
                        Some(node) => self.return_to_slab(o, pages, &node, Mode::Normal),
                        None => self.defer(o),
                    }
                }
            }
            slot.swap(&g);
        }
    }

    /// Normal context: deferred objects, every slot that can be taken, and
    /// the barn back to the slabs; every empty slab back to the page
    /// allocator.
    pub(crate) fn drain(&self, pages: &PageAllocator) {
        self.drain_deferred(pages);
        for i in 0..self.nslots {
            // An empty slot (never used, or emptied) is left alone: taking
            // a level-0 slot under rseq costs a fence, an interrupt of its
            // CPU. (A hint: a slot filled concurrently is that context's.)
            if self.slot_at(i).cached() == 0 {
                self.slot_at(i).demand.store(0, Ordering::Relaxed);
                continue;
            }
            let Some((slot, g)) = self.lock_remote(i) else {
                continue;
            };
            slot.demand.store(0, Ordering::Relaxed);
            // `None`: this thread holds the node lock itself (it interrupted
            // itself): nothing more to drain now.
            let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) else {
                return;
            };
            self.flush_main(slot, &g, pages, &node, Mode::Normal);
            self.flush_sheaf(slot.spare(), pages, &node, Mode::Normal);
        }
        let Some((node, barn)) = self.lock_node_and_barn(Mode::Normal, pages) else {
            return;
        };
        self.flush_barn(pages, &node, &barn);
        drop(barn);
        // Release the reserve of empty slabs too.
        for zi in 0..pages.zone_count() {
            let zone = pages.zone_at(zi);
            let mut i = self.node.partial[zi].load(Ordering::Relaxed);
            while i != NIL {
                let next = zone.desc(i).next.load(Ordering::Relaxed);
                crate::interrupt_point!(CacheDrain);
                if zone.desc(i).inuse.load(Ordering::Relaxed) == 0 {
                    self.release_slab(zone, zi, i, pages, &node, Mode::Normal);
                }
                i = next;
            }
        }
    }
}
