//! A thread that the fork waits for allocates while the fork holds every
//! heap lock.
//!
//! glibc's `fork` takes its stdio list lock and its NSS database lock after
//! every `pthread_atfork` prepare handler, so after `Global`'s, which holds
//! every heap lock. A thread (or a signal handler that interrupted it)
//! holding one of those and allocating must not wait for a heap lock: the
//! fork waits for that thread. Here a prepare handler registered before
//! `Global`'s (from `.preinit_array`, so it runs after `Global`'s, as
//! glibc's own locking does) stands for that lock: it waits until the
//! "holder" thread has finished allocating, growing, reallocating and
//! freeing small, large and huge blocks, which it starts only once the fork
//! holds the heap locks (the harness: `tests/fork_hold`). Before
//! normal-path waiters gave way to a fork, the holder's first allocation
//! that missed its per-CPU sheaf waited for a lock held by the fork for
//! ever. The same holder makes accounted allocations
//! in a third scenario, and the second is a long fork that waits for
//! nobody. Each scenario runs in a child process under a watchdog.

mod fork_hold;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::{Global, Group};
use fork_hold::{fork_waiting_for, long_fork, wait_until_fork_holds, LONG};

#[global_allocator]
static A: Global = Global;

/// Blocks the holder made while the fork held the heap locks.
static MADE: AtomicU64 = AtomicU64::new(0);
/// Blocks whose contents were wrong, or allocations that failed.
static BAD: AtomicU64 = AtomicU64::new(0);
/// Calls of the heap's shrinker, and those made while the holder allocated
/// under the fork.
static SHRUNK: AtomicU64 = AtomicU64::new(0);
static SHRUNK_UNDER_FORK: AtomicU64 = AtomicU64::new(0);

/// Lets other threads make their first, long-lived blocks before any fork
/// (the test harness's main thread sets up its channel's waiting state once
/// it blocks; the maintenance thread starts): made while a fork holds the
/// locks, they would be mapped beside the heap and stay, and the last
/// checks would count them as the holder's. Returns the huge blocks in use
/// then.
fn settle(heap: &anyalloc::Heap) -> usize {
    std::thread::sleep(Duration::from_millis(200));
    heap.stats().huge_in_use
}

/// The forked child: allocates a little and exits (its status).
fn child() -> i32 {
    let v = vec![7u8; 100_000];
    i32::from(v[99_999] != 7)
}

/// What the holder does while the fork waits for it: blocks of every kind
/// (small classes, large page blocks, a huge mapping), grown by `realloc`,
/// checked and freed.
fn allocate_under_the_fork(round: usize) {
    let small = [8, 24, 64, 200, 1000, 3000];
    let big = [64 << 10, 1 << 20, 6 << 20];
    let mut live: Vec<Vec<u8>> = Vec::new();
    for i in 0..1500 {
        let size = if i % 50 == 0 {
            big[(i / 50) % big.len()]
        } else {
            small[i % small.len()]
        };
        let mut b: Vec<u8> = Vec::new();
        if b.try_reserve_exact(size).is_err() {
            BAD.fetch_add(1, SeqCst);
            continue;
        }
        b.resize(size, (i + round) as u8);
        MADE.fetch_add(1, SeqCst);
        live.push(b);
    }
    // Grow some (realloc: a move into another class).
    for b in live.iter_mut().step_by(7) {
        let (n, fill) = (b.len(), b[0]);
        if b.try_reserve_exact(n + 5000).is_err() {
            BAD.fetch_add(1, SeqCst);
            continue;
        }
        b.resize(n + 5000, fill);
    }
    for (i, b) in live.iter().enumerate() {
        let want = (i + round) as u8;
        if b.iter().any(|&x| x != want) {
            BAD.fetch_add(1, SeqCst);
        }
    }
    drop(live);
}

const ROUNDS: usize = 10;

#[test]
fn a_thread_the_fork_waits_for_allocates_under_the_held_locks() {
    if watchdog::ran_in_child(
        "a_thread_the_fork_waits_for_allocates_under_the_held_locks",
        Duration::from_secs(120),
        "a thread the fork waits for allocating while the fork holds the heap locks",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let settled = settle(heap);
    heap.register_shrinker(|_| {
        SHRUNK.fetch_add(1, SeqCst);
        0
    });
    for round in 0..ROUNDS {
        fork_waiting_for(
            move || {
                let shrunk = SHRUNK.load(SeqCst);
                allocate_under_the_fork(round);
                // Misses during the fork are the fork's, not memory's: no
                // reclaim (it ran every shrinker on each of them).
                SHRUNK_UNDER_FORK.fetch_add(SHRUNK.load(SeqCst) - shrunk, SeqCst);
            },
            child,
        );
    }
    // Everything the holder made under the fork went back: the heap serves
    // as before, and no block mapped beside it is left.
    allocate_under_the_fork(ROUNDS);
    heap.drain();
    let stats = heap.stats();
    let (made, bad) = (MADE.load(SeqCst), BAD.load(SeqCst));
    println!(
        "{ROUNDS} forks: {made} blocks made while the fork held the heap locks, {bad} bad; huge blocks in use after: {}",
        stats.huge_in_use
    );
    assert_eq!(
        bad, 0,
        "allocations under the fork failed or were corrupted"
    );
    assert_eq!(made, (ROUNDS as u64 + 1) * 1500);
    assert!(stats.fork_mapped > 0, "no block was mapped beside the heap");
    assert_eq!(
        SHRUNK_UNDER_FORK.load(SeqCst),
        0,
        "allocations under the fork ran the shrinkers"
    );
    assert_eq!(
        stats.huge_in_use, settled,
        "blocks mapped beside the heap were not freed"
    );
}
/// Small objects a thread keeps during the long fork: more than the huge
/// table's 4096 entries.
const KEPT: usize = 6000;

/// A long fork that waits for nobody, while another thread keeps
/// allocating small objects and keeps them all: blocks mapped beside the
/// heap take at most half the huge table (2048 entries), then the thread
/// waits for the fork; every allocation succeeds. Mapping without that
/// bound filled the table and the next allocation failed (an abort).
#[test]
fn a_long_fork_maps_at_most_half_the_huge_table() {
    if watchdog::ran_in_child(
        "a_long_fork_maps_at_most_half_the_huge_table",
        Duration::from_secs(120),
        "a thread allocating during a long fork",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let settled = settle(heap);
    let (kept, took) = long_fork(|| {
        let mut kept: Vec<Box<[u64; 12]>> = Vec::with_capacity(KEPT);
        wait_until_fork_holds();
        let start = std::time::Instant::now();
        for i in 0..KEPT {
            kept.push(Box::new([i as u64; 12]));
        }
        (kept, start.elapsed())
    });
    for (i, b) in kept.iter().enumerate() {
        assert!(b.iter().all(|&w| w == i as u64), "object {i} corrupted");
    }
    let during = heap.stats();
    drop(kept);
    let after = heap.stats();
    println!(
        "{KEPT} objects kept during a {LONG:?} fork in {took:?}: {} mapped beside the heap, {} huge blocks in use before the frees, {} after",
        during.fork_mapped, during.huge_in_use, after.huge_in_use
    );
    assert!(
        during.fork_mapped > 0,
        "no block was mapped beside the heap"
    );
    assert!(
        during.fork_mapped <= 2048,
        "{} blocks mapped beside the heap: more than half the huge table",
        during.fork_mapped
    );
    assert_eq!(
        after.huge_in_use, settled,
        "blocks mapped beside the heap were not freed"
    );
}

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

/// Forks of the accounted scenario.
const ACCOUNTED_ROUNDS: usize = 5;

/// A thread that the fork waits for makes accounted allocations
/// (`Heap::alloc_in`) while the fork holds every heap lock and the
/// accounting groups' children registry. An accounted allocation that
/// misses returns the group tree's per-CPU stocks to the counters before it
/// retries, which took the children registry with a spinning lock: held by
/// the fork, that spun for ever while the fork waited for the holder.
#[test]
fn a_thread_the_fork_waits_for_allocates_accounted_blocks() {
    if watchdog::ran_in_child(
        "a_thread_the_fork_waits_for_allocates_accounted_blocks",
        Duration::from_secs(30),
        "accounted allocations by a thread the fork waits for",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let settled = settle(heap);
    let root = Group::new("root", None, None);
    let group = Group::new("tenant", None, Some(&root));
    for round in 0..ACCOUNTED_ROUNDS {
        let g = group.clone();
        fork_waiting_for(move || allocate_accounted(heap, &g, round), child);
    }
    allocate_accounted(heap, &group, ACCOUNTED_ROUNDS);
    heap.drain();
    let (made, bad) = (MADE.load(SeqCst), BAD.load(SeqCst));
    println!("{ACCOUNTED_ROUNDS} forks: {made} accounted blocks, {bad} bad");
    assert_eq!(bad, 0, "accounted allocations under the fork failed");
    assert_eq!(made, (ACCOUNTED_ROUNDS as u64 + 1) * 700);
    assert_eq!(group.usage(), 0, "charges left after every block was freed");
    assert_eq!(heap.stats().huge_in_use, settled);
}
