//! The page allocator's normal path: allocations (the restartable
//! sequences' fast path, then the zones under their locks, reclaim, and
//! growth by new zones), frees (the shared fast path, then the route's slow
//! path), and the hooks through which it asks for reclaim and wakes the
//! maintainer.

use super::*;
use crate::sync::wake_word;

impl PageAllocator {
    /// Allocates `2^order` contiguous pages, aligned to their size. Normal
    /// context: may wait on a lock, reclaim, and grow the heap. `None` when
    /// `order > MAX_ORDER` or memory is exhausted.
    ///
    /// Called by a thread already inside the allocator (a signal handler
    /// that interrupted it) or inside a nolock scope, it takes the nolock
    /// path instead (the crate's `context` module).
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator, MAX_ORDER, PAGE_SIZE};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(2).expect("memory to spare"); // 4 pages, 16 KiB
    /// assert_eq!(p.as_ptr() as usize % (4 * PAGE_SIZE), 0, "aligned to its size");
    /// assert!(pages.alloc_pages(MAX_ORDER + 1).is_none());
    /// // SAFETY: allocated above with order 2, freed once.
    /// unsafe { pages.free_pages(p, 2) };
    /// ```
    #[inline]
    pub fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        crate::context::might_wait("PageAllocator::alloc_pages");
        // Every context shares the rseq fast path; the rest is one call.
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_routed(order)
    }

    /// `alloc_pages` beyond the first zone's list: the newest grown zone's
    /// (`seq_alloc_newest_block`), then the slow path.
    #[inline(never)]
    pub(super) fn alloc_pages_routed(&self, order: u32) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc_newest_block::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_routed_slow(order)
    }

    /// `alloc_pages` beyond its fast paths: routed by the thread's context.
    #[inline(never)]
    fn alloc_pages_routed_slow(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        if crate::context::nested() {
            return self.alloc_pages_nolock(order);
        }
        #[cfg(feature = "std")]
        loop {
            let mark = crate::fork::fork_mark();
            match self.alloc_pages_normal(order) {
                None if crate::fork::forked_elsewhere_since(mark) => {}
                // A lock it gave way to may be orphaned (the `fork`
                // module's "Orphaned locks"): what the nolock path serves.
                None if crate::fork::orphaned() => return self.alloc_pages_nolock(order),
                p => return p,
            }
            // A fork on another thread holds the locks (the miss may be
            // theirs, not memory's; see the `fork` module's "Other threads
            // give way"), as for the heap's allocations
            // (`Heap::alloc_while_forking`), except that pages cannot be
            // mapped beside the allocator:
            // 1. wait for the fork, at most `FORK_PATIENCE` (not at all
            //    once a wait for it ran out), and try again;
            if crate::fork::wait_for_fork() {
                continue;
            }
            // 2. else the fork is stalled, maybe waiting for this very
            //    thread (a signal handler that interrupted the holder of
            //    one of glibc's locks): the nolock path, which serves from
            //    the per-CPU lists and stocks (the zones' locks are the
            //    fork's). Not before: an allocation in progress on a nolock
            //    level's list at the clone would leave it held in the child;
            if let Some(p) = self.alloc_pages_nolock(order) {
                return Some(p);
            }
            // 3. else wait for the fork longer, at most `FORK_PATIENCE_LAST`,
            //    once per fork, and try again; else no block. (Waiting the
            //    full patience at every call held a handler that
            //    interrupted the glibc lock's holder a second per call, and
            //    with it the fork: a storm's handler calls, one after
            //    another, stalled both for tens of seconds.)
            if !crate::fork::wait_for_fork_last() {
                return None;
            }
        }
        #[cfg(not(feature = "std"))]
        self.alloc_pages_normal(order)
    }

    /// The normal path of `alloc_pages`, for callers that decided the
    /// route already (the heap). Not routed: a caller holding a lock of the
    /// heap is marked inside, and still means the normal path.
    #[inline]
    pub(crate) fn alloc_pages_normal(&self, order: u32) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_normal_next(order)
    }

    /// `alloc_pages_normal` beyond the first zone's list: the newest grown
    /// zone's (`seq_alloc_newest_block`), then the slow path.
    #[inline(never)]
    fn alloc_pages_normal_next(&self, order: u32) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc_newest_block::<false>(order) {
            return Some(p);
        }
        self.alloc_pages_normal_slow(order)
    }

    #[inline(never)]
    pub(super) fn alloc_pages_normal_slow(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        // (`alloc_pages_normal` popped the first zone's list just now.)
        let p = match self.alloc_normal_after_pop(order, true) {
            Some(p) => Some(p),
            None => self.alloc_slow(order, true),
        };
        self.decay_tick();
        p
    }

    /// As `alloc_pages`, but never runs the owner's reclaim callback (for
    /// callers that hold a lock a shrinker might need).
    pub(crate) fn alloc_pages_without_reclaim(&self, order: u32) -> Option<NonNull<u8>> {
        if order > MAX_ORDER {
            return None;
        }
        if let Some(p) = self.alloc_normal_once(order, true) {
            return Some(p);
        }
        self.alloc_slow(order, false)
    }

    #[cold]
    pub(super) fn alloc_slow(&self, order: u32, may_reclaim: bool) -> Option<NonNull<u8>> {
        // A fork on another thread holds the locks, which the attempt gave
        // way to: draining, growing and reclaiming would give way too, or
        // run the shrinkers for nothing. The callers wait for the fork or
        // go round it (see the `fork` module's "Other threads give way").
        #[cfg(feature = "std")]
        if crate::fork::fork_mark().forking_elsewhere() {
            return None;
        }
        // The zones this attempt tries (read before it: a zone added later
        // is another thread's growth, which `grow` counts as new).
        #[cfg(feature = "std")]
        let mut seen = self.nzones.load(Ordering::Acquire);
        // Reclaim: every per-CPU list and deferred stack back to the buddy
        // lists, then try again above the watermark.
        self.drain_normal();
        if let Some(p) = self.alloc_normal_once(order, true) {
            return Some(p);
        }
        #[cfg(feature = "std")]
        if self.config.grow {
            loop {
                let mine = match self.grow(seen, order) {
                    Growth::Refused => break,
                    Growth::Added(Some(p)) => return Some(p),
                    // Its reserve keeps the order (a zone shrunk to fit a
                    // limit on address space): one more look at the others.
                    Growth::Added(None) => true,
                    Growth::OthersAdded => false,
                };
                seen = self.nzones.load(Ordering::Acquire);
                if let Some(p) = self.alloc_normal_once(order, true) {
                    return Some(p);
                }
                // The zone another thread added was used up before this
                // attempt reached it (its grower's block, other threads'
                // and handlers' allocations splitting its largest blocks):
                // grow again, not report no memory with room left to add.
                // Each such round saw the zone count rise, so there are at
                // most `MAX_ZONES` of them.
                if mine {
                    break;
                }
            }
        }
        // Below the min watermark with no zone to add: ask the owner's
        // shrinkers to give memory back, drain again, retry.
        if !may_reclaim {
            // The caller holds a lock a shrinker may need: ask the owner to
            // reclaim once that lock is released.
            if !self.reclaimer.load(Ordering::Relaxed).is_null() {
                self.reclaim_wanted.store(true, Ordering::Relaxed);
            }
        } else if self.run_reclaimer() {
            self.drain_normal();
            if let Some(p) = self.alloc_normal_once(order, true) {
                return Some(p);
            }
        }
        // Last resort of a caller that has reclaimed: the min reserve.
        self.alloc_normal_once(order, false)
    }

    /// Installs the owner's reclaim callback (`f(ctx)` runs shrinkers; normal
    /// context). `ctx` must stay valid as long as the allocator.
    pub(crate) fn set_reclaimer(&self, f: fn(*const ()), ctx: *const ()) {
        self.reclaim_ctx.store(ctx as *mut (), Ordering::Relaxed);
        self.reclaimer.store(f as *mut (), Ordering::Release);
    }

    pub(super) fn run_reclaimer(&self) -> bool {
        let f = self.reclaimer.load(Ordering::Acquire);
        if f.is_null() {
            return false;
        }
        // SAFETY: only `set_reclaimer` stores non-null values, and it stores
        // `fn(*const ())` pointers.
        let f: fn(*const ()) = unsafe { core::mem::transmute::<*mut (), fn(*const ())>(f) };
        f(self.reclaim_ctx.load(Ordering::Relaxed));
        true
    }

    /// Installs (`Some`) or removes (`None`) the owner's inline decay pass
    /// (`f(ctx)`, normal context, no lock of the allocator held: see
    /// `Config::decay`). `ctx` must stay valid as long as the allocator.
    #[cfg(feature = "std")]
    pub(crate) fn set_decayer(&self, f: Option<fn(*const ())>, ctx: *const ()) {
        self.decay_ctx.store(ctx as *mut (), Ordering::Relaxed);
        let f = f.map_or(core::ptr::null_mut(), |f| f as *mut ());
        self.decayer.store(f, Ordering::Release);
    }

    /// A normal-path call took a slow path (it is past every fast path and
    /// holds no lock of the allocator, or this does nothing): one tick of
    /// the inline decay, when the owner installed one (a heap that no
    /// maintainer serves, `Config::decay`). Every
    /// [`DECAY_TICKS`](crate::context::DECAY_TICKS)-th tick of a thread
    /// runs the owner's pass, which looks at the clock and gives idle
    /// memory back at most once per epoch. Never on the nolock path: a
    /// thread inside the allocator (a handler that interrupted it there, a
    /// caller holding a heap's lock) or in a nolock scope does not tick.
    /// The fast paths never come here.
    #[inline]
    pub(crate) fn decay_tick(&self) {
        #[cfg(feature = "std")]
        if !self.decayer.load(Ordering::Relaxed).is_null()
            && !crate::context::nested()
            && crate::context::decay_tick()
        {
            self.run_decayer();
        }
    }

    #[cfg(feature = "std")]
    #[cold]
    #[inline(never)]
    fn run_decayer(&self) {
        let f = self.decayer.load(Ordering::Acquire);
        if f.is_null() {
            return;
        }
        // SAFETY: only `set_decayer` stores non-null values, and it stores
        // `fn(*const ())` pointers.
        let f: fn(*const ()) = unsafe { core::mem::transmute::<*mut (), fn(*const ())>(f) };
        f(self.decay_ctx.load(Ordering::Relaxed));
    }

    /// Whether an allocation asked for reclaim it could not run (a hint;
    /// does not clear the request).
    #[inline]
    pub(crate) fn reclaim_requested(&self) -> bool {
        self.reclaim_wanted.load(Ordering::Relaxed)
    }

    /// Whether an allocation asked for reclaim it could not run (and clears
    /// the request).
    #[inline]
    pub(crate) fn take_reclaim_request(&self) -> bool {
        self.reclaim_wanted.load(Ordering::Relaxed)
            && self.reclaim_wanted.swap(false, Ordering::Relaxed)
    }

    /// Installs the maintainer's wake word: a deferred free wakes it.
    /// `word` must stay valid as long as the allocator.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn set_waker(&self, word: *const core::sync::atomic::AtomicU32) {
        self.waker.store(word as *mut _, Ordering::Release);
    }

    /// Whether the nolock path may make system calls (see
    /// `Config::nolock_syscalls`).
    #[inline]
    pub(crate) fn nolock_syscalls(&self) -> bool {
        self.config.nolock_syscalls
    }

    /// Tells the maintainer, if there is one, that it has work. Any context:
    /// one atomic OR on the wake word (`WAKE_OWED`, the `sync::wake_word`
    /// protocol); only the 0 -> 1 transition of a *sleeping* maintainer
    /// (`MAINTAINER_SLEEPING` set)
    /// issues the platform's wake (a futex wake on std: never blocks), so
    /// at most one per maintainer sleep; none with `nolock_syscalls` off
    /// (the maintainer polls then).
    #[inline]
    pub(crate) fn wake_maintainer(&self) {
        let w = self.waker.load(Ordering::Acquire);
        if !w.is_null() {
            // SAFETY: set_waker's contract keeps the word alive.
            let w = unsafe { &*w };
            if wake_word::owe(w) && self.config.nolock_syscalls {
                self.platform.wake_one(w);
            }
        }
    }

    /// Normal context (stopping the maintainer): owes it a wake and wakes
    /// it whatever its state.
    #[cfg(feature = "std")]
    pub(crate) fn wake_maintainer_now(&self) {
        let w = self.waker.load(Ordering::Acquire);
        if !w.is_null() {
            // SAFETY: set_waker's contract keeps the word alive.
            let w = unsafe { &*w };
            wake_word::owe(w);
            self.platform.wake_one(w);
        }
    }

    /// One maintenance pass (normal context): merges deferred frees, keeps
    /// per-CPU lists that ran empty on the nolock path stocked (and returns
    /// idle ones, see `Zone::maintain_slots`), and (std) returns free blocks
    /// idle for `idle_epochs` epochs to the OS. Returns the bytes released.
    #[cfg_attr(not(feature = "std"), allow(unused_mut))]
    pub(crate) fn maintain(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) -> usize {
        let Some(_serial) = self.drain_lock.lock_in(Mode::Normal, self.platform) else {
            return 0;
        };
        let mut released = 0;
        for zone in self.zones() {
            // Never back: passes that advanced the epoch one after the
            // other may get here the other way round.
            zone.epoch.fetch_max(epoch, Ordering::Relaxed);
            if let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) {
                zone.drain_deferred(&g);
                zone.stock_maintain(idle_passes, true, &g);
            }
            zone.maintain_slots(idle_passes, true);
            #[cfg(feature = "std")]
            {
                let small = zone::RELEASE_MIN_ORDER;
                released +=
                    zone.release_idle_blocks(small..=MAX_ORDER, epoch, idle_epochs, RELEASE_BUDGET);
                released += zone.release_idle_blocks(
                    0..=small - 1,
                    epoch,
                    idle_epochs * zone::SMALL_AGE_FACTOR,
                    SMALL_RELEASE_BUDGET,
                );
            }
            #[cfg(not(feature = "std"))]
            let _ = idle_epochs;
        }
        released
    }

    /// The inline decay's share of a pass (`Config::decay`; normal context,
    /// the caller holds the heap's maintenance lock): blocks parked by
    /// nolock frees merge into the buddy lists, per-CPU lists and
    /// nolock stocks left unchanged (unused) for `idle_passes` passes go
    /// back to the buddy lists, and
    /// free blocks idle for `idle_epochs` epochs (below `RELEASE_MIN_ORDER`
    /// four times as long) go back to the OS, at most
    /// [`DECAY_RELEASE_BUDGET`] and [`DECAY_SMALL_RELEASE_BUDGET`] blocks
    /// per zone. None of the maintainer's upkeep (stocking for the nolock
    /// path, trimming). The drain lock is only tried: a drain or trim in
    /// progress elsewhere is doing this work already. Returns the bytes
    /// released.
    #[cfg(feature = "std")]
    pub(crate) fn decay(&self, epoch: usize, idle_epochs: usize, idle_passes: u32) -> usize {
        let Some(_serial) = self.drain_lock.try_lock(self.platform) else {
            return 0;
        };
        let small = zone::RELEASE_MIN_ORDER;
        let mut released = 0;
        for zone in self.zones() {
            zone.epoch.fetch_max(epoch, Ordering::Relaxed);
            // Blocks nolock frees parked (the zone lock was held) merge
            // into the buddy lists, where they can age and go back to the
            // OS below; without a maintainer to wake, only the next
            // zone-lock holder took them. A stock no nolock allocation
            // used for `idle_passes` passes goes back to the buddy lists
            // (normal zone-lock holders keep a wanted one filled: without
            // this it stayed for good). Neither, nothing to do: the zone
            // lock is left alone.
            let stocked = zone.stock_kept();
            if stocked || zone.deferred_pages() != 0 {
                if let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) {
                    zone.drain_deferred(&g);
                    if stocked {
                        zone.stock_maintain(idle_passes, false, &g);
                    }
                }
            }
            zone.maintain_slots(idle_passes, false);
            released += zone.release_idle_blocks(
                small..=MAX_ORDER,
                epoch,
                idle_epochs,
                DECAY_RELEASE_BUDGET,
            );
            released += zone.release_idle_blocks(
                0..=small - 1,
                epoch,
                idle_epochs * zone::SMALL_AGE_FACTOR,
                DECAY_SMALL_RELEASE_BUDGET,
            );
        }
        released
    }

    /// Normal context: every free block on the buddy lists that is not yet
    /// returned to the OS goes back now, whatever its order (`malloc_trim`).
    /// Returns the bytes.
    #[cfg(feature = "std")]
    pub(crate) fn release_free_blocks(&self) -> usize {
        // (`None`: this thread holds it, a trim called inside a drain; a
        // fork on another thread held it longer than `fork::DRAIN_PATIENCE`;
        // or, in an orphaned child, a thread of the parent held it at the
        // fork: see the `fork` module's "Orphaned locks".)
        let Some(_serial) = self.drain_lock.lock_patient(self.platform) else {
            return 0;
        };
        self.zones().map(|z| z.release_all_free_blocks()).sum()
    }

    /// Whether some zone's free buddy pages are below twice its min
    /// watermark (the "low" mark at which shrinkers run).
    pub(crate) fn below_low(&self) -> bool {
        self.zones().any(|z| z.free_buddy() < 2 * z.min)
    }

    pub(super) fn alloc_normal_once(&self, order: u32, above_min: bool) -> Option<NonNull<u8>> {
        if let Some(p) = self.seq_alloc::<false>(order) {
            return Some(p);
        }
        self.alloc_normal_after_pop(order, above_min)
    }

    /// `alloc_normal_once` for a caller that has just popped the first
    /// zone's list (`seq_alloc`) and found it empty: the grown zones'
    /// lists, then each zone under its locks.
    fn alloc_normal_after_pop(&self, order: u32, above_min: bool) -> Option<NonNull<u8>> {
        // The zones growth added: this CPU's level-0 list of each, popped
        // by the same restartable sequence as the first zone's, before any
        // lock. Frees of their blocks go onto those lists; without this,
        // once the first zone ran dry every allocation first tried to
        // refill from it under its zone lock (a 16 KiB pair in a grown
        // zone took 4.7 times the first zone's). (No gate: popping a
        // block already off the buddy lists moves no watermark.)
        if order <= PCP_MAX_ORDER {
            if let Some((zone, idx)) =
                self.seq_alloc_grown::<false, { layout::PCP_NOLOCK_OK }>(order)
            {
                return Some(self.ptr(zone, idx));
            }
        }
        let cpu = self.cpu();
        for zone in self.zones() {
            let reserve = if above_min { zone.min } else { 0 };
            if order <= PCP_MAX_ORDER {
                if let Some((slot, s)) = zone.lock_own(cpu, 0) {
                    match zone.pcp_alloc(slot, &s, order, Mode::Normal, reserve, Some(cpu)) {
                        Ok(idx) => return Some(self.ptr(zone, idx)),
                        Err(_) => continue,
                    }
                }
                // The slot is held by another context (a preempted thread):
                // go to the zone directly.
            }
            // (`None`: this thread holds the lock itself; next zone.)
            let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) else {
                continue;
            };
            zone.drain_deferred(&g);
            crate::interrupt_point!(ZoneAlloc);
            if let Some(idx) = zone.buddy_alloc(order, reserve, &g) {
                zone.stock_refill(&g);
                return Some(self.ptr(zone, idx));
            }
        }
        None
    }

    /// Adds a zone from the OS, which first serves the caller a block of
    /// `order`, unless another thread added one since the caller saw
    /// `seen` zones: what there is new to try.
    #[cfg(feature = "std")]
    #[cold]
    pub(super) fn grow(&self, seen: usize, order: u32) -> Growth {
        let Some(g) = self.grow_lock.lock_in(Mode::Normal, self.platform) else {
            return Growth::Refused;
        };
        let now = self.nzones.load(Ordering::Acquire);
        if now != seen {
            return Growth::OthersAdded;
        }
        if now >= MAX_ZONES {
            return Growth::Refused;
        }
        // Each new zone doubles the previous one (capped at 64 GiB, far
        // below what a zone's 32-bit page indices can number).
        const GROWN_MAX: usize = 64 << 30;
        const _: () = assert!(GROWN_MAX <= crate::MAX_MEMORY);
        let doubled = self
            .config
            .memory
            .max(MAX_BLOCK)
            .saturating_mul(1usize << now.min(16))
            .min(GROWN_MAX);
        crate::interrupt_point!(ZoneGrow);
        let mut bytes = growth_size(doubled, crate::platform::address_space_headroom());
        loop {
            // Borrowed: this is the fork window, every zone is held across
            // the fork, and so must the new one be, from before any other
            // thread can see it (their nolock paths try every zone).
            if let Ok(taken) = self.add_os_zone(bytes, g.borrowed(), Some(order)) {
                return Growth::Added(taken);
            }
            // Refused (a limit on address space, or no room left in it):
            // halve, down to one largest block, before reporting no memory.
            if bytes <= MAX_BLOCK {
                return Growth::Refused;
            }
            bytes = (bytes / 2).next_multiple_of(MAX_BLOCK).max(MAX_BLOCK);
        }
    }

    /// The rseq fast path of every allocation of at most `PCP_MAX_ORDER`:
    /// the first zone's level-0 list of this CPU. `None`: the slow path.
    /// Any context may call it (it is a restartable sequence, or nothing
    /// without rseq).
    #[inline(always)]
    pub(crate) fn seq_alloc<const COUNT_NOLOCK: bool>(&self, order: u32) -> Option<NonNull<u8>> {
        if order > PCP_MAX_ORDER {
            return None;
        }
        self.seq_alloc_counted::<COUNT_NOLOCK, { layout::PCP_NOLOCK_OK }>(order)
    }

    /// `seq_alloc` in the newest grown zone (`None` before the first
    /// growth): what the fast paths try next when the first zone's list is
    /// empty, from a small out-of-line function between them and their
    /// slow path (`alloc_pages_routed`, `alloc_pages_normal_next`,
    /// `alloc_pages_nolock_next`), which calls the slow path only on a
    /// miss.
    ///
    /// That function stays a leaf up to the tail call (no register saved,
    /// no frame): on an Intel Xeon an order-0 page pair in a grown zone
    /// took 9.4 ns with this attempt so placed, 11.0 with it at the top of
    /// the slow path (whose frame saves five registers), and 8.2-8.4 in
    /// the first zone; making it a second call in the fast path instead
    /// cost the first zone's pair 0.3-0.5 ns.
    #[inline(always)]
    pub(super) fn seq_alloc_newest_block<const COUNT_NOLOCK: bool>(
        &self,
        order: u32,
    ) -> Option<NonNull<u8>> {
        #[cfg(feature = "std")]
        if order <= PCP_MAX_ORDER {
            let zone = self.newest_grown()?;
            let idx = zone.seq_alloc::<COUNT_NOLOCK, { layout::PCP_NOLOCK_OK }>(order)?;
            return Some(self.ptr(zone, idx));
        }
        let _ = order;
        None
    }

    /// `seq_alloc::<false>` for a heap's large block on the normal path:
    /// also [`HEAP_PCP_ORDER`] (64 KiB), whose list only a heap's large
    /// frees fill ([`free_pages_fast`](Self::free_pages_fast)). Any context
    /// may pop it (a restartable sequence); beyond this fast path, 64 KiB
    /// is a large order like any other (buddy lists, stock, and for a
    /// nested or nolock call the large nolock counters). The block comes
    /// with its head page's descriptor, so that the heap marks it without
    /// a lookup (as `seq_alloc_heap_grown`).
    #[inline(always)]
    pub(crate) fn seq_alloc_heap(&self, order: u32) -> Option<(NonNull<u8>, &PageDesc)> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        self.seq_alloc_first_desc::<false, { layout::PCP_NOLOCK_OK }>(order)
    }

    /// `seq_alloc::<true>` for a heap's nolock large block (orders up to
    /// [`HEAP_PCP_ORDER`], as `seq_alloc_heap`), counted apart
    /// from the page allocator's own nolock successes (it still counts in
    /// [`PageStats::nolock_alloc_ok`]): see [`heap_large_nolock_ok`](Self::heap_large_nolock_ok).
    #[inline(always)]
    pub(crate) fn seq_alloc_heap_large(&self, order: u32) -> Option<(NonNull<u8>, &PageDesc)> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        self.seq_alloc_first_desc::<true, { layout::PCP_HEAP_NOLOCK_OK }>(order)
    }

    /// The above, for an order with a per-CPU list: the counter a counting
    /// pop adds to is the page slot's field at offset `COUNTER` (see
    /// `Zone::seq_alloc`).
    #[inline(always)]
    pub(super) fn seq_alloc_counted<const COUNT: bool, const COUNTER: usize>(
        &self,
        order: u32,
    ) -> Option<NonNull<u8>> {
        self.seq_alloc_first_desc::<COUNT, COUNTER>(order)
            .map(|(p, _)| p)
    }

    /// `seq_alloc_counted`, with the block's head page's descriptor (for
    /// the heap, which marks a large block there without a lookup).
    #[inline(always)]
    fn seq_alloc_first_desc<const COUNT: bool, const COUNTER: usize>(
        &self,
        order: u32,
    ) -> Option<(NonNull<u8>, &PageDesc)> {
        let zone = self.first_zone();
        let idx = zone.seq_alloc::<COUNT, COUNTER>(order)?;
        Some((self.ptr(zone, idx), zone.desc(idx)))
    }

    /// [`seq_alloc_heap`](Self::seq_alloc_heap) in the zones growth added
    /// (once the first zone's list is empty): the block and its head
    /// descriptor, so that the heap marks it without a lookup.
    #[inline]
    pub(crate) fn seq_alloc_heap_grown(&self, order: u32) -> Option<(NonNull<u8>, &PageDesc)> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        let (zone, idx) = self.seq_alloc_grown::<false, { layout::PCP_NOLOCK_OK }>(order)?;
        Some((self.ptr(zone, idx), zone.desc(idx)))
    }

    /// [`seq_alloc_heap_large`](Self::seq_alloc_heap_large) in the zones
    /// growth added, as `seq_alloc_heap_grown`.
    #[inline]
    pub(crate) fn seq_alloc_heap_large_grown(
        &self,
        order: u32,
    ) -> Option<(NonNull<u8>, &PageDesc)> {
        if order > HEAP_PCP_ORDER {
            return None;
        }
        let (zone, idx) = self.seq_alloc_grown::<true, { layout::PCP_HEAP_NOLOCK_OK }>(order)?;
        Some((self.ptr(zone, idx), zone.desc(idx)))
    }

    /// This CPU's level-0 list of `order` (at most `HEAP_PCP_ORDER`) in
    /// each zone after the first, the newest first (see `newest`), popped
    /// by the same restartable sequence as the first zone's
    /// (`seq_alloc_counted`): the zone and the block.
    /// Frees of their blocks go onto those lists (`free_pages_grown`).
    /// Out of line: only a heap whose first zone ran dry gets here. Any
    /// context (no lock; without rseq every pop is `None`).
    #[inline(never)]
    pub(super) fn seq_alloc_grown<const COUNT: bool, const COUNTER: usize>(
        &self,
        order: u32,
    ) -> Option<(&Zone, u32)> {
        (1..self.zone_count())
            .rev()
            .map(|i| self.zone_at(i))
            .find_map(|zone| Some((zone, zone.seq_alloc::<COUNT, COUNTER>(order)?)))
    }

    /// How many blocks [`seq_alloc_heap_large`](Self::seq_alloc_heap_large)
    /// handed out (racy while they run).
    pub(crate) fn heap_large_nolock_ok(&self) -> u64 {
        slot_count_total(
            self.zones()
                .flat_map(|z| z.slots())
                .map(|s| s.heap_nolock_ok.load(Ordering::Relaxed)),
        )
    }

    /// Whether `addr` lies in the first zone (its window: no zone pointer
    /// followed).
    #[inline(always)]
    pub(crate) fn in_first_zone(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.first.start) < self.first.len
    }

    /// The first zone (always present once the allocator is built).
    #[inline(always)]
    pub(crate) fn first_zone(&self) -> &Zone {
        // SAFETY: `first` was copied from zone 0 before the allocator was
        // returned, and the zone lives as long as `self`.
        unsafe { &*self.first.zone }
    }

    #[inline]
    pub(super) fn ptr(&self, zone: &Zone, idx: u32) -> NonNull<u8> {
        // SAFETY: a zone's page addresses are never null.
        unsafe { NonNull::new_unchecked(zone.addr_of(idx) as *mut u8) }
    }

    /// Frees a block from [`alloc_pages`](Self::alloc_pages) or
    /// [`alloc_pages_nolock`](Self::alloc_pages_nolock). Normal context.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// let p = pages.alloc_pages(1).unwrap();
    /// assert_eq!(pages.stats().free_pages, pages.stats().total_pages - 2);
    /// // SAFETY: allocated above with order 1, not used afterwards.
    /// unsafe { pages.free_pages(p, 1) };
    /// assert_eq!(pages.stats().free_pages, pages.stats().total_pages);
    /// ```
    ///
    /// # Safety
    /// `ptr` must have been returned by this allocator for `order` and not be
    /// used afterwards. Violations that can be detected (a pointer outside
    /// managed memory, misaligned, already free, freed with another order,
    /// or a block of a heap built on this allocator, such as a slab page or
    /// a large allocation of [`Heap`](crate::Heap)) abort the process with a
    /// one-line message.
    ///
    /// Called by a thread already inside the allocator (a signal handler
    /// that interrupted it) or inside a nolock scope, it takes the nolock
    /// path instead (the crate's `context` module).
    #[inline]
    pub unsafe fn free_pages(&self, ptr: NonNull<u8>, order: u32) {
        crate::context::might_wait("PageAllocator::free_pages");
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, true>(ptr, order, FreeRoute::Routed) };
    }

    /// `free_pages` without its context check, for the heap's large-block
    /// fast path: routed by the thread's context (`nolock`: the nolock
    /// path). Its rseq fast path also takes blocks of [`HEAP_PCP_ORDER`]
    /// (for `seq_alloc_heap`), in every context; beyond that fast path they
    /// are a large order like any other.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(always)]
    pub(crate) unsafe fn free_pages_fast(&self, ptr: NonNull<u8>, order: u32, nolock: bool) {
        let route = if nolock {
            FreeRoute::NoLock
        } else {
            FreeRoute::Routed
        };
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<HEAP_PCP_ORDER, false>(ptr, order, route) };
    }

    /// The normal path of `free_pages` (not routed, as `alloc_pages_normal`).
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub(crate) unsafe fn free_pages_normal(&self, ptr: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_via::<PCP_MAX_ORDER, false>(ptr, order, FreeRoute::Normal) };
    }

    /// Every free of pages: the inline fast path, then one out-of-line call.
    /// The fast path is the same for every route: the block is claimed, and
    /// this CPU's level-0 slot has room (a nolock free's condition); only a
    /// slot left over `high` asks the route (a normal free drains a batch).
    /// `route` is a constant at each call site, and so are `FAST_MAX`, the
    /// largest order the fast path takes, and `PUBLIC`: a free through the
    /// public API (`free_pages`, `free_pages_nolock`), which may be handed
    /// a block of a heap built on this allocator by mistake, and checks its
    /// owner (see [`claim_fast`](Self::claim_fast)). The heap's own frees
    /// clear the owner first and skip the check.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(always)]
    pub(super) unsafe fn free_pages_via<const FAST_MAX: u32, const PUBLIC: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
    ) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_at::<FAST_MAX, PUBLIC, false>(ptr, order, route) }
    }

    /// `free_pages_via` for a block outside the first zone: the same fast
    /// path on the block's own zone (its lists), found through the zone
    /// map.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(never)]
    unsafe fn free_pages_grown<const FAST_MAX: u32, const PUBLIC: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
    ) {
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_at::<FAST_MAX, PUBLIC, true>(ptr, order, route) }
    }

    /// The body of `free_pages_via`: the first zone's (a block elsewhere
    /// takes one tail call to `free_pages_grown`), or with `GROWN` the
    /// block's own grown zone's.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(always)]
    unsafe fn free_pages_at<const FAST_MAX: u32, const PUBLIC: bool, const GROWN: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
    ) {
        let addr = ptr.as_ptr() as usize;
        if GROWN {
            // The zone map gives the zone and the descriptor at once.
            let Some((zone, d)) = self.locate_grown(addr) else {
                // In no zone: the slow path reports it.
                // SAFETY: forwarded contract.
                return unsafe { self.free_pages_slow(ptr, order, route, PUBLIC) };
            };
            // SAFETY: forwarded contract; the map found `ptr`'s page, `d`,
            // in `zone`.
            unsafe { self.free_pages_found::<FAST_MAX, PUBLIC>(zone, d, ptr, order, route) }
        } else {
            if !self.in_first_zone(addr) {
                // SAFETY: forwarded contract.
                return unsafe { self.free_pages_grown::<FAST_MAX, PUBLIC>(ptr, order, route) };
            }
            // SAFETY: forwarded contract; the first zone's window finds
            // `ptr`'s page in the first zone.
            unsafe {
                self.free_pages_in_zone::<FAST_MAX, PUBLIC>(
                    self.first_zone(),
                    ptr,
                    order,
                    route,
                    |a| self.locate_first(a),
                )
            }
        }
    }

    /// A heap's large free (as `free_pages_fast`) of a block in a grown
    /// zone that the heap's own lookup already found (`zone`, and `d`, the
    /// descriptor of its head page): no second lookup.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages); `zone` is a zone after the
    /// first that holds `ptr`, and `d` the descriptor of `ptr`'s page.
    #[inline(always)]
    pub(crate) unsafe fn free_pages_fast_grown(
        &self,
        zone: &Zone,
        d: &PageDesc,
        ptr: NonNull<u8>,
        order: u32,
        nolock: bool,
    ) {
        let route = if nolock {
            FreeRoute::NoLock
        } else {
            FreeRoute::Routed
        };
        // SAFETY: forwarded contract.
        unsafe { self.free_pages_found::<HEAP_PCP_ORDER, false>(zone, d, ptr, order, route) }
    }

    /// `free_pages_in_zone` of a block in a grown zone whose head page's
    /// descriptor `d` the zone map already gave: the claim takes it as it
    /// is, with no second lookup.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages); `zone` holds `ptr`, and `d`
    /// is the descriptor of `ptr`'s page.
    #[inline(always)]
    unsafe fn free_pages_found<const FAST_MAX: u32, const PUBLIC: bool>(
        &self,
        zone: &Zone,
        d: &PageDesc,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
    ) {
        let found = (zone.index_of(ptr.as_ptr() as usize), d);
        // SAFETY: forwarded contract; `found` is the page of `zone` that
        // holds `ptr`.
        unsafe {
            self.free_pages_in_zone::<FAST_MAX, PUBLIC>(zone, ptr, order, route, |_| Some(found))
        }
    }

    /// `free_pages_at` once the zone is known: `zone` is the first zone,
    /// or the grown zone that holds `ptr`; `locate` gives the page index
    /// and descriptor of an address in it (see `claim_fast`: the first
    /// zone's window, looked up late, or what the zone map already gave).
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages); `zone` holds `ptr`, and
    /// `locate` names its page of `zone` (or `None`).
    #[inline(always)]
    unsafe fn free_pages_in_zone<'a, const FAST_MAX: u32, const PUBLIC: bool>(
        &'a self,
        zone: &'a Zone,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
        locate: impl FnOnce(usize) -> Option<(u32, &'a PageDesc)>,
    ) {
        // This CPU's page count (a hint) is read before the claim: the
        // claim's locked instruction waits for earlier stores to drain, and
        // these loads run meanwhile instead of after it. (A grown zone's
        // lists take the heap's 64 KiB blocks too: `seq_alloc_grown` pops
        // them as the first zone's `seq_alloc_heap` does.)
        let pages = if order <= FAST_MAX && zone.uses_rseq() {
            zone.pages_here()
        } else {
            usize::MAX
        };
        // When the block will go onto this CPU's list, the claim marks it
        // PCP at once (a racing free fails its claim just the same), so the
        // fast path stores no state of its own. (`usize::MAX`, no fast
        // path, never has room.)
        let room = zone.room_for(pages);
        let kind = if room { desc::PCP } else { desc::FREEING };
        let Some((idx, d)) = self.claim_fast::<PUBLIC>(ptr, order, kind, locate) else {
            // SAFETY: forwarded contract.
            return unsafe { self.free_pages_slow(ptr, order, route, PUBLIC) };
        };
        if room && zone.seq_free(idx, d, order) {
            if route != FreeRoute::NoLock && zone.over_high(pages + (1 << order)) {
                return self.trim_after_free(zone, route);
            }
            return;
        }
        self.free_claimed(zone, idx, order, route);
    }

    /// After a fast free put this CPU's slot over `high`: a normal free
    /// drains a batch; a nested one leaves it (nolock frees may overshoot).
    #[cold]
    #[inline(never)]
    pub(super) fn trim_after_free(&self, zone: &Zone, route: FreeRoute) {
        if route == FreeRoute::Normal || !crate::context::nested() {
            zone.trim_own(self.cpu());
            self.decay_tick();
        }
    }

    /// A free whose inline claim could not decide: the full claim (which
    /// reports a bad free; `public`: a free through the public API, see
    /// `free_pages_via`), then the slow path.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline(never)]
    pub(super) unsafe fn free_pages_slow(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        route: FreeRoute,
        public: bool,
    ) {
        let (zone, idx) = self.claim_slow(ptr, order, public);
        self.free_claimed(zone, idx, order, route);
    }

    /// A claimed block, beyond the fast path, by `route`.
    #[inline(never)]
    pub(super) fn free_claimed(&self, zone: &Zone, idx: u32, order: u32, route: FreeRoute) {
        let nolock = match route {
            FreeRoute::Normal => false,
            FreeRoute::NoLock => true,
            FreeRoute::Routed => crate::context::nested(),
        };
        if nolock {
            self.free_claimed_nolock(zone, idx, order)
        } else {
            self.free_claimed_normal(zone, idx, order)
        }
    }

    /// The normal free of a claimed block, beyond the fast path.
    #[inline(never)]
    pub(super) fn free_claimed_normal(&self, zone: &Zone, idx: u32, order: u32) {
        if order <= PCP_MAX_ORDER {
            if let Some((slot, s)) = zone.lock_own(self.cpu(), 0) {
                zone.pcp_free(slot, &s, idx, order, Mode::Normal);
                drop(s);
                self.decay_tick();
                return;
            }
        }
        let Some(g) = zone.lock.lock_in(Mode::Normal, zone.platform()) else {
            // A stalled fork on another thread holds it: the nolock free
            // (see `fork::fork_stalled`).
            #[cfg(feature = "std")]
            if crate::fork::fork_stalled() {
                return self.free_claimed_nolock(zone, idx, order);
            }
            // This thread holds the zone lock itself, or a fork on another
            // thread does: park the block (one CAS; not a nolock level's
            // list, which a free in progress at the clone would leave held
            // in the child).
            zone.defer_free(idx, order);
            self.nolock_free_deferred.fetch_add(1, Ordering::Relaxed);
            self.wake_maintainer();
            return;
        };
        crate::interrupt_point!(ZoneFree);
        zone.buddy_free(idx, order, &g);
        zone.drain_deferred(&g);
        zone.stock_refill(&g);
        drop(g);
        self.decay_tick();
    }

    /// The heap's free of a block of its own (a slab, a large block) whose
    /// owner it cleared: `free_pages_normal` or `free_pages_nolock_owned`,
    /// as `mode` says.
    ///
    /// # Safety
    /// As for [`free_pages`](Self::free_pages).
    #[inline]
    pub(crate) unsafe fn free_pages_in(&self, ptr: NonNull<u8>, order: u32, mode: Mode) {
        // SAFETY: forwarded contract.
        unsafe {
            match mode {
                Mode::Normal => self.free_pages_normal(ptr, order),
                Mode::NoLock => self.free_pages_nolock_owned(ptr, order),
            }
        }
    }
}
