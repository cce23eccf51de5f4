//! Groups that are gone leave nothing behind in their parent's registry of
//! children: a parent that had thousands of short-lived children, all
//! dropped, holds no memory for them. (The registry's entries are weak
//! references, which keep each dropped child's allocation, a group with
//! its 64 per-CPU stocks, until the entry goes: they used to go only when
//! the parent's next child was made.)

use anyalloc::Group;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting the bytes it has live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System`, which upholds the contract; the count is
// only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn dropped_children_leave_no_memory_in_their_parents_registry() {
    const CHILDREN: usize = 2000;
    let parent = Group::new("parent", Some(1 << 30), None);
    // The registry at its largest (a `Vec` of weak references) stays.
    let before = LIVE.load(Relaxed) + CHILDREN * 2 * size_of::<usize>();
    let kids: Vec<_> = (0..CHILDREN)
        .map(|i| Group::new(&format!("tenant {i}"), None, Some(&parent)))
        .collect();
    let each = (LIVE.load(Relaxed) - before) / CHILDREN;
    drop(kids);
    let left = LIVE.load(Relaxed).saturating_sub(before);
    println!("{CHILDREN} children of about {each} bytes each; {left} bytes left after their drop");
    assert!(
        left < 16 * each,
        "{left} bytes left for {CHILDREN} dropped children of {each} bytes each"
    );
    assert_eq!(parent.usage(), 0);
}
