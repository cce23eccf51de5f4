//! Re-entry at every instruction of the object allocator (x86-64 Linux):
//! as `page_singlestep.rs` does for pages, the driver runs with the trap
//! flag set, so `SIGTRAP` follows every instruction, and the handler, at
//! every instruction address it has not seen before, runs one nolock
//! allocation and one nolock free (of the object it allocated at the
//! previous new address) on the same heap, as a signal landing there would.
//!
//! Three phases, each on a fresh heap with its own set of seen addresses:
//!
//! 1. `Heap::alloc` / `Heap::free` (the normal path): sheaf hits, spare
//!    swaps, refills from the barn and the slabs, flushes, large blocks;
//! 2. `Heap::alloc_nolock` / `Heap::free_nolock` and the page allocator's
//!    nolock calls: the nolock path interrupted by a nested nolock caller;
//! 3. the normal and nolock paths with two CPU slot sets, the other set
//!    stocked first (by running on the other CPU when the machine has
//!    one): a handler that finds this CPU's slots held or empty takes the
//!    other-CPU route.
//!
//! Asserted per phase: many distinct instruction addresses interrupted,
//! nolock allocations succeeded there, every object kept its pattern, and
//! afterwards nothing is in use and every page is back. The report lists
//! the allocator's functions by interrupted addresses.
//!
//! The heaps use the try-locked fast path (`Config::rseq(false)`), in a
//! child process with glibc's rseq registration switched off
//! (`GLIBC_TUNABLES=glibc.pthread.rseq=0`): the trap flag cannot step
//! through a restartable sequence (each step aborts it at its first
//! instruction), and every heap's fast path starts one, which ends at once
//! when the heap does not use rseq; with no registered area the kernel
//! never aborts it. `heap_rseq_singlestep.rs` covers the sequences with
//! execution breakpoints. The child runs under a watchdog.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod common;
mod watchdog;

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::{Config, Heap};

/// Steps after which the handler stops stepping (bounds the run time).
const MAX_STEPS: u64 = 3_000_000;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static STEPPING: AtomicBool = AtomicBool::new(false);
static STEPS: AtomicU64 = AtomicU64::new(0);
static DISTINCT: AtomicU64 = AtomicU64::new(0);
static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static NOLOCK_FAIL: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The object the handler allocated at the previous new address.
static CARRY: AtomicUsize = AtomicUsize::new(0);

/// The instruction addresses interrupted so far.
static SEEN: common::SeenSet = common::SeenSet::new();

// ----- objects: handles and patterns ------------------------------------------

/// A handle: the address (below 2^47) and the size (bits 47..).
fn pack(p: NonNull<u8>, size: usize) -> usize {
    p.as_ptr() as usize | size << 47
}

fn unpack(h: usize) -> (*mut u8, usize) {
    ((h & ((1 << 47) - 1)) as *mut u8, h >> 47)
}

fn pattern(h: usize, i: usize) -> u8 {
    ((h >> 4) as u8) ^ (h >> 47) as u8 ^ (i as u8).wrapping_mul(29)
}

/// # Safety
/// The caller owns the object behind `h`.
unsafe fn fill(h: usize) {
    let (p, size) = unpack(h);
    for i in 0..size {
        // SAFETY: inside the caller's object.
        unsafe { p.add(i).write(pattern(h, i)) };
    }
}

/// # Safety
/// As for [`fill`].
unsafe fn intact(h: usize) -> bool {
    let (p, size) = unpack(h);
    // SAFETY: as in `fill`.
    (0..size).all(|i| unsafe { p.add(i).read() } == pattern(h, i))
}

const HANDLER_SIZES: [usize; 4] = [8, 64, 1000, 20_000];

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Checks and nolock-frees a handle (0: none).
fn free_checked(heap: &Heap, h: usize) {
    if h == 0 {
        return;
    }
    // SAFETY: `h` came out of a single owner (CARRY, or the driver).
    if !unsafe { intact(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: a live object of `heap`, owned here.
    unsafe { heap.free_nolock(NonNull::new_unchecked(unpack(h).0)) };
}

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
    let heap = HEAP.load(Ordering::Acquire);
    if heap.is_null() {
        return;
    }
    // SAFETY: set before stepping starts, cleared only after it ended; the
    // heap outlives the phase.
    let heap = unsafe { &*heap };
    let size = HANDLER_SIZES[(n % 4) as usize];
    match heap.alloc_nolock(layout(size)) {
        Some(p) => {
            NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            let h = pack(p, size);
            // SAFETY: just allocated: this handler owns it.
            unsafe { fill(h) };
            free_checked(heap, CARRY.swap(h, Ordering::Relaxed));
        }
        None => {
            NOLOCK_FAIL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn stepped_alloc(heap: &Heap, size: usize, nolock: bool) -> usize {
    common::trap_on();
    let p = if nolock {
        heap.alloc_nolock(layout(size))
    } else {
        heap.alloc(layout(size))
    };
    common::trap_off();
    let h = pack(p.expect("memory to spare"), size);
    // SAFETY: just allocated: owned by the driver.
    unsafe { fill(h) };
    h
}

fn stepped_free(heap: &Heap, h: usize, nolock: bool) {
    // SAFETY: owned by the driver until the free below.
    if !unsafe { intact(h) } {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: a live object of `heap`, not used afterwards.
    let p = unsafe { NonNull::new_unchecked(unpack(h).0) };
    common::trap_on();
    // SAFETY: as above.
    unsafe {
        if nolock {
            heap.free_nolock(p)
        } else {
            heap.free(p)
        }
    };
    common::trap_off();
}

fn stepped_pages(heap: &Heap, order: u32) {
    common::trap_on();
    let p = heap.pages().alloc_pages_nolock(order);
    common::trap_off();
    if let Some(p) = p {
        common::trap_on();
        // SAFETY: allocated just above with `order`.
        unsafe { heap.pages().free_pages_nolock(p, order) };
        common::trap_off();
    }
}

/// The driver's workload: `rounds` rounds of allocations and frees of
/// several sizes, and more of one class than a sheaf holds, which go
/// through main, the spare and the slabs; `nolock` selects the path.
fn workload(heap: &Heap, rounds: usize, nolock: bool) {
    let cap = common::sheaf_capacity(heap, 64);
    for round in 0..rounds {
        let mut held = Vec::new();
        for &size in &[24usize, 64, 512, 4000, 12_000] {
            for _ in 0..3 {
                held.push(stepped_alloc(heap, size, nolock));
            }
        }
        // One class past a sheaf's capacity, so that every round's
        // allocations empty main and its frees fill it: refills from the
        // slabs, then spare swaps.
        let many: Vec<usize> = (0..cap + 8)
            .map(|_| stepped_alloc(heap, 64, nolock))
            .collect();
        for (i, h) in many.into_iter().enumerate() {
            stepped_free(heap, h, nolock ^ (i % 4 == 3));
        }
        if nolock {
            for order in 0..=3 {
                stepped_pages(heap, order);
            }
        }
        for (i, h) in held.into_iter().enumerate().rev() {
            stepped_free(heap, h, nolock ^ ((round + i) % 3 == 0));
        }
    }
}

struct Phase {
    name: &'static str,
    steps: u64,
    distinct: u64,
    ok: u64,
    fail: u64,
    /// Interrupted addresses per function of the allocator.
    functions: BTreeMap<String, usize>,
}

/// Runs `body` stepped on `heap`, then checks and resets the shared state.
fn phase(name: &'static str, heap: &'static Heap, body: impl FnOnce(&'static Heap)) -> Phase {
    SEEN.clear();
    for c in [&STEPS, &DISTINCT, &NOLOCK_OK, &NOLOCK_FAIL] {
        c.store(0, Ordering::Relaxed);
    }
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    STEPPING.store(true, Ordering::SeqCst);
    body(heap);
    STEPPING.store(false, Ordering::SeqCst);
    HEAP.store(std::ptr::null_mut(), Ordering::Release);
    free_checked(heap, CARRY.swap(0, Ordering::Relaxed));
    heap.drain();
    let s = heap.stats();
    assert_eq!(
        VIOLATIONS.load(Ordering::Relaxed),
        0,
        "{name}: damaged objects"
    );
    assert_eq!(
        (s.objects_in_use, s.large_in_use),
        (0, 0),
        "{name}: objects left"
    );
    assert_eq!(
        s.pages.free_pages, s.pages.total_pages,
        "{name}: pages lost"
    );
    assert_eq!(s.pages.buddy_pages, s.pages.total_pages, "{name}");
    assert_eq!(heap.pages().check_invariants(), Ok(()), "{name}");
    // Which of the allocator's functions the interrupted addresses are in
    // (symbolised after the run: the handler must not).
    let mut functions = BTreeMap::new();
    for rip in SEEN.addresses() {
        let mut name = None;
        backtrace::resolve(rip as *mut std::ffi::c_void, |sym| {
            if name.is_none() {
                name = sym.name().map(|n| format!("{n:#}"));
            }
        });
        if let Some(n) = name.filter(|n| n.starts_with("anyalloc::")) {
            *functions.entry(n).or_insert(0) += 1;
        }
    }
    Phase {
        name,
        steps: STEPS.load(Ordering::Relaxed),
        distinct: DISTINCT.load(Ordering::Relaxed),
        ok: NOLOCK_OK.load(Ordering::Relaxed),
        fail: NOLOCK_FAIL.load(Ordering::Relaxed),
        functions,
    }
}

fn new_heap(cpus: usize) -> &'static Heap {
    Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(32 << 20)
                .cpus(cpus)
                .grow(false)
                .maintenance(false)
                .rseq(false),
        )
        .unwrap(),
    ))
}

#[test]
fn nolock_reentry_at_every_instruction_of_the_object_allocator() {
    if watchdog::stepped_in_child(
        "nolock_reentry_at_every_instruction_of_the_object_allocator",
        Duration::from_secs(400),
        "object allocator single-step",
        "heap single-step ok",
    ) {
        return;
    }
    let home = anyalloc_storm::thread::current_cpu();
    anyalloc_storm::thread::pin_to_cpu(home);
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");
    let mut phases = Vec::new();

    phases.push(phase("normal path", new_heap(1), |h| workload(h, 3, false)));
    phases.push(phase("nolock path", new_heap(1), |h| workload(h, 3, true)));

    // Two CPU slot sets: stock the other set first (from the other CPU, if
    // this thread may run there), then step on this CPU.
    let two = new_heap(2);
    let other = (home + 1) % 2;
    let moved = anyalloc_storm::thread::pin_to_cpu(other)
        && anyalloc_storm::thread::current_cpu() % 2 == other;
    if moved {
        let objs: Vec<NonNull<u8>> = (0..40).map(|_| two.alloc(layout(64)).unwrap()).collect();
        for p in objs {
            // SAFETY: allocated just above.
            unsafe { two.free(p) };
        }
        for order in 0..=3 {
            let p = two.pages().alloc_pages(order).unwrap();
            // SAFETY: allocated just above with `order`.
            unsafe { two.pages().free_pages(p, order) };
        }
    }
    anyalloc_storm::thread::pin_to_cpu(home);
    let stocked_other = two.stats().classes.iter().any(|c| c.cached_in_sheaves > 0);
    phases.push(phase("2 CPU slot sets", two, |h| {
        workload(h, 2, false);
        workload(h, 2, true);
    }));

    for p in &phases {
        println!(
            "{}: {} steps, {} distinct instruction addresses interrupted, nolock alloc+free \
             there: {} ok, {} failed; in {} allocator functions",
            p.name,
            p.steps,
            p.distinct,
            p.ok,
            p.fail,
            p.functions.len()
        );
        let mut top: Vec<(&String, &usize)> = p.functions.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (f, n) in top.iter().take(12) {
            println!("    {n:>5}  {f}");
        }
    }
    println!("other CPU's slots stocked before phase 3: {stocked_other} (ran there: {moved})");
    for p in &phases {
        assert!(p.steps < MAX_STEPS, "{}: step budget exhausted", p.name);
        assert!(
            p.distinct > 500,
            "{}: only {} distinct instructions were interrupted",
            p.name,
            p.distinct
        );
        assert!(
            p.ok > p.distinct / 2,
            "{}: nolock re-entry mostly failed: {} of {}",
            p.name,
            p.ok,
            p.distinct
        );
    }
    println!("heap single-step ok");
}
