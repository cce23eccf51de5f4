//! A thread that the fork waits for makes accounted allocations
//! (`Heap::alloc_in`) while the fork holds every heap lock and the
//! accounting groups' children registry.
//!
//! As in `fork_gives_way.rs`, a prepare handler registered before
//! `Global`'s stands for glibc's stdio or NSS lock, which `fork` takes
//! after every prepare handler: it waits until the "holder" thread has
//! allocated and freed accounted blocks of every kind. An accounted
//! allocation that misses (its accounted caches' node locks gave way to the
//! fork) returns the group tree's per-CPU stocks to the counters before it
//! retries, which took the children registry with a spinning lock: held by
//! the fork, that spun for ever while the fork waited for the holder. The
//! scenario runs in a child process under a watchdog.

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::{Global, Group};

#[global_allocator]
static A: Global = Global;

/// Set by the scenario: the handler does nothing in other forks.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Set by the handler: the fork holds every heap lock now.
static FORK_HOLDS: AtomicBool = AtomicBool::new(false);
/// The stand-in for glibc's lock: the fork goes on once it is false.
static HELD: AtomicBool = AtomicBool::new(false);
/// Accounted blocks the holder made while the fork held the locks.
static MADE: AtomicU64 = AtomicU64::new(0);
/// Allocations that failed, or blocks whose contents were wrong.
static BAD: AtomicU64 = AtomicU64::new(0);

/// Runs after `Global`'s prepare handler (registered before it).
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

/// Accounted blocks of every kind (small, large, huge), written, checked
/// and freed.
fn allocate_accounted(heap: &anyalloc::Heap, group: &std::sync::Arc<Group>, round: usize) {
    let sizes = [16, 48, 200, 1000, 3000, 64 << 10, 6 << 20];
    let mut live = Vec::with_capacity(700);
    for i in 0..700 {
        let size = sizes[i % sizes.len()];
        let l = Layout::from_size_align(size, 8).unwrap();
        let Some(p) = heap.alloc_in(l, group) else {
            BAD.fetch_add(1, SeqCst);
            continue;
        };
        let fill = (i + round) as u8;
        // SAFETY: a fresh block of `size` bytes.
        unsafe { p.as_ptr().write_bytes(fill, size) };
        MADE.fetch_add(1, SeqCst);
        live.push((p, size, fill));
    }
    for (p, size, fill) in live {
        // SAFETY: the block is live and `size` bytes long.
        let ok = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) }
            .iter()
            .all(|&b| b == fill);
        if !ok {
            BAD.fetch_add(1, SeqCst);
        }
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
}

const ROUNDS: usize = 5;

#[test]
fn a_thread_the_fork_waits_for_allocates_accounted_blocks() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "a_thread_the_fork_waits_for_allocates_accounted_blocks",
            &[],
            Duration::from_secs(30),
            "accounted allocations by a thread the fork waits for",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    // Other threads' first, long-lived blocks (the test harness's main
    // thread sets up its waiting state once it blocks) before any fork:
    // made while a fork holds the locks, they would be mapped beside the
    // heap and stay, and the last check would count them.
    std::thread::sleep(Duration::from_millis(200));
    let settled = heap.stats().huge_in_use;
    let root = Group::new("root", None, None);
    let group = Group::new("tenant", None, Some(&root));
    for round in 0..ROUNDS {
        HELD.store(true, SeqCst);
        FORK_HOLDS.store(false, SeqCst);
        ACTIVE.store(true, SeqCst);
        let g = group.clone();
        let holder = std::thread::spawn(move || {
            while !FORK_HOLDS.load(SeqCst) {
                std::thread::yield_now();
            }
            allocate_accounted(heap, &g, round);
            assert!(FORK_HOLDS.load(SeqCst));
            HELD.store(false, SeqCst);
        });
        // SAFETY: the child only _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        ACTIVE.store(false, SeqCst);
        holder.join().expect("the holder thread");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
    allocate_accounted(heap, &group, ROUNDS);
    heap.drain();
    let (made, bad) = (MADE.load(SeqCst), BAD.load(SeqCst));
    println!("{ROUNDS} forks: {made} accounted blocks, {bad} bad");
    assert_eq!(bad, 0, "accounted allocations under the fork failed");
    assert_eq!(made, (ROUNDS as u64 + 1) * 700);
    assert_eq!(group.usage(), 0, "charges left after every block was freed");
    assert_eq!(heap.stats().huge_in_use, settled);
}
