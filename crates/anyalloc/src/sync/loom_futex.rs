//! A futex for loom models: waiters really sleep until woken.
//!
//! The stand-in it replaces yielded while the word was unchanged, a waiter
//! that looks again forever: a lost wake-up (a release that should wake a
//! sleeper and does not) could never show, as every waiter saw the next
//! change by itself. Here a waiter sleeps on a loom condition variable
//! until a `wake_one` / `wake_many` on its word picks it, as the kernel's
//! futex does, so a missing wake leaves it asleep and loom reports the
//! model's deadlock.
//!
//! Faithful to the kernel where the protocols rely on it: the comparison of
//! the word and the queueing are atomic with respect to wakes (one mutex
//! plays the futex hash bucket's lock), a wake picks waiters of its own
//! word only, in arrival order, and up to the count asked for; a waker
//! that stored to the word before its wake call is seen by the comparison
//! of any wait that queues after that wake (the mutex orders them). Left
//! out: spurious returns (the kernel's EINTR; callers loop anyway, and a
//! model that never returns spuriously is the stricter test) and timeouts
//! (a timed wait is modelled as an unbounded one: a lost wake-up would cost
//! a timeout's latency, and the models count that as a failure).

extern crate std;

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::{Condvar, Mutex};
use std::vec::Vec;

/// The sleepers: (word address, ticket), oldest first.
struct Queue {
    next: usize,
    sleeping: Vec<(usize, usize)>,
}

struct Futex {
    queue: Mutex<Queue>,
    woken: Condvar,
}

loom::lazy_static! {
    static ref FUTEX: Futex = Futex {
        queue: Mutex::new(Queue { next: 0, sleeping: Vec::new() }),
        woken: Condvar::new(),
    };
}

fn key(word: &AtomicU32) -> usize {
    word as *const AtomicU32 as usize
}

/// Sleeps while `*word == expected`, until a wake on `word` picks this
/// waiter (no spurious returns, no timeout).
pub(crate) fn wait(word: &AtomicU32, expected: u32) {
    let mut q = FUTEX.queue.lock().unwrap();
    if word.load(Ordering::SeqCst) != expected {
        return;
    }
    let ticket = q.next;
    q.next += 1;
    q.sleeping.push((key(word), ticket));
    while q.sleeping.iter().any(|&(_, t)| t == ticket) {
        q = FUTEX.woken.wait(q).unwrap();
    }
}

/// Wakes up to `n` waiters of `word`, oldest first; never blocks for long
/// (the bucket lock only).
pub(crate) fn wake_many(word: &AtomicU32, n: u32) {
    let mut q = FUTEX.queue.lock().unwrap();
    let mut left = n;
    let k = key(word);
    q.sleeping.retain(|&(w, _)| {
        if w == k && left > 0 {
            left -= 1;
            false
        } else {
            true
        }
    });
    if left != n {
        FUTEX.woken.notify_all();
    }
}

/// Wakes one waiter of `word`, if any.
pub(crate) fn wake_one(word: &AtomicU32) {
    wake_many(word, 1);
}
