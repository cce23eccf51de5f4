//! Workload 7: allocation bursts from signal handlers, with memory use.
//!
//! Each allocator runs in a child process of its own (so RSS figures are not
//! mixed). `THREADS` worker threads churn (a set of 256 objects of 16 B to
//! 1 KiB, replaced at random: on the anyalloc heap's normal path for the
//! anyalloc rows, on glibc for the pools, whose programs would use the
//! kernel's normal allocator for everything else). Each worker has a POSIX
//! timer; its handler first frees the burst that the previous invocation
//! left (this is "later"), then allocates a new burst of `1..=10_000`
//! objects of `OBJECT` bytes (log-uniform: as many bursts of 1-9 as of
//! 1000-10000) and keeps it. Every attempt counts: success rate overall and
//! per burst-size decade.
//!
//! Memory: RSS (`/proc/self/statm`) before the allocator exists (`base`:
//! the harness is set up by then, the worker threads run and have touched
//! their own bookkeeping, the burst stash among it, so that what RSS gains
//! from here is the allocator's doing and not the harness's), after it is
//! set up (`before`), the largest sampled during the storm
//! (every 5 ms: `peak`), right after every burst and churn object is freed
//! (`freed`) and 2 s later (`after`: anyalloc's maintainer returns idle
//! memory to the OS after about a second). For anyalloc also after an
//! explicit `Heap::drain()` and another 1.5 s (`drained`: whether the
//! memory can go back at all). Live data is counted exactly (bursts and
//! churn objects; its peak too).
//!
//! Allocators: anyalloc `Heap::alloc_nolock`/`free_nolock` with and without
//! the maintenance thread (`Config::maintenance`), the two baselines of
//! [`crate::pools`]: the per-CPU watermark pool and the preallocated pool
//! (sized for the maximum: `THREADS x 10_000` objects), and glibc with every
//! signal blocked around each call, threads and handlers alike (what a
//! careful glibc user does; correct by construction).
//!
//! Every byte of every burst object is filled with a pattern keyed by its
//! address and a per-allocation nonce kept with it, and read back before it
//! is freed: a changed block is counted (`corrupted`) and not freed. The
//! handlers time themselves: `handler_ns_per_alloc` is the handler time
//! (free the previous burst with its checks, allocate and fill the new
//! one) per allocation attempt. The maintainer thread's CPU time during the
//! storm is reported for the anyalloc row that has one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};
use serde_json::{json, Value};

use crate::peers::SIGMASKED_GLIBC;
use crate::pools::{PreallocPool, WatermarkPool};
use crate::sys;
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::signal::timer_signal;
use anyalloc_storm::thread::now_ns;
use anyalloc_storm::{install_handler, mask, ErrnoGuard, Stash, ThreadTimer, XorShift};

/// Bytes per burst object (the watermark pool's 32/96 marks apply up to
/// 256 B).
pub const OBJECT: usize = 256;
/// The largest burst.
pub const MAX_BURST: usize = 10_000;
/// At most this many worker threads.
const MAX_THREADS: usize = 8;
/// Objects each worker keeps while it churns.
const CHURN: usize = 256;
/// Burst-size decades: 1-9, 10-99, 100-999, 1000-10000.
pub const BUCKETS: [&str; 4] = ["1-9", "10-99", "100-999", "1000-10000"];
/// Seconds to wait after everything is freed before the last RSS reading.
pub const SETTLE_S: u64 = 2;

/// anyalloc rows: after `Heap::drain()`, wait this long before the last
/// reading (`rss_drained`).
pub const DRAIN_SETTLE_MS: u64 = 1500;

/// The allocators, as (child key, printed name).
pub const PEERS: [(&str, &str); 5] = [
    ("anyalloc-maint", "anyalloc nolock, maintainer on"),
    ("anyalloc-nomaint", "anyalloc nolock, maintainer off"),
    ("watermark", "baseline: per-CPU watermark pool"),
    ("prealloc", "baseline: preallocated pool"),
    ("glibc-sigmask", "careful: glibc, signals blocked per call"),
];

/// What the handlers allocate from.
enum Source {
    Heap(&'static Heap),
    Watermark(&'static WatermarkPool),
    Prealloc(&'static PreallocPool),
    /// glibc, every signal blocked around each call.
    Masked,
}

#[inline]
fn object_layout() -> Layout {
    // SAFETY: OBJECT is a valid size with alignment 8.
    unsafe { Layout::from_size_align_unchecked(OBJECT, 8) }
}

impl Source {
    #[inline]
    fn alloc(&self) -> Option<*mut u8> {
        match self {
            // SAFETY: OBJECT is a valid size with alignment 8.
            Source::Heap(h) => h
                .alloc_nolock(unsafe { Layout::from_size_align_unchecked(OBJECT, 8) })
                .map(NonNull::as_ptr),
            Source::Watermark(p) => p.alloc(),
            Source::Prealloc(p) => p.alloc(),
            Source::Masked => {
                // SAFETY: a non-zero size.
                let p = unsafe { SIGMASKED_GLIBC.alloc(object_layout()) };
                (!p.is_null()).then_some(p)
            }
        }
    }

    /// # Safety
    /// `p` came from `alloc` and is dead.
    #[inline]
    unsafe fn free(&self, p: *mut u8) {
        // SAFETY: per the caller, for each source.
        unsafe {
            match self {
                Source::Heap(h) => h.free_nolock(NonNull::new_unchecked(p)),
                Source::Watermark(w) => w.free(p),
                Source::Prealloc(pool) => pool.free(p),
                Source::Masked => SIGMASKED_GLIBC.dealloc(p, object_layout()),
            }
        }
    }

    /// Churn allocation (normal context).
    fn churn_alloc(&self, size: usize) -> *mut u8 {
        let l = Layout::from_size_align(size, 8).expect("layout");
        match self {
            Source::Heap(h) => h.alloc(l).map_or(std::ptr::null_mut(), NonNull::as_ptr),
            // SAFETY: non-zero size.
            Source::Masked => unsafe { SIGMASKED_GLIBC.alloc(l) },
            // SAFETY: non-zero size.
            _ => unsafe { System.alloc(l) },
        }
    }

    /// # Safety
    /// `p` came from `churn_alloc(size)` and is dead.
    unsafe fn churn_free(&self, p: *mut u8, size: usize) {
        match self {
            // SAFETY: per the caller.
            Source::Heap(h) => unsafe { h.free(NonNull::new_unchecked(p)) },
            // SAFETY: per the caller.
            Source::Masked => unsafe {
                SIGMASKED_GLIBC.dealloc(p, Layout::from_size_align(size, 8).expect("layout"))
            },
            // SAFETY: per the caller.
            _ => unsafe { System.dealloc(p, Layout::from_size_align(size, 8).expect("layout")) },
        }
    }
}

static SOURCE: OnceLock<Source> = OnceLock::new();

/// One worker's burst state, touched by its handler and (at the end, with
/// the signal blocked) by the worker itself.
struct Held {
    /// The burst's objects (entries: address and owner tag) in slots
    /// `0..n`.
    objs: Stash<MAX_BURST>,
    n: AtomicUsize,
    rng: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const HELD: Held = Held {
    objs: Stash::new(),
    n: AtomicUsize::new(0),
    rng: AtomicU64::new(0),
};
static HELD_BY: [Held; MAX_THREADS] = [HELD; MAX_THREADS];

struct Counters {
    attempts: [AtomicU64; 4],
    ok: [AtomicU64; 4],
    bursts: [AtomicU64; 4],
    full: [AtomicU64; 4],
    live: AtomicUsize,
    live_peak: AtomicUsize,
    signals: AtomicU64,
    churn_ops: AtomicU64,
    churn_fail: AtomicU64,
    /// Burst objects whose bytes changed while they were held.
    corrupted: AtomicU64,
    /// Time spent in handlers, ns.
    handler_ns: AtomicU64,
}

static C: Counters = Counters {
    attempts: [const { AtomicU64::new(0) }; 4],
    ok: [const { AtomicU64::new(0) }; 4],
    bursts: [const { AtomicU64::new(0) }; 4],
    full: [const { AtomicU64::new(0) }; 4],
    live: AtomicUsize::new(0),
    live_peak: AtomicUsize::new(0),
    signals: AtomicU64::new(0),
    churn_ops: AtomicU64::new(0),
    churn_fail: AtomicU64::new(0),
    corrupted: AtomicU64::new(0),
    handler_ns: AtomicU64::new(0),
};

static STOP: AtomicBool = AtomicBool::new(false);

#[inline]
fn live_add(bytes: usize) {
    let now = C.live.fetch_add(bytes, Relaxed) + bytes;
    C.live_peak.fetch_max(now, Relaxed);
}

/// A burst size, log-uniform over 1..=MAX_BURST, and its decade.
fn burst_size(rng: &mut XorShift) -> (usize, usize) {
    // 10^(4u) for u uniform in [0, 1) (pure arithmetic: signal-safe).
    let u = rng.below(1 << 20) as f64 / (1u64 << 20) as f64;
    let k = (10f64.powf(4.0 * u) as usize).clamp(1, MAX_BURST);
    let bucket = match k {
        1..=9 => 0,
        10..=99 => 1,
        100..=999 => 2,
        _ => 3,
    };
    (k, bucket)
}

/// Frees what `h` holds (any context: the handler, or the worker with its
/// signal blocked).
fn free_held(src: &Source, h: &Held) {
    let n = h.n.swap(0, Relaxed);
    for k in 0..n {
        let e = h.objs.swap(k, 0);
        if e != 0 {
            let e = Entry(e);
            // SAFETY: an object this thread's handler allocated, filled for
            // this entry and kept; checked, then freed once.
            unsafe {
                if pattern::check(e, OBJECT).is_ok() {
                    src.free(e.ptr());
                } else {
                    C.corrupted.fetch_add(1, Relaxed);
                }
            }
        }
    }
    C.live.fetch_sub(n * OBJECT, Relaxed);
}

fn burst(h: &Held) {
    let Some(src) = SOURCE.get() else { return };
    let t0 = now_ns();
    C.signals.fetch_add(1, Relaxed);
    free_held(src, h);
    let mut rng = XorShift::new(h.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed));
    let (k, bucket) = burst_size(&mut rng);
    let mut n = 0;
    for _ in 0..k {
        if let Some(p) = src.alloc() {
            let e = Entry::fresh(p as usize, 0);
            // SAFETY: a fresh object of OBJECT bytes: every byte written.
            unsafe { pattern::fill(e, OBJECT) };
            h.objs.swap(n, e.0);
            n += 1;
        }
    }
    h.n.store(n, Relaxed);
    live_add(n * OBJECT);
    C.attempts[bucket].fetch_add(k as u64, Relaxed);
    C.ok[bucket].fetch_add(n as u64, Relaxed);
    C.bursts[bucket].fetch_add(1, Relaxed);
    if n == k {
        C.full[bucket].fetch_add(1, Relaxed);
    }
    C.handler_ns.fetch_add(now_ns().wrapping_sub(t0), Relaxed);
}

extern "C" fn on_signal(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
    if let Some(t) = unsafe { timer_signal(info) } {
        if t.value < MAX_THREADS {
            burst(&HELD_BY[t.value]);
        }
    }
}

/// The points where the workers and the main thread meet, in order.
struct Start {
    /// The harness is set up: every worker runs and has touched its own
    /// bookkeeping; the allocator does not exist yet (the main thread reads
    /// `base` here, then creates it).
    set_up: std::sync::Barrier,
    /// The allocator exists (or could not be made: the workers then return
    /// at once). No churn or burst object exists yet.
    source: std::sync::Barrier,
    /// The churn objects exist and the timers run: the storm starts.
    ready: std::sync::Barrier,
}

fn worker(i: usize, hz: u64, start: &Start) -> Result<(), String> {
    let sig = libc::SIGRTMIN();
    HELD_BY[i]
        .rng
        .store(0x1234_5678 ^ (i as u64) << 40, Relaxed);
    let mut rng = XorShift::new(i as u64 + 99);
    let mut slots = vec![(0usize, 0usize); CHURN];
    // The harness's own memory is not the allocator's: the burst stash
    // (MAX_BURST entries, in static memory) is touched before `base`,
    // not page by page as the first large bursts fill it.
    for k in 0..MAX_BURST {
        HELD_BY[i].objs.swap(k, 0);
    }
    start.set_up.wait();
    start.source.wait();
    let src = SOURCE.get().ok_or("no allocator to test")?;
    for s in slots.iter_mut() {
        let size = 16 + rng.below(1009) as usize;
        let p = src.churn_alloc(size);
        if !p.is_null() {
            live_add(size);
            *s = (p as usize, size);
        }
    }
    let timer = ThreadTimer::start(sig, Duration::from_nanos(1_000_000_000 / hz.max(1)), i);
    // Met even on failure, so that the main thread is not left waiting.
    start.ready.wait();
    let timer = timer.map_err(|e| format!("timer_create: {e}"))?;
    mask(&[sig], false);
    while !STOP.load(Relaxed) {
        for _ in 0..64 {
            let j = rng.below(CHURN as u64) as usize;
            let (p, size) = slots[j];
            if p != 0 {
                // SAFETY: a churn object of this size, freed once.
                unsafe { src.churn_free(p as *mut u8, size) };
                C.live.fetch_sub(size, Relaxed);
            }
            let size = 16 + rng.below(1009) as usize;
            let q = src.churn_alloc(size);
            if q.is_null() {
                C.churn_fail.fetch_add(1, Relaxed);
                slots[j] = (0, 0);
            } else {
                // SAFETY: a fresh block of `size` bytes.
                unsafe { q.write_volatile(1) };
                live_add(size);
                slots[j] = (q as usize, size);
            }
        }
        C.churn_ops.fetch_add(64, Relaxed);
    }
    drop(timer);
    mask(&[sig], true);
    free_held(src, &HELD_BY[i]);
    for (p, size) in slots {
        if p != 0 {
            // SAFETY: a churn object of this size, freed once.
            unsafe { src.churn_free(p as *mut u8, size) };
            C.live.fetch_sub(size, Relaxed);
        }
    }
    Ok(())
}

/// What the storm measured, for the report.
struct Storm {
    rss_base: u64,
    rss_before: u64,
    rss_peak: u64,
    results: Vec<Result<(), String>>,
    elapsed: f64,
    maintainers: Vec<i32>,
    maintainer_ns: u64,
    /// The pools' set-up figures: (capacity, marks).
    info: (Value, Value),
}

/// Creates the allocator `key` names (one of [`PEERS`]), with the pools'
/// set-up figures (capacity, marks; null where they do not apply).
fn make_source(key: &str, threads: usize) -> Result<(Source, (Value, Value)), String> {
    Ok(match key {
        "anyalloc-maint" | "anyalloc-nomaint" => {
            let h = Heap::new(Config::default().maintenance(key == "anyalloc-maint"))
                .map_err(|e| format!("anyalloc heap: {e}"))?;
            (
                Source::Heap(Box::leak(Box::new(h))),
                (Value::Null, Value::Null),
            )
        }
        "watermark" => {
            let p = WatermarkPool::new(OBJECT);
            let marks = json!(p.marks());
            (
                Source::Watermark(Box::leak(Box::new(p))),
                (Value::Null, marks),
            )
        }
        "prealloc" => {
            let p = PreallocPool::new(OBJECT, threads * MAX_BURST);
            let capacity =
                json!({ "objects": p.capacity(), "committed_bytes": p.committed_bytes() });
            (
                Source::Prealloc(Box::leak(Box::new(p))),
                (capacity, Value::Null),
            )
        }
        "glibc-sigmask" => (Source::Masked, (Value::Null, Value::Null)),
        other => return Err(format!("unknown allocator {other:?}")),
    })
}

/// The child: `bursts <key> <seconds> <hz>`. Prints one JSON object.
pub fn child(args: &[String]) -> i32 {
    let (Some(key), Some(secs), Some(hz)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<f64>().ok()),
        args.get(2).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("bursts child: expected <key> <seconds> <hz>");
        return 64;
    };
    let threads = sys::cpus().clamp(1, MAX_THREADS);
    let sig = libc::SIGRTMIN();
    mask(&[sig], true);
    if let Err(e) = install_handler(sig, on_signal, &[]) {
        eprintln!("bursts child: sigaction: {e}");
        return 1;
    }
    if !PEERS.iter().any(|(k, _)| k == key) {
        eprintln!("bursts child: unknown allocator {key:?}");
        return 64;
    }
    let start = Start {
        set_up: std::sync::Barrier::new(threads + 1),
        source: std::sync::Barrier::new(threads + 1),
        ready: std::sync::Barrier::new(threads + 1),
    };
    let storm: Result<Storm, String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let start = &start;
                s.spawn(move || worker(i, hz, start))
            })
            .collect();
        start.set_up.wait();
        let rss_base = sys::rss_bytes();
        // Every thread before the heap exists, the workers among them (a
        // new thread names itself only once it runs, so threads are told
        // apart by id, not by name).
        let threads_before = sys::threads_named("");
        let made = make_source(key, threads).map(|(src, info)| {
            let _ = SOURCE.set(src);
            info
        });
        let rss_before = sys::rss_bytes();
        // Met either way: without a source the workers return at once.
        start.source.wait();
        let info = made?;
        let src = SOURCE.get().expect("just set");
        // The burst heap's maintainer: the thread that started with it (the
        // process-wide heap's, if any, was there before).
        let maintainers: Vec<i32> = match src {
            Source::Heap(_) => sys::threads_named("")
                .into_iter()
                .filter(|t| !threads_before.contains(t))
                .collect(),
            _ => Vec::new(),
        };
        let maintainer_cpu0 = sys::threads_cpu_ns(&maintainers);
        start.ready.wait();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut peak = sys::rss_bytes();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
            peak = peak.max(sys::rss_bytes());
        }
        STOP.store(true, Relaxed);
        let maintainer_ns = sys::threads_cpu_ns(&maintainers) - maintainer_cpu0;
        let elapsed = t0.elapsed().as_secs_f64();
        let results: Vec<Result<(), String>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect();
        Ok(Storm {
            rss_base,
            rss_before,
            rss_peak: peak.max(sys::rss_bytes()),
            results,
            elapsed,
            maintainers,
            maintainer_ns,
            info,
        })
    });
    let Storm {
        rss_base,
        rss_before,
        rss_peak,
        results,
        elapsed,
        maintainers,
        maintainer_ns,
        info: (capacity, marks),
    } = match storm {
        Ok(storm) => storm,
        Err(e) => {
            eprintln!("bursts child: {e}");
            return 1;
        }
    };
    let src = SOURCE.get().expect("set by the storm");
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("bursts child: {e}");
        return 1;
    }
    let live_end = C.live.load(Relaxed);
    let rss_freed = sys::rss_bytes();
    std::thread::sleep(Duration::from_secs(SETTLE_S));
    let rss_after = sys::rss_bytes();
    // Diagnostic for anyalloc: can the memory go back at all? An explicit
    // drain (every cached object back to its slab, empty slabs back to the
    // page allocator), then another settle period for the maintainer.
    let rss_drained = match src {
        Source::Heap(h) => {
            h.drain();
            std::thread::sleep(Duration::from_millis(DRAIN_SETTLE_MS));
            json!(sys::rss_bytes())
        }
        _ => Value::Null,
    };

    let sum = |a: &[AtomicU64; 4]| a.iter().map(|x| x.load(Relaxed)).sum::<u64>();
    let by_size: Vec<Value> = (0..4)
        .map(|b| {
            let att = C.attempts[b].load(Relaxed);
            let ok = C.ok[b].load(Relaxed);
            json!({
                "burst_size": BUCKETS[b],
                "bursts": C.bursts[b].load(Relaxed),
                "bursts_full": C.full[b].load(Relaxed),
                "attempts": att,
                "ok": ok,
                "success_rate": if att == 0 { 1.0 } else { ok as f64 / att as f64 },
            })
        })
        .collect();
    let detail = match src {
        Source::Heap(h) => {
            let st = h.stats();
            json!({
                "nolock_alloc_fail_busy": st.nolock_alloc_fail_busy,
                "nolock_alloc_fail_empty": st.nolock_alloc_fail_empty,
                "nolock_free_deferred": st.nolock_free_deferred,
                "released_to_os_bytes": st.released_to_os_bytes,
                "maintenance_passes": st.maintenance_passes,
                "zones": st.pages.zones,
            })
        }
        Source::Watermark(p) => {
            let st = p.stats();
            json!({
                "watermarks": marks,
                "fail_busy": st.fail_busy.load(Relaxed),
                "fail_empty": st.fail_empty.load(Relaxed),
                "refilled": st.refilled.load(Relaxed),
                "trimmed": st.trimmed.load(Relaxed),
                "wakeups": st.wakeups.load(Relaxed),
                "cached_at_end": p.cached(),
            })
        }
        Source::Prealloc(p) => json!({ "capacity": capacity, "in_use_at_end": p.in_use() }),
        Source::Masked => json!({}),
    };
    let (att, ok) = (sum(&C.attempts), sum(&C.ok));
    let out = json!({
        "allocator": key,
        "threads": threads,
        "signal_hz": hz,
        "seconds": elapsed,
        "object_bytes": OBJECT,
        "signals": C.signals.load(Relaxed),
        "attempts": att,
        "ok": ok,
        "success_rate": if att == 0 { 1.0 } else { ok as f64 / att as f64 },
        "bursts": sum(&C.bursts),
        "bursts_full": sum(&C.full),
        "by_burst_size": by_size,
        "churn_ops": C.churn_ops.load(Relaxed),
        "churn_fail": C.churn_fail.load(Relaxed),
        "live_peak_bytes": C.live_peak.load(Relaxed),
        "live_end_bytes": live_end,
        "corrupted": C.corrupted.load(Relaxed),
        "handler_ns_per_alloc": if att == 0 { Value::Null } else { json!(C.handler_ns.load(Relaxed) as f64 / att as f64) },
        // During the storm; null without a maintainer thread.
        "maintainer_cpu_ms": (!maintainers.is_empty()).then(|| maintainer_ns as f64 / 1e6),
        "rss_base": rss_base,
        "rss_before": rss_before,
        "rss_peak": rss_peak,
        "rss_freed": rss_freed,
        "rss_after": rss_after,
        "rss_drained": rss_drained,
        "detail": detail,
    });
    println!("{out}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_sizes_cover_every_decade() {
        let mut rng = XorShift::new(5);
        let mut seen = [0u32; 4];
        for _ in 0..100_000 {
            let (k, b) = burst_size(&mut rng);
            assert!((1..=MAX_BURST).contains(&k));
            seen[b] += 1;
        }
        // Log-uniform: each decade about a quarter.
        for s in seen {
            assert!((20_000..30_000).contains(&s), "{seen:?}");
        }
    }
}
