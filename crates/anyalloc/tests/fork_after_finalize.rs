//! A fork made while the process exits, after its finalisers ran, still
//! holds the heap's locks across the clone.
//!
//! `exit` runs each loaded object's finalisers, and `__cxa_finalize` of an
//! object unregisters the fork handlers registered with its handle, which
//! `pthread_atfork` passes (the program's own, in a position-independent
//! executable). Registered that way, the heap's handlers were gone for the
//! rest of the exit, while the program's other threads still run: a
//! thread that forked then cloned the heap with a lock another thread
//! held, and the child's first allocation that needed it waited for ever
//! (104 of 300 forks made after `__cxa_finalize` while two threads
//! allocated 64 KiB-4 MiB blocks). In the main program they are registered
//! with no handle now, as glibc's malloc does.
//!
//! Deterministically: a thread holds the global heap's zone lock (paused
//! at its interrupt point), the program runs its own `__cxa_finalize` as
//! `exit` would, and forks. The fork's prepare must wait for the lock (the
//! holder lets go after a while, or at once when the fork has returned,
//! which it did at once without handlers); the child then allocates a
//! block that needs the zone lock.

mod watchdog;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::Global;

#[global_allocator]
static A: Global = Global;

extern "C" {
    /// The program's handle for `__cxa_finalize` (crtbeginS.o's).
    static __dso_handle: u8;
    fn __cxa_finalize(dso: *const u8);
}

std::thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}
/// The holder is paused with the zone lock held.
static HOLDING: AtomicBool = AtomicBool::new(false);
/// The fork returned in the parent.
static FORKED: AtomicBool = AtomicBool::new(false);
/// How long the holder keeps the lock at most: a fork whose prepare waits
/// for it goes on after that.
const HOLD: Duration = Duration::from_secs(2);

fn hook(site: Site) {
    if site != Site::ZoneAlloc || !ARMED.get() {
        return;
    }
    ARMED.set(false);
    HOLDING.store(true, SeqCst);
    let start = Instant::now();
    while !FORKED.load(SeqCst) && start.elapsed() < HOLD {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn fork_after_the_programs_finalisers_holds_the_heap_locks() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_after_the_programs_finalisers_holds_the_heap_locks",
            &[],
            Duration::from_secs(60),
            "the fork after the finalisers",
        );
        assert!(out.stdout.contains("child allocated"), "{}", out.stdout);
        return;
    }
    anyalloc::init().unwrap();
    set_hook(Some(hook));
    let holder = std::thread::spawn(|| {
        ARMED.set(true);
        // Blocks of 64 KiB to 2 MiB, kept: above the per-CPU lists, from
        // the zone under its lock (once whatever caches them is empty).
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for i in 0..4096 {
            if !ARMED.get() {
                break;
            }
            keep.push(Vec::with_capacity(64 << (10 + i % 6)));
        }
        assert!(!ARMED.get(), "no allocation took the zone lock");
    });
    while !HOLDING.load(SeqCst) {
        assert!(
            !holder.is_finished(),
            "the holder ended without holding the lock"
        );
        std::thread::yield_now();
    }
    // What `exit` does once `main` is done, before the other threads end.
    // SAFETY: runs this program's `__cxa_atexit` functions (none here that
    // matter) and unregisters its fork handlers, as `exit` does.
    unsafe { __cxa_finalize(&__dso_handle) };
    // SAFETY: the child only allocates, writes and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain system calls in the child.
        unsafe { libc::alarm(10) };
        let v: Vec<u8> = Vec::with_capacity(1 << 20);
        drop(v);
        let msg = b"child allocated\n";
        // SAFETY: writes a live buffer, then ends the child at once.
        unsafe {
            libc::write(1, msg.as_ptr().cast(), msg.len());
            libc::_exit(0)
        }
    }
    FORKED.store(true, SeqCst);
    let mut status = 0;
    // SAFETY: waits for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    holder.join().unwrap();
    set_hook(None);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child forked after the finalisers did not allocate (status {status:#x}: \
         SIGALRM is a wait for a lock that a thread of the parent held at the clone)"
    );
}
