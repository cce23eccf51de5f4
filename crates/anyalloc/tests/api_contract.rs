//! The exact public names the crate promises (pages, heap, `Global` /
//! `NoLock` / scope, accounting and reclaim, the no-syscall nolock option,
//! nolock for every order). Checks by other
//! crates, examples and users depend on these spellings and signatures: this
//! test fails to compile when one is renamed or removed, and at run time when
//! a constant's value or a promised behaviour drifts.

#![allow(deprecated)] // NOLOCK_MAX_ORDER is deprecated, not gone

mod nolock_retry;

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use anyalloc::{
    ClassStats, Config, Error, Global, Group, Heap, HeapStats, NoLock, NoLockScope, PageAllocator,
    PageStats, Platform, MAX_ORDER, NOLOCK_MAX_ORDER, PAGE_SIZE, PCP_MAX_ORDER,
};

/// `from_region`'s shape, for the page allocator and the heap.
type FromRegion<T> =
    unsafe fn(NonNull<u8>, usize, &'static dyn Platform, Config) -> Result<T, Error>;
/// `Group::new`'s shape.
type NewGroup = fn(&str, Option<usize>, Option<&Arc<Group>>) -> Arc<Group>;

fn send_sync<T: Send + Sync>() {}
fn global_alloc<T: GlobalAlloc>() {}
fn allocator<T: allocator_api2::alloc::Allocator>() {}

/// The page allocator's names and signatures.
#[test]
fn page_allocator_names() {
    assert_eq!(PAGE_SIZE, 4096);
    assert_eq!(MAX_ORDER, 10);
    assert_eq!(PCP_MAX_ORDER, 3);
    send_sync::<PageAllocator>();
    let _: fn(Config) -> Result<PageAllocator, Error> = PageAllocator::new;
    let _: fn(&PageAllocator, u32) -> Option<NonNull<u8>> = PageAllocator::alloc_pages;
    let _: fn(&PageAllocator, u32) -> Option<NonNull<u8>> = PageAllocator::alloc_pages_nolock;
    let _: unsafe fn(&PageAllocator, NonNull<u8>, u32) = PageAllocator::free_pages;
    let _: unsafe fn(&PageAllocator, NonNull<u8>, u32) = PageAllocator::free_pages_nolock;
    let _: fn(&PageAllocator) = PageAllocator::drain;
    let _: fn(&PageAllocator) -> PageStats = PageAllocator::stats;
    let _: FromRegion<PageAllocator> = PageAllocator::from_region;
    let _: Config = Config::default().memory(16 << 20).cpus(2);
    let s = PageStats::default();
    let _: (usize, usize, usize, usize) = (
        s.total_pages,
        s.free_pages,
        s.percpu_pages,
        s.deferred_pages,
    );
    let _: (u64, u64, u64, u64) = (
        s.nolock_alloc_ok,
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
        s.nolock_free_deferred,
    );
}

/// `NOLOCK_MAX_ORDER` equals `MAX_ORDER`: the nolock path serves every
/// order up to it, and a nolock order above `NOLOCK_MAX_ORDER` gets `None`.
#[test]
fn nolock_max_order_is_max_order() {
    assert_eq!(NOLOCK_MAX_ORDER, MAX_ORDER);
    let pa = PageAllocator::new(Config::default().memory(16 << 20).cpus(1).grow(false)).unwrap();
    let p = pa
        .alloc_pages_nolock(NOLOCK_MAX_ORDER)
        .expect("the nolock path serves orders up to NOLOCK_MAX_ORDER");
    // SAFETY: allocated above with this order, freed once.
    unsafe { pa.free_pages_nolock(p, NOLOCK_MAX_ORDER) };
    assert!(pa.alloc_pages_nolock(NOLOCK_MAX_ORDER + 1).is_none());
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
}

/// The heap's names and signatures (objects, accounting and reclaim).
#[test]
fn heap_names() {
    send_sync::<Heap>();
    let _: fn(Config) -> Result<Heap, Error> = Heap::new;
    let _: fn(&Heap) -> &PageAllocator = Heap::pages;
    let _: fn(&Heap, Layout) -> Option<NonNull<u8>> = Heap::alloc;
    let _: fn(&Heap, Layout) -> Option<NonNull<u8>> = Heap::alloc_nolock;
    let _: unsafe fn(&Heap, NonNull<u8>) = Heap::free;
    let _: unsafe fn(&Heap, NonNull<u8>) = Heap::free_nolock;
    let _: fn(&Heap, NonNull<u8>) -> usize = Heap::usable_size;
    let _: fn(&Heap) = Heap::drain;
    let _: fn(&Heap) -> HeapStats = Heap::stats;
    let _: fn(&Heap, Layout, &Arc<Group>) -> Option<NonNull<u8>> = Heap::alloc_in;
    let _: fn(&Heap, Layout, &Arc<Group>) -> Option<NonNull<u8>> = Heap::alloc_nolock_in;
    let _: fn(&Heap) = Heap::maintain;
    let _: FromRegion<Heap> = Heap::from_region;
    send_sync::<Group>();
    let _: NewGroup = Group::new;
    let _: fn(&Group) -> usize = Group::usage;
    let _: fn(&Group) -> usize = Group::peak;
    let _: fn(&Group) -> u64 = Group::failcnt;
    let _: Config = Config::default()
        .maintenance(false)
        .nolock_syscalls(false)
        .min_reserve(0);

    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .cpus(1)
            .maintenance(false),
    )
    .unwrap();
    heap.register_shrinker(|_want: usize| -> usize { 0 });
    let s: HeapStats = heap.stats();
    let c: &ClassStats = &s.classes[0];
    let _ = (
        s.nolock_alloc_ok,
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
    );
    let _ = (
        c.objects_in_use,
        c.slabs,
        c.cached_in_sheaves,
        c.cached_in_barn,
        c.deferred,
    );
    // Nolock objects up to 4 MiB; above, `None`. (Retried: the heap's
    // maintainer may hold the zone lock at that moment.)
    let p = nolock_retry::first(|| {
        heap.alloc_nolock(Layout::from_size_align(4 << 20, 8).unwrap())
            .ok_or("a 4 MiB nolock object refused")
    });
    // SAFETY: allocated above, freed once.
    unsafe { heap.free_nolock(p) };
    assert!(heap
        .alloc_nolock(Layout::from_size_align((4 << 20) + 1, 8).unwrap())
        .is_none());
}

/// `Global`, `NoLock` and the nolock scope.
#[test]
fn global_names() {
    global_alloc::<Global>();
    global_alloc::<NoLock>();
    allocator::<NoLock>();
    let _: fn() -> NoLockScope = anyalloc::nolock_scope;
    // The global heap is shared with this binary's other tests: a nolock
    // call may meet a lock one of them holds (see `nolock_retry`).
    let b = nolock_retry::first(|| allocator_api2::boxed::Box::try_new_in(7u64, NoLock));
    assert_eq!(*b, 7);
}
