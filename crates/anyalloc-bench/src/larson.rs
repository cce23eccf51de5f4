//! Workload 4: larson-like server churn (our own port of the idea of
//! Larson and Krishnan's benchmark).
//!
//! `THREADS` threads each own an array of `SLOTS` objects. An op picks a
//! random slot, frees its object and puts a new object of random size
//! (16 to 512 bytes) there, touching its first and last byte. Every
//! `EPOCH` ops a thread ends and hands its whole slot array to a newly
//! spawned thread, so most frees are of objects another (by then exited)
//! thread allocated. Reported: ns per op over all threads (and ops/s).

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::peers::{alloc_retrying, Alloc, Named};
use crate::{measure, progress, Options, Peer, WorkloadResult};
use anyalloc_storm::XorShift;

/// Worker threads at a time.
pub const THREADS: usize = 2;
/// Objects each thread owns.
pub const SLOTS: usize = 1000;
/// Ops a thread does before it hands its slots to a new thread.
pub const EPOCH: u64 = 10_000;
/// Smallest and largest object.
pub const MIN_SIZE: usize = 16;
/// Largest object.
pub const MAX_SIZE: usize = 512;

/// A slot array that moves between threads: its objects are plain
/// addresses (with their sizes) owned by whichever thread holds the array.
struct Slots(Vec<(usize, usize)>);

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).expect("object layout")
}

/// One thread's epoch: `ops` replacements in `slots`.
#[inline(never)]
fn churn(name: &str, a: &dyn GlobalAlloc, slots: &mut Slots, ops: u64, seed: u64) {
    let a = black_box(a);
    let mut rng = XorShift::new(seed);
    for _ in 0..ops {
        let i = rng.below(SLOTS as u64) as usize;
        let (old, old_size) = slots.0[i];
        // SAFETY: the slot's object came from `a` with this size and is
        // owned by this thread (it holds the array); freed exactly once.
        unsafe { a.dealloc(old as *mut u8, layout(old_size)) };
        let size = MIN_SIZE + rng.below((MAX_SIZE - MIN_SIZE + 1) as u64) as usize;
        let p = alloc_retrying(name, a, layout(size));
        // SAFETY: a fresh block of `size >= 16` bytes.
        unsafe {
            p.write_volatile(1);
            p.add(size - 1).write_volatile(2);
        }
        slots.0[i] = (p as usize, size);
    }
}

fn fill(name: &str, a: &dyn GlobalAlloc, seed: u64) -> Slots {
    let mut rng = XorShift::new(seed);
    Slots(
        (0..SLOTS)
            .map(|_| {
                let size = MIN_SIZE + rng.below((MAX_SIZE - MIN_SIZE + 1) as u64) as usize;
                (alloc_retrying(name, a, layout(size)) as usize, size)
            })
            .collect(),
    )
}

fn empty(a: &dyn GlobalAlloc, slots: Slots) {
    for (p, size) in slots.0 {
        // SAFETY: every slot holds a live object of `a` of this size.
        unsafe { a.dealloc(p as *mut u8, layout(size)) };
    }
}

/// One sample: `n` ops per thread, in epochs of at most `EPOCH`, each
/// epoch on fresh threads that inherit the previous epoch's arrays
/// (rotated, so a thread also gets another thread's array).
fn sample(name: &'static str, a: Alloc, n: u64, seed: u64) -> Duration {
    let mut arrays: Vec<Slots> = (0..THREADS)
        .map(|t| fill(name, a, seed ^ t as u64))
        .collect();
    let t0 = Instant::now();
    let mut left = n;
    let mut epoch = 0u64;
    while left > 0 {
        let ops = left.min(EPOCH);
        arrays = std::thread::scope(|s| {
            let handles: Vec<_> = arrays
                .into_iter()
                .enumerate()
                .map(|(t, mut slots)| {
                    let seed = seed.wrapping_add(epoch * 131 + t as u64 * 7 + 1);
                    s.spawn(move || {
                        churn(name, a, &mut slots, ops, seed);
                        slots
                    })
                })
                .collect();
            let mut out: Vec<Slots> = handles
                .into_iter()
                .map(|h| h.join().expect("larson thread"))
                .collect();
            out.rotate_left(1);
            out
        });
        left -= ops;
        epoch += 1;
    }
    let d = t0.elapsed();
    for slots in arrays {
        empty(a, slots);
    }
    d
}

/// Measures the workload over `peers`.
pub fn run(opts: &Options, peers: &[Named<Alloc>]) -> WorkloadResult {
    let name = "larson server churn";
    progress(&format!("measuring {name}"));
    let mut ps: Vec<Peer<'_>> = peers
        .iter()
        .map(|&(pname, a)| {
            // Every peer runs the same sequence: the seed depends on the
            // sample's number only (each peer runs its samples in the same
            // order), never on the peer.
            let mut round = 0u64;
            Peer::new(pname, move |n| {
                round += 1;
                sample(pname, a, n, round * 1000)
            })
        })
        .collect();
    let mut r = measure(
        opts,
        name,
        "op (free a random slot's object, allocate 16-512 B into it), all threads",
        THREADS as u64,
        &mut ps,
    );
    r.throughput = true;
    r
}

/// A description for reports.
pub fn setup_line() -> String {
    format!(
        "larson: {THREADS} threads x {SLOTS} slots, objects {MIN_SIZE}-{MAX_SIZE} B; every {EPOCH} ops per thread the slot arrays pass to new threads (rotated)"
    )
}
