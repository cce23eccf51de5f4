//! A forked child does not count its parent's maintenance threads.
//!
//! A maintenance thread ends the process (`exit(0)`, as glibc does at the
//! last thread's exit) when the main thread has ended and every thread
//! left is a maintenance thread: it compares the process's thread count
//! with the number of maintenance threads it counted. A forked child
//! inherited that count (the parent's threads) but none of the threads:
//! with its own maintainer restarted it counted one too many, and a child
//! whose main thread ended while a worker still ran was ended under the
//! worker.
//!
//! Scenario: a heap with a maintainer (it has run a pass: it is counted);
//! fork; in the child, `forget_maintainer_after_fork` and a new maintainer,
//! a worker thread that sleeps 3 s and then ends the process with status
//! 42, and the main thread's exit (the raw `exit` system call: the thread
//! only, no unwinding through Rust frames). The child must end with the
//! worker's 42; it used to end within about a second with the maintainer's
//! 0.

mod watchdog;

use anyalloc::{Config, Heap};
use std::time::{Duration, Instant};

/// The worker's status: the process outlived its main thread until the
/// worker ended it.
const WORKER_DONE: i32 = 42;

extern "C" fn worker(_: *mut libc::c_void) -> *mut libc::c_void {
    // More than two of the maintainer's one-second checks.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(WORKER_DONE) }
}

/// In the child: never returns.
fn child(heap: &Heap) -> ! {
    let fail = |code| -> ! {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) }
    };
    if !heap.forget_maintainer_after_fork() {
        fail(2); // precondition: the parent's maintainer ran
    }
    if !heap.start_maintenance() {
        fail(3);
    }
    let mut t: libc::pthread_t = 0;
    // SAFETY: a valid thread handle out-pointer, default attributes, and a
    // start routine that never returns.
    if unsafe { libc::pthread_create(&mut t, core::ptr::null(), worker, core::ptr::null_mut()) }
        != 0
    {
        fail(4);
    }
    // The main thread ends, the others run on (SYS_exit ends the calling
    // thread only; the thread stays a zombie until the process exits).
    // SAFETY: nothing of this thread is used afterwards.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    fail(5)
}

#[test]
fn a_forked_child_does_not_count_its_parents_maintainers() {
    let heap = Heap::new(Config::default().memory(16 << 20)).expect("heap");
    // The maintainer counts itself before its first pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    while heap.stats().maintenance_passes == 0 {
        assert!(Instant::now() < deadline, "the maintainer never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: the child only uses the heap, starts threads and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child(&heap);
    }
    assert!(pid > 0, "fork failed");
    let status = watchdog::wait_child(pid, Duration::from_secs(30)).expect("the child hung");
    assert!(libc::WIFEXITED(status), "the child was killed: {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(
        code, 0,
        "the child's maintainer ended the process while its worker still ran \
         (it counted the parent's maintainer)"
    );
    assert_eq!(code, WORKER_DONE, "the child failed (status {code})");
}
