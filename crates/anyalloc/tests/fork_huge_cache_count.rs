//! `fork` while another thread's huge free is putting its mapping in the
//! cache of freed huge mappings (`HeapStats::huge_cached_bytes`): the
//! child's count must match the mappings its cache holds.
//!
//! A put reserves its bytes in the cache's count, then fills a slot with
//! a compare-and-swap; a take empties a slot, then takes its bytes off the
//! count. Neither takes a lock, so a fork can clone a thread between the
//! two steps. The child then counted bytes that no slot holds, for good:
//! `huge_cached_bytes` stayed above 0 after a `trim` (which empties every
//! slot), and the 64 MiB the cache may keep shrank by the size of the
//! block of a thread the child does not have.
//!
//! Deterministic, with an interrupt point: a thread's huge free pauses at
//! `Site::HugeCachePut` (bytes reserved, no slot filled) while the main
//! thread forks. In the child, after a `trim`, the cache must count
//! nothing.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The huge block's size (kept by the cache: above 4 MiB, up to 32 MiB).
const SIZE: usize = 8 << 20;

/// Role 1's free pauses with its bytes reserved in the cache, no slot
/// filled (step 1), until the fork (step 2).
static SCRIPT: [Pause; 1] = [Pause::new(1, Site::HugeCachePut, 0, 2)];

#[test]
fn fork_between_a_huge_cache_reservation_and_its_slot() {
    if watchdog::ran_in_child(
        "fork_between_a_huge_cache_reservation_and_its_slot",
        Duration::from_secs(60),
        "fork between a huge cache put's reservation and its slot",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let block = heap.alloc(layout).expect("a huge block").as_ptr() as usize;
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(std::ptr::NonNull::new(block as *mut u8).unwrap()) };
        });
        script::reached(1, "the free paused in the cache's put");
        let status = script::fork_child(2, || {
            heap.trim();
            let s = heap.stats();
            if s.huge_cached_bytes != 0 {
                3
            } else if s.huge_in_use != 0 {
                4
            } else {
                0
            }
        });
        t.join().unwrap();
        status
    });
    script::end();
    assert_eq!(heap.stats().huge_cached_bytes, SIZE, "the parent kept it");
    heap.trim();
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    script::assert_child_ok(
        status,
        "the child's cache counted bytes no slot holds (3), or a huge block in use (4)",
    );
}
