//! Retrying nolock calls in tests that share the global heap.
//!
//! A nolock call fails, by design, when another context holds what it
//! tries: the zone lock, a node lock, the stock of large blocks. A test
//! binary's tests run in parallel on the one global heap (and its
//! maintenance thread runs), so a nolock allocation there may meet a lock
//! another test holds. `conform`'s `NoLock` allocations of 8 KiB to 1 MiB
//! did, in 15 of 243 runs of that binary, with 64,000 of its 65,536 pages
//! free: a busy zone lock (`nolock_alloc_fail_busy` counted them). Tests that check what a call *returns*, not whether a busy
//! heap serves it, retry it here; a call that fails every time still fails
//! the test.

#![allow(dead_code)]

/// How many times [`retried`] tries.
pub const TRIES: u32 = 10_000;

/// `f` until it succeeds, at most `tries` times (yielding between them):
/// its last result.
pub fn retried<T, E>(tries: u32, mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let mut r = f();
    for _ in 1..tries {
        if r.is_ok() {
            break;
        }
        std::thread::yield_now();
        r = f();
    }
    r
}

/// `f` until it succeeds ([`TRIES`] times at most, else a panic naming the
/// last error).
pub fn first<T, E: std::fmt::Debug>(f: impl FnMut() -> Result<T, E>) -> T {
    retried(TRIES, f).unwrap_or_else(|e| panic!("a nolock call failed {TRIES} times: {e:?}"))
}
