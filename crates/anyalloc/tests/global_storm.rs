//! `Global` as the process's allocator: std collections on threads while
//! signal handlers allocate through `NoLock` and through `Global` itself
//! (re-entry routing), with nested signals (the timers' own, and one forced
//! every 64th handler run while it holds a `NoLock` box). The storm counts,
//! and asserts, signals that interrupted the other signal's handler (nesting)
//! and signals that interrupted a thread inside a `Global` call (re-entry).

use allocator_api2::boxed::Box as NBox;
use allocator_api2::vec::Vec as NVec;
use anyalloc::{Global, NoLock};
use anyalloc_storm::{
    inside, install_handler, raise_here, storm_signals, ErrnoGuard, HandlerEntry, StormCounts,
    ThreadTimer,
};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `Global`, with this thread's in-allocator flag raised around each call
/// ([`inside`]), so a handler can tell that it interrupted one. A
/// handler's own calls raise it too; [`HandlerEntry`] counts only the
/// handlers that interrupted no other handler.
struct Flagged;

// SAFETY: every method forwards to `Global` with the same arguments; the
// flag is a thread-local atomic that neither allocates nor touches memory
// `Global` hands out.
unsafe impl GlobalAlloc for Flagged {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::alloc(&Global, layout) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::dealloc(&Global, ptr, layout) })
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::alloc_zeroed(&Global, layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::realloc(&Global, ptr, layout, new_size) })
    }
}

#[global_allocator]
static A: Flagged = Flagged;

static STOP: AtomicBool = AtomicBool::new(false);
/// Handler runs: all, nested in the other signal's handler, inside a
/// thread's `Global` call.
static COUNTS: StormCounts = StormCounts::new();
/// The first storm signal (`SIGRTMIN`); the second is the next one.
static SIG_A: AtomicI32 = AtomicI32::new(0);
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
static OK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static GLOBAL_BOXES: AtomicU64 = AtomicU64::new(0);

extern "C" fn handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // Held until the handler returns: its nesting level.
    let entry = HandlerEntry::enter();
    let run = COUNTS.record(&entry);
    let n = (sig as u64) ^ COUNTS.signals();
    // NoLock: fallible box and vector.
    ATTEMPTS.fetch_add(1, Relaxed);
    if let Ok(b) = NBox::try_new_in([n; 8], NoLock) {
        OK.fetch_add(1, Relaxed);
        // Every 64th run forces the other signal to nest right here, while
        // this handler holds a NoLock box: this handler is short, so the
        // timers alone make the two nest only a few times per storm.
        if run.is_multiple_of(64) {
            let a = SIG_A.load(Relaxed);
            raise_here(if sig == a { a + 1 } else { a });
        }
        if b.iter().any(|&x| x != n) {
            VIOLATIONS.fetch_add(1, Relaxed);
        }
    }
    ATTEMPTS.fetch_add(1, Relaxed);
    let mut v: NVec<u64, NoLock> = NVec::new_in(NoLock);
    if v.try_reserve(32 + (n as usize % 200)).is_ok() {
        OK.fetch_add(1, Relaxed);
        for i in 0..32 {
            v.push(n + i);
        }
        if v.iter().enumerate().any(|(i, &x)| x != n + i as u64) {
            VIOLATIONS.fetch_add(1, Relaxed);
        }
    }
    // Global through re-entry routing: this is a nolock allocation because
    // the handler may have interrupted the allocator on this thread. Use the
    // fallible raw API: a plain Box::new would abort on failure.
    let layout = Layout::from_size_align(48, 8).unwrap();
    ATTEMPTS.fetch_add(1, Relaxed);
    // SAFETY: non-zero size layout; freed below with the same layout.
    let p = unsafe { std::alloc::alloc(layout) };
    if !p.is_null() {
        OK.fetch_add(1, Relaxed);
        GLOBAL_BOXES.fetch_add(1, Relaxed);
        // SAFETY: p is a live 48-byte block.
        unsafe {
            p.write_bytes(0x5a, 48);
            if *p.add(47) != 0x5a {
                VIOLATIONS.fetch_add(1, Relaxed);
            }
            std::alloc::dealloc(p, layout);
        }
    }
}

#[test]
fn global_survives_a_signal_storm_with_std_collections() {
    let [sig_a, sig_b] = storm_signals();
    SIG_A.store(sig_a, Relaxed);
    install_handler(sig_a, handler, &[]).expect("sigaction A");
    install_handler(sig_b, handler, &[]).expect("sigaction B");
    let shared = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let ta = ThreadTimer::start(sig_a, Duration::from_micros(100), 0); // 10 kHz
                let tb = ThreadTimer::start(sig_b, Duration::from_micros(330), 0);
                let timers = (ta.expect("timer A"), tb.expect("timer B"));
                let mut map: HashMap<u64, String> = HashMap::new();
                let mut tree: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                let mut i = 0u64;
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(3) {
                    i += 1;
                    map.insert(i % 5000, format!("value {i} on {t}"));
                    tree.entry(i % 777).or_default().push(i);
                    if i.is_multiple_of(777) {
                        tree.clear();
                    }
                    if i.is_multiple_of(100) {
                        let v = vec![(i % 251) as u8; 1 + (i as usize * 31) % 70_000];
                        let mut s = shared.lock().unwrap();
                        s.push(v);
                        if s.len() > 64 {
                            // Freed by whichever thread gets here: cross-thread frees.
                            let old = s.remove(0);
                            assert!(old.iter().all(|&b| b == old[0]));
                        }
                    }
                }
                drop(timers);
                for (k, v) in &map {
                    assert!(v.starts_with("value "), "{k}: {v}");
                }
                i
            })
        })
        .collect();
    let ops: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    STOP.store(true, Relaxed);
    let attempts = ATTEMPTS.load(Relaxed);
    let ok = OK.load(Relaxed);
    println!(
        "ops {ops}, signals {}, nested {}, interrupted inside an allocator call {}, \
         nolock attempts {attempts}, ok {ok} ({:.4}%), via Global {}",
        COUNTS.signals(),
        COUNTS.nested(),
        COUNTS.inside(),
        100.0 * ok as f64 / attempts.max(1) as f64,
        GLOBAL_BOXES.load(Relaxed)
    );
    assert_eq!(VIOLATIONS.load(Relaxed), 0);
    COUNTS.assert_storm();
    assert!(
        ok * 1000 >= attempts * 999,
        "nolock success {ok}/{attempts} below 99.9%"
    );
    let heap = anyalloc::global_heap().expect("Global created the heap");
    let s = heap.stats();
    println!(
        "heap: {} objects in use, nolock ok {}, busy {}, empty {}, deferred frees {}",
        s.objects_in_use,
        s.nolock_alloc_ok,
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
        s.nolock_free_deferred
    );
}

/// Runs `attempt` until it succeeds, at most 100 times, yielding between
/// tries: whether it succeeded.
fn retried(mut attempt: impl FnMut() -> bool) -> bool {
    (0..100).any(|_| {
        let ok = attempt();
        if !ok {
            std::thread::yield_now();
        }
        ok
    })
}

/// A block of `layout` (a non-zero size) from the global allocator, with
/// [`retried`]'s tries.
fn alloc_retried(layout: Layout) -> Option<*mut u8> {
    let mut p = std::ptr::null_mut();
    retried(|| {
        // SAFETY: a non-zero size, per the caller.
        p = unsafe { std::alloc::alloc(layout) };
        !p.is_null()
    })
    .then_some(p)
}

#[test]
fn nolock_scope_routes_global_to_the_nolock_path() {
    anyalloc::init().unwrap();
    {
        let _scope = anyalloc::nolock_scope();
        assert!(anyalloc::in_nolock_scope());
        // Each allocation gets a few tries: a nolock allocation fails
        // "busy" while a fork on another thread holds every lock (this
        // file's fork test runs beside this one), and `Box::new` or a
        // growing `Vec` would abort on that.
        let mut v: Vec<Box<[u8; 100]>> = Vec::new();
        let reserved = retried(|| v.try_reserve_exact(100).is_ok());
        while reserved && v.len() < 100 {
            let Some(p) = alloc_retried(Layout::new::<[u8; 100]>()) else {
                break;
            };
            let p = p.cast::<[u8; 100]>();
            // SAFETY: `p` is a fresh block of the global allocator with the
            // layout of `[u8; 100]`: written, then owned by the box.
            v.push(unsafe {
                p.write([1u8; 100]);
                Box::from_raw(p)
            });
        }
        let boxes_ok = v.len() == 100 && v.iter().all(|b| b.iter().all(|&x| x == 1));
        drop(v);
        // The nolock path serves up to 4 MiB: 1 MiB succeeds inside the
        // scope; a 5 MiB block, which the normal path would serve at once
        // (mmap), is refused inside the scope. A nolock allocation may fail
        // "busy" while another thread holds the zone lock (the storm test
        // runs beside this one) and its stock of large blocks is empty, so
        // the 1 MiB request gets a few tries; a busy failure is transient.
        let mut mib: Vec<u8> = Vec::new();
        let served = retried(|| mib.try_reserve_exact(1 << 20).is_ok());
        let mut huge: Vec<u8> = Vec::new();
        let refused = huge.try_reserve_exact(5 << 20).is_err();
        drop((mib, huge));
        // (Asserted outside the scope: a panic inside it would print its
        // message and backtrace through the nolock path.)
        drop(_scope);
        assert!(
            boxes_ok,
            "100 boxes of 100 bytes inside a nolock scope failed"
        );
        assert!(served, "1 MiB inside a nolock scope was refused");
        assert!(
            refused,
            "a 5 MiB Global allocation inside a nolock scope took the normal path"
        );
    }
    assert!(!anyalloc::in_nolock_scope());
    let mut big: Vec<u8> = Vec::new();
    assert!(big.try_reserve_exact(5 << 20).is_ok(), "outside the scope");
}

#[test]
fn fork_child_can_allocate() {
    let _warm: Vec<u8> = vec![1; 1000];
    // SAFETY: the child only allocates through our heap, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let v: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let code = if v[999] == "999" { 0 } else { 1 };
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: {status}"
    );
}
