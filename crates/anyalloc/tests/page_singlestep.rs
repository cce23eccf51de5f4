//! Re-entry at every instruction: the normal path runs with the x86 trap
//! flag set, so the CPU raises `SIGTRAP` after each instruction; the
//! handler, at every instruction address it has not seen before, runs one
//! nolock allocation and one nolock free (of the block it allocated at the
//! previous new address) on the same allocator, as a signal landing there
//! would. The loop exercises the per-CPU hit, the refill of an
//! empty slot, the drain of a slot over `high`, direct zone allocations
//! and frees above order 3, and nolock allocations and frees of orders
//! 4..=10 (the zone try-lock path; a handler landing there, inside the
//! zone section, allocates a large block too and must get it from the
//! nolock stock). Linux clears the trap flag on entry to the handler, so
//! the handler itself is not stepped.
//!
//! Asserted: a meaningful number of distinct instruction addresses was
//! interrupted, nolock allocations succeeded there, every block kept its
//! pattern, and afterwards every page is free and every invariant holds.
//!
//! The allocator uses the try-locked fast path (`Config::rseq(false)`), in
//! a child process with glibc's rseq registration switched off
//! (`GLIBC_TUNABLES=glibc.pthread.rseq=0`): the trap flag cannot step
//! through a restartable sequence (each step aborts it at its first
//! instruction), and every page fast path starts one, which ends at once
//! when the allocator does not use rseq; with no registered area the
//! kernel never aborts it. `heap_rseq_singlestep.rs` covers the sequences
//! with execution breakpoints. The child runs under a watchdog.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod common;
mod watchdog;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::{Config, PageAllocator};
use common::{check, fill, pack, unpack};

/// Steps after which the handler stops stepping (bounds the run time). The
/// whole test takes about 330,000 steps in a release build and 3,200,000 in
/// a debug build (unoptimised code runs many more instructions).
const MAX_STEPS: u64 = if cfg!(debug_assertions) {
    10_000_000
} else {
    2_000_000
};

static PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
static STEPPING: AtomicBool = AtomicBool::new(false);
static STEPS: AtomicU64 = AtomicU64::new(0);
static DISTINCT: AtomicU64 = AtomicU64::new(0);
static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static NOLOCK_FAIL: AtomicU64 = AtomicU64::new(0);
/// Of `NOLOCK_OK`, blocks of orders 4..=10.
static LARGE_OK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The block the handler allocated at the previous new address.
static CARRY: AtomicUsize = AtomicUsize::new(0);

/// The instruction addresses interrupted so far.
static SEEN: common::SeenSet = common::SeenSet::new();

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _errno = anyalloc_storm::ErrnoGuard::save();
    let steps = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    let stepping = STEPPING.load(Ordering::Relaxed) && steps < MAX_STEPS;
    // SAFETY: `ctx` is this SA_SIGINFO handler's context argument.
    let Some(rip) = (unsafe { common::next_step(ctx, stepping) }) else {
        return;
    };
    if !SEEN.insert(rip) {
        return;
    }
    let n = DISTINCT.fetch_add(1, Ordering::Relaxed);
    let pa = PA.load(Ordering::Acquire);
    if pa.is_null() {
        return;
    }
    // SAFETY: set before stepping starts, cleared only after it ended; the
    // allocator outlives the test body.
    let pa = unsafe { &*pa };
    // Allocate a block and free the one kept from the previous address:
    // every interruption changes the lists under the interrupted code (an
    // alloc + free of the same block could leave them as they were).
    // Mostly orders 0..=3; every eighth time one of 4..=10.
    let order = if n % 8 == 7 {
        4 + (n / 8 % 7) as u32
    } else {
        (n % 4) as u32
    };
    match pa.alloc_pages_nolock(order) {
        Some(p) => {
            NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            if order > 3 {
                LARGE_OK.fetch_add(1, Ordering::Relaxed);
            }
            // Kind 1: a handler's block (the test's own are kind 0).
            let h = pack(p.as_ptr() as usize, order, 1);
            // SAFETY: just allocated: this handler owns the block.
            unsafe { fill(h) };
            free_checked(pa, CARRY.swap(h, Ordering::Relaxed));
        }
        None => {
            NOLOCK_FAIL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Checks and nolock-frees a kept block (0: none).
fn free_checked(pa: &PageAllocator, h: usize) {
    if h == 0 {
        return;
    }
    // SAFETY: `h` came out of `CARRY` with a swap: owned here.
    if !unsafe { check(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let (ptr, order, _) = unpack(h);
    // SAFETY: allocated on `pa` with `order` by the handler; not used after.
    unsafe { pa.free_pages_nolock(NonNull::new_unchecked(ptr as *mut u8), order) };
}

fn stepped_alloc(pa: &PageAllocator, order: u32, nolock: bool) -> usize {
    common::trap_on();
    let p = if nolock {
        pa.alloc_pages_nolock(order)
    } else {
        pa.alloc_pages(order)
    };
    common::trap_off();
    let p = p.expect("memory to spare");
    let h = pack(p.as_ptr() as usize, order, 0);
    // SAFETY: just allocated: owned by the test.
    unsafe { fill(h) };
    h
}

fn stepped_free(pa: &PageAllocator, h: usize, nolock: bool) {
    // SAFETY: owned by the test until the free below.
    if !unsafe { check(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let (ptr, order, _) = unpack(h);
    // SAFETY: allocated on `pa` with `order`; not used afterwards.
    let p = unsafe { NonNull::new_unchecked(ptr as *mut u8) };
    common::trap_on();
    // SAFETY: as above.
    unsafe {
        if nolock {
            pa.free_pages_nolock(p, order)
        } else {
            pa.free_pages(p, order)
        }
    };
    common::trap_off();
}

#[test]
fn nolock_reentry_at_every_instruction_of_the_normal_path() {
    if watchdog::stepped_in_child(
        "nolock_reentry_at_every_instruction_of_the_normal_path",
        Duration::from_secs(400),
        "page allocator single-step",
        "page single-step ok",
    ) {
        return;
    }
    // One slot set and a pinned thread: the paths below are taken in order.
    anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu());
    let pa: &'static PageAllocator = Box::leak(Box::new(
        PageAllocator::new(
            Config::default()
                .memory(32 << 20)
                .cpus(1)
                .grow(false)
                // The trap flag cannot step through a restartable sequence
                // (heap_rseq_singlestep.rs covers those): this test proves
                // the try-locked slots.
                .rseq(false),
        )
        .unwrap(),
    ));
    PA.store(
        pa as *const PageAllocator as *mut PageAllocator,
        Ordering::Release,
    );
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");
    let total = pa.stats().total_pages;
    let mut held = Vec::new();

    STEPPING.store(true, Ordering::SeqCst);
    for round in 0..3 {
        // Orders 0..=3: the first of each refills the empty slot (splitting
        // buddies), the next ones hit the per-CPU list.
        for order in 0..=3 {
            for _ in 0..3 {
                held.push(stepped_alloc(pa, order, false));
            }
        }
        // Nolock, orders 4..=10: the zone try-lock path.
        for order in 4..=10 {
            let h = stepped_alloc(pa, order, true);
            stepped_free(pa, h, true);
        }
        // Above order 3: the zone directly (ZoneAlloc), then ZoneFree.
        for order in 4..=7 {
            let h = stepped_alloc(pa, order, false);
            if round == 0 {
                stepped_free(pa, h, false);
            } else {
                held.push(h);
            }
        }
        // Free more order-0 pages than `high` at once: the slot drains a
        // batch to the buddy lists (merging).
        let burst: Vec<usize> = (0..130).map(|_| stepped_alloc(pa, 0, false)).collect();
        for h in burst {
            stepped_free(pa, h, false);
        }
        for h in held.drain(..).rev() {
            stepped_free(pa, h, false);
        }
    }
    STEPPING.store(false, Ordering::SeqCst);
    PA.store(std::ptr::null_mut(), Ordering::Release);
    free_checked(pa, CARRY.swap(0, Ordering::Relaxed));

    let steps = STEPS.load(Ordering::Relaxed);
    let distinct = DISTINCT.load(Ordering::Relaxed);
    let ok = NOLOCK_OK.load(Ordering::Relaxed);
    let fail = NOLOCK_FAIL.load(Ordering::Relaxed);
    println!(
        "single-step: {steps} steps, {distinct} distinct instruction addresses interrupted, \
         nolock alloc+free there: {ok} ok, {fail} failed (busy/empty)"
    );
    pa.drain();
    let s = pa.stats();
    println!("final stats: {s:?}");
    assert!(
        steps < MAX_STEPS,
        "step budget exhausted: coverage incomplete"
    );
    assert!(
        distinct > 200,
        "only {distinct} distinct instructions were interrupted"
    );
    assert!(
        ok > distinct / 2,
        "nolock re-entry mostly failed: {ok} of {distinct}"
    );
    assert!(
        LARGE_OK.load(Ordering::Relaxed) > distinct / 16,
        "the handlers' large nolock allocations mostly failed"
    );
    assert_eq!(VIOLATIONS.load(Ordering::Relaxed), 0);
    assert_eq!(s.free_pages, total);
    assert_eq!(s.buddy_pages, total);
    assert_eq!(pa.check_invariants(), Ok(()));
    println!("page single-step ok");
}
