//! The maintenance thread drains a deferred free promptly, with no other
//! heap operation to do it. The deferral is made deterministic with an
//! interrupt point: a nolock free runs while the zone lock is held.

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static HEAP: OnceLock<Heap> = OnceLock::new();
static PENDING: AtomicUsize = AtomicUsize::new(0);

fn hook(site: Site) {
    if site == Site::ZoneAlloc {
        let p = PENDING.swap(0, Ordering::AcqRel);
        if p != 0 {
            // SAFETY: p is a live 64 KiB allocation of HEAP handed to the hook.
            unsafe {
                HEAP.get()
                    .unwrap()
                    .free_nolock(NonNull::new(p as *mut u8).unwrap())
            };
        }
    }
}

#[test]
fn maintainer_drains_a_deferred_free_without_other_traffic() {
    let heap = HEAP.get_or_init(|| Heap::new(Config::default().memory(64 << 20).cpus(1)).unwrap());
    let big = Layout::from_size_align(64 << 10, 8).unwrap(); // order 4: no per-CPU list
    let p = heap.alloc(big).unwrap();
    PENDING.store(p.as_ptr() as usize, Ordering::Release);
    set_hook(Some(hook));
    // A direct zone allocation (order 5) reaches the ZoneAlloc site with the
    // zone lock held: the hook's nolock free must defer.
    let q = heap
        .alloc(Layout::from_size_align(128 << 10, 8).unwrap())
        .unwrap();
    set_hook(None);
    let parked_at = Instant::now();
    assert_eq!(PENDING.load(Ordering::Acquire), 0, "the hook ran");
    assert!(
        heap.stats().pages.nolock_free_deferred >= 1,
        "the free was deferred"
    );
    // Only stats() from here on: nothing but the maintainer can drain.
    let mut drained = None;
    while parked_at.elapsed() < Duration::from_secs(5) {
        if heap.stats().pages.deferred_pages == 0 {
            drained = Some(parked_at.elapsed());
            break;
        }
        std::hint::spin_loop();
    }
    let drained = drained.expect("the maintainer drained the deferred list");
    println!("deferred free drained by the maintainer {drained:?} after it was parked");
    // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
    unsafe { heap.free(q) };
}
