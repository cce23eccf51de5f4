//! The storm's result: one [`Report`] built from the shared counters, shown
//! as a table or as one JSON object.
//!
//! Building a report and writing it with [`FdWriter`] allocate nothing, so
//! the watchdog can still report when a thread is stuck inside an allocator
//! (possibly holding a lock of the process-wide heap).

use std::sync::atomic::Ordering::Relaxed;

use anyalloc::{Heap, HeapStats};
use serde::Serialize;

use crate::storm::{self, Op, KINDS, KIND_BOX, KIND_LARGE, KIND_OBJECT, KIND_PAGE, SLOTS};

/// What the storm was asked to do.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settings {
    /// Requested duration.
    pub seconds: u64,
    pub threads: usize,
    pub signal_hz: u64,
    pub nested: bool,
    /// `--memory`, if given (then the heap cannot grow).
    pub memory: Option<u64>,
    /// `--first-zone`, if given (the heap grows beyond it).
    pub first_zone: Option<u64>,
    /// The stress heap's first zone.
    pub heap_memory: u64,
    pub heap_grow: bool,
    /// `--migrate`.
    pub migrate: bool,
}

/// One kind of nolock allocation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KindReport {
    pub attempts: u64,
    pub ok: u64,
    pub fail_busy: u64,
    pub fail_empty: u64,
    pub frees: u64,
    /// Left allocated because the block failed its check (counted in
    /// `violations`): excepted from "every allocation freed".
    pub leaked_after_violation: u64,
    /// Parked in the thread's stash, freed by a later handler invocation.
    pub stashed: u64,
    /// Handed to the cross-thread stash, freed by a handler of any thread.
    pub handed_across: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeapReport {
    pub total_pages: u64,
    pub free_pages: u64,
    pub zones: u64,
    pub objects_in_use: u64,
    pub large_in_use: u64,
    pub nolock_alloc_ok: u64,
    pub nolock_alloc_fail_busy: u64,
    pub nolock_alloc_fail_empty: u64,
    /// Object frees parked on a deferred list.
    pub nolock_free_deferred: u64,
    /// Page frees parked on a zone's deferred stack.
    pub pages_nolock_free_deferred: u64,
    pub pages_nolock_alloc_fail_busy: u64,
    pub pages_nolock_alloc_fail_empty: u64,
    /// Nolock page allocations of 64 KiB to 4 MiB (orders above the per-CPU
    /// lists): served, failed busy, failed empty.
    pub pages_nolock_large_alloc_ok: u64,
    pub pages_nolock_large_alloc_fail_busy: u64,
    pub pages_nolock_large_alloc_fail_empty: u64,
    /// Nolock requests above 4 MiB, refused (huge blocks are normal-path).
    pub nolock_alloc_fail_too_large: u64,
}

impl HeapReport {
    pub fn of(s: &HeapStats) -> Self {
        HeapReport {
            total_pages: s.pages.total_pages as u64,
            free_pages: s.pages.free_pages as u64,
            zones: s.pages.zones as u64,
            objects_in_use: s.objects_in_use as u64,
            large_in_use: s.large_in_use as u64,
            nolock_alloc_ok: s.nolock_alloc_ok,
            nolock_alloc_fail_busy: s.nolock_alloc_fail_busy,
            nolock_alloc_fail_empty: s.nolock_alloc_fail_empty,
            nolock_free_deferred: s.nolock_free_deferred,
            pages_nolock_free_deferred: s.pages.nolock_free_deferred,
            pages_nolock_alloc_fail_busy: s.pages.nolock_alloc_fail_busy,
            pages_nolock_alloc_fail_empty: s.pages.nolock_alloc_fail_empty,
            pages_nolock_large_alloc_ok: s.pages.nolock_large_alloc_ok,
            pages_nolock_large_alloc_fail_busy: s.pages.nolock_large_alloc_fail_busy,
            pages_nolock_large_alloc_fail_empty: s.pages.nolock_large_alloc_fail_empty,
            nolock_alloc_fail_too_large: s.nolock_alloc_fail_too_large,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ViolationReport {
    pub op: &'static str,
    pub addr: usize,
    pub kind: &'static str,
    pub offset: usize,
    pub expected: u64,
    pub found: u64,
}

/// The result. Field names are a contract (see the crate's README).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Report {
    pub seconds: u64,
    pub elapsed_s: f64,
    pub threads: usize,
    pub signal_hz: u64,
    pub nested: bool,
    pub memory: Option<u64>,
    pub first_zone: Option<u64>,
    pub heap_memory: u64,
    pub heap_grow: bool,
    /// `--migrate`: the workers moved between CPUs (`migrations`: their
    /// affinity changes) while a drainer took every CPU's slots remotely
    /// (`drains`: its passes). Both 0 without it.
    pub migrate: bool,
    pub migrations: u64,
    pub drains: u64,
    pub signals: u64,
    pub signals_per_s: f64,
    pub nested_signals: u64,
    pub max_nesting: u32,
    /// Timer expirations merged into an earlier, still pending signal.
    pub timer_overruns: u64,
    pub nolock_attempts: u64,
    pub nolock_ok: u64,
    pub nolock_fail_busy: u64,
    pub nolock_fail_empty: u64,
    pub success_rate: f64,
    pub normal_ops: u64,
    pub normal_ops_per_s: f64,
    pub normal_alloc_fail: u64,
    pub global_vec_ops: u64,
    pub handoffs: u64,
    pub violations: u64,
    pub first_violation: Option<ViolationReport>,
    /// Handler invocations that began while their thread was inside an
    /// allocator call (the worker's normal-path call, or an interrupted
    /// handler's nolock call): re-entry that actually happened.
    pub interrupted_inside_allocator: u64,
    /// Successful allocations (of every kind) not freed by the end of the
    /// teardown, blocks leaked after a reported violation excepted: 0 in a
    /// correct run. `None` when the run did not get to tear down.
    pub allocations_not_freed: Option<u64>,
    /// `None` when the run did not get to tear down (deadlock).
    pub leaked_pages: Option<u64>,
    pub deadlock: bool,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: u64,
    pub free_p50_ns: u64,
    pub free_p99_ns: u64,
    pub free_p999_ns: u64,
    pub free_max_ns: u64,
    pub pages: KindReport,
    pub objects: KindReport,
    pub boxes: KindReport,
    /// Large objects (64 KiB to 4 MiB) from `Heap::alloc_nolock`: the page
    /// allocator's zone try-lock path; one attempt every fourth handler
    /// invocation.
    pub large: KindReport,
    /// The workers' normal-path blocks of the stress heap (`ok` counts
    /// successful `Heap::alloc` calls).
    pub worker_blocks: KindReport,
    /// Nolock frees of the stress heap parked on deferred lists (objects and
    /// pages).
    pub deferred_frees: u64,
    pub stress_heap: HeapReport,
    /// The process-wide heap (`Global`, `NoLock`).
    pub global_heap: Option<HeapReport>,
}

/// Splits `fails` into (busy, empty) by what an allocator counted.
fn split(fails: u64, busy_counted: u64) -> (u64, u64) {
    let busy = busy_counted.min(fails);
    (busy, fails - busy)
}

fn kind(k: usize) -> KindReport {
    let s = &KINDS[k];
    KindReport {
        attempts: s.attempts.load(Relaxed),
        ok: s.ok.load(Relaxed),
        fail_busy: s.fail_busy.load(Relaxed),
        fail_empty: s.fail_empty.load(Relaxed),
        frees: s.frees.load(Relaxed),
        leaked_after_violation: s.leaked.load(Relaxed),
        stashed: s.stashed.load(Relaxed),
        handed_across: s.crossed.load(Relaxed),
    }
}

fn kind_name(k: usize) -> &'static str {
    match k {
        KIND_PAGE => "pages",
        KIND_OBJECT => "object",
        KIND_BOX => "NoLock box",
        KIND_LARGE => "large object",
        storm::KIND_WORKER => "worker block",
        _ => "Vec through Global",
    }
}

/// Builds the report from the shared counters. Allocates nothing.
///
/// `global_busy_before` is the process-wide heap's nolock busy-failure
/// count when the storm started: only the handlers' `NoLock` boxes allocate
/// nolock from it, so the difference classifies their failures.
pub fn collect(
    settings: &Settings,
    elapsed_s: f64,
    heap: &Heap,
    global_busy_before: u64,
    leaked_pages: Option<u64>,
    deadlock: bool,
) -> Report {
    let threads = &SLOTS[..settings.threads];
    let signals: u64 = threads.iter().map(|t| t.signals.load(Relaxed)).sum();
    let nested_signals: u64 = threads.iter().map(|t| t.nested.load(Relaxed)).sum();
    let timer_overruns: u64 = threads.iter().map(|t| t.overruns.load(Relaxed)).sum();
    let max_nesting = threads
        .iter()
        .map(|t| t.max_depth.load(Relaxed))
        .max()
        .unwrap_or(0);
    let normal_ops: u64 = threads.iter().map(|t| t.ops.load(Relaxed)).sum();

    let stress = heap.stats();
    let global = anyalloc::global_heap().map(|h| h.stats());

    let pages = kind(KIND_PAGE);
    let mut objects = kind(KIND_OBJECT);
    let mut large = kind(KIND_LARGE);
    // Only the handlers' large objects take nolock page blocks above 32 KiB
    // from the stress heap: the page allocator's large counters are theirs.
    let large_busy = stress.pages.nolock_large_alloc_fail_busy;
    (large.fail_busy, large.fail_empty) = split(large.attempts - large.ok, large_busy);
    // Only the handlers allocate nolock from the stress heap's objects (the
    // small ones and the large ones).
    let object_busy = stress
        .nolock_alloc_fail_busy
        .saturating_sub(large.fail_busy);
    (objects.fail_busy, objects.fail_empty) = split(objects.attempts - objects.ok, object_busy);
    let mut boxes = kind(KIND_BOX);
    let global_busy = global.map_or(0, |g| g.nolock_alloc_fail_busy - global_busy_before);
    (boxes.fail_busy, boxes.fail_empty) = split(boxes.attempts - boxes.ok, global_busy);

    let worker_blocks = kind(storm::KIND_WORKER);
    let all = [pages, objects, boxes, large];
    let allocations_not_freed = (!deadlock).then(|| {
        [pages, objects, boxes, large, worker_blocks]
            .iter()
            .map(|k| k.ok.saturating_sub(k.frees + k.leaked_after_violation))
            .sum()
    });
    let interrupted_inside_allocator = threads
        .iter()
        .map(|t| t.interrupted_inside.load(Relaxed))
        .sum();
    let nolock_attempts: u64 = all.iter().map(|k| k.attempts).sum();
    let nolock_ok: u64 = all.iter().map(|k| k.ok).sum();
    let a = storm::ALLOC_NS.summary();
    let f = storm::FREE_NS.summary();
    let fv = &storm::FIRST_VIOLATION;
    let first_violation = fv.set.load(Relaxed).then(|| ViolationReport {
        op: Op::from_code(fv.op.load(Relaxed)).name(),
        addr: fv.addr.load(Relaxed),
        kind: kind_name(fv.kind.load(Relaxed)),
        offset: fv.offset.load(Relaxed),
        expected: fv.expected.load(Relaxed),
        found: fv.found.load(Relaxed),
    });
    let per_s = |n: u64| {
        if elapsed_s > 0.0 {
            n as f64 / elapsed_s
        } else {
            0.0
        }
    };
    Report {
        seconds: settings.seconds,
        elapsed_s,
        threads: settings.threads,
        signal_hz: settings.signal_hz,
        nested: settings.nested,
        memory: settings.memory,
        first_zone: settings.first_zone,
        heap_memory: settings.heap_memory,
        heap_grow: settings.heap_grow,
        migrate: settings.migrate,
        migrations: storm::MIGRATIONS.load(Relaxed),
        drains: storm::DRAINS.load(Relaxed),
        signals,
        signals_per_s: per_s(signals),
        nested_signals,
        max_nesting,
        timer_overruns,
        nolock_attempts,
        nolock_ok,
        nolock_fail_busy: all.iter().map(|k| k.fail_busy).sum(),
        nolock_fail_empty: all.iter().map(|k| k.fail_empty).sum(),
        success_rate: if nolock_attempts == 0 {
            1.0
        } else {
            nolock_ok as f64 / nolock_attempts as f64
        },
        normal_ops,
        normal_ops_per_s: per_s(normal_ops),
        normal_alloc_fail: storm::NORMAL_FAIL.load(Relaxed),
        global_vec_ops: storm::GLOBAL_OPS.load(Relaxed),
        handoffs: storm::HANDOFFS.load(Relaxed),
        violations: storm::VIOLATIONS.load(Relaxed),
        first_violation,
        interrupted_inside_allocator,
        allocations_not_freed,
        leaked_pages,
        deadlock,
        p50_ns: a.p50,
        p99_ns: a.p99,
        p999_ns: a.p999,
        max_ns: a.max,
        mean_ns: a.mean,
        free_p50_ns: f.p50,
        free_p99_ns: f.p99,
        free_p999_ns: f.p999,
        free_max_ns: f.max,
        pages,
        objects,
        boxes,
        large,
        worker_blocks,
        deferred_frees: stress.nolock_free_deferred + stress.pages.nolock_free_deferred,
        stress_heap: HeapReport::of(&stress),
        global_heap: global.as_ref().map(HeapReport::of),
    }
}

fn ns(v: u64) -> String {
    match v {
        0..=9_999 => format!("{v} ns"),
        10_000..=999_999 => format!("{:.1} us", v as f64 / 1e3),
        _ => format!("{:.1} ms", v as f64 / 1e6),
    }
}

/// The human-readable table (stdout).
pub fn print_table(r: &Report) {
    let mem = match r.memory {
        Some(m) => format!("{} KiB hard cap (--memory)", m >> 10),
        None => {
            let size = match r.heap_memory {
                m if m < 1 << 20 => format!("{} KiB", m >> 10),
                m => format!("{} MiB", m >> 20),
            };
            let given = if r.first_zone.is_some() {
                " (--first-zone)"
            } else {
                ""
            };
            format!("{size} first zone, grows{given}")
        }
    };
    println!("anyalloc stress: {:.2} s, {} threads, signals at {} Hz + {} Hz per thread ({}), stress heap {}",
        r.elapsed_s,
        r.threads,
        r.signal_hz,
        r.signal_hz * 10 / 33,
        if r.nested { "nested" } else { "not nested" },
        mem,
    );
    if r.migrate {
        println!(
            "  migrating (--migrate): {} affinity changes of the workers, {} drains from a moving thread",
            r.migrations, r.drains
        );
    }
    println!();
    println!("  {:<28} {:>14} {:>14}", "", "total", "per second");
    println!(
        "  {:<28} {:>14} {:>14.0}",
        "normal-path ops", r.normal_ops, r.normal_ops_per_s
    );
    println!(
        "  {:<28} {:>14} {:>14.0}",
        "signals handled", r.signals, r.signals_per_s
    );
    println!(
        "  {:<28} {:>14} {:>14}",
        "  nested in another handler",
        r.nested_signals,
        format!("max depth {}", r.max_nesting)
    );
    println!(
        "  {:<28} {:>14}",
        "  timer expirations missed", r.timer_overruns
    );
    println!(
        "  {:<28} {:>14}",
        "  inside an allocator call", r.interrupted_inside_allocator
    );
    println!();
    println!(
        "  {:<12} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "nolock", "attempts", "ok", "busy", "empty", "success", "stashed", "across"
    );
    for (name, k) in [
        ("pages", r.pages),
        ("objects", r.objects),
        ("NoLock box", r.boxes),
        ("64K-4M", r.large),
    ] {
        let rate = if k.attempts == 0 {
            100.0
        } else {
            100.0 * k.ok as f64 / k.attempts as f64
        };
        println!(
            "  {:<12} {:>11} {:>11} {:>9} {:>9} {:>9.3}% {:>10} {:>10}",
            name, k.attempts, k.ok, k.fail_busy, k.fail_empty, rate, k.stashed, k.handed_across
        );
    }
    println!(
        "  {:<12} {:>11} {:>11} {:>9} {:>9} {:>9.3}%",
        "all",
        r.nolock_attempts,
        r.nolock_ok,
        r.nolock_fail_busy,
        r.nolock_fail_empty,
        100.0 * r.success_rate
    );
    println!();
    println!(
        "  nolock alloc latency   p50 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        ns(r.p50_ns),
        ns(r.p99_ns),
        ns(r.p999_ns),
        ns(r.max_ns),
        ns(r.mean_ns)
    );
    println!(
        "  nolock free latency    p50 {}  p99 {}  p99.9 {}  max {}",
        ns(r.free_p50_ns),
        ns(r.free_p99_ns),
        ns(r.free_p999_ns),
        ns(r.free_max_ns)
    );
    println!();
    println!(
        "  normal allocs that failed {}   hand-offs {}   Vecs through Global {}   deferred nolock frees {}",
        r.normal_alloc_fail, r.handoffs, r.global_vec_ops, r.deferred_frees
    );
    let h = &r.stress_heap;
    println!(
        "  stress heap after drain: {} / {} pages free, {} zone(s), {} objects and {} large blocks in use",
        h.free_pages, h.total_pages, h.zones, h.objects_in_use, h.large_in_use
    );
    println!();
    let w = &r.worker_blocks;
    println!(
        "  allocations freed: pages {}/{}, objects {}/{}, NoLock boxes {}/{}, 64K-4M objects {}/{}, worker blocks {}/{} (freed/ok)",
        r.pages.frees, r.pages.ok, r.objects.frees, r.objects.ok, r.boxes.frees, r.boxes.ok,
        r.large.frees, r.large.ok, w.frees, w.ok
    );
    match r.allocations_not_freed {
        Some(n) => println!("  not freed      {n}"),
        None => println!("  not freed      not measured"),
    }
    println!("  violations     {}", r.violations);
    if let Some(v) = r.first_violation {
        println!(
            "    first: {} at {:#x} ({}), offset {}: expected {:#x}, found {:#x}",
            v.op, v.addr, v.kind, v.offset, v.expected, v.found
        );
    }
    match r.leaked_pages {
        Some(n) => println!("  leaked pages   {n}"),
        None => println!("  leaked pages   not measured"),
    }
    println!(
        "  deadlock       {}",
        if r.deadlock { "SUSPECTED" } else { "no" }
    );
}

/// A small buffered writer straight to a file descriptor with `write(2)`:
/// no allocation, no lock (the watchdog uses it when a thread may be stuck
/// holding the process-wide heap's or stdio's locks).
pub struct FdWriter {
    fd: libc::c_int,
    buf: [u8; 512],
    len: usize,
}

impl FdWriter {
    pub fn new(fd: libc::c_int) -> Self {
        FdWriter {
            fd,
            buf: [0; 512],
            len: 0,
        }
    }

    fn write_all_raw(&self, mut b: &[u8]) {
        while !b.is_empty() {
            // SAFETY: `b` is a valid byte slice; write(2) only reads it.
            let n = unsafe { libc::write(self.fd, b.as_ptr().cast(), b.len()) };
            if n <= 0 {
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return;
            }
            b = &b[n as usize..];
        }
    }

    pub fn push(&mut self, b: &[u8]) {
        if self.len + b.len() > self.buf.len() {
            self.flush_now();
        }
        if b.len() > self.buf.len() {
            self.write_all_raw(b);
        } else {
            self.buf[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        }
    }

    pub fn flush_now(&mut self) {
        let len = std::mem::take(&mut self.len);
        self.write_all_raw(&self.buf[..len]);
    }
}

impl std::fmt::Write for FdWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

impl std::io::Write for FdWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.push(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_now();
        Ok(())
    }
}

impl Drop for FdWriter {
    fn drop(&mut self) {
        self.flush_now();
    }
}

/// The watchdog's report of what every thread was doing (stderr, no
/// allocation).
pub fn write_thread_report(threads: usize, stalled_for_s: u64) {
    use std::fmt::Write;
    let mut w = FdWriter::new(2);
    let _ = writeln!(
        w,
        "\nanyalloc stress: DEADLOCK SUSPECTED: no progress for {stalled_for_s} s. Last operation of each thread:"
    );
    for (i, t) in SLOTS[..threads].iter().enumerate() {
        let depth = t.reentry.depth();
        let _ = writeln!(
            w,
            "  thread {i:3}: worker {:<22} ops {:>12}  | signal A handler {:<24} | signal B handler {:<24} | signals {:>9}, in a handler now: {}{}",
            Op::from_code(t.worker_op.load(Relaxed)).name(),
            t.ops.load(Relaxed),
            Op::from_code(t.handler_op[0].load(Relaxed)).name(),
            Op::from_code(t.handler_op[1].load(Relaxed)).name(),
            t.signals.load(Relaxed),
            depth,
            if t.running.load(Relaxed) { "" } else { " (exited)" },
        );
    }
}
