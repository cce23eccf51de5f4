//! The cache of freed huge mappings counts its bytes apart from its slots:
//! a free (a put) counts the bytes, then fills a slot; a huge allocation (a
//! take) empties a slot, then takes the bytes off. Neither takes a lock, so
//! a `fork` can clone a thread between the two. The child then counted
//! bytes that no slot holds, for good: its `huge_cached_bytes` stayed 8 MiB
//! with the cache empty, through `trim`, and the cache had that much less
//! room there.
//!
//! Deterministic, with an interrupt point: a thread's free (or huge
//! allocation) pauses at `Site::HugeCached` while the main thread forks.
//! The child's count must be what its slots hold.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The huge blocks' size.
const SIZE: usize = 8 << 20;

/// Role 1 pauses at its first `HugeCached` (step 1) until the fork (step 2).
static SCRIPT: [Pause; 1] = [Pause::new(1, Site::HugeCached, 0, 2)];

fn heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .decay(false),
    )
    .expect("heap")
}

/// The child's check: its cache counts what its slots hold (nothing: the
/// paused step's slot was empty at the clone, or emptied), also after a
/// trim, and it keeps a freed huge block again.
fn child_counts_its_slots(heap: &Heap, layout: Layout) -> i32 {
    if heap.stats().huge_cached_bytes != 0 {
        return 3;
    }
    heap.trim();
    if heap.stats().huge_cached_bytes != 0 {
        return 4;
    }
    let p = heap.alloc(layout).expect("a huge block in the child");
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    if heap.stats().huge_cached_bytes != SIZE {
        return 5;
    }
    0
}

const WHAT: &str = "the child's huge_cached_bytes counted a mapping no slot holds: \
                    after the fork (3), after a trim (4), or after a free of its own (5)";

#[test]
fn fork_between_a_put_and_its_slot() {
    if watchdog::ran_in_child(
        "fork_between_a_put_and_its_slot",
        Duration::from_secs(60),
        "fork between a kept huge mapping's count and its slot",
    ) {
        return;
    }
    let heap = heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let block = heap.alloc(layout).expect("a huge block").as_ptr() as usize;
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(NonNull::new(block as *mut u8).unwrap()) };
        });
        script::reached(1, "the free paused, its bytes counted in the cache");
        let status = script::fork_child(2, || child_counts_its_slots(&heap, layout));
        t.join().unwrap();
        status
    });
    script::end();
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_cached_bytes), (0, SIZE));
    script::assert_child_ok(status, WHAT);
}

#[test]
fn fork_between_a_take_and_its_count() {
    if watchdog::ran_in_child(
        "fork_between_a_take_and_its_count",
        Duration::from_secs(60),
        "fork between a kept huge mapping's take and its count",
    ) {
        return;
    }
    let heap = heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let p = heap.alloc(layout).expect("a huge block");
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    assert_eq!(
        heap.stats().huge_cached_bytes,
        SIZE,
        "the freed block is kept"
    );
    script::play(&SCRIPT);
    let (status, block) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            heap.alloc(layout).expect("the kept block").as_ptr() as usize
        });
        script::reached(1, "the allocation paused, its slot emptied");
        let status = script::fork_child(2, || child_counts_its_slots(&heap, layout));
        (status, t.join().unwrap())
    });
    script::end();
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(NonNull::new(block as *mut u8).unwrap()) };
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_cached_bytes), (0, SIZE));
    script::assert_child_ok(status, WHAT);
}
