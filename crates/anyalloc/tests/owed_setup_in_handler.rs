//! Setup owed to an ordinary context never runs in a call
//! that may be a signal handler.
//!
//! The process's allocator is glibc's here. A first handler creates the
//! global heap through `NoLock`; a second handler then makes a normal-path
//! `Global` call at depth 0 (it interrupted code outside the allocator, so
//! nothing marks it). Before the fix that call registered the fork handlers
//! and spawned the maintenance thread right there, inside the handler
//! (`pthread_create` and `pthread_atfork` take libc locks the interrupted
//! code may hold). Now only `init()` (or the start-up constructor) does it.

use allocator_api2::boxed::Box as NBox;
use anyalloc::{Global, NoLock};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static CREATED: AtomicU64 = AtomicU64::new(0);
static GLOBAL_OK: AtomicU64 = AtomicU64::new(0);
/// Threads of the process after the second handler's `Global` call, minus
/// before it.
static SPAWNED_IN_HANDLER: AtomicI64 = AtomicI64::new(-1);

fn threads() -> i64 {
    std::fs::read_dir("/proc/self/task").unwrap().count() as i64
}

extern "C" fn create(_: libc::c_int) {
    if NBox::try_new_in([1u8; 32], NoLock).is_ok() {
        CREATED.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn use_global(_: libc::c_int) {
    // Reading /proc allocates through glibc: fine for this synchronous,
    // self-raised signal (no allocator was interrupted).
    let before = threads();
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: a non-zero-size layout; freed below with the same layout.
    let p = unsafe { Global.alloc(layout) };
    if !p.is_null() {
        GLOBAL_OK.fetch_add(1, Ordering::Relaxed);
        // SAFETY: allocated just above.
        unsafe { Global.dealloc(p, layout) };
    }
    SPAWNED_IN_HANDLER.store(threads() - before, Ordering::Relaxed);
}

fn install(sig: libc::c_int, f: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with an extern "C" handler is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = f as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

#[test]
fn a_normal_global_call_in_a_handler_does_no_owed_setup() {
    assert!(anyalloc::global_heap().is_none(), "no heap yet");
    install(libc::SIGUSR1, create);
    install(libc::SIGUSR2, use_global);
    // SAFETY: raise runs the handler synchronously on this thread.
    unsafe { libc::raise(libc::SIGUSR1) };
    assert_eq!(
        CREATED.load(Ordering::Relaxed),
        1,
        "the first handler created the heap"
    );
    // SAFETY: as above.
    unsafe { libc::raise(libc::SIGUSR2) };
    assert_eq!(
        GLOBAL_OK.load(Ordering::Relaxed),
        1,
        "the second handler allocated"
    );
    assert_eq!(
        SPAWNED_IN_HANDLER.load(Ordering::Relaxed),
        0,
        "no thread was spawned inside the handler's Global call"
    );
    // An ordinary point does the owed setup: the maintainer starts.
    let before = threads();
    anyalloc::init().unwrap();
    assert_eq!(threads(), before + 1, "init() started the maintainer");
}
