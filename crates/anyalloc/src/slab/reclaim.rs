//! Giving memory back: the shrinker registry and reclaim (memory low, or a
//! group over its limit), `drain` (every cache and list back to the page
//! allocator), and the maintenance thread's pass (idle caches, deferred
//! frees, stocks).

use super::*;

/// One registered shrinker: a node of the registry's append-only list.
pub(super) struct ShrinkerNode {
    pub(super) f: alloc::boxed::Box<dyn Fn(usize) -> usize + Send + Sync>,
    pub(super) next: *mut ShrinkerNode,
}

/// The registered shrinkers: an append-only lock-free list (Treiber push,
/// no removal until the heap is dropped, so no ABA and no reclamation
/// problem). Registering allocates the node *before* linking it, and
/// running the shrinkers walks the list without a lock and without
/// allocating: an allocation made on the way (a shrinker's own, or a
/// nested reclaim's) can never wait for this registry.
pub(super) struct Shrinkers {
    head: AtomicPtr<ShrinkerNode>,
    /// Without std (no per-thread state): whether some context runs the
    /// shrinkers; a reclaim meanwhile (one nested in a shrinker, which
    /// allocated) does not run them again, so reclaim cannot recurse
    /// without bound. With std, each thread's shrinker mark does this
    /// (see `run_shrinkers`).
    #[cfg(not(feature = "std"))]
    running: AtomicBool,
}

impl Shrinkers {
    pub(super) const fn new() -> Self {
        Shrinkers {
            head: AtomicPtr::new(core::ptr::null_mut()),
            #[cfg(not(feature = "std"))]
            running: AtomicBool::new(false),
        }
    }

    /// Links a node allocated by the caller (no lock is held while it was
    /// allocated).
    pub(super) fn push(&self, node: alloc::boxed::Box<ShrinkerNode>) {
        let node = alloc::boxed::Box::into_raw(node);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until the CAS below publishes it.
            unsafe { (*node).next = head };
            crate::interrupt_point!(ShrinkerRegistry);
            // Release: the node's contents are visible to every walker.
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    /// Calls `f` on every registered shrinker (newest first).
    pub(super) fn for_each(&self, mut f: impl FnMut(&(dyn Fn(usize) -> usize + Send + Sync))) {
        let mut n = self.head.load(Ordering::Acquire);
        while !n.is_null() {
            crate::interrupt_point!(ShrinkerRegistry);
            // SAFETY: published nodes are never freed before the heap is
            // dropped (`Drop` below), and never change after publication.
            let node = unsafe { &*n };
            f(&*node.f);
            n = node.next;
        }
    }
}

impl Drop for Shrinkers {
    fn drop(&mut self) {
        let mut n = *self.head.get_mut();
        while !n.is_null() {
            // SAFETY: every node was leaked from a Box by `push` and is
            // reachable only from this list, which nobody uses any more.
            let node = unsafe { alloc::boxed::Box::from_raw(n) };
            n = node.next;
        }
    }
}

impl HeapCore {
    pub(super) fn reclaim_callback(ctx: *const ()) {
        // SAFETY: installed by `build` with the core's stable address.
        let core = unsafe { &*(ctx as *const HeapCore) };
        core.run_shrinkers();
    }

    /// Runs every shrinker, then drains every CPU's caches. Normal context,
    /// no allocator lock held.
    pub(super) fn reclaim(&self) {
        self.run_shrinkers();
        // Not patient: the allocation that reclaims may be one a fork on
        // another thread waits for (see the `fork` module).
        self.drain(false);
    }

    /// Calls every shrinker: no lock held, nothing allocated here. A call
    /// nested in a shrinker on the same thread (the shrinker allocated and
    /// the allocation reclaimed), of this heap or another one, returns at
    /// once: with std, this thread's shrinker mark
    /// ([`context::Shrinking`](crate::context::Shrinking)) says so, for
    /// any number of threads reclaiming at once; without std (no
    /// per-thread state), the heap's `running` flag does, and a reclaim
    /// anywhere while the shrinkers run skips them.
    pub(super) fn run_shrinkers(&self) {
        #[cfg(feature = "std")]
        let Some(_mark) = crate::context::Shrinking::enter() else {
            return; // inside a shrinker on this thread
        };
        #[cfg(not(feature = "std"))]
        let _running = {
            let running = &self.shrinkers.running;
            if running.swap(true, Ordering::Acquire) {
                return; // inside a shrinker (or another context runs them)
            }
            /// Clears the flag even if a shrinker unwinds.
            struct Running<'a>(&'a AtomicBool);
            impl Drop for Running<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            Running(running)
        };
        self.reclaims.fetch_add(1, Ordering::Relaxed);
        self.shrinkers.for_each(|s| {
            let freed = self.call_shrinker(s);
            self.shrinker_freed
                .fetch_add(freed as u64, Ordering::Relaxed);
        });
    }

    /// Runs one shrinker. A shrinker runs inside an allocation (perhaps a
    /// `GlobalAlloc` call, which must not unwind) or on the maintenance
    /// thread, so a panic in it ends the process with a one-line message
    /// (after the panic's own), rather than unwind through the allocator.
    #[cfg(feature = "std")]
    pub(super) fn call_shrinker(&self, s: &(dyn Fn(usize) -> usize + Send + Sync)) -> usize {
        match std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| s(RECLAIM_BYTES))) {
            Ok(freed) => freed,
            // The payload is not dropped (that would free through the
            // global allocator): `fatal` does not return.
            Err(_payload) => self.pages.fatal(
                FatalMessage::new()
                    .text("anyalloc: a shrinker panicked (shrinkers run inside allocations and must not unwind)"),
            ),
        }
    }

    /// Runs one shrinker (without std, a panic is the embedder's panic
    /// handler's to deal with).
    #[cfg(not(feature = "std"))]
    pub(super) fn call_shrinker(&self, s: &(dyn Fn(usize) -> usize + Send + Sync)) -> usize {
        s(RECLAIM_BYTES)
    }

    /// `patient`: waits for the maintenance lock even while a `fork` on
    /// another thread holds it (`Heap::drain`), rather than give way and
    /// skip the drain (reclaim inside an allocation).
    pub(super) fn drain(&self, patient: bool) {
        crate::context::might_wait("Heap::drain");
        if crate::context::nested() {
            return;
        }
        let platform = self.pages.platform();
        let serial = if patient {
            self.maint_lock.lock_patient(platform)
        } else {
            self.maint_lock.lock_in(Mode::Normal, platform)
        };
        // `None`: this thread is draining already (it interrupted itself),
        // or a fork holds the lock (patient: for longer than
        // `fork::DRAIN_PATIENCE`).
        let Some(_serial) = serial else {
            return;
        };
        for i in 0..CACHES {
            self.cache(i).drain(&self.pages);
        }
        #[cfg(feature = "std")]
        {
            self.drain_huge_deferred();
            self.release_huge_cache(0, 0, true);
        }
        account::drop_released(&self.released_groups);
        self.pages.drain_normal();
    }

    /// Advances the heap's maintenance epoch by `n` and returns it: the one
    /// clock of `Heap::maintain` (one per call) and the maintenance thread
    /// (one per `EPOCH` of its time), which each pass gives the zones to
    /// stamp the blocks freed from then on.
    pub(crate) fn advance_epoch(&self, n: usize) -> usize {
        self.epoch.fetch_add(n, Ordering::Relaxed) + n
    }

    /// One maintenance pass at `epoch`: free blocks idle for `idle_epochs`
    /// epochs go back to the OS, caches unchanged for `idle_passes` passes
    /// go back to the slabs and the page allocator.
    pub(crate) fn maintain_pass(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) {
        let Some(serial) = self.maint_lock.lock_in(Mode::Normal, self.pages.platform()) else {
            return;
        };
        self.passes.fetch_add(1, Ordering::Relaxed);
        account::drop_released(&self.released_groups);
        #[cfg(feature = "std")]
        {
            self.drain_huge_deferred();
            self.release_huge_cache(epoch, idle_epochs, false);
        }
        for i in 0..CACHES {
            self.cache(i).maintain_slots(&self.pages, idle_passes, true);
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

    /// Installs (`on`) or removes this heap's inline decay (`Config::decay`).
    #[cfg(feature = "std")]
    pub(super) fn install_decay(&self, on: bool) {
        let f: fn(*const ()) = HeapCore::decay_callback;
        self.pages
            .set_decayer(on.then_some(f), self as *const HeapCore as *const ());
    }

    /// The page allocator's inline decay callback (`set_decayer`).
    #[cfg(feature = "std")]
    pub(super) fn decay_callback(ctx: *const ()) {
        // SAFETY: installed by `Heap::set_decay` with the core's stable
        // address; removed before the core goes (the page allocator, which
        // calls it, is part of the core).
        let core = unsafe { &*(ctx as *const HeapCore) };
        core.decay();
    }

    /// The inline decay (`Config::decay`; a heap that no maintainer
    /// serves): called every `context::DECAY_TICKS` slow-path ticks of a
    /// thread, normal context, no lock held. Reads the monotonic clock; in
    /// a new epoch (`maintain::EPOCH`, 100 ms) since its last pass, and
    /// unless another thread takes that epoch's pass, runs a pass of the
    /// maintainer's give-back work ([`decay_pass`](Self::decay_pass)). The
    /// first look only starts the clock.
    #[cfg(feature = "std")]
    pub(crate) fn decay(&self) {
        let now = crate::platform::monotonic_ns() / crate::maintain::EPOCH.as_nanos() as u64;
        let last = self.decay_epoch.load(Ordering::Relaxed);
        if now <= last
            || self
                .decay_epoch
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if last == 0 {
            return; // the clock starts
        }
        // The heap's epoch advances by the time elapsed, as the
        // maintainer's does (`Maintained::pass`).
        let elapsed = (now - last).min(usize::MAX as u64) as usize;
        let epoch = self.advance_epoch(elapsed);
        self.decay_pass(
            epoch,
            crate::maintain::IDLE_EPOCHS,
            crate::maintain::IDLE_PASSES,
        );
    }

    /// One inline decay pass at `epoch`: what a maintenance pass does for
    /// idle memory, bounded, and nothing else. Kept huge mappings unused
    /// for `idle_epochs` epochs are unmapped (and parked huge blocks).
    /// Caches and barns unchanged
    /// for `idle_passes` passes give their objects back to the slabs and
    /// their pages to the page allocator, whose idle per-CPU lists go back
    /// to the buddy lists, and free blocks idle for `idle_epochs` epochs go
    /// back to the OS (`PageAllocator::decay`: a bounded number per zone).
    /// Frees that nolock callers parked are taken, as the maintainer's
    /// wake does (a heap without one has nothing to wake): huge blocks
    /// here, a cache's objects in `maintain_slots`, pages in
    /// `PageAllocator::decay`. Not the maintainer's upkeep: no stocking
    /// for the nolock path, no shrinkers. The maintenance lock is only
    /// tried: a pass, drain or trim elsewhere does this work already. The
    /// system calls are the
    /// maintainer's: each `madvise` runs with only the maintenance and
    /// drain locks held, which no nolock caller ever tries (the zone lock
    /// is let go around it); flushing another CPU's idle cache takes its
    /// slot with a membarrier fence (a nolock caller on that CPU finds the
    /// slot busy meanwhile and goes elsewhere).
    #[cfg(feature = "std")]
    pub(crate) fn decay_pass(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) {
        let Some(serial) = self.maint_lock.try_lock(self.pages.platform()) else {
            return;
        };
        self.passes.fetch_add(1, Ordering::Relaxed);
        // Huge blocks: those a nolock free parked, and the freed mappings
        // kept for reuse (up to 64 MiB, resident) that stayed unused for
        // `idle_epochs`, as the maintainer's pass unmaps them.
        self.drain_huge_deferred();
        self.release_huge_cache(epoch, idle_epochs, false);
        for i in 0..CACHES {
            self.cache(i)
                .maintain_slots(&self.pages, idle_passes, false);
        }
        let released = self.pages.decay(epoch, idle_epochs, idle_passes);
        self.released_bytes
            .fetch_add(released as u64, Ordering::Relaxed);
        drop(serial);
    }

    /// Wakes the maintenance thread whatever its state (normal context:
    /// stopping it).
    #[cfg(feature = "std")]
    pub(crate) fn wake_maintainer_now(&self) {
        self.pages.wake_maintainer_now();
    }

    /// Whether the nolock path may make system calls (else the maintainer
    /// polls).
    #[cfg(feature = "std")]
    pub(crate) fn nolock_syscalls(&self) -> bool {
        self.pages.nolock_syscalls()
    }

    /// The maintainer's quick duty after a wake: deferred frees only.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn drain_deferred_only(&self) {
        let Some(_serial) = self.maint_lock.lock_in(Mode::Normal, self.pages.platform()) else {
            return;
        };
        for i in 0..CACHES {
            self.cache(i).drain_deferred(&self.pages);
        }
        #[cfg(feature = "std")]
        self.drain_huge_deferred();
        for zone in self.pages.zones() {
            if let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) {
                zone.drain_deferred(&g);
            }
        }
    }
}
