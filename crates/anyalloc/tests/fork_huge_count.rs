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

mod watchdog;

use watchdog::wait_for;

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The huge allocation's size.
const SIZE: usize = 8 << 20;

thread_local! {
    /// Whether this thread is the allocating one.
    static ALLOCATOR: Cell<bool> = const { Cell::new(false) };
}
/// 0: armed; 1: the allocation is registered and paused.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    if site == Site::HugeCount && ALLOCATOR.get() && STEP.load(SeqCst) == 0 {
        STEP.store(1, SeqCst);
        wait_for(|| FORKED.load(SeqCst));
    }
}

#[test]
fn fork_between_a_huge_allocation_and_its_count() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_between_a_huge_allocation_and_its_count",
            &[],
            Duration::from_secs(60),
            "fork between a huge allocation's registration and its count",
        );
        print!("{}", out.stdout);
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    set_hook(Some(hook));
    let (status, block) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            ALLOCATOR.set(true);
            heap.alloc(layout).expect("a huge block").as_ptr() as usize
        });
        wait_for(|| STEP.load(SeqCst) == 1);
        assert_eq!(STEP.load(SeqCst), 1, "the allocation did not pause");
        // SAFETY: the child reads the heap's statistics and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let s = heap.stats();
            let code = if s.huge_in_use != 1 {
                3
            } else if s.huge_bytes != SIZE {
                4
            } else {
                0
            };
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        (status, t.join().unwrap())
    });
    set_hook(None);
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(std::ptr::NonNull::new(block as *mut u8).unwrap()) };
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_bytes), (0, 0));
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's statistics missed the registered block: huge_in_use (3) or huge_bytes (4)"
    );
}
