//! The zone-lock holder of the page tests that need a zone's lock busy
//! while another thread's nolock call runs (their interrupt-point hook
//! pauses this thread at `Site::ZoneAlloc`, the lock held).

use anyalloc::PageAllocator;

/// A normal allocation of `order`, above the per-CPU lists so that it takes
/// the zone lock (held at `Site::ZoneAlloc`), then its free.
pub fn allocate_under_the_zone_lock(pages: &PageAllocator, order: u32) {
    let p = pages.alloc_pages(order).expect("a block");
    // SAFETY: allocated above with this order, freed once.
    unsafe { pages.free_pages(p, order) };
}
