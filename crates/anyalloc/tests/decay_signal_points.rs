//! A real signal handler that interrupts an inline decay pass
//! (`Config::decay`) wherever the pass holds something, and calls the
//! heap there: it must never wait for its own thread.
//!
//! The maintenance thread blocks every signal, so its passes never faced
//! re-entry; an application thread running an inline pass does not. The
//! pass is inside the allocator from its maintenance lock on (a `ZoneLock`
//! try-lock marks the thread), so every call of the handler takes the
//! nolock route. Here an interrupt point (feature `interrupt-points`)
//! raises `SIGUSR1` on the pass's own thread at every site the pass
//! reaches: a node lock and a remote cache slot held while flushing an
//! idle cache (`SheafFlush`, `ReleaseSlab`), a zone lock and a remote
//! per-CPU page list held while draining an idle one (`PcpDrain`), a zone
//! lock held while taking an idle block off its list (`ReleaseIdle`), and
//! the `madvise` window with only the maintenance and drain locks held
//! (`ReleaseWindow`), among others. The handler allocates and frees on the
//! normal path (small, large, page blocks), on the nolock path, frees
//! blocks another thread allocated, and calls `trim`, `drain` and
//! `maintain`.
//!
//! The driver makes only calls that never reach those sites themselves
//! (blocks above 4 MiB, mappings of their own, whose own sites are left
//! alone), so every site hit is inside a pass. Runs in a child under the watchdog (a hang fails), with
//! rseq and without (`GLIBC_TUNABLES=glibc.pthread.rseq=0`); at the end
//! every object must be back (`objects_in_use` 0 after `drain`) and the
//! page allocator's invariants hold.

#![cfg(target_os = "linux")]

mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());

/// Blocks allocated by another thread, freed one by one by the handler.
const POOL: usize = 256;
static POOL_BLOCKS: [AtomicUsize; POOL] = [const { AtomicUsize::new(0) }; POOL];
static POOL_NEXT: AtomicUsize = AtomicUsize::new(0);

const SITES: usize = 64;
/// Handler runs per site (inside a pass: see the module docs).
static RUNS: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
/// The handler's nolock-routed allocations that were served.
static SERVED: AtomicU64 = AtomicU64::new(0);
/// Site of the signal being raised (its `u8` value + 1; 0: none).
static RAISING: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The driver thread, while the scenario runs.
    static DRIVER: Cell<bool> = const { Cell::new(false) };
    /// Inside the hook or the handler (they reach sites too).
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn heap() -> &'static Heap {
    // SAFETY: set before the hook is installed; the heap is leaked.
    unsafe { &*HEAP.load(Ordering::Acquire) }
}

/// The signal handler: the heap's every entry, from inside a pass.
extern "C" fn handler(_: libc::c_int) {
    let site = RAISING.load(Ordering::Relaxed);
    if site == 0 {
        return;
    }
    let h = heap();
    for size in [64usize, 3000, 100 << 10, 1 << 20] {
        let l = Layout::from_size_align(size, 8).unwrap();
        if let Some(p) = h.alloc(l) {
            SERVED.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a live block of `size` bytes, freed once.
            unsafe {
                p.as_ptr().write_bytes(0x77, size.min(256));
                h.free(p);
            }
        }
        if let Some(p) = h.alloc_nolock(l) {
            // SAFETY: allocated just above, freed once.
            unsafe { h.free_nolock(p) };
        }
    }
    if let Some(p) = h.pages().alloc_pages(1) {
        // SAFETY: allocated just above with order 1, freed once.
        unsafe { h.pages().free_pages(p, 1) };
    }
    // A block of another thread's, on the normal path (routed).
    let i = POOL_NEXT.fetch_add(1, Ordering::Relaxed);
    if i < POOL {
        let p = POOL_BLOCKS[i].swap(0, Ordering::Relaxed);
        // SAFETY: a live block of the heap, taken out of the pool once.
        unsafe { h.free(NonNull::new(p as *mut u8).unwrap()) };
    }
    // Nested: each does nothing (the thread is inside the allocator).
    assert_eq!(h.trim(), 0);
    h.drain();
    h.maintain();
    RUNS[site - 1].fetch_add(1, Ordering::Relaxed);
}

fn hook(site: Site) {
    // The driver's own calls reach the huge blocks' sites (outside any
    // lock: a handler there takes the normal path, and its `trim` works).
    let huge = matches!(
        site,
        Site::HugeCount
            | Site::FreeHuge
            | Site::HugeBusy
            | Site::HugeDeferredDrain
            | Site::HugeCachePut
    );
    if !DRIVER.get() || BUSY.get() || huge {
        return;
    }
    BUSY.set(true);
    RAISING.store(site as usize + 1, Ordering::Relaxed);
    // SAFETY: raise has no memory preconditions; the handler is installed.
    unsafe { libc::raise(libc::SIGUSR1) };
    RAISING.store(0, Ordering::Relaxed);
    BUSY.set(false);
}

fn runs(site: Site) -> u64 {
    RUNS[site as usize].load(Ordering::Relaxed)
}

/// Sites the passes must have been interrupted at.
const WANTED: [Site; 5] = [
    Site::SheafFlush,
    Site::ReleaseSlab,
    Site::PcpDrain,
    Site::ReleaseIdle,
    Site::ReleaseWindow,
];

fn scenario() {
    // A slot set per CPU (fewer would turn rseq off): the flushes of
    // level-0 slots under rseq take them with a membarrier fence.
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    // SAFETY: a plain handler installed for SIGUSR1 (zeroed sigaction is
    // valid; the handler is async-signal-safe as far as the heap goes).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_NODEFER;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    // The pool: blocks of several sizes, allocated by another thread.
    std::thread::spawn(|| {
        for (i, b) in POOL_BLOCKS.iter().enumerate() {
            let size = [48, 700, 5000, 70 << 10][i % 4];
            let p = heap
                .alloc(Layout::from_size_align(size, 8).unwrap())
                .unwrap();
            b.store(p.as_ptr() as usize, Ordering::Relaxed);
        }
    })
    .join()
    .unwrap();
    // Work for the passes: objects cached in sheaves and the barn (and
    // slabs that empty when they are flushed), pages on the per-CPU lists,
    // touched free blocks of every size.
    for size in [16usize, 64, 256, 1024, 4096] {
        let l = Layout::from_size_align(size, 8).unwrap();
        let v: Vec<NonNull<u8>> = (0..2000).map(|_| heap.alloc(l).unwrap()).collect();
        for p in v {
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(p) };
        }
    }
    let pages: Vec<NonNull<u8>> = (0..64)
        .map(|i| heap.pages().alloc_pages(i % 4).unwrap())
        .collect();
    for (i, p) in pages.into_iter().enumerate() {
        // SAFETY: allocated above with order i % 4, freed once.
        unsafe { heap.pages().free_pages(p, (i % 4) as u32) };
    }
    let big: Vec<NonNull<u8>> = (0..24)
        .map(|i| {
            let size = [64 << 10, 300 << 10, 1 << 20][i % 3];
            let p = heap
                .alloc(Layout::from_size_align(size, 8).unwrap())
                .unwrap();
            // SAFETY: a live block of `size` bytes, ours.
            unsafe { p.as_ptr().write_bytes(1, size) };
            p
        })
        .collect();
    for p in big {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    // The driver: blocks above 4 MiB only, until the passes were
    // interrupted at every wanted site (each pass is at least 100 ms
    // after the last; idle caches go after ten passes).
    set_hook(Some(hook));
    DRIVER.set(true);
    let huge = Layout::from_size_align(5 << 20, 8).unwrap();
    let start = Instant::now();
    while WANTED.iter().any(|&s| runs(s) == 0) && start.elapsed() < Duration::from_secs(40) {
        let p = heap.alloc(huge).expect("a mapping");
        // SAFETY: allocated just above, freed once.
        unsafe { heap.free(p) };
        std::thread::sleep(Duration::from_millis(1));
    }
    DRIVER.set(false);
    set_hook(None);
    let s = heap.stats();
    println!(
        "{:?}: {} passes, {} bytes released, {} handler allocations served",
        s.fast_path,
        s.maintenance_passes,
        s.released_to_os_bytes,
        SERVED.load(Ordering::Relaxed)
    );
    for (i, r) in RUNS.iter().enumerate() {
        let n = r.load(Ordering::Relaxed);
        if n > 0 {
            println!("site {i}: {n} handler runs");
        }
    }
    for s in WANTED {
        assert!(runs(s) > 0, "a pass was interrupted at {s:?}");
    }
    // Every block back: the pool's rest, then everything parked.
    for b in &POOL_BLOCKS {
        let p = b.swap(0, Ordering::Relaxed);
        if p != 0 {
            // SAFETY: a live block of the heap, taken out of the pool once.
            unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
        }
    }
    heap.drain();
    let s = heap.stats();
    let in_use: usize = s.classes.iter().map(|c| c.objects_in_use).sum();
    assert_eq!(
        (in_use, s.large_bytes, s.huge_in_use),
        (0, 0, 0),
        "every block back"
    );
    heap.pages().check_invariants().unwrap();
    println!("SURVIVED");
}

fn check(name: &str, env: &[(&str, &str)]) {
    let out = watchdog::run_ok(
        name,
        env,
        Duration::from_secs(90),
        "a signal handler inside an inline decay pass",
    );
    print!("{}", out.stdout);
    assert!(out.stdout.contains("SURVIVED"), "{}", out.stdout);
}

#[test]
fn a_handler_inside_a_decay_pass_never_waits_for_its_thread() {
    if watchdog::in_child() {
        return scenario();
    }
    check(
        "a_handler_inside_a_decay_pass_never_waits_for_its_thread",
        &[],
    );
}

#[test]
fn a_handler_inside_a_decay_pass_never_waits_for_its_thread_rseq_off() {
    if watchdog::in_child() {
        return scenario();
    }
    check(
        "a_handler_inside_a_decay_pass_never_waits_for_its_thread_rseq_off",
        &[watchdog::RSEQ_OFF],
    );
}
