//! A bounded single-producer single-consumer ring of pointers, built from
//! atomics only: no allocation per message, no lock.
//!
//! `tail` is written only by the producer and `head` only by the consumer;
//! each side keeps a private cached copy of the other's index and rereads it
//! only when the ring looks full (producer) or empty (consumer), so in steady
//! state the two cores share just the slot cache lines.
//!
//! Both sides publish in groups. The consumer hands consumed slots back
//! every `N / 8` pops (and whenever it finds the ring empty), so while the
//! producer waits for room the `head` line moves between the cores once per
//! group, not per message. The producer publishes filled slots every `N / 8`
//! pushes (and whenever it finds the ring full, and on
//! [`flush`](Producer::flush)), so the consumer never reads a slot line the
//! producer is still writing. Without that, a ring that runs nearly empty
//! (a producer slightly slower than its consumer) moves the `tail` line and
//! the current slot line between the cores on every message, which slows the
//! producer further: the ring stays in that state, and a measurement through
//! it takes one of two speeds (observed: 16 or 35 ns per message for the same
//! allocator, from one sample to the next) depending on which state a sample
//! started in. Publishing in groups keeps the two ends at least a group
//! apart.
//!
//! Slot hand-off: the producer stores the pointer into `slots[tail % N]`
//! (Relaxed) and then publishes `tail + 1` with Release; the consumer loads
//! `tail` with Acquire before reading the slot, so it sees the pointer (and
//! everything the producer wrote before it). The consumer's Release store of
//! `head` pairs with the producer's Acquire load before a slot is reused.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Keeps a value on a cache line of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Line<T>(T);

/// A bounded SPSC ring of `N` pointer slots (`N` a power of two). One thread
/// may call [`push`](Producer::push) and one other thread [`pop`](Consumer::pop); the
/// side caches are plain [`Cell`]s, so the ring is shared through the
/// [`Producer`] and [`Consumer`] handles, which are `Send` but not `Clone`.
#[derive(Debug)]
pub struct Ring<const N: usize> {
    head: Line<AtomicUsize>,
    tail: Line<AtomicUsize>,
    slots: [AtomicPtr<u8>; N],
}

impl<const N: usize> Default for Ring<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Ring<N> {
    const MASK: usize = {
        assert!(N.is_power_of_two(), "ring size must be a power of two");
        N - 1
    };

    /// How many slots each end hands to the other at a time (see the
    /// module documentation): `N / 8`, or 1 for a ring of fewer than 64.
    pub const GROUP: usize = if N >= 64 { N / 8 } else { 1 };

    /// An empty ring.
    pub fn new() -> Self {
        let _ = Self::MASK;
        Ring {
            head: Line(AtomicUsize::new(0)),
            tail: Line(AtomicUsize::new(0)),
            slots: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }

    /// Splits the ring into its two ends. Taking `&mut self` guarantees
    /// there is one producer and one consumer at a time.
    pub fn split(&mut self) -> (Producer<'_, N>, Consumer<'_, N>) {
        let ring: &Ring<N> = self;
        let tail = ring.tail.0.load(Ordering::Relaxed);
        let head = ring.head.0.load(Ordering::Relaxed);
        (
            Producer {
                ring,
                tail: Cell::new(tail),
                published: Cell::new(tail),
                head_cache: Cell::new(head),
            },
            Consumer {
                ring,
                head: Cell::new(head),
                published: Cell::new(head),
                tail_cache: Cell::new(tail),
            },
        )
    }

    /// Items in the ring (a racy snapshot).
    pub fn len(&self) -> usize {
        self.tail
            .0
            .load(Ordering::Acquire)
            .wrapping_sub(self.head.0.load(Ordering::Acquire))
    }

    /// Whether the ring is empty (a racy snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The producing end of a [`Ring`].
#[derive(Debug)]
pub struct Producer<'a, const N: usize> {
    ring: &'a Ring<N>,
    tail: Cell<usize>,
    /// The last `tail` stored into the ring.
    published: Cell<usize>,
    head_cache: Cell<usize>,
}

/// The consuming end of a [`Ring`].
#[derive(Debug)]
pub struct Consumer<'a, const N: usize> {
    ring: &'a Ring<N>,
    head: Cell<usize>,
    /// The last `head` stored into the ring.
    published: Cell<usize>,
    tail_cache: Cell<usize>,
}

impl<const N: usize> Producer<'_, N> {
    /// Filled slots are handed to the consumer in groups of
    /// [`Ring::GROUP`] (and whenever the ring is full, and on
    /// [`flush`](Self::flush)).
    const PUBLISH_EVERY: usize = Ring::<N>::GROUP;

    /// Makes every pushed pointer visible to the consumer.
    #[inline]
    pub fn flush(&self) {
        let t = self.tail.get();
        if self.published.get() != t {
            self.ring.tail.0.store(t, Ordering::Release);
            self.published.set(t);
        }
    }

    /// Appends `p`; `false` (and nothing stored) when the ring is full.
    /// The consumer sees `p` once a group is complete, the ring is full
    /// or [`flush`](Self::flush) is called.
    #[inline]
    pub fn push(&self, p: *mut u8) -> bool {
        let t = self.tail.get();
        if t.wrapping_sub(self.head_cache.get()) == N {
            self.head_cache
                .set(self.ring.head.0.load(Ordering::Acquire));
            if t.wrapping_sub(self.head_cache.get()) == N {
                // Everything pushed must be visible, or the consumer could
                // wait for a group that cannot complete.
                self.flush();
                return false;
            }
        }
        self.ring.slots[t & Ring::<N>::MASK].store(p, Ordering::Relaxed);
        let t = t.wrapping_add(1);
        self.tail.set(t);
        if t.wrapping_sub(self.published.get()) >= Self::PUBLISH_EVERY {
            self.flush();
        }
        true
    }
}

impl<const N: usize> Drop for Producer<'_, N> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<const N: usize> Consumer<'_, N> {
    /// Slots are handed back to the producer in groups of [`Ring::GROUP`]
    /// (and whenever the ring runs empty), which keeps the `head` cache
    /// line from bouncing on every message while the producer waits for
    /// room.
    const PUBLISH_EVERY: usize = Ring::<N>::GROUP;

    #[inline]
    fn publish(&self) {
        let h = self.head.get();
        if self.published.get() != h {
            self.ring.head.0.store(h, Ordering::Release);
            self.published.set(h);
        }
    }

    /// Takes the oldest pointer, or `None` when the ring is empty.
    #[inline]
    pub fn pop(&self) -> Option<*mut u8> {
        let h = self.head.get();
        if h == self.tail_cache.get() {
            self.tail_cache
                .set(self.ring.tail.0.load(Ordering::Acquire));
            if h == self.tail_cache.get() {
                self.publish();
                return None;
            }
        }
        let p = self.ring.slots[h & Ring::<N>::MASK].load(Ordering::Relaxed);
        let h = h.wrapping_add(1);
        self.head.set(h);
        if h.wrapping_sub(self.published.get()) >= Self::PUBLISH_EVERY {
            self.publish();
        }
        Some(p)
    }
}

impl<const N: usize> Drop for Consumer<'_, N> {
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct non-null test pointer (never dereferenced).
    fn ptr(i: usize) -> *mut u8 {
        std::ptr::without_provenance_mut(i)
    }

    #[test]
    fn fifo_and_bounded() {
        let mut r = Ring::<4>::new();
        let (p, c) = r.split();
        assert_eq!(c.pop(), None);
        for i in 1..=4usize {
            assert!(p.push(ptr(i)));
        }
        assert!(!p.push(ptr(5)), "full at N");
        assert_eq!(c.pop(), Some(ptr(1)));
        assert!(p.push(ptr(5)));
        for i in 2..=5usize {
            assert_eq!(c.pop(), Some(ptr(i)));
        }
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn producer_publishes_in_groups_when_full_and_on_flush() {
        let mut r = Ring::<64>::new();
        let (p, c) = r.split();
        for i in 1..=7usize {
            assert!(p.push(ptr(i)));
        }
        assert_eq!(c.pop(), None, "a group of 8 is not complete yet");
        assert!(p.push(ptr(8)));
        for i in 1..=8usize {
            assert_eq!(c.pop(), Some(ptr(i)));
        }
        assert!(p.push(ptr(9)));
        assert_eq!(c.pop(), None);
        p.flush();
        assert_eq!(c.pop(), Some(ptr(9)));
        assert_eq!(c.pop(), None, "and the consumer hands back all 9 slots");
        // Fill the ring: the failed push publishes what it holds.
        let mut i = 10usize;
        while p.push(ptr(i)) {
            i += 1;
        }
        assert_eq!(i - 10, 64, "full at N");
        for j in 10..i {
            assert_eq!(c.pop(), Some(ptr(j)));
        }
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn two_threads_transfer_everything_in_order() {
        const COUNT: usize = 200_000;
        let mut r = Box::new(Ring::<64>::new());
        let (p, c) = r.split();
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 1..=COUNT {
                    crate::spin_until(|| p.push(ptr(i)));
                }
            });
            let mut next = 1usize;
            while next <= COUNT {
                if let Some(v) = c.pop() {
                    assert_eq!(v.addr(), next);
                    next += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            drop(c);
        });
        assert!(r.is_empty());
    }
}
