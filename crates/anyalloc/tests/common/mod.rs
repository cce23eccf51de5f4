//! Shared helpers for the proof tests (and `examples/page_storm.rs`): what
//! is specific to anyalloc. The storm machinery itself (signal handlers,
//! per-thread timers, re-entry evidence, the stash, owner-tagged patterns,
//! random numbers) is the `anyalloc_storm` kit, which the tests import
//! directly.
//!
//! * [`pack`] / [`unpack`] / [`fill`] / [`check`]: page-block handles that
//!   fit in one atomic word: a kit [`Entry`] (address, kind, nonce) with the
//!   block's order in the low bits (blocks are page-aligned), so the order
//!   never has to be read from memory that a second owner may have
//!   overwritten; the fill is the kit's owner-tagged pattern;
//! * the page storm itself ([`run_page_storm`]), shared by the `page_storm`
//!   test (which asserts) and example (which prints);
//! * [`class_of`] and [`sheaf_capacity`]: a size class's counters, and how
//!   many objects of a size a sheaf holds;
//! * single-step support: [`SeenSet`] (instruction addresses seen),
//!   [`trap_on`] / [`trap_off`] (the trap flag) and [`next_step`] (a
//!   `SIGTRAP` handler's view of the interrupted instruction).
//!
//! Everything called from a signal handler here is async-signal-safe: the
//! kit's handler-safe pieces, atomics, plain memory accesses and the
//! allocator's nolock path.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyalloc::{
    ClassStats, Config, Heap, PageAllocator, PageStats, MAX_ORDER, PAGE_SIZE, PCP_MAX_ORDER,
};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::signal::signal_value;
use anyalloc_storm::{
    inside, install_handler, mix64, raise_here, storm_signals, ErrnoGuard, HandlerEntry,
    HandlerSlot, Stash, ThreadTimer, XorShift,
};

// ----- object classes ----------------------------------------------------------

/// The counters of `heap`'s class of `size`-byte objects (`size` one of
/// the class sizes).
pub fn class_of(heap: &Heap, size: usize) -> ClassStats {
    *heap
        .stats()
        .classes
        .iter()
        .find(|c| c.size == size)
        .unwrap_or_else(|| panic!("no class of {size} B"))
}

/// Objects a sheaf of `heap`'s class of `size`-byte objects holds: what a
/// test must allocate or free past to be sure to reach a slow path,
/// whatever the sheaf held before.
pub fn sheaf_capacity(heap: &Heap, size: usize) -> usize {
    class_of(heap, size).sheaf_capacity
}

// ----- page-block handles -----------------------------------------------------

/// Packs a page-aligned block, its order (`< 16`: every order up to
/// `MAX_ORDER`) and a kind (`< 8`, the caller's) into one word, with a
/// fresh nonce: a kit [`Entry`] plus the order in the page-offset bits.
/// 0 never is a handle.
pub fn pack(ptr: usize, order: u32, kind: usize) -> usize {
    debug_assert!(ptr.is_multiple_of(PAGE_SIZE) && order < 16 && kind < 8);
    Entry::fresh(ptr, kind).0 | order as usize
}

/// The inverse of [`pack`]: `(ptr, order, kind)`.
pub fn unpack(h: usize) -> (usize, u32, usize) {
    let e = entry(h);
    (e.addr(), (h & 15) as u32, e.kind())
}

/// The kit entry of a handle (its owner tag, without the order).
fn entry(h: usize) -> Entry {
    Entry(h & !(PAGE_SIZE - 1))
}

/// Fills the block behind `handle` with its owner's pattern.
///
/// # Safety
/// The caller owns the block behind `handle` (`PAGE_SIZE << order` bytes).
pub unsafe fn fill(handle: usize) {
    let (_, order, _) = unpack(handle);
    // SAFETY: per the caller.
    unsafe { pattern::fill(entry(handle), PAGE_SIZE << order) };
}

/// Whether the block behind `handle` still holds its owner's pattern (its
/// header, with the size of its order, included).
///
/// # Safety
/// As for [`fill`].
pub unsafe fn check(handle: usize) -> bool {
    let (_, order, _) = unpack(handle);
    // SAFETY: per the caller.
    unsafe { pattern::check(entry(handle), PAGE_SIZE << order) }.is_ok()
}

// ----- the page storm ------------------------------------------------------

/// How a page storm runs.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Memory of the allocator (no growth).
    pub memory: usize,
    /// Worker threads; each gets its own two timers.
    pub threads: usize,
    /// How long the workers churn.
    pub duration: Duration,
    /// Period of each of the two per-thread timers.
    pub period_a: Duration,
    pub period_b: Duration,
    /// Nolock alloc attempts per handler run.
    pub ops_per_signal: u32,
    /// One handler attempt in `large_every` asks for a large block (order
    /// 4..=10: 64 KiB to 4 MiB, the zone try-lock path); the others for
    /// orders 0..=3. 0: no large blocks.
    pub large_every: u32,
}

impl Default for StormConfig {
    fn default() -> Self {
        StormConfig {
            memory: 256 << 20,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            duration: Duration::from_secs(3),
            // ~10 kHz per timer; the second timer a little out of phase.
            period_a: Duration::from_micros(100),
            period_b: Duration::from_micros(110),
            ops_per_signal: 2,
            large_every: 8,
        }
    }
}

/// What a page storm saw.
#[derive(Debug, Clone)]
pub struct StormReport {
    pub elapsed: Duration,
    pub threads: usize,
    /// Handler runs of signal A and B.
    pub signals_a: u64,
    pub signals_b: u64,
    /// A handler ran while the other signal's handler was interrupted on the
    /// same thread (B inside A, A inside B).
    pub nested_b_in_a: u64,
    pub nested_a_in_b: u64,
    /// Handler runs that interrupted a worker's allocator call (normal-path
    /// `alloc_pages` / `free_pages`): the re-entry the storm is about.
    pub interrupted_inside_allocator: u64,
    /// Nolock allocations tried / served / refused (as counted by the
    /// handlers).
    pub nolock_attempts: u64,
    pub nolock_ok: u64,
    pub nolock_fail: u64,
    /// Of those, the large ones (orders 4..=10).
    pub large_attempts: u64,
    pub large_ok: u64,
    pub large_fail: u64,
    /// Nolock frees done by the handlers; of those, blocks allocated by the
    /// other signal's handler.
    pub nolock_frees: u64,
    pub nolock_frees_other_signal: u64,
    /// Normal-path operations by the workers; frees of blocks another worker
    /// allocated.
    pub normal_allocs: u64,
    pub normal_frees: u64,
    pub normal_alloc_none: u64,
    pub cross_thread_frees: u64,
    /// Blocks whose pattern was damaged when they were freed.
    pub violations: u64,
    /// Pages not free after everything was freed and drained.
    pub leaked_pages: usize,
    /// Pages not on the buddy lists after the final drain.
    pub undrained_pages: usize,
    pub invariants: Result<(), &'static str>,
    /// The allocator's own counters at the end.
    pub stats: PageStats,
}

impl StormReport {
    /// Nolock success rate, in percent.
    pub fn success_pct(&self) -> f64 {
        if self.nolock_attempts == 0 {
            return 0.0;
        }
        100.0 * self.nolock_ok as f64 / self.nolock_attempts as f64
    }

    /// Nolock success rate of the large blocks, in percent.
    pub fn large_success_pct(&self) -> f64 {
        if self.large_attempts == 0 {
            return 0.0;
        }
        100.0 * self.large_ok as f64 / self.large_attempts as f64
    }

    /// A multi-line human-readable summary.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            "page storm: {threads} threads x 2 timers for {secs:.2} s\n\
             signals delivered: A {sa}, B {sb} ({rate:.0}/s per thread); nested: B in A {ba}, A in B {ab}; interrupted inside an allocator call: {inside}\n\
             nolock alloc: attempts {att}, ok {ok}, fail {fail} (busy {busy}, empty {empty}), success {pct:.4}%\n\
             of those 64 KiB..4 MiB: attempts {latt}, ok {lok}, fail {lfail} (busy {lbusy}, empty {lempty}), success {lpct:.4}%\n\
             nolock frees: {nf} ({nfo} of blocks from the other signal's handler); deferred frees: {def}\n\
             normal path: allocs {na} (none {nn}), frees {nfr} ({cross} by another thread)\n\
             violations: {viol}; leaked pages: {leak}; pages off the buddy lists after drain: {und}; invariants: {inv:?}\n\
             final stats: total {total} free {free} buddy {buddy} percpu {pcp} deferred {dp} zones {zones}",
            threads = self.threads,
            secs = self.elapsed.as_secs_f64(),
            sa = self.signals_a,
            sb = self.signals_b,
            rate = (self.signals_a + self.signals_b) as f64
                / self.elapsed.as_secs_f64().max(1e-9)
                / self.threads.max(1) as f64,
            ba = self.nested_b_in_a,
            ab = self.nested_a_in_b,
            inside = self.interrupted_inside_allocator,
            att = self.nolock_attempts,
            ok = self.nolock_ok,
            fail = self.nolock_fail,
            busy = s.nolock_alloc_fail_busy,
            empty = s.nolock_alloc_fail_empty,
            pct = self.success_pct(),
            latt = self.large_attempts,
            lok = self.large_ok,
            lfail = self.large_fail,
            lbusy = s.nolock_large_alloc_fail_busy,
            lempty = s.nolock_large_alloc_fail_empty,
            lpct = self.large_success_pct(),
            nf = self.nolock_frees,
            nfo = self.nolock_frees_other_signal,
            def = s.nolock_free_deferred,
            na = self.normal_allocs,
            nn = self.normal_alloc_none,
            nfr = self.normal_frees,
            cross = self.cross_thread_frees,
            viol = self.violations,
            leak = self.leaked_pages,
            und = self.undrained_pages,
            inv = self.invariants,
            total = s.total_pages,
            free = s.free_pages,
            buddy = s.buddy_pages,
            pcp = s.percpu_pages,
            dp = s.deferred_pages,
            zones = s.zones,
        )
    }
}

/// Most worker threads a storm supports (handler state is per thread).
const MAX_THREADS: usize = 64;
/// Blocks a thread's handlers may hold between signals.
const HANDLER_STASH: usize = 16;
/// Blocks in flight from one worker to another.
const MAILBOX: usize = 16;
/// Highest order of the workers' normal-path blocks.
const NORMAL_MAX_ORDER: u32 = 4;

/// The storm's allocator, for the handlers; null outside a storm.
static STORM_PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
static STORM_RUNNING: AtomicBool = AtomicBool::new(false);
static SIGNAL_A: AtomicUsize = AtomicUsize::new(0);
static SIGNAL_B: AtomicUsize = AtomicUsize::new(0);
static OPS_PER_SIGNAL: AtomicUsize = AtomicUsize::new(2);
static LARGE_EVERY: AtomicUsize = AtomicUsize::new(0);

/// Per-thread handler state, indexed by the timers' `sigval`.
static HANDLERS: [HandlerSlot<HANDLER_STASH>; MAX_THREADS] =
    [const { HandlerSlot::new() }; MAX_THREADS];
/// Worker `i` takes blocks from `MAILBOXES[i]`; worker `i - 1` puts them there.
static MAILBOXES: [Stash<MAILBOX>; MAX_THREADS] = [const { Stash::new() }; MAX_THREADS];

struct Counters {
    signals: [AtomicU64; 2],
    nested: [AtomicU64; 2],
    inside: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    fail: AtomicU64,
    large: [AtomicU64; 3],
    frees: AtomicU64,
    frees_other: AtomicU64,
    normal_allocs: AtomicU64,
    normal_frees: AtomicU64,
    normal_none: AtomicU64,
    cross: AtomicU64,
    violations: AtomicU64,
}

static C: Counters = Counters {
    signals: [const { AtomicU64::new(0) }; 2],
    nested: [const { AtomicU64::new(0) }; 2],
    inside: AtomicU64::new(0),
    attempts: AtomicU64::new(0),
    ok: AtomicU64::new(0),
    fail: AtomicU64::new(0),
    large: [const { AtomicU64::new(0) }; 3],
    frees: AtomicU64::new(0),
    frees_other: AtomicU64::new(0),
    normal_allocs: AtomicU64::new(0),
    normal_frees: AtomicU64::new(0),
    normal_none: AtomicU64::new(0),
    cross: AtomicU64::new(0),
    violations: AtomicU64::new(0),
};

impl Counters {
    fn reset(&self) {
        for a in self.signals.iter().chain(&self.nested).chain(&self.large) {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &self.inside,
            &self.attempts,
            &self.ok,
            &self.fail,
            &self.frees,
            &self.frees_other,
            &self.normal_allocs,
            &self.normal_frees,
            &self.normal_none,
            &self.cross,
            &self.violations,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

/// Kinds of a storm block: which signal's handler allocated it, or a
/// worker (normal path).
const KIND_SIGNAL_A: usize = 0;
const KIND_SIGNAL_B: usize = 1;
const KIND_WORKER: usize = 2;

/// Checks and nolock-frees a handler block (in a handler).
fn handler_free(pa: &PageAllocator, h: usize, which: usize) {
    let (ptr, order, kind) = unpack(h);
    // SAFETY: the handle was taken out of a stash with one atomic swap, so
    // this context owns the block it names.
    if !unsafe { check(h) } {
        C.violations.fetch_add(1, Ordering::Relaxed);
    }
    let from_b = kind == KIND_SIGNAL_B;
    if from_b != (which == 1) {
        C.frees_other.fetch_add(1, Ordering::Relaxed);
    }
    C.frees.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `ptr` was returned by `alloc_pages_nolock(order)` on this
    // allocator and nothing else holds it (see above).
    unsafe { pa.free_pages_nolock(std::ptr::NonNull::new_unchecked(ptr as *mut u8), order) };
}

/// The storm's signal handler (both signals).
extern "C" fn storm_handler(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // Held until the handler returns: its nesting level.
    let entry = HandlerEntry::enter();
    if entry.interrupted_allocator() {
        C.inside.fetch_add(1, Ordering::Relaxed);
    }
    let which = if sig == SIGNAL_A.load(Ordering::Relaxed) as libc::c_int {
        0
    } else {
        1
    };
    C.signals[which].fetch_add(1, Ordering::Relaxed);
    let pa = STORM_PA.load(Ordering::Acquire);
    if pa.is_null() {
        return;
    }
    // SAFETY: non-null only while `run_page_storm` keeps the allocator alive,
    // and it joins every thread that can take these signals before clearing
    // the pointer.
    let pa = unsafe { &*pa };
    // SAFETY: a timer signal's siginfo, carrying the thread's state index.
    let slot = unsafe { signal_value(info) };
    if slot >= MAX_THREADS {
        return;
    }
    let st = &HANDLERS[slot];
    // A signal never interrupts its own handler: a nested handler
    // interrupted the other signal's, on this thread.
    if entry.nested() {
        C.nested[which].fetch_add(1, Ordering::Relaxed);
    }
    let run = st.run(which);
    let ops = OPS_PER_SIGNAL.load(Ordering::Relaxed);
    for op in 0..ops {
        let r = st.draw((slot as u64) << 48);
        let every = LARGE_EVERY.load(Ordering::Relaxed) as u64;
        let large = every != 0 && (r >> 56).is_multiple_of(every);
        let order = if large {
            PCP_MAX_ORDER + 1 + ((r >> 4) % u64::from(MAX_ORDER - PCP_MAX_ORDER)) as u32
        } else {
            (r % (PCP_MAX_ORDER as u64 + 1)) as u32
        };
        C.attempts.fetch_add(1, Ordering::Relaxed);
        if large {
            C.large[0].fetch_add(1, Ordering::Relaxed);
        }
        match pa.alloc_pages_nolock(order) {
            Some(p) => {
                C.ok.fetch_add(1, Ordering::Relaxed);
                if large {
                    C.large[1].fetch_add(1, Ordering::Relaxed);
                }
                let kind = if which == 1 {
                    KIND_SIGNAL_B
                } else {
                    KIND_SIGNAL_A
                };
                let h = pack(p.as_ptr() as usize, order, kind);
                // SAFETY: just allocated: this context owns it.
                unsafe { fill(h) };
                // Every 64th run forces the other signal to nest right here,
                // while this handler holds a block it has not stashed yet.
                if op == 0 && run.is_multiple_of(64) {
                    let other = SIGNAL_A.load(Ordering::Relaxed) as libc::c_int
                        + (1 - which) as libc::c_int;
                    raise_here(other);
                }
                if !st.stash.put(h, (r >> 16) as usize) {
                    handler_free(pa, h, which);
                }
            }
            None => {
                C.fail.fetch_add(1, Ordering::Relaxed);
                if large {
                    C.large[2].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Free a stashed block half of the time (maybe the other signal's).
        if (r >> 24) & 1 == 0 {
            if let Some(h) = st.stash.take((r >> 32) as usize) {
                handler_free(pa, h, which);
            }
        }
    }
}

/// A worker: normal-path churn with its own timers interrupting it.
fn storm_worker(pa: &PageAllocator, index: usize, stop: &AtomicBool, cfg: &StormConfig) {
    let [sig_a, sig_b] = storm_signals();
    let timers = [
        ThreadTimer::start(sig_a, cfg.period_a, index).expect("timer A"),
        ThreadTimer::start(sig_b, cfg.period_b, index).expect("timer B"),
    ];
    let mut rng = XorShift::new(0x5eed_0000 + index as u64);
    // (handle, expiry op)
    let mut held: Vec<(usize, u64)> = Vec::with_capacity(1024);
    let mut now = 0u64;
    let free_one = |h: usize, cross: bool| {
        // SAFETY: this worker owns `h` (from its own list or swapped out of
        // a mailbox).
        if !unsafe { check(h) } {
            C.violations.fetch_add(1, Ordering::Relaxed);
        }
        let (ptr, order, _) = unpack(h);
        if cross {
            C.cross.fetch_add(1, Ordering::Relaxed);
        }
        C.normal_frees.fetch_add(1, Ordering::Relaxed);
        // SAFETY: allocated by `alloc_pages(order)` on this allocator, owned.
        inside(|| unsafe {
            pa.free_pages(std::ptr::NonNull::new_unchecked(ptr as *mut u8), order)
        });
    };
    while !stop.load(Ordering::Relaxed) {
        now += 1;
        let r = rng.next_u64();
        // Allocate one block with a random lifetime (0..256 ops).
        if held.len() < 1000 {
            let order = (r % (NORMAL_MAX_ORDER as u64 + 1)) as u32;
            match inside(|| pa.alloc_pages(order)) {
                Some(p) => {
                    C.normal_allocs.fetch_add(1, Ordering::Relaxed);
                    let h = pack(p.as_ptr() as usize, order, KIND_WORKER);
                    // SAFETY: just allocated: owned by this worker.
                    unsafe { fill(h) };
                    held.push((h, now + ((r >> 8) & 255)));
                }
                None => {
                    C.normal_none.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Free (or hand to another worker) what expired.
        let mut i = 0;
        while i < held.len() {
            if held[i].1 <= now {
                let (h, _) = held.swap_remove(i);
                if (r >> 16).is_multiple_of(8)
                    && MAILBOXES[(index + 1) % cfg.threads].put(h, (r >> 20) as usize)
                {
                    continue;
                }
                free_one(h, false);
            } else {
                i += 1;
            }
        }
        // Free a block another worker handed over.
        if (r >> 32).is_multiple_of(4) {
            if let Some(h) = MAILBOXES[index].take((r >> 36) as usize) {
                free_one(h, cfg.threads > 1);
            }
        }
    }
    drop(timers);
    for (h, _) in held.drain(..) {
        free_one(h, false);
    }
}

/// Runs a page storm: `cfg.threads` workers churn on the normal path while
/// two per-thread timers interrupt them with handlers on the nolock path.
/// Then everything is freed and drained and the allocator checked. One
/// storm at a time per process (the handlers' state is static).
pub fn run_page_storm(cfg: &StormConfig) -> StormReport {
    assert!(
        !STORM_RUNNING.swap(true, Ordering::SeqCst),
        "one page storm at a time"
    );
    assert!(cfg.threads >= 1 && cfg.threads <= MAX_THREADS);
    let pa = Box::new(
        PageAllocator::new(Config::default().memory(cfg.memory).grow(false))
            .expect("page allocator"),
    );
    C.reset();
    OPS_PER_SIGNAL.store(cfg.ops_per_signal as usize, Ordering::Relaxed);
    LARGE_EVERY.store(cfg.large_every as usize, Ordering::Relaxed);
    let [sig_a, sig_b] = storm_signals();
    SIGNAL_A.store(sig_a as usize, Ordering::Relaxed);
    SIGNAL_B.store(sig_b as usize, Ordering::Relaxed);
    STORM_PA.store(
        &*pa as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    install_handler(sig_a, storm_handler, &[]).expect("sigaction A");
    install_handler(sig_b, storm_handler, &[]).expect("sigaction B");

    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..cfg.threads {
            let (pa, stop) = (&*pa, &stop);
            s.spawn(move || storm_worker(pa, t, stop, cfg));
        }
        std::thread::sleep(cfg.duration);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed();
    // Every thread that could run a handler has been joined.
    STORM_PA.store(std::ptr::null_mut(), Ordering::Release);

    // Free what the handlers and the mailboxes still hold.
    for st in &HANDLERS {
        for h in st.stash.drain() {
            // SAFETY: no handler runs any more; the stash owned `h`.
            if !unsafe { check(h) } {
                C.violations.fetch_add(1, Ordering::Relaxed);
            }
            let (ptr, order, _) = unpack(h);
            // SAFETY: allocated by `alloc_pages_nolock(order)`, owned here.
            unsafe { pa.free_pages(std::ptr::NonNull::new_unchecked(ptr as *mut u8), order) };
        }
    }
    for h in MAILBOXES.iter().flat_map(|m| m.drain()) {
        // SAFETY: as above, for a worker's block in a mailbox.
        if !unsafe { check(h) } {
            C.violations.fetch_add(1, Ordering::Relaxed);
        }
        let (ptr, order, _) = unpack(h);
        // SAFETY: allocated by `alloc_pages(order)`, owned here.
        unsafe { pa.free_pages(std::ptr::NonNull::new_unchecked(ptr as *mut u8), order) };
    }
    pa.drain();
    let stats = pa.stats();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = StormReport {
        elapsed,
        threads: cfg.threads,
        signals_a: load(&C.signals[0]),
        signals_b: load(&C.signals[1]),
        nested_b_in_a: load(&C.nested[1]),
        nested_a_in_b: load(&C.nested[0]),
        interrupted_inside_allocator: load(&C.inside),
        nolock_attempts: load(&C.attempts),
        nolock_ok: load(&C.ok),
        nolock_fail: load(&C.fail),
        large_attempts: load(&C.large[0]),
        large_ok: load(&C.large[1]),
        large_fail: load(&C.large[2]),
        nolock_frees: load(&C.frees),
        nolock_frees_other_signal: load(&C.frees_other),
        normal_allocs: load(&C.normal_allocs),
        normal_frees: load(&C.normal_frees),
        normal_alloc_none: load(&C.normal_none),
        cross_thread_frees: load(&C.cross),
        violations: load(&C.violations),
        leaked_pages: stats.total_pages - stats.free_pages,
        undrained_pages: stats.total_pages - stats.buddy_pages,
        invariants: pa.check_invariants(),
        stats,
    };
    drop(pa);
    STORM_RUNNING.store(false, Ordering::SeqCst);
    report
}

/// RFLAGS' trap flag.
#[cfg(target_arch = "x86_64")]
const TF: i64 = 0x100;

/// Sets the trap flag: a `SIGTRAP` follows every instruction from here on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn trap_on() {
    // SAFETY: only RFLAGS.TF changes; pushfq/popfq balance the stack (the
    // asm may use the stack: no `nostack`).
    unsafe { std::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
}

/// Clears the trap flag.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn trap_off() {
    // SAFETY: as in `trap_on`.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], ~0x100", "popfq") };
}

/// In a `SIGTRAP` handler: the address of the instruction the thread
/// resumes at, if it is to go on stepping; otherwise clears the trap flag
/// in the saved context (the thread stops stepping) and says `None`.
///
/// # Safety
/// `ctx` is the context argument of an `SA_SIGINFO` handler.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub unsafe fn next_step(ctx: *mut libc::c_void, keep_stepping: bool) -> Option<usize> {
    // SAFETY: per the contract, the kernel's valid, writable ucontext_t;
    // its general registers are what the thread resumes with.
    let gregs = unsafe { &mut (*(ctx as *mut libc::ucontext_t)).uc_mcontext.gregs };
    if !keep_stepping {
        gregs[libc::REG_EFL as usize] &= !TF;
        return None;
    }
    Some(gregs[libc::REG_RIP as usize] as usize)
}

/// Slots of a [`SeenSet`].
const SEEN_SLOTS: usize = 1 << 16;

/// A set of instruction addresses seen by a single-step handler: open
/// addressing over atomics, so inserting allocates nothing (safe in a
/// signal handler). Use it as a `static`.
pub struct SeenSet([AtomicUsize; SEEN_SLOTS]);

impl SeenSet {
    pub const fn new() -> Self {
        SeenSet([const { AtomicUsize::new(0) }; SEEN_SLOTS])
    }

    /// Inserts `rip` (non-zero); `true` if it was not there yet (and there
    /// was room).
    pub fn insert(&self, rip: usize) -> bool {
        let mut i = (mix64(rip as u64) as usize) % SEEN_SLOTS;
        for _ in 0..SEEN_SLOTS {
            match self.0[i].compare_exchange(0, rip, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(v) if v == rip => return false,
                Err(_) => i = (i + 1) % SEEN_SLOTS,
            }
        }
        false
    }

    /// Forgets every address.
    pub fn clear(&self) {
        for s in &self.0 {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// The addresses inserted so far.
    pub fn addresses(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&a| a != 0)
    }
}
