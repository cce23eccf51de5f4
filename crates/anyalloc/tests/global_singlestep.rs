//! Re-entry at every instruction where `Global` and `NoLock` meet on one
//! thread (a handler that uses `Global` after interrupting
//! a `NoLock` call, and the other way round), by single-stepping with the
//! x86 trap flag.
//!
//! `Global` is this binary's allocator. Two phases on one pinned thread:
//!
//! 1. `NoLock` allocations and frees (objects, and page blocks that refill
//!    the per-CPU lists under the zone lock) run stepped; at every new
//!    instruction address the handler allocates through `Global`
//!    (`std::alloc::alloc`, which may return null but never waits) and
//!    frees what it allocated at the previous address.
//! 2. `Global` allocations and frees run stepped; the handler uses `NoLock`.
//!
//! The trap flag cannot step through a restartable sequence (every step
//! would abort it), so the scenario runs in a child process with glibc's
//! rseq switched off (`GLIBC_TUNABLES=glibc.pthread.rseq=0`): the global
//! heap then uses its try-locked fast path, and every instruction of it can
//! be interrupted. The child runs under a watchdog: a thread that waited
//! for itself would hang, and fail the test.
//!
//! Asserted per phase: many distinct instruction addresses interrupted, the
//! handler's allocations succeeded there, every block kept its pattern.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod common;
mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::{FastPath, Global, NoLock};

#[global_allocator]
static GLOBAL: Global = Global;

/// The instruction addresses interrupted so far.
static SEEN: common::SeenSet = common::SeenSet::new();
static STEPPING: AtomicBool = AtomicBool::new(false);
/// Which allocator the handler uses: false = Global, true = NoLock.
static HANDLER_NOLOCK: AtomicBool = AtomicBool::new(false);
static DISTINCT: AtomicU64 = AtomicU64::new(0);
static OK: AtomicU64 = AtomicU64::new(0);
static FAIL: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The handler's block from the previous address and its size (0: none).
static CARRY: AtomicUsize = AtomicUsize::new(0);
static CARRY_SIZE: AtomicUsize = AtomicUsize::new(0);

const SIZES: [usize; 4] = [24, 200, 3000, 20_000];

fn fill(p: *mut u8, size: usize, tag: u8) {
    // SAFETY: `p` is a live block of `size` bytes owned by the caller.
    let b = unsafe { std::slice::from_raw_parts_mut(p, size) };
    for (i, x) in b.iter_mut().enumerate() {
        *x = (p as usize as u8) ^ (i as u8).wrapping_mul(13) ^ tag;
    }
}

fn intact(p: *mut u8, size: usize, tag: u8) -> bool {
    // SAFETY: as in `fill`.
    let b = unsafe { std::slice::from_raw_parts(p, size) };
    b.iter()
        .enumerate()
        .all(|(i, x)| *x == (p as usize as u8) ^ (i as u8).wrapping_mul(13) ^ tag)
}

/// The handler's allocator: Global or NoLock, both through `GlobalAlloc`.
fn handler_alloc() -> &'static dyn GlobalAlloc {
    if HANDLER_NOLOCK.load(Ordering::Relaxed) {
        &NoLock
    } else {
        &GLOBAL
    }
}

const HANDLER_TAG: u8 = 0x5a;
const MAIN_TAG: u8 = 0xc3;

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _errno = anyalloc_storm::ErrnoGuard::save();
    // SAFETY: `ctx` is this SA_SIGINFO handler's context argument.
    let Some(rip) = (unsafe { common::next_step(ctx, STEPPING.load(Ordering::Relaxed)) }) else {
        return;
    };
    if !SEEN.insert(rip) {
        return;
    }
    let n = DISTINCT.fetch_add(1, Ordering::Relaxed) as usize;
    let size = SIZES[n % SIZES.len()] / 4 + 8;
    let layout = Layout::from_size_align(size, 8).unwrap();
    let a = handler_alloc();
    // SAFETY: a valid non-zero layout; the block is freed below or later
    // with the same allocator family (both are the one global heap).
    let p = unsafe { a.alloc(layout) };
    if p.is_null() {
        FAIL.fetch_add(1, Ordering::Relaxed);
        return;
    }
    OK.fetch_add(1, Ordering::Relaxed);
    fill(p, size, HANDLER_TAG);
    let old = CARRY.swap(p as usize, Ordering::Relaxed);
    let old_size = CARRY_SIZE.swap(size, Ordering::Relaxed);
    free_carry(a, old, old_size);
}

fn free_carry(a: &dyn GlobalAlloc, p: usize, size: usize) {
    if p == 0 {
        return;
    }
    if !intact(p as *mut u8, size, HANDLER_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated by the handler from the global heap with this size.
    unsafe { a.dealloc(p as *mut u8, Layout::from_size_align(size, 8).unwrap()) };
}

/// One phase: `rounds` rounds of allocations of every size through `main`,
/// kept for a while and freed, each call stepped.
fn phase(main: &dyn GlobalAlloc, rounds: usize) -> (u64, u64, u64) {
    let before = (
        DISTINCT.load(Ordering::Relaxed),
        OK.load(Ordering::Relaxed),
        FAIL.load(Ordering::Relaxed),
    );
    let mut held: Vec<(usize, usize)> = Vec::with_capacity(256);
    for round in 0..rounds {
        for (k, &size) in SIZES.iter().cycle().take(40).enumerate() {
            let layout = Layout::from_size_align(size, 8).unwrap();
            STEPPING.store(true, Ordering::SeqCst);
            common::trap_on();
            // SAFETY: a valid non-zero layout.
            let p = unsafe { main.alloc(layout) };
            common::trap_off();
            STEPPING.store(false, Ordering::SeqCst);
            assert!(!p.is_null(), "memory to spare");
            fill(p, size, MAIN_TAG);
            held.push((p as usize, size));
            if (k + round) % 3 == 0 {
                let (q, qs) = held.swap_remove(held.len() / 2);
                free_stepped(main, q, qs);
            }
        }
        while let Some((q, qs)) = held.pop() {
            free_stepped(main, q, qs);
        }
    }
    (
        DISTINCT.load(Ordering::Relaxed) - before.0,
        OK.load(Ordering::Relaxed) - before.1,
        FAIL.load(Ordering::Relaxed) - before.2,
    )
}

fn free_stepped(main: &dyn GlobalAlloc, p: usize, size: usize) {
    if !intact(p as *mut u8, size, MAIN_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let layout = Layout::from_size_align(size, 8).unwrap();
    STEPPING.store(true, Ordering::SeqCst);
    common::trap_on();
    // SAFETY: allocated by `main` with this layout; not used afterwards.
    unsafe { main.dealloc(p as *mut u8, layout) };
    common::trap_off();
    STEPPING.store(false, Ordering::SeqCst);
}

#[test]
fn global_and_nolock_reenter_each_other_at_every_instruction() {
    if watchdog::stepped_in_child(
        "global_and_nolock_reenter_each_other_at_every_instruction",
        Duration::from_secs(240),
        "Global/NoLock single-step",
        "global single-step ok",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("the global heap");
    assert_eq!(
        heap.stats().fast_path,
        FastPath::SlotLock,
        "the child runs with glibc's rseq off: the try-locked fast path"
    );
    assert!(
        anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu()),
        "could not pin the thread"
    );
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");

    HANDLER_NOLOCK.store(false, Ordering::SeqCst);
    let (d1, ok1, fail1) = phase(&NoLock, 2);
    free_carry(
        &GLOBAL,
        CARRY.swap(0, Ordering::Relaxed),
        CARRY_SIZE.swap(0, Ordering::Relaxed),
    );
    HANDLER_NOLOCK.store(true, Ordering::SeqCst);
    let (d2, ok2, fail2) = phase(&GLOBAL, 2);
    free_carry(
        &NoLock,
        CARRY.swap(0, Ordering::Relaxed),
        CARRY_SIZE.swap(0, Ordering::Relaxed),
    );

    println!(
        "NoLock stepped, handler on Global: {d1} distinct addresses, {ok1} ok, {fail1} null; \
         Global stepped, handler on NoLock: {d2} distinct addresses, {ok2} ok, {fail2} null"
    );
    assert_eq!(VIOLATIONS.load(Ordering::Relaxed), 0, "a pattern broke");
    assert!(
        d1 > 300 && d2 > 300,
        "too few instructions interrupted: {d1}, {d2}"
    );
    assert!(
        ok1 > d1 / 2 && ok2 > d2 / 2,
        "the handler's allocations mostly failed"
    );
    println!("global single-step ok");
}
