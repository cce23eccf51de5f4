//! `Heap::pages()` in a crossfire: worker threads churn every order
//! (0..=10) on the normal page path of a heap that starts at 8 MiB and
//! grows, while two per-thread timer signals (nesting both ways) allocate
//! and free every order from their handlers, through both the routed calls
//! (`alloc_pages` / `free_pages`: nolock when the handler interrupted the
//! allocator, normal otherwise) and the nolock ones, and free blocks other
//! threads and handlers allocated; meanwhile a housekeeping thread runs
//! maintenance passes, `trim` (blocks going back to the OS) and `drain`,
//! and another thread forks again and again: each child (page locks held
//! across the fork, other threads gone mid-call) must serve every order on
//! the normal path, drain, and keep its invariants. Every block carries an owner-tagged pattern checked at its free. At the
//! end, everything freed and drained: every page free and on the buddy
//! lists, every invariant holding, and the allocator's nolock successes
//! those of the handlers' nolock calls (plus routed ones that went nolock). Run twice, each in a child under a watchdog (a
//! deadlock fails the test instead of hanging it): with the rseq fast path
//! and with glibc's rseq off (`GLIBC_TUNABLES=glibc.pthread.rseq=0`: the
//! try-locked slots). The storm lasts at least two seconds and until
//! handlers interrupted page calls 100 times, not for a fixed time only.

mod common;
mod watchdog;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyalloc::{Config, FastPath, Heap, PageAllocator, MAX_ORDER};
use anyalloc_storm::{
    inside, install_handler, mask, mix64, raise_here, storm_signals, ErrnoGuard, HandlerEntry,
    Stash, ThreadTimer, XorShift,
};
use common::{check, fill, pack, unpack};

const THREADS: usize = 2;
/// What each worker allocates first, under its timers, and keeps: two
/// workers together more than the heap's first 8 MiB, so it grows during
/// the storm.
const FIRST_HOLD: usize = 16 << 20;
/// Handler runs that must have interrupted a page call before the storm
/// ends (and at least two seconds).
const MIN_INTERRUPTED: u64 = 100;
/// The watchdog's limit: a storm that completes takes seconds.
const LIMIT: Duration = Duration::from_secs(300);
/// A worker holds at most this many pages at once (64 MiB).
const HELD_PAGES: usize = 16 << 10;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// Blocks any context may free: workers and handlers put and take.
static SHARED: Stash<512> = Stash::new();
static RNG: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The handlers' explicit nolock allocations: tried / served.
static NOLOCK_TRIED: AtomicU64 = AtomicU64::new(0);
static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
/// Handler runs that interrupted a worker's page call.
static INTERRUPTED: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);
static HANDLER_FREES: AtomicU64 = AtomicU64::new(0);
static ROUTED_OK: AtomicU64 = AtomicU64::new(0);

const KIND_WORKER: usize = 1;
const KIND_HANDLER: usize = 2;
const KIND_CHILD: usize = 3;

fn pages() -> &'static PageAllocator {
    // SAFETY: set before any timer or worker starts, cleared after they
    // all stopped; the heap outlives them.
    unsafe { (*HEAP.load(Ordering::Acquire)).pages() }
}

/// Any context: checks the pattern and frees `h` by the route `r` picks.
fn free_handle(h: usize, r: u64) {
    // SAFETY: the caller owns `h` (taken out of a stash or its own list).
    if !unsafe { check(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let (ptr, order, _) = unpack(h);
    let p = NonNull::new(ptr as *mut u8).unwrap();
    // SAFETY: allocated from `pages()` with `order`, owned, freed once.
    unsafe {
        if r & 1 == 0 {
            pages().free_pages(p, order)
        } else {
            pages().free_pages_nolock(p, order)
        }
    }
}

/// An order: 0..=3 three times in four, else 4..=10.
fn order_of(r: u64) -> u32 {
    if !r.is_multiple_of(4) {
        ((r >> 2) % 4) as u32
    } else {
        4 + ((r >> 2) % (MAX_ORDER as u64 - 3)) as u32
    }
}

extern "C" fn on_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    let entry = HandlerEntry::enter();
    if entry.interrupted_allocator() {
        INTERRUPTED.fetch_add(1, Ordering::Relaxed);
    }
    if entry.nested() {
        NESTED.fetch_add(1, Ordering::Relaxed);
    }
    let pa = pages();
    let r = mix64(RNG.fetch_add(1, Ordering::Relaxed));
    let order = order_of(r);
    let got = if (r >> 8) & 1 == 0 {
        NOLOCK_TRIED.fetch_add(1, Ordering::Relaxed);
        let p = pa.alloc_pages_nolock(order);
        if p.is_some() {
            NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
        }
        p
    } else {
        let p = pa.alloc_pages(order);
        if p.is_some() {
            ROUTED_OK.fetch_add(1, Ordering::Relaxed);
        }
        p
    };
    if let Some(p) = got {
        let h = pack(p.as_ptr() as usize, order, KIND_HANDLER);
        // SAFETY: just allocated: this handler owns it.
        unsafe { fill(h) };
        // Now and then the other signal nests right here.
        if (r >> 10).is_multiple_of(32) {
            let [a, b] = storm_signals();
            raise_here(if sig == a { b } else { a });
        }
        if !SHARED.put(h, (r >> 16) as usize) {
            HANDLER_FREES.fetch_add(1, Ordering::Relaxed);
            free_handle(h, r >> 9);
        }
    }
    // Free one shared block (a worker's, another handler's) half of the time.
    if (r >> 40) & 1 == 0 {
        if let Some(h) = SHARED.take((r >> 24) as usize) {
            HANDLER_FREES.fetch_add(1, Ordering::Relaxed);
            free_handle(h, r >> 41);
        }
    }
    drop(entry);
}

fn worker(index: usize, stop: &AtomicBool) {
    let [a, b] = storm_signals();
    let timers = [
        ThreadTimer::start(a, Duration::from_micros(150), index).expect("timer A"),
        ThreadTimer::start(b, Duration::from_micros(170), index).expect("timer B"),
    ];
    let pa = pages();
    let mut rng = XorShift::new(0xc0ff_ee00 + index as u64);
    let mut held: Vec<usize> = Vec::with_capacity(4096);
    let mut held_pages = 0usize;
    while held_pages * anyalloc::PAGE_SIZE < FIRST_HOLD {
        let p = inside(|| pa.alloc_pages(MAX_ORDER)).expect("a growing heap");
        let h = pack(p.as_ptr() as usize, MAX_ORDER, KIND_WORKER);
        // SAFETY: just allocated: owned by this worker.
        unsafe { fill(h) };
        held.push(h);
        held_pages += 1 << MAX_ORDER;
    }
    while !stop.load(Ordering::Relaxed) {
        let r = rng.next_u64();
        let order = order_of(r);
        if held_pages + (1 << order) <= HELD_PAGES {
            match inside(|| pa.alloc_pages(order)) {
                Some(p) => {
                    let h = pack(p.as_ptr() as usize, order, KIND_WORKER);
                    // SAFETY: just allocated: owned by this worker.
                    unsafe { fill(h) };
                    if (r >> 20).is_multiple_of(8) && SHARED.put(h, (r >> 24) as usize) {
                        // handed over
                    } else {
                        held.push(h);
                        held_pages += 1 << order;
                    }
                }
                None => panic!("the normal path ran out in a growing heap"),
            }
        }
        // Free a random held block (two frees per allocation at most).
        for k in 0..2 {
            if held.is_empty() || (r >> (30 + k)) & 1 == 0 {
                continue;
            }
            let i = (r >> 34) as usize % held.len();
            let h = held.swap_remove(i);
            held_pages -= 1 << unpack(h).1;
            inside(|| free_handle(h, r >> (36 + k)));
        }
        if (r >> 50).is_multiple_of(16) {
            if let Some(h) = SHARED.take((r >> 54) as usize) {
                inside(|| free_handle(h, r >> 60));
            }
        }
    }
    // No handler may run from here on, on this thread.
    mask(&[a, b], true);
    drop(timers);
    for h in held {
        free_handle(h, 0);
    }
}

/// In a forked child (the forking thread alone, every other thread of the
/// parent gone wherever it was): every order on both paths (the normal
/// path must serve each), a drain, the invariants and a sane count. Exits
/// with a code saying what failed.
fn forked_child() -> ! {
    let pa = pages();
    let mut code = 0;
    for order in 0..=MAX_ORDER {
        for nolock in [false, true] {
            let p = if nolock {
                pa.alloc_pages_nolock(order)
            } else {
                pa.alloc_pages(order)
            };
            match p {
                Some(p) => {
                    let h = pack(p.as_ptr() as usize, order, KIND_CHILD);
                    // SAFETY: just allocated with `order`: the child's
                    // (filled and checked, then freed once).
                    unsafe {
                        fill(h);
                        if !check(h) {
                            code = 5;
                        }
                        pa.free_pages(p, order)
                    }
                }
                None if !nolock => code = 2,
                None => {}
            }
        }
    }
    pa.drain();
    // A nolock level's slot that another thread of the parent was inside
    // at the clone stays held here, its list out of reach (the `fork`
    // module's "Not covered"): the one failure the check may report.
    const HELD: &str = "a slot is held during an invariant check";
    if let Err(e) = pa
        .check_invariants()
        .or_else(|e| if e == HELD { Ok(()) } else { Err(e) })
    {
        let line = format!("child: invariant broken: {e}\n");
        // SAFETY: writes the buffer's bytes to stderr.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
        code = 3;
    }
    let s = pa.stats();
    if s.free_pages > s.total_pages {
        code = 4;
    }
    // SAFETY: `_exit` ends the child at once.
    unsafe { libc::_exit(code) }
}

/// Forks while the storm runs; each child must finish its checks.
fn forker(stop: &AtomicBool) -> (u64, Vec<String>) {
    let mut forks = 0;
    let mut bad = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the child only runs `forked_child`, which ends in `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            forked_child();
        }
        forks += 1;
        match watchdog::wait_child(pid, Duration::from_secs(60)) {
            None => {
                bad.push(format!("fork {forks}: the child hung"));
                break;
            }
            Some(st) if !watchdog::exited_ok(st) => {
                bad.push(format!("fork {forks}: child status {st:#x}"));
            }
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (forks, bad)
}

fn housekeeper(heap: &Heap, stop: &AtomicBool) -> u64 {
    let mut passes = 0;
    while !stop.load(Ordering::Relaxed) {
        heap.maintain();
        if passes % 4 == 0 {
            heap.trim();
        }
        heap.pages().drain();
        let _ = heap.pages().stats();
        passes += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    passes
}

fn reset() {
    for c in [
        &VIOLATIONS,
        &NOLOCK_TRIED,
        &NOLOCK_OK,
        &INTERRUPTED,
        &NESTED,
        &HANDLER_FREES,
        &ROUTED_OK,
    ] {
        c.store(0, Ordering::Relaxed);
    }
}

fn crossfire(expect: Option<FastPath>) {
    reset();
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(8 << 20)
                .grow(true)
                .maintenance(false),
        )
        .unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    let fast = heap.pages().stats().fast_path;
    if let Some(expect) = expect {
        assert_eq!(fast, expect);
    }
    let before = heap.pages().stats();
    let [a, b] = storm_signals();
    install_handler(a, on_signal, &[]).unwrap();
    install_handler(b, on_signal, &[]).unwrap();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let passes = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|i| {
                let stop = &stop;
                s.spawn(move || worker(i, stop))
            })
            .collect();
        let hk = s.spawn(|| housekeeper(heap, &stop));
        let fk = s.spawn(|| forker(&stop));
        // (Not a time limit: the watchdog bounds a storm that never ends.)
        // A worker only returns once stopped: one that did before has
        // failed, and its join below reports why (the storm would
        // otherwise wait for its interruptions from fewer workers).
        while (start.elapsed() < Duration::from_secs(2)
            || INTERRUPTED.load(Ordering::Relaxed) < MIN_INTERRUPTED)
            && !workers.iter().any(|w| w.is_finished())
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let (forks, bad) = fk.join().unwrap();
        println!("{forks} forks");
        assert!(bad.is_empty(), "forked children failed: {bad:?}");
        hk.join().unwrap()
    });
    for h in SHARED.drain() {
        free_handle(h, 1);
    }
    let pa = heap.pages();
    pa.drain();
    let s = pa.stats();
    println!(
        "{fast:?}: {:?}, {passes} housekeeping passes, zones {}, \
         interrupted {}, nested {}, handler frees {}, nolock {}/{}, routed ok {}",
        start.elapsed(),
        s.zones,
        INTERRUPTED.load(Ordering::Relaxed),
        NESTED.load(Ordering::Relaxed),
        HANDLER_FREES.load(Ordering::Relaxed),
        NOLOCK_OK.load(Ordering::Relaxed),
        NOLOCK_TRIED.load(Ordering::Relaxed),
        ROUTED_OK.load(Ordering::Relaxed),
    );
    assert_eq!(
        VIOLATIONS.load(Ordering::Relaxed),
        0,
        "two owners of one block"
    );
    assert_eq!(pa.check_invariants(), Ok(()));
    assert_eq!(s.free_pages, s.total_pages, "pages lost: {s:?}");
    assert_eq!(
        s.buddy_pages, s.total_pages,
        "drain left pages off the lists: {s:?}"
    );
    assert!(s.zones > 1, "the heap never grew: {s:?}");
    assert!(
        INTERRUPTED.load(Ordering::Relaxed) > 0,
        "no handler interrupted a page call"
    );
    assert!(HANDLER_FREES.load(Ordering::Relaxed) > 0);
    // The nolock counters: the handlers' explicit calls, plus the routed
    // calls that went nolock (at most every routed success).
    let counted = s.nolock_alloc_ok - before.nolock_alloc_ok;
    let explicit = NOLOCK_OK.load(Ordering::Relaxed);
    assert!(
        counted >= explicit && counted <= explicit + ROUTED_OK.load(Ordering::Relaxed),
        "nolock successes counted {counted}, the handlers saw {explicit} (+ routed)"
    );
    HEAP.store(std::ptr::null_mut(), Ordering::Release);
}

#[test]
fn crossfire_with_the_rseq_fast_path() {
    let name = "crossfire_with_the_rseq_fast_path";
    if watchdog::ran_in_child(name, LIMIT, name) {
        return;
    }
    crossfire(None);
}

#[test]
fn crossfire_with_glibc_rseq_off() {
    let name = "crossfire_with_glibc_rseq_off";
    if !watchdog::in_child() {
        let out = watchdog::run_ok(name, &[watchdog::RSEQ_OFF], LIMIT, name);
        print!("{}", out.stdout);
        return;
    }
    crossfire(Some(FastPath::SlotLock));
}
