//! loom models of the deferred-free hand-off, with the real [`ZoneLock`] and
//! [`IndexStack`]: a free that cannot take the zone lock parks its block on
//! the deferred stack; whoever holds the zone lock drains the stack into the
//! buddy lists; a nolock allocation may steal from the stack without the
//! lock. Whatever the interleaving, every block ends up in exactly one
//! place: the buddy lists (protected by the zone lock, a loom `UnsafeCell`
//! so a race on it is reported) or the hands of the stealer.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p anyalloc --release --lib loom`.

use super::{IndexStack, ZoneLock, NIL};
use crate::platform::Platform;
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use std::vec::Vec;

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

/// A zone in miniature: the lock, the deferred stack with its intrusive
/// links, and the "buddy lists" (the blocks freed under the lock).
struct MiniZone {
    lock: ZoneLock,
    deferred: IndexStack,
    links: [AtomicUsize; 4],
    buddy: UnsafeCell<Vec<usize>>,
}

impl MiniZone {
    fn new() -> Self {
        MiniZone {
            lock: ZoneLock::new(),
            deferred: IndexStack::new(),
            links: [
                AtomicUsize::new(NIL),
                AtomicUsize::new(NIL),
                AtomicUsize::new(NIL),
                AtomicUsize::new(NIL),
            ],
            buddy: UnsafeCell::new(Vec::new()),
        }
    }

    fn push_deferred(&self, i: usize) {
        self.deferred
            .push(i, |i, next| self.links[i].store(next, Ordering::Relaxed));
    }

    /// Zone lock held: the buddy lists may be touched.
    fn buddy_free(&self, i: usize) {
        // SAFETY: called only with the zone lock held (loom checks that no
        // other access to the cell overlaps).
        self.buddy.with_mut(|b| unsafe { (*b).push(i) });
    }

    /// Zone lock held: moves the whole deferred stack to the buddy lists
    /// (as `Zone::drain_deferred`).
    fn drain_deferred(&self) {
        if self.deferred.is_empty() {
            return;
        }
        let mut i = self.deferred.take_all();
        while i != NIL {
            let next = self.links[i].load(Ordering::Relaxed);
            self.buddy_free(i);
            i = next;
        }
    }

    /// As `free_pages_nolock` past the per-CPU slots: zone `try_lock`, else
    /// park the block on the deferred stack.
    fn free_nolock(&self, i: usize) {
        match self.lock.try_lock(&P) {
            Some(_g) => {
                self.buddy_free(i);
                self.drain_deferred();
            }
            None => self.push_deferred(i),
        }
    }

    /// As `Zone::steal_deferred`: take the stack without the lock, keep the
    /// first element `wanted` accepts, push the rest back.
    fn steal(&self, wanted: impl Fn(usize) -> bool) -> Option<usize> {
        if self.deferred.is_empty() {
            return None;
        }
        let mut i = self.deferred.take_all();
        let mut found = None;
        while i != NIL {
            let next = self.links[i].load(Ordering::Relaxed);
            if found.is_none() && wanted(i) {
                found = Some(i);
            } else {
                self.push_deferred(i);
            }
            i = next;
        }
        found
    }

    /// After every thread finished: a last normal-path drain, then the
    /// sorted buddy contents.
    fn final_drain(&self) -> Vec<usize> {
        let _g = self.lock.lock(&P);
        self.drain_deferred();
        assert!(self.deferred.is_empty());
        // SAFETY: zone lock held; no other thread is left.
        let mut v = self.buddy.with(|b| unsafe { (*b).clone() });
        v.sort_unstable();
        v
    }
}

/// A normal-path drainer (lock, drain, unlock) against a nolock freer that
/// either gets the zone lock or parks its blocks: nothing is lost or
/// freed twice, whichever side wins each race.
#[test]
fn loom_deferred_free_and_drain_hand_off() {
    loom::model(|| {
        let z = Arc::new(MiniZone::new());
        // A block parked before the race, for the drainer to find.
        z.push_deferred(0);
        let a = z.clone();
        let drainer = loom::thread::spawn(move || {
            let _g = a.lock.lock(&P);
            a.drain_deferred();
        });
        let b = z.clone();
        let freer = loom::thread::spawn(move || {
            b.free_nolock(1);
            b.free_nolock(2);
        });
        drainer.join().unwrap();
        freer.join().unwrap();
        assert_eq!(z.final_drain(), std::vec![0, 1, 2]);
    });
}

/// A lock-free stealer and a locked drainer take the deferred stack at the
/// same time while a third context parks another block: each block ends up
/// either stolen (exactly once) or on the buddy lists (exactly once).
#[test]
fn loom_steal_drain_and_push_account_for_every_block() {
    loom::model(|| {
        let z = Arc::new(MiniZone::new());
        z.push_deferred(0);
        z.push_deferred(1);
        let s = z.clone();
        let stealer = loom::thread::spawn(move || s.steal(|i| i % 2 == 1));
        let d = z.clone();
        let drainer = loom::thread::spawn(move || {
            let _g = d.lock.lock(&P);
            d.drain_deferred();
        });
        // This context's free finds the lock busy or not: either way.
        z.free_nolock(3);
        let stolen = stealer.join().unwrap();
        drainer.join().unwrap();
        let mut all = z.final_drain();
        if let Some(i) = stolen {
            assert!(i % 2 == 1, "stole a block it did not want");
            all.push(i);
        }
        all.sort_unstable();
        assert_eq!(all, std::vec![0, 1, 3]);
    });
}
