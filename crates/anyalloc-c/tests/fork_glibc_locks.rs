//! `fork` against glibc's own locks that its `fork` takes after every
//! prepare handler (tests/c/fork_glibc_locks.c): a thread holding one of
//! them is interrupted by a signal handler that allocates and frees, while
//! other threads fork. The heap's prepare handler takes every heap lock
//! before glibc's `fork` takes these, so the handler must not wait for a
//! heap lock: the fork waits for its thread. Normal-path waiters give way
//! to a lock held across a fork (the `fork` module's "Other threads give
//! way"); before they did, most runs hung.
//!
//! * stdio's list of open `FILE`s (held inside `fflush(NULL)`). Taking the
//!   list lock in a prepare handler that runs just before the heap's (tried
//!   once) made the opposite order deadlock instead: a fork called by a
//!   signal handler that interrupted `malloc` holding a heap lock waits (in
//!   glibc's `fork`) for the list lock, held by another thread's fork that
//!   waits for that heap lock (seen in tests/c/storm_fork.c, 1 run in about
//!   40).
//! * the NSS database lock (held inside `getpwuid`): internal to glibc, not
//!   exported, so the library could not even take it first.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);

#[test]
fn fork_while_a_handler_interrupts_stdio_holding_its_list_lock() {
    reproduce("stdio");
}

#[test]
fn fork_while_a_handler_interrupts_an_nss_lookup() {
    reproduce("nss");
}

/// Runs the program on `lock` (`stdio` or `nss`) four ways
/// (`common::run_four_ways`): each run must finish and print its "ok" line.
fn reproduce(lock: &str) {
    let ok = format!("fork_glibc_locks {lock}: ok");
    run_four_ways(
        "fork_glibc_locks.c",
        "fork_glibc_locks",
        &[lock],
        &ok,
        TIMEOUT,
    );
}
