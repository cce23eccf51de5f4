//! The maintainer's wake word: how any context owes the maintenance thread
//! a wake, with at most one system call per sleep and no wake lost.
//!
//! Two bits: `WAKE_OWED`, set by wakers (any context) and taken by the
//! maintainer before its work; `MAINTAINER_SLEEPING`, set by the maintainer
//! while it sleeps on the word (a futex wait while the word is exactly
//! `MAINTAINER_SLEEPING`).
//!
//! * waker: [`owe`] ORs in `WAKE_OWED` (AcqRel: the work it announces, a
//!   block parked on a deferred list, is published with it) and wakes the
//!   maintainer only when it found the word exactly `MAINTAINER_SLEEPING`:
//!   the first owed wake of that sleep. Later wakers find `WAKE_OWED` set
//!   and make no call.
//! * maintainer, each round: [`take_owed`] clears `WAKE_OWED` before the
//!   work (work announced from then on owes another round), then
//!   [`announce_sleep`] sets `MAINTAINER_SLEEPING` and sleeps only if no
//!   wake was owed meanwhile; the futex's own comparison ends a sleep owed
//!   between the announcement and the wait at once. [`end_sleep`] clears
//!   the announcement.
//!
//! No wake is lost: a waker whose OR comes after the announcement finds
//! `MAINTAINER_SLEEPING` (or `WAKE_OWED`, owed by another waker that woke it,
//! or before the announcement, which then skips the sleep) and wakes it; one
//! whose OR comes before it is seen by the announcement. The loom model
//! below checks it with a waiter that only a wake ends.

use super::atomic::Ordering;

/// Work was announced since the maintainer last looked (set by any
/// context, cleared by the maintainer).
pub(crate) const WAKE_OWED: u32 = 1;
/// The maintainer is (about to be) asleep on the word.
pub(crate) const MAINTAINER_SLEEPING: u32 = 2;

/// The read-modify-writes the protocol needs: core's atomic in the
/// allocator, loom's in the model (which must run these very functions).
pub(crate) trait Word {
    fn fetch_or(&self, bits: u32, order: Ordering) -> u32;
    #[cfg_attr(not(feature = "std"), allow(dead_code))] // the maintainer is std only
    fn fetch_and(&self, bits: u32, order: Ordering) -> u32;
}

impl Word for core::sync::atomic::AtomicU32 {
    #[inline]
    fn fetch_or(&self, bits: u32, order: Ordering) -> u32 {
        core::sync::atomic::AtomicU32::fetch_or(self, bits, order)
    }
    #[inline]
    fn fetch_and(&self, bits: u32, order: Ordering) -> u32 {
        core::sync::atomic::AtomicU32::fetch_and(self, bits, order)
    }
}

#[cfg(loom)]
impl Word for loom::sync::atomic::AtomicU32 {
    fn fetch_or(&self, bits: u32, order: Ordering) -> u32 {
        loom::sync::atomic::AtomicU32::fetch_or(self, bits, order)
    }
    fn fetch_and(&self, bits: u32, order: Ordering) -> u32 {
        loom::sync::atomic::AtomicU32::fetch_and(self, bits, order)
    }
}

/// Waker, any context (one atomic OR): owes the maintainer a wake. `true`
/// when it sleeps and this is the first wake owed in that sleep: the caller
/// then wakes it (a futex wake, which never blocks).
#[inline]
pub(crate) fn owe(word: &impl Word) -> bool {
    word.fetch_or(WAKE_OWED, Ordering::AcqRel) == MAINTAINER_SLEEPING
}

/// Maintainer, before its work: takes the owed wake; `true` when work was
/// announced since it last looked.
#[cfg_attr(not(feature = "std"), allow(dead_code))] // the maintainer is std only
#[inline]
pub(crate) fn take_owed(word: &impl Word) -> bool {
    word.fetch_and(!WAKE_OWED, Ordering::AcqRel) & WAKE_OWED != 0
}

/// Maintainer, after its work: announces its sleep; `true` when nothing was
/// owed meanwhile and it may sleep while the word is exactly
/// [`MAINTAINER_SLEEPING`].
#[cfg_attr(not(feature = "std"), allow(dead_code))] // the maintainer is std only
#[inline]
pub(crate) fn announce_sleep(word: &impl Word) -> bool {
    word.fetch_or(MAINTAINER_SLEEPING, Ordering::AcqRel) & WAKE_OWED == 0
}

/// Maintainer, after its sleep (or its decision not to): withdraws the
/// announcement.
#[cfg_attr(not(feature = "std"), allow(dead_code))] // the maintainer is std only
#[inline]
pub(crate) fn end_sleep(word: &impl Word) {
    word.fetch_and(!MAINTAINER_SLEEPING, Ordering::AcqRel);
}

/// loom model of the real functions above, with a futex whose waits only a
/// wake ends (the `loom_futex` module; the real maintainer's sleep has a
/// timeout, so there a lost wake costs a sleep's latency, parked memory
/// left parked meanwhile: the model counts it as a failure). Two wakers
/// each park one block (a flag, stored and loaded Relaxed: the word must
/// carry the ordering) and owe a wake; the maintainer takes owed wakes,
/// drains what is parked, and sleeps as the real loop does, until it has
/// drained both.
/// It proves that no owed wake is slept through and that a taken wake sees
/// the block parked before it (else the maintainer sleeps with a block
/// parked and nobody left to wake it: loom reports the deadlock). Left out:
/// the real loop's timed passes and stop flag, and the normal-context
/// `wake_maintainer_now`, which wakes whatever the word says.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::loom_futex;
    use loom::sync::atomic::AtomicU32;
    use loom::sync::Arc;

    /// Preemptions explored (under a second; every interleaving takes
    /// three and a half minutes on two cores). Three find each of these
    /// injected bugs: `owe` or `take_owed` Relaxed (the maintainer takes
    /// the wake without seeing the block), `owe` waking only a word it
    /// found 0. (`announce_sleep` ignoring an owed wake is no bug the model
    /// can show: the futex's comparison ends that sleep at once.)
    const PREEMPTIONS: usize = 3;

    struct Shared {
        word: AtomicU32,
        /// Each waker's parked block (a plain store and load, Relaxed: the
        /// word must carry the ordering).
        parked: [AtomicU32; 2],
    }

    #[test]
    fn no_owed_wake_is_slept_through() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(PREEMPTIONS);
        model.check(|| {
            let s = Arc::new(Shared {
                word: AtomicU32::new(0),
                parked: [AtomicU32::new(0), AtomicU32::new(0)],
            });
            let wakers: std::vec::Vec<_> = (0..2)
                .map(|i| {
                    let s = s.clone();
                    loom::thread::spawn(move || {
                        s.parked[i].store(1, Ordering::Relaxed);
                        if owe(&s.word) {
                            loom_futex::wake_one(&s.word);
                        }
                    })
                })
                .collect();
            let mut drained = [false; 2];
            loop {
                if take_owed(&s.word) {
                    for (p, d) in s.parked.iter().zip(drained.iter_mut()) {
                        *d |= p.load(Ordering::Relaxed) == 1;
                    }
                }
                if drained == [true; 2] {
                    break;
                }
                if announce_sleep(&s.word) {
                    loom_futex::wait(&s.word, MAINTAINER_SLEEPING);
                }
                end_sleep(&s.word);
            }
            for w in wakers {
                w.join().unwrap();
            }
        });
    }
}
