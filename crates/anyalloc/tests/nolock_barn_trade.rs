//! A nolock allocation trades with its class's barn while the slabs' node
//! lock is held, and goes to the slabs while the barn's lock is held: it
//! stays in its class either way.
//!
//! The barn (full and empty sheaves) and the partial slabs were under one
//! node lock. A signal handler whose allocations ran out of sheaf objects
//! while the context it interrupted held that lock for a slab operation (a
//! flush to the slabs, a refill from them) could not reach the barn's full
//! sheaves, so its whole burst went to the next class up: in the bursts
//! benchmark, thousands of 256-byte requests served from new 320-byte
//! slabs while 960 free 256-byte objects sat in the barn, and peak RSS
//! nearly doubled. The barn now has a lock of its own, held only for a
//! sheaf trade.
//!
//! Here a thread is paused at an interrupt point holding the class's
//! level-0 slot and the node lock (a flush to the slabs, the barn being
//! full), then one holding the slot and the barn lock (a refill trading
//! with the barn); each time the main thread's nolock allocations, on
//! level 1, must come from the 256-byte class.
//!
//! Runs in a child process (its own interrupt hook), under a watchdog.

mod script;
mod watchdog;

use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{ClassStats, Heap};

use script::{free_all, Pause};

/// The class under test.
const SIZE: usize = 256;

fn layout() -> std::alloc::Layout {
    script::layout_of(SIZE)
}

fn class(heap: &Heap) -> ClassStats {
    script::class_of(heap, SIZE)
}

fn alloc_n(heap: &Heap, n: usize) -> Vec<usize> {
    script::alloc_n(heap, SIZE, n)
}

/// With role 1 paused (step 1) holding the class's level-0 slot and the
/// lock `what` names, `n` nolock allocations of the main thread (level 1)
/// all get objects of the class. Then role 1 may go on (step 2). Returns
/// the objects, and the class's counts before and after them (role 1
/// still paused).
fn nolock_allocations_stay_in_class(
    heap: &Heap,
    n: usize,
    what: &str,
) -> (Vec<usize>, ClassStats, ClassStats) {
    script::reached(1, what);
    let before = class(heap);
    let got: Vec<usize> = (0..n)
        .map(|i| {
            let p = heap
                .alloc_nolock(layout())
                .unwrap_or_else(|| panic!("nolock allocation {i} failed ({what})"));
            let usable = heap.usable_size(p);
            assert_eq!(
                usable, SIZE,
                "nolock allocation {i} went to another class ({what})"
            );
            p.as_ptr() as usize
        })
        .collect();
    let after = class(heap);
    script::advance_to(2);
    (got, before, after)
}

/// Role 1's free flushes to the slabs (the barn full) and pauses there,
/// node lock held; the main thread's nolock allocations trade with the
/// barn.
static FLUSH: [Pause; 1] = [Pause::new(1, Site::SheafFlush, 0, 2)];

#[test]
fn a_nolock_refill_trades_with_the_barn_while_the_node_lock_is_held() {
    if watchdog::ran_in_child(
        "a_nolock_refill_trades_with_the_barn_while_the_node_lock_is_held",
        Duration::from_secs(60),
        "a nolock refill trades with the barn while the node lock is held",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let cap = class(&heap).sheaf_capacity;
    // Enough frees to fill the slot's two sheaves and every barn sheaf
    // (and more, to the slabs), and a flush's worth more, kept for role 1.
    let first = alloc_n(&heap, class(&heap).barn_capacity + 24 * cap);
    let kept = alloc_n(&heap, 2 * cap + 1);
    free_all(&heap, first);
    // Role 1's frees fill main and spare, then flush: the barn has no
    // empty sheaf, so to the slabs, under the node lock.
    script::play(&FLUSH);
    let (got, before, after) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            free_all(&heap, kept);
        });
        let r = nolock_allocations_stay_in_class(
            &heap,
            2 * cap,
            "role 1's flush to the slabs holds the node lock",
        );
        t.join().unwrap();
        r
    });
    script::end();
    println!("before the nolock allocations {before:?}\nafter {after:?}");
    assert!(
        before.cached_in_barn >= 2 * cap,
        "the barn held full sheaves: {before:?}"
    );
    assert_eq!(
        after.cached_in_barn,
        before.cached_in_barn - 2 * cap,
        "the nolock allocations did not take two barn sheaves"
    );
    free_all(&heap, got);
    heap.drain();
    assert_eq!(class(&heap).objects_in_use, 0, "objects lost");
}

/// Role 1's normal allocation refills its empty slot from the barn and
/// pauses in the trade, barn lock held; the main thread's nolock
/// allocations fill level 1 from the slabs.
static TRADE: [Pause; 1] = [Pause::new(1, Site::BarnTrade, 0, 2)];

#[test]
fn a_nolock_refill_takes_from_the_slabs_while_the_barn_lock_is_held() {
    if watchdog::ran_in_child(
        "a_nolock_refill_takes_from_the_slabs_while_the_barn_lock_is_held",
        Duration::from_secs(60),
        "a nolock refill takes from the slabs while the barn lock is held",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    let cap = class(&heap).sheaf_capacity;
    // Full sheaves in the barn, the slot's own sheaves then emptied, so
    // role 1's next allocation refills from the barn.
    let first = alloc_n(&heap, 6 * cap);
    free_all(&heap, first);
    assert!(
        class(&heap).cached_in_barn > 0,
        "the barn holds full sheaves"
    );
    let mut emptied = Vec::new();
    while class(&heap).cached_in_sheaves > 0 {
        emptied.extend(alloc_n(&heap, 1));
    }
    script::play(&TRADE);
    let (got, theirs) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            heap.alloc(layout()).expect("memory").as_ptr() as usize
        });
        let (got, before, after) = nolock_allocations_stay_in_class(
            &heap,
            2 * cap,
            "role 1's refill trades with the barn",
        );
        assert_eq!(
            after.cached_in_barn, before.cached_in_barn,
            "the nolock allocations took from the barn while its lock was held"
        );
        (got, t.join().unwrap())
    });
    script::end();
    free_all(&heap, got.into_iter().chain(emptied).chain([theirs]));
    heap.drain();
    assert_eq!(class(&heap).objects_in_use, 0, "objects lost");
}
