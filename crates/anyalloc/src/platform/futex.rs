//! Futex wait and wake on an [`AtomicU32`] (Linux, `std` feature): the one
//! copy of the syscall that the std platform, the maintenance thread and
//! the benchmarks use.
//!
//! [`wake_one`] is one non-blocking syscall and is async-signal-safe: a
//! signal handler or a nolock path may call it. [`wait`] sleeps, so it
//! belongs to the normal path only.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use anyalloc::platform::futex;
//!
//! let word = AtomicU32::new(0);
//! // The word is not 1: returns at once.
//! futex::wait(&word, 1, Some(Duration::from_millis(10)));
//! word.store(1, Ordering::Release);
//! futex::wake_one(&word); // nobody waits: a no-op
//! ```

use core::sync::atomic::AtomicU32;
use core::time::Duration;

/// Sleeps while `*word == expected`, until woken by [`wake_one`], for at
/// most `timeout` (`None`: no limit). May return early (a signal, or the
/// word changed before the kernel compared it): callers re-check their
/// condition. `errno` is left as it was (a lock wait inside a `malloc`
/// that succeeds must not leave `EAGAIN` or `ETIMEDOUT` there). Normal
/// context only.
///
/// ```
/// use anyalloc::platform::futex;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// let ready = AtomicU32::new(0);
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         // Re-check after every return: it may be early or spurious.
///         while ready.load(Ordering::Acquire) == 0 {
///             futex::wait(&ready, 0, None);
///         }
///     });
///     ready.store(1, Ordering::Release);
///     futex::wake_one(&ready);
/// });
/// ```
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(core::ptr::null(), |t| t as *const libc::timespec);
    let _errno = super::KeepErrno::new();
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word`, which outlives
    // the call, and compares it with `expected` atomically; `ts_ptr` is null
    // or points at `ts`, alive for the call (a relative timeout).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        );
    }
}

/// Wakes one context waiting in [`wait`] on `word`. Never blocks; safe in
/// any context (a signal handler, the nolock path).
///
/// ```
/// use anyalloc::platform::futex;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// let word = AtomicU32::new(0);
/// std::thread::scope(|s| {
///     s.spawn(|| {
///         while word.load(Ordering::Acquire) == 0 {
///             futex::wait(&word, 0, Some(Duration::from_secs(1)));
///         }
///     });
///     word.store(1, Ordering::Release); // change the word first, then wake
///     futex::wake_one(&word);
/// });
/// assert_eq!(word.load(Ordering::Relaxed), 1);
/// ```
#[inline]
pub fn wake_one(word: &AtomicU32) {
    wake_many(word, 1);
}

/// Wakes up to `n` contexts waiting in [`wait`] on `word` (`u32::MAX`: all
/// of them). Never blocks; safe in any context.
///
/// ```
/// use anyalloc::platform::futex;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// let go = AtomicU32::new(0);
/// std::thread::scope(|s| {
///     for _ in 0..3 {
///         s.spawn(|| {
///             while go.load(Ordering::Acquire) == 0 {
///                 futex::wait(&go, 0, None);
///             }
///         });
///     }
///     go.store(1, Ordering::Release);
///     futex::wake_many(&go, u32::MAX); // every waiter
/// });
/// ```
#[inline]
pub fn wake_many(word: &AtomicU32, n: u32) {
    let n = n.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: FUTEX_WAKE only uses the address as a key; it never blocks.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        );
    }
}
