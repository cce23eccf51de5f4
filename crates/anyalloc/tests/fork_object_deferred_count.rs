//! `fork` while another thread's nolock free of an object is between its
//! count and its push onto the cache's deferred stack: the child's count of
//! deferred objects must match its stack.
//!
//! A nolock free that finds every slot of its CPU and the cache's node
//! lock busy parks the object on the cache's deferred stack: it counts it
//! (the class's `deferred`, which `objects_in_use` subtracts), then pushes
//! it. Neither step takes a lock the fork holds, so a clone between them
//! left the child a count for an object on no stack, for good: its drain
//! never took it off, and the class's `objects_in_use` stayed one short.
//!
//! Deterministic, with interrupt points, on a heap with one CPU slot set
//! and without restartable sequences (every thread uses the same slots):
//! thread H's normal allocation holds the level-0 slot and the node lock
//! (paused at `Site::SheafRefill`), threads T1 and T2's nolock allocations
//! hold the level-1 and level-2 slots (paused at `Site::SheafAlloc`), and
//! thread B's nolock free, finding all of them busy, pauses at
//! `Site::ObjectDeferredPush` (counted, not yet pushed) while the main
//! thread forks. The child drains and must find no deferred object left.

mod watchdog;

use watchdog::wait_for;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const SIZE: usize = 64;

thread_local! {
    /// 1: H (level 0 and the node lock); 2, 3: T1, T2 (levels 1, 2); 4: B.
    static ROLE: Cell<usize> = const { Cell::new(0) };
}
/// How many of the roles are paused, in order (role r pauses at step r).
static STEP: AtomicUsize = AtomicUsize::new(0);
/// B's free is parked: H, T1 and T2 may go on (before the fork, which
/// waits for the node lock H holds).
static RELEASED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    let role = ROLE.get();
    let at = match role {
        1 => Site::SheafRefill,
        2 | 3 => Site::SheafAlloc,
        4 => Site::ObjectDeferredPush,
        _ => return,
    };
    if site == at && STEP.load(SeqCst) == role - 1 {
        STEP.store(role, SeqCst);
        if role == 4 {
            wait_for(|| FORKED.load(SeqCst));
        } else {
            wait_for(|| RELEASED.load(SeqCst));
        }
    }
}

/// The class's deferred objects.
fn deferred(heap: &Heap) -> usize {
    let s = heap.stats();
    s.classes.iter().find(|c| c.size >= SIZE).unwrap().deferred
}

#[test]
fn fork_between_a_deferred_object_free_count_and_its_push() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_between_a_deferred_object_free_count_and_its_push",
            &[],
            Duration::from_secs(60),
            "fork between a deferred object free's count and its push",
        );
        print!("{}", out.stdout);
        return;
    }
    let config = Config::default()
        .memory(64 << 20)
        .cpus(1)
        .rseq(false)
        .maintenance(false);
    let heap = Heap::new(config).expect("heap");
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let victim = heap.alloc(layout).expect("an object").as_ptr() as usize;
    // Every cached object back to its slab: H's allocation refills.
    heap.drain();
    set_hook(Some(hook));
    let (status, held) = std::thread::scope(|s| {
        let mut threads = Vec::new();
        for role in 1..=3 {
            let heap = &heap;
            threads.push(s.spawn(move || {
                ROLE.set(role);
                wait_for(|| STEP.load(SeqCst) == role - 1);
                let p = if role == 1 {
                    heap.alloc(layout)
                } else {
                    heap.alloc_nolock(layout)
                };
                p.map_or(0, |p| p.as_ptr() as usize)
            }));
        }
        let b = s.spawn(|| {
            ROLE.set(4);
            wait_for(|| STEP.load(SeqCst) == 3);
            // SAFETY: allocated by the main thread, freed once.
            unsafe { heap.free_nolock(NonNull::new(victim as *mut u8).unwrap()) };
        });
        wait_for(|| STEP.load(SeqCst) == 4);
        assert_eq!(
            STEP.load(SeqCst),
            4,
            "the scenario stopped at step {} (1: H holds the node lock, 2, 3: T1, T2 \
             hold the upper slots, 4: B's free is counted, not pushed)",
            STEP.load(SeqCst)
        );
        // H, T1 and T2 finish (the fork waits for the locks they hold);
        // B stays between its count and its push.
        RELEASED.store(true, SeqCst);
        let held: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(!FORKED.load(SeqCst) && STEP.load(SeqCst) == 4);
        // SAFETY: the child uses the heap and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            heap.drain();
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if deferred(&heap) != 0 { 3 } else { 0 }) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        b.join().unwrap();
        (status, held)
    });
    set_hook(None);
    for p in held.into_iter().filter(|&p| p != 0) {
        // SAFETY: allocated by a role thread above, freed once.
        unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
    }
    heap.drain();
    assert_eq!(deferred(&heap), 0);
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's drain left a deferred object counted (3)"
    );
}
