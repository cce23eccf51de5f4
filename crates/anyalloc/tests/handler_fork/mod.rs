//! The tests of forks made by signal handlers whose children go on (the
//! `fork` module's "Orphaned locks"): a SIGUSR1 handler that forks, the
//! child's flag and the parent's child, and what their scenarios share.
//!
//! The handler forks and returns, in both processes: the child's thread
//! goes on with what the signal interrupted (that is the scenario), then
//! checks [`in_child`] and runs its part; the parent reaps [`child`].

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};

/// Set in the child of the handler's fork.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
/// The handler's child (in the parent; 0: none yet).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn fork_here(_: libc::c_int) {
    // SAFETY: fork is async-signal-safe; the child returns from the
    // handler and goes on (that is the scenario).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        IN_CHILD.store(true, SeqCst);
    } else {
        CHILD.store(pid, SeqCst);
    }
}

/// Installs the forking handler for SIGUSR1 (`SA_RESTART`, as a program's
/// handler usually is: an interrupted futex wait resumes).
pub fn install() {
    // SAFETY: a plain handler that only forks and stores atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = fork_here as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Raises the forking signal on this thread (from an interrupt hook: the
/// thread is inside the allocator, so the fork's prepare takes nothing).
pub fn raise() {
    // SAFETY: raising a signal whose handler `install` installed.
    unsafe { libc::raise(libc::SIGUSR1) };
}

/// Whether this process is the handler's child.
pub fn in_child() -> bool {
    IN_CHILD.load(SeqCst)
}

/// The handler's child, in the parent (0: the handler has not forked).
pub fn child() -> libc::pid_t {
    CHILD.load(SeqCst)
}

/// In the handler's child: ends the scenario's interrupt hook, runs
/// `work` and `_exit`s with the code it returns. Elsewhere: nothing.
pub fn finish_in_child(work: impl FnOnce() -> i32) {
    if in_child() {
        // (The scenarios without interrupt points build without them.)
        #[cfg(feature = "interrupt-points")]
        anyalloc::interrupt::set_hook(None);
        let code = work();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
}

/// Writes a line with write(2) (a child leaves stdio alone: another thread
/// of its parent may have held its lock at the clone).
pub fn say(line: &str) {
    // SAFETY: writing a live buffer to stdout.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

/// Whether thread `tid` of this process is blocked in a `futex` call (its
/// `/proc` syscall file starts with the call's number).
pub fn in_futex_wait(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
        .is_ok_and(|s| s.split(' ').next() == Some(&libc::SYS_futex.to_string()))
}

/// Waits (at most 10 s) until thread `tid` sleeps in a futex wait, and
/// asserts that it does: `what` says what that wait is, for the message.
pub fn wait_until_in_futex(tid: libc::pid_t, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !in_futex_wait(tid) && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(in_futex_wait(tid), "{what}");
}

/// From another thread: sends the forking signal to `thread` (a
/// `pthread_t`), waits (at most 10 s) for the handler to fork, then reaps
/// the child (at most 20 s): its status, or `None` if it hung or the
/// handler did not fork ([`assert_child_ok`] tells them apart).
pub fn signal_and_reap(thread: usize) -> Option<libc::c_int> {
    // SAFETY: signalling a live thread of this process (the caller's
    // contract) whose handler `install` installed.
    unsafe { libc::pthread_kill(thread as libc::pthread_t, libc::SIGUSR1) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child() == 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    (child() > 0)
        .then(|| reap(std::time::Duration::from_secs(20)))
        .flatten()
}

/// In the parent: waits for the handler's child, at most `limit` (then
/// kills it): its wait status, or `None` if it hung.
pub fn reap(limit: std::time::Duration) -> Option<libc::c_int> {
    assert!(child() > 0, "the handler did not fork");
    crate::watchdog::wait_child(child(), limit)
}

/// Asserts that the handler forked, and that its child, reaped with
/// `status` (`None`: it hung, and was killed), exited with 0.
pub fn assert_child_ok(status: Option<libc::c_int>) {
    assert!(child() > 0, "the handler did not fork");
    let status =
        status.expect("the child hung: it waited for a lock held by a thread it does not have");
    assert!(
        crate::watchdog::exited_ok(status),
        "the child failed: status {status:#x}"
    );
}
