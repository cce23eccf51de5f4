//! The storm itself: worker threads on the normal path, per-thread POSIX
//! timers whose signal handlers allocate and free with the nolock paths, and
//! the shared lock-free state both use.
//!
//! Everything a signal handler touches is a `static` of atomics: the thread
//! slots (counters, op codes, the handler stash), the cross-thread stash,
//! the latency histograms and the counters. A handler finds its thread's
//! slot through the timer's `sigev_value` (no thread-local needed), never
//! locks, never allocates except through the nolock paths under test, and
//! never formats or prints.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::time::Duration;

use allocator_api2::boxed::Box as NBox;
use anyalloc::{Heap, NoLock, PAGE_SIZE};

use anyalloc_storm::pattern::{self, Entry, Mismatch};
use anyalloc_storm::signal::timer_signal;
use anyalloc_storm::{
    install_handler, mask, mix64, storm_signals, ErrnoGuard, Reentry, Stash, ThreadTimer, XorShift,
};

use crate::hist::Histogram;

/// At most this many worker threads (each has a static slot).
pub const MAX_THREADS: usize = 256;
/// Blocks a worker keeps alive on the normal path (random lifetimes).
const LIVE: usize = 512;
/// Global collections (through `Global`) a worker keeps alive.
const GLOBAL_VECS: usize = 64;
/// Slots of the worker hand-off array (blocks freed by another thread).
const HANDOFF: usize = 1024;
/// Per-thread handler stash (blocks freed by a later handler invocation).
pub const STASH: usize = 32;
/// Cross-thread handler stash (blocks a handler on another thread frees).
const XSTASH: usize = 256;

// Entry kinds: with the owner's nonce, the tag a stashed block's address
// carries (`anyalloc_storm::Entry`) and its pattern is derived from.
pub const KIND_PAGE: usize = 1;
pub const KIND_OBJECT: usize = 2;
pub const KIND_BOX: usize = 3;
pub const KIND_WORKER: usize = 4; // a worker's normal-path block (hand-off array)
pub const KIND_LARGE: usize = 5; // a 64 KiB to 4 MiB object from Heap::alloc_nolock

/// What a thread (or one of its handlers) is doing right now: written
/// before each operation, read by the watchdog.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Idle = 0,
    Starting,
    HeapAlloc,
    HeapFree,
    HandOff,
    GlobalVec,
    Teardown,
    Done,
    PageAllocNolock,
    PageFreeNolock,
    ObjectAllocNolock,
    ObjectFreeNolock,
    BoxAllocNolock,
    BoxFreeNolock,
    Stash,
    Check,
    Running,
    LargeAllocNolock,
    LargeFreeNolock,
}

impl Op {
    const ALL: [Op; 19] = [
        Op::Idle,
        Op::Starting,
        Op::HeapAlloc,
        Op::HeapFree,
        Op::HandOff,
        Op::GlobalVec,
        Op::Teardown,
        Op::Done,
        Op::PageAllocNolock,
        Op::PageFreeNolock,
        Op::ObjectAllocNolock,
        Op::ObjectFreeNolock,
        Op::BoxAllocNolock,
        Op::BoxFreeNolock,
        Op::Stash,
        Op::Check,
        Op::Running,
        Op::LargeAllocNolock,
        Op::LargeFreeNolock,
    ];

    pub fn from_code(c: u8) -> Op {
        Op::ALL.get(c as usize).copied().unwrap_or(Op::Idle)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Idle => "idle",
            Op::Starting => "starting",
            Op::HeapAlloc => "Heap::alloc",
            Op::HeapFree => "Heap::free",
            Op::HandOff => "hand-off",
            Op::GlobalVec => "Vec through Global",
            Op::Teardown => "teardown frees",
            Op::Done => "done",
            Op::PageAllocNolock => "alloc_pages_nolock",
            Op::PageFreeNolock => "free_pages_nolock",
            Op::ObjectAllocNolock => "Heap::alloc_nolock",
            Op::ObjectFreeNolock => "Heap::free_nolock",
            Op::BoxAllocNolock => "Box::try_new_in(NoLock)",
            Op::BoxFreeNolock => "drop(Box<_, NoLock>)",
            Op::Stash => "stash swap",
            Op::Check => "pattern check",
            Op::Running => "storm running (progress bar)",
            Op::LargeAllocNolock => "Heap::alloc_nolock (64 KiB-4 MiB)",
            Op::LargeFreeNolock => "Heap::free_nolock (64 KiB-4 MiB)",
        }
    }
}

/// One worker thread's shared state. All atomics: its signal handlers, the
/// main thread and the watchdog read it.
#[repr(align(128))]
pub struct ThreadSlot {
    /// Normal-path operations done by the worker.
    pub ops: AtomicU64,
    /// Handler invocations on this thread.
    pub signals: AtomicU64,
    /// Handler invocations that interrupted another handler.
    pub nested: AtomicU64,
    /// Timer expirations that produced no signal of their own (the previous
    /// one was still pending: the thread was not running, or was in the
    /// handler with that signal masked).
    pub overruns: AtomicU64,
    /// The deepest nesting seen.
    pub max_depth: AtomicU32,
    /// The thread's re-entry state: the allocator calls it (its worker and
    /// its handlers) is inside right now, raised around each call into
    /// anyalloc so a handler can tell that it interrupted one, and the
    /// handlers running on it right now (0, 1 or 2). In the slot, not a
    /// thread-local, so that the watchdog can read the depth.
    pub reentry: Reentry,
    /// Handler invocations that began while this thread was inside an
    /// allocator call.
    pub interrupted_inside: AtomicU64,
    /// Whether the worker is between start and exit.
    pub running: AtomicBool,
    /// The worker's current [`Op`].
    pub worker_op: AtomicU8,
    /// Each handler's current [`Op`] (signal A, signal B).
    pub handler_op: [AtomicU8; 2],
    /// Handler randomness: every invocation takes a fresh value.
    rng: AtomicU64,
    /// Blocks the handlers parked for a later invocation (entries).
    stash: Stash<STASH>,
}

impl ThreadSlot {
    #[allow(clippy::declare_interior_mutable_const)]
    const NEW: ThreadSlot = ThreadSlot {
        ops: AtomicU64::new(0),
        signals: AtomicU64::new(0),
        nested: AtomicU64::new(0),
        overruns: AtomicU64::new(0),
        max_depth: AtomicU32::new(0),
        reentry: Reentry::new(),
        interrupted_inside: AtomicU64::new(0),
        running: AtomicBool::new(false),
        worker_op: AtomicU8::new(0),
        handler_op: [const { AtomicU8::new(0) }; 2],
        rng: AtomicU64::new(0),
        stash: Stash::new(),
    };
}

pub static SLOTS: [ThreadSlot; MAX_THREADS] = [ThreadSlot::NEW; MAX_THREADS];

/// Per kind of nolock allocation (pages, objects, NoLock boxes, large
/// objects).
pub struct KindStats {
    pub attempts: AtomicU64,
    pub ok: AtomicU64,
    /// Page attempts only: failures the allocator counted as busy / empty
    /// (the report classifies the other kinds from the heaps' counters).
    pub fail_busy: AtomicU64,
    pub fail_empty: AtomicU64,
    /// Blocks of this kind freed (any path).
    pub frees: AtomicU64,
    /// Blocks of this kind left allocated because their check failed (a
    /// reported violation: the size can't be trusted).
    pub leaked: AtomicU64,
    /// Blocks parked in a thread's stash / handed to the cross-thread stash.
    pub stashed: AtomicU64,
    pub crossed: AtomicU64,
}

impl KindStats {
    #[allow(clippy::declare_interior_mutable_const)]
    const NEW: KindStats = KindStats {
        attempts: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        fail_busy: AtomicU64::new(0),
        fail_empty: AtomicU64::new(0),
        frees: AtomicU64::new(0),
        leaked: AtomicU64::new(0),
        stashed: AtomicU64::new(0),
        crossed: AtomicU64::new(0),
    };
}

/// Indexed by `KIND_PAGE`, `KIND_OBJECT`, `KIND_BOX`, `KIND_WORKER`
/// (normal-path blocks: `ok` and `frees`) and `KIND_LARGE`; entry 0 unused.
pub static KINDS: [KindStats; 6] = [KindStats::NEW; 6];

/// Latency of every nolock allocation attempt made in a handler.
pub static ALLOC_NS: Histogram = Histogram::new();
/// Latency of every nolock free made in a handler.
pub static FREE_NS: Histogram = Histogram::new();

pub static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The first violation, for the report.
pub struct FirstViolation {
    pub set: AtomicBool,
    pub op: AtomicU8,
    pub addr: AtomicUsize,
    pub kind: AtomicUsize,
    pub offset: AtomicUsize,
    pub expected: AtomicU64,
    pub found: AtomicU64,
}
pub static FIRST_VIOLATION: FirstViolation = FirstViolation {
    set: AtomicBool::new(false),
    op: AtomicU8::new(0),
    addr: AtomicUsize::new(0),
    kind: AtomicUsize::new(0),
    offset: AtomicUsize::new(0),
    expected: AtomicU64::new(0),
    found: AtomicU64::new(0),
};

/// Normal-path allocations of the stress heap that returned `None`.
pub static NORMAL_FAIL: AtomicU64 = AtomicU64::new(0);
/// Blocks that went through the worker hand-off array.
pub static HANDOFFS: AtomicU64 = AtomicU64::new(0);
/// Vectors made through `Global` by the workers.
pub static GLOBAL_OPS: AtomicU64 = AtomicU64::new(0);
/// `--migrate`: the workers' affinity changes (a pin to one CPU, or a
/// release to all of them).
pub static MIGRATIONS: AtomicU64 = AtomicU64::new(0);
/// `--migrate`: the drainer's passes (a `drain` each; a `maintain` every
/// fourth).
pub static DRAINS: AtomicU64 = AtomicU64::new(0);
/// Frees made by the main thread while tearing down (watchdog progress).
pub static TEARDOWN_OPS: AtomicU64 = AtomicU64::new(0);
/// Set by the main thread: workers stop.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// `--simulate-hang` (tests the watchdog): workers stop making progress.
pub static HANG: AtomicBool = AtomicBool::new(false);
/// `--simulate-corruption` (tests the pattern check): the first worker to
/// see it set clears it and changes one byte of one of its live blocks.
pub static CORRUPT: AtomicBool = AtomicBool::new(false);

/// The stress heap, for the handlers (set once before any timer starts).
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());

static HANDOFF_SLOTS: Stash<HANDOFF> = Stash::new();
static XSTASH_SLOTS: Stash<XSTASH> = Stash::new();

pub fn set_heap(heap: &'static Heap) {
    HEAP.store(heap as *const Heap as *mut Heap, Release);
}

fn heap() -> Option<&'static Heap> {
    let p = HEAP.load(Acquire);
    // SAFETY: only `set_heap` stores here, a `&'static Heap`.
    (!p.is_null()).then(|| unsafe { &*p })
}

pub use anyalloc_storm::thread::now_ns;

/// Runs `f`, one call into the allocator, with the thread's in-allocator
/// flag ([`ThreadSlot::reentry`]) raised around exactly that call; the main
/// thread's teardown (no slot, no signals) runs it plainly.
#[inline(always)]
fn inside<R>(slot: Option<&ThreadSlot>, f: impl FnOnce() -> R) -> R {
    match slot {
        Some(slot) => slot.reentry.inside(f),
        None => f(),
    }
}

#[cold]
fn violation(op: Op, addr: usize, kind: usize, m: Mismatch) {
    VIOLATIONS.fetch_add(1, Relaxed);
    let f = &FIRST_VIOLATION;
    if !f.set.swap(true, AcqRel) {
        f.op.store(op as u8, Relaxed);
        f.addr.store(addr, Relaxed);
        f.kind.store(kind, Relaxed);
        f.offset.store(m.offset, Relaxed);
        f.expected.store(m.expected, Relaxed);
        f.found.store(m.found, Relaxed);
    }
}

/// Frees with the nolock paths (handlers) or the normal paths (teardown).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Nolock,
    Normal,
}

/// Who frees: the operation word the watchdog reads, and the thread slot
/// whose [`ThreadSlot::reentry`] marks the allocator call (`None` for the
/// main thread's teardown, which takes no signals).
#[derive(Clone, Copy)]
struct Ctx<'a> {
    op: &'a AtomicU8,
    slot: Option<&'a ThreadSlot>,
}

/// Checks a block against its entry's owner tag and frees it with the path
/// for its kind. A block that fails the check is reported and leaked (its
/// size can't be trusted), and counted in its kind's `leaked`.
fn free_entry(heap: &Heap, entry: usize, cx: Ctx<'_>, path: Path) {
    let e = Entry(entry);
    let kind = e.kind();
    let p = e.addr() as *mut u8;
    let op = cx.op;
    let code = match kind {
        KIND_PAGE => Op::PageFreeNolock,
        KIND_OBJECT => Op::ObjectFreeNolock,
        KIND_BOX => Op::BoxFreeNolock,
        KIND_LARGE => Op::LargeFreeNolock,
        _ => Op::HeapFree,
    };
    op.store(Op::Check as u8, Relaxed);
    // SAFETY: every tagged entry is a live block we filled (at least 8
    // bytes, 8-aligned), owned by whoever took it out of its stash.
    let size = match unsafe { pattern::size_of(e) } {
        Ok(s) => s,
        Err(m) => return leak(code, p as usize, kind, m),
    };
    // SAFETY: as above; the header says the block has `size` bytes.
    if let Err(m) = unsafe { pattern::check(e, size) } {
        return leak(code, p as usize, kind, m);
    }
    op.store(code as u8, Relaxed);
    // SAFETY: a non-null block address.
    let ptr = unsafe { NonNull::new_unchecked(p) };
    let t0 = if path == Path::Nolock { now_ns() } else { 0 };
    match kind {
        KIND_PAGE => {
            let order = (size / PAGE_SIZE).trailing_zeros();
            if size != PAGE_SIZE << order || order > anyalloc::PCP_MAX_ORDER {
                let m = Mismatch {
                    offset: 0,
                    expected: (PAGE_SIZE as u64) << anyalloc::PCP_MAX_ORDER,
                    found: size as u64,
                };
                return leak(code, p as usize, kind, m);
            }
            // SAFETY: pages of this order from alloc_pages_nolock, freed
            // once (we took the only reference out of its stash).
            inside(cx.slot, || unsafe {
                match path {
                    Path::Nolock => heap.pages().free_pages_nolock(ptr, order),
                    Path::Normal => heap.pages().free_pages(ptr, order),
                }
            })
        }
        KIND_OBJECT | KIND_WORKER | KIND_LARGE => {
            // SAFETY: an object of this heap, freed once (as above).
            inside(cx.slot, || unsafe {
                match path {
                    Path::Nolock => heap.free_nolock(ptr),
                    Path::Normal => heap.free(ptr),
                }
            })
        }
        KIND_BOX => {
            let ok = inside(cx.slot, || match size {
                16 => drop_box::<2>(p),
                128 => drop_box::<16>(p),
                1024 => drop_box::<128>(p),
                _ => false,
            });
            if !ok {
                let m = Mismatch {
                    offset: 0,
                    expected: 1024,
                    found: size as u64,
                };
                return leak(code, p as usize, kind, m);
            }
        }
        _ => {}
    }
    if path == Path::Nolock {
        FREE_NS.record(now_ns().wrapping_sub(t0));
    }
    KINDS[kind].frees.fetch_add(1, Relaxed);
}

/// A violation found while freeing: the block stays allocated (its size
/// can't be trusted) and is counted as leaked for its kind.
#[cold]
fn leak(op: Op, addr: usize, kind: usize, m: Mismatch) {
    KINDS[kind].leaked.fetch_add(1, Relaxed);
    violation(op, addr, kind, m);
}

fn drop_box<const N: usize>(p: *mut u8) -> bool {
    // SAFETY: `p` came from `NBox::into_raw` of a `NBox<[u64; N], NoLock>`
    // (the header size says which N) and is dropped exactly once.
    drop(unsafe { NBox::from_raw_in(p as *mut [u64; N], NoLock) });
    true
}

fn try_box<const N: usize>() -> Option<*mut u8> {
    let b = NBox::try_new_in([0u64; N], NoLock).ok()?;
    Some(NBox::into_raw(b) as *mut u8)
}

// ----- signal handlers -----------------------------------------------------------

/// Order 0..=3, skewed to small.
fn page_order(rng: &mut XorShift) -> u32 {
    match rng.below(20) {
        0..=9 => 0,
        10..=14 => 1,
        15..=17 => 2,
        _ => 3,
    }
}

/// A large object: 64 KiB to 4 MiB (page orders 4..=10: the zone try-lock
/// path), sizes spread over each order's range.
fn large_size(rng: &mut XorShift) -> usize {
    let order = 4 + rng.below(7) as u32;
    let block = PAGE_SIZE << order;
    (block - rng.below(block as u64 / 2 - 8) as usize) & !7
}

/// 8 B to 32 KiB, skewed to small (above 8 KiB the heap serves pages).
fn object_size(rng: &mut XorShift) -> usize {
    let max = match rng.below(100) {
        0..=59 => 128,
        60..=89 => 1024,
        90..=97 => 8192,
        _ => 32768,
    };
    8 + rng.below(max - 7) as usize
}

/// One handler invocation: a page, an object and a NoLock box (and every
/// fourth time a large object of 64 KiB to 4 MiB), each allocated (timed),
/// filled, then freed now, parked in this thread's stash, or handed to the
/// cross-thread stash; sometimes an older stashed block is freed too.
fn handle(slot: &'static ThreadSlot, level: usize) {
    // Held until the handler returns: its nesting level.
    let entry = slot.reentry.enter();
    if entry.in_allocator() {
        slot.interrupted_inside.fetch_add(1, Relaxed);
    }
    slot.signals.fetch_add(1, Relaxed);
    if entry.nested() {
        slot.nested.fetch_add(1, Relaxed);
    }
    slot.max_depth.fetch_max(entry.depth() + 1, Relaxed);
    let op = &slot.handler_op[level];
    let cx = Ctx {
        op,
        slot: Some(slot),
    };
    if let Some(heap) = heap() {
        let seed = slot.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed) ^ level as u64;
        let mut rng = XorShift::new(seed);

        // Pages.
        let order = page_order(&mut rng);
        let pages = heap.pages();
        let before = pages.stats();
        op.store(Op::PageAllocNolock as u8, Relaxed);
        let t0 = now_ns();
        let r = inside(cx.slot, || pages.alloc_pages_nolock(order));
        ALLOC_NS.record(now_ns().wrapping_sub(t0));
        let k = &KINDS[KIND_PAGE];
        k.attempts.fetch_add(1, Relaxed);
        match r {
            Some(p) => {
                k.ok.fetch_add(1, Relaxed);
                let e = Entry::fresh(p.as_ptr() as usize, KIND_PAGE);
                // SAFETY: a fresh block of 2^order pages.
                unsafe { pattern::fill(e, PAGE_SIZE << order) };
                dispose(heap, slot, cx, &mut rng, e);
            }
            None => {
                // Which reason the allocator counted (only another failure
                // overlapping this one can blur it).
                let after = pages.stats();
                if after.nolock_alloc_fail_empty > before.nolock_alloc_fail_empty
                    && after.nolock_alloc_fail_busy == before.nolock_alloc_fail_busy
                {
                    k.fail_empty.fetch_add(1, Relaxed);
                } else {
                    k.fail_busy.fetch_add(1, Relaxed);
                }
            }
        }

        // Objects.
        let size = object_size(&mut rng);
        // SAFETY: 8 <= size <= 32 KiB and a power-of-two alignment: a
        // valid layout.
        let layout = unsafe { Layout::from_size_align_unchecked(size, 8) };
        op.store(Op::ObjectAllocNolock as u8, Relaxed);
        let t0 = now_ns();
        let r = inside(cx.slot, || heap.alloc_nolock(layout));
        ALLOC_NS.record(now_ns().wrapping_sub(t0));
        let k = &KINDS[KIND_OBJECT];
        k.attempts.fetch_add(1, Relaxed);
        if let Some(p) = r {
            k.ok.fetch_add(1, Relaxed);
            let e = Entry::fresh(p.as_ptr() as usize, KIND_OBJECT);
            // SAFETY: a fresh object of at least `layout.size()` bytes.
            unsafe { pattern::fill(e, layout.size()) };
            dispose(heap, slot, cx, &mut rng, e);
        }

        // NoLock boxes (the process-wide heap, which is Global's).
        op.store(Op::BoxAllocNolock as u8, Relaxed);
        let which = rng.below(3);
        let t0 = now_ns();
        let r = inside(cx.slot, || match which {
            0 => try_box::<2>(),
            1 => try_box::<16>(),
            _ => try_box::<128>(),
        });
        ALLOC_NS.record(now_ns().wrapping_sub(t0));
        let k = &KINDS[KIND_BOX];
        k.attempts.fetch_add(1, Relaxed);
        if let Some(p) = r {
            k.ok.fetch_add(1, Relaxed);
            let bytes = [16, 128, 1024][which as usize];
            let e = Entry::fresh(p as usize, KIND_BOX);
            // SAFETY: the box's memory: `bytes` bytes.
            unsafe { pattern::fill(e, bytes) };
            dispose(heap, slot, cx, &mut rng, e);
        }

        // Every fourth time a large object (64 KiB to 4 MiB).
        if rng.below(4) == 0 {
            let size = large_size(&mut rng);
            // SAFETY: 32 KiB < size <= 4 MiB and a power-of-two alignment:
            // a valid layout.
            let layout = unsafe { Layout::from_size_align_unchecked(size, 8) };
            op.store(Op::LargeAllocNolock as u8, Relaxed);
            let t0 = now_ns();
            let r = inside(cx.slot, || heap.alloc_nolock(layout));
            ALLOC_NS.record(now_ns().wrapping_sub(t0));
            let k = &KINDS[KIND_LARGE];
            k.attempts.fetch_add(1, Relaxed);
            if let Some(p) = r {
                k.ok.fetch_add(1, Relaxed);
                let e = Entry::fresh(p.as_ptr() as usize, KIND_LARGE);
                // SAFETY: a fresh object of at least `size` bytes.
                unsafe { pattern::fill(e, size) };
                dispose(heap, slot, cx, &mut rng, e);
            }
        }

        // Sometimes free an older stashed block, whatever its kind.
        if rng.below(4) == 0 {
            op.store(Op::Stash as u8, Relaxed);
            let e = slot.stash.swap(rng.below(STASH as u64) as usize, 0);
            if e != 0 {
                free_entry(heap, e, cx, Path::Nolock);
            }
        }
    }
    op.store(Op::Idle as u8, Relaxed);
}

fn dispose(heap: &Heap, slot: &ThreadSlot, cx: Ctx<'_>, rng: &mut XorShift, e: Entry) {
    let (kind, entry, op) = (e.kind(), e.0, cx.op);
    match rng.below(8) {
        0..=3 => free_entry(heap, entry, cx, Path::Nolock),
        4..=6 => {
            op.store(Op::Stash as u8, Relaxed);
            KINDS[kind].stashed.fetch_add(1, Relaxed);
            let old = slot.stash.swap(rng.below(STASH as u64) as usize, entry);
            if old != 0 {
                free_entry(heap, old, cx, Path::Nolock);
            }
        }
        _ => {
            op.store(Op::Stash as u8, Relaxed);
            KINDS[kind].crossed.fetch_add(1, Relaxed);
            let old = XSTASH_SLOTS.swap(rng.below(XSTASH as u64) as usize, entry);
            if old != 0 {
                free_entry(heap, old, cx, Path::Nolock);
            }
        }
    }
}

/// The slot a timer signal is for: the timer's `sival_ptr`, checked to be
/// one of [`SLOTS`]; and the timer's overrun count.
fn slot_of(info: *const libc::siginfo_t) -> Option<(&'static ThreadSlot, u64)> {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let t = unsafe { timer_signal(info) }?; // None: not from our timers
    let p = t.value;
    let base = SLOTS.as_ptr() as usize;
    let size = std::mem::size_of::<ThreadSlot>();
    if p < base || !(p - base).is_multiple_of(size) || (p - base) / size >= MAX_THREADS {
        return None;
    }
    Some((&SLOTS[(p - base) / size], t.overrun))
}

fn on_signal(level: usize, info: *const libc::siginfo_t) {
    let _errno = ErrnoGuard::save();
    if let Some((slot, overrun)) = slot_of(info) {
        if overrun > 0 {
            slot.overruns.fetch_add(overrun, Relaxed);
        }
        handle(slot, level);
    }
}

extern "C" fn on_signal_a(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    on_signal(0, info);
}

extern "C" fn on_signal_b(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    on_signal(1, info);
}

/// Installs both handlers. With `nested`, each masks only its own signal,
/// so either can interrupt the other's handler (depth at most 2); without,
/// each masks both.
pub fn install_handlers(nested: bool) -> std::io::Result<()> {
    let both = storm_signals();
    let also: &[libc::c_int] = if nested { &[] } else { &both };
    install_handler(both[0], on_signal_a, also)?;
    install_handler(both[1], on_signal_b, also)
}

/// Blocks (or unblocks) both timer signals for the calling thread.
pub fn mask_signals(block: bool) {
    mask(&storm_signals(), block);
}

// ----- workers ---------------------------------------------------------------------

/// What a worker needs to know.
#[derive(Clone)]
pub struct WorkerConfig {
    pub index: usize,
    /// Timer period of signal A (0: no timers); signal B fires 3.3x slower.
    pub interval_ns: u64,
    pub seed: u64,
    /// `--migrate`: the CPUs the worker moves between (its affinity flips
    /// to one of them, or back to all, every fourth operation); `None`: it
    /// stays where the scheduler puts it.
    pub migrate: Option<std::sync::Arc<Vec<usize>>>,
}

/// Moves the calling thread: pins it to one of `cpus` or lets it run on
/// all of them again, at random. Normal context.
fn migrate(rng: &mut XorShift, cpus: &[usize]) {
    let k = rng.below(cpus.len() as u64 + 1) as usize;
    let moved = match cpus.get(k) {
        Some(&c) => anyalloc_storm::thread::pin_to_cpu(c),
        None => anyalloc_storm::thread::allow_cpus(cpus),
    };
    if moved {
        MIGRATIONS.fetch_add(1, Relaxed);
    }
}

/// `--migrate`'s drainer: until [`STOP`], moves between `cpus` as the
/// workers do and drains the stress heap (a take of every CPU's slots
/// from wherever it runs: for a level-0 slot with rseq, a CAS and a
/// membarrier fence of that CPU), with a maintenance pass every fourth
/// time. Its signals stay blocked (it is spawned with them blocked).
pub fn drainer(heap: &'static Heap, cpus: &[usize], seed: u64) {
    let mut rng = XorShift::new(seed);
    while !STOP.load(Relaxed) {
        migrate(&mut rng, cpus);
        heap.drain();
        if rng.below(4) == 0 {
            heap.maintain();
        }
        DRAINS.fetch_add(1, Relaxed);
        std::thread::sleep(Duration::from_micros(200));
    }
    anyalloc_storm::thread::allow_cpus(cpus);
}

/// 8 B to 64 KiB, skewed to small.
fn worker_size(rng: &mut XorShift) -> usize {
    let max = match rng.below(100) {
        0..=54 => 128,
        55..=79 => 1024,
        80..=92 => 8192,
        93..=97 => 32768,
        _ => 65536,
    };
    8 + rng.below(max - 7) as usize
}

/// A normal-path block of `size` bytes, filled: its entry, or 0.
fn alloc_filled(heap: &Heap, slot: &ThreadSlot, size: usize) -> usize {
    // SAFETY: 8 <= size <= 64 KiB and a power-of-two alignment: a valid
    // layout.
    let layout = unsafe { Layout::from_size_align_unchecked(size, 8) };
    match inside(Some(slot), || heap.alloc(layout)) {
        Some(p) => {
            KINDS[KIND_WORKER].ok.fetch_add(1, Relaxed);
            let e = Entry::fresh(p.as_ptr() as usize, KIND_WORKER);
            // SAFETY: a fresh block of at least `size` bytes.
            unsafe { pattern::fill(e, size) };
            e.0
        }
        None => {
            NORMAL_FAIL.fetch_add(1, Relaxed);
            0
        }
    }
}

/// A `Vec<u64>` through `Global` (the allocation marked as inside the
/// allocator), filled with a pattern of its length and a fresh nonce; the
/// nonce is kept beside it.
fn global_vec(slot: &ThreadSlot, rng: &mut XorShift) -> (Vec<u64>, u64) {
    let len = 1 + match rng.below(10) {
        0..=6 => rng.below(32),
        7..=8 => rng.below(512),
        _ => rng.below(8192),
    } as usize;
    let nonce = mix64(rng.next_u64());
    let mut v: Vec<u64> = inside(Some(slot), || Vec::with_capacity(len));
    let base = mix64(len as u64 ^ nonce);
    v.extend((0..len as u64).map(|i| base ^ i));
    (v, nonce)
}

fn check_global_vec((v, nonce): &(Vec<u64>, u64), op: &AtomicU8) {
    let base = mix64(v.len() as u64 ^ nonce);
    if let Some(i) = (0..v.len()).find(|&i| v[i] != base ^ i as u64) {
        let m = Mismatch {
            offset: i * 8,
            expected: base ^ i as u64,
            found: v[i],
        };
        violation(Op::from_code(op.load(Relaxed)), v.as_ptr() as usize, 0, m);
    }
}

/// A worker: churns on the stress heap's normal path and through `Global`
/// while its two timers interrupt it, until [`STOP`]. Then it deletes its
/// timers, blocks their signals and frees everything it and its handlers
/// still hold.
pub fn worker(
    cfg: WorkerConfig,
    heap: &'static Heap,
    ready: &std::sync::Barrier,
) -> Result<(), String> {
    let slot = &SLOTS[cfg.index];
    let op = &slot.worker_op;
    let cx = Ctx {
        op,
        slot: Some(slot),
    };
    op.store(Op::Starting as u8, Relaxed);
    slot.running.store(true, Release);
    let mut rng = XorShift::new(cfg.seed);
    let mut live = vec![0usize; LIVE];
    let mut vecs: Vec<(Vec<u64>, u64)> = (0..GLOBAL_VECS).map(|_| (Vec::new(), 0)).collect();

    let mut timers = Vec::new();
    let mut setup = Ok(());
    if cfg.interval_ns > 0 {
        let [a, b] = storm_signals();
        let ib = cfg.interval_ns * 33 / 10;
        for (sig, interval) in [(a, cfg.interval_ns), (b, ib)] {
            let value = slot as *const ThreadSlot as usize;
            match ThreadTimer::start(sig, Duration::from_nanos(interval), value) {
                Ok(t) => timers.push(t),
                Err(e) => setup = Err(format!("timer_create/timer_settime failed: {e}")),
            }
        }
    }
    mask_signals(false);
    ready.wait();

    while setup.is_ok() && !STOP.load(Relaxed) {
        if HANG.load(Relaxed) {
            // Simulated deadlock: no more ops, no more signals, ever.
            mask_signals(true);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        if CORRUPT.load(Relaxed) && CORRUPT.swap(false, Relaxed) {
            if let Some(&b) = live.iter().find(|&&b| b != 0) {
                let p = Entry(b).addr() as *mut u8;
                // SAFETY: a live block this worker owns, at least 8 bytes:
                // its header's top byte is changed on purpose.
                unsafe { p.add(7).write_volatile(p.add(7).read_volatile() ^ 0x40) };
            }
        }
        for i in 0..32 {
            if i % 4 == 0 {
                if let Some(cpus) = &cfg.migrate {
                    migrate(&mut rng, cpus);
                }
            }
            slot.ops.fetch_add(1, Relaxed);
            let r = rng.below(32);
            if r == 0 {
                // Through Global: replace a random vector, checking the old.
                op.store(Op::GlobalVec as u8, Relaxed);
                let i = rng.below(GLOBAL_VECS as u64) as usize;
                check_global_vec(&vecs[i], op);
                let new = global_vec(slot, &mut rng);
                let old = std::mem::replace(&mut vecs[i], new);
                inside(Some(slot), || drop(old));
                GLOBAL_OPS.fetch_add(1, Relaxed);
            } else if r <= 2 {
                // Hand a live block to whichever thread swaps this slot next;
                // free the block we get back (usually another thread's).
                op.store(Op::HandOff as u8, Relaxed);
                let j = rng.below(LIVE as u64) as usize;
                let mine = std::mem::take(&mut live[j]);
                let h = rng.below(HANDOFF as u64) as usize;
                let theirs = HANDOFF_SLOTS.swap(h, mine);
                HANDOFFS.fetch_add(1, Relaxed);
                if theirs != 0 {
                    op.store(Op::HeapFree as u8, Relaxed);
                    free_entry(heap, theirs, cx, Path::Normal);
                }
            } else {
                let j = rng.below(LIVE as u64) as usize;
                if live[j] != 0 {
                    op.store(Op::HeapFree as u8, Relaxed);
                    free_entry(heap, std::mem::take(&mut live[j]), cx, Path::Normal);
                }
                // Refill only half of the time: lifetimes vary, and the
                // live set breathes.
                if r & 1 == 0 {
                    op.store(Op::HeapAlloc as u8, Relaxed);
                    let size = worker_size(&mut rng);
                    let b = alloc_filled(heap, slot, size);
                    if b != 0 && r & 6 == 0 {
                        // A short-lived block: freed at once.
                        op.store(Op::HeapFree as u8, Relaxed);
                        free_entry(heap, b, cx, Path::Normal);
                    } else {
                        live[j] = b;
                    }
                }
            }
        }
    }

    // Teardown: no handler may run on this thread any more.
    drop(timers); // deletes them
    mask_signals(true);
    op.store(Op::Teardown as u8, Relaxed);
    for b in live.iter_mut().filter(|b| **b != 0) {
        free_entry(heap, std::mem::take(b), cx, Path::Normal);
        slot.ops.fetch_add(1, Relaxed);
    }
    for v in &vecs {
        check_global_vec(v, op);
    }
    drop(vecs);
    for e in slot.stash.drain() {
        free_entry(heap, e, cx, Path::Normal);
        slot.ops.fetch_add(1, Relaxed);
    }
    op.store(Op::Done as u8, Relaxed);
    slot.running.store(false, Release);
    setup
}

/// After every worker has exited: frees what is left in the hand-off array
/// and the cross-thread stash (no handler runs any more).
pub fn free_shared(heap: &Heap, op: &AtomicU8) {
    for e in HANDOFF_SLOTS.drain().chain(XSTASH_SLOTS.drain()) {
        free_entry(heap, e, Ctx { op, slot: None }, Path::Normal);
        TEARDOWN_OPS.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_in_range() {
        let mut r = XorShift::new(1);
        for _ in 0..100_000 {
            let w = worker_size(&mut r);
            assert!((8..=65536).contains(&w));
            let o = object_size(&mut r);
            assert!((8..=32768).contains(&o));
            assert!(page_order(&mut r) <= anyalloc::PCP_MAX_ORDER);
            let l = large_size(&mut r);
            assert!(l > 32 << 10 && l <= 4 << 20 && l.is_multiple_of(8), "{l}");
        }
    }

    #[test]
    fn op_codes_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_code(op as u8), op);
        }
    }
}
