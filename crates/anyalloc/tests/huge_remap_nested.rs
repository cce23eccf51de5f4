//! `Heap::remap_huge` from a context that interrupted the allocator (or in
//! a nolock scope) is routed like the heap's other normal-path calls: it
//! returns `None` (the block untouched) instead of calling `mremap`.
//!
//! It used to `mremap` there: a system call that can block (the kernel's
//! mmap lock), from a call the README promises the nolock path (no
//! blocking system call; none at all with `nolock_syscalls(false)`).
//! `libanyalloc.so`'s `realloc` of a huge block from a signal handler that
//! interrupted the heap (its own depth mark does not see the heap's) took
//! that route; after `None` it falls back to the nolock path.
//!
//! Deterministic with an interrupt point (feature `interrupt-points`): the
//! hook at `ReleaseWindow` (the drain lock held: the thread is inside the
//! allocator) remaps a huge block.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap, MAX_ORDER};

const MIB: usize = 1 << 20;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static BLOCK: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
/// The nested remap's result (1: `None`, else the new address).
static NESTED: AtomicUsize = AtomicUsize::new(0);

fn hook(site: Site) {
    if site != Site::ReleaseWindow || !ARMED.swap(false, Ordering::Relaxed) {
        return;
    }
    // SAFETY: set before the hook is installed; the heap lives on.
    let heap = unsafe { &*HEAP.load(Ordering::Acquire) };
    let p = NonNull::new(BLOCK.load(Ordering::Relaxed) as *mut u8).unwrap();
    // SAFETY: a live huge allocation of this heap, owned by the test.
    let r = unsafe { heap.remap_huge(p, 16 * MIB) };
    if let Some(q) = r {
        BLOCK.store(q.as_ptr() as usize, Ordering::Relaxed);
    }
    NESTED.store(r.map_or(1, |q| q.as_ptr() as usize), Ordering::Relaxed);
}

#[test]
fn remap_huge_inside_the_allocator_does_not_remap() {
    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .cpus(1)
            .grow(false)
            .maintenance(false),
    )
    .unwrap();
    HEAP.store(&heap as *const Heap as *mut Heap, Ordering::Release);
    let layout = Layout::from_size_align(8 * MIB, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    BLOCK.store(p.as_ptr() as usize, Ordering::Relaxed);
    // A used and freed max-order block for the maintenance pass to release.
    let b = heap.pages().alloc_pages(MAX_ORDER).unwrap();
    // SAFETY: touching our own block, then a valid free.
    unsafe {
        b.as_ptr().write_bytes(0x5a, 4096);
        heap.pages().free_pages(b, MAX_ORDER);
    }
    ARMED.store(true, Ordering::Relaxed);
    set_hook(Some(hook));
    for _ in 0..3 {
        heap.maintain();
    }
    set_hook(None);
    let nested = NESTED.load(Ordering::Relaxed);
    assert_ne!(nested, 0, "the hook ran");
    let now = NonNull::new(BLOCK.load(Ordering::Relaxed) as *mut u8).unwrap();
    let usable = heap.usable_size(now);
    // SAFETY: the block's live address (moved or not), owned here.
    unsafe { heap.free(now) };
    assert_eq!(
        nested, 1,
        "remap_huge inside the allocator called mremap (new size {usable})"
    );
    assert_eq!(usable, 8 * MIB);
    // On the normal path it still remaps.
    let p = heap.alloc(layout).unwrap();
    // SAFETY: a live huge allocation, owned here.
    let q = unsafe { heap.remap_huge(p, 16 * MIB) }.expect("a normal remap");
    assert_eq!(heap.usable_size(q), 16 * MIB);
    // SAFETY: as above.
    unsafe { heap.free(q) };
}
