//! A double free of an 8-byte object parked at the bottom of its cache's
//! deferred stack must abort as a double free.
//!
//! A tiny object's key word is its first word, which on the deferred stack
//! is its link XOR the heap's key; the bottom object's link is the end of
//! the stack (`NIL`), so its first word XOR the key is `NIL`, neither the
//! key nor a heap address. The fast path's quick key test must still send
//! that free to the exact check (without its `NIL` case it pushed the
//! object into a sheaf while it stayed parked, and the free returned: 1 of
//! 1 in a build without `debug-checks`, whose allocation bitmap catches
//! every double free on its own).
//!
//! Parking is made deterministic with interrupt points, as in
//! `heap_deferred_gate`: normal frees until one flushes a sheaf (the
//! level-0 slot and the node lock held), and nolock frees inside the flush,
//! more than the other level slots take. The scenario runs in a child
//! process (`tests/watchdog`), which must die of `SIGABRT` with one line.

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
/// Objects the flush's hook frees on the nolock path.
static TO_PARK: [AtomicUsize; 1024] = [const { AtomicUsize::new(0) }; 1024];
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

/// The child's scenario: parks objects, finds the stack's bottom one and
/// frees it again (on the nolock path, whose fast path the gate leaves
/// open). Returns only if that free returned.
fn double_free_the_bottom_object() {
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap(),
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
    for p in &TO_PARK {
        p.store(h.alloc(layout()).unwrap().as_ptr() as usize, Relaxed);
    }
    let mut objs: Vec<NonNull<u8>> = (0..4000).map(|_| h.alloc(layout()).unwrap()).collect();
    set_hook(Some(hook));
    while !PARKED.load(Relaxed) {
        let p = objs.pop().expect("no free flushed a sheaf");
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    set_hook(None);
    // The bottom of the deferred stack: its link is the end (`NIL`).
    let bottom = TO_PARK
        .iter()
        .map(|p| p.load(Relaxed))
        // SAFETY: freed objects of this heap: their memory stays mapped.
        .find(|&p| unsafe { (p as *const usize).read() } ^ key == usize::MAX)
        .expect("no object parked at the bottom of the deferred stack");
    // SAFETY: deliberately a double free: the heap must detect it and abort.
    unsafe { h.free_nolock(NonNull::new(bottom as *mut u8).unwrap()) };
}

#[test]
fn double_free_of_a_tiny_object_at_the_bottom_of_the_deferred_stack_aborts() {
    const TEST: &str = "double_free_of_a_tiny_object_at_the_bottom_of_the_deferred_stack_aborts";
    if std::env::var(VAR).as_deref() == Ok(TEST) {
        double_free_the_bottom_object();
        eprintln!("survived: the double free returned");
        std::process::exit(SURVIVED);
    }
    let out = watchdog::run(TEST, &[(VAR, TEST)], Duration::from_secs(60), TEST);
    let line = watchdog::assert_aborted_with(&out, TEST, "double free of object");
    println!("{TEST}: aborted with: {line}");
}
