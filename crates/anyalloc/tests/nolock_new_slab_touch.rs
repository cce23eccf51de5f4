//! A refill that makes a new slab touches its pages before it takes the
//! node lock, so a nolock refill meanwhile finds that lock free and stays
//! in its class; the refill's pages, unused when another context made a
//! slab meanwhile, go back to the page allocator.
//!
//! A new slab's pages are first touched by its carving (each object's key
//! word), and each first touch faults: microseconds under a VM. They were
//! spent holding the node lock, which a nolock refill only tries: in the
//! bursts benchmark, signal handlers on two CPUs each making new 256-byte
//! slabs found the lock held by the other's page faults and spilled to the
//! 320-byte class.
//!
//! Here role 1's normal allocation refills an empty slot with every slab
//! full, and pauses where it has touched its new slab's pages
//! (`Site::SlabTouch`). The main thread's nolock allocations (level 1)
//! must come from the class, out of a slab of their own, which needs the
//! node lock. A normal free of the main thread then returns an object to
//! its slab (the slot is role 1's), and role 1 goes on: its refill takes
//! that object and must give its pages back (once everything is freed and
//! the heap drained, every page is free again). A second case lets role 1 go on alone: its
//! touched pages become the new slab.
//!
//! Runs in a child process (its own interrupt hook), under a watchdog.

mod script;
mod watchdog;

use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{ClassStats, Heap};

use script::{free_all, Pause};

/// The class under test: 16 objects to a one-page slab, 60 to a sheaf.
const SIZE: usize = 256;

fn layout() -> std::alloc::Layout {
    script::layout_of(SIZE)
}

fn class(heap: &Heap) -> ClassStats {
    script::class_of(heap, SIZE)
}

fn alloc_one(heap: &Heap) -> usize {
    script::alloc_n(heap, SIZE, 1)[0]
}

/// Allocates until the slot's sheaves are empty and every slab's objects
/// are in use (no slab has a free object, the barn is empty): the next
/// allocation refills from a new slab. Returns the objects.
fn use_every_slab(heap: &Heap) -> Vec<usize> {
    let mut held = vec![alloc_one(heap)];
    // The first refill made one slab and took all its objects.
    let c = class(heap);
    assert_eq!(c.slabs, 1, "one slab after the first allocation: {c:?}");
    let per_slab = c.objects_in_use + c.cached_in_sheaves;
    while class(heap).cached_in_sheaves > 0 {
        held.push(alloc_one(heap));
    }
    let c = class(heap);
    assert_eq!(
        c.objects_in_use,
        c.slabs * per_slab,
        "every slab's objects are in use: {c:?}"
    );
    assert_eq!(c.cached_in_barn, 0, "the barn is empty: {c:?}");
    held
}

/// Every page of the heap is free (after `drain`).
fn assert_every_page_free(heap: &Heap, what: &str) {
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.objects_in_use, 0, "objects lost ({what})");
    assert_eq!(
        s.pages.buddy_pages, s.pages.total_pages,
        "pages lost ({what}): {:?}",
        s.pages
    );
}

/// Role 1's refill pauses with its new slab's pages touched, before the
/// node lock.
static TOUCHED: [Pause; 1] = [Pause::new(1, Site::SlabTouch, 0, 2)];

#[test]
fn a_nolock_refill_finds_the_node_lock_free_while_a_new_slab_is_touched() {
    if watchdog::ran_in_child(
        "a_nolock_refill_finds_the_node_lock_free_while_a_new_slab_is_touched",
        Duration::from_secs(60),
        "a nolock refill finds the node lock free while a new slab is touched",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let mut held = use_every_slab(&heap);
    let slabs = class(&heap).slabs;
    script::play(&TOUCHED);
    let (got, theirs) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            alloc_one(&heap)
        });
        script::reached(1, "role 1's refill touched a new slab's pages");
        // Level 0 is role 1's; level 1 refills from a slab of its own,
        // under a tried node lock (the refill takes all its objects).
        let got: Vec<usize> = (0..4)
            .map(|i| {
                let p = heap
                    .alloc_nolock(layout())
                    .unwrap_or_else(|| panic!("nolock allocation {i} failed"));
                assert_eq!(
                    heap.usable_size(p),
                    SIZE,
                    "nolock allocation {i} went to another class: the node lock was held"
                );
                p.as_ptr() as usize
            })
            .collect();
        assert_eq!(
            class(&heap).slabs,
            slabs + 1,
            "the nolock allocations made one slab"
        );
        // A normal free, its slot held by role 1, goes to its slab: now a
        // slab has a free object, which role 1's refill takes.
        let freed = held.pop().unwrap();
        free_all(&heap, [freed]);
        script::advance_to(2);
        let theirs = t.join().unwrap();
        assert_eq!(
            theirs, freed,
            "role 1's refill did not take the slab's free object"
        );
        (got, theirs)
    });
    script::end();
    assert_eq!(
        class(&heap).slabs,
        slabs + 1,
        "role 1 made a slab of its pages although one had a free object"
    );
    free_all(&heap, held.into_iter().chain(got).chain([theirs]));
    assert_every_page_free(&heap, "role 1's unused pages");
}

/// With nothing else going on, the touched pages are the new slab.
#[test]
fn a_refill_makes_its_new_slab_of_the_pages_it_touched() {
    if watchdog::ran_in_child(
        "a_refill_makes_its_new_slab_of_the_pages_it_touched",
        Duration::from_secs(60),
        "a refill makes its new slab of the pages it touched",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let held = use_every_slab(&heap);
    let slabs = class(&heap).slabs;
    let free_pages = heap.stats().pages.free_pages;
    script::play(&TOUCHED);
    let theirs = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            alloc_one(&heap)
        });
        script::reached(1, "role 1's refill touched a new slab's pages");
        script::advance_to(2);
        t.join().unwrap()
    });
    script::end();
    let c = class(&heap);
    assert_eq!(c.slabs, slabs + 1, "one new slab: {c:?}");
    assert_eq!(
        heap.stats().pages.free_pages,
        free_pages - 1,
        "the new slab took one page, the one touched"
    );
    free_all(&heap, held.into_iter().chain([theirs]));
    assert_every_page_free(&heap, "the new slab");
}
