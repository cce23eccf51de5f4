//! `fork` while another thread moves a huge block with `Heap::remap_huge`:
//! the child must not inherit the block's table entry claimed.
//!
//! `remap_huge` claims the block's entry in the heap's table of huge blocks
//! (`BUSY`: lookups pass over it) while `mremap` moves the pages, then
//! records the block again. A fork between the two clones the claim: the
//! child has no thread to finish the move, the entry stays claimed there
//! for good, and the block can never be freed in the child (a free of
//! either address aborts as a pointer the heap does not know). So a fork
//! waits for moves in progress, and a move that starts during a fork moves
//! nothing (the caller copies instead).
//!
//! Deterministic, with an interrupt point: a thread resizing a huge block
//! back and forth pauses right after its claim (`Site::HugeBusy`) until the
//! main thread has forked, or for 50 ms. Without the wait, the fork
//! happens during the pause and the child finds a claimed entry. The
//! scenario runs under a watchdog.

mod fork_pause;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

const ROUNDS: usize = 10;
const MIB: usize = 1 << 20;
/// The sizes the block alternates between (both above 4 MiB: huge).
const SMALL: usize = 5 * MIB;
const LARGE: usize = 13 * MIB;

#[test]
fn fork_while_another_thread_moves_a_huge_block() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_moves_a_huge_block",
        Duration::from_secs(120),
        "fork while another thread moves a huge block",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20)).expect("heap");
    let stop = AtomicBool::new(false);
    let mut moves = 0usize;
    let mut forks = None;
    std::thread::scope(|s| {
        let mover = s.spawn(|| {
            let mut size = SMALL;
            let mut p: NonNull<u8> = heap
                .alloc(Layout::from_size_align(size, 8).unwrap())
                .expect("a huge block");
            // From here on (not inside the allocation above, whose entry is
            // claimed while it is filled: a fork then leaves the child one
            // entry short, and the block, which the child never got, mapped).
            fork_pause::become_pauser();
            let mut moved = 0usize;
            while !stop.load(SeqCst) {
                let want = if size == SMALL { LARGE } else { SMALL };
                // SAFETY: `p` is this thread's live huge block; after
                // `Some`, only the result is.
                if let Some(q) = unsafe { heap.remap_huge(p, want) } {
                    (p, size) = (q, want);
                    moved += 1;
                }
            }
            // SAFETY: the block is live and this thread's.
            unsafe { heap.free(p) };
            moved
        });
        // Each child only reads the heap's table.
        forks = Some(fork_pause::fork_during_pauses(
            Site::HugeBusy,
            ROUNDS,
            || heap.huge_entries_claimed() == 0,
        ));
        stop.store(true, SeqCst);
        moves = mover.join().expect("the mover");
    });
    let forks = forks.expect("the forks ran");
    println!(
        "{} forks while another thread's huge block moved ({moves} moves): \
         {} children inherited a claimed entry, {} hung",
        forks.paused, forks.failed, forks.hung
    );
    assert_eq!(forks.hung, 0, "a forked child hung");
    assert_eq!(forks.failed, 0, "a forked child inherited a claimed entry");
    assert_eq!(heap.huge_entries_claimed(), 0, "an entry stayed claimed");
    assert_eq!(heap.stats().huge_in_use, 0, "the block was not freed");
}
