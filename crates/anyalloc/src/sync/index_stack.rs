//! An intrusive lock-free stack of words (page indices, object addresses):
//! Treiber push, take-all.
//!
//! The stack stores only the head index; each element's link lives in the
//! element itself (a page descriptor's `next` field, for example), reached
//! through the `link` callback. Operations:
//!
//! * `push(i)`: write the current head into `i`'s link, then CAS the head
//!   from that value to `i` (Release, so the link write is visible to whoever
//!   takes the list). Lock-free; safe from a signal handler that interrupted
//!   another `push` on the same thread (the interrupted CAS simply fails and
//!   retries with the new head).
//! * `take_all()`: swap the head with [`NIL`] (Acquire) and return the old
//!   head: the whole chain now belongs to the caller.
//!
//! There is no single-element pop, so the classic ABA problem of Treiber
//! stacks cannot arise: an index can only re-enter the stack after its owner
//! took the whole chain away.

use super::atomic::{AtomicUsize, Ordering};

/// The "no element" value.
pub const NIL: usize = usize::MAX;

/// See the module documentation.
///
/// The elements are indices (here into a table); each element's link lives
/// in the element, written by the `push` callback:
///
/// ```
/// use anyalloc::sync::{IndexStack, NIL};
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// let links: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(NIL)).collect();
/// let stack = IndexStack::new();
/// for i in [1, 3] {
///     stack.push(i, |i, next| links[i].store(next, Ordering::Relaxed));
/// }
/// // Whoever takes the chain owns every element on it.
/// let mut taken = Vec::new();
/// let mut i = stack.take_all();
/// while i != NIL {
///     taken.push(i);
///     i = links[i].load(Ordering::Relaxed);
/// }
/// assert_eq!(taken, [3, 1]);
/// assert!(stack.is_empty());
/// ```
#[derive(Debug)]
pub struct IndexStack {
    head: AtomicUsize,
}

impl IndexStack {
    /// An empty stack.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        IndexStack {
            head: AtomicUsize::new(NIL),
        }
    }

    /// An empty stack (loom's atomics have no `const fn new`).
    #[cfg(loom)]
    pub fn new() -> Self {
        IndexStack {
            head: AtomicUsize::new(NIL),
        }
    }

    /// Pushes `index`; `set_link(index, next)` must store `next` as the
    /// element's link. The caller owns `index` exclusively until this returns.
    #[inline]
    pub fn push(&self, index: usize, mut set_link: impl FnMut(usize, usize)) {
        crate::check!(index != NIL, "NIL pushed on a lock-free stack");
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            set_link(index, head);
            // Release: the link written above is visible to `take_all`.
            match self
                .head
                .compare_exchange_weak(head, index, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }

    /// Takes the whole chain; returns its first index or [`NIL`]. Follow the
    /// chain through the links written by `push`.
    #[inline]
    pub fn take_all(&self) -> usize {
        if self.head.load(Ordering::Relaxed) == NIL {
            return NIL;
        }
        // Acquire pairs with the pushers' Release CAS.
        self.head.swap(NIL, Ordering::Acquire)
    }

    /// Whether the stack looks empty (a racy hint).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) == NIL
    }
}

impl Default for IndexStack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    extern crate std;
    use super::*;
    use loom::sync::atomic::AtomicUsize as LoomUsize;
    use loom::sync::Arc;
    use std::vec;
    use std::vec::Vec;

    struct Links([LoomUsize; 4]);

    fn collect(stack: &IndexStack, links: &Links, out: &mut Vec<usize>) {
        let mut i = stack.take_all();
        while i != NIL {
            out.push(i);
            i = links.0[i].load(Ordering::Relaxed);
        }
    }

    /// Two pushers and a concurrent taker: every pushed element is taken
    /// exactly once (by the concurrent take or the final one).
    #[test]
    fn push_and_take_all_lose_nothing() {
        loom::model(|| {
            let shared = Arc::new((
                IndexStack::new(),
                Links([
                    LoomUsize::new(NIL),
                    LoomUsize::new(NIL),
                    LoomUsize::new(NIL),
                    LoomUsize::new(NIL),
                ]),
            ));
            let a = shared.clone();
            let t1 = loom::thread::spawn(move || {
                a.0.push(0, |i, n| a.1 .0[i].store(n, Ordering::Relaxed));
                a.0.push(1, |i, n| a.1 .0[i].store(n, Ordering::Relaxed));
            });
            let b = shared.clone();
            let t2 = loom::thread::spawn(move || {
                b.0.push(2, |i, n| b.1 .0[i].store(n, Ordering::Relaxed));
            });
            let mut seen = Vec::new();
            collect(&shared.0, &shared.1, &mut seen);
            t1.join().unwrap();
            t2.join().unwrap();
            collect(&shared.0, &shared.1, &mut seen);
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2]);
        });
    }
}
