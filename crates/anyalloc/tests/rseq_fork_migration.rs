//! `fork` while other threads migrate between CPUs and run the rseq fast
//! path and its slow paths (lock sequences, refills, flushes) on a shared
//! heap: every child finds a usable heap. In the child (one thread, which
//! flips between the allowed CPUs) objects and pages come and go on both
//! paths, every object handed out is distinct and keeps its contents,
//! `drain` empties every CPU's caches (the child's first fences: membarrier
//! registration may not be inherited), and the page allocator's invariants
//! hold.
//!
//! Except for one documented loss (the `fork` module: "Try-locks whose
//! holders never wait ... are not held"): the parent's threads call the
//! nolock path explicitly, and one that was inside a nolock level's slot
//! at the very instant of the clone leaves that slot held in the child,
//! its objects or pages out of reach of `drain` (and the page allocator's
//! invariant check stops at it). Each thread holds at most one slot, so at
//! most that much may stay cached: two sheaves of one class per thread, or
//! one page slot's worth (seen in about 1 run in 40, one child in 20 each:
//! 5 to 63 objects; none without the explicit nolock calls in 120 runs).

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod cpus;
mod watchdog;

use std::alloc::Layout;
use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyalloc::{Config, Heap};
use cpus::{allowed_cpus, pin};

const SIZES: [usize; 6] = [16, 64, 256, 1024, 4096, 64 << 10];
const FORKS: usize = 20;
/// The parent's threads that churn while it forks.
const CHURNERS: usize = 2;
/// The most pages one per-CPU page slot holds: the room a nolock free
/// leaves (`high + batch`, at most 6 x 16 + 16 pages) plus one block of the
/// largest order the lists take (16 pages).
const SLOT_PAGES_MAX: usize = 6 * 16 + 16 + 16;

/// Objects come and go while the thread flips between CPUs.
fn churn(heap: &Heap, cpus: &[usize], seed: usize) {
    let mut live = Vec::with_capacity(256);
    for round in 0..4 {
        pin(cpus[(round + seed) % cpus.len()]);
        for i in 0..200 {
            let l = Layout::from_size_align(SIZES[(i + seed) % SIZES.len()], 8).unwrap();
            let p = if i % 4 == 0 {
                heap.alloc_nolock(l)
            } else {
                heap.alloc(l)
            };
            if let Some(p) = p {
                live.push(p);
            }
        }
        pin(cpus[(round + seed + 1) % cpus.len()]);
        for (i, p) in live.drain(..).enumerate() {
            // SAFETY: allocated above, freed once.
            unsafe {
                if i % 3 == 0 {
                    heap.free_nolock(p)
                } else {
                    heap.free(p)
                }
            }
        }
    }
}

/// The child's checks: `true` if the heap works.
fn child(heap: &Heap, cpus: &[usize]) -> bool {
    let mut seen = HashSet::new();
    let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
    for round in 0..8 {
        pin(cpus[round % cpus.len()]);
        for i in 0..300 {
            let size = SIZES[i % SIZES.len()];
            let l = Layout::from_size_align(size, 8).unwrap();
            let p = if i % 2 == 0 {
                heap.alloc_nolock(l)
            } else {
                heap.alloc(l)
            };
            let Some(p) = p else { continue };
            if !seen.insert(p.as_ptr() as usize) {
                eprintln!("object {p:p} handed out twice");
                return false;
            }
            // SAFETY: a live object of `size` bytes.
            unsafe { p.as_ptr().write_bytes((i as u8) | 1, size) };
            live.push((p, i));
        }
    }
    for (p, i) in live.drain(..) {
        let size = SIZES[i % SIZES.len()];
        // SAFETY: a live object of `size` bytes, written above.
        let ok = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) }
            .iter()
            .all(|&b| b == (i as u8) | 1);
        if !ok {
            eprintln!("object {p:p} changed");
            return false;
        }
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    heap.drain();
    // Left cached: only what slots held at the clone can hold (see the
    // module documentation).
    let s = heap.stats();
    let left: Vec<_> = s
        .classes
        .iter()
        .filter(|c| c.cached_in_sheaves != 0)
        .collect();
    if left.len() > CHURNERS
        || left
            .iter()
            .any(|c| c.cached_in_sheaves > 2 * c.sheaf_capacity)
    {
        for c in &left {
            eprintln!(
                "{} objects of {} bytes still cached in sheaves after drain",
                c.cached_in_sheaves, c.size
            );
        }
        return false;
    }
    let p = heap.pages().stats();
    if p.percpu_pages > CHURNERS * SLOT_PAGES_MAX {
        eprintln!(
            "{} pages still on per-CPU lists after drain",
            p.percpu_pages
        );
        return false;
    }
    match heap.pages().check_invariants() {
        Ok(()) => true,
        // A page slot held at the clone (see the module documentation): the
        // check stops there, the rest was checked above.
        Err(e) if e.contains("a slot is held") => true,
        Err(e) => {
            eprintln!("invariants: {e}");
            false
        }
    }
}

#[test]
fn fork_while_threads_migrate_on_the_fast_path() {
    let cpus = allowed_cpus();
    let heap = Heap::new(Config::default().memory(128 << 20).maintenance(false)).unwrap();
    println!("fast path {:?}, cpus {cpus:?}", heap.stats().fast_path);
    let stop = AtomicBool::new(false);
    let mut failed = 0;
    std::thread::scope(|s| {
        for id in 0..CHURNERS {
            let (heap, cpus, stop) = (&heap, &cpus, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    churn(heap, cpus, id);
                }
            });
        }
        for _ in 0..FORKS {
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: the child uses the heap, prints, and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = if child(&heap, &cpus) { 0 } else { 3 };
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(code) };
            }
            assert!(pid > 0, "fork failed");
            match watchdog::wait_child(pid, Duration::from_secs(10)) {
                Some(status) if watchdog::exited_ok(status) => {}
                _ => failed += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(failed, 0, "{failed} of {FORKS} children failed or hung");
}
