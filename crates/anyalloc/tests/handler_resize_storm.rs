//! Resizes in signal handlers: each worker thread's two timer signals
//! (nesting in each other, and forced to nest in the middle of a resize
//! every 16th run) grow and shrink blocks with `NoLock`
//! (`Allocator::grow` / `grow_zeroed` / `shrink`) and with
//! `Global::realloc` (inside a `nolock_scope`, or routed to the nolock path
//! by having interrupted the allocator), across the size classes, the 8 KiB
//! and 64 KiB boundaries and up to 4 MiB, while the workers do the same on
//! the normal path with `Global` (the process's allocator) and `Vec`s.
//! Blocks live in a per-thread stash between signals, so a handler resizes
//! blocks its thread or the other signal's handler resized before, and the
//! worker resizes the handlers' blocks on the normal path.
//!
//! Every block carries a header (size, allocator, alignment, seed) and an
//! address-independent pattern (a moved block keeps it), checked after
//! every resize (the kept prefix) and at free. At the end everything is
//! freed: the heap holds no more objects or large blocks than before the
//! storm, and with memory to spare at least 99% of the nolock resizes
//! succeeded. Bounded by counts (resizes and signals per thread); run in a
//! child under the watchdog, with rseq and with glibc's rseq off.

mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use allocator_api2::alloc::Allocator;
use anyalloc::{Global, NoLock};
use anyalloc_storm::signal::{die, signal_value};
use anyalloc_storm::{
    inside, install_handler, mask, mix64, raise_here, storm_signals, ErrnoGuard, HandlerEntry,
    Stash, ThreadTimer,
};

/// `Global`, with the thread's in-allocator flag raised around each call
/// (as in `global_storm`), so a handler can tell it interrupted one.
struct Flagged;

// SAFETY: every method forwards to `Global` with the same arguments.
unsafe impl GlobalAlloc for Flagged {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::alloc(&Global, layout) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::dealloc(&Global, ptr, layout) })
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::alloc_zeroed(&Global, layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        inside(|| unsafe { GlobalAlloc::realloc(&Global, ptr, layout, new_size) })
    }
}

#[global_allocator]
static A: Flagged = Flagged;

// ----- blocks --------------------------------------------------------------------

/// Which API a block belongs to (its resizes and its free).
const VIA_NOLOCK: u64 = 0;
const VIA_GLOBAL: u64 = 1;

/// A block's header: word 0 = size | via << 32 | align log2 << 40, word 1
/// = seed; then word `i` = `mix64(seed + i)`: every word of the first
/// 64 KiB, then every 64th, and the last. Sizes are at least 16.
fn words(size: usize) -> impl Iterator<Item = usize> {
    let n = size / 8;
    (2..n.min(8192))
        .chain((8192..n).step_by(64))
        .chain((n > 8192 && !(n - 1).is_multiple_of(64)).then(|| n - 1))
}

/// Fills a block.
///
/// # Safety
/// `p` holds `size` bytes the caller owns.
unsafe fn fill(p: NonNull<u8>, size: usize, via: u64, align: usize, seed: u64) {
    let w = p.as_ptr() as *mut u64;
    // SAFETY: per the caller; every index is below `size / 8`.
    unsafe {
        w.write_unaligned(size as u64 | via << 32 | (align.trailing_zeros() as u64) << 40);
        w.add(1).write_unaligned(seed);
        for i in words(size) {
            w.add(i).write_unaligned(mix64(seed + i as u64));
        }
    }
}

/// The header: (size, via, align, seed).
///
/// # Safety
/// `p` is a live block of this test, filled.
unsafe fn header(p: NonNull<u8>) -> (usize, u64, usize, u64) {
    let w = p.as_ptr() as *const u64;
    // SAFETY: per the caller, at least 16 bytes.
    let (h, seed) = unsafe { (w.read_unaligned(), w.add(1).read_unaligned()) };
    (
        (h & 0xFFFF_FFFF) as usize,
        (h >> 32) & 0xFF,
        1 << ((h >> 40) & 0x3F),
        seed,
    )
}

/// Checks the words of a fill of `filled` bytes with `seed` that lie in the
/// first `kept` bytes at `p`.
///
/// # Safety
/// `p` holds at least `kept` live bytes.
unsafe fn check(p: NonNull<u8>, filled: usize, kept: usize, seed: u64) -> bool {
    let w = p.as_ptr() as *const u64;
    // SAFETY: per the caller; every index is below `kept / 8`.
    unsafe {
        if w.add(1).read_unaligned() != seed {
            return false;
        }
        words(filled)
            .take_while(|&i| i < kept / 8)
            .all(|i| w.add(i).read_unaligned() == mix64(seed + i as u64))
    }
}

fn layout(size: usize, align: usize) -> Layout {
    match Layout::from_size_align(size, align) {
        Ok(l) => l,
        Err(_) => die("handler_resize_storm: bad layout"),
    }
}

/// A size across the boundaries: small classes, the 8 KiB class limit,
/// the 64 KiB per-CPU blocks, page blocks, up to 4 MiB.
fn size_for(r: u64) -> usize {
    let x = r >> 8;
    match r % 16 {
        0..=6 => 16 + (x % 8200) as usize,
        7..=10 => 8000 + (x % 60_000) as usize,
        11..=13 => 60_000 + (x % (1 << 20)) as usize,
        _ => (1 << 20) + (x % (3 << 20)) as usize,
    }
}

#[derive(Default)]
struct Counters {
    resizes: AtomicU64,
    resize_ok: AtomicU64,
    allocs: AtomicU64,
    alloc_ok: AtomicU64,
    moved: AtomicU64,
    in_place: AtomicU64,
    violations: AtomicU64,
    frees: AtomicU64,
    signals: AtomicU64,
    nested: AtomicU64,
    inside: AtomicU64,
    normal_resizes: AtomicU64,
}

static C: Counters = Counters {
    resizes: AtomicU64::new(0),
    resize_ok: AtomicU64::new(0),
    allocs: AtomicU64::new(0),
    alloc_ok: AtomicU64::new(0),
    moved: AtomicU64::new(0),
    in_place: AtomicU64::new(0),
    violations: AtomicU64::new(0),
    frees: AtomicU64::new(0),
    signals: AtomicU64::new(0),
    nested: AtomicU64::new(0),
    inside: AtomicU64::new(0),
    normal_resizes: AtomicU64::new(0),
};

fn violation() {
    C.violations.fetch_add(1, Relaxed);
}

/// Allocates a filled block of `size` through `via`; `nolock` routes a
/// `Global` allocation through a nolock scope.
fn alloc_block(size: usize, via: u64, align: usize, seed: u64, nolock: bool) -> Option<usize> {
    let l = layout(size, align);
    let p = if via == VIA_NOLOCK {
        NoLock.allocate(l).ok().map(|p| p.cast::<u8>())
    } else {
        let _scope = nolock.then(anyalloc::nolock_scope);
        // SAFETY: a non-zero size.
        NonNull::new(unsafe { GlobalAlloc::alloc(&A, l) })
    }?;
    if !(p.as_ptr() as usize).is_multiple_of(align) {
        violation();
    }
    // SAFETY: a fresh block of `size` bytes.
    unsafe { fill(p, size, via, align, seed) };
    Some(p.as_ptr() as usize)
}

/// Checks and frees a block.
///
/// # Safety
/// The caller owns the block at `h`.
unsafe fn free_block(h: usize, nolock: bool) {
    let p = NonNull::new(h as *mut u8).unwrap_or_else(|| die("null block"));
    // SAFETY: per the caller.
    let (size, via, align, seed) = unsafe { header(p) };
    // SAFETY: the block holds `size` bytes.
    if !unsafe { check(p, size, size, seed) } {
        violation();
    }
    C.frees.fetch_add(1, Relaxed);
    // SAFETY: allocated through `via` with this layout.
    unsafe {
        if via == VIA_NOLOCK {
            NoLock.deallocate(p, layout(size, align));
        } else {
            let _scope = nolock.then(anyalloc::nolock_scope);
            GlobalAlloc::dealloc(&A, p.as_ptr(), layout(size, align));
        }
    }
}

/// Resizes the block at `h` to `new`, checks what it kept, refills it at
/// its new size. `nolock`: a `Global` block is resized in a nolock scope.
/// `force_nest`: the other signal is raised between the resize and the
/// check. The block (moved or not, resized or not) comes back.
///
/// # Safety
/// The caller owns the block at `h`.
unsafe fn resize_block(h: usize, new: usize, nolock: bool, force_nest: Option<i32>) -> usize {
    let p = NonNull::new(h as *mut u8).unwrap_or_else(|| die("null block"));
    // SAFETY: per the caller.
    let (size, via, align, seed) = unsafe { header(p) };
    // SAFETY: the block holds `size` bytes.
    if !unsafe { check(p, size, size, seed) } {
        violation();
    }
    let old = layout(size, align);
    C.resizes.fetch_add(1, Relaxed);
    // SAFETY: `p` is live with `old`; the new layout keeps the alignment.
    let q = unsafe {
        if via == VIA_NOLOCK {
            let l = layout(new, align);
            let r = if new > size {
                if seed & 1 == 0 {
                    NoLock.grow(p, old, l)
                } else {
                    NoLock.grow_zeroed(p, old, l)
                }
            } else {
                NoLock.shrink(p, old, l)
            };
            r.ok().map(|q| q.cast::<u8>())
        } else {
            let _scope = nolock.then(anyalloc::nolock_scope);
            NonNull::new(GlobalAlloc::realloc(&A, p.as_ptr(), old, new))
        }
    };
    let Some(q) = q else {
        // Failed: the old block is untouched, still ours.
        // SAFETY: as above.
        if !unsafe { check(p, size, size, seed) } {
            violation();
        }
        return h;
    };
    C.resize_ok.fetch_add(1, Relaxed);
    if q == p {
        C.in_place.fetch_add(1, Relaxed);
    } else {
        C.moved.fetch_add(1, Relaxed);
    }
    if let Some(sig) = force_nest {
        raise_here(sig);
    }
    // SAFETY: `q` holds `new` bytes, the first min(size, new) kept.
    unsafe {
        if !check(q, size, size.min(new), seed) {
            violation();
        }
        if via == VIA_NOLOCK && new > size && seed & 1 == 1 {
            // grow_zeroed: the tail past the old size is zero.
            let tail = std::slice::from_raw_parts(q.as_ptr().add(size), new - size);
            if tail.iter().step_by(61).any(|&b| b != 0) {
                violation();
            }
        }
        if !(q.as_ptr() as usize).is_multiple_of(align) {
            violation();
        }
        fill(q, new, via, align, seed);
    }
    q.as_ptr() as usize
}

// ----- the handlers --------------------------------------------------------------

/// Divides the run's counts, and multiplies the timers' periods, in a debug
/// build (unoptimised code with every check is many times slower).
const SCALE: u64 = if cfg!(debug_assertions) { 20 } else { 1 };

const MAX_THREADS: usize = 4;
const STASH: usize = 12;
/// Per thread: the blocks its handlers and itself share.
static STASHES: [Stash<STASH>; MAX_THREADS] = [const { Stash::new() }; MAX_THREADS];
static SIG_A: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Handler runs on this thread (const, no destructor: handler-safe).
    static RUNS: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    let entry = HandlerEntry::enter();
    if !ACTIVE.load(Relaxed) {
        return;
    }
    // SAFETY: a timer signal's (or raise_here's: 0) siginfo.
    let slot = unsafe { signal_value(info) };
    if slot >= MAX_THREADS {
        return;
    }
    let run = C.signals.fetch_add(1, Relaxed);
    RUNS.with(|r| r.set(r.get() + 1));
    if entry.nested() {
        C.nested.fetch_add(1, Relaxed);
    }
    if entry.interrupted_allocator() {
        C.inside.fetch_add(1, Relaxed);
    }
    let a = SIG_A.load(Relaxed) as i32;
    let other = if sig == a { a + 1 } else { a };
    let stash = &STASHES[slot];
    for k in 0..2u64 {
        let r = mix64(run << 8 ^ k ^ (sig as u64) << 40 ^ (slot as u64) << 48);
        // A Global call without a scope takes the nolock route only when
        // this handler interrupted the allocator: every 4th, which then
        // is a normal-path call in a handler, as in real programs.
        let nolock = r & 3 != 0;
        let force = (run.is_multiple_of(16) && k == 0 && !entry.nested()).then_some(other);
        match stash.take((r >> 20) as usize) {
            Some(h) => {
                // SAFETY: taken out of the stash with one swap: ours.
                let h = unsafe { resize_block(h, size_for(r >> 4), nolock, force) };
                if (r >> 12).is_multiple_of(8) || !stash.put(h, (r >> 24) as usize) {
                    // SAFETY: ours, as above.
                    unsafe { free_block(h, nolock) };
                }
            }
            None => {
                let via = if r & 4 == 0 { VIA_NOLOCK } else { VIA_GLOBAL };
                let align = [8, 16, 64, 4096][(r >> 6) as usize % 4];
                C.allocs.fetch_add(1, Relaxed);
                if let Some(h) = alloc_block(size_for(r >> 4), via, align, r >> 1, nolock) {
                    C.alloc_ok.fetch_add(1, Relaxed);
                    if !stash.put(h, (r >> 24) as usize) {
                        // SAFETY: just allocated, ours.
                        unsafe { free_block(h, nolock) };
                    }
                }
            }
        }
    }
}

/// A worker: `Vec`s grown and shrunk across the boundaries, and the
/// stash's blocks resized on the normal path, until both counts are met.
fn worker(t: usize, steps: u64, signals: u64) {
    let a = SIG_A.load(Relaxed) as i32;
    let timers = (
        ThreadTimer::start(a, Duration::from_micros(250 * SCALE), t).expect("timer A"),
        ThreadTimer::start(a + 1, Duration::from_micros(370 * SCALE), t).expect("timer B"),
    );
    let stash = &STASHES[t];
    let mut vecs: Vec<Vec<u64>> = Vec::new();
    let mut i = 0u64;
    while i < steps || RUNS.with(Cell::get) < signals {
        let r = mix64(i ^ (t as u64) << 56);
        // A Vec: grown by pushes / reserve, truncated, shrunk to fit.
        let n = size_for(r) / 8;
        let mut v: Vec<u64> = Vec::new();
        let mut x = 0;
        while x < n {
            let step = (n - x).min(1 + (r as usize >> 7) % 70_000);
            v.extend((x..x + step).map(|j| (j as u64) ^ r));
            x += step;
        }
        let keep = n / (1 + (r >> 30) as usize % 5);
        v.truncate(keep);
        v.shrink_to_fit();
        if v.iter().enumerate().any(|(j, &w)| w != (j as u64) ^ r) {
            violation();
        }
        vecs.push(v);
        if vecs.len() > 6 {
            vecs.remove((r >> 40) as usize % vecs.len());
        }
        // A stash block resized on the normal path (a handler's, maybe).
        if let Some(h) = stash.take((r >> 16) as usize) {
            C.normal_resizes.fetch_add(1, Relaxed);
            // SAFETY: taken out of the stash: ours.
            let h = unsafe { resize_block(h, size_for(r >> 3), false, None) };
            if !stash.put(h, (r >> 24) as usize) {
                // SAFETY: ours.
                unsafe { free_block(h, false) };
            }
        }
        i += 1;
    }
    mask(&[a, a + 1], true);
    drop(timers);
    mask(&[a, a + 1], false);
}

#[test]
fn resizes_in_handlers() {
    if !watchdog::in_child() {
        for env in [&[][..], &[watchdog::RSEQ_OFF][..]] {
            let out = watchdog::run_ok(
                "resizes_in_handlers",
                env,
                Duration::from_secs(120),
                "resizes in handlers",
            );
            println!("--- {env:?}");
            print!("{}", out.stdout);
        }
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let [a, b] = storm_signals();
    SIG_A.store(a as usize, Relaxed);
    install_handler(a, handler, &[]).expect("sigaction A");
    install_handler(b, handler, &[]).expect("sigaction B");
    // Warm the heap's bookkeeping up (thread spawn, timers) before the
    // baseline: a storm of one step and no signals.
    std::thread::spawn(|| worker(MAX_THREADS - 1, 1, 0))
        .join()
        .unwrap();
    // The baseline after two maintenance passes: the maintenance thread's
    // first passes set up state of their own, which is no leak of the storm.
    let passes = heap.stats().maintenance_passes;
    for _ in 0..300 {
        if heap.stats().maintenance_passes >= passes + 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    heap.drain();
    let before = heap.stats();
    ACTIVE.store(true, Relaxed);
    let workers: Vec<_> = (0..2)
        .map(|t| std::thread::spawn(move || worker(t, 800 / SCALE, 3_000 / SCALE)))
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    ACTIVE.store(false, Relaxed);
    for s in &STASHES {
        for h in s.drain() {
            // SAFETY: no handler runs any more; the stash owned `h`.
            unsafe { free_block(h, false) };
        }
    }
    // The counters are exact only with nothing moving objects: the
    // maintenance thread may be in a pass. A leak stays; a pass ends.
    let mut after = heap.stats();
    for _ in 0..100 {
        heap.drain();
        after = heap.stats();
        let same = (after.objects_in_use, after.large_in_use, after.huge_in_use)
            == (
                before.objects_in_use,
                before.large_in_use,
                before.huge_in_use,
            );
        if same {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let load = |x: &AtomicU64| x.load(Relaxed);
    let (res, res_ok) = (load(&C.resizes), load(&C.resize_ok));
    let (al, al_ok) = (load(&C.allocs), load(&C.alloc_ok));
    println!(
        "signals {}, nested {}, interrupted inside an allocator call {}; resizes {res} \
         (ok {res_ok}, in place {}, moved {}; {} on the normal path), handler allocs {al} \
         (ok {al_ok}), frees {}, violations {}",
        load(&C.signals),
        load(&C.nested),
        load(&C.inside),
        load(&C.in_place),
        load(&C.moved),
        load(&C.normal_resizes),
        load(&C.frees),
        load(&C.violations),
    );
    println!(
        "heap before/after: objects {}/{}, large {}/{}, huge {}/{}, maintenance passes {}/{}; \
         nolock ok {}, busy {}, empty {}, too large {}",
        before.objects_in_use,
        after.objects_in_use,
        before.large_in_use,
        after.large_in_use,
        before.huge_in_use,
        after.huge_in_use,
        before.maintenance_passes,
        after.maintenance_passes,
        after.nolock_alloc_ok,
        after.nolock_alloc_fail_busy,
        after.nolock_alloc_fail_empty,
        after.nolock_alloc_fail_too_large,
    );
    assert_eq!(
        load(&C.violations),
        0,
        "pattern, zeroing or alignment violations"
    );
    assert!(load(&C.signals) >= 6_000 / SCALE, "the storm happened");
    assert!(load(&C.nested) > 0, "the two signals never nested");
    assert!(
        load(&C.inside) > 0,
        "no signal interrupted an allocator call"
    );
    assert!(load(&C.normal_resizes) > 0);
    assert_eq!(
        after.objects_in_use, before.objects_in_use,
        "objects leaked"
    );
    assert_eq!(
        after.large_in_use, before.large_in_use,
        "large blocks leaked"
    );
    assert_eq!(after.huge_in_use, before.huge_in_use, "huge blocks leaked");
    assert_eq!(heap.pages().check_invariants(), Ok(()));
    assert!(
        res_ok * 100 >= res * 99 && al_ok * 100 >= al * 99,
        "nolock success too low: resizes {res_ok}/{res}, allocs {al_ok}/{al}"
    );
}
