//! A try-only lock guarding one per-CPU slot.
//!
//! State table of the single byte (the rseq sequences test it for zero,
//! or, the sheaf push, for its top bit: every value but `FREE` has it,
//! see below):
//!
//! | value | meaning | transitions |
//! |---|---|---|
//! | `FREE` (0) | free | `try_lock`: CAS to `HELD` (Acquire) |
//! | `HELD` (0x80) | held by one context | guard drop: store `FREE` (Release) |
//! | `FORK_HELD` (0x81) | held across `fork` by the fork handler | `try_lock` on the fork window's owner thread: CAS to `FORK_LENT`; the handler's release: store `FREE` |
//! | `FORK_LENT` (0x82) | lent to one context of the fork window's owner | guard drop: store `FORK_HELD` (Release) |
//!
//! **The top bit.** A sheaf slot keeps its lock byte as the most
//! significant byte of the word its push sequence compares `top` with
//! (`slab::cache::SheafSlot`): the word reads as a negative number exactly
//! while the slot is held, which fails the sequence's signed comparison.
//! So taking the lock closes the push in the same instruction, with no
//! test of the lock of its own in the sequence.
//!
//! There is deliberately no blocking `lock()`. A holder may be a thread that
//! was preempted, migrated to another CPU, or interrupted by a signal handler
//! on its own stack; waiting for it could deadlock (the handler) or stall
//! (the preempted thread). Callers that find the slot busy take another
//! route: another slot, the zone, or the deferred list.
//!
//! **Fork.** A forked child must not inherit a slot that another thread
//! held at the fork (nobody would release it there: the slot's objects or
//! pages would stay out of reach, and its CPU's fast path closed). The
//! normal path's slots (level 0) have holders that wait for node and zone
//! locks, which `fork`'s prepare handler holds across the fork; so it
//! holds those slots too ([`hold_all`](SlotLock::hold_all)), taken before
//! any lock their holders may wait for, so each holder finishes. (The
//! other levels' holders are nolock contexts, which never wait; those
//! slots stay free for other threads' signal handlers during the fork.
//! Only a nolock section running on another CPU at the very instant of
//! the clone leaves its slot held in the child.) Fork handlers registered
//! before the allocator's run in that window and may allocate (see
//! `context`), and so may signal handlers that interrupt them: a context
//! of the window's owner thread borrows a held slot, one at a time
//! (`FORK_LENT`: a handler that interrupts a borrowed section finds it
//! busy, as it would a held one).

use super::atomic::{AtomicU8, Ordering};

const FREE: u8 = 0;
/// Held (the value the rseq lock sequence stores too); see the module
/// documentation for the top bit every held state has.
pub(crate) const HELD: u8 = 0x80;
const FORK_HELD: u8 = 0x81;
const FORK_LENT: u8 = 0x82;
const _: () = assert!(HELD & FORK_HELD & FORK_LENT & 0x80 != 0);

/// A try-only lock; see the module documentation.
///
/// ```
/// use anyalloc::sync::SlotLock;
/// let slot = SlotLock::new();
/// let guard = slot.try_lock().expect("a free slot");
/// // A handler that interrupted the holder finds the slot busy: it goes
/// // elsewhere instead of waiting.
/// assert!(slot.try_lock().is_none());
/// drop(guard);
/// assert!(slot.try_lock().is_some());
/// ```
#[derive(Debug)]
pub struct SlotLock {
    state: AtomicU8,
}

/// Proof that a [`SlotLock`] is held; releases it when dropped.
#[must_use = "the slot is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct SlotGuard<'a> {
    lock: &'a SlotLock,
    /// Borrowed in the fork window: the drop gives it back to the fork.
    lent: bool,
}

impl SlotLock {
    /// A free lock.
    ///
    /// ```
    /// use anyalloc::sync::SlotLock;
    /// static SLOT: SlotLock = SlotLock::new(); // `const`: fits a static
    /// assert!(!SLOT.is_locked());
    /// ```
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        SlotLock {
            state: AtomicU8::new(FREE),
        }
    }

    /// A free lock (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        SlotLock {
            state: AtomicU8::new(FREE),
        }
    }

    /// Takes the lock if it is free (or, on the fork window's owner thread,
    /// held across the fork and not lent); never waits.
    ///
    /// ```
    /// use anyalloc::sync::SlotLock;
    /// let slots = [SlotLock::new(), SlotLock::new()];
    /// let _mine = slots[0].try_lock().expect("free");
    /// // Busy: take another route (here, the next slot) instead of waiting.
    /// let guard = slots.iter().find_map(|s| s.try_lock());
    /// assert!(guard.is_some());
    /// assert!(slots.iter().all(|s| s.try_lock().is_none()));
    /// ```
    #[inline]
    pub fn try_lock(&self) -> Option<SlotGuard<'_>> {
        // Acquire pairs with the Release store of the previous holder's
        // guard drop, so everything it wrote in the slot is visible to us.
        match self
            .state
            .compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => Some(SlotGuard {
                lock: self,
                lent: false,
            }),
            Err(FORK_HELD) => self.borrow(),
            Err(_) => None,
        }
    }

    /// The fork window's owner borrows a slot held across the fork.
    #[cold]
    #[inline(never)]
    pub(crate) fn borrow(&self) -> Option<SlotGuard<'_>> {
        if !crate::context::owns_fork_window() {
            return None;
        }
        self.state
            .compare_exchange(FORK_HELD, FORK_LENT, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SlotGuard {
                lock: self,
                lent: true,
            })
    }

    /// The guard of a lock the caller took by other means: the rseq lock
    /// sequence (`sync::rseq::lock_slot`), whose committing `lock cmpxchg`
    /// set the flag on this CPU.
    ///
    /// # Safety
    /// The caller's context set the flag (`FREE` -> `HELD`) and holds no
    /// other guard of this lock.
    #[inline]
    pub(crate) unsafe fn adopt(&self) -> SlotGuard<'_> {
        // The CAS in assembly is a full barrier on x86-64; this keeps the
        // compiler from moving the holder's accesses above it.
        super::atomic::fence(Ordering::Acquire);
        SlotGuard {
            lock: self,
            lent: false,
        }
    }

    /// Whether some context holds the lock right now (a racy hint).
    ///
    /// ```
    /// use anyalloc::sync::SlotLock;
    /// let slot = SlotLock::new();
    /// assert!(!slot.is_locked());
    /// let guard = slot.try_lock().unwrap();
    /// assert!(slot.is_locked());
    /// drop(guard);
    /// assert!(!slot.is_locked());
    /// ```
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != FREE
    }
}

#[cfg(feature = "std")]
impl SlotLock {
    /// Takes every lock of `locks` for `fork` (`FORK_HELD`), waiting while
    /// their holders finish, or none: if one is still held when `patience`
    /// has passed (its holder may be the forking thread itself, interrupted
    /// inside the allocator by the signal handler that forked), releases
    /// the ones it took and returns `false`. Normal context. Release with
    /// [`release_all`](Self::release_all).
    ///
    /// Taking a level-0 slot needs no fence here, though sequences on its
    /// CPU may have read "free" before the take and commit after it: such
    /// a commit is one store, so the slot is consistent at the fork, and
    /// the only context that changes a held slot before the release is the
    /// window's owner, through [`borrow`](Self::borrow) on the CPU it runs
    /// on (where no sequence that started before the take can still be in
    /// flight: the owner ran the take, and the sequence's thread has been
    /// switched out since) or after a fence (`lock_remote`).
    pub(crate) fn hold_all<'a>(
        locks: impl Iterator<Item = &'a SlotLock> + Clone,
        patience: std::time::Duration,
    ) -> bool {
        let start = std::time::Instant::now();
        for (taken, lock) in locks.clone().enumerate() {
            let mut spins = 0u32;
            while lock
                .state
                .compare_exchange(FREE, FORK_HELD, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                // Under loom: let the holder run to its release (loom's
                // yield), instead of spinning and sleeping on the clock.
                #[cfg(loom)]
                {
                    let _ = (&mut spins, patience, start, taken);
                    loom::thread::yield_now();
                }
                #[cfg(not(loom))]
                {
                    spins += 1;
                    if !spins.is_multiple_of(64) {
                        core::hint::spin_loop();
                        continue;
                    }
                    if start.elapsed() > patience {
                        // SAFETY: the first `taken` locks were taken above.
                        unsafe { Self::release_all(locks.take(taken)) };
                        return false;
                    }
                    // A sleep, not a yield: the holder may be a thread this
                    // one preempted on its CPU (a real-time caller), which
                    // only gets the CPU while this one sleeps.
                    crate::platform::nap();
                }
            }
        }
        true
    }

    /// Releases locks taken by [`hold_all`](Self::hold_all).
    ///
    /// # Safety
    /// `hold_all` returned `true` for these locks (in this process, or in
    /// the parent of this forked child), they were not released since, and
    /// none is lent.
    pub(crate) unsafe fn release_all<'a>(locks: impl Iterator<Item = &'a SlotLock>) {
        for lock in locks {
            crate::check!(
                lock.state.load(Ordering::Relaxed) == FORK_HELD,
                "a slot released after fork that the fork did not hold"
            );
            lock.state.store(FREE, Ordering::Release);
        }
    }
}

impl Default for SlotLock {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SlotGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release publishes every write made under the lock to the next
        // holder (its Acquire CAS in `try_lock`).
        let to = if self.lent { FORK_HELD } else { FREE };
        self.lock.state.store(to, Ordering::Release);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// Two contexts increment a counter under the slot lock; a context that
    /// finds the slot busy gives up (counts a miss) instead of waiting.
    /// Mutual exclusion: loom's `UnsafeCell` reports any concurrent access.
    #[test]
    fn try_lock_is_mutually_exclusive() {
        loom::model(|| {
            let shared = Arc::new((SlotLock::new(), UnsafeCell::new(0u32)));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                if let Some(_g) = other.0.try_lock() {
                    // SAFETY: loom checks that no other access overlaps this one.
                    other.1.with_mut(|v| unsafe { *v += 1 });
                    1
                } else {
                    0
                }
            });
            let mine = if let Some(_g) = shared.0.try_lock() {
                // SAFETY: loom checks that no other access overlaps this one.
                shared.1.with_mut(|v| unsafe { *v += 1 });
                1
            } else {
                0
            };
            let theirs = t.join().unwrap();
            // SAFETY: loom checks that no other access overlaps this one.
            let total = shared.1.with(|v| unsafe { *v });
            assert_eq!(total, mine + theirs);
            assert!(mine + theirs >= 1, "at least one context gets the slot");
            assert!(!shared.0.is_locked());
        });
    }

    /// The fork's hold (`hold_all`) against a normal holder of each of
    /// two slots, and the fork window's borrowing: the hold waits for each
    /// holder's release and sees its writes (before any borrow, as a forked
    /// child does); while held, other threads
    /// find the slots busy; the window's owner thread borrows a held slot
    /// (one borrow at a time: a nested try on the borrowed slot, as a
    /// signal handler's, finds it busy) and gives it back to the hold;
    /// `release_all` frees both. loom's `UnsafeCell` reports any overlap.
    /// Checked by injection: a Relaxed CAS in `hold_all` (a causality
    /// violation), a borrow by any thread, a borrow's end that frees the
    /// slot. Left out: the patience (a clock) and the remote borrow
    /// (`lock_remote`, rseq); the only model here that opens a fork
    /// window (`context`'s window owner is a process-wide static).
    #[cfg(feature = "std")]
    #[test]
    fn hold_all_waits_for_holders_and_lends_to_the_fork_window() {
        loom::model(|| {
            let shared = Arc::new((
                [SlotLock::new(), SlotLock::new()],
                [UnsafeCell::new(0u32), UnsafeCell::new(0u32)],
            ));
            let other = shared.clone();
            let t = loom::thread::spawn(move || {
                let mut got = 0;
                for (slot, cell) in other.0.iter().zip(other.1.iter()) {
                    if let Some(_g) = slot.try_lock() {
                        // SAFETY: loom checks that no other access overlaps this one.
                        cell.with_mut(|v| unsafe { *v += 1 });
                        got += 1;
                    }
                }
                got
            });
            crate::context::fork_window_open();
            assert!(SlotLock::hold_all(
                shared.0.iter(),
                std::time::Duration::from_secs(3600)
            ));
            // The hold alone gives the slots' contents (a forked child
            // reads them as they were at the clone, before any borrow).
            // SAFETY: loom checks that no other access overlaps this one.
            let before: u32 = shared.1.iter().map(|c| c.with(|v| unsafe { *v })).sum();
            for (slot, cell) in shared.0.iter().zip(shared.1.iter()) {
                let g = slot.try_lock().expect("lent to the fork window's owner");
                assert!(slot.try_lock().is_none(), "lent twice");
                // SAFETY: loom checks that no other access overlaps this one.
                cell.with_mut(|v| unsafe { *v += 1 });
                drop(g);
                assert!(slot.is_locked(), "the borrow's end released the hold");
            }
            crate::context::fork_window_close();
            // SAFETY: held by hold_all above, not lent any more.
            unsafe { SlotLock::release_all(shared.0.iter()) };
            let got = t.join().unwrap();
            assert!(before <= got);
            // SAFETY: loom checks that no other access overlaps this one.
            let total: u32 = shared.1.iter().map(|c| c.with(|v| unsafe { *v })).sum();
            assert_eq!(total, 2 + got);
            assert!(shared.0.iter().all(|s| !s.is_locked()));
        });
    }
}
