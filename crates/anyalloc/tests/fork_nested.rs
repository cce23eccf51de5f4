//! A `fork` called by a signal handler while another fork holds the heap's
//! locks leaves them held.
//!
//! `Global`'s prepare handler takes every heap lock and its parent and child
//! handlers release them. A fork called by a signal handler that
//! interrupted the allocator (inside it, the thread may hold those locks
//! itself) takes none in its prepare, but its parent handler used to
//! release the locks anyway: those of the fork in progress, whose clone then
//! copied locks held by other threads, and whose child hung.
//!
//! The scenario runs in a child process under a watchdog. A prepare handler
//! registered before `Global`'s (from `.preinit_array`) runs inside the
//! outer fork's window, where every heap lock is held, and there:
//!
//! 1. raises a signal whose handler forks (the same thread: a nested fork
//!    inside the window);
//! 2. signals thread X, which is waiting in `Heap::drain` for the
//!    maintenance lock the window holds (so X is inside the allocator), and
//!    whose handler forks (another thread's fork during the window).
//!
//! After each, X must still be waiting: its drain completes only once the
//! outer fork has released the locks. Then the outer fork's child drains
//! and allocates (it hangs if the clone copied locks held by X or the
//! churning thread), under a watchdog.

mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::Global;
use anyalloc_storm::install_handler;

#[global_allocator]
static A: Global = Global;

/// Set by the scenario: the handlers do nothing in other forks.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The thread whose fork the scenario watches.
static MAIN_TID: AtomicI32 = AtomicI32::new(0);
/// Thread X (a `pthread_t`).
static X: AtomicUsize = AtomicUsize::new(0);
/// The prepare handler has run its scenario.
static RAN: AtomicBool = AtomicBool::new(false);
/// X starts its drain.
static GO: AtomicBool = AtomicBool::new(false);
/// X's first drain has returned.
static DRAINED: AtomicBool = AtomicBool::new(false);
/// Forks completed by the signal handlers.
static NESTED_FORKS: AtomicU64 = AtomicU64::new(0);
/// Checks made inside the window that X was still waiting, and failures.
static CHECKED: AtomicU64 = AtomicU64::new(0);
static BAD: AtomicU64 = AtomicU64::new(0);

extern "C" fn fork_in_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: fork is async-signal-safe; the child only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    if pid > 0 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
        NESTED_FORKS.fetch_add(1, SeqCst);
    }
}

/// Waits (a fixed pause: X would have finished long before if the locks
/// were free), then records whether X is still waiting.
fn check_x_waits() {
    std::thread::sleep(Duration::from_millis(150));
    CHECKED.fetch_add(1, SeqCst);
    if DRAINED.load(SeqCst) {
        BAD.fetch_add(1, SeqCst);
    }
}

extern "C" fn prepare_in_window() {
    // SAFETY: gettid has no preconditions.
    if !ACTIVE.load(SeqCst) || unsafe { libc::gettid() } != MAIN_TID.load(SeqCst) {
        return;
    }
    // Once: not again in the forks that the handlers call from here.
    if RAN.swap(true, SeqCst) {
        return;
    }
    GO.store(true, SeqCst);
    // 1. This thread's handler forks inside the window.
    let before = NESTED_FORKS.load(SeqCst);
    // SAFETY: raise has no preconditions; the handler is installed.
    unsafe { libc::raise(libc::SIGUSR1) };
    if NESTED_FORKS.load(SeqCst) == before {
        BAD.fetch_add(1, SeqCst);
    }
    check_x_waits();
    // 2. X's handler forks while X waits inside the allocator.
    // SAFETY: X is a live thread (joined after the fork) with the handler
    // installed.
    unsafe { libc::pthread_kill(X.load(SeqCst) as libc::pthread_t, libc::SIGUSR1) };
    let t = Instant::now();
    while NESTED_FORKS.load(SeqCst) == before + 1 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    if NESTED_FORKS.load(SeqCst) != before + 2 {
        BAD.fetch_add(1, SeqCst);
    }
    check_x_waits();
}

extern "C" fn register_early() {
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe { libc::pthread_atfork(Some(prepare_in_window), None, None) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

#[test]
fn fork_in_handler_leaves_the_window_locks_held() {
    if watchdog::ran_in_child(
        "fork_in_handler_leaves_the_window_locks_held",
        Duration::from_secs(60),
        "a fork called by signal handlers inside another fork's window",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    install_handler(libc::SIGUSR1, fork_in_handler, &[]).expect("sigaction");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let x = std::thread::spawn(move || {
        while !GO.load(SeqCst) {
            std::thread::yield_now();
        }
        heap.drain();
        DRAINED.store(true, SeqCst);
    });
    X.store(
        std::os::unix::thread::JoinHandleExt::as_pthread_t(&x) as usize,
        SeqCst,
    );
    // Keeps the zone and node locks busy around the clone.
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut keep: Vec<Vec<u8>> = (0..64).map(|_| Vec::new()).collect();
            let mut i = 0usize;
            while !stop.load(SeqCst) {
                let size = if i.is_multiple_of(3) {
                    70_000 << (i % 4)
                } else {
                    1 + (i * 37) % 3000
                };
                keep[i % 64] = vec![i as u8; size];
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: gettid has no preconditions.
    MAIN_TID.store(unsafe { libc::gettid() }, SeqCst);
    ACTIVE.store(true, SeqCst);
    // SAFETY: the child drains, allocates and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        heap.drain();
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for i in 0..2000usize {
            keep.push(vec![
                1u8;
                if i.is_multiple_of(3) {
                    70_000
                } else {
                    1 + i % 3000
                }
            ]);
        }
        drop(keep);
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    ACTIVE.store(false, SeqCst);
    assert!(pid > 0, "fork failed");
    let status = watchdog::wait_child(pid, Duration::from_secs(20));
    stop.store(true, SeqCst);
    x.join().unwrap();
    churn.join().unwrap();
    let (checked, bad) = (CHECKED.load(SeqCst), BAD.load(SeqCst));
    println!(
        "{} forks by handlers inside the window; {checked} checks that X still waited, {bad} failed",
        NESTED_FORKS.load(SeqCst)
    );
    assert_eq!(checked, 2, "the prepare handler ran its checks");
    assert_eq!(
        bad, 0,
        "a fork called by a handler released the window's locks"
    );
    let status =
        status.expect("the outer fork's child hung (locks held by other threads were cloned)");
    assert!(
        watchdog::exited_ok(status),
        "the outer fork's child failed (status {status:#x})"
    );
}
