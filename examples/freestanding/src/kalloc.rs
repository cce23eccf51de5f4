//! The kernel's allocator: one [`Heap`] over one region, and a global
//! allocator that picks the path from the context, as `kmalloc` does with
//! `GFP_KERNEL` / `GFP_ATOMIC`.
//!
//! | context                          | allocate             | free           |
//! |----------------------------------|----------------------|----------------|
//! | normal (main loop, deferred work)| `Heap::alloc`        | `Heap::free`   |
//! | interrupt (any depth)            | `Heap::alloc_nolock` | `Heap::free_nolock` |
//!
//! The normal path may wait on a lock (here: a futex), so it must never run
//! in an interrupt handler that may have interrupted the lock's holder. The
//! nolock path never waits and may fail; frees never fail in either context.
//! Memory may be freed in a context other than the one that allocated it.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

use anyalloc::{Config, Heap, Platform};

use crate::sys;

/// What the heap needs from the "kernel": CPU id, CPU count, how to wait,
/// how to wake, how to die.
struct Kernel;

impl Platform for Kernel {
    fn cpu_id(&self) -> usize {
        sys::cpu_id()
    }
    fn cpu_count(&self) -> usize {
        sys::cpu_count()
    }
    fn wait(&self, word: &AtomicU32, expected: u32) {
        sys::futex_wait(word, expected);
    }
    fn wake_one(&self, word: &AtomicU32) {
        sys::futex_wake(word);
    }
    fn fatal(&self, message: &[u8]) -> ! {
        sys::write(1, b"freestanding FAIL: ");
        sys::write(1, message);
        if message.last() != Some(&b'\n') {
            sys::write(1, b"\n");
        }
        sys::exit(1)
    }
}

static KERNEL: Kernel = Kernel;

/// The interrupt nesting depth of this (only) CPU, like the kernel's
/// `preempt_count`: raised by [`crate::irq`] on handler entry.
static IRQ_DEPTH: AtomicU32 = AtomicU32::new(0);

pub fn in_interrupt() -> bool {
    IRQ_DEPTH.load(Relaxed) > 0
}

/// Whether the normal path is running inside the heap (the program checks
/// that interrupts land there: that is what the nolock path is for).
static IN_NORMAL_PATH: AtomicBool = AtomicBool::new(false);

/// Interrupts taken while the normal path was inside the heap.
pub static INTERRUPTED_NORMAL_PATH: AtomicU64 = AtomicU64::new(0);

/// Enters interrupt context; returns the depth before (0: interrupted the
/// normal context).
pub fn irq_enter() -> u32 {
    if IN_NORMAL_PATH.load(Relaxed) {
        INTERRUPTED_NORMAL_PATH.fetch_add(1, Relaxed);
    }
    IRQ_DEPTH.fetch_add(1, Relaxed)
}

pub fn irq_exit() {
    IRQ_DEPTH.fetch_sub(1, Relaxed);
}

/// The counters of the summary line.
pub static NOLOCK_OK: AtomicU64 = AtomicU64::new(0);
pub static NOLOCK_FAIL: AtomicU64 = AtomicU64::new(0);
pub static NORMAL_OPS: AtomicU64 = AtomicU64::new(0);

/// The heap, set once at boot before interrupts are enabled.
struct HeapCell {
    ready: AtomicBool,
    heap: UnsafeCell<MaybeUninit<Heap>>,
}

// SAFETY: `heap` is written once, before `ready` is published, and only
// read (shared) afterwards; `Heap` is `Sync`.
unsafe impl Sync for HeapCell {}

static HEAP: HeapCell = HeapCell {
    ready: AtomicBool::new(false),
    heap: UnsafeCell::new(MaybeUninit::uninit()),
};

/// The heap; `None` before [`init`].
pub fn heap() -> Option<&'static Heap> {
    if !HEAP.ready.load(Acquire) {
        return None;
    }
    // SAFETY: initialised before `ready` was set (Release), never mutated
    // again.
    Some(unsafe { (*HEAP.heap.get()).assume_init_ref() })
}

/// Boot: maps `bytes` of memory with one raw `mmap` and builds the heap over
/// it. Normal context, once, before interrupts are enabled.
pub fn init(bytes: usize) -> Result<(), &'static str> {
    if HEAP.ready.load(Relaxed) {
        return Err("the heap is already initialised");
    }
    let region = sys::mmap(bytes).ok_or("mmap refused the heap region")?;
    // SAFETY: the region is a fresh private mapping of `bytes` bytes that
    // nothing else uses and that is never unmapped.
    let heap = unsafe {
        Heap::from_region(
            NonNull::new_unchecked(region),
            bytes,
            &KERNEL,
            Config::default(),
        )
    }
    .map_err(|_| "Heap::from_region refused the region")?;
    // SAFETY: interrupts are not enabled yet and `ready` is false: nothing
    // reads the cell while it is written.
    unsafe { (*HEAP.heap.get()).write(heap) };
    HEAP.ready.store(true, Release);
    Ok(())
}

/// Normal-path allocation, like `kmalloc(GFP_KERNEL)`. Like the kernel's
/// `might_sleep()`, it refuses to run in interrupt context: that would be a
/// bug which can deadlock, so it is recorded as a violation and fails.
pub fn alloc_normal(layout: Layout) -> *mut u8 {
    let Some(heap) = heap() else {
        return null_mut();
    };
    if in_interrupt() {
        crate::violation(crate::Violation::NormalPathInIrq);
        return null_mut();
    }
    NORMAL_OPS.fetch_add(1, Relaxed);
    IN_NORMAL_PATH.store(true, Relaxed);
    let p = heap.alloc(layout).map_or(null_mut(), NonNull::as_ptr);
    IN_NORMAL_PATH.store(false, Relaxed);
    p
}

/// Nolock allocation, like `kmalloc_nolock()`: any context, may fail.
pub fn alloc_nolock(layout: Layout) -> *mut u8 {
    let Some(heap) = heap() else {
        return null_mut();
    };
    match heap.alloc_nolock(layout) {
        Some(p) => {
            NOLOCK_OK.fetch_add(1, Relaxed);
            p.as_ptr()
        }
        None => {
            NOLOCK_FAIL.fetch_add(1, Relaxed);
            null_mut()
        }
    }
}

/// The global allocator: the path follows the context.
struct Kmalloc;

#[global_allocator]
static KMALLOC: Kmalloc = Kmalloc;

// SAFETY: every pointer comes from the heap, which honours size and
// alignment; frees go back to the same heap.
unsafe impl GlobalAlloc for Kmalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if in_interrupt() {
            alloc_nolock(layout)
        } else {
            alloc_normal(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let (Some(heap), Some(ptr)) = (heap(), NonNull::new(ptr)) else {
            return;
        };
        if in_interrupt() {
            // SAFETY: the caller frees a live block of this heap; the nolock
            // free never waits (it parks the block if a lock is busy).
            unsafe { heap.free_nolock(ptr) }
        } else {
            NORMAL_OPS.fetch_add(1, Relaxed);
            IN_NORMAL_PATH.store(true, Relaxed);
            // SAFETY: as above; normal context may wait.
            unsafe { heap.free(ptr) };
            IN_NORMAL_PATH.store(false, Relaxed);
        }
    }
}
