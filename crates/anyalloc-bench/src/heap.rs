//! Workloads 1 to 3 (and the `heap` binary): alloc+free pairs by size, a
//! batch of 1000 allocations then 1000 frees (and its two phases, each
//! timed alone), and a producer/consumer pair
//! of threads, for glibc, mimalloc, jemalloc, anyalloc `Global` and
//! anyalloc `Heap` (normal and nolock paths).
//!
//! Every peer is called through the same `&dyn GlobalAlloc` (one dynamic
//! call per alloc and per free); see [`crate::peers`].

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peers::{alloc_retrying, check_heap, heap_peers, Alloc, Named, NOLOCK, NORMAL, OTHERS};
use crate::ring::{Consumer, Ring};
use crate::{
    measure, out_of_memory, progress, spin_until, Options, Peer, Report, Target, WorkloadResult,
};

/// Reference row of the producer/consumer workload.
pub const RING_ONLY: &str = "ring hand-off only";
/// Reference row of the pairs and the batch: the same loop calling an
/// allocator that does nothing (the private `CallsOnly`).
pub const CALLS_ONLY: &str = "reference: calls only";

/// What the [`CALLS_ONLY`] row is, for the reports' set-up lines.
pub const CALLS_ONLY_SETUP: &str = "pairs and batch: the (ref) row `reference: calls only` is the same loop \
     calling an allocator that does nothing (its figure is the loop's and the calls' share of every row)";

/// The allocator of the [`CALLS_ONLY`] row: `alloc` returns a dangling,
/// aligned pointer that is never dereferenced, `dealloc` returns at once.
/// Called through `&dyn GlobalAlloc` like every peer, it measures what the
/// loop and the two dynamic calls per alloc+free cost without any
/// allocator, so that each peer's own cost is visible as its figure minus
/// this one (out-of-order execution overlaps the two, so the difference is
/// an estimate, not an exact split). Private to this module: it does not
/// hand out memory, so it must never serve a caller that uses the block.
struct CallsOnly;

// SAFETY: this impl does not meet `GlobalAlloc`'s contract (there is no
// memory behind the pointer it returns). It holds for the only callers,
// `pairs` and `batches` through `run_single`, which never dereference a
// block and only pass it back to `dealloc`; the type is private so that
// nothing else can call it.
unsafe impl GlobalAlloc for CallsOnly {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // A non-null pointer aligned to `layout` (no memory behind it).
        std::ptr::without_provenance_mut(layout.align())
    }
    #[inline(never)]
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

/// Objects per batch in the batch workload.
pub const BATCH: usize = 1000;
/// Slots of the producer/consumer ring.
const RING: usize = 256;
/// Alignment of every request (what a `Box<[u64; n]>` asks for).
const ALIGN: usize = 8;
/// The largest request `Heap::alloc_nolock` serves (`MAX_ORDER`: 4 MiB).
pub const NOLOCK_MAX_BYTES: usize = anyalloc::PAGE_SIZE << anyalloc::MAX_ORDER;

pub fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, ALIGN).expect("object layout")
}

/// `iters` times: allocate one object and free it.
#[inline(never)]
pub fn pairs(name: &str, a: &dyn GlobalAlloc, layout: Layout, iters: u64) -> Duration {
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

/// The batch's alloc phase: fills `held` with objects of `layout`.
#[inline(always)]
fn alloc_batch(name: &str, a: &dyn GlobalAlloc, layout: Layout, held: &mut [*mut u8]) {
    for slot in held.iter_mut() {
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { a.alloc(black_box(layout)) };
        if p.is_null() {
            out_of_memory(name, "an object");
        }
        *slot = p;
    }
}

/// The batch's free phase: frees `held` (filled by `alloc_batch` with
/// `layout`) in allocation order.
#[inline(always)]
fn free_batch(a: &dyn GlobalAlloc, layout: Layout, held: &[*mut u8]) {
    for &p in black_box(held).iter() {
        // SAFETY: each entry was allocated by `a` with `layout` in this
        // iteration and is freed exactly once.
        unsafe { a.dealloc(p, layout) };
    }
}

/// `iters` times: allocate `BATCH` objects, then free them in allocation
/// order.
#[inline(never)]
pub fn batches(name: &str, a: &dyn GlobalAlloc, layout: Layout, iters: u64) -> Duration {
    batches_of::<BATCH>(name, a, layout, iters)
}

/// `iters` times: allocate `N` objects, then free them in allocation order
/// (the batch's loop with another count).
#[inline(never)]
fn batches_of<const N: usize>(
    name: &str,
    a: &dyn GlobalAlloc,
    layout: Layout,
    iters: u64,
) -> Duration {
    let a = black_box(a);
    let mut held = vec![std::ptr::null_mut::<u8>(); N];
    let t = Instant::now();
    for _ in 0..iters {
        alloc_batch(name, a, layout, &mut held);
        free_batch(a, layout, &held);
    }
    t.elapsed()
}

/// The batch workload with one of its two phases timed: `iters` times,
/// allocate `BATCH` objects, then free them in allocation order (as
/// [`batches`]), adding up only the time of the allocations (`FREES`
/// false) or only that of the frees (`FREES` true). The clock is read
/// three times per batch, outside both phases' loops.
#[inline(never)]
fn batch_phase<const FREES: bool>(
    name: &str,
    a: &dyn GlobalAlloc,
    layout: Layout,
    iters: u64,
) -> Duration {
    let a = black_box(a);
    let mut held = vec![std::ptr::null_mut::<u8>(); BATCH];
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        alloc_batch(name, a, layout, &mut held);
        let middle = Instant::now();
        free_batch(a, layout, &held);
        let end = Instant::now();
        timed += if FREES { end - middle } else { middle - start };
    }
    timed
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
pub fn producer_consumer(
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
                                let p = alloc_retrying(pname, a, black_box(layout));
                                spin_until(|| prod.push(p));
                            }
                            prod.flush();
                        }
                        None => {
                            let dummy = std::ptr::NonNull::<u64>::dangling().as_ptr().cast::<u8>();
                            for _ in 0..n {
                                let p = black_box(dummy);
                                spin_until(|| prod.push(p));
                            }
                            prod.flush();
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

/// One workload measured over `peers` (name, op, ops per iteration, the
/// loop, the object size).
pub type Single = (String, &'static str, u64, Work, usize);
/// A single-threaded loop: peer name, allocator, layout, iterations.
pub type Work = fn(&str, &dyn GlobalAlloc, Layout, u64) -> Duration;

/// The pair workload for `size` bytes.
pub fn pair_workload(size: usize) -> Single {
    (
        format!("pair {}", crate::fmt_bytes(size)),
        "alloc+free pair",
        1,
        pairs as Work,
        size,
    )
}

/// The batch workload (`BATCH` x `size` bytes).
pub fn batch_workload(size: usize) -> Single {
    (
        format!("batch {BATCH} x {}", crate::fmt_bytes(size)),
        "alloc+free (batch: all allocs, then all frees)",
        BATCH as u64,
        batches as Work,
        size,
    )
}

/// The op of the batch's alloc phase ([`batch_phase_workloads`]).
const ALLOC_PHASE_OP: &str = "alloc (the batch's alloc phase alone)";
/// The op of the batch's free phase ([`batch_phase_workloads`]).
const FREE_PHASE_OP: &str = "free (the batch's free phase alone)";

/// The batch workload's two phases, each timed alone (`BATCH` x `size`
/// bytes, the same loop as [`batch_workload`]): where a batch's time goes,
/// per allocator. Informational: they carry no targets ([`targets`]), and
/// their names do not contain the batch's (a filter that selects the batch
/// selects only it).
pub fn batch_phase_workloads(size: usize) -> [Single; 2] {
    let of = format!("{BATCH} x {}", crate::fmt_bytes(size));
    [
        (
            format!("alloc phase, {of}"),
            ALLOC_PHASE_OP,
            BATCH as u64,
            batch_phase::<false> as Work,
            size,
        ),
        (
            format!("free phase, {of}"),
            FREE_PHASE_OP,
            BATCH as u64,
            batch_phase::<true> as Work,
            size,
        ),
    ]
}

/// Whether `w` is one of the batch's phases (informational, no targets).
pub fn is_batch_phase(w: &WorkloadResult) -> bool {
    w.op == ALLOC_PHASE_OP || w.op == FREE_PHASE_OP
}

/// The op of the working-set workloads ([`working_set_workloads`]).
const WORKING_SET_OP: &str = "alloc+free (all allocs, then all frees)";

/// The batch's loop with other counts and sizes (informational, no
/// targets): how each allocator's time per object moves with what a batch
/// holds live, from 200 objects (13 KiB) to 40,000 (2.5 MiB). anyalloc's
/// run through its sheaves and barn up to about 1 MiB per class (see
/// `ClassStats::barn_capacity`), and beyond it through the slabs. Their
/// names do not contain the batch's, so a filter that selects the batch
/// selects only it.
pub fn working_set_workloads() -> [Single; 5] {
    fn w(n: usize, size: usize, work: Work) -> Single {
        (
            format!("working set {n} x {}", crate::fmt_bytes(size)),
            WORKING_SET_OP,
            n as u64,
            work,
            size,
        )
    }
    [
        w(200, 64, batches_of::<200> as Work),
        w(10_000, 64, batches_of::<10_000> as Work),
        w(40_000, 64, batches_of::<40_000> as Work),
        w(4000, 256, batches_of::<4000> as Work),
        w(1000, 1024, batches_of::<1000> as Work),
    ]
}

/// Whether `w` is one of the working-set workloads (informational).
pub fn is_working_set(w: &WorkloadResult) -> bool {
    w.op == WORKING_SET_OP
}

/// What the working-set workloads are, for the reports' set-up lines.
pub const WORKING_SETS_SETUP: &str = "working sets (informational, no targets): the batch's loop \
     (n allocations, then their frees in allocation order) with other counts and sizes, from 200 x 64 B \
     (13 KiB live) to 40000 x 64 B (2.5 MiB), ns per alloc+free";

/// What the batch phases are, for the reports' set-up lines.
pub const PHASES_SETUP: &str = "batch phases (informational, no targets): the batch's loop with only its \
     alloc phase or only its free phase timed (the clock read between the phases), ns per alloc or per free";

/// Measures one single-threaded workload over `peers`; the nolock peer
/// sits out requests beyond what its path serves.
pub fn run_single(opts: &Options, w: &Single, peers: &[Named<Alloc>]) -> WorkloadResult {
    let (name, op, ops_per_iter, work, size) = w;
    progress(&format!("measuring {name}"));
    let l = layout(*size);
    let work = *work;
    let mut ps: Vec<Peer<'_>> = peers
        .iter()
        .filter(|&&(pname, _)| pname != NOLOCK || *size <= NOLOCK_MAX_BYTES)
        .map(|&(pname, a)| Peer::new(pname, move |n| work(pname, a, l, n)))
        .collect();
    if opts.peer_selected(CALLS_ONLY) {
        ps.push(Peer::reference(CALLS_ONLY, move |n| {
            work(CALLS_ONLY, &CallsOnly, l, n)
        }));
    }
    measure(opts, name, op, *ops_per_iter, &mut ps)
}

/// The producer/consumer workload over `peers` plus the ring-only
/// reference row.
pub fn run_producer_consumer(opts: &Options, peers: &[Named<Alloc>]) -> WorkloadResult {
    let pc = "producer/consumer 64 B";
    progress(&format!("measuring {pc}"));
    let mut with: Vec<Named<Option<Alloc>>> = peers.iter().map(|&(n, a)| (n, Some(a))).collect();
    if opts.peer_selected(RING_ONLY) {
        with.push((RING_ONLY, None));
    }
    producer_consumer(
        opts,
        pc,
        "object (alloc on one thread, free on the other)",
        64,
        &with,
    )
}

/// `normal / best of glibc, mimalloc, jemalloc <= 1.0` (and the same for
/// `Global` when it took part) and `nolock / normal <= 1.1` for each
/// workload but the batch's phases and the working sets (informational).
pub fn targets(results: &[WorkloadResult]) -> Vec<Target> {
    let mut targets = Vec::new();
    let results: Vec<&WorkloadResult> = results
        .iter()
        .filter(|w| !is_batch_phase(w) && !is_working_set(w))
        .collect();
    for &w in &results {
        let best = w.best_of(&OTHERS);
        for who in [NORMAL, crate::peers::GLOBAL] {
            if who == crate::peers::GLOBAL && w.median_of(who).is_none() {
                continue;
            }
            let value = w.median_of(who).zip(best.as_ref()).map(|(n, (_, b))| n / b);
            let note = best
                .as_ref()
                .map_or_else(String::new, |(name, _)| format!("best peer: {name}"));
            let short = if who == NORMAL { "normal" } else { "Global" };
            targets.push(Target::new(
                format!("{short} / best peer, {}", w.name),
                value,
                1.0,
                "x",
                note,
            ));
        }
    }
    for &w in &results {
        let value = w
            .median_of(NOLOCK)
            .zip(w.median_of(NORMAL))
            .map(|(a, b)| a / b);
        let note = if w.median_of(NOLOCK).is_none() && w.median_of(NORMAL).is_some() {
            "the nolock path serves at most 4 MiB".to_string()
        } else {
            "ratio of medians".to_string()
        };
        targets.push(Target::new(
            format!("nolock / normal, {}", w.name),
            value,
            1.1,
            "x",
            note,
        ));
    }
    targets
}

/// A description of the producer/consumer workload for reports.
pub fn producer_consumer_setup_line() -> String {
    format!(
        "producer/consumer: bounded lock-free SPSC ring of {RING} pointers, both ends publishing in groups of {}, \
         one persistent consumer thread; the (ref) row is the same hand-off without allocating or freeing, in the same rounds",
        Ring::<RING>::GROUP
    )
}

/// The `heap` binary: pairs of 16 B to 4 KiB, a batch and the
/// producer/consumer workload, printed as tables (or `--json`).
pub fn bin_main() {
    let opts = Options::from_args(
        "heap",
        "Object allocator benchmark: anyalloc Heap (normal and nolock paths) vs glibc, mimalloc, jemalloc.",
    );
    let hp = heap_peers(false);
    let mut peers = hp.peers;
    peers.retain(|&(name, _)| opts.peer_selected(name));

    let mut single: Vec<Single> = [16, 64, 256, 1024, 4096]
        .into_iter()
        .map(pair_workload)
        .collect();
    single.push(batch_workload(64));
    single.extend(batch_phase_workloads(64));

    let mut results = Vec::new();
    for w in &single {
        if opts.selected(&w.0) && !peers.is_empty() {
            results.push(run_single(&opts, w, &peers));
        }
    }
    if opts.selected("producer/consumer 64 B") && !peers.is_empty() {
        results.push(run_producer_consumer(&opts, &peers));
    }
    let targets = targets(&results);
    let mut setup = vec![
        "every peer called through &dyn GlobalAlloc; Layout align 8".to_string(),
        format!("{}: std::alloc::System; {}: mimalloc::MiMalloc; {}: tikv_jemallocator::Jemalloc",
            crate::peers::GLIBC, crate::peers::MIMALLOC, crate::peers::JEMALLOC),
        format!("{NORMAL}: Heap::alloc / free_sized; {NOLOCK}: Heap::alloc_nolock / free_nolock_sized; one Heap each, Config::default()"),
        producer_consumer_setup_line(),
        CALLS_ONLY_SETUP.to_string(),
        PHASES_SETUP.to_string(),
    ];
    setup.extend(
        hp.heaps
            .iter()
            .map(|&(name, heap)| check_heap(name, heap).0),
    );
    let report = Report {
        bench: "heap".into(),
        setup,
        options: opts,
        workloads: results,
        targets,
    };
    report.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--quick` with 1 ms samples.
    fn quick() -> Options {
        Options::parse(&["--quick".into(), "--sample-ms".into(), "1".into()])
            .expect("options")
            .expect("not --help")
    }

    /// The pairs and the batch carry the calls-only row: measured in every
    /// round, marked as a reference, never the best. (No timing is
    /// asserted: the figures are the benchmark's to print.)
    #[test]
    fn pairs_and_batch_carry_the_calls_only_reference() {
        let opts = quick();
        let peers: Vec<Named<Alloc>> = vec![("glibc", &std::alloc::System)];
        for w in [pair_workload(64), batch_workload(64)] {
            let r = run_single(&opts, &w, &peers);
            let glibc = r
                .peers
                .iter()
                .find(|p| p.name == "glibc")
                .expect("glibc row");
            let calls = r
                .peers
                .iter()
                .find(|p| p.name == CALLS_ONLY)
                .expect("reference row");
            assert!(calls.reference && !glibc.reference);
            assert_eq!(
                glibc.vs_best, 1.0,
                "{}: the reference was taken as the best",
                w.0
            );
            assert_eq!(
                calls.samples.len(),
                glibc.samples.len(),
                "{}: not in every round",
                w.0
            );
            assert!(
                calls.summary.median > 0.0,
                "{}: the reference was not timed",
                w.0
            );
        }
    }

    /// A phase workload runs the whole batch (every object allocated and
    /// freed once per iteration, as the batch does), times a part of it,
    /// and carries no targets; a filter that selects the batch by name
    /// does not select the phases.
    #[test]
    fn batch_phases_run_the_whole_batch_and_carry_no_targets() {
        let batch = batch_workload(64);
        for w in batch_phase_workloads(64) {
            assert!(!w.0.contains(&batch.0), "{} selects with the batch", w.0);
            let c = Counting::new();
            let t = Instant::now();
            let phase = (w.3)("counting", &c, layout(w.4), 3);
            assert!(phase <= t.elapsed(), "{}: more than the whole run", w.0);
            assert_eq!(c.allocs.load(Ordering::Relaxed), 3 * BATCH, "{}", w.0);
            assert_eq!(c.frees.load(Ordering::Relaxed), 3 * BATCH, "{}", w.0);

            let opts = quick();
            let peers: Vec<Named<Alloc>> = vec![("glibc", &std::alloc::System)];
            let r = run_single(&opts, &w, &peers);
            assert!(is_batch_phase(&r), "{}", w.0);
            assert!(targets(std::slice::from_ref(&r)).is_empty(), "{}", w.0);
            assert!(r.median_of("glibc").is_some_and(|ns| ns > 0.0), "{}", w.0);
        }
        let r = run_single(&quick(), &batch, &[("glibc", &std::alloc::System)]);
        assert!(!is_batch_phase(&r));
    }

    /// `System`, counting the calls.
    struct Counting {
        allocs: std::sync::atomic::AtomicUsize,
        frees: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        fn new() -> Self {
            Counting {
                allocs: 0.into(),
                frees: 0.into(),
            }
        }
    }

    // SAFETY: forwards to `System`, counting the calls.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            self.allocs.fetch_add(1, Ordering::Relaxed);
            // SAFETY: forwarded contract.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            self.frees.fetch_add(1, Ordering::Relaxed);
            // SAFETY: forwarded contract.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    /// A working set allocates and frees as many objects per iteration as
    /// its count says, of its size, and carries no targets; a filter that
    /// selects the batch by name selects none of them.
    #[test]
    fn working_sets_run_their_counts_and_carry_no_targets() {
        let batch = batch_workload(64);
        let sets = working_set_workloads();
        for w in &sets {
            assert!(!w.0.contains(&batch.0), "{} selects with the batch", w.0);
            assert!(
                w.0.contains(&format!("{} x {}", w.2, crate::fmt_bytes(w.4))),
                "{}: the name says another count or size",
                w.0
            );
            let c = Counting::new();
            (w.3)("counting", &c, layout(w.4), 2);
            assert_eq!(
                c.allocs.load(Ordering::Relaxed),
                2 * w.2 as usize,
                "{}",
                w.0
            );
            assert_eq!(c.frees.load(Ordering::Relaxed), 2 * w.2 as usize, "{}", w.0);
        }
        let peers: Vec<Named<Alloc>> = vec![("glibc", &std::alloc::System)];
        let r = run_single(&quick(), &sets[0], &peers);
        assert!(is_working_set(&r), "{}", sets[0].0);
        assert!(targets(std::slice::from_ref(&r)).is_empty());
        assert!(r.median_of("glibc").is_some_and(|ns| ns > 0.0));
    }

    /// The set-up line names the row as the tables print it.
    #[test]
    fn the_setup_line_names_the_row() {
        assert!(CALLS_ONLY_SETUP.contains(&format!("`{CALLS_ONLY}`")));
    }

    /// `--peer` leaves the reference out when it does not match it.
    #[test]
    fn the_reference_row_follows_the_peer_filter() {
        let opts = Options::parse(&[
            "--quick".into(),
            "--sample-ms".into(),
            "1".into(),
            "--peer".into(),
            "glibc".into(),
        ])
        .expect("options")
        .expect("not --help");
        let peers: Vec<Named<Alloc>> = vec![("glibc", &std::alloc::System)];
        let r = run_single(&opts, &pair_workload(16), &peers);
        assert!(r.peers.iter().all(|p| p.name != CALLS_ONLY));
    }
}
