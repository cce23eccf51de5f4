//! A heap corruption found by a thread with a `pthread_cancel` pending
//! still writes its one-line message and aborts. The message was written
//! with libc's `write`, a cancellation point: the pending cancel acted
//! there, before the message and the abort, and unwound the thread out of
//! the allocator (the C library's test of the same, `cancel_fatal.c`, ran
//! on with the heap corrupt).

mod watchdog;

use std::alloc::Layout;
use std::time::Duration;

use anyalloc::{Config, Heap};

static mut BARRIER: core::mem::MaybeUninit<libc::pthread_barrier_t> =
    core::mem::MaybeUninit::uninit();

extern "C" fn worker(heap: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `heap` is the `Heap` the test thread keeps alive until after
    // the join.
    let heap = unsafe { &*(heap as *const Heap) };
    let p = heap.alloc(Layout::new::<[u64; 4]>()).unwrap();
    // SAFETY: initialised before the thread was made; not a cancellation
    // point.
    unsafe { libc::pthread_barrier_wait(core::ptr::addr_of_mut!(BARRIER).cast()) };
    // SAFETY: deliberately not: the second free is a double free, which
    // must abort.
    unsafe {
        heap.free(p);
        heap.free(p);
    }
    core::ptr::null_mut()
}

#[test]
fn double_free_aborts_under_a_pending_cancel() {
    if !watchdog::in_child() {
        let out = watchdog::run(
            "double_free_aborts_under_a_pending_cancel",
            &[],
            Duration::from_secs(60),
            "the cancelled thread's double free",
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "{:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        assert!(
            out.stderr.contains("anyalloc: double free"),
            "stderr:\n{}",
            out.stderr
        );
        return;
    }
    let heap = Heap::new(Config::default().memory(4 << 20).maintenance(false)).unwrap();
    // SAFETY: plain pthread calls on objects that outlive the thread.
    unsafe {
        libc::pthread_barrier_init(
            core::ptr::addr_of_mut!(BARRIER).cast(),
            core::ptr::null(),
            2,
        );
        let mut t: libc::pthread_t = 0;
        let arg = &heap as *const Heap as *mut libc::c_void;
        assert_eq!(
            libc::pthread_create(&mut t, core::ptr::null(), worker, arg),
            0
        );
        // Pending until the worker's next cancellation point.
        libc::pthread_cancel(t);
        libc::pthread_barrier_wait(core::ptr::addr_of_mut!(BARRIER).cast());
        libc::pthread_join(t, core::ptr::null_mut());
    }
    println!("the double free was not caught");
}
