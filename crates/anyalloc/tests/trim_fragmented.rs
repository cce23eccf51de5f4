//! `Heap::trim` (C's `malloc_trim`) gives back the free memory that a few
//! survivors of a burst of small objects leave scattered: free blocks
//! smaller than the 256 KiB the maintainer releases, between the
//! survivors' slabs. Before, `trim` returned only blocks of 256 KiB or
//! more, so after such a burst it gave back nothing and the process kept
//! the burst's memory for good (a gigabyte of 64 B objects with one in 1024
//! kept: 1 MiB live, 1 GiB resident, `trim` returned 0).
//!
//! Residency is read with `mincore`: a page given back with
//! `MADV_DONTNEED` is not resident until touched again, whatever the timing.

use std::alloc::Layout;
use std::collections::BTreeSet;

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

#[test]
fn trim_gives_back_the_free_pages_between_survivors() {
    const OBJ: usize = 64;
    const REGION: usize = 64 << 10;
    let heap = Heap::new(
        Config::default()
            .memory(64 << 20)
            .grow(false)
            .maintenance(false),
    )
    .unwrap();
    let layout = Layout::from_size_align(OBJ, 8).unwrap();
    // A burst: 24 MiB of 64 B objects, every byte written.
    let mut all = Vec::new();
    for _ in 0..(24 << 20) / OBJ {
        let p = heap.alloc(layout).unwrap();
        // SAFETY: `p` is valid for OBJ bytes.
        unsafe { p.as_ptr().write_bytes(0x5a, OBJ) };
        all.push(p);
    }
    // One survivor per 64 KiB: its slab stays, the rest of the region's
    // pages become free blocks of 4 to 32 KiB.
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
        "the burst's pages are resident before the trim"
    );

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
    // The survivors are intact, and the memory is reusable.
    for p in &keep {
        // SAFETY: live, OBJ bytes.
        assert!(unsafe { std::slice::from_raw_parts(p.as_ptr(), OBJ) }
            .iter()
            .all(|&b| b == 0x5a));
    }
    let again: Vec<_> = (0..(8 << 20) / OBJ)
        .map(|_| heap.alloc(layout).unwrap())
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
