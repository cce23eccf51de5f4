//! Accounted allocations (`Heap::alloc_in`, `Heap::alloc_nolock_in`): the
//! group and its ancestors are charged before the block is served from the
//! accounted caches (whose slabs keep one owner word per object), and a
//! charge over a limit runs reclaim once on the normal path. See
//! [`crate::account`].

use super::*;

impl HeapCore {
    pub(super) fn alloc_in(&self, layout: Layout, group: &Arc<Group>) -> Option<NonNull<u8>> {
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
        let p = self.retry_after_miss(
            layout,
            Some(group),
            || {
                group.flush_tree_stocks();
                self.reclaim();
                group.flush_tree_stocks();
            },
            || self.try_alloc_in(layout, group, false, true),
        );
        // (A lock it gave way to may be orphaned: see `alloc_orphaned`.)
        #[cfg(feature = "std")]
        if p.is_none() && crate::fork::orphaned() {
            return self.alloc_orphaned(layout, Some(group));
        }
        p
    }

    pub(super) fn alloc_nolock_in(
        &self,
        layout: Layout,
        group: &Arc<Group>,
    ) -> Option<NonNull<u8>> {
        self.try_alloc_in(layout, group, true, true)
    }

    /// Allocates from the accounted caches (or pages, or mmap), charges the
    /// usable size to `group`, and records the group with the memory.
    /// `last`: the caller's last attempt (a refusal counts in the refusing
    /// group's `failcnt`).
    pub(super) fn try_alloc_in(
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
    pub(super) fn alloc_huge_in(
        &self,
        layout: Layout,
        group: &Arc<Group>,
        last: bool,
    ) -> Option<NonNull<u8>> {
        let size = huge_size(layout)?;
        if !group.try_charge(size, self.cpu(), last, &self.released_groups) {
            return None;
        }
        let align = layout.align().max(PAGE_SIZE);
        // Exact: the group is charged `size`, and its free uncharges the
        // size the table holds.
        let reserved = self.huge_map(size, align, false, 0).map(|(p, _)| p);
        let g = account::retain(group);
        // From the insert to the count, inside the allocator (see
        // `HugeCountWindow`).
        let window = HugeCountWindow::enter();
        match reserved {
            Some(p) if self.huge.insert(p as usize, size, g) => {
                self.huge_live.fetch_add(1, Ordering::Relaxed);
                self.huge_bytes.fetch_add(size, Ordering::Relaxed);
                NonNull::new(p)
            }
            other => {
                drop(window);
                if let Some(p) = other {
                    // SAFETY: just mapped (or taken), never handed out.
                    unsafe { self.huge_unmap(p as usize, size) };
                }
                self.uncharge(g, size);
                None
            }
        }
    }
}
