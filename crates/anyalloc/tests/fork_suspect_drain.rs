//! `fork` while another thread's normal path drains a cache's parked
//! double-free suspects: the child must not lose the suspects the drain
//! had taken.
//!
//! A nolock free whose object holds the heap's key in its key word, when
//! the exact double-free check cannot take the node lock, parks the object
//! on the cache's `suspects` stack; the next normal drain
//! (`Cache::drain_suspects`) takes the whole stack (`take_all`) and checks
//! each object again, with the lock. A fork cloned during that walk left
//! the child the rest of the chain in the hands of a thread it does not
//! have: the objects were on no stack there, never freed, counted in
//! `objects_in_use` for good. The drain now counts itself as a taker, as
//! the deferred stack's drains do (a fork waits for it), and one that
//! starts while a fork is in progress leaves the stack alone.
//!
//! Deterministic, with interrupt points, on a heap with one CPU slot set
//! and without restartable sequences: the main thread's drain returns an
//! object to its slab with the node lock held (`Site::PartialLocked`),
//! where its hook frees `K` live objects holding the key with the nolock
//! free (as a signal handler would): each is parked. Then thread D
//! allocates until its slow path (`Cache::drain_and_reopen`) drains the
//! suspects, and pauses inside their walk (`Site::ObjectDeferredDrain`,
//! the chain taken) until the main thread has forked, or for 200 ms (less
//! than the fork's patience). The child drains: the suspects (user data
//! that equalled the key, not double frees) must be freed there, leaving
//! in use only D's allocations made before the fork (and perhaps the one
//! whose slow path drained, if it completed before the clone).

mod script;
mod watchdog;

use watchdog::wait_for;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::Heap;

const SIZE: usize = 64;
/// The parked suspects.
const K: usize = 16;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// The live objects whose key words hold the key.
static VICTIMS: [AtomicUsize; K] = [const { AtomicUsize::new(0) }; K];
/// The hook frees the victims at the next `PartialLocked`.
static PARK: AtomicBool = AtomicBool::new(false);
/// D paused in the suspects' walk.
static PAUSED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned.
static FORKED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// D, the drainer.
    static DRAINER: Cell<bool> = const { Cell::new(false) };
}

fn hook(site: Site) {
    if site == Site::PartialLocked && PARK.swap(false, SeqCst) {
        // SAFETY: set before the hook is installed; lives to the end.
        let heap = unsafe { &*HEAP.load(SeqCst) };
        for v in &VICTIMS {
            let p = NonNull::new(v.load(SeqCst) as *mut u8).unwrap();
            // SAFETY: a live object of this heap, freed once.
            unsafe { heap.free_nolock(p) };
        }
    }
    if site == Site::ObjectDeferredDrain && DRAINER.get() && !PAUSED.swap(true, SeqCst) {
        // Less than the fork's wait for drains in progress.
        let until = Instant::now() + Duration::from_millis(200);
        while !FORKED.load(SeqCst) && Instant::now() < until {
            std::thread::yield_now();
        }
    }
}

#[test]
fn fork_while_another_thread_drains_suspects() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_drains_suspects",
        Duration::from_secs(60),
        "fork while another thread drains parked suspects",
    ) {
        return;
    }
    let heap = script::one_slot_heap();
    HEAP.store(&heap as *const Heap as *mut Heap, SeqCst);
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    // The key: the key word (the second) of a freed object, whose memory
    // stays mapped.
    let probe = heap.alloc(layout).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(probe) };
    // SAFETY: the freed object's memory stays mapped: read its key word.
    let key = unsafe { probe.as_ptr().add(8).cast::<usize>().read() };
    for v in &VICTIMS {
        let p = heap.alloc(layout).unwrap();
        // SAFETY: live, SIZE bytes, ours: user data equal to the key.
        unsafe { p.as_ptr().add(8).cast::<usize>().write(key) };
        v.store(p.as_ptr() as usize, SeqCst);
    }
    // One object in the slot, for the drain to return to its slab.
    let x = heap.alloc(layout).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(x) };
    set_hook(Some(hook));
    PARK.store(true, SeqCst);
    heap.drain();
    assert!(!PARK.load(SeqCst), "the hook did not free the victims");
    assert_eq!(
        script::class_counts(&heap, SIZE),
        (K, 0),
        "the victims were not parked"
    );
    let (status, mine) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            DRAINER.set(true);
            let mut mine = Vec::new();
            // Until the slow path drains (the pause), and that allocation.
            while !PAUSED.load(SeqCst) {
                mine.push(heap.alloc(layout).expect("an object").as_ptr() as usize);
            }
            mine
        });
        wait_for(|| PAUSED.load(SeqCst));
        assert!(PAUSED.load(SeqCst), "the drain did not pause");
        // In use at the fork: the suspects, and D's allocations so far.
        let (in_use, _) = script::class_counts(&heap, SIZE);
        // SAFETY: the child uses the heap and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            heap.drain();
            let (now, deferred) = script::class_counts(&heap, SIZE);
            // (D's allocation may have completed before the clone.)
            let ok = deferred == 0 && (now + K == in_use || now + K == in_use + 1);
            if !ok {
                eprintln!(
                    "child: {now} objects in use, {in_use} at the fork ({K} suspects), \
                     {deferred} deferred"
                );
            }
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if ok { 0 } else { 3 }) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
        (status, d.join().unwrap())
    });
    set_hook(None);
    for p in mine {
        // SAFETY: allocated by D, freed once.
        unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
    }
    heap.drain();
    assert_eq!(script::class_counts(&heap, SIZE), (0, 0));
    script::assert_child_ok(status, "the child lost the suspects being drained (3)");
    println!("the child freed the {K} suspects");
}
