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
//! The storm: `THREADS` threads each keep 256 objects of 8 B to 4 KiB and
//! replace them at random; each has two POSIX timers, signal A at
//! `SIGNAL_HZ` and signal B 3.3 times slower, whose handlers each mask only
//! their own signal (so they nest, depth at most 2). A handler allocates
//! one to four objects of 16 B to 2 KiB, writes them, and frees each at
//! once or parks it for a later handler (which frees it). A null from the
//! allocator is counted, not fatal.

use std::alloc::{GlobalAlloc, Layout};
use std::io::Read;
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyalloc::Heap;
use serde_json::{json, Value};

use crate::peers::{Alloc, GLOBAL_A, JEMALLOC_A, MIMALLOC_A, SYSTEM};
use crate::sys::{self, XorShift};

/// Worker threads per run.
const MAX_THREADS: usize = 8;
/// Objects a worker keeps.
const LIVE: usize = 256;
/// Objects a thread's handlers may park for a later handler.
const STASH: usize = 16;
/// Rate of signal A per thread.
pub const SIGNAL_HZ: u64 = 10_000;
/// Handler object sizes (the index lives in a parked pointer's low bits).
const SIZES: [usize; 8] = [16, 32, 64, 128, 256, 512, 1024, 2048];

/// The allocators, as (child key, printed name).
pub const PEERS: [(&str, &str); 6] = [
    ("glibc", "glibc"),
    ("mimalloc", "mimalloc"),
    ("jemalloc", "jemalloc"),
    ("global", "anyalloc Global"),
    ("nolock", "anyalloc NoLock"),
    ("heap-nolock", "anyalloc Heap nolock"),
];

/// Whether the printed name is one of anyalloc's.
pub fn is_anyalloc(name: &str) -> bool {
    name.starts_with("anyalloc")
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
    stash: [AtomicUsize; STASH],
}

#[allow(clippy::declare_interior_mutable_const)]
const STATE: ThreadState = ThreadState {
    rng: AtomicU64::new(0),
    stash: [const { AtomicUsize::new(0) }; STASH],
};
static STATES: [ThreadState; MAX_THREADS] = [STATE; MAX_THREADS];

static SIGNALS: AtomicU64 = AtomicU64::new(0);
static H_ALLOCS: AtomicU64 = AtomicU64::new(0);
static H_NULLS: AtomicU64 = AtomicU64::new(0);
static W_OPS: AtomicU64 = AtomicU64::new(0);
static W_NULLS: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

#[inline]
fn layout_of(idx: usize) -> Layout {
    // SAFETY: every entry of SIZES is a valid size for alignment 8.
    unsafe { Layout::from_size_align_unchecked(SIZES[idx], 8) }
}

/// Frees a parked entry (pointer | size index).
fn free_parked(a: Alloc, e: usize) {
    if e != 0 {
        // SAFETY: parked by a handler: a live block of `a` with this layout,
        // taken out of its stash slot by swap, so freed once.
        unsafe { a.dealloc((e & !7) as *mut u8, layout_of(e & 7)) };
    }
}

fn handle(st: &ThreadState) {
    let Some(&a) = HANDLER.get() else { return };
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
        // SAFETY: a fresh block of SIZES[idx] >= 16 bytes.
        unsafe {
            p.write_volatile(0xA5);
            p.add(l.size() - 1).write_volatile(0x5A);
        }
        if rng.below(2) == 0 {
            // SAFETY: just allocated with `l`, freed once.
            unsafe { a.dealloc(p, l) };
        } else {
            let slot = &st.stash[rng.below(STASH as u64) as usize];
            free_parked(a, slot.swap(p as usize | idx, Relaxed));
        }
    }
}

extern "C" fn on_signal(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    sys::preserving_errno(|| {
        // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
        if let Some(i) = unsafe { sys::timer_value(info) } {
            if i < MAX_THREADS {
                handle(&STATES[i]);
            }
        }
    });
}

fn signals() -> [libc::c_int; 2] {
    [libc::SIGRTMIN(), libc::SIGRTMIN() + 1]
}

fn worker(i: usize, a: Alloc, ready: &std::sync::Barrier) -> Result<(), String> {
    STATES[i].rng.store(0xABCD ^ ((i as u64) << 32), Relaxed);
    let mut rng = XorShift::new(0x5EED + i as u64);
    let mut live = vec![(0usize, 0usize); LIVE];
    let [sa, sb] = signals();
    let period = Duration::from_nanos(1_000_000_000 / SIGNAL_HZ);
    let ta = sys::ThreadTimer::start(sa, period, i).map_err(|e| format!("timer: {e}"))?;
    let tb = sys::ThreadTimer::start(sb, period * 33 / 10, i).map_err(|e| format!("timer: {e}"))?;
    sys::mask(&signals(), false);
    ready.wait();
    while !STOP.load(Relaxed) {
        for _ in 0..64 {
            let j = rng.below(LIVE as u64) as usize;
            let (p, size) = live[j];
            if p != 0 {
                // SAFETY: a live block of `a` of this size, freed once.
                unsafe { a.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, 8)) };
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
                // SAFETY: a fresh block of `size` bytes.
                unsafe {
                    q.write_volatile(1);
                    q.add(size - 1).write_volatile(2);
                }
                live[j] = (q as usize, size);
            }
        }
        W_OPS.fetch_add(64, Relaxed);
    }
    drop((ta, tb));
    sys::mask(&signals(), true);
    for (p, size) in live {
        if p != 0 {
            // SAFETY: as above.
            unsafe { a.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, 8)) };
        }
    }
    let h = *HANDLER.get().expect("set");
    for s in &STATES[i].stash {
        free_parked(h, s.swap(0, Relaxed));
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
        other => {
            eprintln!("survival child: unknown allocator {other:?}");
            return 64;
        }
    };
    let _ = HANDLER.set(handlers);
    let [sa, sb] = signals();
    sys::mask(&signals(), true);
    for s in [sa, sb] {
        if let Err(e) = sys::install_handler(s, on_signal, &[]) {
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
    let out = json!({
        "allocator": key,
        "threads": threads,
        "seconds": t0.elapsed().as_secs_f64(),
        "signals": SIGNALS.load(Relaxed),
        "handler_allocs": H_ALLOCS.load(Relaxed),
        "handler_nulls": H_NULLS.load(Relaxed),
        "worker_ops": W_OPS.load(Relaxed),
        "worker_nulls": W_NULLS.load(Relaxed),
    });
    println!("{out}");
    0
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Exited 0 after the storm; the child's report.
    Survived(Value),
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
            Outcome::Signal(s) => signal_name(*s),
            Outcome::Exit(c) => format!("exit {c}"),
            Outcome::Hung => "hung".into(),
        }
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
