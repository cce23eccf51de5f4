//! `fork` while another thread runs an inline decay pass
//! (`Config::decay`), and passes in the forked children.
//!
//! A pass holds the heap's maintenance lock, and the page allocator's
//! drain lock, across its `madvise` calls, a zone lock and another CPU's
//! per-CPU list while it drains an idle one, and takes idle blocks off
//! their lists while they go back to the OS. The fork's prepare handler
//! takes the maintenance and drain locks, so a fork waits for a pass in
//! progress and never clones one halfway; each child then runs a pass of
//! its own (its heap inherited the parent's decay clock and epochs), a
//! `trim`, checks the page allocator's invariants and must be able to
//! allocate every free page.
//!
//! Deterministic with the fork_pause harness: a thread whose only calls
//! are blocks above 4 MiB (mappings of their own, which reach none of the
//! sites below), after freeing touched blocks for the passes to give back,
//! pauses inside its pass at the round's site until the main thread has
//! forked, or for 50 ms. Runs under the watchdog, with rseq and without.

mod fork_pause;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap, PageAllocator};

const ROUNDS: usize = 4;

fn huge() -> Layout {
    Layout::from_size_align(5 << 20, 8).unwrap()
}

/// One driver call: a block above 4 MiB allocated and freed (two ticks).
fn one_call(heap: &Heap) {
    let p = heap.alloc(huge()).expect("a mapping");
    // SAFETY: allocated just above, freed once.
    unsafe { heap.free(p) };
}

/// Calls until a pass has run (at most `limit`); whether one did.
fn until_a_pass(heap: &Heap, limit: Duration) -> bool {
    let before = heap.stats().maintenance_passes;
    let start = Instant::now();
    while heap.stats().maintenance_passes == before {
        if start.elapsed() > limit {
            return false;
        }
        one_call(heap);
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Frees touched blocks (large ones beside live siblings, and per-CPU
/// pages) for the passes to give back; returns the siblings.
fn idle_work(pages: &PageAllocator) -> Vec<(std::ptr::NonNull<u8>, u32)> {
    let mut keep = Vec::new();
    for order in [0, 1, 2, 3, 6, 7, 8] {
        let Some(k) = pages.alloc_pages(order) else {
            continue;
        };
        keep.push((k, order));
        if let Some(p) = pages.alloc_pages(order) {
            // SAFETY: our own block of `order`, then a valid free.
            unsafe {
                p.as_ptr().write_bytes(0x5a, anyalloc::PAGE_SIZE << order);
                pages.free_pages(p, order);
            }
        }
    }
    keep
}

/// The child's checks: a pass of its own, a trim, the invariants, every
/// free page allocatable.
fn child(heap: &Heap) -> bool {
    if !until_a_pass(heap, Duration::from_secs(3)) {
        eprintln!("child: no pass ran");
        return false;
    }
    heap.trim();
    fork_pause::every_free_page_can_be_had(heap.pages())
}

fn scenario() {
    let heap = Heap::new(
        Config::default()
            .memory(32 << 20)
            .grow(false)
            .maintenance(false),
    )
    .expect("heap");
    let stop = AtomicBool::new(false);
    let mut results = Vec::new();
    std::thread::scope(|s| {
        let driver = s.spawn(|| {
            fork_pause::become_pauser();
            let mut keep = Vec::new();
            while !stop.load(SeqCst) {
                for (p, order) in keep.drain(..) {
                    // SAFETY: allocated by `idle_work` with `order`.
                    unsafe { heap.pages().free_pages(p, order) };
                }
                keep = idle_work(heap.pages());
                for _ in 0..8 {
                    if stop.load(SeqCst) {
                        break;
                    }
                    until_a_pass(&heap, Duration::from_secs(2));
                }
            }
            for (p, order) in keep {
                // SAFETY: as above.
                unsafe { heap.pages().free_pages(p, order) };
            }
        });
        for site in [Site::ReleaseWindow, Site::ReleaseIdle, Site::PcpDrain] {
            let forks = fork_pause::fork_during_pauses(site, ROUNDS, || child(&heap));
            results.push((site, forks));
        }
        stop.store(true, SeqCst);
        driver.join().expect("the driver");
    });
    for (site, forks) in &results {
        println!(
            "{site:?}: {} forks while a pass was paused there: {} children failed, {} hung",
            forks.paused, forks.failed, forks.hung
        );
    }
    for (site, forks) in results {
        assert_eq!(forks.hung, 0, "a child forked at {site:?} hung");
        assert_eq!(forks.failed, 0, "a child forked at {site:?} failed");
    }
    heap.trim();
    heap.pages().check_invariants().expect("the parent's zone");
    println!("SURVIVED");
}

fn check(name: &str, env: &[(&str, &str)]) {
    let out = watchdog::run_ok(
        name,
        env,
        Duration::from_secs(180),
        "fork while another thread runs a decay pass",
    );
    print!("{}", out.stdout);
    assert!(out.stdout.contains("SURVIVED"), "{}", out.stdout);
}

#[test]
fn fork_while_another_thread_runs_a_decay_pass() {
    if watchdog::in_child() {
        return scenario();
    }
    check("fork_while_another_thread_runs_a_decay_pass", &[]);
}

#[test]
fn fork_while_another_thread_runs_a_decay_pass_rseq_off() {
    if watchdog::in_child() {
        return scenario();
    }
    check(
        "fork_while_another_thread_runs_a_decay_pass_rseq_off",
        &[watchdog::RSEQ_OFF],
    );
}
