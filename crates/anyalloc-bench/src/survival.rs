//! Workload 8: survival. Each allocator is called from signal handlers
//! during a storm, through its ordinary API, as a naive user would: the
//! handlers `alloc` and `dealloc` with the same `GlobalAlloc` the threads
//! use. Each run is a child process under a watchdog: it survived (exited
//! cleanly), crashed (killed by a signal, or exited with an error), or hung
//! (still running when the watchdog's time was up; then it is killed).
//!
//! The child's own `#[global_allocator]` is fixed at compile time, so the
//! allocator under test is called explicitly: `System` (glibc), `MiMalloc`,
//! `Jemalloc`, `anyalloc::Global` (whose re-entry routing sends a call that
//! interrupted its own thread inside the allocator to the nolock path),
//! `anyalloc::NoLock`, and an `anyalloc::Heap` used with `alloc`/`free` by
//! the threads and `alloc_nolock`/`free_nolock` by the handlers.
//!
//! Two more rows show what careful users do instead, correct by
//! construction: glibc with every signal blocked around each call
//! (`pthread_sigmask` before and after: a handler can never interrupt
//! malloc, at the price of two syscalls per call), and a preallocated pool
//! for the handlers (glibc for the threads).
//!
//! The storm: `THREADS` threads each keep 256 objects of 8 B to 4 KiB and
//! replace them at random; each has two POSIX timers, signal A at
//! `SIGNAL_HZ` and signal B 3.3 times slower, whose handlers each mask only
//! their own signal (so they nest, depth at most 2). A handler allocates
//! one to four objects of 16 B to 2 KiB and frees each at once or parks it
//! for a later handler (which frees it). A null from the allocator is
//! counted, not fatal.
//!
//! "Survived" means the data survived too: every byte of every block, the
//! threads' and the handlers', is filled with a pattern keyed by its
//! address and a per-allocation nonce kept with its owner (the storm kit's
//! owner-tagged pattern, `anyalloc_storm::pattern`), and read back
//! before the block is freed; a block that fails is counted as corrupted
//! (and not freed). A run survives when the child exits cleanly, handled
//! signals, found no corrupted block, and at least one handler allocation
//! returned memory.
//!
//! Cost: each thread times its churn loop and each handler invocation
//! (`CLOCK_MONOTONIC`); the report gives ns per thread op (free + alloc +
//! fill + check, handler time taken out) and ns per handler allocation
//! (alloc + fill + check + free), the same work for every row.

use std::alloc::{GlobalAlloc, Layout};
use std::io::Read;
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyalloc::Heap;
use serde_json::{json, Value};

use crate::peers::{Alloc, GLOBAL_A, JEMALLOC_A, MIMALLOC_A, SIGMASKED_GLIBC, SYSTEM};
use crate::pools::PreallocPool;
use crate::sys;
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::signal::timer_signal;
use anyalloc_storm::thread::now_ns;
use anyalloc_storm::{
    install_handler, mask, storm_signals, ErrnoGuard, Stash, ThreadTimer, XorShift,
};

/// Worker threads per run.
const MAX_THREADS: usize = 8;
/// Objects a worker keeps.
const LIVE: usize = 256;
/// Objects a thread's handlers may park for a later handler.
const STASH: usize = 16;
/// Rate of signal A per thread.
pub const SIGNAL_HZ: u64 = 10_000;
/// Handler object sizes (the index is a parked entry's kind).
const SIZES: [usize; 8] = [16, 32, 64, 128, 256, 512, 1024, 2048];

/// The allocators, as (child key, printed name).
pub const PEERS: [(&str, &str); 8] = [
    ("glibc", "glibc"),
    ("mimalloc", "mimalloc"),
    ("jemalloc", "jemalloc"),
    ("global", "anyalloc Global"),
    ("nolock", "anyalloc NoLock"),
    ("heap-nolock", "anyalloc Heap nolock"),
    ("glibc-sigmask", CAREFUL_SIGMASK),
    ("prealloc", CAREFUL_POOL),
];

/// glibc with every signal blocked around each call.
pub const CAREFUL_SIGMASK: &str = "careful: glibc, signals blocked per call";
/// glibc for the threads, a preallocated pool for the handlers.
pub const CAREFUL_POOL: &str = "careful: preallocated pool in handlers";

/// Whether the printed name is one of anyalloc's.
pub fn is_anyalloc(name: &str) -> bool {
    name.starts_with("anyalloc")
}

/// Whether the printed name is a peer that is correct by construction
/// (a baseline, not a competitor).
pub fn is_careful(name: &str) -> bool {
    name.starts_with("careful")
}

/// A preallocated pool of objects of the largest handler size, behind
/// `GlobalAlloc`: a null when every object is in use or the request does not
/// fit.
struct Pool(PreallocPool);

// SAFETY: the pool hands each object out once until it is freed; objects are
// 2 KiB, 8-aligned (the pool's base is page-aligned, objects are multiples
// of 8 bytes).
unsafe impl GlobalAlloc for Pool {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > SIZES[SIZES.len() - 1] || layout.align() > 8 {
            return null_mut();
        }
        self.0.alloc().unwrap_or(null_mut())
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the GlobalAlloc contract: an object of this pool.
        unsafe { self.0.free(ptr) };
    }
}

/// An `anyalloc::Heap` seen through `GlobalAlloc`, normal or nolock path.
struct HeapPath(&'static Heap, bool);

// SAFETY: as the adapters in `peers`: blocks from the heap, freed to it;
// both paths of one heap may free each other's blocks.
unsafe impl GlobalAlloc for HeapPath {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let r = if self.1 {
            self.0.alloc_nolock(layout)
        } else {
            self.0.alloc(layout)
        };
        r.map_or(null_mut(), NonNull::as_ptr)
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the GlobalAlloc contract: a live block of this heap.
            unsafe {
                if self.1 {
                    self.0.free_nolock(p)
                } else {
                    self.0.free(p)
                }
            }
        }
    }
}

/// What the handlers call (read with one atomic load: `OnceLock::get`).
static HANDLER: OnceLock<Alloc> = OnceLock::new();

struct ThreadState {
    rng: AtomicU64,
    /// Parked handler blocks: entries whose kind is the size index.
    stash: Stash<STASH>,
}

#[allow(clippy::declare_interior_mutable_const)]
const STATE: ThreadState = ThreadState {
    rng: AtomicU64::new(0),
    stash: Stash::new(),
};
static STATES: [ThreadState; MAX_THREADS] = [STATE; MAX_THREADS];

static SIGNALS: AtomicU64 = AtomicU64::new(0);
static H_ALLOCS: AtomicU64 = AtomicU64::new(0);
static H_NULLS: AtomicU64 = AtomicU64::new(0);
/// Time spent in handlers (all threads), ns.
static H_NS: AtomicU64 = AtomicU64::new(0);
static W_OPS: AtomicU64 = AtomicU64::new(0);
static W_NULLS: AtomicU64 = AtomicU64::new(0);
/// Time the threads spent in their churn loops (handlers included), ns.
static W_NS: AtomicU64 = AtomicU64::new(0);
/// Blocks whose bytes changed while they were allocated (left unfreed).
static CORRUPTED: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

#[inline]
fn layout_of(idx: usize) -> Layout {
    // SAFETY: every entry of SIZES is a valid size for alignment 8.
    unsafe { Layout::from_size_align_unchecked(SIZES[idx], 8) }
}

/// Checks every byte of a block (the storm kit's owner-tagged pattern)
/// and frees it; a block that fails is counted and left allocated. Any
/// context.
///
/// # Safety
/// `e` names a live block of `a` with layout `l`, filled for `e`'s owner,
/// owned by the caller (freed once).
#[inline]
unsafe fn check_and_free(a: Alloc, e: Entry, l: Layout) {
    // SAFETY: per the caller.
    unsafe {
        if pattern::check(e, l.size()).is_ok() {
            a.dealloc(e.ptr(), l);
        } else {
            CORRUPTED.fetch_add(1, Relaxed);
        }
    }
}

/// Frees a parked entry (0: none).
fn free_parked(a: Alloc, e: usize) {
    if e != 0 {
        let e = Entry(e);
        // SAFETY: parked by a handler: a live block of `a` with this layout,
        // filled for this entry, taken out of its stash slot by swap, so
        // freed once.
        unsafe { check_and_free(a, e, layout_of(e.kind())) };
    }
}

fn handle(st: &ThreadState) {
    let Some(&a) = HANDLER.get() else { return };
    let t0 = now_ns();
    SIGNALS.fetch_add(1, Relaxed);
    let mut rng = XorShift::new(st.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed));
    for _ in 0..1 + rng.below(4) {
        let idx = rng.below(SIZES.len() as u64) as usize;
        let l = layout_of(idx);
        // SAFETY: a non-zero size.
        let p = unsafe { a.alloc(l) };
        H_ALLOCS.fetch_add(1, Relaxed);
        if p.is_null() {
            H_NULLS.fetch_add(1, Relaxed);
            continue;
        }
        let e = Entry::fresh(p as usize, idx);
        // SAFETY: a fresh block of SIZES[idx] bytes.
        unsafe { pattern::fill(e, l.size()) };
        if rng.below(2) == 0 {
            // SAFETY: just allocated with `l` and filled; freed once.
            unsafe { check_and_free(a, e, l) };
        } else {
            free_parked(a, st.stash.swap(rng.below(STASH as u64) as usize, e.0));
        }
    }
    H_NS.fetch_add(now_ns().wrapping_sub(t0), Relaxed);
}

extern "C" fn on_signal(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
    if let Some(t) = unsafe { timer_signal(info) } {
        if t.value < MAX_THREADS {
            handle(&STATES[t.value]);
        }
    }
}

fn worker(i: usize, a: Alloc, ready: &std::sync::Barrier) -> Result<(), String> {
    STATES[i].rng.store(0xABCD ^ ((i as u64) << 32), Relaxed);
    let mut rng = XorShift::new(0x5EED + i as u64);
    // (entry, size); entry 0: none.
    let mut live = vec![(0usize, 0usize); LIVE];
    let [sa, sb] = storm_signals();
    let period = Duration::from_nanos(1_000_000_000 / SIGNAL_HZ);
    let ta = ThreadTimer::start(sa, period, i).map_err(|e| format!("timer: {e}"))?;
    let tb = ThreadTimer::start(sb, period * 33 / 10, i).map_err(|e| format!("timer: {e}"))?;
    mask(&storm_signals(), false);
    ready.wait();
    let t0 = now_ns();
    while !STOP.load(Relaxed) {
        for _ in 0..64 {
            let j = rng.below(LIVE as u64) as usize;
            let (e, size) = live[j];
            if e != 0 {
                // SAFETY: a live block of `a` of this size, filled for this
                // entry, freed once.
                unsafe { check_and_free(a, Entry(e), Layout::from_size_align_unchecked(size, 8)) };
            }
            let size = 8 + rng.below(4089) as usize;
            // SAFETY: 8 <= size <= 4096 with alignment 8: a valid layout.
            let l = unsafe { Layout::from_size_align_unchecked(size, 8) };
            // SAFETY: a non-zero size.
            let q = unsafe { a.alloc(l) };
            if q.is_null() {
                W_NULLS.fetch_add(1, Relaxed);
                live[j] = (0, 0);
            } else {
                let e = Entry::fresh(q as usize, 0);
                // SAFETY: a fresh block of `size` bytes.
                unsafe { pattern::fill(e, size) };
                live[j] = (e.0, size);
            }
        }
        W_OPS.fetch_add(64, Relaxed);
    }
    W_NS.fetch_add(now_ns() - t0, Relaxed);
    drop((ta, tb));
    mask(&storm_signals(), true);
    for (e, size) in live {
        if e != 0 {
            // SAFETY: as above.
            unsafe { check_and_free(a, Entry(e), Layout::from_size_align_unchecked(size, 8)) };
        }
    }
    let h = *HANDLER.get().expect("set");
    for e in STATES[i].stash.drain() {
        free_parked(h, e);
    }
    Ok(())
}

/// The child: `survival <key> <seconds>`. Prints one JSON object and exits
/// 0 when the storm ended and every thread finished.
pub fn child(args: &[String]) -> i32 {
    let (Some(key), Some(secs)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<f64>().ok()),
    ) else {
        eprintln!("survival child: expected <key> <seconds>");
        return 64;
    };
    let (workers, handlers): (Alloc, Alloc) = match key.as_str() {
        "glibc" => (&SYSTEM, &SYSTEM),
        "mimalloc" => (&MIMALLOC_A, &MIMALLOC_A),
        "jemalloc" => (&JEMALLOC_A, &JEMALLOC_A),
        "global" => (&GLOBAL_A, &GLOBAL_A),
        "nolock" => {
            static N: anyalloc::NoLock = anyalloc::NoLock;
            // The process-wide heap exists before the first handler runs.
            let _ = anyalloc::init();
            (&N, &N)
        }
        "heap-nolock" => {
            let h: &'static Heap = Box::leak(Box::new(crate::peers::heap()));
            (
                Box::leak(Box::new(HeapPath(h, false))),
                Box::leak(Box::new(HeapPath(h, true))),
            )
        }
        "glibc-sigmask" => (&SIGMASKED_GLIBC, &SIGMASKED_GLIBC),
        "prealloc" => {
            // Enough for every block a thread's handlers can hold at once:
            // the stash, and four in flight at each of two nesting levels.
            let objects = sys::cpus().clamp(1, MAX_THREADS) * (STASH + 8) * 2;
            let pool = PreallocPool::new(SIZES[SIZES.len() - 1], objects);
            (&SYSTEM, Box::leak(Box::new(Pool(pool))))
        }
        other => {
            eprintln!("survival child: unknown allocator {other:?}");
            return 64;
        }
    };
    let _ = HANDLER.set(handlers);
    mask(&storm_signals(), true);
    for s in storm_signals() {
        if let Err(e) = install_handler(s, on_signal, &[]) {
            eprintln!("survival child: sigaction: {e}");
            return 1;
        }
    }
    let threads = sys::cpus().clamp(1, MAX_THREADS);
    let ready = std::sync::Barrier::new(threads + 1);
    let t0 = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let ready = &ready;
                s.spawn(move || worker(i, workers, ready))
            })
            .collect();
        ready.wait();
        std::thread::sleep(Duration::from_secs_f64(secs));
        STOP.store(true, Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("survival child: {e}");
        return 1;
    }
    let (h_allocs, h_ns) = (H_ALLOCS.load(Relaxed), H_NS.load(Relaxed));
    let (w_ops, w_ns) = (W_OPS.load(Relaxed), W_NS.load(Relaxed));
    let out = json!({
        "allocator": key,
        "threads": threads,
        "seconds": t0.elapsed().as_secs_f64(),
        "signals": SIGNALS.load(Relaxed),
        "handler_allocs": h_allocs,
        "handler_nulls": H_NULLS.load(Relaxed),
        "worker_ops": w_ops,
        "worker_nulls": W_NULLS.load(Relaxed),
        "corrupted": CORRUPTED.load(Relaxed),
        // Handler time comes out of the threads' loop time: handlers run
        // only on the worker threads (the main thread blocks the signals).
        "worker_ns_per_op": (w_ops > 0).then(|| w_ns.saturating_sub(h_ns) as f64 / w_ops as f64),
        "handler_ns_per_alloc": (h_allocs > 0).then(|| h_ns as f64 / h_allocs as f64),
    });
    println!("{out}");
    0
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Exited 0 after the storm, and the report shows the data survived;
    /// the child's report.
    Survived(Value),
    /// Exited 0, but the report shows it did not survive (why; the report).
    Failed(String, Value),
    /// Killed by this signal.
    Signal(i32),
    /// Exited with this non-zero code.
    Exit(i32),
    /// Still running at the deadline (killed).
    Hung,
}

impl Outcome {
    /// A short description: `survived`, `SIGSEGV`, `exit 1`, `hung`.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Survived(_) => "survived".into(),
            Outcome::Failed(why, _) => why.clone(),
            Outcome::Signal(s) => signal_name(*s),
            Outcome::Exit(c) => format!("exit {c}"),
            Outcome::Hung => "hung".into(),
        }
    }
}

/// A clean exit of a survival child counts as survival only if its report
/// shows it: signals were handled, no block was corrupted, and at least one
/// handler allocation returned memory.
pub fn judge(o: Outcome) -> Outcome {
    let Outcome::Survived(v) = o else { return o };
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let why = if n("signals") == 0 {
        Some("no signal handled".to_string())
    } else if n("corrupted") > 0 {
        Some(format!("{} blocks corrupted", n("corrupted")))
    } else if n("handler_allocs") == n("handler_nulls") {
        Some(format!(
            "every handler allocation failed ({} nulls)",
            n("handler_nulls")
        ))
    } else {
        None
    };
    match why {
        Some(w) => Outcome::Failed(w, v),
        None => Outcome::Survived(v),
    }
}

/// `SIGSEGV` and friends.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTRAP => "SIGTRAP".into(),
        s => format!("signal {s}"),
    }
}

/// Runs `cmd` (a child invocation) and waits for it at most `deadline`,
/// then kills it. Returns how it ended and its stdout.
pub fn run_child(mut cmd: std::process::Command, deadline: Duration) -> (Outcome, String) {
    use std::os::unix::process::ExitStatusExt;
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .stdin(std::process::Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            crate::progress(&format!("cannot start a child: {e}"));
            return (Outcome::Exit(-1), String::new());
        }
    };
    let mut stdout = child.stdout.take();
    // Read stdout on a helper thread so a chatty child can't block on a
    // full pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let out = reader.join().unwrap_or_default();
    let outcome = match status {
        None => Outcome::Hung,
        Some(st) => match (st.code(), st.signal()) {
            (Some(0), _) => match serde_json::from_str::<Value>(out.trim()) {
                Ok(v) => Outcome::Survived(v),
                Err(_) => Outcome::Exit(0),
            },
            (Some(c), _) => Outcome::Exit(c),
            (None, Some(s)) => Outcome::Signal(s),
            (None, None) => Outcome::Exit(-1),
        },
    };
    (outcome, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_checked_and_owners_differ() {
        let mut buf = vec![0u64; 513];
        let p = buf.as_mut_ptr() as usize;
        for size in [8, 13, 16, 100, 4096] {
            let (mine, theirs) = (Entry::new(p, 5, 5), Entry::new(p, 5, 6));
            // SAFETY: the buffer holds 4104 bytes.
            unsafe {
                pattern::fill(mine, size);
                assert!(pattern::check(mine, size).is_ok());
                assert!(
                    pattern::check(theirs, size).is_err(),
                    "another owner's nonce"
                );
                for at in [0, size / 2, size - 1] {
                    *(p as *mut u8).add(at) ^= 1;
                    assert!(pattern::check(mine, size).is_err(), "byte {at} of {size}");
                    *(p as *mut u8).add(at) ^= 1;
                }
            }
        }
    }

    #[test]
    fn a_clean_exit_survives_only_with_evidence() {
        let ok = json!({"signals": 10, "corrupted": 0, "handler_allocs": 5, "handler_nulls": 4});
        assert!(matches!(judge(Outcome::Survived(ok)), Outcome::Survived(_)));
        for (bad, why) in [
            (
                json!({"signals": 0, "corrupted": 0, "handler_allocs": 0, "handler_nulls": 0}),
                "no signal",
            ),
            (
                json!({"signals": 9, "corrupted": 2, "handler_allocs": 5, "handler_nulls": 0}),
                "2 blocks corrupted",
            ),
            (
                json!({"signals": 9, "corrupted": 0, "handler_allocs": 5, "handler_nulls": 5}),
                "every handler allocation failed",
            ),
        ] {
            let o = judge(Outcome::Survived(bad));
            assert!(o.describe().starts_with(why), "{}", o.describe());
        }
        assert_eq!(judge(Outcome::Hung), Outcome::Hung);
    }
}
