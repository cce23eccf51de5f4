//! `fork` while another thread returns a free block to the OS (`trim`,
//! maintenance): the child must not inherit the block off every list.
//!
//! A release takes the free block off its buddy list, marks it
//! `RELEASING` (counted in the zone's `releasing`), and drops the zone lock
//! around the `madvise`; then it takes the lock again and frees the block
//! back. A fork cloned inside that window would leave the child a block on
//! no list that no thread there ever puts back (its memory lost to the
//! child, still counted free), and the child's own next release would
//! overwrite the `releasing` count. The releases run under the page
//! allocator's drain lock, which the fork's prepare handler takes first:
//! the fork waits for a release in progress.
//!
//! Deterministic, with the fork_pause harness: a thread that frees touched
//! blocks of every order and trims pauses inside the window
//! (`Site::ReleaseWindow`) until the main thread has forked, or for 50 ms.
//! Each child releases a block of its own, checks the page allocator's
//! invariants (free pages = lists + releasing + untouched), and must be
//! able to allocate every free page.

mod fork_pause;
mod watchdog;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap, PageAllocator, MAX_ORDER, PAGE_SIZE};

const ROUNDS: usize = 8;

/// A touched block of `order`, freed next to a live sibling so that it
/// stays a free block of its own order, not yet back with the OS.
fn free_a_touched_block(pages: &PageAllocator, order: u32) -> Option<std::ptr::NonNull<u8>> {
    let keep = pages.alloc_pages(order)?;
    let p = pages.alloc_pages(order)?;
    // SAFETY: our own block of `order`, then a valid free.
    unsafe {
        p.as_ptr().write_bytes(0x5a, PAGE_SIZE << order);
        pages.free_pages(p, order);
    }
    Some(keep)
}

/// The child's checks.
fn child(heap: &Heap) -> bool {
    let pages = heap.pages();
    if let Some(keep) = free_a_touched_block(pages, 2) {
        heap.trim();
        // SAFETY: allocated with order 2, freed once.
        unsafe { pages.free_pages(keep, 2) };
    }
    heap.trim();
    fork_pause::every_free_page_can_be_had(pages)
}

#[test]
fn fork_while_another_thread_releases_a_block() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_releases_a_block",
        Duration::from_secs(120),
        "fork while another thread releases a block",
    ) {
        return;
    }
    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .cpus(1)
            .grow(false)
            .maintenance(false),
    )
    .expect("heap");
    let stop = AtomicBool::new(false);
    let mut forks = None;
    std::thread::scope(|s| {
        let releaser = s.spawn(|| {
            fork_pause::become_pauser();
            let mut released = 0usize;
            let mut order = 0;
            while !stop.load(SeqCst) {
                let keep = free_a_touched_block(heap.pages(), order).expect("memory");
                released += heap.trim();
                // SAFETY: allocated with `order`, freed once.
                unsafe { heap.pages().free_pages(keep, order) };
                order = (order + 1) % (MAX_ORDER + 1);
            }
            released
        });
        forks = Some(fork_pause::fork_during_pauses(
            Site::ReleaseWindow,
            ROUNDS,
            || child(&heap),
        ));
        stop.store(true, SeqCst);
        let released = releaser.join().expect("the releaser");
        assert!(released > 0, "nothing was released");
    });
    let forks = forks.expect("the forks ran");
    println!(
        "{} forks while another thread released a block: {} children failed, {} hung",
        forks.paused, forks.failed, forks.hung
    );
    assert_eq!(forks.hung, 0, "a forked child hung");
    assert_eq!(forks.failed, 0, "a forked child's zone was inconsistent");
    heap.pages().check_invariants().expect("the parent's zone");
}
