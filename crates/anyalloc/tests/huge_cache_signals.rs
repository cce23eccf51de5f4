//! A real signal handler that interrupts the huge blocks' steps (a huge
//! allocation, free, `remap_huge`, and the cache of kept mappings between
//! its slot and its count) and allocates, zeroes, moves and frees huge
//! blocks there: none is handed out twice, a zeroed one is zero, and at
//! quiescence the statistics are exact and every mapping is gone after
//! `trim`.
//!
//! The thread holds no lock at these sites. Between a huge block's table
//! entry and its count it is marked inside the allocator, so the
//! handler's calls take the nolock route there (huge blocks fail, frees
//! park); in the cache's steps they take the normal path (huge blocks
//! included). Inside `remap_huge` signals are blocked: the handler runs
//! once they are unblocked, still inside the call, on the nolock route.

#![cfg(target_os = "linux")]

mod proc_self;
mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
const SITES: usize = 64;
static RUNS: [AtomicU64; SITES] = [const { AtomicU64::new(0) }; SITES];
static SERVED: AtomicU64 = AtomicU64::new(0);
static RAISING: AtomicUsize = AtomicUsize::new(0);
/// A huge block the handler keeps between runs (0: none), freed by the
/// next run: frees at every step of the driver's calls.
static KEPT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static DRIVER: Cell<bool> = const { Cell::new(false) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn heap() -> &'static Heap {
    // SAFETY: set before the hook is installed; the heap is leaked.
    unsafe { &*HEAP.load(Ordering::Acquire) }
}

const MARK: u8 = 0x5a;

extern "C" fn handler(_: libc::c_int) {
    // Taken here: a signal raised where signals are blocked (`remap_huge`)
    // comes later.
    let site = RAISING.swap(0, Ordering::Relaxed);
    if site == 0 {
        return;
    }
    // The handler's own calls reach the sites too: no signal from them.
    let busy = BUSY.replace(true);
    let h = heap();
    for size in [5usize << 20, 9 << 20, 17 << 20] {
        let l = Layout::from_size_align(size, 8).unwrap();
        if let Some(p) = h.alloc_zeroed(l) {
            SERVED.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a live block of `size` bytes, freed once.
            unsafe {
                let s = std::slice::from_raw_parts(p.as_ptr(), size);
                if s.iter().any(|&b| b != 0) {
                    let msg = b"alloc_zeroed in a handler: a nonzero byte\n";
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::abort();
                }
                p.as_ptr().write_bytes(MARK, size);
                h.free(p);
            }
        }
    }
    let l = Layout::from_size_align(6 << 20, 8).unwrap();
    let old = KEPT.swap(0, Ordering::Relaxed);
    if old != 0 {
        let p = NonNull::new(old as *mut u8).unwrap();
        // SAFETY: the handler's own block, live.
        let p = match unsafe { h.remap_huge(p, 13 << 20) } {
            Some(q) => q,
            None => p,
        };
        // SAFETY: freed once.
        unsafe { h.free(p) };
    }
    if let Some(p) = h.alloc(l) {
        // SAFETY: a live block of 6 MiB.
        unsafe { p.as_ptr().write_bytes(MARK, 6 << 20) };
        KEPT.store(p.as_ptr() as usize, Ordering::Relaxed);
    }
    RUNS[site - 1].fetch_add(1, Ordering::Relaxed);
    BUSY.set(busy);
}

fn hook(site: Site) {
    let huge = matches!(
        site,
        Site::HugeCount | Site::FreeHuge | Site::HugeBusy | Site::HugeCached
    );
    // (Not while a signal raised earlier is still pending.)
    if !DRIVER.get() || BUSY.get() || !huge || RAISING.load(Ordering::Relaxed) != 0 {
        return;
    }
    BUSY.set(true);
    RAISING.store(site as usize + 1, Ordering::Relaxed);
    // SAFETY: raise has no memory preconditions; the handler is installed.
    unsafe { libc::raise(libc::SIGUSR1) };
    BUSY.set(false);
}

fn scenario() {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(64 << 20)
                .maintenance(false)
                .decay(false),
        )
        .unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    // SAFETY: a plain handler for SIGUSR1.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_NODEFER;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let base = proc_self::status_kib("VmSize:");
    set_hook(Some(hook));
    DRIVER.set(true);
    for round in 0..40usize {
        let size = [5usize << 20, 9 << 20, 17 << 20, 30 << 20, 6 << 20][round % 5];
        let l = Layout::from_size_align(size, 8).unwrap();
        let p = if round % 2 == 0 {
            heap.alloc(l)
        } else {
            heap.alloc_zeroed(l)
        }
        .expect("a huge block");
        // SAFETY: a live block of `size` bytes.
        unsafe {
            if round % 2 == 1 {
                let s = std::slice::from_raw_parts(p.as_ptr(), size);
                assert!(s.iter().all(|&b| b == 0), "alloc_zeroed: a nonzero byte");
            }
            p.as_ptr().write_bytes(round as u8, size);
        }
        // SAFETY: live, ours; after Some only the result is.
        let p = match unsafe { heap.remap_huge(p, size + (size >> 2)) } {
            Some(q) => q,
            None => p,
        };
        // SAFETY: still ours after the handler's runs: the contents are.
        unsafe {
            let s = std::slice::from_raw_parts(p.as_ptr(), size);
            assert!(
                s.iter().all(|&b| b == round as u8),
                "a block's contents changed under it (handed out twice?)"
            );
            heap.free(p);
        }
    }
    DRIVER.set(false);
    set_hook(None);
    let old = KEPT.swap(0, Ordering::Relaxed);
    if old != 0 {
        // SAFETY: the handler's block, live.
        unsafe { heap.free(NonNull::new(old as *mut u8).unwrap()) };
    }
    for (i, r) in RUNS.iter().enumerate() {
        let n = r.load(Ordering::Relaxed);
        if n > 0 {
            println!("site {i}: {n} handler runs");
        }
    }
    println!("served {}", SERVED.load(Ordering::Relaxed));
    let s = heap.stats();
    assert_eq!(
        (s.huge_in_use, s.huge_bytes),
        (0, 0),
        "every huge block back"
    );
    assert!(s.huge_cached_bytes <= 64 << 20);
    heap.trim();
    let s = heap.stats();
    assert_eq!(s.huge_cached_bytes, 0, "trim unmaps every kept mapping");
    let now = proc_self::status_kib("VmSize:");
    assert!(
        now <= base + 1024,
        "mappings left behind: VmSize {base} kB before, {now} kB after"
    );
    println!("SURVIVED");
}

#[test]
fn a_handler_inside_the_huge_steps() {
    if watchdog::in_child() {
        return scenario();
    }
    let out = watchdog::run_ok(
        "a_handler_inside_the_huge_steps",
        &[],
        Duration::from_secs(90),
        "a signal handler inside the huge blocks' steps",
    );
    print!("{}", out.stdout);
    assert!(out.stdout.contains("SURVIVED"), "{}", out.stdout);
}
