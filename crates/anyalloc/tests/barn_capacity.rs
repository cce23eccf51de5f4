//! A cache's barn grows with the heap's first zone, and a batch of frees
//! that the slots' sheaves and the barn hold comes back to the next batch
//! of allocations without the slabs.
//!
//! The barn keeps full sheaves that a stream of frees fills and a stream
//! of allocations empties; what a batch brings beyond it goes back to the
//! slabs, under the node lock. With a fixed barn of
//! 256 KiB per cache, batches of 10,000 objects of 64 B ran 1.8 times
//! mimalloc's time, and 4000 of 256 B twice. Its bound now grows from 256
//! KiB (heaps of up to 16 MiB) to 1 MiB (64 MiB and more).

mod common;

use anyalloc::{ClassStats, Config, Heap};
use common::class_of;
use std::alloc::Layout;
use std::ptr::NonNull;

/// One slot set, no restartable sequences (so every operation of the test
/// thread uses the same slot, wherever it runs), no maintainer and no
/// decay (neither empties a barn behind the test's back).
fn heap(memory: usize) -> Heap {
    let config = Config::default()
        .memory(memory)
        .cpus(1)
        .rseq(false)
        .maintenance(false)
        .decay(false);
    Heap::new(config).expect("heap")
}

fn alloc_n(heap: &Heap, size: usize, n: usize) -> Vec<NonNull<u8>> {
    let layout = Layout::from_size_align(size, 8).unwrap();
    (0..n)
        .map(|_| heap.alloc(layout).expect("memory to spare"))
        .collect()
}

fn free_all(heap: &Heap, objs: Vec<NonNull<u8>>) {
    for p in objs {
        // SAFETY: allocated by `alloc_n` from `heap`, freed once.
        unsafe { heap.free(p) };
    }
}

/// The bound: 256 KiB up to 16 MiB, 1 MiB from 64 MiB, a sixty-fourth of
/// the first zone between; as many full sheaves of each class as fit in
/// it, and one sheaf per 16 KiB of the bound at most.
#[test]
fn the_barn_grows_with_the_first_zone() {
    for (memory, bound) in [
        (4 << 20, 256 << 10),
        (16 << 20, 256 << 10),
        (32 << 20, 512 << 10),
        (64 << 20, 1 << 20),
        (1 << 30, 1 << 20),
    ] {
        let h = heap(memory);
        for c in h.stats().classes {
            let sheaf_bytes = c.sheaf_capacity * c.size;
            let sheaves = (bound / sheaf_bytes).min(bound / (16 << 10));
            assert_eq!(
                c.barn_capacity,
                sheaves * c.sheaf_capacity,
                "{} MiB heap: {c:?}",
                memory >> 20
            );
        }
    }
    // The figures the documentation gives: 64-byte objects.
    assert_eq!(class_of(&heap(16 << 20), 64).barn_capacity, 3840);
    assert_eq!(class_of(&heap(64 << 20), 64).barn_capacity, 15360);
}

/// Allocates `n` objects of `size` bytes, frees them all, allocates `n`
/// again and frees them: the class's counts at the first peak, after the
/// first frees, and at the second peak.
fn batch_twice(heap: &Heap, size: usize, n: usize) -> [ClassStats; 3] {
    let objs = alloc_n(heap, size, n);
    let peak = class_of(heap, size);
    free_all(heap, objs);
    let freed = class_of(heap, size);
    let again = alloc_n(heap, size, n);
    let second_peak = class_of(heap, size);
    free_all(heap, again);
    heap.drain();
    assert_eq!(class_of(heap, size).objects_in_use, 0, "objects lost");
    [peak, freed, second_peak]
}

fn cached(c: &ClassStats) -> usize {
    c.cached_in_sheaves + c.cached_in_barn
}

#[test]
fn a_batch_the_barn_holds_skips_the_slabs() {
    let size = 256;
    let big = heap(64 << 20);
    let c = class_of(&big, size);
    // A full barn and a sheaf: with what the allocations' last refill left
    // in the slot's main sheaf (less than a sheaf), the slot's two sheaves
    // and the barn hold it all.
    let n = c.barn_capacity + c.sheaf_capacity;
    let [peak, freed, again] = batch_twice(&big, size, n);
    let left = cached(&peak);
    assert!(left < c.sheaf_capacity, "{peak:?}");
    assert_eq!(
        cached(&freed),
        left + n,
        "a freed object left the caches: {freed:?}"
    );
    assert_eq!(freed.slabs, peak.slabs, "a slab emptied: {freed:?}");
    assert_eq!(cached(&again), left, "{again:?}");
    assert_eq!(
        again.slabs, peak.slabs,
        "a slab taken for the second batch: {again:?}"
    );

    // The same batch in a 16 MiB heap, whose barn holds a quarter of it:
    // the rest goes back to the slabs, and empty slabs to the pages.
    let small = heap(16 << 20);
    let s = class_of(&small, size);
    assert!(
        s.barn_capacity * 4 <= c.barn_capacity,
        "{s:?} against {c:?}"
    );
    let [peak, freed, _] = batch_twice(&small, size, n);
    assert_eq!(freed.cached_in_barn, s.barn_capacity, "{freed:?}");
    assert!(cached(&freed) < cached(&peak) + n, "{freed:?}");
    assert!(
        freed.slabs < peak.slabs,
        "objects beyond the barn went back to their slabs: {freed:?}, {peak:?} at the peak"
    );
}
