//! Real signals on a shared object heap.
//!
//! Worker threads churn on the normal path (`Heap::alloc` / `Heap::free`,
//! 8 B to 64 KiB, random lifetimes, a share of the objects handed to another
//! worker and freed there) while each worker's two per-thread POSIX timers
//! (`SIGEV_THREAD_ID`, ~10 kHz each) interrupt it. The two timer signals are
//! different (`SIGRTMIN`, `SIGRTMIN + 1`) and each masks only itself while its
//! handler runs, so each can interrupt the other's handler (nesting is
//! bounded: no `SA_NODEFER`). Handlers allocate and free with the nolock path
//! (8 B to 32 KiB, mostly small; one request in 16 a large block of 64 KiB
//! to 4 MiB, the page allocator's zone try-lock path, or for 64 KiB first
//! the heap's per-CPU list of such blocks; now and then one
//! above 4 MiB, which the nolock path must refuse and count as too large),
//! keep a few objects in a per-thread stash of
//! atomics (no `Vec`, `Box` or printing in a handler) and free them later,
//! possibly from the other signal's handler; they also free objects the
//! workers allocated. A maintenance thread runs `Heap::maintain` every
//! 10 ms meanwhile (deferred frees, stocking the slots that ran empty,
//! returning idle memory to the OS).
//!
//! Every object is filled with the storm kit's owner-tagged pattern
//! (`anyalloc_storm::pattern`: derived from its address, its size and the
//! kind and per-allocation nonce kept in its entry) and checked when it is
//! freed: two owners of the same memory would break it. At the end everything is freed and
//! drained: no object may be left in use, every page must be free and on the
//! buddy lists, the page allocator's invariants must hold, and at least
//! 99.9% of the nolock allocations must have succeeded, the large ones on
//! their own too, with every failure's reason in the stats. Re-entry is
//! counted, not assumed: the storm asserts that signals landed while a worker
//! was inside `Heap::alloc` / `Heap::free`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::signal::signal_value;
use anyalloc_storm::{
    inside, install_handler, raise_here, storm_signals, ErrnoGuard, HandlerEntry, HandlerSlot,
    Stash, ThreadTimer, XorShift,
};

// ----- object sizes ----------------------------------------------------------------

/// Request sizes, ascending. The handlers use the first `HANDLER_SIZES` entries (up to 32 KiB) and the
/// large ones from `LARGE_SIZES` on; the workers the first `WORKER_SIZES`.
const SIZES: [usize; 76] = [
    8,
    9,
    12,
    15,
    16,
    20,
    24,
    28,
    31,
    32,
    40,
    47,
    48,
    56,
    64,
    72,
    80,
    96,
    100,
    112,
    128,
    150,
    160,
    192,
    200,
    224,
    256,
    300,
    320,
    384,
    448,
    500,
    512,
    640,
    700,
    768,
    896,
    1000,
    1024,
    1280,
    1536,
    1792,
    2000,
    2048,
    2560,
    3072,
    3584,
    4000,
    4096,
    5120,
    6000,
    7168,
    8000,
    8192,
    8193,
    12000,
    16384,
    20000,
    24576,
    30000,
    32768,
    40000,
    49152,
    65536, // workers up to here
    65537,
    100_000,
    131_072,
    200_000,
    262_144,
    500_000,
    524_288,
    1_000_000,
    1 << 20,
    2_000_000,
    2 << 20,
    4 << 20,
];
/// Entries of `SIZES` the workers use (up to 64 KiB).
const WORKER_SIZES: usize = 64;
/// The handlers' large entries of `SIZES`: `SIZES[LARGE_SIZES - 1..]` (64 KiB
/// to 4 MiB).
const LARGE_SIZES: usize = 64;
/// What the handlers ask for above 4 MiB (refused on the nolock path).
const TOO_LARGE: usize = (4 << 20) + 1;
/// Entries of `SIZES` the handlers may use (up to 32 KiB).
const HANDLER_SIZES: usize = 61;
/// Entries of `SIZES` up to 1 KiB: the "small" ones most requests use.
const SMALL_SIZES: usize = 39;

const _: () = assert!(SIZES[HANDLER_SIZES - 1] == 32768 && SIZES[SMALL_SIZES - 1] == 1024);
const _: () = assert!(SIZES[LARGE_SIZES - 1] == 65536 && SIZES[SIZES.len() - 1] == 4 << 20);

/// A request layout; aborts instead of panicking (handlers call it).
fn layout(size: usize, align: usize) -> Layout {
    match Layout::from_size_align(size, align) {
        Ok(l) => l,
        Err(_) => std::process::abort(),
    }
}

// ----- the storm's shared state ----------------------------------------------

const MAX_THREADS: usize = 8;
const HANDLER_STASH: usize = 16;
const MAILBOX: usize = 32;
/// Nolock allocation attempts per handler run.
const OPS_PER_SIGNAL: usize = 2;

/// The shared heap (leaked: handlers may only ever see a live heap).
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static SIGNAL_A: AtomicUsize = AtomicUsize::new(0);

/// Per-thread handler state, indexed by the timers' `sigval`.
static HANDLERS: [HandlerSlot<HANDLER_STASH>; MAX_THREADS] =
    [const { HandlerSlot::new() }; MAX_THREADS];

/// Worker `i` frees what lands in `MAILBOXES[i]` (put there by worker `i-1`);
/// its handlers take from it too.
static MAILBOXES: [Stash<MAILBOX>; MAX_THREADS] = [const { Stash::new() }; MAX_THREADS];

/// Kinds of an object's entry (its owner tag, with a fresh nonce): which
/// signal's handler allocated it, or a worker on the normal path.
const KIND_SIGNAL_A: usize = 0;
const KIND_SIGNAL_B: usize = 1;
const KIND_WORKER: usize = 2;

struct Counters {
    signals: [AtomicU64; 2],
    nested: [AtomicU64; 2],
    /// Handler runs that interrupted a worker's allocator call.
    inside: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    fail: AtomicU64,
    /// Of those, the large ones (64 KiB to 4 MiB): attempts, ok, fail, and
    /// of the ok ones those of 64 KiB (which may come from a per-CPU list).
    large: [AtomicU64; 4],
    /// Requests above 4 MiB (not counted in `attempts`): all must fail.
    too_large: AtomicU64,
    too_large_served: AtomicU64,
    handler_frees: AtomicU64,
    handler_frees_other_signal: AtomicU64,
    handler_frees_of_worker_objects: AtomicU64,
    normal_allocs: AtomicU64,
    normal_none: AtomicU64,
    normal_frees: AtomicU64,
    cross_thread_frees: AtomicU64,
    worker_frees_of_handler_objects: AtomicU64,
    violations: AtomicU64,
}

static C: Counters = Counters {
    signals: [const { AtomicU64::new(0) }; 2],
    nested: [const { AtomicU64::new(0) }; 2],
    inside: AtomicU64::new(0),
    attempts: AtomicU64::new(0),
    ok: AtomicU64::new(0),
    fail: AtomicU64::new(0),
    large: [const { AtomicU64::new(0) }; 4],
    too_large: AtomicU64::new(0),
    too_large_served: AtomicU64::new(0),
    handler_frees: AtomicU64::new(0),
    handler_frees_other_signal: AtomicU64::new(0),
    handler_frees_of_worker_objects: AtomicU64::new(0),
    normal_allocs: AtomicU64::new(0),
    normal_none: AtomicU64::new(0),
    normal_frees: AtomicU64::new(0),
    cross_thread_frees: AtomicU64::new(0),
    worker_frees_of_handler_objects: AtomicU64::new(0),
    violations: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ----- handlers ----------------------------------------------------------------

/// The entry (owner tag: `kind` and a fresh nonce) of a new object of
/// `SIZES[idx]` bytes, filled with its pattern.
///
/// # Safety
/// The caller owns the object behind `p`, at least `SIZES[idx]` bytes.
unsafe fn filled(p: NonNull<u8>, idx: usize, kind: usize) -> usize {
    let e = Entry::fresh(p.as_ptr() as usize, kind);
    // SAFETY: per the caller.
    unsafe { pattern::fill(e, SIZES[idx]) };
    e.0
}

/// Checks the pattern of the object behind `h` (its size comes from its
/// header, which its owner's tag must match), counting a violation, and
/// returns the object's pointer.
///
/// # Safety
/// The caller owns the object behind `h`, filled by [`filled`].
unsafe fn checked(h: usize) -> NonNull<u8> {
    let e = Entry(h);
    // SAFETY: per the caller.
    if unsafe { pattern::verify(e) }.is_err() {
        bump(&C.violations);
    }
    // SAFETY: an entry's address is a live object's, never null.
    unsafe { NonNull::new_unchecked(e.ptr()) }
}

/// Checks and nolock-frees an object (in a handler; `which` is the signal).
fn handler_free(heap: &Heap, h: usize, which: usize) {
    // SAFETY: `h` came out of a stash or mailbox through one atomic swap, so
    // this context owns the object.
    let p = unsafe { checked(h) };
    let kind = Entry(h).kind();
    if kind == KIND_WORKER {
        bump(&C.handler_frees_of_worker_objects);
    } else if (kind == KIND_SIGNAL_B) != (which == 1) {
        bump(&C.handler_frees_other_signal);
    }
    bump(&C.handler_frees);
    // SAFETY: allocated by this heap and owned here (see above).
    unsafe { heap.free_nolock(p) };
}

/// The storm's handler (both signals). Async-signal-safe: atomics, plain
/// memory accesses, `tgkill` and the heap's nolock path only.
extern "C" fn storm_handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // Held until the handler returns: its nesting level.
    let entry = HandlerEntry::enter();
    if entry.interrupted_allocator() {
        bump(&C.inside);
    }
    let sig_a = SIGNAL_A.load(Ordering::Relaxed) as libc::c_int;
    let which = usize::from(sig != sig_a);
    bump(&C.signals[which]);
    let heap = HEAP.load(Ordering::Acquire);
    if heap.is_null() {
        return;
    }
    // SAFETY: the heap is leaked, so a non-null pointer stays valid.
    let heap = unsafe { &*heap };
    // SAFETY: a timer signal's siginfo: `si_value` carries the worker index.
    let index = unsafe { signal_value(info) };
    if index >= MAX_THREADS {
        return;
    }
    let st = &HANDLERS[index];
    // A signal never interrupts its own handler: a nested handler
    // interrupted the other signal's, on this thread.
    if entry.nested() {
        bump(&C.nested[which]);
    }
    let run = st.run(which);
    for op in 0..OPS_PER_SIGNAL {
        let r = st.draw((index as u64) << 56);
        // One request in 16 large (64 KiB to 4 MiB; one of those in 64 above
        // 4 MiB); of the rest 7 in 8 small (<= 1 KiB), the others up to 32 KiB.
        let large = (r >> 58).is_multiple_of(16);
        if large && (r >> 3).is_multiple_of(64) {
            bump(&C.too_large);
            if let Some(p) = heap.alloc_nolock(layout(TOO_LARGE, 8)) {
                bump(&C.too_large_served);
                // SAFETY: just allocated here, not used.
                unsafe { heap.free_nolock(p) };
            }
            continue;
        }
        let idx = if large {
            LARGE_SIZES - 1 + ((r >> 3) % (SIZES.len() - LARGE_SIZES + 1) as u64) as usize
        } else if !r.is_multiple_of(8) {
            ((r >> 3) % SMALL_SIZES as u64) as usize
        } else {
            SMALL_SIZES + ((r >> 3) % (HANDLER_SIZES - SMALL_SIZES) as u64) as usize
        };
        let align = [1, 8, 16, 64][((r >> 12) % 4) as usize];
        bump(&C.attempts);
        if large {
            bump(&C.large[0]);
        }
        match heap.alloc_nolock(layout(SIZES[idx], align)) {
            Some(p) => {
                bump(&C.ok);
                if large {
                    bump(&C.large[1]);
                    if SIZES[idx] <= 64 << 10 {
                        bump(&C.large[3]);
                    }
                }
                if !(p.as_ptr() as usize).is_multiple_of(align) {
                    bump(&C.violations);
                }
                let kind = if which == 1 {
                    KIND_SIGNAL_B
                } else {
                    KIND_SIGNAL_A
                };
                // SAFETY: just allocated: this context owns it.
                let h = unsafe { filled(p, idx, kind) };
                // Every 64th run forces the other signal to nest right here,
                // while this handler holds an object it has not stashed.
                if op == 0 && run.is_multiple_of(64) {
                    raise_here(sig_a + (1 - which) as libc::c_int);
                }
                if !st.stash.put(h, (r >> 32) as usize) {
                    handler_free(heap, h, which);
                }
            }
            None => {
                bump(&C.fail);
                if large {
                    bump(&C.large[2]);
                }
            }
        }
        // Free a stashed object half of the time (maybe the other signal's).
        if (r >> 40) & 1 == 0 {
            if let Some(h) = st.stash.take((r >> 44) as usize) {
                handler_free(heap, h, which);
            }
        }
        // Now and then free an object a worker allocated on the normal path.
        if (r >> 50).is_multiple_of(16) {
            if let Some(h) = MAILBOXES[index].take((r >> 54) as usize) {
                handler_free(heap, h, which);
            }
        }
    }
}

// ----- workers -----------------------------------------------------------------

fn worker_free(heap: &Heap, h: usize) {
    // SAFETY: the worker owns `h` (its own list, or swapped out of a stash).
    let p = unsafe { checked(h) };
    bump(&C.normal_frees);
    // SAFETY: allocated by this heap, owned here.
    inside(|| unsafe { heap.free(p) });
}

fn worker(heap: &'static Heap, index: usize, threads: usize, stop: &AtomicBool) {
    let sig_a = SIGNAL_A.load(Ordering::Relaxed) as libc::c_int;
    let timers = [
        ThreadTimer::start(sig_a, Duration::from_micros(100), index).expect("timer A"),
        ThreadTimer::start(sig_a + 1, Duration::from_micros(110), index).expect("timer B"),
    ];
    let mut rng = XorShift::new(0x5eed + index as u64);
    // (handle, expiry)
    let mut held: Vec<(usize, u64)> = Vec::with_capacity(4096);
    let mut now = 0u64;
    let next_box = &MAILBOXES[(index + 1) % threads];
    while !stop.load(Ordering::Relaxed) {
        now += 1;
        let r = rng.next_u64();
        if held.len() < 3000 {
            let idx = if !r.is_multiple_of(8) {
                ((r >> 3) % SMALL_SIZES as u64) as usize
            } else {
                SMALL_SIZES + ((r >> 3) % (WORKER_SIZES - SMALL_SIZES) as u64) as usize
            };
            let align = [1, 8, 16, 64, 1, 8, 16, 4096][((r >> 12) % 8) as usize];
            let l = layout(SIZES[idx], align);
            match inside(|| heap.alloc(l)) {
                Some(p) => {
                    bump(&C.normal_allocs);
                    if !(p.as_ptr() as usize).is_multiple_of(align) {
                        bump(&C.violations);
                    }
                    // SAFETY: just allocated: owned by this worker.
                    let h = unsafe { filled(p, idx, KIND_WORKER) };
                    // Lifetimes: mostly short, some long.
                    let life = if (r >> 30).is_multiple_of(4) {
                        (r >> 32) % 4096
                    } else {
                        (r >> 32) % 64
                    };
                    held.push((h, now + life));
                }
                None => bump(&C.normal_none),
            }
        }
        // Look at a few random held objects; free (or hand over) the expired.
        for k in 0..3 {
            if held.is_empty() {
                break;
            }
            let i = ((r >> (k * 16)) % held.len() as u64) as usize;
            if held[i].1 <= now {
                let (h, _) = held.swap_remove(i);
                if threads > 1 && (r >> 48).is_multiple_of(8) && next_box.put(h, (r >> 52) as usize)
                {
                    continue;
                }
                worker_free(heap, h);
            }
        }
        // Objects another worker handed over.
        if (r >> 56).is_multiple_of(4) {
            if let Some(h) = MAILBOXES[index].take((r >> 58) as usize) {
                bump(&C.cross_thread_frees);
                worker_free(heap, h);
            }
        }
        // Now and then free an object this thread's handlers stashed.
        if (r >> 60) == 0 {
            if let Some(h) = HANDLERS[index].stash.take(r as usize) {
                bump(&C.worker_frees_of_handler_objects);
                worker_free(heap, h);
            }
        }
    }
    drop(timers);
    for (h, _) in held.drain(..) {
        worker_free(heap, h);
    }
}

#[test]
fn heap_storm_with_nested_signals() {
    let started = Instant::now();
    // Maintenance passes run on a thread of ours (every 10 ms), so they can
    // be stopped before the final checks (which need a quiet heap).
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(256 << 20)
                .grow(false)
                .maintenance(false),
        )
        .expect("heap"),
    ));
    let [sig_a, sig_b] = storm_signals();
    SIGNAL_A.store(sig_a as usize, Ordering::Relaxed);
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    install_handler(sig_a, storm_handler, &[]).expect("sigaction A");
    install_handler(sig_b, storm_handler, &[]).expect("sigaction B");

    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let duration = Duration::from_secs(3);
    let stop = AtomicBool::new(false);
    let passes = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let stop = &stop;
            s.spawn(move || worker(heap, t, threads, stop));
        }
        let (stop, passes) = (&stop, &passes);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                heap.maintain();
                bump(passes);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    });
    // Every thread a timer could signal has been joined: no handler runs.
    let churn = started.elapsed();

    for st in &HANDLERS[..threads] {
        while let Some(h) = st.stash.take(0) {
            worker_free(heap, h);
        }
    }
    for m in &MAILBOXES[..threads] {
        while let Some(h) = m.take(0) {
            worker_free(heap, h);
        }
    }
    let before_drain = heap.stats();
    heap.drain();
    let s = heap.stats();
    let p = s.pages;
    let invariants = heap.pages().check_invariants();

    let (attempts, ok, fail) = (load(&C.attempts), load(&C.ok), load(&C.fail));
    let pct = 100.0 * ok as f64 / attempts.max(1) as f64;
    let [l_att, l_ok, l_fail, l_64] = [0, 1, 2, 3].map(|i| load(&C.large[i]));
    // 64 KiB blocks the per-CPU lists served, which the page allocator's
    // large counters do not see.
    let l_listed = l_ok.saturating_sub(p.nolock_large_alloc_ok);
    let l_pct = 100.0 * l_ok as f64 / l_att.max(1) as f64;
    println!(
        "large nolock (64 KiB..4 MiB): attempts {l_att}, ok {l_ok} (64 KiB {l_64}, \
         from per-CPU lists {l_listed}), fail {l_fail} \
         (busy {}, empty {}), success {l_pct:.4}%; stock {} pages; \
         above 4 MiB: {} asked, {} served, {} counted too large",
        p.nolock_large_alloc_fail_busy,
        p.nolock_large_alloc_fail_empty,
        before_drain.pages.stock_pages,
        load(&C.too_large),
        load(&C.too_large_served),
        s.nolock_alloc_fail_too_large,
    );
    println!(
        "heap storm: {threads} threads x 2 timers (100/110 us) for {:.2} s\n\
         signals: A {} B {}; nested: B in A {}, A in B {}; interrupted inside an allocator call: {}\n\
         nolock alloc: attempts {attempts}, ok {ok}, fail {fail} (busy {}, empty {}), success {pct:.4}%\n\
         handler frees: {} ({} of the other signal's objects, {} of workers' objects); \
         nolock frees deferred: {} (cached before drain: {} in sheaves+barn, {} deferred)\n\
         normal path: allocs {} (none {}), frees {} ({} cross-thread, {} of handler objects)\n\
         page allocator: nolock ok {}, fail busy {}, fail empty {}, frees deferred {}; maintenance passes {}\n\
         violations: {}; after drain: objects {} large {} huge {}; pages total {} free {} buddy {}; invariants {:?}",
        churn.as_secs_f64(),
        load(&C.signals[0]),
        load(&C.signals[1]),
        load(&C.nested[1]),
        load(&C.nested[0]),
        load(&C.inside),
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
        load(&C.handler_frees),
        load(&C.handler_frees_other_signal),
        load(&C.handler_frees_of_worker_objects),
        s.nolock_free_deferred,
        before_drain
            .classes
            .iter()
            .map(|c| c.cached_in_sheaves + c.cached_in_barn)
            .sum::<usize>(),
        before_drain.classes.iter().map(|c| c.deferred).sum::<usize>(),
        load(&C.normal_allocs),
        load(&C.normal_none),
        load(&C.normal_frees),
        load(&C.cross_thread_frees),
        load(&C.worker_frees_of_handler_objects),
        p.nolock_alloc_ok,
        p.nolock_alloc_fail_busy,
        p.nolock_alloc_fail_empty,
        p.nolock_free_deferred,
        load(&passes),
        load(&C.violations),
        s.objects_in_use,
        s.large_in_use,
        s.huge_in_use,
        p.total_pages,
        p.free_pages,
        p.buddy_pages,
        invariants,
    );

    // The storm happened: both signals, nesting both ways, both paths.
    assert!(load(&C.signals[0]) > 0 && load(&C.signals[1]) > 0);
    assert!(
        load(&C.nested[0]) > 0 && load(&C.nested[1]) > 0,
        "the two signals never nested"
    );
    assert!(
        load(&C.inside) > 0,
        "no signal interrupted an allocator call"
    );
    assert!(attempts > 0 && load(&C.normal_allocs) > 0);
    assert!(load(&C.handler_frees_other_signal) > 0);
    assert!(load(&C.cross_thread_frees) > 0);
    // The heap's own counters agree with the handlers' (only they use nolock).
    assert_eq!(s.nolock_alloc_ok, ok, "heap counted other nolock successes");
    assert_eq!(
        s.nolock_alloc_fail_busy + s.nolock_alloc_fail_empty,
        fail,
        "heap counted other nolock failures"
    );

    // No memory had two owners, nothing leaked, the structure is intact.
    assert_eq!(load(&C.violations), 0, "pattern or alignment violations");
    assert_eq!(load(&C.normal_none), 0, "normal path ran out with 256 MiB");
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.large_in_use, 0);
    assert_eq!(s.huge_in_use, 0);
    for c in &s.classes {
        assert_eq!(
            (c.cached_in_sheaves, c.cached_in_barn, c.deferred, c.slabs),
            (0, 0, 0, 0),
            "class {} holds memory after drain",
            c.size
        );
    }
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(p.buddy_pages, p.total_pages, "pages off the buddy lists");
    assert_eq!(invariants, Ok(()));
    assert!(
        ok * 1000 >= attempts * 999,
        "nolock success {pct:.4}% < 99.9% ({fail} of {attempts} failed)"
    );
    // The large blocks on their own: they happened, the page allocator's
    // large counters match the handlers' (but for 64 KiB blocks from the
    // heap's per-CPU lists) and give every failure's reason, and 99.9%
    // succeeded; above 4 MiB every request was refused and counted as too
    // large.
    assert!(l_att > 0, "no large block was tried");
    assert!(
        p.nolock_large_alloc_ok <= l_ok && l_listed <= l_64,
        "the page allocator counted {} large nolock successes, the handlers {l_ok} \
         ({l_64} of 64 KiB)",
        p.nolock_large_alloc_ok
    );
    assert_eq!(
        p.nolock_large_alloc_fail_busy + p.nolock_large_alloc_fail_empty,
        l_fail,
        "a large failure without a reason"
    );
    assert!(
        l_ok * 1000 >= l_att * 999,
        "large nolock success {l_pct:.4}% < 99.9% ({l_fail} of {l_att} failed)"
    );
    assert!(load(&C.too_large) > 0, "no request above 4 MiB was tried");
    assert_eq!(load(&C.too_large_served), 0, "nolock served above 4 MiB");
    assert_eq!(s.nolock_alloc_fail_too_large, load(&C.too_large));
}
