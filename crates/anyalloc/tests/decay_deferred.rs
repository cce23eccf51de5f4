//! The inline decay (`Config::decay`, a heap without a maintenance thread)
//! takes the frees that nolock callers parked, as the maintainer's wake
//! does.
//!
//! A nolock free that finds every lock it could use held parks its block
//! on a deferred stack (pages: the zone's, when the zone lock is held;
//! objects: the cache's, when every slot of the CPU is held) and wakes the
//! maintenance thread, which takes them at once. A heap without one has
//! nothing to wake. Its parked objects were always taken by the next pass
//! (`maintain_slots` drains the cache's stack first), but its parked pages
//! stayed until the next zone-lock holder came by (perhaps never), pinned
//! and out of the decay's reach. Each test parks blocks with interrupt
//! points, then makes only normal calls that leave the zone and the class
//! alone (blocks above 4 MiB are mappings of their own) until two decay
//! passes have run, which must have taken them.
//!
//! No duration is asserted. Each test runs in a child process (its own
//! interrupt hook), under a watchdog.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

use script::Pause;

/// Normal calls that leave the zone and every class alone (a mapping of
/// its own, kept for reuse after the first), until `passes` decay passes
/// have run in all (or a minute went by, which the caller's assertion
/// then reports).
fn run_passes(heap: &Heap, passes: u64) {
    let huge = Layout::from_size_align(5 << 20, 8).unwrap();
    let start = Instant::now();
    while heap.stats().maintenance_passes < passes && start.elapsed() < Duration::from_secs(60) {
        let p = heap.alloc(huge).expect("a mapping");
        // SAFETY: allocated just above, freed once.
        unsafe { heap.free(p) };
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        heap.stats().maintenance_passes >= passes,
        "the calls ran no decay pass"
    );
}

static PAGE_HEAP: OnceLock<Heap> = OnceLock::new();
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Frees the pending block with the nolock path from inside a zone
/// allocation (the zone lock is held there): the free must park it.
fn park_pending(site: Site) {
    if site == Site::ZoneAlloc {
        let p = PENDING.swap(0, Ordering::AcqRel);
        if p != 0 {
            // SAFETY: a live block of PAGE_HEAP handed over by the test.
            unsafe {
                PAGE_HEAP
                    .get()
                    .unwrap()
                    .free_nolock(NonNull::new(p as *mut u8).unwrap())
            };
        }
    }
}

#[test]
fn decay_merges_pages_a_nolock_free_parked() {
    if watchdog::ran_in_child(
        "decay_merges_pages_a_nolock_free_parked",
        Duration::from_secs(120),
        "the decay takes parked pages",
    ) {
        return;
    }
    let heap = PAGE_HEAP.get_or_init(|| {
        Heap::new(
            Config::default()
                .memory(64 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .unwrap()
    });
    // Order 4: no per-CPU list; its free goes to the zone.
    let p = heap
        .alloc(Layout::from_size_align(64 << 10, 8).unwrap())
        .unwrap();
    PENDING.store(p.as_ptr() as usize, Ordering::Release);
    set_hook(Some(park_pending));
    // Order 5, from the zone under its lock: the hook's free parks.
    let q = heap
        .alloc(Layout::from_size_align(128 << 10, 8).unwrap())
        .unwrap();
    set_hook(None);
    assert_eq!(PENDING.load(Ordering::Acquire), 0, "the hook ran");
    let parked = heap.stats().pages.deferred_pages;
    assert_eq!(parked, 16, "the free was parked");
    run_passes(heap, 2);
    let left = heap.stats().pages.deferred_pages;
    println!("{parked} parked pages, {left} after two decay passes");
    assert_eq!(left, 0, "two decay passes left parked pages on the stack");
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(q) };
}

const SIZE: usize = 64;
/// Objects parked on the class's deferred stack.
const N: usize = 512;

/// Role 1 (H, normal) holds level 0 and the node lock in its refill, roles
/// 2 and 3 (T1, T2, nolock) levels 1 and 2, until the main thread's nolock
/// frees have all been parked (step 4).
static SCRIPT: [Pause; 3] = script::slot_holders(4);

#[test]
fn decay_frees_objects_a_nolock_free_parked() {
    if watchdog::ran_in_child(
        "decay_frees_objects_a_nolock_free_parked",
        Duration::from_secs(120),
        "the decay takes parked objects",
    ) {
        return;
    }
    // `script::one_slot_heap`, with the inline decay.
    let heap = Heap::new(
        Config::default()
            .memory(64 << 20)
            .cpus(1)
            .rseq(false)
            .maintenance(false)
            .decay(true),
    )
    .unwrap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let victims: Vec<usize> = (0..N)
        .map(|_| heap.alloc(layout).expect("an object").as_ptr() as usize)
        .collect();
    // Every cached object back to its slab: H's allocation refills.
    heap.drain();
    script::play(&SCRIPT);
    let held: Vec<usize> = std::thread::scope(|s| {
        let threads = script::spawn_slot_holders(s, &heap, layout);
        script::reached(3, "the slots and node lock are held");
        for &v in &victims {
            // SAFETY: allocated above, freed once.
            unsafe { heap.free_nolock(NonNull::new(v as *mut u8).unwrap()) };
        }
        assert_eq!(
            script::class_counts(&heap, SIZE).1,
            N,
            "the frees were not all parked"
        );
        script::advance_to(4);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    script::end();
    // H's refill took some of them; the rest wait for the next normal
    // allocation of the class (which never comes) or a pass.
    let parked = script::class_counts(&heap, SIZE).1;
    assert!(
        parked >= 8,
        "the parked objects were taken early: {parked} left"
    );
    run_passes(&heap, 2);
    let left = script::class_counts(&heap, SIZE).1;
    println!("{parked} parked objects, {left} after two decay passes");
    assert_eq!(left, 0, "two decay passes left parked objects on the stack");
    // SAFETY: allocated by the slot holders, freed once.
    unsafe { script::free_held(&heap, held) };
    heap.drain();
    assert_eq!(script::class_counts(&heap, SIZE), (0, 0));
}
