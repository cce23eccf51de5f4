//! An intrusive lock-free stack of `u32` indices (page indices) with a
//! version tag: push, pop **one**, and take-all.
//!
//! The head is one 64-bit word: the top index in the low 32 bits ([`NIL`]
//! when empty) and a tag in the high 32 bits that every successful
//! operation increments. Each element's link lives in the element itself (a
//! page descriptor's `next` field), reached through callbacks.
//!
//! * `push(i)`: read the head, write its index into `i`'s link, CAS the head
//!   to `(tag + 1, i)` (Release, so the link is visible to whoever takes
//!   `i`).
//! * `pop()`: read the head `(t, i)` (Acquire), read `i`'s link `n`, CAS the
//!   head from `(t, i)` to `(t + 1, n)`. The classic ABA problem (between
//!   the read and the CAS, `i` is popped, reused and pushed back with a new
//!   link, so the head is `i` again but `n` is stale) cannot pass the CAS:
//!   the head's tag moved on. A stale link read is harmless: links are
//!   atomics in memory that stays valid (descriptors), and the CAS fails.
//! * `take_all()`: CAS the head to `(t + 1, NIL)`; the chain now belongs to
//!   the caller.
//!
//! Each operation is O(1) (pop and take-all retry only when another context
//! changed the head meanwhile), so a caller can bound its work exactly: a
//! nolock allocation pops one block instead of taking the whole stack and
//! pushing the rest back. Safe from a signal handler that interrupted any
//! operation on the same stack (the interrupted CAS fails and retries).
//!
//! The tag wraps after 2^32 operations: an ABA would need one context to
//! stall between its read and its CAS while exactly a multiple of 2^32
//! operations complete; not a practical concern.

use super::atomic::{AtomicU64, Ordering};

/// The "no element" index.
pub const TAGGED_NIL: u32 = u32::MAX;
use TAGGED_NIL as NIL;

#[inline]
fn pack(tag: u32, index: u32) -> u64 {
    (tag as u64) << 32 | index as u64
}

#[inline]
fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// See the module documentation.
#[derive(Debug)]
pub struct TaggedStack {
    head: AtomicU64,
}

impl TaggedStack {
    /// An empty stack.
    ///
    /// ```
    /// use anyalloc::sync::TaggedStack;
    /// static DEFERRED: TaggedStack = TaggedStack::new(); // `const`: fits a static
    /// assert!(DEFERRED.is_empty());
    /// ```
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        TaggedStack {
            head: AtomicU64::new(NIL as u64),
        }
    }

    /// An empty stack (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        TaggedStack {
            head: AtomicU64::new(NIL as u64),
        }
    }

    /// Pushes `index`; `set_link(index, next)` must store `next` as the
    /// element's link. The caller owns `index` exclusively until this returns.
    ///
    /// ```
    /// use anyalloc::sync::{TaggedStack, TAGGED_NIL};
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// let links: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(TAGGED_NIL)).collect();
    /// let stack = TaggedStack::new();
    /// stack.push(2, |i, next| links[i as usize].store(next, Ordering::Relaxed));
    /// stack.push(0, |i, next| links[i as usize].store(next, Ordering::Relaxed));
    /// assert_eq!(links[0].load(Ordering::Relaxed), 2, "0's link is the old top");
    /// assert_eq!(links[2].load(Ordering::Relaxed), TAGGED_NIL);
    /// ```
    #[inline]
    pub fn push(&self, index: u32, mut set_link: impl FnMut(u32, u32)) {
        debug_assert_ne!(index, NIL);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let (tag, top) = unpack(head);
            set_link(index, top);
            // Release: the link written above is visible to a pop or take.
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), index),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }

    /// Pops the top element, if any; `link(index)` must read the element's
    /// link as `push` stored it. The caller owns the element afterwards.
    ///
    /// ```
    /// use anyalloc::sync::{TaggedStack, TAGGED_NIL};
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// let links: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(TAGGED_NIL)).collect();
    /// let stack = TaggedStack::new();
    /// for i in [1, 3] {
    ///     stack.push(i, |i, next| links[i as usize].store(next, Ordering::Relaxed));
    /// }
    /// let link = |i: u32| links[i as usize].load(Ordering::Relaxed);
    /// assert_eq!(stack.pop(link), Some(3)); // one element, last in first out
    /// assert_eq!(stack.pop(link), Some(1));
    /// assert_eq!(stack.pop(link), None);
    /// ```
    #[inline]
    pub fn pop(&self, link: impl Fn(u32) -> u32) -> Option<u32> {
        // Acquire pairs with the pusher's Release: its link is visible.
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let (tag, top) = unpack(head);
            if top == NIL {
                return None;
            }
            let next = link(top);
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), next),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(top),
                Err(actual) => head = actual,
            }
        }
    }

    /// Takes the whole chain; returns its first index or [`TAGGED_NIL`].
    /// Follow the chain through the links written by `push`.
    ///
    /// ```
    /// use anyalloc::sync::{TaggedStack, TAGGED_NIL};
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// let links: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(TAGGED_NIL)).collect();
    /// let stack = TaggedStack::new();
    /// for i in 0..3 {
    ///     stack.push(i, |i, next| links[i as usize].store(next, Ordering::Relaxed));
    /// }
    /// let (mut taken, mut i) = (Vec::new(), stack.take_all());
    /// while i != TAGGED_NIL {
    ///     taken.push(i);
    ///     i = links[i as usize].load(Ordering::Relaxed);
    /// }
    /// assert_eq!(taken, [2, 1, 0]);
    /// assert!(stack.is_empty());
    /// ```
    #[inline]
    pub fn take_all(&self) -> u32 {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let (tag, top) = unpack(head);
            if top == NIL {
                return NIL;
            }
            // Acquire pairs with the pushers' Release CAS.
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), NIL),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return top,
                Err(actual) => head = actual,
            }
        }
    }

    /// The index on top of the stack ([`TAGGED_NIL`] when empty), left
    /// there: a racy read unless nothing else uses the stack (a forked
    /// child, before its first allocation, walks the links from it).
    #[cfg(feature = "std")]
    #[inline]
    pub(crate) fn top(&self) -> u32 {
        unpack(self.head.load(Ordering::Acquire)).1
    }

    /// Whether the stack looks empty (a racy hint).
    ///
    /// ```
    /// use anyalloc::sync::{TaggedStack, TAGGED_NIL};
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// let link = AtomicU32::new(TAGGED_NIL);
    /// let stack = TaggedStack::new();
    /// assert!(stack.is_empty());
    /// stack.push(0, |_, next| link.store(next, Ordering::Relaxed));
    /// assert!(!stack.is_empty());
    /// assert_eq!(stack.pop(|_| link.load(Ordering::Relaxed)), Some(0));
    /// assert!(stack.is_empty());
    /// ```
    #[inline]
    pub fn is_empty(&self) -> bool {
        unpack(self.head.load(Ordering::Relaxed)).1 == NIL
    }
}

impl Default for TaggedStack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    extern crate std;
    use super::*;
    use loom::sync::atomic::AtomicU32 as LoomU32;
    use loom::sync::Arc;
    use std::vec;
    use std::vec::Vec;

    struct Links([LoomU32; 3]);

    impl Links {
        fn set(&self, i: u32, n: u32) {
            self.0[i as usize].store(n, Ordering::Relaxed)
        }
        fn get(&self, i: u32) -> u32 {
            self.0[i as usize].load(Ordering::Relaxed)
        }
    }

    /// A stack of three elements' links, holding 1 over 0.
    fn stack_of_two() -> Arc<(TaggedStack, Links)> {
        let shared = Arc::new((
            TaggedStack::new(),
            Links([LoomU32::new(NIL), LoomU32::new(NIL), LoomU32::new(NIL)]),
        ));
        shared.0.push(0, |i, n| shared.1.set(i, n));
        shared.0.push(1, |i, n| shared.1.set(i, n));
        shared
    }

    /// Takes the whole stack and adds what it held to `seen`.
    fn take_rest(shared: &(TaggedStack, Links), seen: &mut Vec<u32>) {
        let mut i = shared.0.take_all();
        while i != NIL {
            seen.push(i);
            i = shared.1.get(i);
        }
    }

    /// A pusher that pops one back and pushes it again (the reuse that makes
    /// ABA), a concurrent popper, and a final take: every element is
    /// obtained exactly once.
    #[test]
    fn push_pop_and_take_all_lose_and_duplicate_nothing() {
        loom::model(|| {
            let shared = stack_of_two();
            let a = shared.clone();
            let t1 = loom::thread::spawn(move || {
                let mut got = Vec::new();
                if let Some(i) = a.0.pop(|i| a.1.get(i)) {
                    // Reuse: push it back (a fresh link).
                    a.0.push(i, |i, n| a.1.set(i, n));
                }
                a.0.push(2, |i, n| a.1.set(i, n));
                if let Some(i) = a.0.pop(|i| a.1.get(i)) {
                    got.push(i);
                }
                got
            });
            let mut seen = Vec::new();
            if let Some(i) = shared.0.pop(|i| shared.1.get(i)) {
                seen.push(i);
            }
            seen.extend(t1.join().unwrap());
            take_rest(&shared, &mut seen);
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2]);
        });
    }

    /// The ABA case the tag exists for (the model above cannot show it: its
    /// reused element comes back with the same link). A popper reads the
    /// top, 1, and its link, 0; meanwhile another context pops 1 and 0 and
    /// pushes 1 back alone. Without the tag the first popper's CAS finds 1
    /// on top again and installs the stale link: 0, which the other context
    /// owns, is on the stack and handed out twice. (Checked: with the tag
    /// left unchanged by every operation, loom finds it.)
    #[test]
    fn aba_reuse_cannot_pass_the_cas() {
        loom::model(|| {
            let shared = stack_of_two();
            let a = shared.clone();
            let t1 = loom::thread::spawn(move || {
                let mut kept = Vec::new();
                let first = a.0.pop(|i| a.1.get(i));
                let second = a.0.pop(|i| a.1.get(i));
                kept.extend(second);
                if let Some(i) = first {
                    // Reused: back on the stack with a new link.
                    a.0.push(i, |i, n| a.1.set(i, n));
                }
                kept
            });
            let mut seen = Vec::new();
            seen.extend(shared.0.pop(|i| shared.1.get(i)));
            seen.extend(t1.join().unwrap());
            take_rest(&shared, &mut seen);
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1]);
        });
    }
}
