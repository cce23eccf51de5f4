//! Dropping a heap with blocks still live gives back what the heap, not the
//! blocks' memory, held: the huge blocks' own mappings, and the charges
//! and references of the accounting groups.
//!
//! One test in this binary: it reads the process's mappings, which no
//! other test thread may change meanwhile.

mod maps;

use std::alloc::Layout;
use std::sync::Arc;

use anyalloc::{Config, Group, Heap};

/// Whether any byte of `[addr, addr + len)` is mapped in this process.
fn any_mapped(addr: usize, len: usize) -> bool {
    maps::mappings()
        .into_iter()
        .any(|(a, b)| a < addr + len && addr < b)
}

#[test]
fn a_dropped_heap_unmaps_its_huge_blocks_and_uncharges_its_groups() {
    let l = |size: usize| Layout::from_size_align(size, 8).unwrap();
    let parent = Group::new("parent", None, None);
    let g = Group::new("child", Some(1 << 30), Some(&parent));
    for round in 0..3 {
        let h = Heap::new(Config::default().memory(8 << 20).maintenance(false)).unwrap();
        let mut huge = Vec::new();
        let mut keep = Vec::new();
        for size in [5 << 20, 9 << 20] {
            let p = h.alloc(l(size)).unwrap();
            huge.push((p.as_ptr() as usize, size));
        }
        let p = h.alloc_in(l(6 << 20), &g).unwrap();
        huge.push((p.as_ptr() as usize, 6 << 20));
        // Accounted objects of a few classes (some freed again), and
        // accounted large blocks.
        for (i, size) in [8usize, 24, 64, 300, 2000, 9000].into_iter().enumerate() {
            for k in 0..50 {
                let p = h.alloc_in(l(size), &g).unwrap();
                if (k + i) % 3 == 0 {
                    // SAFETY: allocated just above, freed once.
                    unsafe { h.free(p) };
                } else {
                    keep.push(p);
                }
            }
        }
        for size in [16 << 10, 64 << 10, 1 << 20] {
            keep.push(h.alloc_in(l(size), &g).unwrap());
        }
        // And a huge block freed from the nolock path (parked, not unmapped).
        let parked = h.alloc(l(7 << 20)).unwrap();
        // SAFETY: allocated just above, freed once.
        unsafe { h.free_nolock(parked) };
        for &(addr, size) in &huge {
            assert!(any_mapped(addr, size), "{addr:#x} mapped while live");
        }
        assert!(g.usage() > 6 << 20, "charged");
        assert!(Arc::strong_count(&g) > 100, "one reference per block");
        drop(h);
        for &(addr, size) in &huge {
            assert!(
                !any_mapped(addr, size),
                "round {round}: huge block {addr:#x} ({size} bytes) still mapped after the drop"
            );
        }
        assert!(
            !any_mapped(parked.as_ptr() as usize, 7 << 20),
            "the parked block is unmapped"
        );
        assert_eq!(
            Arc::strong_count(&g),
            1,
            "round {round}: the heap's references"
        );
        assert_eq!(g.usage(), 0, "round {round}");
        assert_eq!(parent.usage(), 0, "round {round}");
        drop(keep);
    }
}
