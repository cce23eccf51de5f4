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

mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const ROUNDS: usize = 10;
const MIB: usize = 1 << 20;
/// The sizes the block alternates between (both above 4 MiB: huge).
const SMALL: usize = 5 * MIB;
const LARGE: usize = 13 * MIB;

thread_local! {
    /// Set on the thread that pauses inside its moves.
    static PAUSER: Cell<bool> = const { Cell::new(false) };
}
/// The mover is paused with its entry claimed (this round).
static PAUSED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned (this round).
static FORKED: AtomicBool = AtomicBool::new(false);

fn pause_with_the_entry_claimed(site: Site) {
    if site != Site::HugeBusy || !PAUSER.get() || PAUSED.load(SeqCst) {
        return;
    }
    PAUSED.store(true, SeqCst);
    let until = Instant::now() + Duration::from_millis(50);
    while !FORKED.load(SeqCst) && Instant::now() < until {
        std::thread::yield_now();
    }
}

#[test]
fn fork_while_another_thread_moves_a_huge_block() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_while_another_thread_moves_a_huge_block",
            &[],
            Duration::from_secs(120),
            "fork while another thread moves a huge block",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20)).expect("heap");
    let stop = AtomicBool::new(false);
    let (mut hung, mut claimed, mut paused) = (0, 0, 0);
    let mut moves = 0usize;
    set_hook(Some(pause_with_the_entry_claimed));
    std::thread::scope(|s| {
        let mover = s.spawn(|| {
            let mut size = SMALL;
            let mut p: NonNull<u8> = heap
                .alloc(Layout::from_size_align(size, 8).unwrap())
                .expect("a huge block");
            // From here on (not inside the allocation above, whose entry is
            // claimed while it is filled: a fork then leaves the child one
            // entry short, and the block, which the child never got, mapped).
            PAUSER.set(true);
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
        for _ in 0..ROUNDS {
            FORKED.store(false, SeqCst);
            PAUSED.store(false, SeqCst);
            while !PAUSED.load(SeqCst) {
                std::thread::yield_now();
            }
            paused += 1;
            // SAFETY: the child only reads the heap's table and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let ok = heap.huge_entries_claimed() == 0;
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            FORKED.store(true, SeqCst);
            assert!(pid > 0, "fork failed");
            match watchdog::wait_child(pid, Duration::from_secs(5)) {
                Some(status) if !watchdog::exited_ok(status) => claimed += 1,
                Some(_) => {}
                None => {
                    hung += 1;
                    break;
                }
            }
        }
        stop.store(true, SeqCst);
        moves = mover.join().expect("the mover");
    });
    set_hook(None);
    println!(
        "{paused} forks while another thread's huge block moved ({moves} moves): \
         {claimed} children inherited a claimed entry, {hung} hung"
    );
    assert_eq!(hung, 0, "a forked child hung");
    assert_eq!(claimed, 0, "a forked child inherited a claimed entry");
    assert_eq!(heap.huge_entries_claimed(), 0, "an entry stayed claimed");
    assert_eq!(heap.stats().huge_in_use, 0, "the block was not freed");
}
