//! A storm against glibc's own locks that its `fork` takes after every
//! prepare handler (the stdio list lock, the NSS database lock), with the
//! `Global` allocator, a second heap's accounted allocations
//! (`Heap::alloc_in`) and its nolock path (`Heap::alloc_nolock`).
//!
//! Worker threads loop on `fopen`/`fputs`/`fclose`, `fflush(NULL)` and
//! `getpwuid`, each under two per-thread timers (so handlers nest) whose
//! handlers allocate (small, large, huge) and free blocks of all three
//! kinds; forker threads fork (the child allocates from both heaps and
//! exits) under the same timers. Prepare handlers hold every heap lock
//! before glibc takes its own: a handler that interrupted a holder of
//! glibc's locks must not wait for the fork. Afterwards the second heap's
//! objects, large and huge blocks and the group's usage must be back to
//! zero, and the global heap's huge blocks to what they were. The scenario
//! runs in a child process under a watchdog.

mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyalloc::{Config, Global, Group, Heap};
use anyalloc_storm::reentry::{inside, HandlerEntry};
use anyalloc_storm::signal::{install_handler, mask, storm_signals, timer_signal, ThreadTimer};

#[global_allocator]
static A: Global = Global;

const WORKERS: usize = 3;
const FORKERS: usize = 2;
const THREADS: usize = WORKERS + FORKERS;
const RING: usize = 24;
const STORM: Duration = Duration::from_millis(1500);

static HEAP: OnceLock<Heap> = OnceLock::new();
static GROUP: OnceLock<Arc<Group>> = OnceLock::new();
static STOP: AtomicBool = AtomicBool::new(false);
static HANDLED: AtomicU64 = AtomicU64::new(0);
static FORKS: AtomicU64 = AtomicU64::new(0);
static ROUNDS: AtomicU64 = AtomicU64::new(0);
static NULLS: AtomicU64 = AtomicU64::new(0);

/// One ring of blocks per thread and signal: a handler touches only its
/// own thread's, and the other signal's handler has its own ring.
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_RING: [AtomicUsize; RING] = [EMPTY; RING];
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_PAIR: [[AtomicUsize; RING]; 2] = [EMPTY_RING; 2];
static PTRS: [[[AtomicUsize; RING]; 2]; THREADS] = [EMPTY_PAIR; THREADS];
static SIZES: [[[AtomicUsize; RING]; 2]; THREADS] = [EMPTY_PAIR; THREADS];
static SEEDS: [AtomicU64; THREADS * 2] = [const { AtomicU64::new(0) }; THREADS * 2];

fn size_of(r: u64) -> usize {
    match r % 16 {
        0 => (4 << 20) - 4096 + (r as usize >> 4) % 8192, // across 4 MiB
        1 | 2 => 8192 + (r as usize >> 4) % 300_000,
        _ => 16 + (r as usize >> 4) % 2000,
    }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 16).expect("layout")
}

/// The slot's source: 0 `Global`, 1 `alloc_in` (the group), 2 nolock.
fn source(slot: usize) -> usize {
    slot % 3
}

/// Checks and frees the block in `t`/`s`/`slot`, if any. Any context.
fn release(t: usize, s: usize, slot: usize) {
    let p = PTRS[t][s][slot].swap(0, SeqCst);
    if p == 0 {
        return;
    }
    let size = SIZES[t][s][slot].load(SeqCst);
    // SAFETY: the block was allocated with `size` bytes and filled below.
    let (first, last) = unsafe { (*(p as *const u8), *((p + size - 1) as *const u8)) };
    if first != size as u8 || last != (size >> 3) as u8 {
        anyalloc_storm::signal::die("fork_glibc_storm: a block was corrupted\n");
    }
    let heap = HEAP.get().expect("heap");
    match source(slot) {
        // SAFETY: allocated by `A` with this layout, freed once.
        0 => unsafe { A.dealloc(p as *mut u8, layout(size)) },
        // SAFETY: allocated by `heap`, freed once.
        1 => unsafe { heap.free(NonNull::new_unchecked(p as *mut u8)) },
        // SAFETY: allocated by `heap`, freed once.
        _ => unsafe { heap.free_nolock(NonNull::new_unchecked(p as *mut u8)) },
    }
}

/// A few rounds of replacing blocks in `t`'s ring for signal `s`.
/// `strict`: the handler interrupted no allocator call (a worker runs
/// none outside its handlers: libc's calls use glibc's malloc), so its
/// normal allocations take the normal path and must not fail; a nested
/// handler's may take the nolock route, which fails when busy or above
/// 4 MiB.
fn churn(t: usize, s: usize, rounds: usize, strict: bool) {
    let heap = HEAP.get().expect("heap");
    let group = GROUP.get().expect("group");
    let seed = &SEEDS[t * 2 + s];
    for _ in 0..rounds {
        let r = seed
            .load(SeqCst)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed.store(r, SeqCst);
        let r = r >> 24;
        let slot = (r % RING as u64) as usize;
        inside(|| release(t, s, slot));
        let size = if source(slot) == 2 {
            16 + (r as usize >> 8) % 3000 // nolock: no huge blocks
        } else {
            size_of(r >> 8)
        };
        let p = inside(|| match source(slot) {
            // SAFETY: a non-zero size.
            0 => unsafe { A.alloc(layout(size)) },
            1 => heap
                .alloc_in(layout(size), group)
                .map_or(std::ptr::null_mut(), |p| p.as_ptr()),
            _ => heap
                .alloc_nolock(layout(size))
                .map_or(std::ptr::null_mut(), |p| p.as_ptr()),
        });
        if p.is_null() {
            // Nolock allocations may fail while busy; the others must not.
            if source(slot) != 2 && strict {
                NULLS.fetch_add(1, SeqCst);
            }
            continue;
        }
        // SAFETY: `p` has `size` bytes.
        unsafe {
            *p = size as u8;
            *p.add(size - 1) = (size >> 3) as u8;
        }
        SIZES[t][s][slot].store(size, SeqCst);
        PTRS[t][s][slot].store(p as usize, SeqCst);
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = anyalloc_storm::signal::ErrnoGuard::save();
    // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
    let Some(t) = (unsafe { timer_signal(info) }) else {
        return;
    };
    let entry = HandlerEntry::enter();
    HANDLED.fetch_add(1, SeqCst);
    let s = usize::from(sig != storm_signals()[0]);
    let strict = t.value < WORKERS && !entry.nested() && !entry.in_allocator();
    churn(t.value, s, 3, strict);
}

fn start_timers(t: usize, period: Duration) -> [ThreadTimer; 2] {
    let [a, b] = storm_signals();
    let timers = [
        ThreadTimer::start(a, period, t).expect("timer"),
        ThreadTimer::start(b, period * 7 / 3, t).expect("timer"),
    ];
    mask(&storm_signals(), false);
    timers
}

fn stop_timers(t: usize, timers: [ThreadTimer; 2]) {
    mask(&storm_signals(), true);
    drop(timers);
    for s in 0..2 {
        for slot in 0..RING {
            release(t, s, slot);
        }
    }
}

fn worker(t: usize) {
    let path = format!("/tmp/fork_glibc_storm.{}.{t}\0", std::process::id());
    let keep: Vec<*mut libc::FILE> = (0..8)
        // SAFETY: NUL-terminated strings.
        .map(|_| unsafe { libc::fopen(c"/dev/null".as_ptr(), c"w".as_ptr()) })
        .collect();
    assert!(keep.iter().all(|f| !f.is_null()), "fopen failed");
    // From here this thread's own code makes no `Global` call.
    let timers = start_timers(t, Duration::from_micros(40 + 20 * t as u64));
    let mut i = 0usize;
    while !STOP.load(SeqCst) {
        // SAFETY: valid NUL-terminated strings and open streams; fclose
        // once per fopen.
        unsafe {
            match (i + t) % 3 {
                0 => {
                    let f = libc::fopen(path.as_ptr().cast(), c"w+".as_ptr());
                    assert!(!f.is_null(), "fopen failed");
                    for _ in 0..20 {
                        libc::fputs(c"storm storm storm\n".as_ptr(), f);
                    }
                    libc::fclose(f);
                }
                1 => {
                    for &f in &keep {
                        libc::fputs(c"x\n".as_ptr(), f);
                    }
                    libc::fflush(std::ptr::null_mut());
                }
                _ => assert!(!libc::getpwuid(0).is_null(), "getpwuid failed"),
            }
        }
        i += 1;
        ROUNDS.fetch_add(1, SeqCst);
    }
    stop_timers(t, timers);
    for f in keep {
        // SAFETY: opened above, closed once.
        unsafe { libc::fclose(f) };
    }
    // SAFETY: a NUL-terminated path.
    unsafe { libc::unlink(path.as_ptr().cast()) };
}

fn forker(t: usize) {
    let timers = start_timers(t, Duration::from_micros(100 * (t - WORKERS + 1) as u64));
    while !STOP.load(SeqCst) {
        // SAFETY: the child only allocates, frees and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let heap = HEAP.get().expect("heap");
            let group = GROUP.get().expect("group");
            let v = vec![7u8; 100_000];
            let big = vec![3u8; 6 << 20];
            let ok = heap.alloc_in(layout(200), group).map(|p| {
                // SAFETY: allocated just above, freed once.
                unsafe { heap.free(p) };
            });
            let code = i32::from(!(v[99_999] == 7 && big[1] == 3 && ok.is_some()));
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        // Not under the timers: a thread whose handlers take longer than
        // their period (a loaded machine) never returns to its own code,
        // and the wait's 1 ms sleeps would never end (seen: the parent
        // stuck for a minute beside its exited child).
        mask(&storm_signals(), true);
        let status = watchdog::wait_child(pid, Duration::from_secs(20)).expect("a child hung");
        mask(&storm_signals(), false);
        assert!(watchdog::exited_ok(status), "a child failed ({status:#x})");
        FORKS.fetch_add(1, SeqCst);
    }
    stop_timers(t, timers);
}

#[test]
fn a_fork_storm_against_stdio_and_nss_locks() {
    if !watchdog::in_child() {
        for env in [&[][..], &[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")][..]] {
            let out = watchdog::run_ok(
                "a_fork_storm_against_stdio_and_nss_locks",
                env,
                Duration::from_secs(60),
                "a fork storm against glibc's stdio and NSS locks",
            );
            print!("{}", out.stdout);
        }
        return;
    }
    let global = anyalloc::init().expect("global heap");
    let heap = HEAP.get_or_init(|| Heap::new(Config::default()).expect("heap"));
    let group = GROUP.get_or_init(|| Group::new("storm", None, None));
    for (t, seed) in SEEDS.iter().enumerate() {
        seed.store(t as u64 * 7919 + 1, SeqCst);
    }
    // Warm up stdio and NSS before the baseline.
    // SAFETY: getpwuid with a valid uid.
    unsafe { libc::getpwuid(0) };
    // Other threads' first, long-lived blocks (the test harness's main
    // thread sets up its waiting state once it blocks) before any fork:
    // made while a fork holds the locks, they would be mapped beside the
    // heap and stay, and the last check would count them.
    std::thread::sleep(Duration::from_millis(200));
    let huge_before = global.stats().huge_in_use;
    mask(&storm_signals(), true);
    for sig in storm_signals() {
        install_handler(sig, handler, &[]).expect("sigaction");
    }
    let threads: Vec<_> = (0..THREADS)
        .map(|t| std::thread::spawn(move || if t < WORKERS { worker(t) } else { forker(t) }))
        .collect();
    std::thread::sleep(STORM);
    STOP.store(true, SeqCst);
    for t in threads {
        t.join().expect("a storm thread");
    }
    heap.drain();
    global.drain();
    let s = heap.stats();
    let g = global.stats();
    let usage = group.usage();
    println!(
        "{} forks, {} rounds, {} signals handled, {} NULLs; second heap: {} objects, {} large, {} huge in use, {} mapped beside the heap during forks; group usage {usage}; global heap: huge in use {huge_before} -> {}, {} mapped beside",
        FORKS.load(SeqCst),
        ROUNDS.load(SeqCst),
        HANDLED.load(SeqCst),
        NULLS.load(SeqCst),
        s.objects_in_use,
        s.large_in_use,
        s.huge_in_use,
        s.fork_mapped,
        g.huge_in_use,
        g.fork_mapped,
    );
    assert!(
        FORKS.load(SeqCst) > 0 && HANDLED.load(SeqCst) > 0,
        "no storm"
    );
    assert_eq!(NULLS.load(SeqCst), 0, "normal allocations failed");
    assert_eq!(
        (s.objects_in_use, s.large_in_use, s.huge_in_use),
        (0, 0, 0),
        "the second heap's blocks did not all come back"
    );
    assert_eq!(usage, 0, "the group's usage did not come back");
    assert_eq!(g.huge_in_use, huge_before, "global huge blocks leaked");
}
