//! `fork` while another thread's nolock free of an object is between its
//! count and its push onto the cache's deferred stack: the child's count of
//! deferred objects must match its stack.
//!
//! A nolock free that finds every slot of its CPU and the cache's node
//! lock busy parks the object on the cache's deferred stack: it counts it
//! (the class's `deferred`, which `objects_in_use` subtracts), then pushes
//! it. Neither step takes a lock the fork holds, so a clone between them
//! left the child a count for an object on no stack, for good: its drain
//! never took it off, and the class's `objects_in_use` stayed one short.
//!
//! Deterministic, with interrupt points, on a heap with one CPU slot set
//! and without restartable sequences (every thread uses the same slots):
//! thread H's normal allocation holds the level-0 slot and the node lock
//! (paused at `Site::SheafRefill`), threads T1 and T2's nolock allocations
//! hold the level-1 and level-2 slots (paused at `Site::SheafAlloc`), and
//! thread B's nolock free, finding all of them busy, pauses at
//! `Site::ObjectDeferredPush` (counted, not yet pushed) while the main
//! thread forks. The child drains and must find no deferred object left.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;

use script::Pause;

const SIZE: usize = 64;

/// Role r pauses at step r: 1, H (level 0 and the node lock); 2, 3: T1, T2
/// (levels 1, 2), all until step 5 (B's free is parked); 4: B, counted but
/// not pushed, until the fork (step 6).
static SCRIPT: [Pause; 4] = {
    let [h, t1, t2] = script::slot_holders(5);
    [h, t1, t2, Pause::new(4, Site::ObjectDeferredPush, 3, 6)]
};

#[test]
fn fork_between_a_deferred_object_free_count_and_its_push() {
    if watchdog::ran_in_child(
        "fork_between_a_deferred_object_free_count_and_its_push",
        Duration::from_secs(60),
        "fork between a deferred object free's count and its push",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let victim = heap.alloc(layout).expect("an object").as_ptr() as usize;
    // Every cached object back to its slab: H's allocation refills.
    heap.drain();
    script::play(&SCRIPT);
    let (status, held) = std::thread::scope(|s| {
        let threads = script::spawn_slot_holders(s, &heap, layout);
        let b = s.spawn(|| {
            script::act(4);
            script::wait_step(3);
            // SAFETY: allocated by the main thread, freed once.
            unsafe { heap.free_nolock(NonNull::new(victim as *mut u8).unwrap()) };
        });
        script::reached(
            4,
            "1: H holds the node lock, 2, 3: T1, T2 hold the upper slots, \
             4: B's free is counted, not pushed",
        );
        // H, T1 and T2 finish (the fork waits for the locks they hold);
        // B stays between its count and its push.
        script::advance_to(5);
        let held: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let status = script::fork_child(6, || {
            heap.drain();
            if script::class_counts(&heap, SIZE).1 != 0 {
                3
            } else {
                0
            }
        });
        b.join().unwrap();
        (status, held)
    });
    script::end();
    // SAFETY: allocated by the role threads above, freed once.
    unsafe { script::free_held(&heap, held) };
    heap.drain();
    assert_eq!(script::class_counts(&heap, SIZE).1, 0);
    script::assert_child_ok(
        status,
        "the child's drain left a deferred object counted (3)",
    );
}
