//! Workload 5: cache-scratch (passive false sharing; our own port of the
//! idea of Hoard's `cache-scratch`).
//!
//! The main thread allocates one small object per worker, one after the
//! other (so an allocator may place them in the same cache line), and hands
//! one to each worker. Each worker frees its object, then repeatedly
//! allocates an object of the same size, writes it `WRITES` times and frees
//! it. An allocator that gives a worker back the object the main thread
//! allocated (or another thread's neighbour) makes the workers write to the
//! same cache line from different cores: each write then costs a cache-line
//! transfer. Reported: ns per (alloc + `WRITES` writes + free) per thread,
//! timed in each worker from a common start (after a spin barrier, so
//! thread start-up is not measured); a sample is the slowest worker's time.
//!
//! Two reference rows frame the numbers: each thread writing its own
//! cache-line-aligned word (no sharing) and two threads writing adjacent
//! words of one line (forced false sharing).

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::peers::{alloc_retrying, Alloc, Named};
use crate::{measure, progress, Options, Peer, WorkloadResult};

/// Worker threads.
pub const THREADS: usize = 2;
/// Object size.
pub const SIZE: usize = 8;
/// Writes to each object between its allocation and its free.
pub const WRITES: u64 = 100;

/// Reference: private lines.
pub const PRIVATE: &str = "no allocator: private lines";
/// Reference: one shared line.
pub const SHARED: &str = "no allocator: one shared line";

#[inline(always)]
fn hammer(p: *mut u64) {
    for _ in 0..WRITES {
        // SAFETY: `p` is a live, 8-aligned object of at least 8 bytes that
        // only this thread writes (other threads may share its cache line,
        // which is what is measured).
        unsafe { p.write_volatile(p.read_volatile().wrapping_add(1)) };
    }
}

/// Spins until all `THREADS` workers arrived (thread start-up stays out
/// of the timed part).
fn arrive(gate: &AtomicUsize) {
    gate.fetch_add(1, Ordering::AcqRel);
    crate::spin_until(|| gate.load(Ordering::Acquire) >= THREADS);
}

#[inline(never)]
fn worker(name: &str, a: &dyn GlobalAlloc, given: usize, n: u64, gate: &AtomicUsize) -> Duration {
    let a = black_box(a);
    let l = Layout::from_size_align(SIZE, 8).expect("layout");
    arrive(gate);
    let t = Instant::now();
    // SAFETY: `given` was allocated by `a` with `l` for this thread.
    unsafe { a.dealloc(given as *mut u8, l) };
    for _ in 0..n {
        let p = alloc_retrying(name, a, l) as *mut u64;
        // SAFETY: a fresh 8-byte, 8-aligned object.
        unsafe { p.write(0) };
        hammer(p);
        // SAFETY: allocated above with `l`, freed once.
        unsafe { a.dealloc(p as *mut u8, l) };
    }
    t.elapsed()
}

/// One sample: the slowest worker's time from the common start.
fn sample(name: &'static str, a: Alloc, n: u64) -> Duration {
    let l = Layout::from_size_align(SIZE, 8).expect("layout");
    let given: Vec<usize> = (0..THREADS)
        .map(|_| alloc_retrying(name, a, l) as usize)
        .collect();
    let gate = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = given
            .iter()
            .map(|&g| {
                let gate = &gate;
                s.spawn(move || worker(name, a, g, n, gate))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("scratch worker"))
            .max()
            .unwrap_or_default()
    })
}

#[repr(align(128))]
struct Line([AtomicU64; 16]);

static LINES: [Line; THREADS] = [const { Line([const { AtomicU64::new(0) }; 16]) }; THREADS];

fn reference(shared: bool, n: u64) -> Duration {
    let gate = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = LINES
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let w: &AtomicU64 = if shared { &LINES[0].0[i] } else { &line.0[0] };
                let gate = &gate;
                s.spawn(move || {
                    arrive(gate);
                    let t = Instant::now();
                    for _ in 0..n {
                        hammer(w.as_ptr());
                    }
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("reference worker"))
            .max()
            .unwrap_or_default()
    })
}

/// Measures the workload over `peers` and the two reference rows.
pub fn run(opts: &Options, peers: &[Named<Alloc>]) -> WorkloadResult {
    let name = "cache-scratch 8 B";
    progress(&format!("measuring {name}"));
    let mut ps: Vec<Peer<'_>> = peers
        .iter()
        .map(|&(pname, a)| Peer::new(pname, move |n| sample(pname, a, n)))
        .collect();
    if opts.peer_selected(PRIVATE) {
        ps.push(Peer::reference(PRIVATE, |n| reference(false, n)));
    }
    if opts.peer_selected(SHARED) {
        ps.push(Peer::reference(SHARED, |n| reference(true, n)));
    }
    measure(
        opts,
        name,
        "object per thread (alloc 8 B, 100 writes, free)",
        1,
        &mut ps,
    )
}

/// A description for reports.
pub fn setup_line() -> String {
    format!(
        "cache-scratch: the main thread allocates {THREADS} x {SIZE} B back to back and hands one to each of {THREADS} threads; \
         each frees it, then repeats alloc {SIZE} B, {WRITES} writes, free; (ref) rows: private cache lines / one shared line"
    )
}
