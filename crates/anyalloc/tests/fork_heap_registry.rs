//! A `fork` called by a signal handler that interrupted `Heap::new` or a
//! heap's drop inside the heap registry, while another thread's fork waits
//! for that registry.
//!
//! `Global`'s prepare handler takes the children registry, then the heap
//! registry. A thread that links a heap into the heap registry (or unlinks
//! one) holds it for a moment; it used to hold it unmarked, so a signal
//! handler there that forked took the route of an ordinary fork: its
//! prepare waited for the children registry, which the other thread's
//! prepare held while it waited for the heap registry: each fork waited for
//! the other for ever. Marked inside the allocator there (as a zone lock's
//! holder is), the handler's fork takes nothing in its prepare, and
//! returns; the interrupted link completes and the other fork goes on.
//!
//! Deterministic with an interrupt point: thread B pauses at its registry
//! section (`Site::HeapRegistry`, once in `Heap::new`, once in the drop)
//! until the main thread's fork has reached its prepare handlers (a
//! prepare handler registered after `Global`'s runs just before it), then
//! raises a signal whose handler forks. The scenario runs in a child
//! process under a watchdog: a deadlock fails the test.

mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Global, Heap};
use anyalloc_storm::install_handler;

#[global_allocator]
static A: Global = Global;

/// Thread B (the one that makes and drops the heap).
static B_TID: AtomicI32 = AtomicI32::new(0);
/// The main thread, whose forks the prepare handler reports.
static MAIN_TID: AtomicI32 = AtomicI32::new(0);
/// B's next registry section pauses.
static ARMED: AtomicBool = AtomicBool::new(false);
/// B is paused in its registry section: the main thread forks.
static GO: AtomicBool = AtomicBool::new(false);
/// The main thread's fork runs its prepare handlers.
static MAIN_IN_FORK: AtomicBool = AtomicBool::new(false);
/// Forks completed by B's signal handler.
static HANDLER_FORKS: AtomicU32 = AtomicU32::new(0);

fn tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Forks (as a signal handler may); the child `_exit`s at once.
fn fork_and_reap() {
    // SAFETY: the child only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
}

extern "C" fn fork_in_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    fork_and_reap();
    HANDLER_FORKS.fetch_add(1, SeqCst);
}

/// Registered after `Global`'s handlers: runs just before its prepare.
extern "C" fn prepare_before_global() {
    if tid() == MAIN_TID.load(SeqCst) {
        MAIN_IN_FORK.store(true, SeqCst);
    }
}

fn hook(site: Site) {
    if site != Site::HeapRegistry || tid() != B_TID.load(SeqCst) || !ARMED.swap(false, SeqCst) {
        return;
    }
    // B holds the heap registry. The main thread forks: its prepare takes
    // the children registry and waits for this one.
    GO.store(true, SeqCst);
    let t = Instant::now();
    while !MAIN_IN_FORK.load(SeqCst) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Time for its prepare to take the children registry (microseconds).
    std::thread::sleep(Duration::from_millis(300));
    // A signal handler here forks.
    // SAFETY: raise has no preconditions; the handler is installed.
    unsafe { libc::raise(libc::SIGUSR1) };
}

#[test]
fn fork_in_handler_inside_the_heap_registry() {
    if watchdog::ran_in_child(
        "fork_in_handler_inside_the_heap_registry",
        Duration::from_secs(30),
        "a fork called by a signal handler inside the heap registry while another fork waits for it",
    ) {
        return;
    }
    anyalloc::init().expect("global heap");
    install_handler(libc::SIGUSR1, fork_in_handler, &[]).expect("sigaction");
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe { libc::pthread_atfork(Some(prepare_before_global), None, None) };
    MAIN_TID.store(tid(), SeqCst);
    set_hook(Some(hook));
    for section in ["Heap::new", "the drop of a heap"] {
        GO.store(false, SeqCst);
        MAIN_IN_FORK.store(false, SeqCst);
        let b = std::thread::spawn(move || {
            B_TID.store(tid(), SeqCst);
            let config = Config::default().memory(8 << 20).maintenance(false);
            ARMED.store(section == "Heap::new", SeqCst);
            let heap = Heap::new(config).expect("heap");
            ARMED.store(section != "Heap::new", SeqCst);
            drop(heap);
        });
        while !GO.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        fork_and_reap();
        b.join().unwrap();
        println!("{section}: both forks returned");
    }
    set_hook(None);
    assert_eq!(HANDLER_FORKS.load(SeqCst), 2);
}
