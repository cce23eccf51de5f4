//! Page allocations by the thread a fork waits for: they must not hold it.
//!
//! glibc's `fork` takes its stdio list lock and its NSS database lock after
//! every `pthread_atfork` prepare handler, so after the heap's, which holds
//! every zone lock. A signal handler that interrupted the holder of one of
//! those and calls `PageAllocator::alloc_pages` (routed: the normal path,
//! since it did not interrupt the allocator) misses (the zones' locks give
//! way to the fork), and the fork waits for the interrupted thread. Each
//! such call used to wait up to a second for the fork before it returned
//! no block, and a storm's handler calls come one after another: the fork
//! and the thread crawled for tens of seconds (a `page_crossfire` run in CI
//! took 53 s so, its forker stuck in glibc's `fork` behind a worker that a
//! handler interrupted inside `malloc`).
//!
//! Here a prepare handler registered before the heap's (from
//! `.preinit_array`, so it runs after the heap's, as glibc's own locking
//! does) stands for that lock: it waits until the "holder" thread has made
//! its page calls, which it starts only once the fork holds the heap's
//! locks. The calls (orders 0 to 10, [`CALLS`] of them) may be served by
//! the nolock path or refused, but together wait at most about one second
//! for the fork (its patience, once per fork), not a second each: the
//! watchdog's limit is far below [`CALLS`] seconds. Afterwards every block
//! is freed and every page comes back.

mod watchdog;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap, MAX_ORDER};

/// Page calls the holder makes while the fork waits for it.
const CALLS: usize = 60;

/// Set by the scenario: the handler does nothing in other forks.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by the handler: the fork holds every heap lock now.
static FORK_HOLDS: AtomicBool = AtomicBool::new(false);
/// The stand-in for glibc's lock: the fork goes on once it is false.
static HELD: AtomicBool = AtomicBool::new(false);
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());

/// Runs after the heap's prepare handler (registered before it): waits
/// until the holder lets the fork go on, as glibc's `fork` waits for its
/// stdio list lock.
extern "C" fn late_prepare() {
    if !ACTIVE.load(SeqCst) {
        return;
    }
    FORK_HOLDS.store(true, SeqCst);
    while HELD.load(SeqCst) {
        std::thread::yield_now();
    }
}

extern "C" fn register_early() {
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe { libc::pthread_atfork(Some(late_prepare), None, None) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

#[test]
fn page_calls_of_the_thread_a_fork_waits_for_do_not_hold_it() {
    if watchdog::ran_in_child(
        "page_calls_of_the_thread_a_fork_waits_for_do_not_hold_it",
        Duration::from_secs(20),
        "page calls of the thread a fork waits for",
    ) {
        return;
    }
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, SeqCst);
    let before = heap.pages().stats();
    HELD.store(true, SeqCst);
    ACTIVE.store(true, SeqCst);
    let holder = std::thread::spawn(|| {
        while !FORK_HOLDS.load(SeqCst) {
            std::thread::yield_now();
        }
        // SAFETY: set above, before this thread started; leaked.
        let pa = unsafe { (*HEAP.load(SeqCst)).pages() };
        let start = Instant::now();
        let mut served = Vec::new();
        let mut refused = 0;
        for i in 0..CALLS {
            let order = (i as u32 * 7) % (MAX_ORDER + 1);
            match pa.alloc_pages(order) {
                Some(p) => served.push((p.as_ptr() as usize, order)),
                None => refused += 1,
            }
        }
        let took = start.elapsed();
        // Still inside the fork's prepare: nothing let it go on.
        assert!(FORK_HOLDS.load(SeqCst));
        HELD.store(false, SeqCst);
        (served, refused, took)
    });
    // SAFETY: the child only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    ACTIVE.store(false, SeqCst);
    let (served, refused, took) = holder.join().expect("the holder thread");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "forked child failed (status {status:#x})"
    );
    println!(
        "{CALLS} page calls while the fork waited for their thread: {} served, {refused} refused, in {took:?}",
        served.len()
    );
    let pa = heap.pages();
    for (p, order) in served {
        // SAFETY: allocated above with `order`, freed once.
        unsafe { pa.free_pages(NonNull::new(p as *mut u8).unwrap(), order) };
    }
    // After the fork, every order is served again.
    for order in 0..=MAX_ORDER {
        let p = pa.alloc_pages(order).expect("served once the fork ended");
        // SAFETY: allocated just now with `order`.
        unsafe { pa.free_pages(p, order) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages, "pages lost: {s:?}");
    assert_eq!(s.total_pages, before.total_pages);
    pa.check_invariants().unwrap();
}
