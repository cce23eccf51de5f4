//! The page allocator's nolock path: allocations that only try locks
//! (this CPU's lists, a zone's buddy lists, the stock of large blocks) and
//! may fail, and frees that never fail (a busy zone lock parks the block on
//! the zone's deferred stack).

use super::*;

impl PageAllocator {
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
    /// Never reclaiming means: free blocks cached on the per-CPU lists or in
    /// the nolock stock are not merged back into larger blocks here (nor
    /// deferred frees beyond the few each call merges). An allocator whose
    /// pages are all free but scattered over those caches may refuse a large
    /// order on this path (counted as `nolock_large_alloc_fail_empty`) until
    /// a normal-context call merges them: [`drain`](Self::drain), a normal
    /// allocation that misses, or a heap's maintenance. A page allocator
    /// used on its own from handlers or interrupts only should have some
    /// normal context call `drain` now and then.
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
        self.alloc_pages_nolock_next(order)
    }

    /// `alloc_pages_nolock_why` beyond the first zone's list: the newest
    /// grown zone's (`seq_alloc_newest_block`), then the slow path.
    #[inline(never)]
    fn alloc_pages_nolock_next(&self, order: u32) -> Result<NonNull<u8>, Fail> {
        if let Some(p) = self.seq_alloc_newest_block::<true>(order) {
            return Ok(p);
        }
        self.alloc_pages_nolock_slow(order)
    }

    #[inline(never)]
    pub(super) fn alloc_pages_nolock_slow(&self, order: u32) -> Result<NonNull<u8>, Fail> {
        if order > MAX_ORDER {
            return Err(Fail::Empty); // refused, not counted: not a memory shortage
        }
        // The grown zones' lists by the same restartable pop (counted in
        // their slots), before any try-lock (as `alloc_normal_once`).
        if order <= PCP_MAX_ORDER {
            if let Some((zone, idx)) =
                self.seq_alloc_grown::<true, { layout::PCP_NOLOCK_OK }>(order)
            {
                return Ok(self.ptr(zone, idx));
            }
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
    pub(super) fn nolock_from_zone(
        &self,
        zone: &Zone,
        cpu: usize,
        order: u32,
    ) -> Result<NonNull<u8>, Fail> {
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
                if let Some(idx) = zone.pcp_take(slot, &s, order) {
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
    pub(super) fn nolock_large_from_zone(
        &self,
        zone: &Zone,
        order: u32,
    ) -> Result<NonNull<u8>, Fail> {
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
    pub(super) fn free_claimed_nolock(&self, zone: &Zone, idx: u32, order: u32) {
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
}
