//! A heap dropped by a thread with a `pthread_cancel` pending is dropped
//! whole. The drop stops and joins the heap's maintenance thread, and
//! `pthread_join` is a cancellation point: the pending cancel acted there,
//! inside the drop. Here glibc's forced unwind found no way through the
//! Rust frames and aborted the process; unwound, the rest of the drop
//! would never have run, the heap's zones mapped for good. The join now
//! runs with cancellation disabled, restored after it: the cancel acts at
//! the thread's next cancellation point after the drop.
//!
//! In a child (it reads the process's mappings, which no other test
//! thread may change meanwhile): the worker thread drops a heap with a
//! maintenance thread while a cancel is pending; once the worker is
//! joined, no byte of the heap's first zone may be mapped.

mod maps;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use anyalloc::{Config, Heap};

extern "C" {
    fn pthread_setcancelstate(state: libc::c_int, old: *mut libc::c_int) -> libc::c_int;
}
/// As in glibc's and musl's `pthread.h`.
const PTHREAD_CANCEL_ENABLE: libc::c_int = 0;
const PTHREAD_CANCEL_DISABLE: libc::c_int = 1;
/// The worker's cancelability after the drop.
static STATE_AFTER: AtomicI32 = AtomicI32::new(-1);

static mut BARRIER: core::mem::MaybeUninit<libc::pthread_barrier_t> =
    core::mem::MaybeUninit::uninit();
/// The worker's drop returned.
static DROPPED: AtomicBool = AtomicBool::new(false);

extern "C" fn worker(heap: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: initialised before the thread was made; not a cancellation
    // point.
    unsafe { libc::pthread_barrier_wait(core::ptr::addr_of_mut!(BARRIER).cast()) };
    // SAFETY: `heap` is a leaked `Box<Heap>` handed to this thread alone.
    drop(unsafe { Box::from_raw(heap as *mut Heap) });
    DROPPED.store(true, Ordering::SeqCst);
    // The cancel, still pending, must not unwind this frame: off, and the
    // thread returns. The state it replaces is the one the drop restored.
    let mut old = -1;
    // SAFETY: a valid state; `old` is written.
    unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) };
    STATE_AFTER.store(old, Ordering::SeqCst);
    core::ptr::null_mut()
}

/// Whether any byte of `[addr, addr + len)` is mapped in this process.
fn any_mapped(addr: usize, len: usize) -> bool {
    maps::mappings()
        .into_iter()
        .any(|(a, b)| a < addr + len && addr < b)
}

#[test]
fn a_heap_dropped_under_a_pending_cancel_gives_its_memory_back() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "a_heap_dropped_under_a_pending_cancel_gives_its_memory_back",
            &[],
            Duration::from_secs(60),
            "a heap dropped under a pending cancel",
        );
        print!("{}", out.stdout);
        assert!(out.stdout.contains("CHILD DONE"), "{}", out.stdout);
        return;
    }
    let memory = 8 << 20;
    let heap = Heap::new(Config::default().memory(memory).maintenance(true)).unwrap();
    let p = heap.alloc(Layout::from_size_align(64, 8).unwrap()).unwrap();
    // An object of the first zone; the zone's memory is `memory` bytes
    // around it.
    let addr = p.as_ptr() as usize;
    assert!(any_mapped(addr, 1), "the heap's zone is mapped");
    // SAFETY: allocated just above, freed once.
    unsafe { heap.free(p) };
    let heap = Box::into_raw(Box::new(heap));
    // SAFETY: plain pthread calls on objects that outlive the thread.
    unsafe {
        libc::pthread_barrier_init(
            core::ptr::addr_of_mut!(BARRIER).cast(),
            core::ptr::null(),
            2,
        );
        let mut t: libc::pthread_t = 0;
        assert_eq!(
            libc::pthread_create(&mut t, core::ptr::null(), worker, heap.cast()),
            0
        );
        // Pending until the worker's next cancellation point.
        libc::pthread_cancel(t);
        libc::pthread_barrier_wait(core::ptr::addr_of_mut!(BARRIER).cast());
        assert_eq!(libc::pthread_join(t, core::ptr::null_mut()), 0);
    }
    assert!(DROPPED.load(Ordering::SeqCst), "the drop did not return");
    assert_eq!(
        STATE_AFTER.load(Ordering::SeqCst),
        PTHREAD_CANCEL_ENABLE,
        "the drop left cancellation disabled"
    );
    assert!(
        !any_mapped(addr, 1),
        "the heap's zone is still mapped: the drop was cut short"
    );
    println!("CHILD DONE");
}
