//! # anyalloc in a freestanding program, embedded the way a kernel does
//!
//! No std, no libc: the program has its own `_start`, makes every system
//! call with inline assembly ([`sys`]), gets one memory region from a raw
//! `mmap`, and builds an [`anyalloc::Heap`] over it with its own
//! [`anyalloc::Platform`] ([`kalloc`]). Signals play the interrupts
//! ([`irq`]): a low-priority and a high-priority "IRQ", driven by interval
//! timers, the high one able to interrupt the low one.
//!
//! ## Which context may call what
//!
//! * **Normal context** (the main loop, here also the deferred work):
//!   `Heap::alloc` / `Heap::free` (they may wait on a lock) and
//!   `Heap::maintain`, the deferred work a kernel runs from a workqueue.
//! * **Interrupt context** (both handlers, nested or not):
//!   `Heap::alloc_nolock` (may fail: handle `None`) and `Heap::free_nolock`
//!   (never fails; a block it cannot give back at once is parked and the
//!   next normal-path call or `maintain` takes it back). Never the normal
//!   path: [`kalloc::alloc_normal`] checks, like the kernel's `might_sleep`.
//!
//! The global allocator ([`kalloc`]) picks the path from the interrupt
//! depth, so `alloc::alloc::alloc`, `Box` and `Vec` work in both contexts.
//! Blocks cross contexts: the low IRQ allocates "received packets" that
//! the main loop frees on the normal path; the main loop allocates
//! "transmit buffers" that the high IRQ frees on the nolock path.
//!
//! Every block carries its owner's pattern ([`block`]) and is checked before
//! it is freed; at the end every page must be back in the heap. The program
//! prints one line and exits 0:
//! `freestanding ok: irqs N nested M nolock_ok A nolock_fail B normal_ops C busy D violations 0`
//! (`busy`: nolock calls that found a lock held by the context their
//! handler interrupted, and went around it), or a line starting
//! `freestanding FAIL` and exits 1: on a violation, or if no interrupt
//! nested in another, none landed while the normal path was inside the
//! heap, or no nolock allocation succeeded.
//!
//! The timers rarely land while the main loop holds a zone or node lock.
//! With the feature `interrupt-points` ([`points`]) the high IRQ is also
//! raised inside every kind of the heap's locks, the line adds
//! `in_locks zone Z node N slot S` (interrupts that landed inside each),
//! and the run fails unless each is above 0 and so is `busy`: a nolock path
//! that ignored a lock held by the context it interrupted would never find
//! one busy.
//!
//! Options: `--seconds N` (default 3); two switches that break the program
//! on purpose to show the checks work: `--corrupt` (a stray write into one
//! block) and `--normal-in-irq` (the high IRQ calls the normal path); and
//! `--double-free` (the high IRQ frees a block twice), which the heap must
//! detect and report through the platform's `fatal` (`freestanding FAIL:
//! anyalloc: ...`).

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("the freestanding example makes raw x86_64 Linux system calls");

extern crate alloc;

mod block;
mod irq;
mod kalloc;
#[cfg(feature = "interrupt-points")]
mod points;
mod sys;

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};

use block::{Block, Owner, Ring};

/// The heap region: one raw `mmap`.
const REGION_BYTES: usize = 64 << 20;

/// What the checks found wrong (the first one is reported).
#[derive(Clone, Copy)]
pub enum Violation {
    MainBlock = 1,
    RxBlock,
    TxBlock,
    IrqScratch,
    NormalPathInIrq,
    IrqPriority,
    Leak,
    TooLarge,
}

const REASONS: [&str; 9] = [
    "",
    "a main-loop block failed its pattern check",
    "a block from the low IRQ failed its pattern check in the main loop",
    "a block from the main loop failed its pattern check in the high IRQ",
    "a handler's own block failed its pattern check",
    "the normal path was called in interrupt context",
    "the low-priority IRQ interrupted the high-priority one",
    "memory was not all back in the heap at the end",
    "a request above 4 MiB was not refused at once (without std nothing serves it)",
];

static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static FIRST_VIOLATION: AtomicU8 = AtomicU8::new(0);

/// Records a violation. Any context.
pub fn violation(v: Violation) {
    VIOLATIONS.fetch_add(1, Relaxed);
    let _ = FIRST_VIOLATION.compare_exchange(0, v as u8, Relaxed, Relaxed);
}

/// Checks `block` and frees it in the current context, or records `v` (and
/// leaks the block: its header can no longer be trusted).
fn check_and_free(block: Block, owner: Owner, v: Violation) {
    if block.check(owner) {
        block.free();
    } else {
        violation(v);
    }
}

/// Received packets: low IRQ -> main loop.
static RX: Ring<256> = Ring::new();
/// Transmit buffers to complete: main loop -> high IRQ.
static TX: Ring<64> = Ring::new();
/// `--normal-in-irq`.
static NORMAL_IN_IRQ: AtomicBool = AtomicBool::new(false);
/// `--double-free`, until done.
static DOUBLE_FREE: AtomicBool = AtomicBool::new(false);

/// A xorshift step on a context's state (no context interrupts itself, so
/// load-then-store is enough).
fn next(state: &AtomicU64) -> u64 {
    let mut x = state.load(Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Relaxed);
    x
}

/// The low-priority IRQ, a network card: a burst of received packets goes
/// to the main loop, plus one scratch buffer of up to 32 KiB.
pub fn low_irq() {
    static RNG: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
    let r = next(&RNG);
    for i in 0..16 + r % 49 {
        let len = 64 + (next(&RNG) % 9152) as usize;
        let Some(packet) = Block::new(len, Owner::LowIrq, r + i) else {
            continue; // no memory for an interrupt now: drop the packet
        };
        if let Err(packet) = RX.push(packet) {
            check_and_free(packet, Owner::LowIrq, Violation::IrqScratch);
        }
    }
    if let Some(scratch) = Block::new(16 << (r % 12), Owner::LowIrq, r) {
        check_and_free(scratch, Owner::LowIrq, Violation::IrqScratch);
    }
}

/// The high-priority IRQ, transmit completion: frees the main loop's sent
/// buffers, and uses a few small scratch blocks.
pub fn high_irq() {
    static RNG: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    for _ in 0..4 {
        match TX.pop() {
            Some(sent) => check_and_free(sent, Owner::Main, Violation::TxBlock),
            None => break,
        }
    }
    let r = next(&RNG);
    let scratch: [Option<Block>; 3] =
        core::array::from_fn(|i| Block::new(16 << ((r >> (8 * i)) % 8), Owner::HighIrq, r));
    for block in scratch.into_iter().flatten() {
        check_and_free(block, Owner::HighIrq, Violation::IrqScratch);
    }
    if DOUBLE_FREE.load(Relaxed) {
        double_free();
    }
    if NORMAL_IN_IRQ.load(Relaxed) {
        // The bug `--normal-in-irq` demonstrates: caught, never run.
        let _ = kalloc::alloc_normal(core::alloc::Layout::new::<u64>());
    }
}

/// The high IRQ raised where the main loop holds a zone or node lock
/// (feature `interrupt-points`, see [`points`]): work that needs those
/// locks too, which the nolock path must go around. More blocks of one
/// class than a sheaf holds (its refill and flush take the node lock),
/// and one of 64 or 128 KiB (above the per-CPU page lists: the zone lock).
#[cfg(feature = "interrupt-points")]
pub fn lock_burst() {
    static RNG: AtomicU64 = AtomicU64::new(0x5851_f42d_4c95_7f2d);
    let r = next(&RNG);
    let small: [Option<Block>; 48] =
        core::array::from_fn(|i| Block::new(256, Owner::HighIrq, r + i as u64));
    let large = Block::new(64 << (10 + r % 2), Owner::HighIrq, r);
    for block in small.into_iter().chain([large]).flatten() {
        check_and_free(block, Owner::HighIrq, Violation::IrqScratch);
    }
}

/// The bug `--double-free` demonstrates, in the high IRQ (nothing runs
/// between the two frees): a 64 KiB block freed twice on the nolock path.
/// The heap detects the second free and stops the program through
/// `Platform::fatal` (`kalloc`'s prints the FAIL line), in interrupt
/// context; the program only returns here if no memory was to be had.
/// (The heap's own calls, not `alloc::alloc`'s: the compiler may drop an
/// allocation that is only freed.)
fn double_free() {
    let layout = core::alloc::Layout::from_size_align(64 << 10, 16).expect("a valid layout");
    let Some(heap) = kalloc::heap() else { return };
    if let Some(p) = heap.alloc_nolock(layout) {
        // SAFETY: the second free is the deliberate bug: the heap must
        // refuse it (report and stop) before touching anything.
        unsafe {
            heap.free_nolock(p);
            heap.free_nolock(p);
        }
    }
}

struct Options {
    seconds: u64,
    corrupt: bool,
}

fn parse(mut args: sys::Args) -> Option<Options> {
    let mut o = Options {
        seconds: 3,
        corrupt: false,
    };
    while let Some(arg) = args.next() {
        match arg {
            b"--seconds" => {
                let n = core::str::from_utf8(args.next()?).ok()?;
                o.seconds = n.parse().ok().filter(|&s| s > 0)?;
            }
            b"--corrupt" => o.corrupt = true,
            b"--normal-in-irq" => NORMAL_IN_IRQ.store(true, Relaxed),
            b"--double-free" => DOUBLE_FREE.store(true, Relaxed),
            _ => return None,
        }
    }
    Some(o)
}

/// The main loop: normal-context churn of blocks from 16 B to 1 MiB,
/// receive and transmit queues, deferred maintenance every 10 ms. Returns
/// how many times a nolock call found a lock busy and went around it: on
/// this one thread, a lock held by the context its handler interrupted.
fn run(heap: &anyalloc::Heap, o: &Options) -> u64 {
    // Above 4 MiB (`mmap` with std) nothing can serve a request: it is
    // refused at once, without running reclaim (every shrinker, every
    // CPU's caches drained) for nothing.
    let reclaims = heap.stats().reclaims;
    let too_large = core::alloc::Layout::from_size_align(8 << 20, 8).expect("a valid layout");
    let group = anyalloc::Group::new("boot", None, None);
    if heap.alloc(too_large).is_some()
        || heap.alloc_in(too_large, &group).is_some()
        || heap.stats().reclaims != reclaims
    {
        violation(Violation::TooLarge);
    }
    drop(group);
    let start = sys::now_ns();
    let end = start + o.seconds * 1_000_000_000;
    let mut next_maintain = start;
    let mut held: [Option<Block>; 64] = [const { None }; 64];
    let rng_state = AtomicU64::new(0x1234_5678_9abc_def1);
    let mut corrupt = o.corrupt;
    for iter in 0u64.. {
        let rng = next(&rng_state);
        let slot = &mut held[(rng % 64) as usize];
        match slot.take() {
            Some(mut block) => {
                if corrupt && sys::now_ns() > start + o.seconds * 500_000_000 {
                    block.corrupt();
                    corrupt = false;
                }
                check_and_free(block, Owner::Main, Violation::MainBlock);
            }
            None => {
                let shift = (rng >> 8) % 13;
                let mut len = (16 << shift) + ((rng >> 16) as usize % (16 << shift));
                if (rng >> 40).is_multiple_of(64) {
                    len = (64 << 10) << ((rng >> 48) % 5); // 64 KiB .. 1 MiB
                }
                *slot = Block::new(len, Owner::Main, iter);
            }
        }
        if iter.is_multiple_of(4) {
            if let Some(b) = Block::new(64 + (rng >> 24) as usize % 1472, Owner::Main, iter) {
                if let Err(b) = TX.push(b) {
                    check_and_free(b, Owner::Main, Violation::TxBlock);
                }
            }
        }
        while let Some(packet) = RX.pop() {
            check_and_free(packet, Owner::LowIrq, Violation::RxBlock);
        }
        if iter.is_multiple_of(64) {
            let now = sys::now_ns();
            if now >= end {
                break;
            }
            if now >= next_maintain {
                heap.maintain();
                next_maintain = now + 10_000_000;
            }
        }
    }
    #[cfg(feature = "interrupt-points")]
    points::disable();
    irq::disable();
    for block in held.into_iter().flatten() {
        check_and_free(block, Owner::Main, Violation::MainBlock);
    }
    while let Some(b) = TX.pop() {
        check_and_free(b, Owner::Main, Violation::TxBlock);
    }
    while let Some(b) = RX.pop() {
        check_and_free(b, Owner::LowIrq, Violation::RxBlock);
    }
    heap.drain();
    let s = heap.stats();
    if s.objects_in_use != 0 || s.large_in_use != 0 || s.pages.free_pages != s.pages.total_pages {
        violation(Violation::Leak);
    }
    s.nolock_alloc_fail_busy
        + s.nolock_free_deferred
        + s.pages.nolock_alloc_fail_busy
        + s.pages.nolock_free_deferred
}

/// Called by `_start`; returns the exit code.
pub fn kmain(args: sys::Args) -> i32 {
    let Some(options) = parse(args) else {
        sys::write(
            2,
            b"usage: freestanding [--seconds N] [--corrupt] [--normal-in-irq] [--double-free]\n",
        );
        return 2;
    };
    if let Err(e) = kalloc::init(REGION_BYTES).and_then(|()| irq::enable()) {
        let mut line = sys::Line::new();
        let _ = write!(line, "freestanding FAIL: {e}");
        line.print(1);
        return 1;
    }
    let heap = kalloc::heap().expect("initialised");
    #[cfg(feature = "interrupt-points")]
    points::enable();
    let busy = run(heap, &options);

    let (irqs, nested) = (irq::IRQS.load(Relaxed), irq::NESTED.load(Relaxed));
    let (ok, fail) = (
        kalloc::NOLOCK_OK.load(Relaxed),
        kalloc::NOLOCK_FAIL.load(Relaxed),
    );
    let (normal, violations) = (kalloc::NORMAL_OPS.load(Relaxed), VIOLATIONS.load(Relaxed));
    let failure = match FIRST_VIOLATION.load(Relaxed) {
        0 if nested == 0 => Some("no interrupt nested in another"),
        0 if ok == 0 => Some("no nolock allocation succeeded"),
        0 if kalloc::INTERRUPTED_NORMAL_PATH.load(Relaxed) == 0 => {
            Some("no interrupt landed inside the normal path")
        }
        #[cfg(feature = "interrupt-points")]
        0 if points::missing().is_some() => points::missing(),
        // Interrupts landed inside every kind of lock, and the burst needs
        // them: some handler must have found one busy (a nolock path that
        // ignored the interrupted context's lock never does).
        #[cfg(feature = "interrupt-points")]
        0 if busy == 0 => Some("no handler found a lock held by the context it interrupted"),
        0 => None,
        v => Some(REASONS[v as usize]),
    };
    let mut line = sys::Line::new();
    let _ = match failure {
        None => write!(line, "freestanding ok: "),
        Some(reason) => write!(line, "freestanding FAIL: {reason}: "),
    };
    let _ = write!(
        line,
        "irqs {irqs} nested {nested} nolock_ok {ok} nolock_fail {fail} normal_ops {normal} "
    );
    #[cfg(feature = "interrupt-points")]
    {
        let [zone, node, slot] = points::landed_in_locks();
        let _ = write!(line, "in_locks zone {zone} node {node} slot {slot} ");
    }
    let _ = write!(line, "busy {busy} violations {violations}");
    line.print(1);
    i32::from(failure.is_some())
}
