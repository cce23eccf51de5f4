//! The zone lock: `lock()` for the normal path, `try_lock()` for the nolock path.
//!
//! Modelled on std's futex mutex, with the waiting delegated to the
//! [`Platform`] so the same lock works in `no_std` (where the embedder decides
//! how to wait, typically by spinning with interrupts enabled).
//!
//! State table:
//!
//! | state | meaning                                   |
//! |-------|-------------------------------------------|
//! | 0     | unlocked                                  |
//! | 1     | locked, no context is waiting              |
//! | 2     | locked, some context may be waiting        |
//!
//! Transitions:
//!
//! * `try_lock`: CAS 0 -> 1 (Acquire). Never waits, never makes a syscall.
//! * `lock`: CAS 0 -> 1; on failure spin a little while the state is 1
//!   (short critical sections usually end within the spin); then swap in 2
//!   and, while the previous state was not 0, wait until the state changes
//!   from 2. Swapping in 2 (rather than CAS 0 -> 1) is conservative: it may
//!   cause one unnecessary wake, never a missed one.
//! * unlock (guard drop): swap 0 (Release); if the previous state was 2, wake
//!   one waiter.
//!
//! The lock never allocates. `lock()` must not be called in any context that
//! may have interrupted a holder of the same lock (signal handlers, IRQs):
//! that is a deadlock. The nolock path only ever calls `try_lock()`.

use super::atomic::{spin_hint, AtomicU32, Ordering};
use crate::platform::Platform;

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
const CONTENDED: u32 = 2;

/// How many times `lock()` spins before it starts waiting.
const SPIN_LIMIT: u32 = 100;

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
}

/// Proof that a [`ZoneLock`] is held; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ZoneGuard<'a> {
    lock: &'a ZoneLock,
    platform: &'a dyn Platform,
}

impl core::fmt::Debug for ZoneGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ZoneGuard").finish_non_exhaustive()
    }
}

impl ZoneLock {
    /// An unlocked lock.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        ZoneLock {
            state: AtomicU32::new(UNLOCKED),
        }
    }

    /// An unlocked lock (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        ZoneLock {
            state: AtomicU32::new(UNLOCKED),
        }
    }

    /// Takes the lock if it is free. Never waits: safe in any context.
    #[inline]
    pub fn try_lock<'a>(&'a self, platform: &'a dyn Platform) -> Option<ZoneGuard<'a>> {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| ZoneGuard {
                lock: self,
                platform,
            })
    }

    /// Takes the lock, waiting for it if needed. Normal context only.
    #[inline]
    pub fn lock<'a>(&'a self, platform: &'a dyn Platform) -> ZoneGuard<'a> {
        if self
            .state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended(platform);
        }
        ZoneGuard {
            lock: self,
            platform,
        }
    }

    #[cold]
    fn lock_contended(&self, platform: &dyn Platform) {
        // Spin while the holder is (probably) running its short section.
        let mut state = self.state.load(Ordering::Relaxed);
        let mut spins = 0;
        while state == LOCKED && spins < SPIN_LIMIT {
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
            return;
        }
        // Announce a waiter. If the lock was free at the swap we now own it
        // (in state 2, which costs at most one spurious wake at unlock).
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            wait_while(platform, &self.state, CONTENDED);
        }
    }

    /// Takes the lock without a guard (fork handling: held across `fork`).
    /// Pair with [`force_unlock`](Self::force_unlock).
    #[cfg(feature = "std")]
    pub(crate) fn lock_raw(&self, platform: &dyn Platform) {
        core::mem::forget(self.lock(platform));
    }

    /// Releases a lock taken with [`lock_raw`](Self::lock_raw), waking a
    /// waiter if there is one.
    ///
    /// # Safety
    /// The caller took the lock with `lock_raw` (in this process, or in the
    /// parent of this forked child) and nothing else releases it.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn force_unlock(&self, platform: &dyn Platform) {
        drop(ZoneGuard {
            lock: self,
            platform,
        });
    }

    /// Takes the lock as `mode` allows: waiting for it (`Normal`), or only if
    /// it is free right now (`NoLock`; `None` when busy).
    #[inline]
    pub fn lock_in<'a>(&'a self, mode: Mode, platform: &'a dyn Platform) -> Option<ZoneGuard<'a>> {
        match mode {
            Mode::Normal => Some(self.lock(platform)),
            Mode::NoLock => self.try_lock(platform),
        }
    }

    /// Whether the lock is held right now (a racy hint, for stats and tests).
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }
}

impl Default for ZoneLock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(not(loom))]
fn wait_while(platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    platform.wait(word, expected);
}

#[cfg(loom)]
fn wait_while(_platform: &dyn Platform, word: &AtomicU32, expected: u32) {
    // loom cannot model a futex; yielding while the word is unchanged
    // explores the same interleavings.
    while word.load(Ordering::Relaxed) == expected {
        loom::thread::yield_now();
    }
}

impl Drop for ZoneGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release publishes the critical section to the next Acquire.
        if self.lock.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            // A `lock()` caller announced that it waits: wake one. The
            // platform's wake never blocks (a futex wake on std), so this is
            // safe on the nolock path too.
            wake(self.platform, &self.lock.state);
        }
    }
}

#[cfg(not(loom))]
#[cold]
fn wake(platform: &dyn Platform, word: &AtomicU32) {
    crate::interrupt_point!(ZoneWake);
    platform.wake_one(word);
}

#[cfg(loom)]
fn wake(_platform: &dyn Platform, _word: &AtomicU32) {}

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
}
