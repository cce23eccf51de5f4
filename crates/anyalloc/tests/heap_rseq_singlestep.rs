//! Re-entry at every instruction of every restartable sequence: the rseq
//! fast path's counterpart of `page_singlestep.rs`.
//!
//! The trap flag cannot step through a sequence: a signal delivered while
//! the thread is inside one moves it to the sequence's abort address
//! *before* the handler runs, so each step would abort the sequence at its
//! first instruction, forever. Execution breakpoints can: one armed at
//! address `a` (a debug register, through `perf_event_open` with `sigtrap`)
//! raises `SIGTRAP` exactly when the thread is about to execute `a`. So the
//! test walks every byte of every sequence in this binary (found through
//! the `__rseq_cs` descriptors the assembly emits), from the restart point
//! to the end of the section, and the abort handler's jump (out of line):
//! it arms a breakpoint there and runs a round
//! of heap and page operations that execute every sequence (pop hits,
//! pushes, the lock sequence before a refill and before a flush, normal
//! and nolock, objects and page blocks of orders 0 to 3, 8 B objects and
//! 16 KiB blocks, an `alloc_zeroed`), then the same
//! on a second heap whose first zone is used up: the copies of the
//! sequences that serve the zones growth added (their per-CPU lists, the
//! heap's 16 and 64 KiB blocks there, the frees found through the zone
//! map).
//! When the breakpoint fires, the handler disarms it, then allocates and
//! frees on the *same CPU's* sheaf and page list (nolock), as a signal
//! landing there would, and on the grown heap's lists, and the
//! interrupted sequence restarts after it.
//!
//! Asserted: breakpoints fired at many distinct addresses inside every
//! kind of sequence, some of them with the handler seeing the abort address
//! (the sequence was restarted), the handler's allocations succeeded, no
//! object was handed out twice, every pattern held, and after `drain`
//! every object and page is back.

#![cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]

mod breakpoint;
mod common;
mod free_route;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use anyalloc::{Config, FastPath, Heap};

const SIZE: usize = 64;
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// The armed breakpoint's perf event (-1: none).
static BP_FD: AtomicI32 = AtomicI32::new(-1);
static FIRED: AtomicU64 = AtomicU64::new(0);
static AT_ABORT: AtomicU64 = AtomicU64::new(0);
static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static NOLOCK_FAIL: AtomicU64 = AtomicU64::new(0);
/// Every nolock object allocation that succeeded, the driver's and the
/// handler's: the heap's own count must agree exactly, although
/// breakpoints abort counting pops between their counter's add and their
/// commit (the abort handler takes such a count back).
static ALL_NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The object the handler allocated last time (0: none).
static CARRY: AtomicUsize = AtomicUsize::new(0);
/// The page block the handler allocated last time (0: none).
static PAGE_CARRY: AtomicUsize = AtomicUsize::new(0);
static PAGE_OK: AtomicU64 = AtomicU64::new(0);
/// Set while `round` runs its page operations (no object sequence runs
/// then): a breakpoint that fires meanwhile sits in a page sequence.
static IN_PAGE_ROUND: AtomicBool = AtomicBool::new(false);
static FIRED_IN_PAGES: AtomicU64 = AtomicU64::new(0);
static PAGE_FAIL: AtomicU64 = AtomicU64::new(0);
/// The heap whose first zone is used up (`grown_heap`).
static GROWN: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// Set while `round` runs on the grown heap: a breakpoint that fires
/// meanwhile sits in a sequence of a grown zone's route.
static IN_GROWN_ROUND: AtomicBool = AtomicBool::new(false);
static FIRED_IN_GROWN: AtomicU64 = AtomicU64::new(0);
/// The page block and the 16 KiB block the handler allocated last time on
/// the grown heap (0: none).
static GROWN_PAGE_CARRY: AtomicUsize = AtomicUsize::new(0);
static GROWN_LARGE_CARRY: AtomicUsize = AtomicUsize::new(0);
static GROWN_OK: AtomicU64 = AtomicU64::new(0);
/// Every nolock allocation on the grown heap that succeeded (objects and
/// large blocks, the driver's and the handler's): its own count must agree.
static GROWN_NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
static GROWN_FAIL: AtomicU64 = AtomicU64::new(0);

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

const HANDLER_TAG: u8 = 0xa5;
const MAIN_TAG: u8 = 0x3c;

fn fill(p: usize, tag: u8) {
    // SAFETY: `p` is a live object of SIZE bytes owned by the caller.
    let b = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, SIZE) };
    for (i, x) in b.iter_mut().enumerate() {
        *x = (p as u8) ^ (i as u8).wrapping_mul(31) ^ tag;
    }
}

fn check(p: usize, tag: u8) -> bool {
    // SAFETY: as in `fill`.
    let b = unsafe { std::slice::from_raw_parts(p as *const u8, SIZE) };
    b.iter()
        .enumerate()
        .all(|(i, x)| *x == (p as u8) ^ (i as u8).wrapping_mul(31) ^ tag)
}

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let _errno = anyalloc_storm::ErrnoGuard::save();
    // Disarm first: the handler's own allocation runs the same sequences.
    if !breakpoint::disarm(&BP_FD) {
        return;
    }
    FIRED.fetch_add(1, Ordering::Relaxed);
    if IN_PAGE_ROUND.load(Ordering::Relaxed) {
        FIRED_IN_PAGES.fetch_add(1, Ordering::Relaxed);
    }
    if IN_GROWN_ROUND.load(Ordering::Relaxed) {
        FIRED_IN_GROWN.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: this SA_SIGINFO handler's context; breakpoints are armed in
    // this program's text only.
    if unsafe { breakpoint::at_abort_address(ctx) } {
        AT_ABORT.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: set before any breakpoint is armed; the heap outlives the test.
    let heap = unsafe { &*HEAP.load(Ordering::Acquire) };
    match heap.alloc_nolock(layout()) {
        Some(p) => {
            NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            ALL_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            let p = p.as_ptr() as usize;
            fill(p, HANDLER_TAG);
            free_carry(heap, CARRY.swap(p, Ordering::Relaxed));
        }
        None => {
            NOLOCK_FAIL.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Push onto the same sheaf too (an alloc just popped from it).
    if let Some(p) = heap.alloc_nolock(layout()) {
        ALL_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
        // SAFETY: just allocated on `heap`; freed once.
        unsafe { heap.free_nolock(p) };
    }
    // And the same CPU's page lists: a block carried to the next trap (the
    // interrupted code may be inside a page sequence of that order).
    let pages = heap.pages();
    match pages.alloc_pages_nolock(HANDLER_PAGE_ORDER) {
        Some(p) => {
            PAGE_OK.fetch_add(1, Ordering::Relaxed);
            let p = p.as_ptr() as usize;
            fill(p, HANDLER_TAG);
            free_page_carry(heap, PAGE_CARRY.swap(p, Ordering::Relaxed));
        }
        None => {
            PAGE_FAIL.fetch_add(1, Ordering::Relaxed);
        }
    }
    // And the grown heap's: an order-0 block and a 16 KiB block, both from
    // this CPU's lists of its grown zones.
    // SAFETY: set before any breakpoint is armed; the heap outlives the test.
    let grown = unsafe { &*GROWN.load(Ordering::Acquire) };
    let page = grown.pages().alloc_pages_nolock(HANDLER_PAGE_ORDER);
    let large = grown.alloc_nolock(large_layout());
    if large.is_some() {
        GROWN_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
    }
    match (page, large) {
        (Some(p), Some(l)) => {
            GROWN_OK.fetch_add(1, Ordering::Relaxed);
            let (p, l) = (p.as_ptr() as usize, l.as_ptr() as usize);
            fill(p, HANDLER_TAG);
            fill(l, HANDLER_TAG);
            free_grown_carry(grown, GROWN_PAGE_CARRY.swap(p, Ordering::Relaxed), false);
            free_grown_carry(grown, GROWN_LARGE_CARRY.swap(l, Ordering::Relaxed), true);
        }
        (page, large) => {
            GROWN_FAIL.fetch_add(1, Ordering::Relaxed);
            // SAFETY: each was just allocated on `grown` (with its order or
            // layout) and is freed once.
            unsafe {
                if let Some(p) = page {
                    grown.pages().free_pages_nolock(p, HANDLER_PAGE_ORDER);
                }
                if let Some(l) = large {
                    grown.free_nolock(l);
                }
            }
        }
    }
}

/// The heap's 16 KiB blocks (a per-CPU page list's order).
fn large_layout() -> Layout {
    Layout::from_size_align(16 << 10, 8).unwrap()
}

/// Frees a block the handler allocated on the grown heap: a 16 KiB block
/// (`large`) or an order-0 page block.
fn free_grown_carry(grown: &Heap, p: usize, large: bool) {
    if p == 0 {
        return;
    }
    if !check(p, HANDLER_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    let p = NonNull::new(p as *mut u8).unwrap();
    // SAFETY: allocated by the handler on `grown` as `large` says; freed
    // once.
    unsafe {
        if large {
            grown.free_nolock_sized(p, large_layout());
        } else {
            grown.pages().free_pages_nolock(p, HANDLER_PAGE_ORDER);
        }
    }
}

/// The order of the handler's page blocks.
const HANDLER_PAGE_ORDER: u32 = 0;

fn free_page_carry(heap: &Heap, p: usize) {
    if p == 0 {
        return;
    }
    if !check(p, HANDLER_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated by the handler on `heap.pages()` with this order.
    unsafe {
        heap.pages()
            .free_pages_nolock(NonNull::new_unchecked(p as *mut u8), HANDLER_PAGE_ORDER)
    };
}

fn free_carry(heap: &Heap, p: usize) {
    if p == 0 {
        return;
    }
    if !check(p, HANDLER_TAG) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated by the handler on `heap`; not used afterwards.
    unsafe { heap.free_nolock(NonNull::new_unchecked(p as *mut u8)) };
}

/// Heap operations that run every sequence: hits and pushes on both paths,
/// the lock sequence before a refill (both sheaves empty after `drain`) and
/// after a push that finds main full (`many`, more objects than a sheaf
/// holds, are allocated, then freed); then page blocks of orders 0 to 3 on
/// both paths (list pops and pushes, the lock sequence before a refill: the
/// lists are empty after `drain`).
fn round(heap: &Heap, live: &mut Vec<usize>, many: usize) {
    IN_PAGE_ROUND.store(true, Ordering::Relaxed);
    page_round(heap);
    IN_PAGE_ROUND.store(false, Ordering::Relaxed);
    // SAFETY: set before the first round; the heap outlives the test.
    let grown = unsafe { &*GROWN.load(Ordering::Acquire) };
    IN_GROWN_ROUND.store(true, Ordering::Relaxed);
    page_round(grown);
    grown_round(grown);
    IN_GROWN_ROUND.store(false, Ordering::Relaxed);
    other_routes(heap);
    let mut alloc = |nolock: bool| {
        let p = if nolock {
            heap.alloc_nolock(layout()).inspect(|_| {
                ALL_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            })
        } else {
            heap.alloc(layout())
        }
        .expect("memory to spare")
        .as_ptr() as usize;
        if live.contains(&p) || p == CARRY.load(Ordering::Relaxed) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        fill(p, MAIN_TAG);
        live.push(p);
    };
    alloc(false); // refill: the sheaves were drained
    for i in 0..many - 1 {
        alloc(i % 2 == 1);
    }
    for (i, p) in live.drain(..).enumerate() {
        if !check(p, MAIN_TAG) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let p = NonNull::new(p as *mut u8).unwrap();
        // SAFETY: allocated on `heap` above; freed once (more frees than
        // a sheaf holds: a push finds main full).
        unsafe {
            if i % 2 == 0 {
                heap.free(p)
            } else {
                heap.free_nolock(p)
            }
        }
    }
}

/// The routes with copies of the sequences of their own, beside the 64 B
/// objects' and the page blocks': 8 B objects (a tiny class, whose key
/// word is its link), 16 KiB blocks in the first zone (the heap's large
/// blocks on the page lists), each allocated by both paths and freed by
/// every free, and an `alloc_zeroed` object. Each block's first word holds
/// its address XOR a tag until its free.
fn other_routes(heap: &Heap) {
    const TAG: usize = 0x0b5e_55ed_0b5e_55ed;
    let mut held = Vec::with_capacity(8);
    for i in 0..8 {
        let size = if i < 4 { 8 } else { 16 << 10 };
        let layout = Layout::from_size_align(size, 8).unwrap();
        let p = if i % 2 == 1 {
            heap.alloc_nolock(layout).inspect(|_| {
                ALL_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            })
        } else {
            heap.alloc(layout)
        }
        .expect("memory to spare");
        if held.iter().any(|&(q, _)| q == p) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: a live block of at least 8 bytes, 8-aligned, ours.
        unsafe { p.cast::<usize>().write(p.as_ptr() as usize ^ TAG) };
        held.push((p, layout));
    }
    for (i, (p, layout)) in held.into_iter().enumerate() {
        // SAFETY: as above, still live.
        if unsafe { p.cast::<usize>().read() } != p.as_ptr() as usize ^ TAG {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: allocated above with `layout`; freed once.
        unsafe { free_route::free_by_route(heap, p, layout, i) };
    }
    let z = heap.alloc_zeroed(layout()).expect("memory to spare");
    // SAFETY: a live block of SIZE bytes.
    if unsafe { std::slice::from_raw_parts(z.as_ptr(), SIZE) }
        .iter()
        .any(|&b| b != 0)
    {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: allocated above with `layout()`; freed once.
    unsafe { heap.free_sized(z, layout()) };
}

/// On the grown heap: 64 B objects and 16 and 64 KiB blocks, allocated
/// by both paths and freed by every free (the grown zones' copies of the
/// heap's routes).
fn grown_round(grown: &Heap) {
    let sizes = [SIZE, 16 << 10, 64 << 10];
    let mut held = Vec::new();
    for i in 0..12 {
        let layout = Layout::from_size_align(sizes[i % 3], 8).unwrap();
        let p = if i % 4 >= 2 {
            grown.alloc_nolock(layout).inspect(|_| {
                GROWN_NOLOCK_OK.fetch_add(1, Ordering::Relaxed);
            })
        } else {
            grown.alloc(layout)
        }
        .expect("memory to spare")
        .as_ptr() as usize;
        if held.iter().any(|&(q, _)| q == p) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        fill(p, MAIN_TAG);
        held.push((p, layout));
    }
    for (i, (p, layout)) in held.into_iter().enumerate() {
        if !check(p, MAIN_TAG) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let p = NonNull::new(p as *mut u8).unwrap();
        // SAFETY: allocated above with `layout`; freed once.
        unsafe { free_route::free_by_route(grown, p, layout, i / 3) };
    }
}

/// A heap (no maintainer) whose first zone (1 MiB) is used up by pages held
/// through its page allocator, so that it grew: its blocks come from grown
/// zones. Returns it and the held pages (order 0).
fn grown_heap() -> (&'static Heap, Vec<NonNull<u8>>) {
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(1 << 20).maintenance(false)).unwrap(),
    ));
    let mut held = Vec::new();
    while h.stats().pages.zones < 2 {
        held.push(h.pages().alloc_pages(0).expect("the heap grows"));
    }
    (h, held)
}

fn page_round(heap: &Heap) {
    let pages = heap.pages();
    let mut held = Vec::new();
    for i in 0..24u32 {
        let order = i % 4;
        let p = if i % 3 == 1 {
            pages.alloc_pages_nolock(order)
        } else {
            pages.alloc_pages(order)
        }
        .expect("pages to spare")
        .as_ptr() as usize;
        if held.iter().any(|&(q, _)| q == p) || p == PAGE_CARRY.load(Ordering::Relaxed) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        fill(p, MAIN_TAG);
        held.push((p, order));
    }
    for (i, (p, order)) in held.into_iter().enumerate() {
        if !check(p, MAIN_TAG) {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let p = NonNull::new(p as *mut u8).unwrap();
        // SAFETY: allocated above with this order; freed once.
        unsafe {
            if i % 2 == 0 {
                pages.free_pages(p, order)
            } else {
                pages.free_pages_nolock(p, order)
            }
        }
    }
}

#[test]
fn every_instruction_of_every_sequence_survives_reentry() {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap(),
    ));
    let skip = |why: &str| {
        assert!(
            std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
            "{why}; set ANYALLOC_ALLOW_SKIP=1 to skip"
        );
        eprintln!("skipped: {why}");
    };
    if heap.stats().fast_path != FastPath::Rseq {
        return skip("the rseq fast path is not in use here");
    }
    // Pinned after the heap exists (its slot count follows the affinity
    // mask): handler and interrupted code then share one CPU's sheaves.
    assert!(
        anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu()),
        "could not pin the thread"
    );
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    let (grown, grown_held) = grown_heap();
    GROWN.store(grown as *const Heap as *mut Heap, Ordering::Release);
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");
    let probe = breakpoint::arm(round as fn(&Heap, &mut Vec<usize>, usize) as usize);
    match probe {
        Some(fd) => breakpoint::close(fd),
        None => return skip("perf_event_open refused an execution breakpoint"),
    }

    let descs = breakpoint::descriptors();
    assert!(
        descs.len() >= 3,
        "expected the three sequences, found {} descriptors",
        descs.len()
    );
    // More 64 B objects per round than a sheaf holds.
    let many = common::sheaf_capacity(heap, SIZE) + 8;
    let mut live = Vec::new();
    let mut bytes = 0u64;
    let mut fired_addrs = 0u64;
    let mut fired_descs = 0usize;
    let mut inside = 0u64;
    let mut page_inside = 0u64;
    let mut grown_inside = 0u64;
    for d in &descs {
        let section = breakpoint::section(d);
        let mut fired_here = 0;
        for addr in breakpoint::walk(d) {
            bytes += 1;
            heap.drain();
            grown.drain();
            let fd = breakpoint::arm(addr).expect("perf_event_open");
            let before = FIRED.load(Ordering::Relaxed);
            let before_pages = FIRED_IN_PAGES.load(Ordering::Relaxed);
            let before_grown = FIRED_IN_GROWN.load(Ordering::Relaxed);
            BP_FD.store(fd, Ordering::Relaxed);
            round(heap, &mut live, many);
            BP_FD.store(-1, Ordering::Relaxed);
            breakpoint::close(fd);
            if FIRED.load(Ordering::Relaxed) > before {
                fired_here += 1;
                fired_addrs += 1;
                let in_section = section.contains(&addr);
                inside += in_section as u64;
                if FIRED_IN_PAGES.load(Ordering::Relaxed) > before_pages {
                    page_inside += in_section as u64;
                }
                if FIRED_IN_GROWN.load(Ordering::Relaxed) > before_grown {
                    grown_inside += in_section as u64;
                }
            }
        }
        fired_descs += (fired_here > 0) as usize;
    }

    HEAP.store(std::ptr::null_mut(), Ordering::Release);
    free_carry(heap, CARRY.swap(0, Ordering::Relaxed));
    free_page_carry(heap, PAGE_CARRY.swap(0, Ordering::Relaxed));
    heap.drain();
    GROWN.store(std::ptr::null_mut(), Ordering::Release);
    free_grown_carry(grown, GROWN_PAGE_CARRY.swap(0, Ordering::Relaxed), false);
    free_grown_carry(grown, GROWN_LARGE_CARRY.swap(0, Ordering::Relaxed), true);
    for p in grown_held {
        // SAFETY: allocated through the grown heap's page allocator with
        // order 0, freed once.
        unsafe { grown.pages().free_pages(p, 0) };
    }
    grown.drain();
    let gs = grown.stats();
    let s = heap.stats();
    let p = heap.pages().stats();
    let grown_ok = GROWN_OK.load(Ordering::Relaxed);
    let grown_fail = GROWN_FAIL.load(Ordering::Relaxed);
    let at_abort = AT_ABORT.load(Ordering::Relaxed);
    let ok = NOLOCK_OK.load(Ordering::Relaxed);
    let fail = NOLOCK_FAIL.load(Ordering::Relaxed);
    let page_ok = PAGE_OK.load(Ordering::Relaxed);
    let page_fail = PAGE_FAIL.load(Ordering::Relaxed);
    println!(
        "rseq breakpoints: {} sequences in the binary, {fired_descs} executed; {bytes} bytes \
         armed, {fired_addrs} instruction addresses interrupted ({inside} inside a critical \
         section, {page_inside} of them in page sequences, {at_abort} seen by the handler at \
         the abort address); handler nolock \
         alloc+free: {ok} ok, {fail} failed; handler page blocks: {page_ok} ok, \
         {page_fail} failed; grown heap: {grown_inside} instructions inside its \
         sequences interrupted, handler blocks {grown_ok} ok, {grown_fail} failed",
        descs.len()
    );
    breakpoint::assert_walked(
        VIOLATIONS.load(Ordering::Relaxed),
        fired_descs,
        inside,
        at_abort,
    );
    assert!(
        page_inside >= 10,
        "only {page_inside} instructions inside page sequences were interrupted"
    );
    assert!(
        page_ok >= fired_addrs / 2 && page_fail == 0,
        "the handler's page blocks failed: {page_ok} ok, {page_fail} failed"
    );
    assert!(
        ok >= fired_addrs / 2 && ok > 0,
        "nolock re-entry mostly failed: {ok}"
    );
    assert!(
        grown_inside >= 10,
        "only {grown_inside} instructions inside the grown zones' sequences were interrupted"
    );
    assert!(
        grown_ok >= fired_addrs / 2 && grown_fail == 0,
        "the handler's blocks on the grown heap failed: {grown_ok} ok, {grown_fail} failed"
    );
    assert_eq!(
        (gs.objects_in_use, gs.large_in_use),
        (0, 0),
        "the grown heap leaked: {gs:?}"
    );
    assert_eq!(
        gs.pages.free_pages, gs.pages.total_pages,
        "the grown heap leaked pages"
    );
    assert_eq!(
        gs.nolock_alloc_ok,
        GROWN_NOLOCK_OK.load(Ordering::Relaxed),
        "the grown heap's count of nolock allocations is not exact"
    );
    assert_eq!(s.objects_in_use, 0, "objects leaked: {s:?}");
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(
        s.nolock_alloc_ok,
        ALL_NOLOCK_OK.load(Ordering::Relaxed),
        "the heap's count of nolock allocations is not exact"
    );
}
