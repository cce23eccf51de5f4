//! A reclaim started inside a shrinker does not run the shrinkers again on
//! that thread, however many threads reclaim at once.
//!
//! The heap used to record a single "owner" thread while its shrinkers ran:
//! a second thread reclaiming meanwhile was not recorded, so when *its*
//! shrinker allocated and the allocation reclaimed, nothing stopped the
//! shrinkers from running again on it, and again: unbounded recursion, a
//! stack overflow. Now each thread carries its own shrinker mark.
//!
//! Scenario: a full heap that cannot grow, one shrinker that allocates (a
//! block the full heap cannot serve, so the allocation reclaims), and
//! [`THREADS`] threads that allocate until refused, so each of them runs
//! the shrinkers. The first time a thread enters the shrinker it waits
//! until every thread is inside it (all of them reclaim at once), then
//! allocates. The shrinker counts how deeply it is nested on its thread;
//! it must never be nested at all. (Past [`GIVE_UP`] levels it stops
//! allocating, so that the old behaviour fails this assertion instead of
//! overflowing the stack and killing the test binary.)

use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const THREADS: usize = 3;
/// Nesting at which the shrinker stops allocating (the old code recursed
/// without bound; the fixed one never nests).
const GIVE_UP: usize = 200;

static ARRIVED: AtomicUsize = AtomicUsize::new(0);
static MAX_DEPTH: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    static WAITED: Cell<bool> = const { Cell::new(false) };
}

fn big() -> Layout {
    Layout::from_size_align(64 << 10, 8).unwrap()
}

#[test]
fn concurrent_reclaimers_never_nest_their_shrinkers() {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(1 << 20)
                .grow(false)
                .maintenance(false),
        )
        .expect("a heap"),
    ));
    // Fill it.
    let mut held: Vec<NonNull<u8>> = Vec::new();
    for size in [64 << 10, 4096, 256] {
        let l = Layout::from_size_align(size, 8).unwrap();
        while let Some(p) = heap.alloc(l) {
            held.push(p);
        }
    }
    assert!(!held.is_empty());

    heap.register_shrinker(move |_wanted| {
        CALLS.fetch_add(1, Ordering::Relaxed);
        let depth = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        MAX_DEPTH.fetch_max(depth, Ordering::Relaxed);
        if !WAITED.with(|w| w.replace(true)) {
            // Every thread inside its shrinker at once (bounded: a thread
            // that never comes fails the precondition below, not a hang).
            ARRIVED.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(30);
            while ARRIVED.load(Ordering::SeqCst) < THREADS && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        if depth < GIVE_UP {
            // The shrinker allocates; the full heap refuses and reclaims.
            if let Some(p) = heap.alloc(big()) {
                // SAFETY: just allocated from this heap.
                unsafe { heap.free(p) };
            }
        }
        DEPTH.with(|d| d.set(d.get() - 1));
        0
    });

    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                // Allocate until refused: the refused allocation reclaims.
                let mut mine = Vec::new();
                while let Some(p) = heap.alloc(big()) {
                    mine.push(p);
                    assert!(mine.len() < 1000, "the heap should be full");
                }
                mine.len()
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reclaiming thread");
    }
    let (arrived, max, calls) = (
        ARRIVED.load(Ordering::SeqCst),
        MAX_DEPTH.load(Ordering::Relaxed),
        CALLS.load(Ordering::Relaxed),
    );
    println!("threads in the shrinker at once: {arrived}, calls {calls}, deepest nesting {max}");
    assert_eq!(
        arrived, THREADS,
        "precondition: every thread reclaims, all at once"
    );
    assert_eq!(
        max, 1,
        "a shrinker ran inside a shrinker on the same thread (recursion)"
    );
    assert!(heap.stats().reclaims >= THREADS as u64);
}
