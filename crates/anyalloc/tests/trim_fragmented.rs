//! The free memory that a few survivors of a burst of small objects leave
//! scattered (free blocks below 256 KiB, between the survivors' slabs)
//! goes back to the OS: at once with `Heap::trim` (C's `malloc_trim`), and
//! by maintenance once it stayed idle. Before, both returned only blocks of
//! 256 KiB or more, so after such a burst the process kept the burst's
//! memory for good (a gigabyte of 64 B objects with one in 1024 kept: 1 MiB
//! live, 1 GiB resident, `trim` returned 0).
//!
//! Residency is read with `mincore`: a page given back with
//! `MADV_DONTNEED` is not resident until touched again, whatever the timing.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;

use anyalloc::{Config, Heap, PAGE_SIZE};

/// Whether the page at `page` (page-aligned) is resident.
fn resident(page: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: `page` is page-aligned and inside a mapping of the heap's;
    // mincore writes one byte for one page.
    let r = unsafe { libc::mincore(page as *mut libc::c_void, PAGE_SIZE, &mut v) };
    assert_eq!(r, 0, "mincore");
    v & 1 != 0
}

const OBJ: usize = 64;

fn layout() -> Layout {
    Layout::from_size_align(OBJ, 8).unwrap()
}

/// A burst of `bytes` of 64 B objects, every byte written, then all freed
/// but one per 64 KiB (its slab stays; the rest of the region's pages become
/// free blocks of 4 to 32 KiB). Returns the survivors and the pages that
/// the burst used and that hold no survivor, all resident.
fn burst_with_survivors(heap: &Heap, bytes: usize) -> (Vec<NonNull<u8>>, Vec<usize>) {
    const REGION: usize = 64 << 10;
    let mut all = Vec::new();
    for _ in 0..bytes / OBJ {
        let p = heap.alloc(layout()).unwrap();
        // SAFETY: `p` is valid for OBJ bytes.
        unsafe { p.as_ptr().write_bytes(0x5a, OBJ) };
        all.push(p);
    }
    all.sort_by_key(|p| p.as_ptr() as usize);
    let mut regions = BTreeSet::new();
    let mut keep = Vec::new();
    let mut freed_pages = BTreeSet::new();
    for p in all {
        let a = p.as_ptr() as usize;
        if regions.insert(a / REGION) {
            keep.push(p);
        } else {
            freed_pages.insert(a & !(PAGE_SIZE - 1));
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(p) };
        }
    }
    let kept_pages: BTreeSet<usize> = keep
        .iter()
        .map(|p| p.as_ptr() as usize & !(PAGE_SIZE - 1))
        .collect();
    let empty: Vec<usize> = freed_pages.difference(&kept_pages).copied().collect();
    assert!(empty.len() > 5000, "{} pages emptied", empty.len());
    assert!(
        empty.iter().all(|&p| resident(p)),
        "the burst's pages are resident after it"
    );
    (keep, empty)
}

/// The survivors are intact; then everything is freed and the heap is
/// whole again.
fn check_and_free(heap: &Heap, keep: Vec<NonNull<u8>>) {
    for p in &keep {
        // SAFETY: live, OBJ bytes.
        assert!(unsafe { std::slice::from_raw_parts(p.as_ptr(), OBJ) }
            .iter()
            .all(|&b| b == 0x5a));
    }
    // The memory given back is reusable.
    let again: Vec<_> = (0..(8 << 20) / OBJ)
        .map(|_| heap.alloc(layout()).unwrap())
        .collect();
    for p in again.into_iter().chain(keep) {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
    assert_eq!(s.objects_in_use, 0);
}

fn heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .grow(false)
            .maintenance(false),
    )
    .unwrap()
}

#[test]
fn trim_gives_back_the_free_pages_between_survivors() {
    let heap = heap();
    let (keep, empty) = burst_with_survivors(&heap, 24 << 20);

    let given_back = heap.trim();

    let still = empty.iter().filter(|&&p| resident(p)).count();
    assert_eq!(
        still,
        0,
        "{still} of {} free pages still resident after trim (it gave back {given_back} bytes)",
        empty.len()
    );
    assert!(
        given_back >= empty.len() * PAGE_SIZE,
        "trim reported {given_back} bytes for {} pages",
        empty.len()
    );
    assert_eq!(heap.stats().released_to_os_bytes, given_back as u64);
    check_and_free(&heap, keep);
}

/// `Heap::maintain` (the maintainer's pass, one epoch per call): the small
/// free blocks go back once idle for four times the larger blocks' two
/// epochs, a bounded number per pass, so over a few more passes.
#[test]
fn maintenance_gives_back_idle_free_pages_between_survivors() {
    let heap = heap();
    let (keep, empty) = burst_with_survivors(&heap, 24 << 20);
    // Young: nothing of them goes back in the first passes.
    for _ in 0..3 {
        heap.maintain();
    }
    let early = empty.iter().filter(|&&p| !resident(p)).count();
    assert_eq!(early, 0, "{early} pages released while not yet idle");
    for _ in 0..40 {
        heap.maintain();
    }
    let still = empty.iter().filter(|&&p| resident(p)).count();
    // Pages the heap still holds: the survivors' slabs, and the few empty
    // slabs each cache keeps in reserve (no pass gives those back).
    let st = heap.stats();
    let held = st.pages.total_pages - st.pages.free_pages - keep.len();
    assert!(
        still <= held,
        "{still} of {} idle free pages still resident after 43 maintenance passes, \
         {held} held by the heap (released {} bytes)",
        empty.len(),
        st.released_to_os_bytes
    );
    check_and_free(&heap, keep);
}
