//! `HeapStats::nolock_alloc_ok` counts every nolock allocation that
//! succeeds, whichever step of the nolock search served it, including the
//! last ones, which hold no slot of this CPU to count in: nested nolock
//! allocations (reached with interrupt points) until every level slot of
//! the CPU is held, so the innermost is served by the slabs under a tried
//! node lock.

use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// One CPU (so one set of level slots), no maintainer thread.
static HEAP: OnceLock<Heap> = OnceLock::new();

fn heap() -> &'static Heap {
    HEAP.get_or_init(|| {
        Heap::new(
            Config::default()
                .memory(16 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .expect("heap")
    })
}
/// Nested allocations made so far (the hook stops at `NESTED`).
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// Nested nolock allocations that returned memory.
static SERVED: AtomicUsize = AtomicUsize::new(0);
/// What they returned, freed after the hook is removed.
static HELD: [AtomicUsize; NESTED] = [const { AtomicUsize::new(0) }; NESTED];
/// One per level slot of a CPU: the last one finds them all held.
const NESTED: usize = 3;

fn layout() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

/// At each `SheafAlloc` site (a slot of the 64-byte class held), one more
/// nested nolock allocation of that class, until `NESTED` of them.
fn hook(site: Site) {
    if site != Site::SheafAlloc {
        return;
    }
    let depth = DEPTH.fetch_add(1, Ordering::Relaxed);
    if depth >= NESTED {
        return;
    }
    if let Some(p) = heap().alloc_nolock(layout()) {
        SERVED.fetch_add(1, Ordering::Relaxed);
        HELD[depth].store(p.as_ptr() as usize, Ordering::Relaxed);
    }
}

#[test]
fn every_nolock_success_is_counted() {
    let h = heap();
    let before = h.stats().nolock_alloc_ok;
    // The heap's first allocation of the class takes its slow path, which
    // holds the level-0 slot at its `SheafAlloc` site.
    set_hook(Some(hook));
    let first = h.alloc(layout()).expect("normal allocation");
    set_hook(None);
    let served = SERVED.load(Ordering::Relaxed);
    assert_eq!(
        served, NESTED,
        "the nested nolock allocations did not all run and succeed"
    );
    assert_eq!(
        h.stats().nolock_alloc_ok - before,
        served as u64,
        "nolock successes not counted"
    );
    // SAFETY: every pointer below was allocated from `h` and is freed once.
    unsafe {
        h.free(first);
        for p in &HELD {
            h.free_nolock(std::ptr::NonNull::new(p.swap(0, Ordering::Relaxed) as *mut u8).unwrap());
        }
    }
    h.drain();
    assert_eq!(h.stats().objects_in_use, 0);
}
