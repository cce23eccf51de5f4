//! A try-only lock guarding one per-CPU slot.
//!
//! State table of the single atomic:
//!
//! | value   | meaning                       | transitions                          |
//! |---------|-------------------------------|--------------------------------------|
//! | `false` | free                          | `try_lock`: CAS false -> true (Acquire) |
//! | `true`  | held by one context           | guard drop: store false (Release)    |
//!
//! There is deliberately no blocking `lock()`. A holder may be a thread that
//! was preempted, migrated to another CPU, or interrupted by a signal handler
//! on its own stack; waiting for it could deadlock (the handler) or stall
//! (the preempted thread). Callers that find the slot busy take another
//! route: another slot, the zone, or the deferred list.

use super::atomic::{AtomicBool, Ordering};

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
    held: AtomicBool,
}

/// Proof that a [`SlotLock`] is held; releases it when dropped.
#[must_use = "the slot is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct SlotGuard<'a> {
    lock: &'a SlotLock,
}

impl SlotLock {
    /// A free lock.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        SlotLock {
            held: AtomicBool::new(false),
        }
    }

    /// A free lock (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        SlotLock {
            held: AtomicBool::new(false),
        }
    }

    /// Takes the lock if it is free; never waits.
    #[inline]
    pub fn try_lock(&self) -> Option<SlotGuard<'_>> {
        // Acquire pairs with the Release store of the previous holder's
        // guard drop, so everything it wrote in the slot is visible to us.
        self.held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SlotGuard { lock: self })
    }

    /// The guard of a lock the caller took by other means: the rseq lock
    /// sequence (`sync::rseq::lock_slot`), whose committing `lock cmpxchg`
    /// set the flag on this CPU.
    ///
    /// # Safety
    /// The caller's context set the flag (false -> true) and holds no other
    /// guard of this lock.
    #[inline]
    pub(crate) unsafe fn adopt(&self) -> SlotGuard<'_> {
        // The CAS in assembly is a full barrier on x86-64; this keeps the
        // compiler from moving the holder's accesses above it.
        super::atomic::fence(Ordering::Acquire);
        SlotGuard { lock: self }
    }

    /// Whether some context holds the lock right now (a racy hint).
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.held.load(Ordering::Relaxed)
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
        self.lock.held.store(false, Ordering::Release);
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
}
