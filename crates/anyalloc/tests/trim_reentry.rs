//! `Heap::trim` from a context that interrupted the allocator does nothing
//! (like `drain` and `maintain`), instead of aborting.
//!
//! A handler that interrupted a thread holding the page allocator's drain
//! lock (inside `trim`, a maintenance pass, or the drain of an allocation's
//! reclaim) and called `trim` skipped the drain (nested) but then waited for
//! the drain lock its own thread held: the lock's self-deadlock check
//! aborted the process ("a thread waited for a lock it holds itself").
//! `malloc_trim` of `libanyalloc.so` reaches it the same way from a handler
//! that interrupted `malloc`'s reclaim.
//!
//! Deterministic with an interrupt point (feature `interrupt-points`): the
//! hook at `ReleaseWindow` (drain lock held, zone lock dropped) calls
//! `trim`. Runs in a child under the watchdog.

mod release_window;
mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Heap, MAX_ORDER};

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static ARMED: AtomicBool = AtomicBool::new(false);
/// What the nested `trim` returned (+1; 0: it did not run).
static NESTED: AtomicUsize = AtomicUsize::new(0);

fn hook(site: Site) {
    if site != Site::ReleaseWindow || !ARMED.swap(false, Ordering::Relaxed) {
        return;
    }
    // SAFETY: set before the hook is installed; the heap is leaked.
    let heap = unsafe { &*HEAP.load(Ordering::Acquire) };
    NESTED.store(heap.trim() + 1, Ordering::Relaxed);
}

fn scenario(outer: &str) {
    let (heap, _) = release_window::heap_with_a_block_to_release();
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    ARMED.store(true, Ordering::Relaxed);
    set_hook(Some(hook));
    let released = match outer {
        "trim" => heap.trim(),
        _ => {
            for _ in 0..3 {
                heap.maintain();
            }
            heap.stats().released_to_os_bytes as usize
        }
    };
    set_hook(None);
    let nested = NESTED.load(Ordering::Relaxed);
    assert_eq!(nested, 1, "the nested trim ran and returned 0");
    assert!(released >= 4096 << MAX_ORDER, "the outer call released");
    println!("SURVIVED {outer}");
}

fn check(name: &str, outer: &str) {
    let out = watchdog::run_ok(
        name,
        &[("TRIM_OUTER", outer)],
        Duration::from_secs(60),
        "trim inside a trim or maintenance pass",
    );
    assert!(out.stdout.contains("SURVIVED"), "{}", out.stdout);
}

#[test]
fn trim_interrupting_a_trim_does_nothing() {
    if watchdog::in_child() {
        scenario(&std::env::var("TRIM_OUTER").unwrap());
        return;
    }
    check("trim_interrupting_a_trim_does_nothing", "trim");
}

#[test]
fn trim_interrupting_a_maintenance_pass_does_nothing() {
    if watchdog::in_child() {
        scenario(&std::env::var("TRIM_OUTER").unwrap());
        return;
    }
    check(
        "trim_interrupting_a_maintenance_pass_does_nothing",
        "maintain",
    );
}
