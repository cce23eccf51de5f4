//! A `fork` while another thread creates the global heap: the child must
//! find the heap made (or not begun), never "being made" by a thread that
//! does not exist there.
//!
//! The prepare handler used to look only for a ready heap: a creation in
//! progress on another thread was cloned half done, and in the child the
//! state stayed `INITIALIZING` for ever, so the child's first `init` (or
//! normal-path allocation through `Global`) waited for ever.
//!
//! This binary's allocator is the system's, so the heap is made by the
//! first `anyalloc::init`, on thread T. The creation reads its settings
//! with `getenv`, which this binary defines (a scan of `environ`): on T,
//! the read of `ANYALLOC_MEMORY` parks the creation until the fork has
//! returned in the parent, or until a few seconds have passed (a prepare
//! handler that waits for the creation cannot return before it). The main
//! thread forks while T is parked there; the child calls `init` and
//! allocates, under a watchdog.

mod watchdog;

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Set by the scenario: `getenv` parks T's creation.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// T's creation is parked in `getenv`.
static PARKED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` has returned in the parent.
static FORKED: AtomicBool = AtomicBool::new(false);

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
        while !FORKED.load(SeqCst) && start.elapsed() < Duration::from_secs(3) {
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

#[test]
fn fork_while_another_thread_creates_the_global_heap() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_while_another_thread_creates_the_global_heap",
            &[("ANYALLOC_MEMORY", "64m")],
            Duration::from_secs(60),
            "a fork while another thread creates the global heap",
        );
        print!("{}", out.stdout);
        return;
    }
    assert!(anyalloc::global_heap().is_none(), "no heap before the test");
    ACTIVE.store(true, SeqCst);
    let t = std::thread::spawn(|| anyalloc::init().is_ok());
    while !PARKED.load(SeqCst) {
        std::thread::yield_now();
    }
    // SAFETY: the child calls `init`, allocates and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = match anyalloc::init() {
            Ok(heap) => {
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
            Err(_) => false,
        };
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    FORKED.store(true, SeqCst);
    assert!(pid > 0, "fork failed");
    let status = watchdog::wait_child(pid, Duration::from_secs(20));
    assert!(t.join().unwrap(), "the heap was created in the parent");
    let status = status.expect("the child hung: it found the heap being made for ever");
    assert!(
        watchdog::exited_ok(status),
        "the child failed (status {status:#x})"
    );
    println!("the child made and used the heap");
}
