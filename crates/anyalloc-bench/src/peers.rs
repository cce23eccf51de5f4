//! The object-allocator peers, every one seen the same way: a shared,
//! dynamically called `GlobalAlloc`.
//!
//! * glibc (`std::alloc::System`), mimalloc, jemalloc (`tikv-jemallocator`);
//! * `anyalloc Global`: the real [`anyalloc::Global`] (the process-wide
//!   heap, with its re-entry routing);
//! * `anyalloc normal` / `anyalloc nolock`: an [`anyalloc::Heap`] each,
//!   called through `Heap::alloc`/`free` or `alloc_nolock`/`free_nolock`.

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
/// `Heap::alloc` / `Heap::free`.
pub const NORMAL: &str = "anyalloc normal";
/// `Heap::alloc_nolock` / `Heap::free_nolock`.
pub const NOLOCK: &str = "anyalloc nolock";
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

/// `Heap::alloc` / `Heap::free` behind `GlobalAlloc`.
pub struct Normal(pub Heap);
/// `Heap::alloc_nolock` / `Heap::free_nolock` behind `GlobalAlloc`.
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
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the `GlobalAlloc` contract: `ptr` came from `alloc` on
            // this adapter, i.e. from this heap, and is dead.
            unsafe { self.0.free(p) }
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
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the `GlobalAlloc` contract: `ptr` came from `alloc` on
            // this adapter, i.e. from this heap, and is dead.
            unsafe { self.0.free_nolock(p) }
        }
    }
}

/// The object-allocator peers and anyalloc's two heaps (for the after-run
/// check).
pub struct HeapPeers {
    /// Every peer, in table order.
    pub peers: Vec<Named<Alloc>>,
    /// The heaps behind `anyalloc normal` and `anyalloc nolock`.
    pub heaps: [Named<&'static Heap>; 2],
}

/// The peers; `global` adds `anyalloc Global`. Each anyalloc path gets a
/// heap of its own, as each other peer has its own.
pub fn heap_peers(global: bool) -> HeapPeers {
    let normal: &'static Normal = Box::leak(Box::new(Normal(heap())));
    let nolock: &'static NoLockHeap = Box::leak(Box::new(NoLockHeap(heap())));
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
    HeapPeers {
        peers,
        heaps: [(NORMAL, &normal.0), (NOLOCK, &nolock.0)],
    }
}

/// After a run every object must be back: a benchmark that leaked (or lost
/// frees) would have done less work than it claims. Returns a report line.
pub fn check_heap(name: &str, heap: &Heap) -> String {
    heap.drain();
    let s = heap.stats();
    let line = format!(
        "after the run, {name}: {} objects / {} large in use, nolock failures busy {} empty {}, deferred frees {}",
        s.objects_in_use, s.large_in_use, s.nolock_alloc_fail_busy, s.nolock_alloc_fail_empty, s.nolock_free_deferred
    );
    if s.objects_in_use + s.large_in_use + s.huge_in_use != 0 {
        crate::progress(&format!("WARNING: {line}"));
    }
    line
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
