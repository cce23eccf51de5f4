//! Re-entry through `Global` at every instruction of every restartable
//! sequence: `heap_rseq_singlestep.rs` for the process-wide heap, whose
//! fast paths are the copies of the sequences inlined into `Global`'s and
//! `NoLock`'s `GlobalAlloc` methods (and into std's `__rust_alloc` and
//! `__rust_dealloc`, which call them), not the `Heap` methods' copies that
//! test runs.
//!
//! `Global` is this binary's allocator. The test walks every byte of every
//! sequence in the binary (restart point, section, abort handler's jump),
//! arms an execution breakpoint there, and runs a round of `Global` and
//! `NoLock` calls: 64 B objects (a refill after `drain`, pops, pushes, a
//! flush), 16 KiB blocks (the heap's per-CPU page lists), through
//! `GlobalAlloc` directly and through `std::alloc`. When the breakpoint
//! fires, the handler allocates and frees through `Global` (as a signal
//! handler that uses `Box` would) and `NoLock`, on the same pinned CPU:
//! a 64 B object and a 16 KiB block carried to the next trap, and a 64 B
//! object freed at once. A `Global` call in the handler that waited for the
//! interrupted one would hang: the scenario runs in a child process under a
//! watchdog, with the global heap's maintainer off (so that the child's
//! only allocating thread is the test's).
//!
//! Asserted: instructions inside the sequences were interrupted while
//! `Global` and `NoLock` ran, every such interruption restarted its
//! sequence, the handler's allocations succeeded, no block was handed out
//! twice, every pattern held, and after `drain` the heap holds as many
//! objects and large blocks as before the walk.

#![cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]

mod breakpoint;
mod common;
mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::{FastPath, Global, NoLock};

#[global_allocator]
static GLOBAL: Global = Global;

/// The objects' size.
const SIZE: usize = 64;
/// The large blocks' size: an order-2 block from the heap's per-CPU page
/// lists.
const LARGE: usize = 16 << 10;
/// The tiny objects' size (a class below 16 B, whose key word is its link).
const TINY: usize = 8;

/// The armed breakpoint's perf event (-1: none).
static BP_FD: AtomicI32 = AtomicI32::new(-1);
/// Traps taken while armed: a breakpoint is armed only around a `round`,
/// which makes nothing but `Global` and `NoLock` calls.
static FIRED: AtomicU64 = AtomicU64::new(0);
static AT_ABORT: AtomicU64 = AtomicU64::new(0);
/// The handler's `Global` objects, `NoLock` objects and `Global` 16 KiB
/// blocks that were served (`OK`) and refused (`FAIL`, a null).
static OK: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static FAIL: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The 64 B object and the 16 KiB block the handler allocated through
/// `Global` last time (0: none).
static CARRY: AtomicUsize = AtomicUsize::new(0);
static LARGE_CARRY: AtomicUsize = AtomicUsize::new(0);

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

const HANDLER_TAG: u8 = 0x69;
const MAIN_TAG: u8 = 0x96;

/// The spans of a block of `size` bytes that carry its pattern: its first
/// and last `SIZE` bytes (the whole of a smaller one), so a 16 KiB block is
/// checked at both ends without the handler writing 16 KiB at every trap.
fn spans(size: usize) -> [std::ops::Range<usize>; 2] {
    let n = size.min(SIZE);
    [0..n, size - n..size]
}

/// The pattern byte at offset `i` of a block filled when it was at `key`.
fn pattern(key: usize, i: usize, tag: u8) -> u8 {
    (key as u8) ^ (i as u8).wrapping_mul(29) ^ tag
}

fn fill(p: usize, size: usize, tag: u8) {
    for span in spans(size) {
        for i in span {
            // SAFETY: `p` is a live block of `size` bytes owned by the
            // caller, and `i < size`.
            unsafe { ((p + i) as *mut u8).write(pattern(p, i, tag)) };
        }
    }
}

/// Whether the block of `size` bytes at `p` holds the pattern it was
/// filled with at `key` (itself, or where a `realloc` moved it from).
fn intact_from(p: usize, key: usize, size: usize, tag: u8) -> bool {
    spans(size).into_iter().flatten().all(|i| {
        // SAFETY: as in `fill`.
        unsafe { ((p + i) as *const u8).read() == pattern(key, i, tag) }
    })
}

fn intact(p: usize, size: usize, tag: u8) -> bool {
    intact_from(p, p, size, tag)
}

/// The handler's block `i` (0: `Global` object, 1: `NoLock` object, 2:
/// `Global` 16 KiB block) was served or not.
fn served(i: usize, p: *mut u8) -> Option<usize> {
    if p.is_null() {
        FAIL[i].fetch_add(1, Ordering::Relaxed);
        None
    } else {
        OK[i].fetch_add(1, Ordering::Relaxed);
        Some(p as usize)
    }
}

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _errno = anyalloc_storm::ErrnoGuard::save();
    // Disarm first: the handler's own allocations run the same sequences.
    if !breakpoint::disarm(&BP_FD) {
        return;
    }
    FIRED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: this SA_SIGINFO handler's context; breakpoints are armed in
    // this program's text only.
    if unsafe { breakpoint::at_abort_address(ctx) } {
        AT_ABORT.fetch_add(1, Ordering::Relaxed);
    }
    // Through std, as `Box::new` would: `__rust_alloc`, then `Global`.
    // SAFETY: a non-zero layout.
    if let Some(p) = served(0, unsafe { std::alloc::alloc(layout(SIZE)) }) {
        fill(p, SIZE, HANDLER_TAG);
        free_carry(CARRY.swap(p, Ordering::Relaxed), SIZE);
    }
    // A pop and a push on the same CPU's sheaf through `NoLock`.
    // SAFETY: a non-zero layout.
    if let Some(p) = served(1, unsafe { NoLock.alloc(layout(SIZE)) }) {
        // SAFETY: just allocated with this layout; freed once.
        unsafe { NoLock.dealloc(p as *mut u8, layout(SIZE)) };
    }
    // A block from the heap's per-CPU page lists, through `Global`.
    // SAFETY: a non-zero layout.
    if let Some(p) = served(2, unsafe { GLOBAL.alloc(layout(LARGE)) }) {
        fill(p, LARGE, HANDLER_TAG);
        free_carry(LARGE_CARRY.swap(p, Ordering::Relaxed), LARGE);
    }
}

/// Frees a block of `size` bytes the handler allocated through `Global`
/// (or nothing, for 0), after checking its pattern.
fn free_carry(p: usize, size: usize) {
    if p == 0 {
        return;
    }
    if !intact(p, size, HANDLER_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated by the handler through `Global` with this layout;
    // freed once.
    unsafe { std::alloc::dealloc(p as *mut u8, layout(size)) };
}

/// `Global` and `NoLock` calls that run every sequence of their fast
/// paths: for 64 B objects (both sheaves empty after `drain`) a refill,
/// then `many - 1` pops, and `many` pushes, more than a sheaf holds (so a
/// push finds main full, and the lock sequence runs before the slow free);
/// 16 KiB blocks, popped and
/// pushed on the page lists; 8 B objects (a tiny class, whose routes are
/// copies of their own); then a `realloc` that moves a 64 B object to
/// 200 B and back to 24 B, and an `alloc_zeroed`. Objects alternate
/// between `GlobalAlloc` called directly and `std::alloc`; the `NoLock`
/// objects go through both of its frees (`dealloc`, and `Global`'s, which
/// frees any block of the heap). `live` has room for every block (no
/// allocation of its own).
fn round(live: &mut Vec<(usize, usize)>, many: usize) {
    for nolock in [false, true] {
        let sizes = std::iter::repeat_n(SIZE, many)
            .chain(std::iter::repeat_n(LARGE, 4))
            .chain(std::iter::repeat_n(TINY, 8));
        for (i, size) in sizes.enumerate() {
            let l = layout(size);
            // SAFETY: non-zero layouts.
            let p = unsafe {
                match (nolock, i % 2) {
                    (false, 0) => GLOBAL.alloc(l),
                    (false, _) => std::alloc::alloc(l),
                    (true, _) => NoLock.alloc(l),
                }
            };
            assert!(!p.is_null(), "memory to spare");
            let p = p as usize;
            let carried = [
                CARRY.load(Ordering::Relaxed),
                LARGE_CARRY.load(Ordering::Relaxed),
            ];
            if live.iter().any(|&(q, _)| q == p) || carried.contains(&p) {
                VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            }
            fill(p, size, MAIN_TAG);
            live.push((p, size));
        }
        for (i, (p, size)) in live.drain(..).enumerate() {
            if !intact(p, size, MAIN_TAG) {
                VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            }
            let p = p as *mut u8;
            // SAFETY: allocated above with this layout; freed once.
            unsafe {
                match (nolock, i % 2) {
                    (false, 0) => GLOBAL.dealloc(p, layout(size)),
                    (false, _) => std::alloc::dealloc(p, layout(size)),
                    (true, 0) => NoLock.dealloc(p, layout(size)),
                    (true, _) => GLOBAL.dealloc(p, layout(size)),
                }
            }
        }
        let a: &dyn GlobalAlloc = if nolock { &NoLock } else { &GLOBAL };
        resize_and_zero(a);
    }
}

/// Through `a`: a 64 B object moved by `realloc` to 200 B and back to
/// 24 B (another class each time), its first bytes kept; then an
/// `alloc_zeroed` object, which must read zero.
fn resize_and_zero(a: &dyn GlobalAlloc) {
    // SAFETY: a non-zero layout.
    let p = unsafe { a.alloc(layout(SIZE)) } as usize;
    assert_ne!(p, 0, "memory to spare");
    fill(p, SIZE, MAIN_TAG);
    // SAFETY: `p` is live with this layout; 200 is a valid size.
    let q = unsafe { a.realloc(p as *mut u8, layout(SIZE), 200) } as usize;
    assert_ne!(q, 0, "memory to spare");
    // SAFETY: `q` is live with 200 bytes; 24 is a valid size.
    let r = unsafe { a.realloc(q as *mut u8, layout(200), 24) } as usize;
    assert_ne!(r, 0, "a shrink keeps the block at worst");
    if !intact_from(r, p, 24, MAIN_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: `r` is live with 24 bytes; freed once.
    unsafe { a.dealloc(r as *mut u8, layout(24)) };
    // SAFETY: a non-zero layout.
    let z = unsafe { a.alloc_zeroed(layout(SIZE)) };
    assert!(!z.is_null(), "memory to spare");
    // SAFETY: `z` is a live block of SIZE bytes.
    if unsafe { std::slice::from_raw_parts(z, SIZE) }
        .iter()
        .any(|&b| b != 0)
    {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated above with this layout; freed once.
    unsafe { a.dealloc(z, layout(SIZE)) };
}

/// Its own `main` (`harness = false`): the child's only thread is the one
/// that runs the scenario. Under libtest a second thread (the runner's,
/// waiting for the test's result) made its first allocations of the
/// wait whenever the machine was busy enough to delay it past the walk's
/// first reading of the heap, and the heap then held two objects more at
/// the end (std's thread handle and channel context for that thread).
fn main() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "",
            &[("ANYALLOC_MAINTENANCE", "0")],
            Duration::from_secs(240),
            "Global re-entered at every instruction of its sequences",
        );
        print!("{}", out.stdout);
        assert!(
            out.stdout.contains("global rseq single-step ok") || out.stdout.contains("skipped: "),
            "no result line:\n{}",
            out.stdout
        );
        return;
    }
    scenario();
}

/// The walk, in the child.
fn scenario() {
    let heap = anyalloc::init().expect("the global heap");
    if heap.stats().fast_path != FastPath::Rseq {
        assert!(
            std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
            "the rseq fast path is not in use here; set ANYALLOC_ALLOW_SKIP=1 to skip"
        );
        println!("skipped: the rseq fast path is not in use here");
        return;
    }
    assert!(
        anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu()),
        "could not pin the thread"
    );
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");
    match breakpoint::arm(round as fn(&mut Vec<(usize, usize)>, usize) as usize) {
        Some(fd) => breakpoint::close(fd),
        None => {
            assert!(
                std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
                "perf_event_open refused an execution breakpoint; set ANYALLOC_ALLOW_SKIP=1 to skip"
            );
            println!("skipped: perf_event_open refused an execution breakpoint");
            return;
        }
    }
    let descs = breakpoint::descriptors();
    // More 64 B objects per round than a sheaf holds.
    let many = common::sheaf_capacity(heap, SIZE) + 8;
    let mut live = Vec::with_capacity(many + 16);
    // A first round outside the walk: what the heap holds at rest once
    // every path ran (std's own lazily made state included).
    round(&mut live, many);
    heap.drain();
    let before = heap.stats();

    let mut bytes = 0u64;
    let mut fired_addrs = 0u64;
    let mut fired_descs = 0usize;
    let mut inside = 0u64;
    for d in &descs {
        let section = breakpoint::section(d);
        let mut fired_here = 0;
        for addr in breakpoint::walk(d) {
            bytes += 1;
            heap.drain();
            let fd = breakpoint::arm(addr).expect("perf_event_open");
            let fired_before = FIRED.load(Ordering::Relaxed);
            BP_FD.store(fd, Ordering::Relaxed);
            round(&mut live, many);
            BP_FD.store(-1, Ordering::Relaxed);
            breakpoint::close(fd);
            if FIRED.load(Ordering::Relaxed) > fired_before {
                fired_here += 1;
                fired_addrs += 1;
                inside += section.contains(&addr) as u64;
            }
        }
        fired_descs += (fired_here > 0) as usize;
    }
    free_carry(CARRY.swap(0, Ordering::Relaxed), SIZE);
    free_carry(LARGE_CARRY.swap(0, Ordering::Relaxed), LARGE);
    heap.drain();
    let after = heap.stats();

    let at_abort = AT_ABORT.load(Ordering::Relaxed);
    let ok: Vec<u64> = OK.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let fail: Vec<u64> = FAIL.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    println!(
        "Global rseq breakpoints: {} sequences in the binary, {fired_descs} executed by Global \
         and NoLock; {bytes} bytes armed, {fired_addrs} instruction addresses interrupted \
         ({inside} inside a critical section, {at_abort} seen by the handler at the abort \
         address); handler: Global 64 B {} ok / {} null, NoLock 64 B {} ok / {} null, Global \
         16 KiB {} ok / {} null",
        descs.len(),
        ok[0],
        fail[0],
        ok[1],
        fail[1],
        ok[2],
        fail[2]
    );
    breakpoint::assert_walked(
        VIOLATIONS.load(Ordering::Relaxed),
        fired_descs,
        inside,
        at_abort,
    );
    for (i, what) in ["Global 64 B", "NoLock 64 B", "Global 16 KiB"]
        .into_iter()
        .enumerate()
    {
        assert!(
            ok[i] >= fired_addrs / 2 && ok[i] > 0,
            "the handler's {what} allocations mostly failed: {} ok, {} null",
            ok[i],
            fail[i]
        );
    }
    assert_eq!(
        (after.objects_in_use, after.large_in_use),
        (before.objects_in_use, before.large_in_use),
        "the walk leaked or lost blocks: before {before:?}, after {after:?}"
    );
    println!("global rseq single-step ok");
}
