//! A fork on another thread never holds the zone lock that a trim must
//! take back after returning a block to the OS, so the trim's wait for
//! that lock can never be a wait for a fork that waits for the trim.
//!
//! `Heap::trim` returns a free block to the OS without the zone lock (the
//! block off every list, `RELEASING`), then takes the lock again to put it
//! back, waiting through a lock held across a fork (the block must go
//! back). glibc's `fork` takes its own locks after every prepare handler,
//! so a fork may wait for the very thread that trims (a signal handler
//! that interrupted `fopen` and trims, say). What rules out the deadlock
//! is the lock order of the fork's prepare: every release holds the page
//! allocator's drain lock, which the prepare takes before any zone lock,
//! so the fork waits for the release to end before it takes the zone lock.
//!
//! Here the main thread's trim pauses in its window (`Site::ReleaseWindow`)
//! until another thread's fork is blocked in the crate's prepare handler
//! (its thread asleep), then goes on. A prepare handler of the test's own,
//! registered before the crate's so that it runs after it, stands for
//! glibc's lock: it holds the fork until the trim has returned, at most
//! 20 s. The trim must return and the fork end, without that handler giving
//! up. With the zone locks taken before the drain lock, the trim and the
//! fork would wait for each other until the watchdog ends the child.
//!
//! Runs in a child process under a watchdog.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod late_prepare;
mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap, MAX_ORDER, PAGE_SIZE};

/// The test's first prepare handler and the trim's hook act (set by the
/// test).
static ARMED: AtomicBool = AtomicBool::new(false);
/// The forking thread's id, once its fork has begun (the test's first
/// prepare handler, which runs before the crate's).
static FORKER: AtomicI32 = AtomicI32::new(0);
/// The trim's hook saw the fork's thread asleep in the crate's prepare.
static SAW_FORK_WAIT: AtomicBool = AtomicBool::new(false);

/// Registered at run time, after the crate's start-up constructor: runs
/// before the crate's prepare handler. Notes the forking thread.
extern "C" fn prepare_first() {
    if ARMED.load(SeqCst) {
        // SAFETY: no preconditions.
        FORKER.store(unsafe { libc::gettid() }, SeqCst);
    }
}

/// Whether thread `tid` of this process is asleep (state `S`).
fn asleep(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            // The state follows the name's closing parenthesis.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "S")
        })
        .unwrap_or(false)
}

/// At the trim's window (once): lets the fork begin, waits until its
/// thread is asleep in the crate's prepare (at most 10 s), then goes on.
fn hook(site: Site) {
    if site != Site::ReleaseWindow || !ARMED.load(SeqCst) || FORKER.load(SeqCst) != 0 {
        return;
    }
    START_FORK.store(true, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let tid = FORKER.load(SeqCst);
        if tid != 0 && asleep(tid) {
            // Asleep a while: blocked on a lock, not between two steps.
            std::thread::sleep(Duration::from_millis(20));
            if asleep(tid) {
                SAW_FORK_WAIT.store(true, SeqCst);
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The forking thread may fork (set by the trim's hook).
static START_FORK: AtomicBool = AtomicBool::new(false);

#[test]
fn a_fork_waits_for_a_trims_release_window_without_taking_its_zone_lock() {
    if watchdog::ran_in_child(
        "a_fork_waits_for_a_trims_release_window_without_taking_its_zone_lock",
        Duration::from_secs(60),
        "a fork waits for a trim's release window without taking its zone lock",
    ) {
        return;
    }
    // SAFETY: `prepare_first` is an `extern "C"` function of the main
    // program, which is never unloaded.
    unsafe { libc::pthread_atfork(Some(prepare_first), None, None) };
    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .grow(false)
            .maintenance(false),
    )
    .unwrap();
    // A free block that is with the process, for the trim to return.
    let p = heap
        .pages()
        .alloc_pages(MAX_ORDER)
        .expect("a max-order block");
    // SAFETY: our own block; freed once with its order.
    unsafe {
        p.as_ptr().write_bytes(0x5a, PAGE_SIZE << MAX_ORDER);
        heap.pages().free_pages(p, MAX_ORDER);
    }
    ARMED.store(true, SeqCst);
    // The test's last prepare handler (`late_prepare`) stands for glibc's
    // lock held by the trimming thread: it holds the fork until the trim
    // has returned.
    late_prepare::arm();
    set_hook(Some(hook));
    let forker = std::thread::spawn(|| {
        while !START_FORK.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        late_prepare::fork_and_wait()
    });
    let released = heap.trim();
    late_prepare::release();
    set_hook(None);
    let status = forker.join().unwrap();
    assert!(START_FORK.load(SeqCst), "the trim never reached its window");
    assert!(
        SAW_FORK_WAIT.load(SeqCst),
        "the fork was never seen waiting in the crate's prepare during the window"
    );
    assert!(
        !late_prepare::gave_up(),
        "the fork held a lock the trim waited for (until the test's prepare gave up)"
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the fork's child failed: status {status}"
    );
    assert!(released > 0, "the trim returned nothing");
    heap.pages().check_invariants().expect("the zone");
}
