//! Signal handlers on small alternate stacks (feature `interrupt-points`).
//!
//! Real programs install their handlers with `SA_ONSTACK` on a
//! `sigaltstack` of `SIGSTKSZ` (8 KiB in older glibc), and two handlers that
//! nest share it. Every nolock entry point must fit there, slow paths
//! included. The alternate stacks here have a `PROT_NONE` guard page below
//! them (an overflow is a crash, never silent corruption) and are painted
//! with a pattern; every handler repaints what lies below its own frame
//! before each operation, and finds the lowest byte touched after it (and
//! before each repaint, so a deeper nested use is never painted over
//! unseen): the high-water mark, per operation and per stack.
//!
//! The handlers' operations ([`Op`]): bursts of small nolock allocations
//! (refills from slabs) and frees (flushes to the barn, deferred frees when
//! they interrupted a lock holder), charges to a three-level accounting
//! group chain, large nolock blocks from the buddy lists (1 to 4 MiB, and
//! page blocks of orders 4 to 10), `NoLock` grow/shrink chains across the
//! small/large boundaries, and `Global` alloc/realloc/free (routed to the
//! nolock path when the handler interrupted the allocator). The interrupt
//! hook raises the first signal *at* the allocator's critical sections of
//! the interrupted thread (so the handler's calls find slots and locks
//! held: busy, deferred, fallback paths) and, from inside a first-level
//! handler's own nolock call, the second signal: the deepest nesting two
//! signals can make, on one stack.
//!
//! * `nolock_paths_stack_high_water`: one thread, a 64 KiB alternate stack
//!   (room to measure whatever a path needs), prints the high-water mark of
//!   every operation, one level and nested, and asserts they stay within a
//!   budget;
//! * `nested_handlers_on_small_altstacks`: two threads churning with `Global`
//!   on the normal path, each with an 8 KiB alternate stack (`SIGSTKSZ`),
//!   two per-thread timers and the hook's forced interruptions and nesting.
//!
//! Both run in a child under the watchdog, with rseq and with glibc's rseq
//! registration off.

mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use allocator_api2::alloc::Allocator;
use anyalloc::interrupt::{self, Site};
use anyalloc::{Global, Group, Heap, NoLock};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::signal::die;
use anyalloc_storm::{mix64, raise_here, storm_signals, ErrnoGuard, ThreadTimer};

#[global_allocator]
static A: Global = Global;

// ----- alternate stacks ------------------------------------------------------

const PAINT: u64 = 0xA5C3_5A3C_A5C3_5A3C;
const GUARD: usize = 4096;

/// An alternate signal stack with a `PROT_NONE` guard page below it.
struct AltStack {
    base: usize,
    size: usize,
}

impl AltStack {
    /// Maps one, paints it and installs it for the calling thread.
    fn install(size: usize) -> AltStack {
        // SAFETY: a fresh private anonymous mapping; the guard page is its
        // first page, the stack the rest; sigaltstack gets that range.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                size + GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(m, libc::MAP_FAILED, "mmap the alternate stack");
            assert_eq!(libc::mprotect(m, GUARD, libc::PROT_NONE), 0, "guard page");
            let base = m as usize + GUARD;
            let words = std::slice::from_raw_parts_mut(base as *mut u64, size / 8);
            words.fill(PAINT);
            let ss = libc::stack_t {
                ss_sp: base as *mut libc::c_void,
                ss_flags: 0,
                ss_size: size,
            };
            assert_eq!(
                libc::sigaltstack(&ss, std::ptr::null_mut()),
                0,
                "sigaltstack"
            );
            STACK_BASE.with(|b| b.set(base));
            STACK_TOP.with(|t| t.set(base + size));
            STACK_LOW.with(|l| l.set(base + size));
            AltStack { base, size }
        }
    }

    /// The deepest use seen on this thread's alternate stack, in bytes
    /// below its top (normal context, after the last handler).
    fn high_water(&self) -> usize {
        note_lowest(usize::MAX);
        self.base + self.size - STACK_LOW.with(Cell::get)
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        // SAFETY: no handler of this thread runs (normal context): disable
        // the alternate stack, then unmap it with its guard page.
        unsafe {
            let ss = libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            };
            libc::sigaltstack(&ss, std::ptr::null_mut());
            libc::munmap((self.base - GUARD) as *mut libc::c_void, self.size + GUARD);
        }
        STACK_BASE.with(|b| b.set(0));
    }
}

thread_local! {
    // Const-initialised, no destructors: handler-safe.
    static STACK_BASE: Cell<usize> = const { Cell::new(0) };
    static STACK_TOP: Cell<usize> = const { Cell::new(0) };
    /// The lowest byte of the alternate stack seen touched.
    static STACK_LOW: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Handler nesting depth on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Handler runs on this thread (to see whether an op was interrupted).
    static RUNS: Cell<u64> = const { Cell::new(0) };
    /// Index of this thread's row in `STORE` (workers 0.., main 0).
    static ROW: Cell<usize> = const { Cell::new(0) };
    /// Whether the hook may raise signals on this thread.
    static HOOKED: Cell<bool> = const { Cell::new(false) };
    static HOOK_TICK: Cell<u64> = const { Cell::new(0) };
}

/// The address of a local: this frame's stack position, near enough.
#[inline(always)]
fn sp() -> usize {
    let x = 0u8;
    std::hint::black_box(&x) as *const u8 as usize
}

/// Scans the alternate stack from its bottom up to `limit` for the lowest
/// word that is not the paint, and folds it into `STACK_LOW`. Returns it.
#[inline(never)]
fn note_lowest(limit: usize) -> usize {
    let base = STACK_BASE.with(Cell::get);
    let top = STACK_TOP.with(Cell::get);
    if base == 0 {
        return 0;
    }
    let end = limit.min(top);
    let mut a = base;
    while a < end {
        // SAFETY: within this thread's mapped alternate stack, below the
        // caller's frame (or after every handler returned).
        if unsafe { (a as *const u64).read_volatile() } != PAINT {
            break;
        }
        a += 8;
    }
    STACK_LOW.with(|l| l.set(l.get().min(a)));
    a
}

/// Notes what was touched, then repaints the alternate stack below this
/// call's frame (leaving 512 bytes of slack under it).
#[inline(never)]
fn repaint() {
    let base = STACK_BASE.with(Cell::get);
    let here = sp();
    if base == 0 || here < base || here > STACK_TOP.with(Cell::get) {
        return; // not on the alternate stack
    }
    let end = (here - 512) & !7;
    note_lowest(end);
    let mut a = base;
    while a < end {
        // SAFETY: the alternate stack below this frame and its red zone:
        // nothing live is there.
        unsafe { (a as *mut u64).write_volatile(PAINT) };
        a += 8;
    }
}

// ----- the operations ----------------------------------------------------------

#[derive(Clone, Copy, Debug)]
#[repr(usize)]
enum Op {
    /// Heap::alloc_nolock of 48 small objects of one class (a refill).
    SmallAllocBurst,
    /// Heap::free_nolock of what the burst holds (a flush, or deferred).
    SmallFreeBurst,
    /// alloc_nolock_in / free_nolock charged to a three-level group chain.
    GroupCharge,
    /// Heap::alloc_nolock of 1..4 MiB and alloc_pages_nolock of order 4..10.
    Large,
    /// NoLock grow / grow_zeroed / shrink across the size boundaries.
    NoLockResize,
    /// Global alloc / realloc / dealloc (nolock route when interrupting).
    GlobalRealloc,
}
const OPS: usize = 6;
const OP_NAMES: [&str; OPS] = [
    "small alloc burst (refill)",
    "small free burst (flush/deferred)",
    "group charge (3 levels)",
    "large block (buddy, 1-4 MiB)",
    "NoLock grow/shrink",
    "Global realloc (routed)",
];

/// Per operation: the most stack it used, one level (no nested handler
/// during it) and in total below the top when it ran nested.
static OP_MAX: [AtomicUsize; OPS] = [const { AtomicUsize::new(0) }; OPS];
static OP_RUNS: [AtomicU64; OPS] = [const { AtomicU64::new(0) }; OPS];
static OK: AtomicU64 = AtomicU64::new(0);
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);
static HOOK_RAISES: AtomicU64 = AtomicU64::new(0);
/// The baseline: a handler's own frame plus the kernel's signal frame.
static BASELINE: AtomicUsize = AtomicUsize::new(0);
/// The deepest total use of one handler level / of two nested levels.
static LEVEL1_MAX: AtomicUsize = AtomicUsize::new(0);
static LEVEL2_MAX: AtomicUsize = AtomicUsize::new(0);

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static GROUP: AtomicPtr<Group> = AtomicPtr::new(std::ptr::null_mut());
static SIG_A: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

const ROWS: usize = 8;
const BURST: usize = 48;
/// Per thread row and handler level: the small objects of a burst.
static STORE: [[[AtomicUsize; BURST]; 2]; ROWS] =
    [const { [const { [const { AtomicUsize::new(0) }; BURST] }; 2] }; ROWS];
/// The layout of each row's burst (its size).
static STORE_SIZE: [[AtomicUsize; 2]; ROWS] = [const { [const { AtomicUsize::new(0) }; 2] }; ROWS];

fn heap() -> &'static Heap {
    // SAFETY: set to the global heap (which lives forever) before any
    // handler can run.
    unsafe { &*HEAP.load(Relaxed) }
}

fn fill(p: NonNull<u8>, size: usize, kind: usize) -> Entry {
    let e = Entry::fresh(p.as_ptr() as usize, kind);
    // SAFETY: the caller owns the `size` bytes at `p`.
    unsafe { pattern::fill(e, size) };
    e
}

fn check(e: Entry, size: usize) {
    // SAFETY: the caller owns the block, filled with `e` for `size` bytes
    // (or a prefix of that many bytes of it, refilled).
    if unsafe { pattern::check(e, size) }.is_err() {
        VIOLATIONS.fetch_add(1, Relaxed);
    }
}

fn l(size: usize, align: usize) -> Layout {
    match Layout::from_size_align(size, align) {
        Ok(l) => l,
        Err(_) => die("bad layout"),
    }
}

fn count(ok: bool) -> bool {
    ATTEMPTS.fetch_add(1, Relaxed);
    if ok {
        OK.fetch_add(1, Relaxed);
    }
    ok
}

const SMALL: [usize; 8] = [16, 48, 96, 200, 512, 1000, 3000, 8000];

/// One operation, in a handler at level `lvl` (0 or 1).
#[inline(never)]
fn run_op(op: Op, r: u64, lvl: usize) {
    let h = heap();
    let row = ROW.with(Cell::get);
    match op {
        Op::SmallAllocBurst => {
            let size = SMALL[(r % SMALL.len() as u64) as usize];
            let slots = &STORE[row][lvl];
            // Free what an earlier burst left first.
            free_burst(row, lvl);
            STORE_SIZE[row][lvl].store(size, Relaxed);
            for s in slots {
                if let Some(p) = h.alloc_nolock(l(size, 8)) {
                    count(true);
                    s.store(fill(p, size, lvl).0, Relaxed);
                } else {
                    count(false);
                }
            }
        }
        Op::SmallFreeBurst => free_burst(row, lvl),
        Op::GroupCharge => {
            // SAFETY: set before any handler runs, kept alive until after
            // the last one.
            let g = unsafe { &*GROUP.load(Relaxed) };
            // SAFETY: a `&Group` from an `Arc<Group>` that outlives this.
            let g = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(g) });
            let size = 64 + (r % 4000) as usize;
            let mut held = [0usize; 8];
            for x in held.iter_mut() {
                if let Some(p) = h.alloc_nolock_in(l(size, 8), &g) {
                    count(true);
                    *x = fill(p, size, lvl).0;
                } else {
                    count(false);
                }
            }
            for &x in &held {
                if x != 0 {
                    let e = Entry(x);
                    check(e, size);
                    // SAFETY: allocated above, freed once.
                    unsafe { h.free_nolock(NonNull::new_unchecked(e.ptr())) };
                }
            }
        }
        Op::Large => {
            let size = (1 << 20) + (r % (3 << 20)) as usize;
            if let Some(p) = h.alloc_nolock(l(size, 4096)).filter(|_| count(true)) {
                let e = fill(p, size, lvl);
                check(e, size);
                // SAFETY: allocated above, freed once.
                unsafe { h.free_nolock(p) };
            } else {
                count(false);
            }
            let order = 4 + (r >> 8) as u32 % 7;
            let pa = h.pages();
            if let Some(p) = pa.alloc_pages_nolock(order).filter(|_| count(true)) {
                let size = 4096 << order;
                let e = fill(p, size, lvl);
                check(e, size);
                // SAFETY: allocated above with `order`, freed once.
                unsafe { pa.free_pages_nolock(p, order) };
            } else {
                count(false);
            }
        }
        Op::NoLockResize => resize_chain(r, true),
        Op::GlobalRealloc => resize_chain(r, false),
    }
}

fn free_burst(row: usize, lvl: usize) {
    let size = STORE_SIZE[row][lvl].load(Relaxed);
    for s in &STORE[row][lvl] {
        let x = s.swap(0, Relaxed);
        if x != 0 {
            let e = Entry(x);
            check(e, size);
            // SAFETY: allocated by a burst of this row and level, taken
            // out of its slot once.
            unsafe { heap().free_nolock(NonNull::new_unchecked(e.ptr())) };
        }
    }
}

/// Sizes a resize chain walks: small classes, the 8 KiB boundary, page
/// blocks, up to 4 MiB, and back down.
const CHAIN: [usize; 9] = [24, 5000, 9000, 70_000, 1 << 20, 4 << 20, 33_000, 100, 8];

/// An address-independent fill (a moved block keeps it): word `i` is
/// `mix64(seed + i)`, every word of the first 64 KiB, then every 64th, and
/// the last.
fn seq_words(size: usize) -> impl Iterator<Item = usize> {
    let n = size / 8;
    (0..n.min(8192))
        .chain((8192..n).step_by(64))
        .chain((n > 8192 && !(n - 1).is_multiple_of(64)).then(|| n - 1))
}

fn seq_fill(p: NonNull<u8>, size: usize, seed: u64) {
    for i in seq_words(size) {
        // SAFETY: the caller owns `size` bytes at `p`; word `i` is in them.
        unsafe {
            (p.as_ptr() as *mut u64)
                .add(i)
                .write_unaligned(mix64(seed + i as u64))
        };
    }
}

/// Checks the words of a fill of `filled` bytes that lie in the first
/// `kept` bytes (all of them when `kept == filled`).
fn seq_check(p: NonNull<u8>, filled: usize, kept: usize, seed: u64) {
    for i in seq_words(filled).take_while(|&i| i < kept / 8) {
        // SAFETY: as in `seq_fill`; `kept` bytes at `p` are live.
        if unsafe { (p.as_ptr() as *const u64).add(i).read_unaligned() } != mix64(seed + i as u64) {
            VIOLATIONS.fetch_add(1, Relaxed);
            return;
        }
    }
}

/// A block grown and shrunk along `CHAIN` with `NoLock` (`nolock`) or
/// `Global::realloc`; what it kept holds its pattern after every step.
fn resize_chain(r: u64, nolock: bool) {
    let align = if r & 1 == 0 { 8 } else { 64 };
    let start = (r >> 1) as usize % 3;
    let seed = mix64(r ^ 0x5eed);
    let mut size = CHAIN[start];
    let p = if nolock {
        NoLock.allocate(l(size, align)).ok().map(|p| p.cast::<u8>())
    } else {
        // SAFETY: a non-zero size.
        NonNull::new(unsafe { GlobalAlloc::alloc(&Global, l(size, align)) })
    };
    let Some(mut p) = p.filter(|_| count(true)) else {
        count(false);
        return;
    };
    seq_fill(p, size, seed);
    for (i, &next) in CHAIN[start + 1..].iter().enumerate() {
        let old = l(size, align);
        let new = l(next, align);
        // SAFETY: `p` is live with `old`.
        let q = unsafe {
            if nolock {
                let q = if next > size {
                    if i % 2 == 0 {
                        NoLock.grow(p, old, new)
                    } else {
                        NoLock.grow_zeroed(p, old, new)
                    }
                } else {
                    NoLock.shrink(p, old, new)
                };
                q.ok().map(|q| q.cast::<u8>())
            } else {
                NonNull::new(GlobalAlloc::realloc(&Global, p.as_ptr(), old, next))
            }
        };
        match q {
            Some(q) if count(true) => {
                // The kept prefix survived the move (whole words only).
                seq_check(q, size, size.min(next), seed);
                p = q;
                size = next;
                seq_fill(p, size, seed);
            }
            _ => {
                count(false);
                break;
            }
        }
    }
    seq_check(p, size, size, seed);
    // SAFETY: live with this layout.
    unsafe {
        if nolock {
            NoLock.deallocate(p, l(size, align));
        } else {
            GlobalAlloc::dealloc(&Global, p.as_ptr(), l(size, align));
        }
    }
}

/// The handler of both signals.
extern "C" fn handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    if !ACTIVE.load(Relaxed) {
        return;
    }
    let depth = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    RUNS.with(|r| r.set(r.get() + 1));
    SIGNALS.fetch_add(1, Relaxed);
    if depth > 1 {
        NESTED.fetch_add(1, Relaxed);
    }
    let lvl = (depth as usize - 1).min(1);
    let top = STACK_TOP.with(Cell::get);
    let r0 = mix64(SIGNALS.load(Relaxed) ^ (sig as u64) << 32 ^ sp() as u64);
    let ops = 1 + (r0 % 3) as usize;
    for k in 0..ops {
        let r = mix64(r0 + k as u64);
        let op = match (r >> 40) % OPS as u64 {
            0 => Op::SmallAllocBurst,
            1 => Op::SmallFreeBurst,
            2 => Op::GroupCharge,
            3 => Op::Large,
            4 => Op::NoLockResize,
            _ => Op::GlobalRealloc,
        };
        // Read before the repaint: a handler nested after it makes the
        // op's figure unclean (its frames are not the op's).
        let runs = RUNS.with(Cell::get);
        repaint();
        let here = sp();
        run_op(op, r, lvl);
        let low = note_lowest(here);
        let clean = RUNS.with(Cell::get) == runs;
        if clean && here > low && here <= top {
            OP_MAX[op as usize].fetch_max(here - low, Relaxed);
            OP_RUNS[op as usize].fetch_add(1, Relaxed);
        }
        if top >= low {
            let total = top - low;
            if depth == 1 && clean {
                LEVEL1_MAX.fetch_max(total, Relaxed);
            } else {
                LEVEL2_MAX.fetch_max(total, Relaxed);
            }
        }
    }
    DEPTH.with(|d| d.set(d.get() - 1));
}

/// A handler that does nothing: the baseline (kernel frame and handler).
extern "C" fn empty_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
}

/// The interrupt hook: on a hooked thread, raises signal A at critical
/// sections of its normal-path calls (one in `every`), and from a
/// first-level handler's nolock calls, signal B (one in `every`).
fn hook(_site: Site) {
    if !HOOKED.with(Cell::get)
        || !ACTIVE.load(Relaxed)
        || HOOK_RAISES.load(Relaxed) >= HOOK_CAP.load(Relaxed) as u64
    {
        return;
    }
    let t = HOOK_TICK.with(|t| {
        t.set(t.get() + 1);
        t.get()
    });
    let every = HOOK_EVERY.load(Relaxed) as u64;
    if !mix64(t).is_multiple_of(every) {
        return;
    }
    let a = SIG_A.load(Relaxed) as libc::c_int;
    match DEPTH.with(Cell::get) {
        0 => raise_here(a),
        1 => raise_here(a + 1),
        _ => return,
    }
    HOOK_RAISES.fetch_add(1, Relaxed);
}
static HOOK_EVERY: AtomicUsize = AtomicUsize::new(4);
/// Signals the hook raises at most in a run (bounds its time).
static HOOK_CAP: AtomicUsize = AtomicUsize::new(20_000 / SCALE as usize);

fn install(
    sig: libc::c_int,
    h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
) {
    // SAFETY: a zeroed sigaction is a valid start; the mask is initialised
    // before use; the handler has the SA_SIGINFO signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = h as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, sig);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

fn setup() -> (&'static Heap, [Arc<Group>; 3]) {
    let h = anyalloc::init().expect("global heap");
    HEAP.store(h as *const Heap as *mut Heap, Relaxed);
    let root = Group::new("root", Some(256 << 20), None);
    let mid = Group::new("mid", Some(128 << 20), Some(&root));
    let leaf = Group::new("leaf", Some(64 << 20), Some(&mid));
    GROUP.store(Arc::as_ptr(&leaf) as *mut Group, Relaxed);
    let [a, _] = storm_signals();
    SIG_A.store(a as usize, Relaxed);
    install(a, handler);
    install(a + 1, handler);
    interrupt::set_hook(Some(hook));
    (h, [root, mid, leaf])
}

/// A normal-path churn step: `Global` vectors and reallocs, heap objects.
fn churn(i: u64, keep: &mut Vec<Vec<u8>>) {
    let n = (mix64(i) % 20_000) as usize;
    let mut v: Vec<u8> = Vec::with_capacity(1 + n % 300);
    v.resize(n, i as u8);
    v.shrink_to_fit();
    if keep.len() < 64 {
        keep.push(v);
    } else {
        let k = (i as usize) % keep.len();
        let old = std::mem::replace(&mut keep[k], v);
        if old.iter().any(|&b| b != old[0]) {
            VIOLATIONS.fetch_add(1, Relaxed);
        }
    }
}

/// `levels`: whether the one-level figure means one level. With timers it
/// does not: a timer's handler can interrupt another in its epilogue, after
/// it counted itself out of `DEPTH` but with its frames still on the stack.
fn report(what: &str, levels: bool) {
    println!(
        "{what}: signals {}, nested {}, hook raises {}, nolock ok {}/{}",
        SIGNALS.load(Relaxed),
        NESTED.load(Relaxed),
        HOOK_RAISES.load(Relaxed),
        OK.load(Relaxed),
        ATTEMPTS.load(Relaxed)
    );
    if levels {
        println!(
            "  baseline (kernel signal frame + empty handler): {} B; AT_MINSIGSTKSZ {} B",
            BASELINE.load(Relaxed),
            kernel_frame()
        );
    }
    for i in 0..OPS {
        println!(
            "  {:<36} {:>6} B  ({} clean runs)",
            OP_NAMES[i],
            OP_MAX[i].load(Relaxed),
            OP_RUNS[i].load(Relaxed)
        );
    }
    if levels {
        println!(
            "  one handler level, total below the top: {} B",
            LEVEL1_MAX.load(Relaxed)
        );
        println!(
            "  two nested levels, total below the top: {} B",
            LEVEL2_MAX.load(Relaxed)
        );
    }
}

fn measure_baseline(sig: libc::c_int, stack: &AltStack) {
    install(sig, empty_handler);
    raise_here(sig);
    BASELINE.store(stack.high_water(), Relaxed);
}

fn in_children(name: &str) -> bool {
    if watchdog::in_child() {
        return false;
    }
    for env in [&[][..], &[watchdog::RSEQ_OFF][..]] {
        // A hang's bound, not a speed target: a run is bounded by counts
        // of work (churn steps, handler runs) and takes 15-60 s alone; on
        // a loaded machine (two reviews saw load 8-15 on 2 cores) the same
        // work took over 120 s, with every thread still running handlers.
        let out = watchdog::run_ok(name, env, Duration::from_secs(300), name);
        println!("--- {env:?}");
        print!("{}", out.stdout);
    }
    true
}

/// Divides the run's counts in a debug build (unoptimised code with every
/// check is many times slower).
const SCALE: u64 = if cfg!(debug_assertions) { 20 } else { 1 };

/// The most one level of a nolock path may use below its caller (in a
/// release build; unoptimised frames are many times larger).
const PATH_BUDGET: usize = if cfg!(debug_assertions) {
    32 << 10
} else {
    2048
};
/// What a handler of this test uses besides its allocator calls (its own
/// frames, the pattern checks, the hook).
const HANDLER_SLACK: usize = if cfg!(debug_assertions) {
    8 << 10
} else {
    1024
};

/// The largest kernel signal frame on this machine (`AT_MINSIGSTKSZ`: 2 to 3.5
/// KiB with AVX-512's register state, 11.7 KiB with AMX's), or glibc's `MINSIGSTKSZ`.
fn kernel_frame() -> usize {
    // SAFETY: getauxval has no preconditions; 0 means "not provided".
    let v = unsafe {
        libc::getauxval(51 /* AT_MINSIGSTKSZ */)
    } as usize;
    if v == 0 {
        2048
    } else {
        v
    }
}

/// The storm's alternate stack: `SIGSTKSZ`'s old 8 KiB, or room for two
/// nested levels of kernel frame, nolock path and handler if that is more
/// (a machine with AVX-512 state: two kernel frames alone take ~6 KiB).
fn storm_stack_size() -> usize {
    let need = 2 * (kernel_frame() + PATH_BUDGET + HANDLER_SLACK);
    (8 << 10).max(need.next_multiple_of(4096))
}

#[test]
fn nolock_paths_stack_high_water() {
    if in_children("nolock_paths_stack_high_water") {
        return;
    }
    let (h, groups) = setup();
    let stack = AltStack::install(4 * PATH_BUDGET.max(16 << 10));
    measure_baseline(libc::SIGRTMIN() + 4, &stack);
    ACTIVE.store(true, Relaxed);
    HOOKED.with(|c| c.set(true));
    let mut keep = Vec::new();
    for i in 0..3_000 / SCALE {
        churn(i, &mut keep);
        if i % 8 == 0 {
            // Plain handlers too (not interrupting the allocator).
            raise_here(SIG_A.load(Relaxed) as libc::c_int);
        }
    }
    HOOKED.with(|c| c.set(false));
    ACTIVE.store(false, Relaxed);
    drop(keep);
    let hw = stack.high_water();
    report("one thread, a large altstack", true);
    println!("  altstack high-water: {hw} B");
    for row in 0..ROWS {
        free_burst_normal(h, row);
    }
    drop(groups);
    assert_eq!(VIOLATIONS.load(Relaxed), 0);
    assert!(NESTED.load(Relaxed) > 0, "no nesting");
    for i in 0..OPS {
        assert!(
            OP_RUNS[i].load(Relaxed) > 0,
            "{} never ran clean",
            OP_NAMES[i]
        );
        assert!(
            OP_MAX[i].load(Relaxed) <= PATH_BUDGET,
            "{} used {} B of stack, over {PATH_BUDGET}",
            OP_NAMES[i],
            OP_MAX[i].load(Relaxed)
        );
    }
}

fn free_burst_normal(h: &Heap, row: usize) {
    for lvl in 0..2 {
        let size = STORE_SIZE[row][lvl].load(Relaxed);
        for s in &STORE[row][lvl] {
            let x = s.swap(0, Relaxed);
            if x != 0 {
                check(Entry(x), size);
                // SAFETY: a burst's object, taken out of its slot once.
                unsafe { h.free(NonNull::new_unchecked(Entry(x).ptr())) };
            }
        }
    }
}

#[test]
fn nested_handlers_on_small_altstacks() {
    if in_children("nested_handlers_on_small_altstacks") {
        return;
    }
    let (h, groups) = setup();
    let size = storm_stack_size();
    HOOK_EVERY.store(64, Relaxed);
    ACTIVE.store(true, Relaxed);
    let a = SIG_A.load(Relaxed) as libc::c_int;
    let workers: Vec<_> = (0..2usize)
        .map(|t| {
            std::thread::spawn(move || {
                ROW.with(|r| r.set(1 + t));
                let stack = AltStack::install(size);
                let timers = (
                    ThreadTimer::start(a, Duration::from_micros(200 * SCALE), 0).expect("timer A"),
                    ThreadTimer::start(a + 1, Duration::from_micros(290 * SCALE), 0)
                        .expect("timer B"),
                );
                HOOKED.with(|c| c.set(true));
                let mut keep = Vec::new();
                // Bounded by counts: churn steps, and handler runs on
                // this thread.
                let mut i = 0u64;
                while i < 3_000 / SCALE || RUNS.with(Cell::get) < 2_000 / SCALE {
                    churn(i ^ (t as u64) << 40, &mut keep);
                    i += 1;
                }
                HOOKED.with(|c| c.set(false));
                anyalloc_storm::mask(&[a, a + 1], true);
                drop(timers);
                drop(keep);
                stack.high_water()
            })
        })
        .collect();
    let hws: Vec<usize> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    ACTIVE.store(false, Relaxed);
    report(
        "two threads, small altstacks, timers + forced nesting",
        false,
    );
    println!("  altstack high-water per thread: {hws:?} B of {size}");
    for row in 0..ROWS {
        free_burst_normal(h, row);
    }
    drop(groups);
    assert_eq!(VIOLATIONS.load(Relaxed), 0);
    assert!(SIGNALS.load(Relaxed) > 1000 / SCALE, "the storm happened");
    assert!(NESTED.load(Relaxed) > 0, "no nesting");
}
