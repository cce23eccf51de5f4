//! The object-allocator peers, every one seen the same way: a shared,
//! dynamically called `GlobalAlloc`.
//!
//! * glibc (`std::alloc::System`), mimalloc, jemalloc (`tikv-jemallocator`);
//! * `anyalloc Global`: the real [`anyalloc::Global`] (the process-wide
//!   heap, with its re-entry routing);
//! * `anyalloc normal` / `anyalloc nolock`: an [`anyalloc::Heap`] each,
//!   called through `Heap::alloc`/`free_sized` or `alloc_nolock`/`free_nolock_sized`
//!   (told the layout `GlobalAlloc::dealloc` passes, as the peers are).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{null_mut, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};

use anyalloc::{Config, Heap};

/// An allocator as every peer is seen.
pub type Alloc = &'static (dyn GlobalAlloc + Sync);
/// A thing with its printed name.
pub type Named<T> = (&'static str, T);

/// glibc malloc.
pub const GLIBC: &str = "glibc";
/// mimalloc.
pub const MIMALLOC: &str = "mimalloc";
/// jemalloc.
pub const JEMALLOC: &str = "jemalloc";
/// `anyalloc::Global`.
pub const GLOBAL: &str = "anyalloc Global";
/// `Heap::alloc` / `Heap::free_sized`.
pub const NORMAL: &str = "anyalloc normal";
/// `Heap::alloc_nolock` / `Heap::free_nolock_sized`.
pub const NOLOCK: &str = "anyalloc nolock";
/// `Heap::alloc` / `Heap::free_sized` of a heap without a maintenance thread.
pub const NORMAL_NO_MAINTAINER: &str = "anyalloc normal, maintainer off";
/// The peers anyalloc's normal path is measured against.
pub const OTHERS: [&str; 3] = [GLIBC, MIMALLOC, JEMALLOC];

/// `std::alloc::System` (glibc).
pub static SYSTEM: System = System;
/// mimalloc.
pub static MIMALLOC_A: mimalloc::MiMalloc = mimalloc::MiMalloc;
/// jemalloc.
pub static JEMALLOC_A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// anyalloc's process-wide heap.
pub static GLOBAL_A: anyalloc::Global = anyalloc::Global;

/// glibc with all signals blocked around each call (`pthread_sigmask`
/// twice per call): no handler can run while malloc's state is half-done.
/// What careful users of glibc do when handlers must allocate: correct by
/// construction, at the price of two syscalls per call.
pub struct SigmaskedGlibc;

/// The careful glibc peer.
pub static SIGMASKED_GLIBC: SigmaskedGlibc = SigmaskedGlibc;

/// Blocks every signal for the calling thread; returns the previous mask.
#[inline]
fn block_all() -> libc::sigset_t {
    // SAFETY: both sets are initialised (sigfillset, then written by
    // pthread_sigmask) before use; only this thread's mask changes.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

#[inline]
fn restore_mask(old: &libc::sigset_t) {
    // SAFETY: a mask returned by `block_all` on this thread.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, null_mut()) };
}

// SAFETY: glibc's blocks, returned to glibc; the mask changes nothing about
// them.
unsafe impl GlobalAlloc for SigmaskedGlibc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let old = block_all();
        // SAFETY: the caller's layout (non-zero size).
        let p = unsafe { SYSTEM.alloc(layout) };
        restore_mask(&old);
        p
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let old = block_all();
        // SAFETY: the GlobalAlloc contract: a live glibc block.
        unsafe { SYSTEM.dealloc(ptr, layout) };
        restore_mask(&old);
    }
}

/// `Heap::alloc` / `Heap::free_sized` behind `GlobalAlloc`.
pub struct Normal(pub Heap);
/// `Heap::alloc_nolock` / `Heap::free_nolock_sized` behind `GlobalAlloc`.
pub struct NoLockHeap(pub Heap);

/// A heap as the benchmarks use it: `Config::default()`.
pub fn heap() -> Heap {
    Heap::new(Config::default()).unwrap_or_else(|e| panic!("anyalloc::Heap::new: {e}"))
}

// SAFETY: `Heap::alloc` returns a block of at least `layout.size()` bytes
// aligned to `layout.align()` or `None` (mapped to null), and `free` takes
// back exactly such blocks; the layout is not needed to free.
unsafe impl GlobalAlloc for Normal {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.alloc(layout).map_or(null_mut(), NonNull::as_ptr)
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the `GlobalAlloc` contract: `ptr` came from `alloc` on
            // this adapter with `layout`, i.e. from this heap, and is dead.
            unsafe { self.0.free_sized(p, layout) }
        }
    }
}

// SAFETY: as for `Normal`, through the nolock entry points.
unsafe impl GlobalAlloc for NoLockHeap {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .alloc_nolock(layout)
            .map_or(null_mut(), NonNull::as_ptr)
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the `GlobalAlloc` contract: `ptr` came from `alloc` on
            // this adapter with `layout`, i.e. from this heap, and is dead.
            unsafe { self.0.free_nolock_sized(p, layout) }
        }
    }
}

/// The object-allocator peers and anyalloc's heaps (for the after-run
/// check).
pub struct HeapPeers {
    /// Every peer, in table order.
    pub peers: Vec<Named<Alloc>>,
    /// The heaps behind `anyalloc normal`, `anyalloc nolock` and `anyalloc
    /// normal, maintainer off`.
    pub heaps: [Named<&'static Heap>; 3],
    /// Each anyalloc peer's maintenance thread(s), by thread id: their CPU
    /// time is work done off the timed thread.
    pub maintainers: Vec<Named<Vec<i32>>>,
}

/// Threads that appear while `f` (creating a heap: its maintenance thread)
/// runs. Told apart by id: a new thread names itself only once it runs.
fn new_maintainers<T>(f: impl FnOnce() -> T) -> (T, Vec<i32>) {
    let before = crate::sys::threads_named("");
    let t = f();
    let after = crate::sys::threads_named("");
    (
        t,
        after.into_iter().filter(|t| !before.contains(t)).collect(),
    )
}

/// The peers; `global` adds `anyalloc Global`. Each anyalloc path gets a
/// heap of its own, as each other peer has its own; one more heap runs
/// without a maintenance thread (the maintainer-off row).
pub fn heap_peers(global: bool) -> HeapPeers {
    // The process-wide heap exists first, so its maintainer is known (the
    // only maintenance thread before the benchmark's heaps).
    let _ = anyalloc::init();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let global_maintainers = crate::sys::threads_named(crate::sys::MAINTAINER);
    let (normal, normal_m) =
        new_maintainers(|| -> &'static Normal { Box::leak(Box::new(Normal(heap()))) });
    let (nolock, nolock_m) =
        new_maintainers(|| -> &'static NoLockHeap { Box::leak(Box::new(NoLockHeap(heap()))) });
    let off: &'static Normal = Box::leak(Box::new(Normal(
        Heap::new(Config::default().maintenance(false))
            .unwrap_or_else(|e| panic!("anyalloc::Heap::new: {e}")),
    )));
    let mut peers: Vec<Named<Alloc>> = vec![
        (GLIBC, &SYSTEM),
        (MIMALLOC, &MIMALLOC_A),
        (JEMALLOC, &JEMALLOC_A),
    ];
    if global {
        peers.push((GLOBAL, &GLOBAL_A));
    }
    peers.push((NORMAL, normal));
    peers.push((NOLOCK, nolock));
    peers.push((NORMAL_NO_MAINTAINER, off));
    let mut maintainers = vec![(NORMAL, normal_m), (NOLOCK, nolock_m)];
    if global {
        maintainers.insert(0, (GLOBAL, global_maintainers));
    }
    HeapPeers {
        peers,
        heaps: [
            (NORMAL, &normal.0),
            (NOLOCK, &nolock.0),
            (NORMAL_NO_MAINTAINER, &off.0),
        ],
        maintainers,
    }
}

/// After a run every object must be back: a benchmark that leaked (or lost
/// frees) would have done less work than it claims. Returns a report line
/// and whether the heap leaked.
pub fn check_heap(name: &str, heap: &Heap) -> (String, bool) {
    heap.drain();
    let s = heap.stats();
    let line = format!(
        "after the run, {name}: {} objects / {} large in use, nolock failures busy {} empty {}, deferred frees {}",
        s.objects_in_use, s.large_in_use, s.nolock_alloc_fail_busy, s.nolock_alloc_fail_empty, s.nolock_free_deferred
    );
    let leaked = s.objects_in_use + s.large_in_use + s.huge_in_use != 0;
    if leaked {
        crate::progress(&format!("WARNING: {line}"));
    }
    (line, leaked)
}

/// Null results that multi-threaded workloads retried (a nolock
/// allocation may fail when every lock it could try is held).
pub static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Allocates with `a`; a null is retried (counted in [`RETRIES`]) up to a
/// thousand times before the run aborts as out of memory.
#[inline]
pub fn alloc_retrying(name: &str, a: &dyn GlobalAlloc, layout: Layout) -> *mut u8 {
    // SAFETY: every layout the workloads use has a non-zero size.
    let p = unsafe { a.alloc(layout) };
    if !p.is_null() {
        return p;
    }
    alloc_retry_slow(name, a, layout)
}

#[cold]
fn alloc_retry_slow(name: &str, a: &dyn GlobalAlloc, layout: Layout) -> *mut u8 {
    for _ in 0..1000 {
        RETRIES.fetch_add(1, Ordering::Relaxed);
        std::hint::spin_loop();
        // SAFETY: as above.
        let p = unsafe { a.alloc(layout) };
        if !p.is_null() {
            return p;
        }
    }
    crate::out_of_memory(name, "an object")
}
