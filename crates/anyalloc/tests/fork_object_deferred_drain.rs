//! `fork` while another thread's normal path drains a cache's deferred
//! objects: the child must not lose the objects the drain had taken.
//!
//! A normal allocation or free that reaches its slow path first frees the
//! objects that nolock frees parked on the cache's deferred stack
//! (`Cache::drain_and_reopen`): it takes the whole stack (`take_all`), then
//! frees the objects one by one, and holds no lock meanwhile. A fork
//! cloned during that walk left the child the rest of the chain in the
//! hands of a thread it does not have: the objects were on no stack, no
//! sheaf and no slab there, lost for good, and (once the child recounted
//! its deferred objects from the stack) counted in `objects_in_use`. A
//! fork now waits for such drains in progress, and a drain that starts
//! while a fork is in progress leaves the stack alone.
//!
//! Deterministic, with interrupt points, on a heap with one CPU slot set
//! and without restartable sequences (every thread uses the same slots):
//! thread H's normal allocation holds the level-0 slot and the node lock
//! (paused at `Site::SheafRefill`), threads T1 and T2's nolock allocations
//! hold the level-1 and level-2 slots (paused at `Site::SheafAlloc`), and
//! thread B's nolock frees of `N` objects, finding all of them busy, park
//! them on the deferred stack. Then thread D allocates until its slow path
//! drains the stack, and pauses at `Site::ObjectDeferredDrain` (the chain
//! taken) until the main thread has forked, or for 200 ms (less than the
//! fork's patience). The child drains and must count in use only what was
//! in use at the fork (D's last allocation may have completed).

mod script;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;

use script::Pause;

const SIZE: usize = 64;
/// The objects parked on the deferred stack (more than H's refill takes
/// off it when it goes on).
const N: usize = 512;

/// Role r pauses at step r: 1, H (level 0 and the node lock); 2, 3: T1, T2
/// (levels 1, 2), all until step 4 (B's frees are parked); then 5: D, the
/// drainer, until the fork (step 6), but for less than the fork's wait for
/// drains in progress.
static SCRIPT: [Pause; 4] = {
    let [h, t1, t2] = script::slot_holders(4);
    [
        h,
        t1,
        t2,
        Pause::new(5, Site::ObjectDeferredDrain, 4, 6).briefly(Duration::from_millis(200)),
    ]
};

#[test]
fn fork_while_another_thread_drains_deferred_objects() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_drains_deferred_objects",
        Duration::from_secs(60),
        "fork while another thread drains deferred objects",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let victims: Vec<usize> = (0..N)
        .map(|_| heap.alloc(layout).expect("an object").as_ptr() as usize)
        .collect();
    // Every cached object back to its slab: H's allocation refills.
    heap.drain();
    script::play(&SCRIPT);
    let (status, held, mine) = std::thread::scope(|s| {
        let threads = script::spawn_slot_holders(s, &heap, layout);
        script::reached(3, "the slots and node lock are held");
        s.spawn(|| {
            for &v in &victims {
                // SAFETY: allocated by the main thread, freed once.
                unsafe { heap.free_nolock(NonNull::new(v as *mut u8).unwrap()) };
            }
        })
        .join()
        .unwrap();
        assert_eq!(
            script::class_counts(&heap, SIZE).1,
            N,
            "the frees were not all deferred"
        );
        script::advance_to(4);
        let held: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let parked = script::class_counts(&heap, SIZE).1;
        println!("{parked} objects still parked after the holders went on");
        assert!(parked >= 8, "the deferred objects were drained early");
        let d = s.spawn(|| {
            script::act(5);
            let mut mine = Vec::new();
            // Until the slow path drains (the pause), and that allocation.
            while script::step() < 5 {
                mine.push(heap.alloc(layout).expect("an object").as_ptr() as usize);
            }
            mine
        });
        script::reached(5, "the drain paused");
        // In use at the fork: D's allocations so far, H's, T1's and T2's.
        let (in_use, _) = script::class_counts(&heap, SIZE);
        let status = script::fork_child(6, || {
            heap.drain();
            let (now, deferred) = script::class_counts(&heap, SIZE);
            if deferred == 0 && (now == in_use || now == in_use + 1) {
                return 0;
            }
            eprintln!("child: {now} objects in use, {in_use} at the fork, {deferred} deferred");
            3
        });
        let mine = d.join().unwrap();
        (status, held, mine)
    });
    script::end();
    // SAFETY: allocated by the threads above, freed once.
    unsafe { script::free_held(&heap, held.into_iter().chain(mine)) };
    heap.drain();
    assert_eq!(script::class_counts(&heap, SIZE), (0, 0));
    script::assert_child_ok(
        status,
        "the child lost the deferred objects being drained (3)",
    );
}
