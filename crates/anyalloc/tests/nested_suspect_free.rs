//! A normal free in a nested context never waits for a node lock, even
//! when the object's key word sends it to the exact double-free check
//! (feature `interrupt-points`).
//!
//! A free whose object holds the heap's key in its key word (user data
//! that happens to equal it, or a real double free) runs `Cache::is_free`,
//! which looks in the barn and the slab's free list under the node and
//! barn locks.
//! A thread inside the allocator (a signal handler that interrupted its own
//! thread holding a waitable lock) takes the nolock route, which only
//! *tries* that lock. The check took the mode of the call as it came
//! (`Heap::free`, `free_sized`, `GlobalAlloc::dealloc`: normal) and waited
//! for the node lock there. If its holder is another thread waiting for a
//! lock that the interrupted context holds (here, thread B holds the node
//! lock and waits for thread A's handler to return, as a refill waiting for
//! the zone lock A holds would), that is a deadlock.
//!
//! The scenario: B drains (level-0 slot and the 64-byte class's node lock
//! held) and stops at `PartialLocked` until A is done. A allocates from
//! another class; at its own `PartialLocked` (that class's node lock held,
//! so A is nested) its hook frees, with `Heap::free`, a live 64-byte object
//! whose key word holds the key. Before the fix the free waited for B's
//! node lock for ever (the watchdog killed the child); now the check tries
//! the lock, finds nothing, and the free goes down the nolock route.
//!
//! Runs in a child under a watchdog, once with the fast path of the
//! platform and once with glibc's rseq off.

#![cfg(target_os = "linux")]

mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const SIZE: usize = 64;
/// Another class, for A's own allocation (its node lock is A's).
const OTHER: usize = 256;

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// The live object whose key word holds the key.
static FORGED: AtomicUsize = AtomicUsize::new(0);
static ARM_A: AtomicBool = AtomicBool::new(false);
static ARM_B: AtomicBool = AtomicBool::new(false);
static B_HOLDS: AtomicBool = AtomicBool::new(false);
static A_DONE: AtomicBool = AtomicBool::new(false);

const NONE: u8 = 0;
const ROLE_A: u8 = 1;
const ROLE_B: u8 = 2;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(NONE) };
}

fn heap() -> &'static Heap {
    // SAFETY: set to a leaked heap before the hook is installed.
    unsafe { &*HEAP.load(Ordering::SeqCst) }
}

fn hook(site: Site) {
    if site != Site::PartialLocked {
        return;
    }
    match ROLE.with(Cell::get) {
        ROLE_B if ARM_B.swap(false, Ordering::SeqCst) => {
            // B holds the 64-byte class's node lock: it waits for A, as a
            // refill waiting for the zone lock that A holds would.
            B_HOLDS.store(true, Ordering::SeqCst);
            while !A_DONE.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
        ROLE_A if ARM_A.swap(false, Ordering::SeqCst) => {
            // A holds another class's node lock: a handler here is nested.
            let p = NonNull::new(FORGED.load(Ordering::SeqCst) as *mut u8).unwrap();
            // SAFETY: a live object of this heap, freed once.
            unsafe { heap().free(p) };
            A_DONE.store(true, Ordering::SeqCst);
        }
        _ => {}
    }
}

fn scenario() {
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(64 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .unwrap(),
    ));
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::SeqCst);
    let layout = Layout::from_size_align(SIZE, 8).unwrap();

    // The key: the key word (the second) of a freed object, whose memory
    // stays mapped.
    let probe = heap.alloc(layout).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(probe) };
    // SAFETY: the freed object's memory stays mapped: read its key word.
    let key = unsafe { probe.as_ptr().add(8).cast::<usize>().read() };
    let forged = heap.alloc(layout).unwrap();
    // SAFETY: live, SIZE bytes, ours: user data equal to the key.
    unsafe { forged.as_ptr().add(8).cast::<usize>().write(key) };
    FORGED.store(forged.as_ptr() as usize, Ordering::SeqCst);
    // Objects in the class's slot, for B's drain to flush.
    let cached: Vec<_> = (0..8).map(|_| heap.alloc(layout).unwrap()).collect();
    for p in cached {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }

    set_hook(Some(hook));
    let b = std::thread::spawn(move || {
        ROLE.with(|r| r.set(ROLE_B));
        ARM_B.store(true, Ordering::SeqCst);
        heap.drain();
    });
    while !B_HOLDS.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    ROLE.with(|r| r.set(ROLE_A));
    ARM_A.store(true, Ordering::SeqCst);
    let other = heap
        .alloc(Layout::from_size_align(OTHER, 8).unwrap())
        .unwrap();
    ROLE.with(|r| r.set(NONE));
    assert!(A_DONE.load(Ordering::SeqCst), "A's hook did not run");
    b.join().unwrap();
    set_hook(None);

    // SAFETY: allocated above, freed once.
    unsafe { heap.free(other) };
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.objects_in_use, 0, "{s:?}");
    assert_eq!(s.pages.free_pages, s.pages.total_pages, "{s:?}");
    println!("done");
}

fn run(name: &str, env: &[(&str, &str)]) {
    if watchdog::in_child() {
        scenario();
        return;
    }
    let out = watchdog::run_ok(
        name,
        env,
        Duration::from_secs(20),
        "a nested free whose key word holds the key",
    );
    assert!(out.stdout.contains("done"), "{}", out.stdout);
}

#[test]
fn nested_suspect_free_does_not_wait_for_the_node_lock() {
    run("nested_suspect_free_does_not_wait_for_the_node_lock", &[]);
}

#[test]
fn nested_suspect_free_does_not_wait_for_the_node_lock_without_rseq() {
    run(
        "nested_suspect_free_does_not_wait_for_the_node_lock_without_rseq",
        &[watchdog::RSEQ_OFF],
    );
}
