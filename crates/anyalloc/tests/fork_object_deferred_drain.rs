//! `fork` while another thread's normal path drains a cache's deferred
//! objects: the child must not lose the objects the drain had taken.
//!
//! A normal allocation or free that reaches its slow path first frees the
//! objects that nolock frees parked on the cache's deferred stack
//! (`Cache::drain_and_reopen`): it takes the whole stack (`take_all`), then
//! frees the objects one by one, and holds no lock meanwhile. A fork
//! cloned during that walk left the child the rest of the chain in the
//! hands of a thread it does not have: the objects were on no stack, no
//! sheaf and no slab there, lost for good, and (once the child recounted
//! its deferred objects from the stack) counted in `objects_in_use`. A
//! fork now waits for such drains in progress, and a drain that starts
//! while a fork is in progress leaves the stack alone.
//!
//! Deterministic, with interrupt points, on a heap with one CPU slot set
//! and without restartable sequences (every thread uses the same slots):
//! thread H's normal allocation holds the level-0 slot and the node lock
//! (paused at `Site::SheafRefill`), threads T1 and T2's nolock allocations
//! hold the level-1 and level-2 slots (paused at `Site::SheafAlloc`), and
//! thread B's nolock frees of `N` objects, finding all of them busy, park
//! them on the deferred stack. Then thread D allocates until its slow path
//! drains the stack, and pauses at `Site::ObjectDeferredDrain` (the chain
//! taken) until the main thread has forked, or for 200 ms (less than the
//! fork's patience). The child drains and must count in use only what was
//! in use at the fork (D's last allocation may have completed).

mod watchdog;

use watchdog::wait_for;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const SIZE: usize = 64;
/// The objects parked on the deferred stack (more than H's refill takes
/// off it when it goes on).
const N: usize = 512;

thread_local! {
    /// 1: H (level 0 and the node lock); 2, 3: T1, T2 (levels 1, 2);
    /// 5: D, the drainer.
    static ROLE: Cell<usize> = const { Cell::new(0) };
}
/// How many of the roles are paused, in order (role r pauses at step r;
/// step 4: B's frees are parked).
static STEP: AtomicUsize = AtomicUsize::new(0);
/// H, T1 and T2 may go on.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    let role = ROLE.get();
    let at = match role {
        1 => Site::SheafRefill,
        2 | 3 => Site::SheafAlloc,
        5 => Site::ObjectDeferredDrain,
        _ => return,
    };
    if site == at && STEP.load(SeqCst) == role - 1 {
        STEP.store(role, SeqCst);
        if role == 5 {
            // Less than the fork's wait for drains in progress.
            let until = Instant::now() + Duration::from_millis(200);
            while !FORKED.load(SeqCst) && Instant::now() < until {
                std::thread::yield_now();
            }
        } else {
            wait_for(|| RELEASED.load(SeqCst));
        }
    }
}

/// The class's statistics: (objects in use, deferred objects).
fn class(heap: &Heap) -> (usize, usize) {
    let s = heap.stats();
    let c = s.classes.iter().find(|c| c.size >= SIZE).unwrap();
    (c.objects_in_use, c.deferred)
}

#[test]
fn fork_while_another_thread_drains_deferred_objects() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_while_another_thread_drains_deferred_objects",
            &[],
            Duration::from_secs(60),
            "fork while another thread drains deferred objects",
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
    let victims: Vec<usize> = (0..N)
        .map(|_| heap.alloc(layout).expect("an object").as_ptr() as usize)
        .collect();
    // Every cached object back to its slab: H's allocation refills.
    heap.drain();
    set_hook(Some(hook));
    let (status, held, mine) = std::thread::scope(|s| {
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
        wait_for(|| STEP.load(SeqCst) == 3);
        assert_eq!(STEP.load(SeqCst), 3, "the slots and node lock are not held");
        s.spawn(|| {
            for &v in &victims {
                // SAFETY: allocated by the main thread, freed once.
                unsafe { heap.free_nolock(NonNull::new(v as *mut u8).unwrap()) };
            }
        })
        .join()
        .unwrap();
        assert_eq!(class(&heap).1, N, "the frees were not all deferred");
        STEP.store(4, SeqCst);
        RELEASED.store(true, SeqCst);
        let held: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let parked = class(&heap).1;
        println!("{parked} objects still parked after the holders went on");
        assert!(parked >= 8, "the deferred objects were drained early");
        let d = s.spawn(|| {
            ROLE.set(5);
            let mut mine = Vec::new();
            // Until the slow path drains (the pause), and that allocation.
            while STEP.load(SeqCst) != 5 {
                mine.push(heap.alloc(layout).expect("an object").as_ptr() as usize);
            }
            mine
        });
        wait_for(|| STEP.load(SeqCst) == 5);
        assert_eq!(STEP.load(SeqCst), 5, "the drain did not pause");
        // In use at the fork: D's allocations so far, H's, T1's and T2's.
        let (in_use, _) = class(&heap);
        // SAFETY: the child uses the heap and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            heap.drain();
            let (now, deferred) = class(&heap);
            let ok = deferred == 0 && (now == in_use || now == in_use + 1);
            if !ok {
                eprintln!("child: {now} objects in use, {in_use} at the fork, {deferred} deferred");
            }
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if ok { 0 } else { 3 }) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        let mine = d.join().unwrap();
        (status, held, mine)
    });
    set_hook(None);
    for p in held.into_iter().chain(mine).filter(|&p| p != 0) {
        // SAFETY: allocated by a thread above, freed once.
        unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
    }
    heap.drain();
    assert_eq!(class(&heap), (0, 0));
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child lost the deferred objects being drained (3)"
    );
}
