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
//! * `put_back(first)`: return the rest of a taken chain without walking
//!   it: CAS the head from [`NIL`] to `first`; if something was pushed
//!   meanwhile, take that, link its last element to `first`, and retry.
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
    ///
    /// ```
    /// use anyalloc::sync::IndexStack;
    /// static PARKED: IndexStack = IndexStack::new(); // `const`: fits a static
    /// assert!(PARKED.is_empty());
    /// ```
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
    ///
    /// ```
    /// use anyalloc::sync::{IndexStack, NIL};
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let links: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(NIL)).collect();
    /// let stack = IndexStack::new();
    /// stack.push(2, |i, next| links[i].store(next, Ordering::Relaxed));
    /// stack.push(0, |i, next| links[i].store(next, Ordering::Relaxed));
    /// assert_eq!(links[0].load(Ordering::Relaxed), 2, "0's link is the old top");
    /// assert_eq!(links[2].load(Ordering::Relaxed), NIL);
    /// ```
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
    ///
    /// ```
    /// use anyalloc::sync::{IndexStack, NIL};
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let links: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(NIL)).collect();
    /// let stack = IndexStack::new();
    /// assert_eq!(stack.take_all(), NIL);
    /// for i in 0..3 {
    ///     stack.push(i, |i, next| links[i].store(next, Ordering::Relaxed));
    /// }
    /// let first = stack.take_all();
    /// assert_eq!(first, 2); // the last pushed; follow the links from there
    /// assert_eq!(links[first].load(Ordering::Relaxed), 1);
    /// assert!(stack.is_empty());
    /// ```
    #[inline]
    pub fn take_all(&self) -> usize {
        if self.head.load(Ordering::Relaxed) == NIL {
            return NIL;
        }
        // Acquire pairs with the pushers' Release CAS.
        self.head.swap(NIL, Ordering::Acquire)
    }

    /// Puts back the rest of a chain that [`take_all`](Self::take_all)
    /// gave this caller, starting at `first` (not [`NIL`]), without walking
    /// it: the chain becomes the stack again if the stack is still empty;
    /// otherwise the caller takes what was pushed meanwhile, links that
    /// (short) chain's last element to `first`, and tries again with the
    /// longer chain. `link(i)` reads an element's link, `set_link(i, next)`
    /// writes it (as for [`push`](Self::push)).
    ///
    /// Work: the elements pushed by other contexts while this runs, never
    /// the chain being put back, so a caller with a long chain in hand can
    /// keep a few elements and return the rest in O(1) when nothing
    /// else pushes. Lock-free: each retry follows a push that succeeded.
    ///
    /// ```
    /// use anyalloc::sync::{IndexStack, NIL};
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let links: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(NIL)).collect();
    /// let link = |i: usize| links[i].load(Ordering::Relaxed);
    /// let set_link = |i: usize, next: usize| links[i].store(next, Ordering::Relaxed);
    /// let stack = IndexStack::new();
    /// for i in 0..3 {
    ///     stack.push(i, set_link);
    /// }
    /// // Keep the first element of the chain, return the rest in O(1).
    /// let kept = stack.take_all();
    /// stack.put_back(link(kept), link, set_link);
    /// assert_eq!(kept, 2);
    /// assert_eq!(stack.take_all(), 1);
    /// ```
    pub fn put_back(
        &self,
        first: usize,
        mut link: impl FnMut(usize) -> usize,
        mut set_link: impl FnMut(usize, usize),
    ) {
        crate::check!(first != NIL, "NIL put back on a lock-free stack");
        let mut chain = first;
        loop {
            // Release: every link of the chain (ours, and those of the
            // elements taken below) is visible to the next `take_all`.
            match self
                .head
                .compare_exchange(NIL, chain, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(_) => {
                    // Acquire pairs with the pushers' Release CAS: their
                    // links are visible to the walk below.
                    let newer = self.head.swap(NIL, Ordering::Acquire);
                    if newer == NIL {
                        continue;
                    }
                    let mut last = newer;
                    loop {
                        let next = link(last);
                        if next == NIL {
                            break;
                        }
                        last = next;
                    }
                    set_link(last, chain);
                    chain = newer;
                }
            }
        }
    }

    /// Whether the stack looks empty (a racy hint).
    ///
    /// ```
    /// use anyalloc::sync::{IndexStack, NIL};
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let link = AtomicUsize::new(NIL);
    /// let stack = IndexStack::new();
    /// assert!(stack.is_empty());
    /// stack.push(7, |_, next| link.store(next, Ordering::Relaxed));
    /// assert!(!stack.is_empty());
    /// assert_eq!(stack.take_all(), 7);
    /// assert!(stack.is_empty());
    /// ```
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Relaxed) == NIL
    }

    /// The index on top of the stack ([`NIL`] when empty), left there: a
    /// racy read unless nothing else uses the stack (a forked child, before
    /// anything else runs, walks the links from it).
    #[cfg(feature = "std")]
    pub(crate) fn head(&self) -> usize {
        self.head.load(Ordering::Acquire)
    }
}

impl Default for IndexStack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::atomic::AtomicUsize as StdUsize;
    use std::vec::Vec;

    fn take(stack: &IndexStack, links: &[StdUsize]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut i = stack.take_all();
        while i != NIL {
            out.push(i);
            i = links[i].load(Ordering::Relaxed);
        }
        out
    }

    /// `put_back` returns the rest of a taken chain as it was onto an empty
    /// stack, and behind what was pushed meanwhile otherwise: nothing is
    /// lost or taken twice.
    #[test]
    fn put_back_keeps_every_element() {
        let links: Vec<StdUsize> = (0..8).map(|_| StdUsize::new(NIL)).collect();
        let set = |i: usize, n: usize| links[i].store(n, Ordering::Relaxed);
        let get = |i: usize| links[i].load(Ordering::Relaxed);
        let stack = IndexStack::new();
        for i in [0, 1, 2, 3] {
            stack.push(i, set);
        }
        // Keep the first element (3), put the rest back onto an empty stack.
        let head = stack.take_all();
        assert_eq!(head, 3);
        stack.put_back(get(head), get, set);
        assert_eq!(take(&stack, &links), [2, 1, 0]);

        // Pushes between the take and the put-back end up in front.
        for i in [0, 1, 2, 3] {
            stack.push(i, set);
        }
        let head = stack.take_all();
        stack.push(4, set);
        stack.push(5, set);
        stack.put_back(get(head), get, set);
        assert_eq!(take(&stack, &links), [5, 4, 2, 1, 0]);
        assert!(stack.is_empty());
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

    /// An empty stack and four unlinked elements, for several threads.
    fn shared_stack() -> Arc<(IndexStack, Links)> {
        Arc::new((
            IndexStack::new(),
            Links([
                LoomUsize::new(NIL),
                LoomUsize::new(NIL),
                LoomUsize::new(NIL),
                LoomUsize::new(NIL),
            ]),
        ))
    }

    /// Two pushers and a concurrent taker: every pushed element is taken
    /// exactly once (by the concurrent take or the final one).
    #[test]
    fn push_and_take_all_lose_nothing() {
        loom::model(|| {
            let shared = shared_stack();
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

    /// A taker keeps the top element and puts the rest back while another
    /// thread pushes: every element ends up taken exactly once.
    #[test]
    fn put_back_races_a_push() {
        loom::model(|| {
            let shared = shared_stack();
            let set =
                |s: &(IndexStack, Links), i: usize, n: usize| s.1 .0[i].store(n, Ordering::Relaxed);
            shared.0.push(0, |i, n| set(&shared, i, n));
            shared.0.push(1, |i, n| set(&shared, i, n));
            let b = shared.clone();
            let t = loom::thread::spawn(move || {
                b.0.push(2, |i, n| b.1 .0[i].store(n, Ordering::Relaxed));
            });
            let mut seen = Vec::new();
            let head = shared.0.take_all();
            if head != NIL {
                seen.push(head);
                let rest = shared.1 .0[head].load(Ordering::Relaxed);
                if rest != NIL {
                    shared.0.put_back(
                        rest,
                        |i| shared.1 .0[i].load(Ordering::Relaxed),
                        |i, n| set(&shared, i, n),
                    );
                }
            }
            t.join().unwrap();
            collect(&shared.0, &shared.1, &mut seen);
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2]);
        });
    }
}
