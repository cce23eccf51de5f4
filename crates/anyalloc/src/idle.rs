//! Idleness as the maintenance passes see it.
//!
//! A per-CPU page list, a sheaf slot or a barn is "idle" when a summary of
//! its state (a few words folded into one) has not changed for a number of
//! consecutive maintenance passes. The allocation paths never touch this
//! bookkeeping: only the maintenance pass (serialised by the heap's
//! maintenance lock and the page allocator's drain lock) observes.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct IdleWatch {
    snap: AtomicUsize,
    passes: AtomicU32,
}

impl IdleWatch {
    pub(crate) const fn new() -> Self {
        IdleWatch {
            snap: AtomicUsize::new(0),
            passes: AtomicU32::new(0),
        }
    }

    /// Records this pass's summary `snap`; returns for how many passes in a
    /// row it has been the same (0 when it just changed), saturating: a
    /// cache that stays idle for good is seen once per pass, and 2^32
    /// passes are 50 days of `Heap::maintain` every millisecond (an
    /// overflow there panicked in a debug build, and wrapped to "just changed"
    /// in a release build).
    pub(crate) fn observe(&self, snap: usize) -> u32 {
        let passes = if self.snap.swap(snap, Ordering::Relaxed) == snap {
            self.passes.load(Ordering::Relaxed).saturating_add(1)
        } else {
            0
        };
        self.passes.store(passes, Ordering::Relaxed);
        passes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_count_saturates_instead_of_overflowing() {
        let w = IdleWatch::new();
        assert_eq!(w.observe(7), 0);
        assert_eq!(w.observe(7), 1);
        // As after 2^32 - 2 more passes with the same summary.
        w.passes.store(u32::MAX - 1, Ordering::Relaxed);
        assert_eq!(w.observe(7), u32::MAX);
        assert_eq!(w.observe(7), u32::MAX, "still idle, not just changed");
        assert_eq!(w.observe(8), 0);
    }
}
