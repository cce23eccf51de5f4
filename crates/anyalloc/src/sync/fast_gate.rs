//! The gate of a cache's normal fast path: open while nothing waits on the
//! cache's deferred stack, closed while something may.
//!
//! A nolock free that finds every slot and the node lock held parks its
//! object on the cache's deferred stack ([`IndexStack`]); a normal context
//! must give it back to its slab. With restartable sequences the normal
//! fast path never looks at the stack (that would cost every operation a
//! load and a test), so the gate makes the *next* normal operation take
//! the slow path, which drains the stack. The gate is the CPU count that
//! the normal sequences are handed: a sequence given 0 CPUs fails at its
//! CPU test, so closing costs the fast path nothing.
//!
//! | word      | state  | the normal fast path                      |
//! |-----------|--------|-------------------------------------------|
//! | `cpus`    | open   | runs on any CPU below `cpus`              |
//! | 0         | closed | fails at once: the slow path drains, then [`reopen`](FastGate::reopen)s |
//!
//! Transitions, all with relaxed accesses ordered by two `SeqCst` fences:
//!
//! * **close** ([`close_after_push`](FastGate::close_after_push)): after a
//!   push onto the stack, or after putting back part of a chain taken off
//!   it: fence, then store 0.
//! * **reopen** ([`reopen`](FastGate::reopen)): a normal slow path that has
//!   drained the stack: store `cpus`, fence, look at the stack, and store 0
//!   again if it is not empty.
//!
//! Why the gate is never left open over a parked object that no drain has
//! taken: take a close (push `P`, fence `X`, store `C` of 0) and a reopen
//! (store `O` of `cpus`, fence `Y`, load `L` of the stack's head). The
//! `SeqCst` fences are totally ordered. If `X` comes before `Y`, `L` sees
//! `P` (or a later state of the head), so the reopen closes the gate
//! again. If `Y` comes before `X`, then `O` precedes `C` in the gate's
//! modification order (two writes on either side of ordered fences), so
//! the close wins. Either way a push is followed by a closed gate until a
//! drain that saw it. The gate may be closed over an empty stack for a
//! moment: then a normal operation takes one slow path for nothing.
//!
//! A context that takes the stack for a while (`take_all`) hides the
//! objects from a drain: a normal operation meanwhile finds the stack empty
//! and reopens. So whoever puts objects back closes the gate again, exactly
//! as a push does. The loom tests below explore both.

use super::atomic::{fence, AtomicUsize, Ordering};
use super::IndexStack;

/// See the module documentation.
#[repr(transparent)]
pub(crate) struct FastGate(AtomicUsize);

impl FastGate {
    /// A gate open for `cpus` CPUs, or closed for good with 0 (no rseq: the
    /// normal path never runs a sequence).
    pub(crate) fn new(cpus: usize) -> Self {
        FastGate(AtomicUsize::new(cpus))
    }

    /// The CPU count for the normal sequences: 0 while closed.
    #[inline(always)]
    pub(crate) fn cpus(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Closes the gate after this context pushed onto the deferred stack
    /// or put objects back on it.
    #[inline]
    pub(crate) fn close_after_push(&self) {
        fence(Ordering::SeqCst);
        self.0.store(0, Ordering::Relaxed);
    }

    /// Opens the gate for `cpus` CPUs after a drain of `deferred`, unless
    /// something was pushed meanwhile (then it stays closed).
    #[cold]
    pub(crate) fn reopen(&self, cpus: usize, deferred: &IndexStack) {
        self.0.store(cpus, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !deferred.is_empty() {
            self.0.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    extern crate std;
    use super::*;
    use crate::sync::NIL;
    use loom::sync::Arc;

    const CPUS: usize = 2;

    /// A gate, its stack, and the elements' links.
    struct Shared {
        gate: FastGate,
        stack: IndexStack,
        links: [AtomicUsize; 3],
    }

    impl Shared {
        /// An empty stack behind a closed gate (the tests push first).
        fn new() -> Arc<Self> {
            Arc::new(Shared {
                gate: FastGate::new(0),
                stack: IndexStack::new(),
                links: [
                    AtomicUsize::new(NIL),
                    AtomicUsize::new(NIL),
                    AtomicUsize::new(NIL),
                ],
            })
        }

        fn push(&self, i: usize) {
            self.stack
                .push(i, |i, n| self.links[i].store(n, Ordering::Relaxed));
        }

        /// A deferred free: push, then close.
        fn defer(&self, i: usize) {
            self.push(i);
            self.gate.close_after_push();
        }

        /// A normal slow path: drain (take everything), then reopen if
        /// closed. Returns how many objects it drained.
        fn drain_and_reopen(&self) -> usize {
            let mut n = 0;
            let mut i = self.stack.take_all();
            while i != NIL {
                n += 1;
                i = self.links[i].load(Ordering::Relaxed);
            }
            if self.gate.cpus() == 0 {
                self.gate.reopen(CPUS, &self.stack);
            }
            n
        }

        /// The exact double-free check, or a nolock allocation that keeps
        /// nothing: take the stack, put it back whole, close.
        fn take_and_put_back(&self) {
            let first = self.stack.take_all();
            if first != NIL {
                self.stack.put_back(
                    first,
                    |i| self.links[i].load(Ordering::Relaxed),
                    |i, n| self.links[i].store(n, Ordering::Relaxed),
                );
                self.gate.close_after_push();
            }
        }

        /// At rest: the gate must not be open over a parked object.
        fn check(&self) {
            assert!(
                self.stack.is_empty() || self.gate.cpus() == 0,
                "the gate is open over a parked object"
            );
        }
    }

    /// A deferred free races a drain that reopens.
    #[test]
    fn a_push_races_a_reopen() {
        loom::model(|| {
            let s = Shared::new();
            s.push(0);
            let a = s.clone();
            let t = loom::thread::spawn(move || a.defer(1));
            s.drain_and_reopen();
            t.join().unwrap();
            s.check();
        });
    }

    /// A context that took the stack puts it back while a drain, finding
    /// it empty, reopens.
    #[test]
    fn a_put_back_races_a_reopen() {
        loom::model(|| {
            let s = Shared::new();
            s.push(0);
            s.push(1);
            let a = s.clone();
            let t = loom::thread::spawn(move || a.take_and_put_back());
            s.drain_and_reopen();
            t.join().unwrap();
            s.check();
        });
    }
}
