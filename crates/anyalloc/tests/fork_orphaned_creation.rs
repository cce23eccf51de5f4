//! A signal handler's fork (which takes nothing: its thread is inside the
//! allocator) while another thread creates the global heap: its child,
//! which goes on once the handler returns, must find or make the heap,
//! never wait for a creator that is not there.
//!
//! The fork handler's prepare waits for a creation in progress before it
//! clones, but a prepare that takes nothing (called by a signal handler
//! that interrupted the allocator) does not, and its child inherited the
//! heap "being made" (`INITIALIZING`) by a thread of the parent: its first
//! `init` (or normal-path allocation through `Global`) waited for ever
//! (hung, 1 of 1 before the fix). Now the creation records the process
//! it runs in, and a caller in another process takes the creation over.
//!
//! This binary's allocator is the system's, so the global heap is made by
//! the first `anyalloc::init`, on thread T, which parks in `getenv` (this
//! binary's own, as in `fork_global_creation`) until the child is checked.
//! The main thread, inside heap B's zone lock (its interrupt hook at
//! `Site::ZoneAlloc`), raises a signal whose handler forks; the child
//! calls `init`, allocates and frees, under a watchdog.

mod handler_fork;
mod watchdog;
mod zone_holder;

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// Set by the scenario: `getenv` parks T's creation.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// T's creation is parked in `getenv`.
static PARKED: AtomicBool = AtomicBool::new(false);
/// T's creation may go on.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// The main thread raises the signal at its next `Site::ZoneAlloc`.
static RAISE: AtomicBool = AtomicBool::new(false);

extern "C" {
    static environ: *const *const c_char;
}

/// `getenv` without libc's (no allocation, no lock): the heap's creation
/// calls this one.
///
/// # Safety
/// As libc's: `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn getenv(name: *const c_char) -> *mut c_char {
    // SAFETY: the caller passes a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    if ACTIVE.load(SeqCst) && name == b"ANYALLOC_MEMORY" {
        PARKED.store(true, SeqCst);
        let start = Instant::now();
        while !RELEASED.load(SeqCst) && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // SAFETY: `environ` is the process's NUL-terminated array of
    // NUL-terminated "NAME=value" strings.
    unsafe {
        let mut e = environ;
        while !e.is_null() && !(*e).is_null() {
            let entry = CStr::from_ptr(*e).to_bytes();
            if entry.len() > name.len() && entry.starts_with(name) && entry[name.len()] == b'=' {
                return (*e).add(name.len() + 1).cast_mut();
            }
            e = e.add(1);
        }
    }
    std::ptr::null_mut()
}

fn hook(site: Site) {
    if site == Site::ZoneAlloc && RAISE.swap(false, SeqCst) {
        handler_fork::raise();
    }
}

/// The child's `init`, an allocation and its free: whether all came back.
fn child_work() -> bool {
    let Ok(heap) = anyalloc::init() else {
        return false;
    };
    let layout = std::alloc::Layout::from_size_align(100, 8).unwrap();
    match heap.alloc(layout) {
        Some(p) => {
            // SAFETY: allocated just above, freed once.
            unsafe { heap.free(p) };
            true
        }
        None => false,
    }
}

#[test]
fn a_handler_forks_while_another_thread_creates_the_global_heap() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_another_thread_creates_the_global_heap",
        Duration::from_secs(60),
        "a fork in a handler while another thread creates the global heap",
    ) {
        return;
    }
    assert!(anyalloc::global_heap().is_none(), "no heap before the test");
    let b = Heap::new(Config::default().memory(16 << 20).maintenance(false)).expect("heap");
    handler_fork::install();
    ACTIVE.store(true, SeqCst);
    let t = std::thread::spawn(|| anyalloc::init().is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !PARKED.load(SeqCst) && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(PARKED.load(SeqCst), "T's creation did not park");
    set_hook(Some(hook));
    RAISE.store(true, SeqCst);
    zone_holder::allocate_under_the_zone_lock(b.pages(), 6);
    if handler_fork::in_child() {
        set_hook(None);
        ACTIVE.store(false, SeqCst);
        let ok = child_work();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    set_hook(None);
    let pid = handler_fork::child();
    assert!(pid > 0, "the handler did not fork");
    let status = watchdog::wait_child(pid, Duration::from_secs(20));
    RELEASED.store(true, SeqCst);
    assert!(t.join().unwrap(), "the heap was created in the parent");
    let status = status.expect("the child hung: it waited for a creator it does not have");
    assert!(
        watchdog::exited_ok(status),
        "the child failed (status {status:#x})"
    );
}
