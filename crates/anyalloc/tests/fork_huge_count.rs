//! `fork` while another thread's huge allocation is in the table of huge
//! blocks but not yet counted: the child's statistics must match its table.
//!
//! A huge allocation (above 4 MiB, `mmap`ed) registers its block in the
//! table, then counts it (`huge_in_use`, `huge_bytes`); a huge free takes
//! it out, then uncounts it. Neither takes a lock, so a fork can clone a
//! thread between the two. The child then counted one block fewer (or
//! more) than its table holds, for good: its `huge_in_use` stayed 0 with a
//! block registered, and the heap's drop took the count below zero.
//!
//! Deterministic, with an interrupt point: a thread's huge allocation
//! pauses at `Site::HugeCount` (registered, not counted) while the main
//! thread forks. The child's statistics must count that block (it is in
//! the child's table, a block the child never got).

mod script;
mod watchdog;

use std::alloc::Layout;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The huge allocation's size.
const SIZE: usize = 8 << 20;

/// Role 1's allocation pauses registered, not counted (step 1), until the
/// fork (step 2).
static SCRIPT: [Pause; 1] = [Pause::new(1, Site::HugeCount, 0, 2)];

#[test]
fn fork_between_a_huge_allocation_and_its_count() {
    if watchdog::ran_in_child(
        "fork_between_a_huge_allocation_and_its_count",
        Duration::from_secs(60),
        "fork between a huge allocation's registration and its count",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    script::play(&SCRIPT);
    let (status, block) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            heap.alloc(layout).expect("a huge block").as_ptr() as usize
        });
        script::reached(1, "the allocation paused");
        let status = script::fork_child(2, || {
            let s = heap.stats();
            if s.huge_in_use != 1 {
                3
            } else if s.huge_bytes != SIZE {
                4
            } else {
                0
            }
        });
        (status, t.join().unwrap())
    });
    script::end();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(std::ptr::NonNull::new(block as *mut u8).unwrap()) };
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_bytes), (0, 0));
    script::assert_child_ok(
        status,
        "the child's statistics missed the registered block: huge_in_use (3) or huge_bytes (4)",
    );
}
