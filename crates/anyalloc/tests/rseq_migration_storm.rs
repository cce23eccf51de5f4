//! The rseq fast path and its stop protocol under constant migration.
//!
//! Worker threads flip their affinity between the allowed CPUs every few
//! operations (so the CPU id read by a sequence, the slot a slow path's
//! lock sequence takes and the CPU the thread ends up on keep differing)
//! while they allocate and free on the normal and the nolock path, hand
//! objects to each other, and take signals whose handlers allocate and
//! free with the nolock path. Meanwhile another thread, itself flipping
//! between the CPUs, drains and runs maintenance passes in a loop (remote
//! slot takes: a fence per level-0 slot), sends the signals and takes the
//! workers' (handlers interrupt `drain` and `maintain` too).
//!
//! Three rounds: the default configuration (the rseq fast path where it
//! is available); the same with membarrier denied to the draining thread
//! (its fences fall back to running on the target CPU); one slot set for
//! every CPU (`cpus(1)`, as `ANYALLOC_CPUS=1`: CPU ids share slots, which
//! rules rseq out).
//!
//! Every object carries a unique tag in its first and last word, checked
//! when it is freed: two owners of one object break it. At the end
//! everything is freed and drained: nothing in use, every page free, the
//! page allocator's invariants intact, and the heap's count of nolock
//! allocations equal to the successes the test saw.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod cpus;
mod seccomp;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use anyalloc::{Config, Heap};
use cpus::{allowed_cpus, pin};

const SIZES: [usize; 8] = [16, 24, 64, 200, 1024, 4096, 16 << 10, 64 << 10];
const WORKERS: usize = 3;
const OPS: usize = 60_000;
const LIVE: usize = 64;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static TAG: AtomicU64 = AtomicU64::new(1);
static VIOLATIONS: AtomicUsize = AtomicUsize::new(0);
static HANDLER_OK: AtomicUsize = AtomicUsize::new(0);
/// Nolock allocations that succeeded (the heap's count must agree).
static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
/// Objects handed from one worker to the next (0: empty cell).
static HANDOFF: [AtomicUsize; WORKERS] = [const { AtomicUsize::new(0) }; WORKERS];
/// The draining thread's id while it runs (0: none): the workers signal it
/// too, so handlers also interrupt `drain` and `maintain`.
static DRAINER: AtomicU64 = AtomicU64::new(0);

fn heap() -> &'static Heap {
    // SAFETY: set before any thread or handler runs, leaked, never freed.
    unsafe { &*HEAP.load(Ordering::Acquire) }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Writes a fresh tag into `p` (of `size` bytes); returns the packed handle.
fn tag(p: NonNull<u8>, size_idx: usize) -> usize {
    let size = SIZES[size_idx];
    let t = TAG.fetch_add(1, Ordering::Relaxed) << 4 | size_idx as u64;
    // SAFETY: `p` is a live object of at least `size` bytes, ours alone.
    unsafe {
        (p.as_ptr() as *mut u64).write(t);
        (p.as_ptr().add(size - 8) as *mut u64).write(!t);
    }
    p.as_ptr() as usize
}

/// Checks the tag of a handle from `tag`; returns its size index.
fn check(h: usize) -> usize {
    let p = h as *const u8;
    // SAFETY: `h` is a live tagged object, ours alone.
    unsafe {
        let t = (p as *const u64).read();
        let size_idx = (t & 15) as usize;
        if size_idx >= SIZES.len() || (p.add(SIZES[size_idx] - 8) as *const u64).read() != !t {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        size_idx
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    let h = heap();
    let mut held = [0usize; 4];
    for (i, slot) in held.iter_mut().enumerate() {
        let si = (i * 3 + SIGNALS.load(Ordering::Relaxed)) % SIZES.len();
        if let Some(p) = h.alloc_nolock(layout(SIZES[si])) {
            *slot = tag(p, si);
            HANDLER_OK.fetch_add(1, Ordering::Relaxed);
            NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
        }
    }
    for &o in held.iter().filter(|&&o| o != 0) {
        check(o);
        // SAFETY: a live object of this heap, freed once.
        unsafe { h.free_nolock(NonNull::new(o as *mut u8).unwrap()) };
    }
}

fn free(h: &Heap, o: usize, nolock: bool) {
    check(o);
    let p = NonNull::new(o as *mut u8).unwrap();
    // SAFETY: a live object of this heap, freed once.
    unsafe {
        if nolock {
            h.free_nolock(p)
        } else {
            h.free(p)
        }
    }
}

fn worker(id: usize, cpus: &[usize]) {
    let h = heap();
    let mut live = [0usize; LIVE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    for op in 0..OPS {
        if op % 8 == 0 {
            pin(cpus[(op / 8 + id) % cpus.len()]);
        }
        if op % 64 == 0 {
            let d = DRAINER.load(Ordering::Acquire);
            if d != 0 {
                SIGNALS.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the drainer runs until every worker finished
                // its operations.
                unsafe { libc::pthread_kill(d as libc::pthread_t, libc::SIGUSR1) };
            }
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x >> 8) as usize % LIVE;
        let nolock = x & 3 == 0;
        if live[i] != 0 {
            let o = std::mem::take(&mut live[i]);
            if x & 16 != 0 {
                // Hand it to the next worker (who frees it), or free it here.
                let cell = &HANDOFF[(id + 1) % WORKERS];
                match cell.compare_exchange(0, o, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => {}
                    Err(_) => free(h, o, nolock),
                }
            } else {
                free(h, o, nolock);
            }
        }
        let mine = HANDOFF[id].swap(0, Ordering::AcqRel);
        if mine != 0 {
            free(h, mine, !nolock);
        }
        let si = (x >> 40) as usize % SIZES.len();
        let p = if nolock {
            let p = h.alloc_nolock(layout(SIZES[si]));
            if p.is_some() {
                NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            }
            p
        } else {
            Some(h.alloc(layout(SIZES[si])).expect("normal allocation"))
        };
        if let Some(p) = p {
            live[i] = tag(p, si);
        }
    }
    for o in live.into_iter().filter(|&o| o != 0) {
        free(h, o, false);
    }
}

/// The three rounds (see the module documentation), in one test: the
/// handler finds its heap in a static.
#[test]
fn migrating_threads_with_concurrent_drain_and_signals() {
    storm(Config::default().memory(256 << 20), false);
    // The draining thread without membarrier (a seccomp filter): its
    // remote takes stop a CPU's sequences by running there once.
    storm(Config::default().memory(256 << 20), true);
    storm(Config::default().memory(256 << 20).cpus(1), false);
}

/// From now on `membarrier` fails with EPERM for the calling thread.
fn deny_membarrier() {
    seccomp::filter_syscall(
        libc::SYS_membarrier,
        seccomp::ERRNO | libc::EPERM as u32,
        seccomp::ALLOW,
    );
    // SAFETY: membarrier takes plain integers.
    assert_eq!(unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) }, -1);
}

fn storm(config: Config, no_membarrier: bool) {
    let cpus = allowed_cpus();
    let heap = Box::leak(Box::new(Heap::new(config).unwrap()));
    HEAP.store(heap, Ordering::Release);
    NOLOCK_OK.store(0, Ordering::Relaxed);
    println!(
        "fast path {:?}, cpus {cpus:?}, membarrier denied to the drainer: {no_membarrier}",
        heap.stats().fast_path
    );
    // SAFETY: installing a plain handler for SIGUSR1.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    // Thread lifetimes, so that no signal is sent to a thread that ended:
    // the workers stay alive (idle) until the drainer, which signals them,
    // has stopped; the drainer, which the workers signal, stops only after
    // every worker has finished its operations.
    let finished = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let drainer_done = AtomicBool::new(false);
    let tids: Vec<AtomicU64> = (0..WORKERS).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for id in 0..WORKERS {
            let (cpus, tids, finished, drainer_done) = (&cpus, &tids, &finished, &drainer_done);
            s.spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tids[id].store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
                worker(id, cpus);
                finished.fetch_add(1, Ordering::AcqRel);
                while !drainer_done.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
            });
        }
        s.spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            DRAINER.store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
            if no_membarrier {
                deny_membarrier();
            }
            let mut n = 0usize;
            while !done.load(Ordering::Acquire) {
                n += 1;
                pin(cpus[n % cpus.len()]);
                if n.is_multiple_of(2) {
                    heap.drain();
                } else {
                    heap.maintain();
                }
                for t in &tids {
                    let t = t.load(Ordering::Acquire);
                    if t != 0 {
                        SIGNALS.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: a worker of this scope, alive until this
                        // thread is done.
                        unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
                    }
                }
            }
            DRAINER.store(0, Ordering::Release);
            drainer_done.store(true, Ordering::Release);
        });
        while finished.load(Ordering::Acquire) < WORKERS {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        done.store(true, Ordering::Release);
    });
    for c in &HANDOFF {
        let o = c.swap(0, Ordering::AcqRel);
        if o != 0 {
            free(heap, o, false);
        }
    }
    heap.drain();
    let s = heap.stats();
    let p = heap.pages().stats();
    println!(
        "signals {} handler allocations {} violations {} nolock ok {} busy {} empty {}",
        SIGNALS.load(Ordering::Relaxed),
        HANDLER_OK.load(Ordering::Relaxed),
        VIOLATIONS.load(Ordering::Relaxed),
        s.nolock_alloc_ok,
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty
    );
    assert_eq!(
        VIOLATIONS.load(Ordering::Relaxed),
        0,
        "an object had two owners"
    );
    assert_eq!(
        s.nolock_alloc_ok,
        NOLOCK_OK.load(Ordering::Relaxed),
        "the heap's count of nolock allocations"
    );
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.large_in_use, 0);
    for c in &s.classes {
        assert_eq!(
            (c.cached_in_sheaves, c.cached_in_barn, c.deferred, c.slabs),
            (0, 0, 0, 0),
            "class {} holds memory after drain",
            c.size
        );
    }
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(heap.pages().check_invariants(), Ok(()));
}
