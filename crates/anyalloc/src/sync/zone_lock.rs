//! The zone lock: `lock()` for the normal path, `try_lock()` for the nolock path.
//!
//! Modelled on std's futex mutex, with the waiting delegated to the
//! [`Platform`] so the same lock works in `no_std` (where the embedder decides
//! how to wait, typically by spinning with interrupts enabled).
//!
//! State table of `state`:
//!
//! | state | meaning                                              |
//! |-------|------------------------------------------------------|
//! | 0     | unlocked                                             |
//! | 1     | locked, no context is waiting                         |
//! | 2     | locked, some context may be waiting                   |
//! | 3     | held across `fork` (`lock_raw`); waiters may be asleep |
//!
//! `owner` holds the holder's thread id (see `context::thread_id`;
//! without std, [`Platform::thread_id`]), with `context::FORK_HELD` set
//! when `lock_raw` holds it across `fork`, or 0: unlocked, or the holder's
//! id is unknown, or the holder is between its acquiring CAS and the owner
//! store.
//!
//! Transitions:
//!
//! * every acquisition first marks the thread inside the allocator
//!   (the `context` module: `DEPTH + 1`), so a signal handler that interrupts
//!   it from then on (while it tries, waits, holds, or releases) takes the
//!   nolock route; a failed `try_lock` undoes the mark.
//! * `try_lock`: CAS 0 -> 1 (Acquire), then `owner = me`. Never waits,
//!   never makes a syscall.
//! * `lock` / `lock_in(Normal)`: CAS 0 -> 1; on failure, if `owner == me`
//!   this thread interrupted itself while holding the lock: it does not wait
//!   (`lock_in` returns `None` and the caller takes its nolock fallback; a
//!   bare `lock` reports the internal error and aborts, never hangs). If
//!   `owner == me | FORK_HELD` (taken by `lock_raw` across `fork`) and this
//!   thread owns the fork window (the `context` module), it borrows the
//!   lock: a guard whose drop undoes only the mark; otherwise as for
//!   `owner == me`. When another thread holds it: spin a little while the
//!   state is 1 (short critical sections usually end within the spin);
//!   then `waiters + 1` and loop on the state: 0, CAS 0 -> 2 (Acquire: it
//!   is ours); 1 or 2, CAS it to 2 (AcqRel) and wait until the state
//!   changes from 2; 3, see "held across fork" below. Then `waiters - 1`
//!   and `owner = me`. Acquiring in state 2 (rather than 1) is
//!   conservative: the state may stay 2 with nobody waiting, which
//!   `waiters` tells apart.
//! * held across fork (state 3): `lock_in(Normal)` *gives way*: `waiters - 1`
//!   and `None`, at once, and its caller takes its nolock fallback, exactly
//!   as when its own thread holds the lock. The fork that holds it may be
//!   waiting for this very thread: glibc's `fork` takes its stdio and NSS
//!   locks after every prepare handler, and this thread may be a signal
//!   handler that interrupted their holder. A bare `lock` (callers that
//!   cannot fall back: maintenance, checks) waits instead: CAS 3 -> 3
//!   (AcqRel, to be counted by the release), then wait while the state is 3.
//!   `lock_patient` (explicit drains) waits so too, but at most
//!   `fork::DRAIN_PATIENCE` from the first time it saw state 3, then gives
//!   way as `lock_in` does: a drain called from a signal handler that
//!   interrupted the holder of a lock glibc's `fork` takes is what that
//!   fork waits for.
//! * in a process that may hold orphaned locks (a forked child whose
//!   fork's prepare handler took nothing: see the `fork` module's
//!   "Orphaned locks"), a contended acquisition polls, never announced,
//!   for at most `fork::ORPHAN_PATIENCE`, then gives way (`lock_in` and
//!   `lock_patient` return `None`; a bare `lock` reports the lock and
//!   aborts), and marks the lock 3 so that the next callers give way at
//!   once, `lock_patient` included (a holder that is alive releases it as
//!   usual; no fork there takes a lock: a lock in state 3 is orphaned). A
//!   waiter already asleep when its thread became such a child (a signal
//!   handler forked) finds out on its next look: the std platform's waits
//!   last 50 ms at most.
//! * polling locks (`set_polling(true)`, for `Config::nolock_syscalls(false)`):
//!   waiters never announce themselves (the state never becomes 2); they
//!   CAS 0 -> 1 after each short timed wait on the word instead (and give
//!   way in state 3 as above).
//! * `lock_raw` (the fork handler): `lock`, then `owner = me | FORK_HELD`,
//!   swap in 3 (AcqRel), and if `waiters` is not 0, wake that many, so that
//!   every waiter asleep in state 2 looks again and gives way (a waiter's
//!   count precedes its CAS to 2, which the swap reads; a waiter whose wait
//!   starts after the swap finds 3, not 2, and does not sleep). Then the
//!   thread's mark is undone (the fork handler marks the thread once for the
//!   whole window). `force_unlock` releases it like a guard, without the
//!   mark.
//! * unlock (guard drop): a borrowed guard only unmarks the thread;
//!   otherwise `owner = 0`, swap 0 (AcqRel); if the previous
//!   state was 2 or 3 and `waiters` is not 0, wake one waiter (a waiter's
//!   count precedes its CAS, which the unlocking swap reads, so no wake is
//!   missed); then unmark the thread (`DEPTH - 1`). Releasing a polling
//!   lock, or one nobody waits for, makes no system call.
//!
//! The owner word is the backstop of the routing in the `context` module, in
//! the spirit of a reentrant mutex that never re-enters: only this thread
//! stores its own id, so `owner == me` is exact, except in the window
//! between the CAS and the store, which the `DEPTH` mark covers.
//!
//! The lock never allocates. The nolock path only ever calls `try_lock()`.

#[cfg(not(loom))]
use super::atomic::spin_hint;
use super::atomic::{AtomicU32, AtomicUsize, Ordering};
use crate::context;
use crate::platform::Platform;

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;
/// Held across `fork` by `lock_raw`: normal-path waiters give way.
const FORK: u32 = 3;

/// What a `lock` that found the lock taken ended with.
enum Contended {
    /// It waited, and now holds the lock.
    Acquired,
    /// This thread holds it across `fork` and owns the fork window: it
    /// uses the lock without taking it.
    Borrowed,
    /// This thread holds it (it interrupted itself): it did not wait.
    SelfHeld,
    /// Held across a `fork` on another thread: it gave way instead of
    /// waiting (`lock_in(Normal)` only); or, in a process that may hold
    /// orphaned locks, held longer than `fork::ORPHAN_PATIENCE`.
    GaveWay,
}

/// What an acquisition does about a lock held across another thread's
/// `fork` (state 3).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ForkHold {
    /// Gives way at once (`lock_in(Normal)`): the fork may be waiting for
    /// this very thread.
    GiveWay,
    /// Waits, at most `fork::DRAIN_PATIENCE` from the first time it saw the
    /// state, then gives way (`lock_patient`).
    WaitAWhile,
    /// Waits (a bare `lock`, `lock_through_fork`).
    Wait,
}

/// When a wait first saw its lock held across a fork (`ForkHold::WaitAWhile`;
/// without std no process forks).
#[derive(Default)]
struct ForkSeen(#[cfg(all(feature = "std", not(loom)))] Option<std::time::Instant>);

impl ForkHold {
    /// Whether a wait that now sees its lock held across a fork gives way.
    fn gives_way(self, seen: &mut ForkSeen) -> bool {
        match self {
            ForkHold::GiveWay => true,
            ForkHold::Wait => false,
            #[cfg(all(feature = "std", not(loom)))]
            ForkHold::WaitAWhile => {
                let first = *seen.0.get_or_insert_with(std::time::Instant::now);
                first.elapsed() >= crate::fork::DRAIN_PATIENCE
            }
            #[cfg(not(all(feature = "std", not(loom))))]
            ForkHold::WaitAWhile => {
                let _ = seen;
                false
            }
        }
    }
}

/// How many times `lock()` spins before it starts waiting.
#[cfg(not(loom))]
const SPIN_LIMIT: u32 = 100;
/// Under loom: one more look, without a yield. A spin that yields (loom's
/// `yield_now`) lets the holder run to its release before the spinner
/// looks again, so the model never reached the announced wait, its sleep
/// and the wakes that end it: they went unchecked.
#[cfg(loom)]
const SPIN_LIMIT: u32 = 1;

/// Whether a caller may wait for a lock: the one decision every allocator
/// path makes once, up front (never "try_lock, then lock").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Normal context: `lock()`, which may wait.
    Normal,
    /// Any context: `try_lock()` only.
    NoLock,
}

/// A lock with a waiting `lock()` and a non-waiting `try_lock()`.
#[derive(Debug)]
pub struct ZoneLock {
    state: AtomicU32,
    /// The holder's thread id (0: none or unknown); see the module docs.
    owner: AtomicUsize,
    /// Contexts between announcing that they wait and getting the lock.
    waiters: AtomicU32,
    /// Waiters poll (timed waits, never announced, never woken) instead of
    /// sleeping until woken: releasing never makes a system call. Set before
    /// the lock is shared (a core atomic: not part of the loom model).
    poll: core::sync::atomic::AtomicBool,
}

/// Proof that a [`ZoneLock`] is held; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ZoneGuard<'a> {
    lock: &'a ZoneLock,
    platform: &'a dyn Platform,
    /// Borrowed in the fork window (the lock is held across `fork` by this
    /// thread): dropping it releases only the thread's mark.
    borrowed: bool,
    /// The thread's mark belongs to the thread: not `Send`.
    _not_send: core::marker::PhantomData<*const ()>,
}

impl ZoneGuard<'_> {
    /// Adds `n` (wrapping: a subtraction is the negation) to a counter that
    /// only holders of this lock write: the guard is the proof that a plain
    /// load and store suffice (no locked instruction); readers without the
    /// lock see a whole, possibly stale, value.
    #[inline]
    pub(crate) fn add(&self, counter: &core::sync::atomic::AtomicUsize, n: usize) {
        use core::sync::atomic::Ordering::Relaxed;
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// [`add`](Self::add) for a 32-bit counter.
    #[inline]
    pub(crate) fn add_u32(&self, counter: &core::sync::atomic::AtomicU32, n: u32) {
        use core::sync::atomic::Ordering::Relaxed;
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

impl core::fmt::Debug for ZoneGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ZoneGuard").finish_non_exhaustive()
    }
}

impl ZoneLock {
    /// An unlocked lock.
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// static LOCK: ZoneLock = ZoneLock::new(); // `const`: fits a static
    /// assert!(!LOCK.is_locked());
    /// ```
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self::with_polling(false)
    }

    /// An unlocked lock (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self::with_polling(false)
    }

    /// An unlocked lock whose waiters poll (`poll`: releasing it never
    /// makes a system call) or sleep until woken.
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// // Waiters re-check on a timer: releasing it never makes a system call.
    /// static LOCK: ZoneLock = ZoneLock::with_polling(true);
    /// let platform = StdPlatform::get();
    /// std::thread::scope(|s| {
    ///     let held = LOCK.lock(platform);
    ///     s.spawn(|| drop(LOCK.lock(platform))); // waits, polling, until released
    ///     drop(held);
    /// });
    /// assert!(!LOCK.is_locked());
    /// ```
    #[cfg(not(loom))]
    pub const fn with_polling(poll: bool) -> Self {
        ZoneLock {
            state: AtomicU32::new(UNLOCKED),
            owner: AtomicUsize::new(0),
            waiters: AtomicU32::new(0),
            poll: core::sync::atomic::AtomicBool::new(poll),
        }
    }

    /// As the non-loom `with_polling`.
    #[cfg(loom)]
    pub fn with_polling(poll: bool) -> Self {
        ZoneLock {
            state: AtomicU32::new(UNLOCKED),
            owner: AtomicUsize::new(0),
            waiters: AtomicU32::new(0),
            poll: core::sync::atomic::AtomicBool::new(poll),
        }
    }

    /// Takes the lock if it is free. Never waits: safe in any context.
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// let (lock, platform) = (ZoneLock::new(), StdPlatform::get());
    /// let guard = lock.try_lock(platform).expect("free");
    /// assert!(lock.try_lock(platform).is_none(), "held: no waiting, just `None`");
    /// drop(guard);
    /// assert!(lock.try_lock(platform).is_some());
    /// ```
    #[inline]
    pub fn try_lock<'a>(&'a self, platform: &'a dyn Platform) -> Option<ZoneGuard<'a>> {
        // Marked before the CAS: a handler from here on takes the nolock route.
        context::enter();
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            Some(self.acquired(platform))
        } else {
            // Not taken: a handler after this sees the thread as before.
            context::leave();
            None
        }
    }

    /// Takes the lock, waiting for it if needed, even while a `fork` on
    /// another thread holds it. Normal context only; for callers that have
    /// no fallback (maintenance, checks).
    ///
    /// If this very thread holds the lock (it interrupted itself: a routing
    /// error), it reports that and aborts instead of waiting forever. Paths
    /// that can fall back use [`lock_in`](Self::lock_in) instead.
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let (lock, platform) = (ZoneLock::new(), StdPlatform::get());
    /// let count = AtomicUsize::new(0);
    /// std::thread::scope(|s| {
    ///     for _ in 0..2 {
    ///         s.spawn(|| {
    ///             let _guard = lock.lock(platform); // waits while the other holds it
    ///             count.fetch_add(1, Ordering::Relaxed);
    ///         });
    ///     }
    /// });
    /// assert_eq!(count.load(Ordering::Relaxed), 2);
    /// assert!(!lock.is_locked());
    /// ```
    #[inline]
    pub fn lock<'a>(&'a self, platform: &'a dyn Platform) -> ZoneGuard<'a> {
        match self.lock_waiting(ForkHold::Wait, platform) {
            Some(g) => g,
            None => self_deadlock(platform),
        }
    }

    /// The owner store after a successful acquisition, and the guard.
    #[inline(always)]
    fn acquired<'a>(&'a self, platform: &'a dyn Platform) -> ZoneGuard<'a> {
        self.owner.store(me(platform), Ordering::Relaxed);
        ZoneGuard {
            lock: self,
            platform,
            borrowed: false,
            _not_send: core::marker::PhantomData,
        }
    }

    /// Waits for the lock, unless this thread holds it: then it borrows it
    /// if it holds it across `fork` and owns the fork window (see the
    /// `context` module), and otherwise gives up without waiting. A lock
    /// held across a `fork` by another thread is waited for as `fork`
    /// says (see the module docs).
    #[cold]
    fn lock_contended(&self, fork: ForkHold, platform: &dyn Platform) -> Contended {
        let mut seen_fork = ForkSeen::default();
        let me = me(platform);
        if me != 0 {
            let owner = self.owner.load(Ordering::Relaxed);
            if owner == me {
                return Contended::SelfHeld;
            }
            // Only the crate's own ids (std) are even, leaving the low bit
            // to `lock_raw` (std only too); a platform's id may be any
            // value but 0, and a thread whose id is `me | 1` is another
            // thread, not this one holding the lock across a fork.
            if context::thread_id() != 0 && owner == me | context::FORK_HELD {
                return if context::owns_fork_window() {
                    Contended::Borrowed
                } else {
                    Contended::SelfHeld
                };
            }
        }
        // Spin while the holder is (probably) running its short section.
        let mut state = self.state.load(Ordering::Relaxed);
        let mut spins = 0;
        while state == LOCKED && spins < SPIN_LIMIT {
            #[cfg(not(loom))]
            spin_hint();
            spins += 1;
            state = self.state.load(Ordering::Relaxed);
        }
        if state == UNLOCKED
            && self
                .state
                .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return Contended::Acquired;
        }
        // A holder that may be gone for good (see the `fork` module's
        // "Orphaned locks"): a bounded wait.
        #[cfg(all(feature = "std", not(loom)))]
        if crate::fork::orphaned() {
            return self.lock_orphaned(platform);
        }
        if self.poll.load(core::sync::atomic::Ordering::Relaxed) {
            // Never announced: the holder's release makes no system call;
            // re-check after each short timed wait.
            loop {
                match self.state.compare_exchange(
                    UNLOCKED,
                    LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Contended::Acquired,
                    Err(FORK) if fork.gives_way(&mut seen_fork) => return Contended::GaveWay,
                    Err(seen) => poll_while(platform, &self.state, seen),
                }
            }
        }
        // Announce a waiter: counted first, so a release (or `lock_raw`)
        // whose swap reads one of this waiter's CASes also sees the count.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let got = loop {
            match self.state.load(Ordering::Relaxed) {
                UNLOCKED => {
                    // Acquired in state 2: the count says whether a release
                    // must wake anyone.
                    if self
                        .state
                        .compare_exchange(UNLOCKED, CONTENDED, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        break Contended::Acquired;
                    }
                }
                FORK if fork.gives_way(&mut seen_fork) => break Contended::GaveWay,
                // This thread became a forked child's only one while it
                // waited (a signal handler forked): the holder may be gone.
                #[cfg(all(feature = "std", not(loom)))]
                _ if crate::fork::orphaned() => break self.lock_orphaned(platform),
                seen => {
                    // 1, 2 or 3: marked (2 stays 2, 3 stays 3) by a write of
                    // this waiter's, then slept on while unchanged. A change
                    // in between fails the CAS: look again.
                    let mark = if seen == FORK { FORK } else { CONTENDED };
                    if self
                        .state
                        .compare_exchange(seen, mark, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        wait_while(platform, &self.state, mark);
                    }
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        got
    }

    /// `lock_contended` in a process that may hold locks no thread will
    /// release (the `fork` module's "Orphaned locks"): polls, never
    /// announced, at most `fork::ORPHAN_PATIENCE`, then gives way (a lock
    /// held across a fork gives way at once, for every caller: see below).
    /// A lock it gave way to is marked held across a fork (state 3), so
    /// that the next callers give way at once; a holder that is alive
    /// after all releases it as usual (its swap reads any state).
    #[cfg(all(feature = "std", not(loom)))]
    #[cold]
    fn lock_orphaned(&self, platform: &dyn Platform) -> Contended {
        let start = std::time::Instant::now();
        loop {
            match self.state.compare_exchange(
                UNLOCKED,
                LOCKED,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Contended::Acquired,
                // Held across a fork: here, by a thread of the parent at
                // the clone, or marked so by a wait that ran out (no fork
                // in such a process takes it, and this thread's own
                // prepare was told apart above): patient callers too give
                // way at once rather than wait the patience out again.
                Err(FORK) => return Contended::GaveWay,
                // (A failed mark: the state changed; look again.)
                Err(seen) if start.elapsed() >= crate::fork::ORPHAN_PATIENCE => {
                    if self
                        .state
                        .compare_exchange(seen, FORK, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Contended::GaveWay;
                    }
                }
                Err(seen) => poll_while(platform, &self.state, seen),
            }
        }
    }

    /// Takes the lock without a guard (fork handling: held across `fork`),
    /// and marks it held across the fork by this thread (`FORK_HELD` in the
    /// owner word), which the fork window's normal-path calls may borrow.
    /// Unlike a guard, it does not leave the thread marked: the fork handler
    /// marks it once for the whole window, so that a lock taken inside the
    /// window (a zone or heap made there) does not move the window's word
    /// at rest. Pair with [`force_unlock`](Self::force_unlock).
    ///
    /// In a process that may hold orphaned locks (the `fork` module's
    /// "Orphaned locks"; here: a signal handler forked while this thread's
    /// own prepare waited), a lock that another thread of the parent held
    /// at the clone is not taken: after `fork::ORPHAN_PATIENCE` it stays
    /// as it is (marked held across a fork), and `force_unlock` leaves it
    /// alone.
    #[cfg(feature = "std")]
    pub(crate) fn lock_raw(&self, platform: &dyn Platform) {
        let Some(g) = self.lock_waiting(ForkHold::Wait, platform) else {
            #[cfg(not(loom))]
            if crate::fork::orphaned() && !self.held_by_me(platform) {
                // (`lock_waiting` undid the thread's mark.)
                return;
            }
            self_deadlock(platform)
        };
        crate::check!(!g.borrowed, "lock_raw borrowed a lock");
        core::mem::forget(g);
        self.owner
            .store(me(platform) | context::FORK_HELD, Ordering::Relaxed);
        // From here normal-path waiters give way; those asleep in state 2
        // are woken to see it (the module docs say why none is missed).
        self.state.swap(FORK, Ordering::AcqRel);
        let waiting = self.waiters.load(Ordering::Relaxed);
        if waiting != 0 {
            wake_many(platform, &self.state, waiting);
        }
        context::leave();
    }

    /// Releases a lock taken with [`lock_raw`](Self::lock_raw), waking a
    /// waiter if there is one.
    ///
    /// # Safety
    /// The caller took the lock with `lock_raw` (in this process, or in the
    /// parent of this forked child) and nothing else releases it.
    ///
    /// In a process that may hold orphaned locks, a lock that `lock_raw`
    /// did not take (it gave way to a holder that is gone: its owner word
    /// is not this thread's, held across the fork) is left as it is.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn force_unlock(&self, platform: &dyn Platform) {
        #[cfg(not(loom))]
        if crate::fork::orphaned()
            && self.owner.load(Ordering::Relaxed) != me(platform) | context::FORK_HELD
        {
            return;
        }
        self.release(platform);
    }

    /// Takes the lock as `mode` allows: waiting for it (`Normal`), or only if
    /// it is free right now (`NoLock`). `None` when busy (`NoLock`); with
    /// `Normal`, when this thread itself holds it (it interrupted itself),
    /// or when a `fork` on another thread holds it (that fork may be
    /// waiting for this thread: see the module docs). The caller then takes
    /// its nolock fallback instead of waiting.
    ///
    /// ```
    /// use anyalloc::sync::{Mode, ZoneLock};
    /// use anyalloc::StdPlatform;
    /// let (lock, platform) = (ZoneLock::new(), StdPlatform::get());
    /// let held = lock.lock_in(Mode::Normal, platform).expect("free");
    /// assert!(lock.lock_in(Mode::NoLock, platform).is_none()); // busy: no waiting
    /// // This thread holds it (as if a handler interrupted the holder): no waiting
    /// // for itself either, the caller falls back.
    /// assert!(lock.lock_in(Mode::Normal, platform).is_none());
    /// drop(held);
    /// ```
    #[inline]
    pub fn lock_in<'a>(&'a self, mode: Mode, platform: &'a dyn Platform) -> Option<ZoneGuard<'a>> {
        if mode == Mode::NoLock {
            return self.try_lock(platform);
        }
        self.lock_waiting(ForkHold::GiveWay, platform)
    }

    /// As [`lock_in`](Self::lock_in)`(Normal)`, but waits for a lock held
    /// across a `fork` on another thread too, at most
    /// `fork::DRAIN_PATIENCE`: `None` when this thread holds it, or when
    /// that fork held it longer. For explicit maintenance calls
    /// (`Heap::drain`), which should not skip their work because a fork is
    /// in progress, but may be what the fork waits for (called from a
    /// signal handler that interrupted the holder of one of glibc's locks).
    #[inline]
    pub(crate) fn lock_patient<'a>(&'a self, platform: &'a dyn Platform) -> Option<ZoneGuard<'a>> {
        self.lock_waiting(ForkHold::WaitAWhile, platform)
    }

    /// As [`lock_patient`](Self::lock_patient), but with no bound on the
    /// wait for a fork: for a caller that must take the lock back to put
    /// something where it belongs (a trim's block after its `madvise`).
    #[cfg(feature = "std")]
    #[inline]
    pub(crate) fn lock_through_fork<'a>(
        &'a self,
        platform: &'a dyn Platform,
    ) -> Option<ZoneGuard<'a>> {
        self.lock_waiting(ForkHold::Wait, platform)
    }

    /// The waiting acquisition of `lock`, `lock_in(Normal)`, `lock_patient`
    /// and `lock_through_fork`; `fork`: what to do about a lock held across
    /// another thread's `fork`.
    #[inline]
    fn lock_waiting<'a>(
        &'a self,
        fork: ForkHold,
        platform: &'a dyn Platform,
    ) -> Option<ZoneGuard<'a>> {
        // Marked before the CAS and during any wait.
        context::enter();
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            match self.lock_contended(fork, platform) {
                Contended::Acquired => {}
                Contended::Borrowed => {
                    return Some(ZoneGuard {
                        lock: self,
                        platform,
                        borrowed: true,
                        _not_send: core::marker::PhantomData,
                    })
                }
                Contended::SelfHeld | Contended::GaveWay => {
                    context::leave();
                    return None;
                }
            }
        }
        Some(self.acquired(platform))
    }

    /// Makes waiters poll (`true`) or sleep until woken; call before the lock
    /// is shared.
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// let (lock, platform) = (ZoneLock::new(), StdPlatform::get());
    /// lock.set_polling(true); // before any other thread sees the lock
    /// std::thread::scope(|s| {
    ///     let held = lock.lock(platform);
    ///     s.spawn(|| drop(lock.lock(platform))); // polls until released
    ///     drop(held);
    /// });
    /// assert!(!lock.is_locked());
    /// ```
    pub fn set_polling(&self, poll: bool) {
        self.poll.store(poll, core::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this thread holds the lock (exact when the thread id is known;
    /// `false` when it is not).
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// let (lock, platform) = (ZoneLock::new(), StdPlatform::get());
    /// let guard = lock.lock(platform);
    /// assert!(lock.held_by_me(platform));
    /// std::thread::scope(|s| {
    ///     s.spawn(|| assert!(!lock.held_by_me(platform)));
    /// });
    /// drop(guard);
    /// assert!(!lock.held_by_me(platform));
    /// ```
    pub fn held_by_me(&self, platform: &dyn Platform) -> bool {
        let me = me(platform);
        me != 0 && self.owner.load(Ordering::Relaxed) == me
    }

    /// Whether the lock is held right now (a racy hint, for stats and tests).
    ///
    /// ```
    /// use anyalloc::sync::ZoneLock;
    /// use anyalloc::StdPlatform;
    /// let lock = ZoneLock::new();
    /// assert!(!lock.is_locked());
    /// let guard = lock.try_lock(StdPlatform::get()).unwrap();
    /// assert!(lock.is_locked());
    /// drop(guard);
    /// assert!(!lock.is_locked());
    /// ```
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }
}

impl Default for ZoneLock {
    fn default() -> Self {
        Self::new()
    }
}

/// This thread's id for the owner word: the crate's own (std), else the
/// platform's (0: unknown, no owner check).
#[inline(always)]
fn me(platform: &dyn Platform) -> usize {
    match context::thread_id() {
        0 => platform.thread_id(),
        id => id,
    }
}

#[cold]
fn self_deadlock(platform: &dyn Platform) -> ! {
    #[cfg(all(feature = "std", not(loom)))]
    if crate::fork::orphaned() {
        platform.fatal(
            b"anyalloc: a lock stayed held in the child of a fork made by a signal handler that interrupted the allocator (a thread of the parent held it at the fork; no thread here releases it)",
        )
    }
    platform.fatal(
        b"anyalloc: a thread waited for a lock it holds itself (a call left half done by siglongjmp or asynchronous cancellation, or an internal error: re-entry not routed to the nolock path)",
    )
}

/// Polling waiters re-check the lock this often (nanoseconds).
#[cfg(not(loom))]
const POLL_NANOS: u64 = 50_000;

#[cfg(not(loom))]
fn poll_while(platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    let mut spins = 0;
    while word.load(Ordering::Relaxed) == expected && spins < SPIN_LIMIT {
        spin_hint();
        spins += 1;
    }
    if word.load(Ordering::Relaxed) == expected {
        platform.wait_timeout(word, expected, POLL_NANOS);
    }
}

#[cfg(loom)]
fn poll_while(_platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    while word.load(Ordering::Relaxed) == expected {
        loom::thread::yield_now();
    }
}

#[cfg(not(loom))]
fn wait_while(platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    platform.wait(word, expected);
}

/// Under loom the waiter really sleeps until a wake picks it (see the
/// `loom_futex` module): a lost wake-up is a deadlock loom reports.
#[cfg(loom)]
fn wait_while(_platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    super::loom_futex::wait(word, expected);
}

impl ZoneLock {
    /// Releases the lock (a guard's drop, without the thread's mark).
    #[inline]
    fn release(&self, platform: &dyn Platform) {
        // Cleared before the release: the next holder's store comes later.
        self.owner.store(0, Ordering::Relaxed);
        // Release publishes the critical section to the next Acquire.
        if matches!(
            self.state.swap(UNLOCKED, Ordering::AcqRel),
            CONTENDED | FORK
        ) && self.waiters.load(Ordering::Relaxed) != 0
        {
            // A `lock()` caller announced that it waits and still does:
            // wake one. The platform's wake never blocks (a futex wake on
            // std), so this is safe on the nolock path too; a polling lock
            // is never in state 2, so its release never gets here.
            wake(platform, &self.state);
        }
    }
}

impl ZoneGuard<'_> {
    /// Whether the lock is borrowed in the fork window (held across `fork`
    /// by this thread) rather than taken.
    #[cfg(feature = "std")]
    pub(crate) fn borrowed(&self) -> bool {
        self.borrowed
    }
}

impl Drop for ZoneGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Borrowed: the fork handler's hold goes on, only the mark is undone.
        if !self.borrowed {
            self.lock.release(self.platform);
        }
        // Released: a handler after this sees the thread as before the lock.
        context::leave();
    }
}

#[cfg(not(loom))]
#[cold]
fn wake(platform: &dyn Platform, word: &AtomicU32) {
    crate::interrupt_point!(ZoneWake);
    platform.wake_one(word);
}

#[cfg(loom)]
fn wake(_platform: &dyn Platform, word: &AtomicU32) {
    super::loom_futex::wake_one(word);
}

#[cfg(all(feature = "std", not(loom)))]
fn wake_many(platform: &dyn Platform, word: &AtomicU32, n: u32) {
    platform.wake_many(word, n);
}

#[cfg(all(feature = "std", loom))]
fn wake_many(_platform: &dyn Platform, word: &AtomicU32, n: u32) {
    super::loom_futex::wake_many(word, n);
}

/// loom models of the real lock. Waiters really sleep (the `loom_futex`
/// stand-in: only a wake ends a wait), so a release or a fork hold that
/// fails to wake a sleeper is a deadlock loom reports, and the bounded spin
/// before the wait does not yield, so the models reach the announced wait.
/// They prove mutual exclusion (loom's `UnsafeCell`), that every waiter
/// gets in (two, and three with preemptions bounded), that a fork hold
/// makes sleeping and later normal-path waiters give way while a bare
/// `lock` waits through it, and the owner check. Left out: the orphaned
/// child's bounded waits (timers and `fork`), polling locks' timeouts (a
/// poll is a yield loop), and `context`'s routing (thread-local marks).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    struct NoPlatform;
    impl Platform for NoPlatform {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            1
        }
    }
    static P: NoPlatform = NoPlatform;

    /// A waiting locker and a try-locker: the critical sections never
    /// overlap, the waiter always gets in, the lock ends unlocked.
    #[test]
    fn lock_and_try_lock_exclude_each_other() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                let _g = other.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                other.1.with_mut(|v| unsafe { *v += 1 });
            });
            let got = match shared.0.try_lock(&P) {
                Some(_g) => {
                    // SAFETY: loom checks that no other access overlaps this one.
                    shared.1.with_mut(|v| unsafe { *v += 1 });
                    1
                }
                None => 0,
            };
            t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 1 + got);
            assert!(!shared.0.is_locked());
        });
    }

    /// Two waiting lockers: both get in, one after the other.
    #[test]
    fn two_lockers_both_progress() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                let _g = other.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                other.1.with_mut(|v| unsafe { *v += 1 });
            });
            {
                let _g = shared.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                shared.1.with_mut(|v| unsafe { *v += 1 });
            }
            t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 2);
            assert!(!shared.0.is_locked());
        });
    }

    /// Three waiting lockers: each release wakes one sleeper, and the one
    /// it wakes takes the lock in state 2, so that its own release wakes
    /// the next: nobody sleeps through the last release (a waiter that took
    /// the lock in state 1 would release without a wake, and loom would
    /// report the third locker asleep for good). Three preemptions at most
    /// (about 10 s on two cores; two already find that bug).
    #[test]
    fn three_lockers_pass_the_wake_on() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let threads: std::vec::Vec<_> = (0..2)
                .map(|_| {
                    let other = shared.clone();
                    loom::thread::spawn(move || {
                        let _g = other.0.lock(&P);
                        // SAFETY: loom checks that no other access overlaps this one.
                        other.1.with_mut(|v| unsafe { *v += 1 });
                    })
                })
                .collect();
            {
                let _g = shared.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                shared.1.with_mut(|v| unsafe { *v += 1 });
            }
            for t in threads {
                t.join().unwrap();
            }
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 3);
            assert!(!shared.0.is_locked());
        });
    }

    /// Polling lockers (no announced waiters, no wakes): both get in, and
    /// the state never becomes "contended".
    #[test]
    fn polling_lockers_both_progress() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::with_polling(true), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                let _g = other.0.lock(&P);
                assert_ne!(other.0.state.load(Ordering::Relaxed), CONTENDED);
                // SAFETY: loom checks that no other access overlaps this one.
                other.1.with_mut(|v| unsafe { *v += 1 });
            });
            {
                let _g = shared.0.lock(&P);
                assert_ne!(shared.0.state.load(Ordering::Relaxed), CONTENDED);
                // SAFETY: loom checks that no other access overlaps this one.
                shared.1.with_mut(|v| unsafe { *v += 1 });
            }
            t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 2);
            assert!(!shared.0.is_locked());
        });
    }

    /// A thread that holds the lock and asks for it again (as a signal
    /// handler that interrupted it would) gets `None` at once instead of
    /// waiting for itself, while another thread's waiting `lock()` still
    /// gets in once the holder releases.
    #[test]
    fn owner_degrades_instead_of_waiting() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                let _g = other.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                other.1.with_mut(|v| unsafe { *v += 1 });
            });
            {
                let g = shared.0.lock(&P);
                assert!(shared.0.held_by_me(&P));
                assert!(shared.0.lock_in(Mode::Normal, &P).is_none());
                assert!(shared.0.try_lock(&P).is_none());
                // SAFETY: loom checks that no other access overlaps this one.
                shared.1.with_mut(|v| unsafe { *v += 1 });
                drop(g);
            }
            assert!(!shared.0.held_by_me(&P));
            t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 2);
            assert!(!shared.0.is_locked());
        });
    }

    /// A normal-path waiter against a fork's hold (`lock_raw`): it either
    /// gets the lock before the fork does (and the fork waits for it) or
    /// gives way (`None`), whether it was already waiting when the hold
    /// began or came later; it never waits for the hold. A bare `lock`
    /// waits through the hold and gets the lock after `force_unlock`.
    #[cfg(feature = "std")]
    #[test]
    fn normal_waiters_give_way_to_a_fork_hold() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                if let Some(_g) = other.0.lock_in(Mode::Normal, &P) {
                    // SAFETY: loom checks that no other access overlaps this one.
                    other.1.with_mut(|v| unsafe { *v += 1 });
                }
            });
            shared.0.lock_raw(&P);
            // SAFETY: loom checks that no other access overlaps this one.
            shared.1.with_mut(|v| unsafe { *v += 1 });
            t.join().unwrap();
            assert!(shared.0.is_locked());
            assert!(shared.0.try_lock(&P).is_none());
            // SAFETY: taken by lock_raw above.
            unsafe { shared.0.force_unlock(&P) };
            assert!(!shared.0.is_locked());
        });
    }

    /// Two normal-path waiters, possibly both asleep, when a fork's hold
    /// begins: `lock_raw` wakes every one (`wake_many`), so each gives way
    /// (or got the lock before the hold) while the hold lasts; the hold
    /// is joined before `force_unlock`, so a waiter left asleep is a
    /// deadlock loom reports (waking one only: checked). Three preemptions
    /// at most.
    #[cfg(feature = "std")]
    #[test]
    fn every_sleeping_waiter_gives_way_to_a_fork_hold() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let threads: std::vec::Vec<_> = (0..2)
                .map(|_| {
                    let other = shared.clone();
                    loom::thread::spawn(move || {
                        if let Some(_g) = other.0.lock_in(Mode::Normal, &P) {
                            // SAFETY: loom checks that no other access overlaps this one.
                            other.1.with_mut(|v| unsafe { *v += 1 });
                        }
                    })
                })
                .collect();
            shared.0.lock_raw(&P);
            for t in threads {
                t.join().unwrap();
            }
            assert!(shared.0.is_locked());
            // SAFETY: taken by lock_raw above.
            unsafe { shared.0.force_unlock(&P) };
            assert!(!shared.0.is_locked());
        });
    }

    /// A bare `lock` does not give way: it waits through a fork's hold.
    #[cfg(feature = "std")]
    #[test]
    fn a_bare_lock_waits_through_a_fork_hold() {
        loom::model(|| {
            let shared = Arc::new((ZoneLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            shared.0.lock_raw(&P);
            let t = loom::thread::spawn(move || {
                let _g = other.0.lock(&P);
                // SAFETY: loom checks that no other access overlaps this one.
                other.1.with_mut(|v| unsafe { *v += 1 });
            });
            // SAFETY: loom checks that no other access overlaps this one.
            shared.1.with_mut(|v| unsafe { *v += 1 });
            // SAFETY: taken by lock_raw above.
            unsafe { shared.0.force_unlock(&P) };
            t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            assert_eq!(shared.1.with(|v| unsafe { *v }), 2);
            assert!(!shared.0.is_locked());
        });
    }
}

/// Without std the owner word holds the [`Platform::thread_id`] the
/// embedder supplies, whatever its low bit.
#[cfg(all(test, not(feature = "std"), not(loom)))]
mod platform_id_tests {
    extern crate std;

    use super::*;
    use core::sync::atomic::AtomicBool;
    use core::sync::atomic::Ordering::SeqCst;
    use std::cell::Cell;

    std::thread_local! {
        static ID: Cell<usize> = const { Cell::new(0) };
    }
    /// A waiter has gone to sleep (called `Platform::wait`).
    static SLEPT: AtomicBool = AtomicBool::new(false);

    /// Thread ids from a thread-local, set by each test thread.
    struct Ids;
    impl Platform for Ids {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            1
        }
        fn thread_id(&self) -> usize {
            ID.with(Cell::get)
        }
        fn wait(&self, _word: &AtomicU32, _expected: u32) {
            SLEPT.store(true, SeqCst);
            std::thread::yield_now();
        }
    }
    static IDS: Ids = Ids;

    /// Two threads whose ids differ only in the low bit (2 and 3, as an
    /// embedder numbering its threads 1, 2, 3, ... gives them): the one
    /// with the even id waits for the other's lock and gets it once it is
    /// released. (The owner check took `3 == 2 | FORK_HELD` for "held by
    /// this thread across a fork": `lock_in(Normal)` gave up at once, so
    /// the normal path failed an allocation under mere contention, and a
    /// bare `lock` reported a self-deadlock and stopped the program.)
    #[test]
    fn ids_that_differ_in_the_low_bit_are_different_threads() {
        for (holder, waiter) in [(3usize, 2usize), (usize::MAX, usize::MAX - 1)] {
            SLEPT.store(false, SeqCst);
            let lock = ZoneLock::new();
            ID.with(|id| id.set(holder));
            let held = lock.lock(&IDS);
            assert!(lock.held_by_me(&IDS));
            let got = std::thread::scope(|s| {
                let t = s.spawn(|| {
                    ID.with(|id| id.set(waiter));
                    assert!(!lock.held_by_me(&IDS));
                    lock.lock_in(Mode::Normal, &IDS).map(drop).is_some()
                });
                // Released once the waiter sleeps (it then gets the lock),
                // or once it has given up (the bug).
                while !SLEPT.load(SeqCst) && !t.is_finished() {
                    std::thread::yield_now();
                }
                drop(held);
                t.join().unwrap()
            });
            assert!(
                got,
                "thread {waiter:#x} took thread {holder:#x}'s lock for its own and gave up"
            );
            assert!(!lock.is_locked());
        }
    }

    /// The owner check still works with an odd id: a thread that holds the
    /// lock and asks for it again (an interrupt handler that interrupted
    /// the holder) gets `None` instead of waiting for itself.
    #[test]
    fn an_odd_id_still_sees_its_own_lock() {
        ID.with(|id| id.set(3));
        let lock = ZoneLock::new();
        let held = lock.lock(&IDS);
        assert!(lock.held_by_me(&IDS));
        assert!(lock.lock_in(Mode::Normal, &IDS).is_none());
        drop(held);
        assert!(lock.lock_in(Mode::Normal, &IDS).is_some());
    }
}
