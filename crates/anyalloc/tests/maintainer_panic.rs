//! A maintenance thread that ends by a panic (a shrinker it ran panicked)
//! is no longer counted as running.
//!
//! A maintenance thread ends the process (`exit(0)`, as glibc does at the
//! last thread's exit) when the main thread has ended and every thread
//! left is a maintenance thread: it compares the process's thread count
//! with the number of maintenance threads counted. A thread counted itself
//! when it started and uncounted itself only when its loop returned, so
//! one that unwound out of a shrinker stayed counted for good: another
//! heap's maintainer then took a worker thread for a maintenance thread,
//! and ended the process under it.
//!
//! Scenario, in a forked child (a fresh main thread to end): heap A, whose
//! shrinker panics when the maintainer runs it, is filled below its low
//! watermark, so that its maintainer runs the shrinker and dies; once that
//! thread is gone, heap B with a maintainer, a worker thread that sleeps
//! 3 s and then ends the process with status 42, and the main thread's
//! exit (the raw `exit` system call: the thread only). The child must end
//! with the worker's 42; it used to end within about a second with B's
//! maintainer's 0.

mod watchdog;

use anyalloc::{Config, Heap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The worker's status: the process outlived its main thread until the
/// worker ended it.
const WORKER_DONE: i32 = 42;

/// Set by the shrinker just before it panics on the maintenance thread.
static PANICKED: AtomicBool = AtomicBool::new(false);

extern "C" fn worker(_: *mut libc::c_void) -> *mut libc::c_void {
    // More than two of the maintainer's one-second checks.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(WORKER_DONE) }
}

/// This process's thread count (from `/proc/self/stat`).
fn threads() -> usize {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // After the command name: the state, 16 more fields, the thread count.
    after
        .split_whitespace()
        .nth(17)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// In the child: never returns.
fn child() -> ! {
    let fail = |code| -> ! {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) }
    };
    // The maintainer's panic is expected: say nothing about it.
    std::panic::set_hook(Box::new(|_| {}));
    let a = Heap::new(Config::default().memory(1 << 20).grow(false)).unwrap_or_else(|_| fail(2));
    a.register_shrinker(|_| {
        if std::thread::current().name() == Some("anyalloc-maintainer") {
            PANICKED.store(true, Ordering::SeqCst);
            panic!("a shrinker's bug");
        }
        0
    });
    // Below the low watermark: the maintainer's passes run the shrinkers.
    let mut held = Vec::new();
    while let Some(p) = a.pages().alloc_pages(0) {
        held.push(p);
    }
    // Heap A's maintainer ran the shrinker and is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !PANICKED.load(Ordering::SeqCst) || threads() != 1 {
        if Instant::now() > deadline {
            fail(3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = Heap::new(Config::default().memory(16 << 20)).unwrap_or_else(|_| fail(4));
    if !b.start_maintenance() {
        fail(5);
    }
    let mut t: libc::pthread_t = 0;
    // SAFETY: a valid thread handle out-pointer, default attributes, and a
    // start routine that never returns.
    if unsafe { libc::pthread_create(&mut t, core::ptr::null(), worker, core::ptr::null_mut()) }
        != 0
    {
        fail(6);
    }
    // The main thread ends, the others run on (SYS_exit ends the calling
    // thread only; the thread stays a zombie until the process exits).
    // SAFETY: nothing of this thread is used afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    fail(7)
}

#[test]
fn a_maintainer_that_panicked_is_not_counted() {
    // SAFETY: the child makes heaps, starts threads and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child();
    }
    assert!(pid > 0, "fork failed");
    let status = watchdog::wait_child(pid, Duration::from_secs(60)).expect("the child hung");
    assert!(libc::WIFEXITED(status), "the child was killed: {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(
        code, 0,
        "a maintainer ended the process while its worker still ran \
         (it counted a maintainer that had panicked)"
    );
    assert_eq!(code, WORKER_DONE, "the child failed (status {code})");
}
