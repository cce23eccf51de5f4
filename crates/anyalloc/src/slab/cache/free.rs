//! A cache's frees of validated objects: the fast path (room in this CPU's
//! main sheaf), the slow path of each mode, and the deferred stack that a
//! nolock free parks an object on when every slot it may try is busy
//! (and the drains that take it back, counted for `fork`).

use super::*;

impl Cache {
    /// Normal-path free of a validated object. Fast path: nothing deferred,
    /// and room in the main sheaf of this CPU's level-0 slot.
    #[inline(always)]
    pub(crate) fn free(&self, pages: &PageAllocator, obj: usize) {
        if !(self.normal_fast_ok() && self.fast_push(pages, obj, Mode::Normal)) {
            self.free_slow(pages, pages.cpu(), obj);
        }
    }

    /// The normal free's slow path; a thread inside the allocator or in a
    /// nolock scope takes the nolock one.
    #[cold]
    #[inline(never)]
    pub(super) fn free_slow(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        if crate::context::nested() {
            return self.free_nolock_slow(pages, cpu, obj);
        }
        self.drain_and_reopen(pages);
        self.free_normal(pages, cpu, obj);
        // Every lock let go: a tick of the inline decay.
        pages.decay_tick();
    }

    #[inline]
    pub(super) fn free_normal(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        if let Some((slot, g)) = self.lock_own(cpu, 0) {
            crate::interrupt_point!(SheafFree);
            if self.push_slot(slot, &g, obj, pages, Mode::Normal).is_ok() {
                return;
            }
        }
        match self.node.lock.lock_in(Mode::Normal, pages.platform()) {
            Some(node) => self.return_to_slab(obj, pages, &node, Mode::Normal),
            // A stalled fork on another thread holds it: the nolock free,
            // whose sheaves the nolock path uses again at once (see
            // `fork::fork_stalled`).
            #[cfg(feature = "std")]
            None if crate::fork::fork_stalled() => self.free_nolock_slow(pages, cpu, obj),
            // This thread holds the node lock itself (it interrupted
            // itself), or a fork on another thread does: park the object
            // on the deferred stack. (Not a nolock level's sheaf: a free in
            // progress there at the clone would leave that slot held, and
            // its sheaf out of reach, in the child; a push on the stack is
            // one CAS.)
            None => {
                self.defer(obj);
                pages.wake_maintainer();
            }
        }
    }

    /// Nolock free of a validated object. Fast path: room in the main sheaf
    /// of this CPU's level-0 slot. Otherwise [`free_nolock_slow`](Self::free_nolock_slow).
    #[inline(always)]
    pub(crate) fn free_nolock(&self, pages: &PageAllocator, obj: usize) {
        if !self.fast_push(pages, obj, Mode::NoLock) {
            self.free_nolock_slow(pages, pages.cpu(), obj);
        }
    }

    /// Nolock free, the whole search: a slot at any level, else the slab
    /// under a tried node lock, else the deferred stack. Never fails.
    #[cold]
    #[inline(never)]
    pub(super) fn free_nolock_slow(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        for level in 0..LEVELS {
            if let Some((slot, g)) = self.lock_own(cpu, level) {
                crate::interrupt_point!(SheafFree);
                if self.push_slot(slot, &g, obj, pages, Mode::NoLock).is_ok() {
                    return;
                }
            }
        }
        if let Some(node) = self.node.lock.try_lock(pages.platform()) {
            self.return_to_slab(obj, pages, &node, Mode::NoLock);
            return;
        }
        self.defer(obj);
        pages.wake_maintainer();
    }

    pub(super) fn defer(&self, obj: usize) {
        // (The caller wakes the maintainer after the push.)
        self.deferred_count.fetch_add(1, Ordering::Relaxed);
        self.free_deferred.fetch_add(1, Ordering::Relaxed);
        self.deferred.push(obj, |o, next| {
            // `o` is a validated object being freed, owned by this free.
            self.set_deferred_link(o, next);
            crate::interrupt_point!(ObjectDeferredPush);
        });
        self.normal_cpus.close_after_push();
    }

    /// Puts a chain this context took off the deferred stack (from `chain`,
    /// not `NIL`) back on it, then closes the normal fast path as `defer`
    /// does: a drain that ran while the chain was taken saw an empty stack
    /// and may have reopened it (see `FastGate`).
    pub(super) fn put_back_deferred(&self, pages: &PageAllocator, chain: usize) {
        self.deferred.put_back(
            chain,
            |o| self.deferred_link(pages, o),
            |o, next| self.set_deferred_link(o, next),
        );
        self.normal_cpus.close_after_push();
    }

    /// A deferred object's link: its first word, keyed (`set_deferred_link`).
    /// `o` is on a deferred chain the caller took (`take_all`) and owns.
    /// The link must be the end of the stack or an object of this cache:
    /// anything else means `o` was written after its free (a use after
    /// free, say by the code a handler's free interrupted), which is
    /// reported rather than followed.
    pub(super) fn deferred_link(&self, pages: &PageAllocator, o: usize) -> usize {
        // SAFETY: per the caller: an object of this cache (at least 8
        // bytes) on a chain it owns, whose link `set_deferred_link` wrote,
        // made visible by the take's Acquire.
        let next = unsafe { (o as *const usize).read_unaligned() } ^ self.key;
        if next != crate::sync::NIL && !self.is_object_of(pages, next) {
            corrupt_link(pages.platform(), o);
        }
        next
    }

    /// Whether `addr` is the start of an object slot of this cache (its
    /// page is owned by this cache). Any context, no lock.
    pub(super) fn is_object_of(&self, pages: &PageAllocator, addr: usize) -> bool {
        pages.locate_indexed(addr).is_some_and(|(_, zone, idx)| {
            zone.desc(idx).owner.load(Ordering::Acquire) as usize
                == super::class::tag_of(self.index)
        }) && self.is_object_start(addr)
    }

    /// Writes a deferred object's link into its first word, keyed. `o` is a
    /// free object of this cache that the caller owns (being freed, or on a
    /// deferred chain it took).
    pub(super) fn set_deferred_link(&self, o: usize, next: usize) {
        // SAFETY: per the caller: an object of this cache (at least 8
        // bytes) that no other context uses.
        unsafe { (o as *mut usize).write_unaligned(next ^ self.key) };
    }

    /// Normal context, a slow path: drains the deferred stack if anything is
    /// on it, then reopens the fast path if it was closed (`normal_cpus`).
    #[inline]
    pub(super) fn drain_and_reopen(&self, pages: &PageAllocator) {
        if !self.deferred.is_empty() || !self.suspects.is_empty() {
            self.drain_deferred(pages);
        }
        if self.rseq && self.normal_cpus.cpus() == 0 {
            self.normal_cpus.reopen(self.cpus, &self.deferred);
        }
    }

    /// In a forked child (its only thread, before anything else uses the
    /// cache): counts `deferred_count` again from the deferred stack. A
    /// nolock free of another thread of the parent may have been cloned
    /// between its count and its push (`defer`), or a nolock allocation
    /// between taking objects off the stack and uncounting them: the
    /// child's count would cover objects on no stack (lost to the child, as
    /// the thread that held them), which no drain ever takes off it.
    #[cfg(feature = "std")]
    pub(crate) fn recount_deferred_after_fork(&self, pages: &PageAllocator) {
        // Takers of the parent's other threads (or cloned before they
        // uncounted themselves) are not here.
        self.takers.store(0, Ordering::Relaxed);
        let mut n = 0;
        let mut o = self.deferred.head();
        while o != crate::sync::NIL {
            n += 1;
            // On the stack, with nothing else running: its link is written.
            o = self.deferred_link(pages, o);
        }
        self.deferred_count.store(n, Ordering::Relaxed);
    }

    /// Counts this context as a taker of the deferred stack or the
    /// suspects, until the guard is dropped; `None` (uncounted) while a
    /// fork on another thread is in progress: it may have looked for takers
    /// already, so the stacks are left alone. Counted first, then the forks
    /// read (both `SeqCst`, as `prepare` counts itself in `FORKING` before
    /// `lock_all` reads the takers): either that fork waits for this one,
    /// or this one sees the fork. Counts nest (a drain of the suspects
    /// counts itself, then each `is_free` it runs). Any context.
    pub(super) fn deferred_taker(&self) -> Option<DeferredTaker<'_>> {
        self.takers.fetch_add(1, Ordering::SeqCst);
        let taker = DeferredTaker(&self.takers);
        #[cfg(feature = "std")]
        if crate::fork::fork_mark().forking_elsewhere() {
            return None;
        }
        Some(taker)
    }

    /// Contexts that hold a chain taken off the deferred stack or the
    /// suspects (see `takers`).
    #[cfg(feature = "std")]
    pub(crate) fn deferred_takers(&self) -> u32 {
        self.takers.load(Ordering::SeqCst)
    }

    /// Normal context: frees every deferred object through the normal path.
    pub(crate) fn drain_deferred(&self, pages: &PageAllocator) {
        if !self.suspects.is_empty() {
            self.drain_suspects(pages);
        }
        if self.deferred.is_empty() {
            return;
        }
        // No signal handler runs on this thread while the chain is counted
        // (those that come meanwhile run once it is drained): one that
        // forks would wait for this count, its own thread's.
        #[cfg(feature = "std")]
        let _quiet = crate::platform::SignalsBlocked::new();
        let Some(_taker) = self.deferred_taker() else {
            return;
        };
        let mut o = self.deferred.take_all();
        let cpu = pages.cpu();
        while o != crate::sync::NIL {
            // The chain is ours (take_all).
            let next = self.deferred_link(pages, o);
            crate::interrupt_point!(ObjectDeferredDrain);
            self.deferred_count.fetch_sub(1, Ordering::Relaxed);
            self.free_normal(pages, cpu, o);
            o = next;
        }
    }
}
