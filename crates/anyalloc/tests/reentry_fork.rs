//! Signals during `fork`, and registries inherited
//! held.
//!
//! * A thread forks again and again while a per-thread timer interrupts it
//!   every few tens of microseconds with a handler that allocates through
//!   `Global`, the process's allocator. Between the fork handlers' prepare
//!   (which takes every heap lock) and their parent handler, such a handler
//!   used to take the normal path and wait for the locks its own thread
//!   held. Now prepare marks the thread and the handler takes the nolock
//!   route.
//! * Meanwhile another thread creates accounting groups under one parent
//!   with many live children, so it holds the children registry a good part
//!   of the time; every forked child creates a group under the same parent.
//!   The registry used to be a per-group spin lock that prepare did not
//!   take: a child that inherited it held spun forever.
//!
//! Every forked child must exit 0; the scenario runs in a child process
//! under a watchdog (its whole process group is killed on timeout), so a
//! deadlock fails the test.

mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyalloc::{Global, Group};
use anyalloc_storm::{install_handler, storm_signals, ErrnoGuard, ThreadTimer};

#[global_allocator]
static A: Global = Global;

static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    let mut small: Vec<u64> = Vec::new();
    if small.try_reserve_exact(16).is_ok() {
        small.push(1);
    }
    drop(small);
    let mut large: Vec<u8> = Vec::new();
    if large.try_reserve_exact(64 << 10).is_ok() {
        large.push(1);
    }
    drop(large);
    HANDLED.fetch_add(1, Relaxed);
}

const FORKS: usize = 200;

#[test]
fn fork_storm_with_allocating_handlers() {
    if watchdog::ran_in_child(
        "fork_storm_with_allocating_handlers",
        Duration::from_secs(120),
        "fork with Global-allocating signal handlers",
    ) {
        return;
    }
    anyalloc::init().expect("global heap");
    let parent = Group::new("parent", None, None);
    // Many live children: registering one more walks them all under the
    // registry lock.
    let kids: Vec<Arc<Group>> = (0..2_000)
        .map(|i| Group::new(&format!("kid{i}"), None, Some(&parent)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let creator = {
        let (stop, parent) = (stop.clone(), parent.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                drop(Group::new("churn", None, Some(&parent)));
                n += 1;
            }
            n
        })
    };
    let [sig, _] = storm_signals();
    install_handler(sig, handler, &[]).expect("sigaction");
    let timer = ThreadTimer::start(sig, Duration::from_micros(20), 0).expect("timer");
    for i in 0..FORKS {
        // SAFETY: the child only allocates (through Global, whose fork
        // handlers released every lock in it) and creates a group, then
        // _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let v: Vec<String> = (0..100).map(|k| k.to_string()).collect();
            let g = Group::new("forked", None, Some(&parent));
            let ok = v[99] == "99" && g.usage() == 0;
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waiting for our own child (EINTR from the timer: retry).
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i} failed: status {status:#x}"
        );
    }
    drop(timer);
    stop.store(true, Relaxed);
    let created = creator.join().unwrap();
    drop(kids);
    println!(
        "{FORKS} forks, {} handlers, {created} groups created meanwhile",
        HANDLED.load(Relaxed)
    );
    assert!(HANDLED.load(Relaxed) > 0, "the timer interrupted the forks");
}
