//! # A flow table without preallocation (a network load balancer)
//!
//! **The problem.** A load balancer keeps one entry per flow (connection).
//! Packets, and so new flows, arrive in whatever context the packet path
//! runs in: an interrupt, a signal handler, a real-time polling thread, a
//! BPF program. None of them may wait for a lock, so the classic answer is a
//! table preallocated for the *maximum* number of flows, paid for all the
//! time, though traffic is bursty and the average is a fraction of the peak.
//!
//! **How anyalloc solves it.** Each new flow's entry is allocated when the
//! flow appears, with [`anyalloc::Heap::alloc_nolock`] (never waits, may
//! fail: the flow is then counted as "no memory"), and linked into a
//! lock-free hash table: a fixed array of `AtomicPtr` buckets with chains
//! pushed by CAS. Nothing else is allocated. A normal thread expires idle
//! flows: it unlinks them, waits for a grace period (handlers inside the
//! table announce themselves in a two-counter epoch, so no handler still
//! holds an unlinked entry) and frees them with the normal path.
//!
//! The simulation: worker threads churn on the allocator's normal path while
//! per-thread POSIX timers interrupt them; each signal is a burst of packets:
//! a few new flows (many during a 150 ms peak of every second) and packets
//! for recent flows. At the end the example prints, side by side, the memory
//! used by this design (live entries, the heap's pages) against a table
//! preallocated for the maximum number of flows, and the share of new flows
//! that found memory.
//!
//! ```sh
//! cargo run --release -p anyalloc --example flow_table                 # 5 s
//! cargo run --release -p anyalloc --example flow_table -- --seconds 2 --max-flows 1000000
//! ```
//!
//! Linux only (per-thread timers with `SIGEV_THREAD_ID`).

use anyalloc::Heap;
// The storm kit shared by the tests, `anyalloc stress` and the benchmarks:
// per-thread timers, handler installation, errno preservation, a clock.
use anyalloc_storm::thread::now_ns;
use anyalloc_storm::{install_handler, mix64, ErrnoGuard, ThreadTimer};
use core::alloc::Layout;
use core::cell::Cell;
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ----- the flow table ---------------------------------------------------------

/// The five-tuple of a flow (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct FiveTuple {
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    proto: u8,
}

/// One flow's state: what a load balancer keeps per connection.
#[repr(C)]
struct Flow {
    /// Hash of the five-tuple, never 0.
    key: u64,
    /// The next entry of the bucket's chain.
    next: AtomicPtr<Flow>,
    tuple: FiveTuple,
    /// The backend this flow is pinned to.
    backend: u32,
    created_ms: u64,
    last_seen_ms: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
}

const BUCKETS: usize = 1 << 15;
/// The table's index, allocated once (both designs need one).
static TABLE: [AtomicPtr<Flow>; BUCKETS] = [const { AtomicPtr::new(null_mut()) }; BUCKETS];
/// The grace-period epoch and its two reader counters.
static EPOCH: AtomicUsize = AtomicUsize::new(0);
static READERS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

static LIVE: AtomicUsize = AtomicUsize::new(0);
static RUNNING: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static PACKETS: AtomicU64 = AtomicU64::new(0);
static NEW_FLOWS: AtomicU64 = AtomicU64::new(0);
static NO_MEMORY: AtomicU64 = AtomicU64::new(0);
static RACES_LOST: AtomicU64 = AtomicU64::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Process-relative clock origin, ns (CLOCK_MONOTONIC).
static ORIGIN_NS: AtomicU64 = AtomicU64::new(0);
/// The traffic pattern, set before the timers start.
static BURST_NEW: AtomicUsize = AtomicUsize::new(64);
static BASE_NEW: AtomicUsize = AtomicUsize::new(2);
static PACKETS_PER_SIGNAL: AtomicUsize = AtomicUsize::new(16);

const PERIOD_MS: u64 = 1000;
const PEAK_START_MS: u64 = 400;
const PEAK_MS: u64 = 150;
/// Packets for existing flows go to one of this many most recent flows.
const RECENT: u64 = 2048;

std::thread_local! {
    /// Per-thread random counter (const, no destructor: handler-safe).
    static RNG: Cell<u64> = const { Cell::new(0) };
}

fn now_ms() -> u64 {
    now_ns().saturating_sub(ORIGIN_NS.load(Ordering::Relaxed)) / 1_000_000
}

fn in_peak(ms: u64) -> bool {
    let phase = ms % PERIOD_MS;
    (PEAK_START_MS..PEAK_START_MS + PEAK_MS).contains(&phase)
}

/// A random number: the thread's counter, mixed (a handler that lands
/// between the read and the write only repeats a value).
fn rand() -> u64 {
    let n = RNG.get().wrapping_add(1);
    RNG.set(n);
    mix64(n)
}

/// A flow id's key: a well-mixed non-zero hash.
fn key_of(id: u64) -> u64 {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    x | 1
}

fn tuple_of(id: u64) -> FiveTuple {
    let mut src = [0u8; 16];
    src[..2].copy_from_slice(&[0xfd, 0x00]);
    src[8..].copy_from_slice(&id.to_be_bytes());
    let mut dst = [0u8; 16];
    dst[..2].copy_from_slice(&[0x20, 0x01]);
    dst[15] = 1;
    FiveTuple {
        src,
        dst,
        src_port: 1024 + (id % 60000) as u16,
        dst_port: 443,
        proto: 6,
    }
}

/// Enters a read section (handlers): returns the counter to leave with.
fn read_enter() -> usize {
    loop {
        let e = EPOCH.load(Ordering::SeqCst);
        READERS[e & 1].fetch_add(1, Ordering::SeqCst);
        if EPOCH.load(Ordering::SeqCst) == e {
            return e & 1;
        }
        // The epoch moved on between our two loads: count us in the new one.
        READERS[e & 1].fetch_sub(1, Ordering::SeqCst);
    }
}

fn read_leave(i: usize) {
    READERS[i].fetch_sub(1, Ordering::Release);
}

/// Waits until every read section that began before this call has ended
/// (normal context: the expirer). Entries unlinked before the call are then
/// unreachable for every handler.
fn synchronize() {
    let old = EPOCH.fetch_add(1, Ordering::SeqCst) & 1;
    while READERS[old].load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

/// Finds `key` in a chain, from `p` up to (not including) `stop`.
///
/// # Safety
/// Inside a read section (or on the expirer thread): every entry reachable
/// from `p` stays allocated.
unsafe fn find(mut p: *mut Flow, key: u64, stop: *mut Flow) -> Option<&'static Flow> {
    while !p.is_null() && p != stop {
        // SAFETY: reachable entries are live (contract).
        let f = unsafe { &*p };
        if f.key == key {
            return Some(f);
        }
        p = f.next.load(Ordering::Acquire);
    }
    None
}

enum Outcome {
    Hit,
    New,
    NoMemory,
}

/// One packet of flow `id`: count it on its entry, creating the entry if the
/// flow is new. Any context; inside a read section.
fn packet(heap: &Heap, id: u64, bytes: u64, now: u64) -> Outcome {
    let key = key_of(id);
    let bucket = &TABLE[key as usize & (BUCKETS - 1)];
    let mut head = bucket.load(Ordering::Acquire);
    // SAFETY: we are inside a read section.
    if let Some(f) = unsafe { find(head, key, null_mut()) } {
        f.touch(now, bytes);
        return Outcome::Hit;
    }
    let Some(mem) = heap.alloc_nolock(Layout::new::<Flow>()) else {
        return Outcome::NoMemory;
    };
    let p = mem.as_ptr().cast::<Flow>();
    // SAFETY: a fresh block sized and aligned for a Flow.
    unsafe {
        p.write(Flow {
            key,
            next: AtomicPtr::new(head),
            tuple: tuple_of(id),
            backend: (key >> 40) as u32 % 16,
            created_ms: now,
            last_seen_ms: AtomicU64::new(now),
            packets: AtomicU64::new(1),
            bytes: AtomicU64::new(bytes),
        })
    };
    loop {
        match bucket.compare_exchange(head, p, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                LIVE.fetch_add(1, Ordering::Relaxed);
                return Outcome::New;
            }
            Err(current) => {
                // Someone pushed (or the expirer unlinked the head). Only
                // entries above the old head are new to us: look there, so
                // a flow never gets two entries.
                // SAFETY: inside a read section.
                if let Some(f) = unsafe { find(current, key, head) } {
                    f.touch(now, bytes);
                    RACES_LOST.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: `p` was never published.
                    unsafe { heap.free_nolock(mem) };
                    return Outcome::Hit;
                }
                head = current;
                // SAFETY: `p` is still ours, unpublished.
                unsafe { (*p).next.store(head, Ordering::Relaxed) };
            }
        }
    }
}

impl Flow {
    fn touch(&self, now: u64, bytes: u64) {
        self.last_seen_ms.fetch_max(now, Ordering::Relaxed);
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Unlinks every entry idle for `idle_ms` or more (every entry with
/// `idle_ms == 0`), waits for a grace period and frees them with the normal
/// path. Only one thread expires at a time.
fn expire(heap: &Heap, idle_ms: u64, retired: &mut Vec<NonNull<Flow>>) -> usize {
    let now = now_ms();
    for bucket in TABLE.iter() {
        let mut prev: Option<&Flow> = None;
        let mut p = bucket.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: only this thread frees entries, after a grace period.
            let f = unsafe { &*p };
            let next = f.next.load(Ordering::Acquire);
            let idle = now.saturating_sub(f.last_seen_ms.load(Ordering::Relaxed));
            if idle_ms == 0 || idle >= idle_ms {
                let unlinked = match prev {
                    // Not the head: only we write `next` of published entries.
                    Some(pr) => {
                        pr.next.store(next, Ordering::Release);
                        true
                    }
                    // The head: handlers may push above it concurrently.
                    None => bucket
                        .compare_exchange(p, next, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok(),
                };
                if unlinked {
                    retired.push(NonNull::from(f));
                    p = next;
                    continue;
                }
                // New entries were pushed above: find our predecessor again.
                let mut q = bucket.load(Ordering::Acquire);
                let mut pr: Option<&Flow> = None;
                while q != p {
                    // SAFETY: as above.
                    let e = unsafe { &*q };
                    pr = Some(e);
                    q = e.next.load(Ordering::Acquire);
                }
                let pr = pr.expect("the head changed, so entries lie above");
                pr.next.store(next, Ordering::Release);
                retired.push(NonNull::from(f));
                prev = Some(pr);
                p = next;
                continue;
            }
            prev = Some(f);
            p = next;
        }
    }
    if retired.is_empty() {
        return 0;
    }
    synchronize();
    let n = retired.len();
    for f in retired.drain(..) {
        // SAFETY: unlinked before the grace period: no handler can reach it.
        unsafe { heap.free(f.cast()) };
    }
    LIVE.fetch_sub(n, Ordering::Relaxed);
    n
}

/// Every live entry's key is distinct (checked at the end, quiescent).
fn duplicate_keys() -> usize {
    let mut keys = Vec::new();
    for bucket in TABLE.iter() {
        let mut p = bucket.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: quiescent: no expirer runs, no entry is freed.
            let f = unsafe { &*p };
            keys.push(f.key);
            p = f.next.load(Ordering::Acquire);
        }
    }
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    n - keys.len()
}

// ----- the traffic: per-thread timer signals ------------------------------------

/// A burst of packets: the signal handler. Allocates only with the nolock
/// path; no locks, no printing.
extern "C" fn on_burst(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if !RUNNING.load(Ordering::Acquire) {
        return;
    }
    let _errno = ErrnoGuard::save();
    SIGNALS.fetch_add(1, Ordering::Relaxed);
    if let Some(heap) = anyalloc::global_heap() {
        let now = now_ms();
        let new = if in_peak(now) {
            BURST_NEW.load(Ordering::Relaxed)
        } else {
            BASE_NEW.load(Ordering::Relaxed)
        };
        let r = read_enter();
        let count = |o: Outcome| match o {
            Outcome::Hit => {}
            Outcome::New => {
                NEW_FLOWS.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::NoMemory => {
                NEW_FLOWS.fetch_add(1, Ordering::Relaxed);
                NO_MEMORY.fetch_add(1, Ordering::Relaxed);
            }
        };
        for _ in 0..new {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            count(packet(heap, id, 60 + rand() % 1400, now));
        }
        let packets = PACKETS_PER_SIGNAL.load(Ordering::Relaxed);
        for _ in 0..packets {
            let hi = NEXT_ID.load(Ordering::Relaxed);
            let span = RECENT.min(hi.saturating_sub(1));
            if span > 0 {
                count(packet(
                    heap,
                    hi - 1 - rand() % span,
                    60 + rand() % 1400,
                    now,
                ));
            }
        }
        PACKETS.fetch_add((new + packets) as u64, Ordering::Relaxed);
        read_leave(r);
    }
}

/// Normal-context work on a worker: allocator churn (so bursts often land
/// while this thread is inside the allocator).
fn worker(heap: &'static Heap, sig: libc::c_int, hz: u64, stop: &AtomicBool) -> u64 {
    RNG.set(key_of(now_ns()));
    let timer =
        ThreadTimer::start(sig, Duration::from_nanos(1_000_000_000 / hz), 0).expect("timer_create");
    let mut ring: [Option<NonNull<u8>>; 128] = [None; 128];
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let i = (rand() % 128) as usize;
        if let Some(p) = ring[i].take() {
            // SAFETY: allocated below from this heap, freed once.
            unsafe { heap.free(p) };
        }
        let size = 16 + (rand() % 500) as usize;
        ring[i] = heap.alloc(Layout::from_size_align(size, 8).expect("layout"));
        ops += 1;
    }
    drop(timer);
    for p in ring.into_iter().flatten() {
        // SAFETY: as above.
        unsafe { heap.free(p) };
    }
    ops
}

// ----- the run ---------------------------------------------------------------------

/// Command-line options.
#[derive(Debug, Clone)]
struct Args {
    seconds: f64,
    threads: usize,
    /// Timer signals per second per thread.
    hz: u64,
    /// New flows per signal during a peak.
    burst: usize,
    idle_ms: u64,
    /// The preallocated design's capacity; 0: the worst case of the traffic
    /// pattern (peak rate sustained for one idle timeout).
    max_flows: usize,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            seconds: 5.0,
            threads: 2,
            hz: 1000,
            burst: 64,
            idle_ms: 200,
            max_flows: 0,
        }
    }
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args::default();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--seconds" => a.seconds = num(&value("--seconds")?)?,
                "--threads" => a.threads = num(&value("--threads")?)?,
                "--hz" => a.hz = num(&value("--hz")?)?,
                "--burst" => a.burst = num(&value("--burst")?)?,
                "--idle-ms" => a.idle_ms = num(&value("--idle-ms")?)?,
                "--max-flows" => a.max_flows = num(&value("--max-flows")?)?,
                _ => {
                    return Err(format!(
                        "unknown argument {arg}\nusage: flow_table [--seconds N] [--threads N] \
                         [--hz N] [--burst N] [--idle-ms N] [--max-flows N]"
                    ))
                }
            }
        }
        if a.threads == 0
            || a.hz == 0
            || a.hz > 20_000
            || a.idle_ms == 0
            || !a.seconds.is_finite()
            || a.seconds <= 0.0
        {
            return Err(
                "--seconds, --threads, --hz (<= 20000) and --idle-ms must be positive".into(),
            );
        }
        Ok(a)
    }

    /// The capacity a preallocated table needs for this traffic: the peak
    /// rate of new flows sustained for the longest an entry lives (the idle
    /// timeout plus one expiry sweep), plus the recent flows kept alive.
    fn worst_case_flows(&self) -> usize {
        let new_per_ms = self.threads as f64 * self.hz as f64 / 1000.0 * self.burst as f64;
        (new_per_ms * (self.idle_ms + self.sweep_ms()) as f64) as usize + RECENT as usize
    }

    /// How often the expirer sweeps.
    fn sweep_ms(&self) -> u64 {
        self.idle_ms / 4 + 1
    }
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Report {
    args: Args,
    seconds: f64,
    signals: u64,
    packets: u64,
    new_flows: u64,
    no_memory: u64,
    races_lost: u64,
    expired: u64,
    entry_size: usize,
    entry_class: usize,
    max_flows: usize,
    live_avg: f64,
    live_peak: usize,
    /// Heap bytes in pages (not free), average and peak over the run.
    heap_avg: f64,
    heap_peak: usize,
    /// Heap bytes in pages (not free) before the run.
    heap_before: usize,
    duplicates: usize,
    live_after: usize,
    nolock_fail_busy: u64,
    nolock_fail_empty: u64,
    worker_ops: u64,
}

impl Report {
    fn found_memory(&self) -> f64 {
        1.0 - self.no_memory as f64 / self.new_flows.max(1) as f64
    }

    fn print(&self) {
        let a = &self.args;
        println!(
            "flow table, {:.1} s: {} threads x {} Hz timer signals; {} new flows per signal \
             during {} ms of every {} ms, {} otherwise; {} packets per signal to recent flows; \
             idle timeout {} ms",
            self.seconds,
            a.threads,
            a.hz,
            a.burst,
            PEAK_MS,
            PERIOD_MS,
            BASE_NEW.load(Ordering::Relaxed),
            PACKETS_PER_SIGNAL.load(Ordering::Relaxed),
            a.idle_ms
        );
        println!(
            "signals {} ({:.0}/s per thread delivered), packets {}, new flows {}, found memory \
             {:.3}% ({} without), insert races lost {}, expired {}; worker allocator ops {}",
            self.signals,
            self.signals as f64 / self.seconds / a.threads as f64,
            self.packets,
            self.new_flows,
            100.0 * self.found_memory(),
            self.no_memory,
            self.races_lost,
            self.expired,
            self.worker_ops
        );
        println!(
            "heap nolock failures: {} busy, {} empty; duplicate entries {}; live after expiry {}",
            self.nolock_fail_busy, self.nolock_fail_empty, self.duplicates, self.live_after
        );
        println!();
        let index = BUCKETS * core::mem::size_of::<AtomicPtr<Flow>>();
        let pre = self.max_flows * self.entry_size;
        println!(
            "{:<34} {:>18} {:>26}",
            "",
            "nolock, on demand",
            format!("preallocated ({} flows)", self.max_flows)
        );
        let row = |what: &str, a: String, b: String| println!("{what:<34} {a:>18} {b:>26}");
        row(
            "entry size",
            format!("{} B (class {})", self.entry_size, self.entry_class),
            format!("{} B", self.entry_size),
        );
        row(
            "flows live, average",
            format!("{:.0}", self.live_avg),
            format!("{} slots", self.max_flows),
        );
        row(
            "flows live, peak",
            format!("{}", self.live_peak),
            format!("{} slots", self.max_flows),
        );
        row(
            "entry memory, average",
            bytes(self.live_avg * self.entry_class as f64),
            bytes(pre as f64),
        );
        row(
            "entry memory, peak",
            bytes((self.live_peak * self.entry_class) as f64),
            bytes(pre as f64),
        );
        row(
            "heap pages held (all), average",
            bytes(self.heap_avg),
            "-".into(),
        );
        row(
            "heap pages held (all), peak",
            bytes(self.heap_peak as f64),
            "-".into(),
        );
        row(
            "bucket index (both designs)",
            bytes(index as f64),
            bytes(index as f64),
        );
        println!();
        println!(
            "peak/average load {:.1}x. A preallocated table holds {} for {} flows all the time; \
             on demand, live entries averaged {:.1}% of that and peaked at {:.1}%; the heap's \
             pages (entries, slab slack and caches, the workers' blocks) averaged {} and peaked \
             at {} (held {} before the run).",
            self.live_peak as f64 / self.live_avg.max(1.0),
            bytes(pre as f64),
            self.max_flows,
            100.0 * self.live_avg * self.entry_class as f64 / pre.max(1) as f64,
            100.0 * (self.live_peak * self.entry_class) as f64 / pre.max(1) as f64,
            bytes(self.heap_avg),
            bytes(self.heap_peak as f64),
            bytes(self.heap_before as f64)
        );
    }
}

fn bytes(b: f64) -> String {
    if b >= (1 << 20) as f64 {
        format!("{:.2} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn heap_held(heap: &Heap) -> usize {
    let s = heap.stats().pages;
    (s.total_pages - s.free_pages) * anyalloc::PAGE_SIZE
}

fn run(args: &Args) -> Result<Report, String> {
    let heap: &'static Heap = anyalloc::init().map_err(|e| format!("no heap: {e:?}"))?;
    // Only one run at a time owns the table.
    static OWNER: AtomicBool = AtomicBool::new(false);
    if OWNER.swap(true, Ordering::Acquire) {
        return Err("a flow table run is already in progress".into());
    }
    for c in [&SIGNALS, &PACKETS, &NEW_FLOWS, &NO_MEMORY, &RACES_LOST] {
        c.store(0, Ordering::Relaxed);
    }
    BURST_NEW.store(args.burst, Ordering::Relaxed);
    ORIGIN_NS.store(now_ns(), Ordering::Relaxed);
    let max_flows = if args.max_flows == 0 {
        args.worst_case_flows()
    } else {
        args.max_flows
    };
    let entry_size = core::mem::size_of::<Flow>();
    let entry_class = {
        let p = heap
            .alloc(Layout::new::<Flow>())
            .ok_or("no memory for one flow")?;
        let n = heap.usable_size(p);
        // SAFETY: just allocated, not used.
        unsafe { heap.free(p) };
        n
    };
    let before = heap.stats();
    let heap_before = heap_held(heap);

    let sig = libc::SIGRTMIN() + 3;
    install_handler(sig, on_burst, &[]).expect("sigaction");
    RUNNING.store(true, Ordering::Release);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds);
    let (mut live_sum, mut heap_sum, mut n_samples) = (0f64, 0f64, 0u64);
    let (mut live_peak, mut heap_peak) = (0usize, 0usize);
    let mut expired = 0u64;
    let worker_ops = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.threads)
            .map(|_| s.spawn(|| worker(heap, sig, args.hz, &stop)))
            .collect();
        // The expirer (a normal thread) also samples the load.
        let mut retired = Vec::new();
        let mut last_sweep = Instant::now();
        while start.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(5));
            let live = LIVE.load(Ordering::Relaxed);
            let held = heap_held(heap);
            live_sum += live as f64;
            heap_sum += held as f64;
            n_samples += 1;
            live_peak = live_peak.max(live);
            heap_peak = heap_peak.max(held);
            if last_sweep.elapsed() >= Duration::from_millis(args.sweep_ms()) {
                expired += expire(heap, args.idle_ms, &mut retired) as u64;
                last_sweep = Instant::now();
            }
        }
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .sum::<u64>()
    });
    let seconds = start.elapsed().as_secs_f64();
    RUNNING.store(false, Ordering::Release);
    let duplicates = duplicate_keys();
    let mut retired = Vec::new();
    expire(heap, 0, &mut retired);
    let live_after = LIVE.load(Ordering::Relaxed);
    let after = heap.stats();
    OWNER.store(false, Ordering::Release);
    Ok(Report {
        args: args.clone(),
        seconds,
        signals: SIGNALS.load(Ordering::Relaxed),
        packets: PACKETS.load(Ordering::Relaxed),
        new_flows: NEW_FLOWS.load(Ordering::Relaxed),
        no_memory: NO_MEMORY.load(Ordering::Relaxed),
        races_lost: RACES_LOST.load(Ordering::Relaxed),
        expired,
        entry_size,
        entry_class,
        max_flows,
        live_avg: live_sum / n_samples.max(1) as f64,
        live_peak,
        heap_avg: heap_sum / n_samples.max(1) as f64,
        heap_peak,
        heap_before,
        duplicates,
        live_after,
        nolock_fail_busy: after.nolock_alloc_fail_busy - before.nolock_alloc_fail_busy,
        nolock_fail_empty: after.nolock_alloc_fail_empty - before.nolock_alloc_fail_empty,
        worker_ops,
    })
}

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(r) => r.print(),
        Err(e) => {
            eprintln!("flow_table: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_find_memory_without_preallocation() {
        let args = Args {
            seconds: 1.2,
            ..Args::default()
        };
        let r = run(&args).expect("run");
        r.print();
        assert!(r.signals > 100, "the timers fired: {}", r.signals);
        assert!(r.new_flows > 1000, "flows arrived: {}", r.new_flows);
        assert!(
            r.found_memory() >= 0.999,
            "only {:.3}% of new flows found memory",
            100.0 * r.found_memory()
        );
        assert_eq!(r.nolock_fail_empty, 0, "memory to spare");
        assert_eq!(r.duplicates, 0, "one entry per flow");
        assert_eq!(r.live_after, 0, "expiry freed every entry");
        assert!(r.expired > 0, "the expirer ran during the run");
        assert!(
            r.live_peak * r.entry_class < r.max_flows * r.entry_size,
            "peak {} x {} B not below the preallocated {} x {} B",
            r.live_peak,
            r.entry_class,
            r.max_flows,
            r.entry_size
        );
        assert!(r.live_avg < r.live_peak as f64, "the load was bursty");
    }

    #[test]
    fn arguments_parse() {
        let a = Args::parse(
            ["--seconds", "2", "--max-flows", "100"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!(a.seconds, 2.0);
        assert_eq!(a.max_flows, 100);
        assert!(Args::parse(["--hz", "0"].map(String::from).into_iter()).is_err());
    }
}
