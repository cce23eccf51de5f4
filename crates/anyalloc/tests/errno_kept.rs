//! The system calls the heap makes on the way to an allocation that
//! succeeds leave the thread's `errno` as it was. A futex wait for a lock
//! returns `EAGAIN` when the word changed before the kernel compared it and
//! `ETIMEDOUT` after its slice; glibc's locks make the same calls without
//! touching `errno`, and C code relies on a `malloc` that succeeds leaving
//! it alone (libanyalloc.so's `malloc` is this heap's; its
//! `tests/c/rlimit_fill.c` covers refused mappings under a limit on address
//! space). Each case below set `errno` before the fix.

#![cfg(target_os = "linux")]

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use anyalloc::platform::futex;

fn errno() -> i32 {
    // SAFETY: libc's accessor returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e };
}

/// The word is not what the waiter expected: the kernel answers `EAGAIN`
/// at once (a lock released between the waiter's look and its wait).
#[test]
fn a_futex_wait_that_finds_the_word_changed_keeps_errno() {
    let word = AtomicU32::new(1);
    set_errno(4242);
    futex::wait(&word, 0, None);
    assert_eq!(errno(), 4242);
}

/// The wait runs out (`ETIMEDOUT`): a waiter wakes after each slice to look
/// again.
#[test]
fn a_futex_wait_that_times_out_keeps_errno() {
    let word = AtomicU32::new(0);
    set_errno(4242);
    futex::wait(&word, 0, Some(Duration::from_nanos(1)));
    assert_eq!(errno(), 4242);
}
