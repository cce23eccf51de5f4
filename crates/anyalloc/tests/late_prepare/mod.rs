//! A `fork` prepare handler of the test's own that runs after the crate's,
//! with the heap's locks held: it stands for a lock of glibc's that `fork`
//! takes after every prepare handler (stdio's list lock, malloc's arenas),
//! held by a thread the fork must then wait for.
//!
//! It is registered before the crate's start-up constructor (an earlier
//! `.init_array` priority), and prepare handlers run in the reverse order
//! of registration. Once [`arm`]ed, it holds the next fork until the test
//! calls [`release`], at most 20 s; then it notes that it gave up
//! ([`gave_up`]) and lets the fork go on.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// The next fork's handler holds the fork.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The handler holds a fork: the heap's locks are held.
static HELD: AtomicBool = AtomicBool::new(false);
/// The test lets the fork go on.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// The handler stopped holding the fork before the test released it.
static GAVE_UP: AtomicBool = AtomicBool::new(false);

/// The next fork is held (until [`release`], at most 20 s).
pub fn arm() {
    ARMED.store(true, SeqCst);
}

/// Whether the handler holds a fork now (or held it).
pub fn held() -> bool {
    HELD.load(SeqCst)
}

/// Lets the held fork go on.
pub fn release() {
    RELEASED.store(true, SeqCst);
}

/// Whether the handler gave up holding the fork (20 s without [`release`]).
pub fn gave_up() -> bool {
    GAVE_UP.load(SeqCst)
}

extern "C" fn prepare() {
    if !ARMED.swap(false, SeqCst) {
        return;
    }
    HELD.store(true, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !RELEASED.load(SeqCst) {
        if Instant::now() >= deadline {
            GAVE_UP.store(true, SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

extern "C" fn register() {
    // SAFETY: `prepare` is an `extern "C"` function of the main program,
    // which is never unloaded.
    unsafe { libc::pthread_atfork(Some(prepare), None, None) };
}

/// Before the crate's start-up constructor (`.init_array`, no priority).
#[used]
#[link_section = ".init_array.00099"]
static REGISTER: extern "C" fn() = register;

/// Forks a child that only `_exit`s with 0, waits for it and returns its
/// wait status.
pub fn fork_and_wait() -> libc::c_int {
    // SAFETY: the child only `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: no preconditions.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: our child; `status` is ours to write.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}
