//! A lock-free stash of handles shared by a thread, the handlers nested on
//! top of it and other threads.
//!
//! A handle is any non-zero word (an [`Entry`](crate::Entry), a packed
//! block, a pointer); 0 marks a free slot. Every operation is one atomic
//! instruction on one slot (compare-exchange 0 → handle, or swap), so
//! whoever takes a handle out owns it alone: a handler that interrupts a
//! `put` or `take` half-way through a search just finds the slot in one
//! state or the other, and no handle is lost or seen twice. The stash is a
//! fixed array (no `Vec`, no lock), usable as a `static`. Handler-safe.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::rng::mix64;

/// A fixed set of `N` atomic handle slots. Handler-safe.
pub struct Stash<const N: usize> {
    slots: [AtomicUsize; N],
}

impl<const N: usize> Stash<N> {
    /// An empty stash.
    pub const fn new() -> Self {
        Stash {
            slots: [const { AtomicUsize::new(0) }; N],
        }
    }

    /// Stores `h` (non-zero) in a free slot, searching from `start`
    /// (modulo `N`); `false` when every slot is taken.
    pub fn put(&self, h: usize, start: usize) -> bool {
        debug_assert!(h != 0);
        (0..N).any(|k| {
            self.slots[(start + k) % N]
                .compare_exchange(0, h, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Takes some handle, searching from `start` (modulo `N`).
    pub fn take(&self, start: usize) -> Option<usize> {
        (0..N).find_map(|k| {
            let s = &self.slots[(start + k) % N];
            if s.load(Ordering::Relaxed) == 0 {
                return None;
            }
            match s.swap(0, Ordering::AcqRel) {
                0 => None,
                h => Some(h),
            }
        })
    }

    /// Puts `h` (0 to empty it) in slot `i` (modulo `N`) and returns what
    /// the slot held (0: nothing). The caller now owns that handle: a
    /// hand-off without a search.
    #[inline]
    pub fn swap(&self, i: usize, h: usize) -> usize {
        self.slots[i % N].swap(h, Ordering::AcqRel)
    }

    /// How many handles it holds (exact only while nothing else uses it).
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Whether it holds no handle (exact only while nothing else uses it).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every handle, one slot at a time (meant for teardown, when no
    /// handler runs any more; concurrent users only see slots emptied).
    pub fn drain(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .filter_map(|s| match s.swap(0, Ordering::AcqRel) {
                0 => None,
                h => Some(h),
            })
    }
}

impl<const N: usize> Default for Stash<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// What one thread's storm handlers share, for a storm of two signals: a
/// stash of `N` blocks that one handler invocation leaves to a later one
/// (of either signal), a random counter and each signal's run count. Keep
/// one per worker in a static array and give its index to the worker's
/// timers ([`ThreadTimer::start`](crate::ThreadTimer::start)'s `value`).
/// Handler-safe.
pub struct HandlerSlot<const N: usize> {
    /// Blocks parked for a later handler invocation.
    pub stash: Stash<N>,
    rng: AtomicU64,
    runs: [AtomicU64; 2],
}

impl<const N: usize> HandlerSlot<N> {
    /// An empty slot.
    pub const fn new() -> Self {
        HandlerSlot {
            stash: Stash::new(),
            rng: AtomicU64::new(0),
            runs: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// A fresh random word: the slot's counter (one atomic add, so a
    /// nested handler cannot tear it) mixed with `salt`.
    #[inline]
    pub fn draw(&self, salt: u64) -> u64 {
        mix64(self.rng.fetch_add(1, Ordering::Relaxed) ^ salt)
    }

    /// Counts a run of the handler of signal `which` (0 or 1) and returns
    /// how many came before it (to act every n-th run, such as forcing the
    /// other signal to nest).
    #[inline]
    pub fn run(&self, which: usize) -> u64 {
        self.runs[which & 1].fetch_add(1, Ordering::Relaxed)
    }
}

impl<const N: usize> Default for HandlerSlot<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_take_swap_drain() {
        let s: Stash<4> = Stash::new();
        assert!(s.is_empty());
        for h in 1..=4 {
            assert!(s.put(h, 7));
        }
        assert!(!s.put(5, 0), "full");
        assert_eq!(s.len(), 4);
        // Searching from slot 2 takes slot 2's handle and leaves it free.
        let t = s.take(2).unwrap();
        assert_eq!(s.swap(2 + 4, 9), 0, "the slot taken from is free");
        let mut rest: Vec<usize> = s.drain().collect();
        rest.sort_unstable();
        let mut want: Vec<usize> = (1..=4).filter(|&h| h != t).chain([9]).collect();
        want.sort_unstable();
        assert_eq!(rest, want);
        assert!(s.take(0).is_none());
    }

    #[test]
    fn a_handler_slot_counts_runs_and_draws_fresh_words() {
        let h: HandlerSlot<2> = HandlerSlot::new();
        assert_eq!((h.run(0), h.run(0), h.run(1)), (0, 1, 0));
        assert_ne!(h.draw(7), h.draw(7));
        assert!(h.stash.put(9, 0));
    }

    #[test]
    fn threads_never_lose_or_duplicate_a_handle() {
        static S: Stash<64> = Stash::new();
        static SEEN: [AtomicUsize; 4001] = [const { AtomicUsize::new(0) }; 4001];
        std::thread::scope(|sc| {
            for t in 0..4usize {
                sc.spawn(move || {
                    for i in 0..1000 {
                        let h = 1 + t * 1000 + i;
                        while !S.put(h, h) {
                            if let Some(x) = S.take(h) {
                                SEEN[x].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if let Some(x) = S.take(i) {
                            SEEN[x].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        for h in S.drain() {
            SEEN[h].fetch_add(1, Ordering::Relaxed);
        }
        assert!(SEEN[1..].iter().all(|n| n.load(Ordering::Relaxed) == 1));
    }
}
