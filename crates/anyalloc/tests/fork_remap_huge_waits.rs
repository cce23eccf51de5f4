//! A fork's wait for huge-block moves in progress (`HeapCore::lock_all`
//! waits until the heap's `remaps` count is 0) must not wait for ever.
//!
//! 1. `handler_fork_on_the_mover`: a signal handler that interrupted
//!    `remap_huge` (the move counted) calls `fork` while another thread's
//!    fork is in anyalloc's prepare. glibc (2.34+) lets the handler's fork
//!    run the prepare handlers meanwhile; one registered after anyalloc's
//!    (it runs before anyalloc's, as every other library's does under
//!    `libanyalloc.so`, which registers the heap's handlers first) takes
//!    its mutex, the usual `pthread_atfork` idiom. The first fork holds that
//!    mutex and waits for the move; the move's thread waits in the handler
//!    for the mutex. (glibc 2.28 to 2.33 hold their own `atfork_lock`
//!    across all prepare handlers: there no other handler is needed.)
//!    Both ends are covered now: a move blocks signals while it is counted
//!    (the signal raised inside it is handled once the count is back), and
//!    the fork's wait ends after `SLOT_PATIENCE` anyway.
//! 2. `child_of_a_handler_fork_forks`: a fork from a signal handler that
//!    interrupted the allocator takes nothing and resets nothing, so its
//!    child inherits the count of another thread's move in progress, a
//!    thread the child does not have; the child's next `fork` waits for
//!    that count.
//!
//! Both scenarios run under a watchdog.

mod watchdog;

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

const MIB: usize = 1 << 20;
const SMALL: usize = 5 * MIB;
const LARGE: usize = 13 * MIB;

thread_local! {
    /// 1: the mover (pauses in its move); 2: the handler-forker.
    static ROLE: Cell<u8> = const { Cell::new(0) };
}
static PAUSED: AtomicBool = AtomicBool::new(false);
static FORKED: AtomicBool = AtomicBool::new(false);
static FIRED: AtomicBool = AtomicBool::new(false);
/// Scenario 1: the main thread's fork holds `MUTEX` (in its prepare).
static MAIN_HOLDS: AtomicBool = AtomicBool::new(false);
/// Scenario 2: this process is the child of the handler's fork.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

static mut MUTEX: libc::pthread_mutex_t = libc::PTHREAD_MUTEX_INITIALIZER;

extern "C" fn lib_prepare() {
    // SAFETY: a process-wide mutex, locked here and unlocked in the parent
    // and child handlers of the same fork.
    unsafe { libc::pthread_mutex_lock(std::ptr::addr_of_mut!(MUTEX)) };
    if ROLE.get() == 0 {
        MAIN_HOLDS.store(true, SeqCst);
    }
}

extern "C" fn lib_release() {
    if ROLE.get() == 0 {
        MAIN_HOLDS.store(false, SeqCst);
    }
    // SAFETY: locked by this fork's prepare.
    unsafe { libc::pthread_mutex_unlock(std::ptr::addr_of_mut!(MUTEX)) };
}

/// A signal handler that forks (the child exits at once).
extern "C" fn fork_in_handler(_: libc::c_int) {
    // SAFETY: fork in a handler; the child only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while !flag.load(SeqCst) {
        if Instant::now() > until {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Scenario 1's hook: the mover, its move counted and its entry claimed,
/// is interrupted by a signal whose handler forks, once the main thread's
/// fork is in anyalloc's prepare.
fn signal_the_mover(site: Site) {
    if site != Site::HugeBusy || ROLE.get() != 1 || FIRED.swap(true, SeqCst) {
        return;
    }
    PAUSED.store(true, SeqCst);
    if wait_for(&MAIN_HOLDS, Duration::from_secs(2)) {
        // Let the main thread reach anyalloc's prepare.
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: raise has no memory preconditions; the handler is set.
        unsafe { libc::raise(libc::SIGUSR1) };
    }
}

/// Scenario 2's hook: the mover pauses (its move counted) until the
/// handler-forker has forked; the handler-forker, inside its own move
/// (inside the allocator, as a signal handler that interrupted it), forks.
fn pause_or_fork(site: Site) {
    if site != Site::HugeBusy {
        return;
    }
    match ROLE.get() {
        1 if !PAUSED.load(SeqCst) => {
            PAUSED.store(true, SeqCst);
            wait_for(&FORKED, Duration::from_secs(10));
        }
        2 if !FIRED.swap(true, SeqCst) => {
            // SAFETY: fork from "inside the allocator"; the child only
            // forks again and _exits (below, after the move returns).
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                IN_CHILD.store(true, SeqCst);
            } else {
                CHILD_PID.store(pid, SeqCst);
                FORKED.store(true, SeqCst);
            }
        }
        _ => {}
    }
}

fn huge(heap: &Heap) -> NonNull<u8> {
    heap.alloc(Layout::from_size_align(SMALL, 8).unwrap())
        .expect("a huge block")
}

/// Moves a block back and forth until `stop`, then frees it.
fn mover(heap: &Heap, stop: &AtomicBool) {
    let (mut p, mut size) = (huge(heap), SMALL);
    ROLE.set(1);
    while !stop.load(SeqCst) {
        let want = if size == SMALL { LARGE } else { SMALL };
        // SAFETY: this thread's live huge block; after Some only the result.
        if let Some(q) = unsafe { heap.remap_huge(p, want) } {
            (p, size) = (q, want);
        }
    }
    ROLE.set(0);
    // SAFETY: this thread's live block.
    unsafe { heap.free(p) };
}

#[test]
fn handler_fork_on_the_mover() {
    if watchdog::ran_in_child(
        "handler_fork_on_the_mover",
        Duration::from_secs(20),
        "a fork while a signal handler that interrupted a huge move forks",
    ) {
        return;
    }
    // The heap's handlers first, then a library's (run before the heap's).
    anyalloc::register_fork_handlers();
    // SAFETY: handlers that live forever; the signal handler only forks.
    unsafe {
        libc::pthread_atfork(Some(lib_prepare), Some(lib_release), Some(lib_release));
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = fork_in_handler as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let heap = Heap::new(Config::default().memory(64 << 20)).expect("heap");
    let stop = AtomicBool::new(false);
    set_hook(Some(signal_the_mover));
    std::thread::scope(|s| {
        let m = s.spawn(|| mover(&heap, &stop));
        assert!(wait_for(&PAUSED, Duration::from_secs(5)), "no move");
        // SAFETY: the child only _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0);
        assert!(watchdog::wait_child(pid, Duration::from_secs(5)).is_some());
        stop.store(true, SeqCst);
        m.join().unwrap();
    });
    set_hook(None);
    println!("the fork ended");
}

#[test]
fn child_of_a_handler_fork_forks() {
    if watchdog::ran_in_child(
        "child_of_a_handler_fork_forks",
        Duration::from_secs(20),
        "the child of a handler's fork forks",
    ) {
        return;
    }
    anyalloc::register_fork_handlers();
    // No maintenance thread: the child of a handler's fork inherits every
    // lock other threads held at the clone (the `fork` module's notes),
    // and a maintenance pass holds the heap's drain lock, which the child's
    // own fork then waits for for ever. This test is about the move's count,
    // not that documented limit (it failed once in CI when the pass was there).
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let stop = AtomicBool::new(false);
    set_hook(Some(pause_or_fork));
    let mut hung = false;
    std::thread::scope(|s| {
        let m = s.spawn(|| mover(&heap, &stop));
        assert!(wait_for(&PAUSED, Duration::from_secs(5)), "no move");
        // This thread's own move, during which its "signal handler" forks.
        let mut p = huge(&heap);
        ROLE.set(2);
        // SAFETY: this thread's live huge block.
        if let Some(q) = unsafe { heap.remap_huge(p, LARGE) } {
            p = q;
        }
        ROLE.set(0);
        if IN_CHILD.load(SeqCst) {
            // The child, back from the handler: an ordinary fork.
            // SAFETY: the grandchild only _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above.
                unsafe { libc::_exit(0) };
            }
            let ok =
                watchdog::wait_child(pid, Duration::from_secs(5)).is_some_and(watchdog::exited_ok);
            // SAFETY: as above.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let pid = CHILD_PID.load(SeqCst);
        assert!(pid > 0, "the handler did not fork");
        match watchdog::wait_child(pid, Duration::from_secs(8)) {
            Some(st) => assert!(watchdog::exited_ok(st), "the child failed: {st}"),
            None => hung = true,
        }
        stop.store(true, SeqCst);
        m.join().unwrap();
        // SAFETY: this thread's live block.
        unsafe { heap.free(p) };
    });
    set_hook(None);
    assert!(!hung, "the child of a handler's fork hung in its own fork");
    println!("the child's fork ended");
}
