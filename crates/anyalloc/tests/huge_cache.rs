//! Freed huge mappings (above 4 MiB) are kept for reuse: a huge block
//! allocated and freed in a loop was a new `mmap` each time, and every page
//! the program touched faulted in again (1.4 ms for a 4 MiB + 1 block
//! written once per page, 100-150 times glibc, mimalloc and jemalloc, which
//! keep such memory). Checked by what the OS says: whether a new block's
//! pages are resident the moment it is handed out (`mincore`), and whether
//! a range is still mapped; and by the heap's count of mappings.

use anyalloc::{Config, Heap};
use core::alloc::Layout;

const PAGE: usize = 4096;

/// Pages of `[p, p + len)` resident now (`mincore`).
fn resident(p: *const u8, len: usize) -> usize {
    let pages = len.div_ceil(PAGE);
    let mut v = vec![0u8; pages];
    // SAFETY: `v` has one byte per page of the range; mincore only reads
    // the page tables.
    let r = unsafe { libc::mincore(p as *mut _, len, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore of a live block failed");
    v.iter().filter(|&&b| b & 1 != 0).count()
}

/// Whether the page at `p` is mapped (`msync` fails with ENOMEM on an
/// unmapped range).
fn mapped(p: *const u8) -> bool {
    // SAFETY: msync only inspects the range; `p` is page-aligned.
    unsafe { libc::msync(p as *mut _, PAGE, libc::MS_ASYNC) == 0 }
}

/// One test, its parts one after another: a part that checks that a range
/// was unmapped must not see another part's new mapping there.
#[test]
fn huge_mappings_are_kept_for_reuse() {
    a_huge_block_freed_and_allocated_again_reuses_its_resident_pages();
    a_larger_kept_mapping_serves_a_smaller_block_and_gives_its_tail_back();
    calloc_of_a_kept_mapping_is_zeroed();
    a_kept_mapping_up_to_twice_the_size_comes_whole();
    kept_mappings_are_bounded_and_go_back_on_maintenance_and_trim();
    a_dropped_heap_unmaps_its_kept_mappings();
}

fn heap() -> Heap {
    Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap()
}

/// Writes one byte per page of a block of `len` bytes.
fn touch(p: *mut u8, len: usize) {
    for o in (0..len).step_by(PAGE) {
        // SAFETY: inside a live block of `len` bytes.
        unsafe { p.add(o).write_volatile(1) };
    }
}

fn a_huge_block_freed_and_allocated_again_reuses_its_resident_pages() {
    let heap = heap();
    let len = (4 << 20) + 1;
    let layout = Layout::from_size_align(len, 16).unwrap();
    let first = heap.alloc(layout).unwrap();
    touch(first.as_ptr(), len);
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(first) };
    let maps = heap.stats().huge_maps;
    for _ in 0..100 {
        let p = heap.alloc(layout).unwrap();
        // The freed block's pages, still resident: no fault to write them.
        assert_eq!(
            resident(p.as_ptr(), len),
            len.div_ceil(PAGE),
            "a huge block was mapped afresh instead of reusing a freed one"
        );
        touch(p.as_ptr(), len);
        // SAFETY: as above.
        unsafe { heap.free(p) };
    }
    assert_eq!(heap.stats().huge_maps, maps, "a reuse made a mapping");
    assert_eq!(heap.stats().huge_cached_bytes, len.next_multiple_of(PAGE));
    assert_eq!(heap.stats().huge_in_use, 0);
}

fn a_larger_kept_mapping_serves_a_smaller_block_and_gives_its_tail_back() {
    let heap = heap();
    let big = Layout::from_size_align(20 << 20, 8).unwrap();
    let p = heap.alloc(big).unwrap();
    touch(p.as_ptr(), big.size());
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(p) };
    assert_eq!(heap.stats().huge_cached_bytes, 20 << 20);
    let maps = heap.stats().huge_maps;
    let small = Layout::from_size_align(6 << 20, 8).unwrap();
    let q = heap.alloc(small).unwrap();
    assert_eq!(q, p, "the kept mapping serves the smaller block");
    assert_eq!(heap.stats().huge_maps, maps);
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    assert_eq!(heap.usable_size(q), 6 << 20);
    // SAFETY: inside the old mapping, past the new block.
    let tail = unsafe { q.as_ptr().add(6 << 20) };
    assert!(!mapped(tail), "the unused tail stayed mapped");
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(q) };
}

/// A `Vec` doubled past 4 MiB: its 8 MiB step takes the 16 MiB mapping the
/// last round freed. Cut to 8 MiB, the next step (to 16 MiB) faulted in
/// 8 MiB again (2.5 ms a round, 80 times glibc); whole, it grows in place.
fn a_kept_mapping_up_to_twice_the_size_comes_whole() {
    let heap = heap();
    let big = Layout::from_size_align(16 << 20, 8).unwrap();
    let p = heap.alloc(big).unwrap();
    touch(p.as_ptr(), big.size());
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(p) };
    let half = Layout::from_size_align(8 << 20, 8).unwrap();
    let q = heap.alloc(half).unwrap();
    assert_eq!(q, p);
    assert_eq!(heap.usable_size(q), 16 << 20, "the kept mapping was cut");
    assert_eq!(resident(q.as_ptr(), 16 << 20), 4096);
    assert_eq!(heap.stats().huge_bytes, 16 << 20);
    // SAFETY: as above.
    unsafe { heap.free(q) };
    // An accounted block is exact: its group is charged its size.
    let group = anyalloc::Group::new("huge", None, None);
    let r = heap.alloc_in(half, &group).unwrap();
    assert_eq!(r, p);
    assert_eq!(heap.usable_size(r), 8 << 20);
    assert_eq!(group.usage(), 8 << 20);
    // SAFETY: as above.
    unsafe { heap.free(r) };
    assert_eq!(group.usage(), 0);
}

fn calloc_of_a_kept_mapping_is_zeroed() {
    let heap = heap();
    let layout = Layout::from_size_align(5 << 20, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    // SAFETY: a live block of 5 MiB.
    unsafe { p.as_ptr().write_bytes(0xab, layout.size()) };
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(p) };
    let maps = heap.stats().huge_maps;
    let q = heap.alloc_zeroed(layout).unwrap();
    assert_eq!(
        heap.stats().huge_maps,
        maps,
        "the kept mapping was not reused"
    );
    // SAFETY: a live block of 5 MiB, zero-initialised.
    let bytes = unsafe { core::slice::from_raw_parts(q.as_ptr(), layout.size()) };
    assert!(bytes.iter().all(|&b| b == 0), "calloc handed out old bytes");
    // SAFETY: as above.
    unsafe { heap.free(q) };
}

fn kept_mappings_are_bounded_and_go_back_on_maintenance_and_trim() {
    let heap = heap();
    // Above 32 MiB: never kept.
    let huge = Layout::from_size_align(40 << 20, 8).unwrap();
    let p = heap.alloc(huge).unwrap();
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(p) };
    assert!(!mapped(p.as_ptr()));
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    // At most 64 MiB in all: three blocks of 30 MiB keep two.
    let layout = Layout::from_size_align(30 << 20, 8).unwrap();
    let blocks: Vec<_> = (0..3).map(|_| heap.alloc(layout).unwrap()).collect();
    for b in &blocks {
        // SAFETY: as above.
        unsafe { heap.free(*b) };
    }
    assert_eq!(heap.stats().huge_cached_bytes, 60 << 20);
    assert_eq!(blocks.iter().filter(|b| mapped(b.as_ptr())).count(), 2);
    // Maintenance gives back what stayed unused for two of its epochs.
    heap.maintain();
    assert_eq!(heap.stats().huge_cached_bytes, 60 << 20);
    heap.maintain();
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    assert!(blocks.iter().all(|b| !mapped(b.as_ptr())));
    // `trim` gives back everything at once.
    let q = heap.alloc(layout).unwrap();
    // SAFETY: as above.
    unsafe { heap.free(q) };
    assert_eq!(heap.stats().huge_cached_bytes, 30 << 20);
    // And counts it in the bytes it says it gave back (C's `malloc_trim`
    // says whether it released memory by them).
    let given_back = heap.trim();
    assert!(
        given_back >= 30 << 20,
        "trim unmapped a kept 30 MiB mapping and said it gave back {given_back} bytes"
    );
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    assert!(!mapped(q.as_ptr()));
}

fn a_dropped_heap_unmaps_its_kept_mappings() {
    let heap = heap();
    let layout = Layout::from_size_align(8 << 20, 8).unwrap();
    let p = heap.alloc(layout).unwrap();
    // SAFETY: a live block of this heap, not used afterwards.
    unsafe { heap.free(p) };
    assert!(mapped(p.as_ptr()));
    drop(heap);
    assert!(!mapped(p.as_ptr()));
}
