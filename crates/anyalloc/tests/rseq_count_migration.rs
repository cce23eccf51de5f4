//! The heap's count of nolock allocations stays exact while threads are
//! moved between CPUs in the middle of their counting pops.
//!
//! A counting pop (`sync::rseq::sheaf_pop` with its count) adds 1 to its
//! slot's counter with a plain `add` before its commit, and when it is
//! aborted after that add, takes the count back. The take-back used to be
//! a locked subtraction from the pop's slot, from whatever CPU the thread
//! had been moved to: the slot's CPU may be running counting pops at that
//! very moment, whose plain `add` is not atomic with it, and the
//! subtraction was lost: the heap counted 1 or 2 more nolock allocations
//! than were made, in 4 of 6 runs of this test on a 2-CPU machine. Now the
//! take-back runs as a sequence of its own on the CPU the thread runs on,
//! from that CPU's slot (and a slot holder's count is a locked add).
//!
//! Four threads allocate and free 16-byte objects on the nolock path
//! (every allocation from the fast path's counting pop, mostly) and count
//! their successes, while another thread moves each of them to the other
//! CPU, round after round (`sched_setaffinity` on a running thread: the
//! kernel aborts whatever sequence it was in). The heap's count must equal
//! theirs. The rounds are counted, not timed: the test never passes or
//! fails by the clock, though a lost take-back is only likely, not sure,
//! to happen in one run.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod cpus;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyalloc::{Config, Heap};
use cpus::allowed_cpus;

const THREADS: usize = 4;
const ROUNDS: usize = 5_000;

/// Moves thread `tid` to `cpu` (and only there).
fn move_to(tid: libc::pid_t, cpu: usize) {
    // SAFETY: a valid set of one CPU, for a thread of this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn nolock_count_is_exact_while_threads_migrate() {
    let cpus = allowed_cpus();
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    println!("fast path {:?}, cpus {cpus:?}", heap.stats().fast_path);
    let l = Layout::from_size_align(16, 8).unwrap();
    let ok = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let tids: Vec<AtomicU64> = (0..THREADS).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for tid in &tids {
            let (heap, ok, stop) = (&heap, &ok, &stop);
            s.spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() } as u64, Ordering::Release);
                let mut n = 0u64;
                let mut held = [None::<NonNull<u8>>; 8];
                while !stop.load(Ordering::Relaxed) {
                    for h in held.iter_mut() {
                        *h = heap.alloc_nolock(l);
                        n += h.is_some() as u64;
                    }
                    for p in held.iter_mut().filter_map(Option::take) {
                        // SAFETY: allocated above, freed once.
                        unsafe { heap.free_nolock(p) };
                    }
                }
                ok.fetch_add(n, Ordering::Relaxed);
            });
        }
        s.spawn(|| {
            for round in 0..ROUNDS {
                for (i, tid) in tids.iter().enumerate() {
                    let tid = tid.load(Ordering::Acquire);
                    if tid != 0 {
                        move_to(tid as libc::pid_t, cpus[(round + i) % cpus.len()]);
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    let counted = heap.stats().nolock_alloc_ok;
    let made = ok.load(Ordering::Relaxed);
    println!("nolock allocations: {made} made, {counted} counted");
    assert_eq!(counted, made, "the heap miscounted its nolock allocations");
}
