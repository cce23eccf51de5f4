//! `fork` while another thread holds a per-CPU slot: the child must get
//! the slot back.
//!
//! A slot's holder may be waiting for a node or zone lock, which the fork's
//! prepare handler holds; the fork used to go ahead without the slot, so
//! the child inherited it held by a thread that does not exist there. The
//! child never waited for it (slots are try-only), but the objects or pages
//! in it stayed out of reach for good (`drain` skips a busy slot) and its
//! CPU's fast path stayed closed. Now prepare takes every slot first.
//!
//! Deterministic, with an interrupt point: a thread pauses inside a slot
//! section (a sheaf's slow free, `Site::SheafFree`, or a page list's slow
//! allocation, `Site::PcpAlloc`) of a private heap until the main thread
//! has forked, or for 50 ms. Without the slots taken, the fork happens
//! during the pause and the child finds the slot held: its `drain` leaves
//! the slot's objects cached, or (every thread on CPU 0) the slot's pages,
//! and no page comes to that CPU's list again. With them, the fork waits
//! for the pause to end, and the child gets every slot back.

mod common;
mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const ROUNDS: usize = 5;

thread_local! {
    /// Set on the thread that pauses inside its slot sections.
    static PAUSER: Cell<Option<Site>> = const { Cell::new(None) };
}
/// The pauser is inside a slot section, pausing (this round).
static PAUSED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned (this round).
static FORKED: AtomicBool = AtomicBool::new(false);

fn pause_in_slot_section(site: Site) {
    if PAUSER.get() != Some(site) || PAUSED.load(SeqCst) {
        return;
    }
    PAUSED.store(true, SeqCst);
    let until = Instant::now() + Duration::from_millis(50);
    while !FORKED.load(SeqCst) && Instant::now() < until {
        std::thread::yield_now();
    }
}

/// The child's check for objects: after its `drain`, no object is left
/// in a sheaf (a slot held by a thread that does not exist keeps its own).
fn sheaves_empty_after_drain(heap: &Heap) -> bool {
    heap.drain();
    heap.stats()
        .classes
        .iter()
        .all(|c| c.cached_in_sheaves == 0)
}

/// The child's check for pages (every thread runs on CPU 0): after its
/// `drain`, no page is left on a per-CPU list, and after pages come and
/// go, some are again (a held slot keeps its pages, and gets no others).
fn page_lists_usable(heap: &Heap) -> bool {
    heap.drain();
    let drained = heap.pages().stats().percpu_pages == 0;
    churn_pages(heap);
    drained && heap.pages().stats().percpu_pages > 0
}

/// Pins the calling thread (and the threads and children it makes) to
/// CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity get valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// Forks `ROUNDS` times while a thread running `churn` pauses at `site`;
/// returns how many children found a slot still held (`check` failed),
/// and the children that failed otherwise or hung.
fn fork_during(site: Site, churn: fn(&Heap), check: fn(&Heap) -> bool) -> (usize, usize) {
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let stop = AtomicBool::new(false);
    let (mut stuck, mut failed) = (0, 0);
    set_hook(Some(pause_in_slot_section));
    std::thread::scope(|s| {
        s.spawn(|| {
            PAUSER.set(Some(site));
            while !stop.load(SeqCst) {
                churn(&heap);
            }
        });
        for _ in 0..ROUNDS {
            FORKED.store(false, SeqCst);
            PAUSED.store(false, SeqCst);
            while !PAUSED.load(SeqCst) {
                std::thread::yield_now();
            }
            // SAFETY: the child uses the heap, reads its statistics and
            // _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = if check(&heap) { 0 } else { 3 };
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(code) };
            }
            FORKED.store(true, SeqCst);
            assert!(pid > 0, "fork failed");
            match watchdog::wait_child(pid, Duration::from_secs(5)) {
                Some(status) if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3 => {
                    stuck += 1
                }
                Some(status) if !watchdog::exited_ok(status) => failed += 1,
                Some(_) => {}
                None => failed += 1,
            }
        }
        stop.store(true, SeqCst);
    });
    set_hook(None);
    (stuck, failed)
}

/// Objects of 64 B each churn allocates, then frees: more than a sheaf of
/// that class holds (the test asserts it), so whatever the main sheaf held
/// before, the frees fill it and go on to the slow path, inside the slot.
/// With fewer than a sheaf's worth (200, when sheaves held 120 objects of
/// 64 B; they hold 240 now) a main sheaf that started with 200 or more
/// took every free, allocation and free balanced in it for good, no slow
/// path ran, and the test waited for the pause until its watchdog killed it.
const CHURN_OBJECTS: usize = 600;

/// `CHURN_OBJECTS` objects of 64 B allocated, then freed: the frees fill
/// the main sheaf and go on to the slow path, inside the slot.
fn churn_objects(heap: &Heap) {
    let l = Layout::from_size_align(64, 8).unwrap();
    let held: Vec<_> = (0..CHURN_OBJECTS)
        .map(|_| heap.alloc(l).expect("an object"))
        .collect();
    for p in held {
        // SAFETY: allocated above from this heap, freed once.
        unsafe { heap.free(p) };
    }
}

/// 200 pages allocated, then freed: the allocations empty this CPU's list
/// and go on to the slow path, inside the slot.
fn churn_pages(heap: &Heap) {
    let pages = heap.pages();
    let held: Vec<_> = (0..200)
        .map(|_| pages.alloc_pages(0).expect("a page"))
        .collect();
    for p in held {
        // SAFETY: allocated above, freed once with its order.
        unsafe { pages.free_pages(p, 0) };
    }
}

#[test]
fn fork_while_another_thread_holds_a_sheaf_slot() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_holds_a_sheaf_slot",
        Duration::from_secs(120),
        "fork while another thread holds a sheaf slot",
    ) {
        return;
    }
    let cap = common::sheaf_capacity(
        &Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap"),
        64,
    );
    assert!(
        cap < CHURN_OBJECTS,
        "a churn of {CHURN_OBJECTS} objects must overflow a sheaf of {cap}"
    );
    let (stuck, failed) = fork_during(Site::SheafFree, churn_objects, sheaves_empty_after_drain);
    println!("{ROUNDS} forks during a sheaf slot section: {stuck} children with a slot held, {failed} failed");
    assert_eq!(failed, 0);
    assert_eq!(
        stuck, 0,
        "a child inherited a sheaf slot held by another thread"
    );
}

#[test]
fn fork_while_another_thread_holds_a_page_list_slot() {
    if watchdog::ran_in_child(
        "fork_while_another_thread_holds_a_page_list_slot",
        Duration::from_secs(120),
        "fork while another thread holds a page list slot",
    ) {
        return;
    }
    pin_to_cpu0();
    let (stuck, failed) = fork_during(Site::PcpAlloc, churn_pages, page_lists_usable);
    println!("{ROUNDS} forks during a page list slot section: {stuck} children with a slot held, {failed} failed");
    assert_eq!(failed, 0);
    assert_eq!(
        stuck, 0,
        "a child inherited a page list slot held by another thread"
    );
}
