//! The nolock route's fallback to the next class up stays within
//! `Heap::largest_object_for`, the bound the C library's `free_sized` and
//! `free_aligned_sized` checks use.
//!
//! A nolock allocation whose size class is re-entered on every level takes
//! the next larger class that keeps its alignment. That class can be twice
//! the request's own: `posix_memalign(4096, 462)` in a signal handler that
//! interrupted the 4 KiB class got an 8 KiB object, and the C library's
//! size check (which allowed `max(2 * size, align)`) aborted its program's
//! `free_aligned_sized` as a wrong size. Here three threads paused at
//! interrupt points hold the class's three level slots, so the fallback
//! happens every time.
//!
//! Runs in a child process (its own interrupt hook), under a watchdog.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::time::Duration;

use anyalloc::Heap;

use script::Pause;

/// Role 1 (normal) holds level 0 and the node lock in its refill, roles 2
/// and 3 (nolock) levels 1 and 2, until the main thread has allocated
/// (step 4).
static SCRIPT: [Pause; 3] = script::slot_holders(4);

/// With the class of `layout` held on every level, a nolock allocation of
/// `layout` gets an object of `expected` usable bytes, and that is the
/// bound `Heap::largest_object_for` gives.
fn falls_back(layout: Layout, expected: usize) {
    let heap = script::one_slot_heap();
    // Nothing cached: the holders' allocations refill, so role 1 pauses.
    heap.drain();
    script::play(&SCRIPT);
    let held: Vec<usize> = std::thread::scope(|s| {
        let threads = script::spawn_slot_holders(s, &heap, layout);
        script::reached(3, "the slots and node lock are held");
        let p = heap.alloc_nolock(layout).expect("the next class up");
        assert!(p.as_ptr().align_offset(layout.align()) == 0, "misaligned");
        let usable = heap.usable_size(p);
        let most = Heap::largest_object_for(layout).expect("a class serves it");
        println!(
            "{} B aligned to {}: {usable} usable bytes with its class held (bound {most})",
            layout.size(),
            layout.align()
        );
        assert_eq!(usable, expected, "not the next class up");
        assert!(usable <= most, "beyond Heap::largest_object_for");
        let before = script::class_counts(&heap, usable).0;
        // The C library's `free_aligned_sized` frees it with its layout,
        // which names another class: only slower.
        // SAFETY: allocated just above with `layout`, freed once.
        unsafe { heap.free_nolock_sized(p, layout) };
        let after = script::class_counts(&heap, usable).0;
        assert_eq!(after + 1, before, "the sized free missed the object");
        script::advance_to(4);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    script::end();
    // SAFETY: allocated by the slot holders, freed once.
    unsafe { script::free_held(&heap, held) };
}

#[test]
fn an_aligned_request_with_its_class_held_gets_the_next_class_within_the_bound() {
    if watchdog::ran_in_child(
        "an_aligned_request_with_its_class_held_gets_the_next_class_within_the_bound",
        Duration::from_secs(60),
        "the next class up stays within the bound",
    ) {
        return;
    }
    // The storm's case: the 4 KiB class, then the 8 KiB one.
    falls_back(Layout::from_size_align(462, 4096).unwrap(), 8192);
    // `malloc(9)` (aligned to 8): the 16-byte class, then (the fast path
    // hands its slow path the class's layout, aligned to 16) the 32-byte one.
    falls_back(Layout::from_size_align(9, 8).unwrap(), 32);
}
