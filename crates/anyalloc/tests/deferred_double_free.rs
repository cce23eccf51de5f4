//! A double free of an 8-byte object parked on its cache's deferred stack
//! must abort as a double free.
//!
//! A tiny object's key word is its first word, which on the deferred stack
//! is its link XOR the heap's key: the end of the stack (`NIL`) or another
//! parked object, which may lie in another zone. Each must make the free
//! suspect and run the exact check. Without one of these cases the free
//! pushed the object into a sheaf while it stayed parked, and returned (1
//! of 1 each, in a build without `debug-checks`, whose allocation bitmap
//! catches every double free on its own):
//!
//! - the bottom object (its link `NIL`), freed on the fast path: the
//!   quick key test's `NIL` case (`Cache::check_free_quick`);
//! - an object of the first zone linked to one of a second zone, freed on
//!   the fast path: the quick test's "more than one zone" case;
//! - an object of the second zone linked to one of the first, freed on
//!   the general path: `Cache::tiny_suspect`'s "another zone" case.
//!
//! Parking is made deterministic with interrupt points, as in
//! `heap_deferred_gate`: normal frees until one flushes a sheaf to the
//! slabs (the barn full of full sheaves; the level-0 slot and the node lock
//! held), and nolock frees inside the flush, about three times what the
//! other level slots take. The zones' objects are parked
//! alternately. Each scenario runs in a child process (`tests/watchdog`),
//! which must die of `SIGABRT` with one line.

mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const VAR: &str = "ANYALLOC_DEFERRED_DOUBLE_FREE";
/// Exit code of a child whose double free returned.
const SURVIVED: i32 = 42;
const SIZE: usize = 8;

static HEAP: AtomicUsize = AtomicUsize::new(0);
/// Objects the flush's hook frees on the nolock path: this CPU's other
/// level slots take 1016 of them (two levels, a main and a spare sheaf of
/// 254 each), the rest are parked. (With 1024, only 8 were: enough for
/// each scenario's victim, with no margin.)
static TO_PARK: [AtomicUsize; 4096] = [const { AtomicUsize::new(0) }; 4096];
/// The hook acted (once).
static PARKED: AtomicBool = AtomicBool::new(false);

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

fn heap() -> &'static Heap {
    // SAFETY: set (leaked) before the hook is installed.
    unsafe { &*(HEAP.load(Relaxed) as *const Heap) }
}

fn hook(site: Site) {
    if site != Site::SheafFlush || PARKED.swap(true, Relaxed) {
        return;
    }
    for p in &TO_PARK {
        if let Some(p) = NonNull::new(p.load(Relaxed) as *mut u8) {
            // SAFETY: a live object of this heap, freed once here.
            unsafe { heap().free_nolock(p) };
        }
    }
}

/// Which parked object a scenario frees again.
#[derive(Clone, Copy, PartialEq)]
enum Victim {
    /// The bottom of the stack.
    Bottom,
    /// A first-zone object linked to a second-zone one.
    FirstToSecond,
    /// A second-zone object linked to a first-zone one.
    SecondToFirst,
}

/// The child's scenario: parks objects, finds the `victim` and frees it
/// again (on the nolock path, whose fast path the gate leaves open).
/// Returns only if that free returned.
fn double_free_a_parked_object(victim: Victim) {
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(4 << 20).maintenance(false)).unwrap(),
    ));
    HEAP.store(h as *const Heap as usize, Relaxed);
    assert!(anyalloc_storm::thread::pin_to_cpu(
        anyalloc_storm::thread::current_cpu()
    ));
    // The key: the first word of a freed 8-byte object in a sheaf.
    let probe = h.alloc(layout()).unwrap();
    // SAFETY: allocated just above, freed once.
    unsafe { h.free(probe) };
    // SAFETY: the freed object's memory stays mapped.
    let key = unsafe { probe.as_ptr().cast::<usize>().read() };
    // First-zone objects; then (but for `Bottom`, whose object must be
    // one of the first zone, the only one the fast path serves) the first
    // zone filled until the heap grows (its slabs full, so what follows
    // comes from the second zone's), and second-zone objects, parked
    // alternately with the first.
    let alloc = |n| -> Vec<usize> {
        (0..n)
            .map(|_| h.alloc(layout()).unwrap().as_ptr() as usize)
            .collect()
    };
    let (first, second) = if victim == Victim::Bottom {
        (alloc(TO_PARK.len()), Vec::new())
    } else {
        let first = alloc(TO_PARK.len() / 2);
        let mut filler = Vec::new();
        while h.pages().stats().zones == 1 {
            filler.push(h.alloc(layout()).unwrap());
            assert!(filler.len() < 1 << 20, "the heap did not grow");
        }
        (first, alloc(TO_PARK.len() / 2))
    };
    for (i, p) in TO_PARK.iter().enumerate() {
        let p_i = match (victim, i % 2) {
            (Victim::Bottom, _) => first[i],
            (_, 0) => second[i / 2],
            _ => first[i / 2],
        };
        p.store(p_i, Relaxed);
    }
    // More than the slot's sheaves and the barn's hold (about 4600).
    let mut objs: Vec<NonNull<u8>> = (0..8000).map(|_| h.alloc(layout()).unwrap()).collect();
    set_hook(Some(hook));
    while !PARKED.load(Relaxed) {
        let p = objs.pop().expect("no free flushed a sheaf");
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    set_hook(None);
    // SAFETY: freed objects of this heap: their memory stays mapped.
    let link = |p: usize| unsafe { (p as *const usize).read() } ^ key;
    let (from, to): (&[usize], &[usize]) = match victim {
        Victim::Bottom => (&first, &[]),
        Victim::FirstToSecond => (&first, &second),
        Victim::SecondToFirst => (&second, &first),
    };
    let found = from
        .iter()
        .copied()
        .find(|&p| match victim {
            Victim::Bottom => link(p) == usize::MAX,
            _ => to.contains(&link(p)),
        })
        .expect("no such object parked");
    // SAFETY: deliberately a double free: the heap must detect it and abort.
    unsafe { h.free_nolock(NonNull::new(found as *mut u8).unwrap()) };
}

/// Runs `victim`'s scenario in a child (`test`), which must abort.
fn expect_abort(test: &str, victim: Victim) {
    if std::env::var(VAR).as_deref() == Ok(test) {
        double_free_a_parked_object(victim);
        eprintln!("survived: the double free returned");
        std::process::exit(SURVIVED);
    }
    let out = watchdog::run(test, &[(VAR, test)], Duration::from_secs(60), test);
    let line = watchdog::assert_aborted_with(&out, test, "double free of object");
    println!("{test}: aborted with: {line}");
}

#[test]
fn double_free_of_a_tiny_object_at_the_bottom_of_the_deferred_stack_aborts() {
    expect_abort(
        "double_free_of_a_tiny_object_at_the_bottom_of_the_deferred_stack_aborts",
        Victim::Bottom,
    );
}

#[test]
fn double_free_of_a_parked_tiny_object_linked_to_another_zone_aborts() {
    expect_abort(
        "double_free_of_a_parked_tiny_object_linked_to_another_zone_aborts",
        Victim::FirstToSecond,
    );
}

#[test]
fn double_free_of_a_parked_tiny_object_of_a_later_zone_linked_to_the_first_aborts() {
    expect_abort(
        "double_free_of_a_parked_tiny_object_of_a_later_zone_linked_to_the_first_aborts",
        Victim::SecondToFirst,
    );
}
