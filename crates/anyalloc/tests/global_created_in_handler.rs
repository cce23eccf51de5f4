//! The process-wide heap created by a nolock caller inside a signal handler
//! (the process's global allocator here is glibc's, so `NoLock` is the first
//! user of anyalloc's heap): nothing that needs a normal context happens in
//! the handler — no maintenance thread is spawned there — and `init()`, an
//! ordinary-context call, does the owed setup.

use allocator_api2::boxed::Box as NBox;
use anyalloc::NoLock;
use std::sync::atomic::{AtomicU64, Ordering};

static HANDLER_OK: AtomicU64 = AtomicU64::new(0);
static THREADS_IN_HANDLER: AtomicU64 = AtomicU64::new(0);

fn threads() -> u64 {
    std::fs::read_dir("/proc/self/task").unwrap().count() as u64
}

extern "C" fn handler(_: libc::c_int) {
    if let Ok(b) = NBox::try_new_in([9u8; 64], NoLock) {
        if b[63] == 9 {
            HANDLER_OK.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Reading /proc allocates through glibc, which is fine for this test's
    // synchronous, self-raised signal (no allocator was interrupted).
    THREADS_IN_HANDLER.store(threads(), Ordering::Relaxed);
}

#[test]
fn heap_created_by_a_handler_defers_normal_context_setup() {
    assert!(
        anyalloc::global_heap().is_none(),
        "nothing created the heap yet"
    );
    // SAFETY: a zeroed sigaction with an extern "C" handler is valid; raise
    // runs the handler synchronously on this thread.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let before = threads();
    // SAFETY: raise has no preconditions.
    unsafe { libc::raise(libc::SIGUSR1) };
    assert_eq!(
        HANDLER_OK.load(Ordering::Relaxed),
        1,
        "the handler allocated"
    );
    assert!(
        anyalloc::global_heap().is_some(),
        "the handler created the heap"
    );
    assert_eq!(
        THREADS_IN_HANDLER.load(Ordering::Relaxed),
        before,
        "no thread was spawned inside the handler"
    );
    // An ordinary-context call does the owed setup: the maintainer starts.
    anyalloc::init().unwrap();
    let mut after = threads();
    for _ in 0..100 {
        if after > before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        after = threads();
    }
    assert_eq!(
        after,
        before + 1,
        "the maintenance thread started after the handler"
    );
    // The fork handlers were registered too: a forked child can allocate.
    // SAFETY: the child only allocates through NoLock, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = NBox::try_new_in([1u64; 16], NoLock).is_ok();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
}
