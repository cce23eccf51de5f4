//! A `fork` while another thread creates the global heap: the child must
//! find the heap made (or not begun), never "being made" by a thread that
//! does not exist there.
//!
//! The prepare handler used to look only for a ready heap: a creation in
//! progress on another thread was cloned half done, and in the child the
//! state stayed `INITIALIZING` for ever, so the child's first `init` (or
//! normal-path allocation through `Global`) waited for ever.
//!
//! This binary's allocator is the system's, so the heap is made by the
//! first `anyalloc::init`, on thread T. The creation reads its settings
//! with `getenv`, which this binary defines (a scan of `environ`): on T,
//! the read of `ANYALLOC_MEMORY` parks the creation until the fork has
//! returned in the parent, or until a few seconds have passed (a prepare
//! handler that waits for the creation cannot return before it). The main
//! thread forks while T is parked there; the child calls `init` and
//! allocates, under a watchdog.

mod parked_creation;
mod watchdog;

use std::time::Duration;

#[test]
fn fork_while_another_thread_creates_the_global_heap() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "fork_while_another_thread_creates_the_global_heap",
            &[("ANYALLOC_MEMORY", "64m")],
            Duration::from_secs(60),
            "a fork while another thread creates the global heap",
        );
        print!("{}", out.stdout);
        return;
    }
    assert!(anyalloc::global_heap().is_none(), "no heap before the test");
    // Parked until the fork has returned in the parent, or for 3 s (a
    // prepare handler that waits for the creation returns only after it).
    parked_creation::arm(Duration::from_secs(3));
    let t = std::thread::spawn(|| anyalloc::init().is_ok());
    while !parked_creation::parked() {
        std::thread::yield_now();
    }
    // SAFETY: the child calls `init`, allocates and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = parked_creation::init_and_allocate();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    parked_creation::release();
    assert!(pid > 0, "fork failed");
    let status = watchdog::wait_child(pid, Duration::from_secs(20));
    assert!(t.join().unwrap(), "the heap was created in the parent");
    let status = status.expect("the child hung: it found the heap being made for ever");
    assert!(
        watchdog::exited_ok(status),
        "the child failed (status {status:#x})"
    );
    println!("the child made and used the heap");
}
