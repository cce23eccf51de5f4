//! Past the barn, a refill takes a sheaf's objects from the slabs a slab
//! at a time (the free list, then the untouched tail), and a flush gives
//! them back in runs of objects of one slab: the descriptor and the
//! counters are written once per run. These batches go through both, in
//! every order a run can take (one long run per slab, runs of one), and
//! check that no object is handed out twice, that objects do not overlap,
//! and that the counters come back to zero.

mod common;

use anyalloc::{Config, Heap};
use common::class_of;
use std::alloc::Layout;
use std::collections::HashSet;
use std::ptr::NonNull;

const SIZE: usize = 64;

/// A 16 MiB heap (the smallest barn: batches reach the slabs sooner), one
/// slot set, no maintainer and no decay (neither moves objects behind the
/// test's back).
fn heap() -> Heap {
    let config = Config::default()
        .memory(16 << 20)
        .cpus(1)
        .rseq(false)
        .maintenance(false)
        .decay(false);
    Heap::new(config).expect("heap")
}

/// More objects than the slot's two sheaves and the barn hold together.
fn batch(heap: &Heap) -> usize {
    let c = class_of(heap, SIZE);
    c.barn_capacity + 6 * c.sheaf_capacity
}

/// `n` objects, each filled with its own index, all distinct.
fn alloc_marked(heap: &Heap, n: usize, nolock: bool) -> Vec<NonNull<u8>> {
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let objs: Vec<NonNull<u8>> = (0..n)
        .map(|i| {
            let p = if nolock {
                heap.alloc_nolock(layout)
            } else {
                heap.alloc(layout)
            }
            .expect("memory to spare");
            assert_eq!(p.as_ptr() as usize % SIZE, 0, "object {i} misaligned");
            // SAFETY: a live object of SIZE bytes.
            unsafe { p.cast::<[usize; SIZE / 8]>().write([i; SIZE / 8]) };
            p
        })
        .collect();
    let distinct: HashSet<usize> = objs.iter().map(|p| p.as_ptr() as usize).collect();
    assert_eq!(distinct.len(), n, "an object handed out twice");
    for (i, p) in objs.iter().enumerate() {
        // SAFETY: as above, still live.
        let words = unsafe { p.cast::<[usize; SIZE / 8]>().read() };
        assert_eq!(words, [i; SIZE / 8], "object {i} overlaps another");
    }
    objs
}

fn free_in(heap: &Heap, objs: impl IntoIterator<Item = NonNull<u8>>, nolock: bool) {
    for p in objs {
        // SAFETY: each a live object of `heap`, freed once.
        unsafe {
            if nolock {
                heap.free_nolock(p)
            } else {
                heap.free(p)
            }
        }
    }
}

/// Odd positions first, then even ones: neighbours, which share a slab,
/// reach the slot apart, so a flush meets runs of one object.
fn interleaved(objs: Vec<NonNull<u8>>) -> Vec<NonNull<u8>> {
    let (odd, even): (Vec<_>, Vec<_>) = objs.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
    odd.into_iter().chain(even).map(|(_, p)| p).collect()
}

#[test]
fn runs_hand_out_each_object_once_and_count_every_one() {
    let heap = heap();
    let n = batch(&heap);
    for nolock in [false, true] {
        // Fresh slabs (the tail), then their free lists in three orders.
        let objs = alloc_marked(&heap, n, nolock);
        assert_eq!(class_of(&heap, SIZE).objects_in_use, n);
        free_in(&heap, objs, nolock);
        assert_eq!(class_of(&heap, SIZE).objects_in_use, 0);

        let objs = alloc_marked(&heap, n, nolock);
        free_in(&heap, objs.into_iter().rev(), nolock);
        assert_eq!(class_of(&heap, SIZE).objects_in_use, 0);

        let objs = alloc_marked(&heap, n, nolock);
        free_in(&heap, interleaved(objs), nolock);
        assert_eq!(class_of(&heap, SIZE).objects_in_use, 0);

        // Every slab a run emptied went back but the reserve: after a
        // drain (the sheaves and the barn to the slabs), one slab's worth
        // at most is left.
        heap.drain();
        let c = class_of(&heap, SIZE);
        assert_eq!(c.objects_in_use, 0);
        assert_eq!(c.cached_in_sheaves + c.cached_in_barn, 0);
        assert!(c.slabs <= 1, "{} slabs left after a drain", c.slabs);
    }
}

/// A batch whose objects were freed to the slabs in an order that split
/// them into runs of one comes back whole from the slabs' free lists:
/// the refill's runs follow the lists across slabs.
#[test]
fn runs_follow_the_free_lists_a_scattered_flush_left() {
    let heap = heap();
    let n = batch(&heap);
    let first = alloc_marked(&heap, n, false);
    let addresses: HashSet<usize> = first.iter().map(|p| p.as_ptr() as usize).collect();
    // Keep every fourth object live, so its slab stays partial and its
    // free list holds the rest.
    let (kept, freed): (Vec<_>, Vec<_>) =
        first.into_iter().enumerate().partition(|(i, _)| i % 4 == 0);
    free_in(
        &heap,
        interleaved(freed.into_iter().map(|(_, p)| p).collect()),
        false,
    );
    let again = alloc_marked(&heap, n - kept.len(), false);
    let reused = again
        .iter()
        .filter(|p| addresses.contains(&(p.as_ptr() as usize)))
        .count();
    // The kept objects' slabs are partial: the refills take from them
    // before any new slab (the barn and sheaves hold the rest).
    assert!(
        reused * 2 > again.len(),
        "only {reused} of {} objects came from the old slabs",
        again.len()
    );
    let live: HashSet<usize> = again.iter().map(|q| q.as_ptr() as usize).collect();
    for (i, p) in &kept {
        assert!(
            !live.contains(&(p.as_ptr() as usize)),
            "live object {i} handed out again"
        );
        // SAFETY: a live object of SIZE bytes.
        let words = unsafe { p.cast::<[usize; SIZE / 8]>().read() };
        assert_eq!(words, [*i; SIZE / 8], "live object {i} overwritten");
    }
    free_in(&heap, kept.into_iter().map(|(_, p)| p).chain(again), false);
    assert_eq!(class_of(&heap, SIZE).objects_in_use, 0);
}
