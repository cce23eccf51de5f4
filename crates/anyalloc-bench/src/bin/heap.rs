//! `heap`: object allocator cost, anyalloc `Heap` (normal and nolock paths)
//! against glibc, mimalloc and jemalloc, interleaved over several rounds.
//!
//! Every peer is called through the same `&dyn GlobalAlloc` (one dynamic
//! call per alloc and per free); anyalloc's `Heap` is wrapped in two small
//! adapters (normal path, nolock path).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyalloc::Heap;
use anyalloc_bench::ring::{Consumer, Ring};
use anyalloc_bench::{
    measure, out_of_memory, progress, spin_until, Options, Peer, Report, Target, WorkloadResult,
};

/// An allocator as every peer is seen: a shared, dynamically called
/// `GlobalAlloc`.
type Alloc = &'static (dyn GlobalAlloc + Sync);
/// A thing with its printed name.
type Named<T> = (&'static str, T);

const GLIBC: &str = "glibc";
const MIMALLOC: &str = "mimalloc";
const JEMALLOC: &str = "jemalloc";
const NORMAL: &str = "anyalloc normal";
const NOLOCK: &str = "anyalloc nolock";
const RING_ONLY: &str = "ring hand-off only";
/// The peers anyalloc's normal path is measured against.
const OTHERS: [&str; 3] = [GLIBC, MIMALLOC, JEMALLOC];

/// Objects per batch in the batch workload.
const BATCH: usize = 1000;
/// Slots of the producer/consumer ring.
const RING: usize = 256;
/// Alignment of every request (what a `Box<[u64; n]>` asks for).
const ALIGN: usize = 8;

static SYSTEM: System = System;
static MIMALLOC_A: mimalloc::MiMalloc = mimalloc::MiMalloc;
static JEMALLOC_A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod any {
    //! `anyalloc::Heap` behind the `GlobalAlloc` interface the other peers
    //! offer, one adapter per path.

    use std::alloc::{GlobalAlloc, Layout};
    use std::ptr::{null_mut, NonNull};

    use anyalloc::{Config, Heap};

    /// `Heap::alloc` / `Heap::free`.
    pub struct Normal(pub Heap);
    /// `Heap::alloc_nolock` / `Heap::free_nolock`.
    pub struct NoLock(pub Heap);

    pub fn heap() -> Heap {
        Heap::new(Config::default()).unwrap_or_else(|e| panic!("anyalloc::Heap::new: {e}"))
    }

    // SAFETY: `Heap::alloc` returns a block of at least `layout.size()`
    // bytes aligned to `layout.align()` or `None` (mapped to null), and
    // `free` takes back exactly such blocks; the layout is not needed to free.
    unsafe impl GlobalAlloc for Normal {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.0.alloc(layout).map_or(null_mut(), NonNull::as_ptr)
        }
        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            if let Some(p) = NonNull::new(ptr) {
                // SAFETY: the `GlobalAlloc` contract: `ptr` came from
                // `alloc` on this adapter, i.e. from this heap, and is dead.
                unsafe { self.0.free(p) }
            }
        }
    }

    // SAFETY: as for `Normal`, through the nolock entry points.
    unsafe impl GlobalAlloc for NoLock {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.0
                .alloc_nolock(layout)
                .map_or(null_mut(), NonNull::as_ptr)
        }
        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            if let Some(p) = NonNull::new(ptr) {
                // SAFETY: the `GlobalAlloc` contract: `ptr` came from
                // `alloc` on this adapter, i.e. from this heap, and is dead.
                unsafe { self.0.free_nolock(p) }
            }
        }
    }
}

/// The peers, and anyalloc's two heaps (for the after-run check).
fn peers() -> (Vec<Named<Alloc>>, [Named<&'static Heap>; 2]) {
    // Each path gets a heap of its own, as each other peer has its own.
    let normal: &'static any::Normal = Box::leak(Box::new(any::Normal(any::heap())));
    let nolock: &'static any::NoLock = Box::leak(Box::new(any::NoLock(any::heap())));
    let v: Vec<Named<Alloc>> = vec![
        (GLIBC, &SYSTEM),
        (MIMALLOC, &MIMALLOC_A),
        (JEMALLOC, &JEMALLOC_A),
        (NORMAL, normal),
        (NOLOCK, nolock),
    ];
    (v, [(NORMAL, &normal.0), (NOLOCK, &nolock.0)])
}

/// After the run every object must be back: a benchmark that leaked (or
/// lost frees) would have done less work than it claims.
fn check_heap(name: &str, heap: &Heap) -> String {
    heap.drain();
    let s = heap.stats();
    let line = format!(
        "after the run, {name}: {} objects / {} large in use, nolock failures busy {} empty {}, deferred frees {}",
        s.objects_in_use, s.large_in_use, s.nolock_alloc_fail_busy, s.nolock_alloc_fail_empty, s.nolock_free_deferred
    );
    if s.objects_in_use + s.large_in_use + s.huge_in_use != 0 {
        progress(&format!("WARNING: {line}"));
    }
    line
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, ALIGN).expect("object layout")
}

/// `iters` times: allocate one object and free it.
#[inline(never)]
fn pairs(name: &str, a: &dyn GlobalAlloc, layout: Layout, iters: u64) -> Duration {
    let a = black_box(a);
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { a.alloc(black_box(layout)) };
        if p.is_null() {
            out_of_memory(name, "an object");
        }
        // SAFETY: `p` was just allocated by `a` with `layout`, freed once.
        unsafe { a.dealloc(black_box(p), layout) };
    }
    t.elapsed()
}

/// `iters` times: allocate `BATCH` objects, then free them in allocation
/// order.
#[inline(never)]
fn batches(name: &str, a: &dyn GlobalAlloc, layout: Layout, iters: u64) -> Duration {
    let a = black_box(a);
    let mut held = vec![std::ptr::null_mut::<u8>(); BATCH];
    let t = Instant::now();
    for _ in 0..iters {
        for slot in held.iter_mut() {
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { a.alloc(black_box(layout)) };
            if p.is_null() {
                out_of_memory(name, "an object");
            }
            *slot = p;
        }
        for &p in black_box(&held).iter() {
            // SAFETY: each entry was allocated by `a` with `layout` in this
            // iteration and is freed exactly once.
            unsafe { a.dealloc(p, layout) };
        }
    }
    t.elapsed()
}

/// One sample of the producer/consumer workload, for the consumer thread.
struct Job {
    id: u64,
    /// `None`: the ring-only reference row (pointers are passed, not freed).
    alloc: Option<Alloc>,
    layout: Layout,
    count: u64,
}

/// The consumer thread: for each job, announce readiness, then pop and free
/// `count` objects, then announce completion.
fn consumer(
    ring: Consumer<'_, RING>,
    jobs: mpsc::Receiver<Job>,
    ready: &AtomicU64,
    done: &AtomicU64,
) {
    while let Ok(job) = jobs.recv() {
        ready.store(job.id, Ordering::Release);
        let mut left = job.count;
        let mut idle = 0u32;
        while left > 0 {
            if let Some(p) = ring.pop() {
                if let Some(a) = job.alloc {
                    // SAFETY: the producer allocated `p` with `a` and
                    // `job.layout` and handed it over through the ring; it
                    // is freed exactly once, here.
                    unsafe { a.dealloc(p, job.layout) };
                }
                left -= 1;
                idle = 0;
            } else {
                idle += 1;
                if idle.is_multiple_of(128) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        done.store(job.id, Ordering::Release);
    }
}

/// Two threads: this one allocates `size`-byte objects and pushes them
/// through a bounded SPSC ring, a consumer thread frees them. One consumer
/// thread serves every sample of every peer (allocator thread caches stay
/// warm); the clock runs from the first allocation until the consumer has
/// freed the last object. A peer `None` is the ring-only reference row: the
/// same hand-off of a dummy pointer, no allocation and no free, measured in
/// the same rounds (when the other core is busy with something else, this
/// row shows it: the hand-off alone then costs tens of ns instead of a few).
fn producer_consumer(
    opts: &Options,
    name: &str,
    op: &str,
    size: usize,
    peers: &[Named<Option<Alloc>>],
) -> WorkloadResult {
    let layout = layout(size);
    let mut ring = Box::new(Ring::<RING>::new());
    let (prod, cons) = ring.split();
    let (jobs, rx) = mpsc::channel::<Job>();
    let ready = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let next_id = std::cell::Cell::new(0u64);
    std::thread::scope(|s| {
        let (ready, done) = (&ready, &done);
        s.spawn(move || consumer(cons, rx, ready, done));
        let mut ps: Vec<Peer<'_>> = peers
            .iter()
            .map(|&(pname, alloc)| {
                let (prod, jobs, next_id) = (&prod, &jobs, &next_id);
                let run = move |n| {
                    let id = next_id.get() + 1;
                    next_id.set(id);
                    jobs.send(Job {
                        id,
                        alloc,
                        layout,
                        count: n,
                    })
                    .expect("consumer thread alive");
                    spin_until(|| ready.load(Ordering::Acquire) == id);
                    let t = Instant::now();
                    match black_box(alloc) {
                        Some(a) => {
                            for _ in 0..n {
                                // SAFETY: `layout` has a non-zero size.
                                let p = unsafe { a.alloc(black_box(layout)) };
                                if p.is_null() {
                                    out_of_memory(pname, "an object");
                                }
                                spin_until(|| prod.push(p));
                            }
                        }
                        None => {
                            let dummy = std::ptr::NonNull::<u64>::dangling().as_ptr().cast::<u8>();
                            for _ in 0..n {
                                let p = black_box(dummy);
                                spin_until(|| prod.push(p));
                            }
                        }
                    }
                    spin_until(|| done.load(Ordering::Acquire) == id);
                    t.elapsed()
                };
                if alloc.is_some() {
                    Peer::new(pname, run)
                } else {
                    Peer::reference(pname, run)
                }
            })
            .collect();
        let r = measure(opts, name, op, 1, &mut ps);
        drop(ps);
        drop(jobs);
        r
    })
}

fn main() {
    let opts = Options::from_args(
        "heap",
        "Object allocator benchmark: anyalloc Heap (normal and nolock paths) vs glibc, mimalloc, jemalloc.",
    );
    let (mut peers, heaps) = peers();
    peers.retain(|&(name, _)| opts.peer_selected(name));

    type Work = fn(&str, &dyn GlobalAlloc, Layout, u64) -> Duration;
    let mut single: Vec<(String, &str, u64, Work, usize)> = [16, 64, 256, 1024, 4096]
        .into_iter()
        .map(|size| {
            (
                format!("pair {size} B"),
                "alloc+free pair",
                1,
                pairs as Work,
                size,
            )
        })
        .collect();
    single.push((
        format!("batch {BATCH} x 64 B"),
        "alloc+free (batch: all allocs, then all frees)",
        BATCH as u64,
        batches,
        64,
    ));

    let mut results = Vec::new();
    for (name, op, ops_per_iter, work, size) in &single {
        if !opts.selected(name) || peers.is_empty() {
            continue;
        }
        progress(&format!("measuring {name}"));
        let l = layout(*size);
        let mut ps: Vec<Peer<'_>> = peers
            .iter()
            .map(|&(pname, a)| Peer::new(pname, move |n| work(pname, a, l, n)))
            .collect();
        results.push(measure(&opts, name, op, *ops_per_iter, &mut ps));
    }
    let pc = "producer/consumer 64 B";
    if opts.selected(pc) && !peers.is_empty() {
        progress(&format!("measuring {pc}"));
        let mut with: Vec<Named<Option<Alloc>>> =
            peers.iter().map(|&(n, a)| (n, Some(a))).collect();
        if opts.peer_selected(RING_ONLY) {
            with.push((RING_ONLY, None));
        }
        results.push(producer_consumer(
            &opts,
            pc,
            "object (alloc on one thread, free on the other)",
            64,
            &with,
        ));
    }

    let mut targets = Vec::new();
    for w in &results {
        let best = w.best_of(&OTHERS);
        let value = w
            .median_of(NORMAL)
            .zip(best.as_ref())
            .map(|(n, (_, b))| n / b);
        let note = best.map_or_else(String::new, |(name, _)| format!("best peer: {name}"));
        targets.push(Target::new(
            format!("normal / best peer, {}", w.name),
            value,
            1.0,
            "x",
            note,
        ));
    }
    for w in &results {
        let value = w
            .median_of(NOLOCK)
            .zip(w.median_of(NORMAL))
            .map(|(a, b)| a / b);
        targets.push(Target::new(
            format!("nolock / normal, {}", w.name),
            value,
            1.2,
            "x",
            "ratio of medians",
        ));
    }

    let mut setup = vec![
        "every peer called through &dyn GlobalAlloc; Layout align 8".to_string(),
        format!("{GLIBC}: std::alloc::System; {MIMALLOC}: mimalloc::MiMalloc; {JEMALLOC}: tikv_jemallocator::Jemalloc"),
        format!("{NORMAL}: Heap::alloc / free; {NOLOCK}: Heap::alloc_nolock / free_nolock; one Heap each, Config::default()"),
        format!(
            "producer/consumer: bounded lock-free SPSC ring of {RING} pointers, one persistent consumer thread; \
             the (ref) row is the same hand-off without allocating or freeing, in the same rounds"
        ),
    ];
    setup.extend(heaps.iter().map(|&(name, heap)| check_heap(name, heap)));
    let report = Report {
        bench: "heap".into(),
        setup,
        options: opts,
        workloads: results,
        targets,
    };
    report.print();
}
