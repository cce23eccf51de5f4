//! Model-based tests of the object allocator: random sequences of operations
//! (normal and nolock allocations of 1 B to ~68 KiB with alignments up to a
//! page, normal and nolock frees of a random live block, drains, maintenance
//! passes) checked
//! against a model, the set of live blocks:
//!
//! * no two live blocks overlap, every block honours its alignment and
//!   `usable_size >= size`, and its contents survive until it is freed;
//! * a nolock allocation fails only when it asks for more than the nolock
//!   path serves (single thread, memory to spare);
//! * the heap's counters agree with the model: objects + large + huge in use
//!   == live blocks;
//! * after freeing everything and draining, every page is free and on the
//!   buddy lists, and the page allocator's invariants hold.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ptr::NonNull;

use anyalloc::{Config, Heap, MAX_ORDER, PAGE_SIZE};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: usize,
        align_shift: u32,
        nolock: bool,
    },
    /// Frees the live block at `pick % live` (if any).
    Free {
        pick: usize,
        nolock: bool,
    },
    Drain,
    /// One maintenance pass (stocks the slots that ran empty).
    Maintain,
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly small sizes, some page-sized and larger ones.
    let size = prop_oneof![
        6 => 1usize..=256,
        3 => 257usize..=8192,
        2 => 8193usize..=70000,
    ];
    let align_shift = prop_oneof![4 => 0u32..=4, 1 => 5u32..=12];
    prop_oneof![
        6 => (size, align_shift, any::<bool>()).prop_map(|(size, align_shift, nolock)| Op::Alloc {
            size,
            align_shift,
            nolock
        }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, nolock)| Op::Free { pick, nolock }),
        1 => Just(Op::Drain),
        1 => Just(Op::Maintain),
    ]
}

/// One live block of the model.
#[derive(Debug, Clone, Copy)]
struct Block {
    size: usize,
    seed: u8,
}

fn fill(addr: usize, b: Block) {
    // SAFETY: the model owns the live block [addr, addr + size).
    let s = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, b.size) };
    for (i, byte) in s.iter_mut().enumerate() {
        *byte = b.seed ^ (i as u8).wrapping_mul(7) ^ (i >> 8) as u8;
    }
}

fn intact(addr: usize, b: Block) -> bool {
    // SAFETY: as in `fill`.
    let s = unsafe { std::slice::from_raw_parts(addr as *const u8, b.size) };
    s.iter()
        .enumerate()
        .all(|(i, &byte)| byte == b.seed ^ (i as u8).wrapping_mul(7) ^ (i >> 8) as u8)
}

/// Whether a nolock request of this layout is within what the nolock path
/// serves (small classes, or at most `2^MAX_ORDER` pages: 4 MiB).
fn nolock_serves(size: usize, align: usize) -> bool {
    let bytes = size.max(align);
    bytes <= 8192 || bytes.div_ceil(PAGE_SIZE).next_power_of_two() <= 1 << MAX_ORDER
}

fn free_block(heap: &Heap, addr: usize, b: Block, nolock: bool) -> Result<(), TestCaseError> {
    prop_assert!(intact(addr, b), "block {addr:#x} ({b:?}) was damaged");
    // SAFETY: a live block of this heap that the model owns; it is removed
    // from the model by the caller.
    unsafe {
        let p = NonNull::new_unchecked(addr as *mut u8);
        if nolock {
            heap.free_nolock(p)
        } else {
            heap.free(p)
        }
    }
    Ok(())
}

/// Runs `ops` on a fresh heap of `cpus` CPU slot sets against the model;
/// returns the most objects each class (by object size) held in its barn
/// at once, after any op.
fn run(ops: Vec<Op>, cpus: usize) -> Result<BTreeMap<usize, usize>, TestCaseError> {
    // No maintenance thread: the counters are exact only while nothing else
    // runs (a maintenance pass moves objects between slabs and sheaves).
    let heap = Heap::new(
        Config::default()
            .memory(64 << 20)
            .cpus(cpus)
            .grow(false)
            .maintenance(false),
    )
    .unwrap();
    // start -> block
    let mut live: BTreeMap<usize, Block> = BTreeMap::new();
    let mut barn_peaks: BTreeMap<usize, usize> = BTreeMap::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc {
                size,
                align_shift,
                nolock,
            } => {
                let align = 1usize << align_shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                let p = if nolock {
                    heap.alloc_nolock(layout)
                } else {
                    heap.alloc(layout)
                };
                let Some(p) = p else {
                    prop_assert!(
                        nolock && !nolock_serves(size, align),
                        "op {n}: allocation of {size} B aligned {align} failed (nolock {nolock})"
                    );
                    continue;
                };
                prop_assert!(
                    !nolock || nolock_serves(size, align),
                    "op {n}: nolock served {size} B aligned {align}, beyond its limit"
                );
                let addr = p.as_ptr() as usize;
                prop_assert_eq!(addr % align, 0, "op {}: {} B misaligned", n, size);
                prop_assert!(heap.usable_size(p) >= size, "op {n}: usable_size < {size}");
                // No overlap with the neighbours on either side.
                if let Some((&a, b)) = live.range(..=addr).next_back() {
                    prop_assert!(
                        a + b.size <= addr,
                        "op {n}: [{addr:#x}, +{size}) overlaps [{a:#x}, +{})",
                        b.size
                    );
                }
                if let Some((&a, b)) = live.range(addr..).next() {
                    prop_assert!(
                        addr + size <= a,
                        "op {n}: [{addr:#x}, +{size}) overlaps [{a:#x}, +{})",
                        b.size
                    );
                }
                let b = Block {
                    size,
                    seed: n as u8,
                };
                fill(addr, b);
                live.insert(addr, b);
            }
            Op::Free { pick, nolock } => {
                if live.is_empty() {
                    continue;
                }
                let addr = *live.keys().nth(pick % live.len()).unwrap();
                let b = live.remove(&addr).unwrap();
                free_block(&heap, addr, b, nolock)?;
            }
            Op::Drain => {
                heap.drain();
                prop_assert_eq!(heap.pages().check_invariants(), Ok(()));
            }
            Op::Maintain => heap.maintain(),
        }
        let s = heap.stats();
        prop_assert_eq!(
            s.objects_in_use + s.large_in_use + s.huge_in_use,
            live.len(),
            "op {}: the heap's counters disagree with the model",
            n
        );
        for c in s.classes.iter() {
            let peak = barn_peaks.entry(c.size).or_default();
            *peak = (*peak).max(c.cached_in_barn);
        }
    }
    // Everything still live is intact; free it all, alternating paths.
    for (i, (addr, b)) in std::mem::take(&mut live).into_iter().enumerate() {
        free_block(&heap, addr, b, i % 2 == 0)?;
    }
    let s = heap.stats();
    prop_assert_eq!((s.objects_in_use, s.large_in_use, s.huge_in_use), (0, 0, 0));
    heap.drain();
    let p = heap.pages().stats();
    prop_assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    prop_assert_eq!(p.buddy_pages, p.total_pages, "pages off the buddy lists");
    prop_assert_eq!(heap.pages().check_invariants(), Ok(()));
    Ok(barn_peaks)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn heap_matches_the_model(ops in proptest::collection::vec(op(), 1..400), cpus in 1usize..=2) {
        run(ops, cpus)?;
    }
}

/// Enough objects of one class to go through sheaves, the barn and several
/// slabs, freed in a scrambled order, interleaved with a second class:
/// between two drains, about 670 frees of 24 B objects, more than a main
/// and a spare sheaf of them hold (2 x 254), and 330 of 700 B (sheaves of
/// 30).
#[test]
fn many_objects_of_two_classes() {
    let mut ops = Vec::new();
    for i in 0..3000usize {
        ops.push(Op::Alloc {
            size: if i % 3 == 0 { 700 } else { 24 },
            align_shift: 3,
            nolock: i % 4 == 0,
        });
    }
    for i in 0..3000usize {
        ops.push(Op::Free {
            pick: i.wrapping_mul(0x9E37_79B9),
            nolock: i % 5 == 0,
        });
        if i % 1000 == 999 {
            ops.push(Op::Drain);
        }
    }
    let barn_peaks = run(ops, 2).unwrap();
    for size in [24, 768] {
        assert!(
            barn_peaks[&size] > 0,
            "the {size}-byte class never reached its barn"
        );
    }
}

/// Maintenance keeps slots that ran empty on the nolock path stocked: a pass
/// fills the spare sheaf of such a slot from the slabs (and of no slot that
/// only the normal path found empty). Nothing may be lost doing so: after
/// everything is freed and drained, every object and page is back.
#[test]
fn maintenance_stocking_keeps_every_object() {
    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .cpus(1)
            .maintenance(false),
    )
    .unwrap();
    let l = Layout::from_size_align(64, 8).unwrap();
    let class = |h: &Heap| *h.stats().classes.iter().find(|c| c.size == 64).unwrap();
    // Slabs with many free objects, nothing cached: allocate 600, free every
    // other one, drain the sheaves and the barn back to the slabs.
    let mut live: Vec<NonNull<u8>> = (0..600).map(|_| heap.alloc(l).unwrap()).collect();
    let mut i = 0;
    live.retain(|&p| {
        i += 1;
        if i % 2 == 0 {
            // SAFETY: a live object of this heap, dropped from `live`.
            unsafe { heap.free(p) };
        }
        i % 2 == 1
    });
    heap.drain();
    assert_eq!(
        class(&heap).cached_in_sheaves + class(&heap).cached_in_barn,
        0
    );
    // The slot runs empty on the normal path: a refill from the slabs (a
    // sheaf's worth: the slabs have 300 free objects), then use most of it,
    // so the slot holds less than half a sheaf. That refill could wait for
    // the node lock: maintenance keeps no stock for it.
    let cap = class(&heap).sheaf_capacity;
    assert!(cap < 300, "a sheaf of 64-byte objects holds {cap}");
    live.extend((0..cap - cap / 4).map(|_| heap.alloc(l).unwrap()));
    let before = class(&heap);
    assert!(before.cached_in_sheaves < cap / 2, "{before:?}");
    heap.maintain();
    let after = class(&heap);
    assert_eq!(
        after.cached_in_sheaves, before.cached_in_sheaves,
        "maintenance stocked a slot that only the normal path found empty"
    );
    // Empty again, and the same on the nolock path: now the slot is stocked.
    heap.drain();
    live.extend((0..cap - cap / 4).map(|_| heap.alloc_nolock(l).unwrap()));
    let before = class(&heap);
    assert!(before.cached_in_sheaves < cap / 2, "{before:?}");
    heap.maintain();
    let after = class(&heap);
    assert!(
        after.cached_in_sheaves > before.cached_in_sheaves,
        "maintenance did not stock the slot that ran empty on the nolock path: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.objects_in_use,
        live.len(),
        "stocking changed the objects in use"
    );
    for p in live {
        // SAFETY: live objects of this heap, each freed once.
        unsafe { heap.free(p) };
    }
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.objects_in_use, 0, "an object was lost while stocking");
    let p = s.pages;
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(p.buddy_pages, p.total_pages);
}
