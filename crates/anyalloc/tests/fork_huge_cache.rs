//! The cache of freed huge mappings counted its bytes apart from its
//! slots: a free (a put) counted the bytes, then filled a slot; a huge
//! allocation (a take) emptied a slot, then took the bytes off. Neither
//! takes a lock, so a `fork` could clone a thread between the two. The
//! child then counted bytes that no slot held, for good: its
//! `huge_cached_bytes` stayed 8 MiB with the cache empty, through `trim`,
//! and the cache had that much less room there. (The bytes are now counted
//! from the slots.)
//!
//! Deterministic, with an interrupt point: a thread's free pauses at
//! `Site::HugeCached` (room found, no slot filled yet), or its huge
//! allocation (its slot emptied), while the main thread forks. The child's
//! count must be what its slots hold.

mod script;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// The huge blocks' size.
const SIZE: usize = 8 << 20;

/// Role 1 pauses at its first `HugeCached` (step 1) until the fork (step 2).
static SCRIPT: [Pause; 1] = [Pause::new(1, Site::HugeCached, 0, 2)];

fn heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .decay(false),
    )
    .expect("heap")
}

/// The child's check: its cache counts what its slots hold (nothing: the
/// paused step's slot was empty at the clone, or emptied), also after a
/// trim, and it keeps a freed huge block again.
fn child_counts_its_slots(heap: &Heap, layout: Layout) -> i32 {
    if heap.stats().huge_cached_bytes != 0 {
        return 3;
    }
    heap.trim();
    if heap.stats().huge_cached_bytes != 0 {
        return 4;
    }
    let p = heap.alloc(layout).expect("a huge block in the child");
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    if heap.stats().huge_cached_bytes != SIZE {
        return 5;
    }
    0
}

const WHAT: &str = "the child's huge_cached_bytes counted a mapping no slot holds: \
                    after the fork (3), after a trim (4), or after a free of its own (5)";

#[test]
fn fork_between_a_put_and_its_slot() {
    if watchdog::ran_in_child(
        "fork_between_a_put_and_its_slot",
        Duration::from_secs(60),
        "fork between a kept huge mapping's count and its slot",
    ) {
        return;
    }
    let heap = heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let block = heap.alloc(layout).expect("a huge block").as_ptr() as usize;
    script::play(&SCRIPT);
    let status = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(NonNull::new(block as *mut u8).unwrap()) };
        });
        script::reached(1, "the free paused, its bytes counted in the cache");
        let status = script::fork_child(2, || child_counts_its_slots(&heap, layout));
        t.join().unwrap();
        status
    });
    script::end();
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_cached_bytes), (0, SIZE));
    script::assert_child_ok(status, WHAT);
}

#[test]
fn fork_between_a_take_and_its_count() {
    if watchdog::ran_in_child(
        "fork_between_a_take_and_its_count",
        Duration::from_secs(60),
        "fork between a kept huge mapping's take and its count",
    ) {
        return;
    }
    let heap = heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let p = heap.alloc(layout).expect("a huge block");
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(p) };
    assert_eq!(
        heap.stats().huge_cached_bytes,
        SIZE,
        "the freed block is kept"
    );
    script::play(&SCRIPT);
    let (status, block) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            heap.alloc(layout).expect("the kept block").as_ptr() as usize
        });
        script::reached(1, "the allocation paused, its slot emptied");
        let status = script::fork_child(2, || child_counts_its_slots(&heap, layout));
        (status, t.join().unwrap())
    });
    script::end();
    assert_eq!(heap.stats().huge_cached_bytes, 0);
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(NonNull::new(block as *mut u8).unwrap()) };
    let s = heap.stats();
    assert_eq!((s.huge_in_use, s.huge_cached_bytes), (0, SIZE));
    script::assert_child_ok(status, WHAT);
}

/// Armed: the next `HugeCached` on the thread that armed it forks there.
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The pid `fork` returned at the site (-1: none yet).
static FORKED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn fork_at_the_site(site: Site) {
    use std::sync::atomic::Ordering::SeqCst;
    if site == Site::HugeCached && ARMED.swap(false, SeqCst) {
        // SAFETY: the child only finishes the free, reads statistics,
        // allocates and frees on this heap, and _exits.
        FORKED.store(unsafe { libc::fork() }, SeqCst);
    }
}

/// A signal handler that forks may interrupt a put on the forking thread
/// itself (no lock is held there, so its fork is an ordinary one): the
/// child's only thread then finishes the put after the fork handlers ran.
/// A count of the cache's bytes recounted in the child's handler would
/// miss that mapping (and a take of it would wrap the count below zero).
/// The hook forks at the site, as such a handler would.
#[test]
fn a_fork_inside_a_put_on_its_own_thread() {
    use std::sync::atomic::Ordering::SeqCst;
    if watchdog::ran_in_child(
        "a_fork_inside_a_put_on_its_own_thread",
        Duration::from_secs(60),
        "fork inside a put, on the putting thread",
    ) {
        return;
    }
    let heap = heap();
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let p = heap.alloc(layout).expect("a huge block");
    ARMED.store(true, SeqCst);
    anyalloc::interrupt::set_hook(Some(fork_at_the_site));
    // SAFETY: allocated above, freed once (in the parent, and in the child
    // its copy).
    unsafe { heap.free(p) };
    anyalloc::interrupt::set_hook(None);
    let pid = FORKED.load(SeqCst);
    assert!(
        pid >= 0,
        "the free did not reach Site::HugeCached, or fork failed"
    );
    if pid == 0 {
        let code = if heap.stats().huge_cached_bytes != SIZE {
            3
        } else {
            // Takes the kept mapping, then keeps it again.
            let q = heap.alloc(layout).expect("the kept block");
            let taken = heap.stats().huge_cached_bytes;
            // SAFETY: allocated just above, freed once.
            unsafe { heap.free(q) };
            if taken != 0 || heap.stats().huge_cached_bytes != SIZE {
                4
            } else {
                0
            }
        };
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
    assert_eq!(heap.stats().huge_cached_bytes, SIZE);
    script::assert_child_ok(
        status,
        "the child's huge_cached_bytes missed the mapping its put kept (3), or a take and a put of it went wrong (4)",
    );
}
