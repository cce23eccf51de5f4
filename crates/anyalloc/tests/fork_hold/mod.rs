//! A fork held after the heap's prepare handler, as glibc's `fork` holds
//! itself while it takes its own locks (stdio's list, NSS, malloc's
//! arenas), which it takes after every `pthread_atfork` prepare handler.
//!
//! The stand-in is a prepare handler registered before the heap's (from
//! `.preinit_array`), so it runs after it, with every heap lock held. While
//! the harness is armed it says so ([`fork_holds`]) and waits: for the
//! "holder" thread to finish ([`fork_waiting_for`]), or a fixed time
//! ([`long_fork`]). In other forks it does nothing.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

/// Set while a scenario's fork is to be held.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by the handler: the fork holds every heap lock now.
static FORK_HOLDS: AtomicBool = AtomicBool::new(false);
/// The stand-in for glibc's lock: the fork goes on once it is false.
static HELD: AtomicBool = AtomicBool::new(false);
/// Set for a long fork: the handler holds the fork for [`LONG`], waiting
/// for nobody.
static LONG_FORK: AtomicBool = AtomicBool::new(false);
/// How long a long fork holds the heap locks.
pub const LONG: Duration = Duration::from_millis(400);

extern "C" fn late_prepare() {
    if !ACTIVE.load(SeqCst) {
        return;
    }
    FORK_HOLDS.store(true, SeqCst);
    if LONG_FORK.load(SeqCst) {
        std::thread::sleep(LONG);
        return;
    }
    while HELD.load(SeqCst) {
        std::thread::yield_now();
    }
}

extern "C" fn register_early() {
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe { libc::pthread_atfork(Some(late_prepare), None, None) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

/// Whether the held fork holds every heap lock now.
pub fn fork_holds() -> bool {
    FORK_HOLDS.load(SeqCst)
}

/// Waits until the held fork holds every heap lock.
pub fn wait_until_fork_holds() {
    while !fork_holds() {
        std::thread::yield_now();
    }
}

/// Forks once (held as the caller armed it), runs `after_fork` in the
/// parent, and waits for the child, which runs `child` and `_exit`s with
/// its status. Returns what `after_fork` returned.
fn fork_and_wait<R>(child: fn() -> i32, after_fork: impl FnOnce() -> R) -> R {
    // SAFETY: the child only runs `child` and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed");
    ACTIVE.store(false, SeqCst);
    let out = after_fork();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "forked child failed (status {status:#x})"
    );
    out
}

/// One fork that waits for a "holder" thread running `work`: the holder
/// starts once the fork holds every heap lock, and the fork goes on once
/// `work` is done. The child runs `child` (its exit status) and exits.
/// Returns what `work` returned.
pub fn fork_waiting_for<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
    child: fn() -> i32,
) -> R {
    HELD.store(true, SeqCst);
    FORK_HOLDS.store(false, SeqCst);
    LONG_FORK.store(false, SeqCst);
    ACTIVE.store(true, SeqCst);
    let holder = std::thread::spawn(move || {
        wait_until_fork_holds();
        let r = work();
        // Still inside the fork's prepare: nothing let it go on.
        assert!(fork_holds());
        HELD.store(false, SeqCst);
        r
    });
    fork_and_wait(child, || holder.join().expect("the holder thread"))
}

/// One fork held for [`LONG`], waiting for nobody, while `during` runs on
/// another thread (it may [`wait_until_fork_holds`] first); the child
/// `_exit`s at once. Returns what `during` returned.
pub fn long_fork<R: Send + 'static>(during: impl FnOnce() -> R + Send + 'static) -> R {
    LONG_FORK.store(true, SeqCst);
    FORK_HOLDS.store(false, SeqCst);
    ACTIVE.store(true, SeqCst);
    let t = std::thread::spawn(during);
    let out = fork_and_wait(|| 0, || t.join().expect("the thread"));
    LONG_FORK.store(false, SeqCst);
    out
}
