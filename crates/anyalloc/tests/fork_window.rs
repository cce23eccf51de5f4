//! Fork handlers registered before `Global`'s allocate inside its fork
//! window.
//!
//! `pthread_atfork` runs prepare handlers in the reverse order of
//! registration and parent and child handlers in order, so handlers that
//! another library registered before ours (its constructor ran first) run
//! while our prepare handler holds every heap lock. glibc's malloc lets such
//! handlers allocate; so must `Global`. Here a `.preinit_array` function
//! (it runs before every `.init_array` constructor, anyalloc's included)
//! registers handlers that allocate small, 64 KiB and huge (over 4 MiB,
//! normal path only) blocks in prepare, parent and child, and check them.
//! Meanwhile a thread churns and a per-thread timer's handler allocates on
//! the forking thread, also inside those handlers' allocations (where it
//! must take the nolock route, never wait). Before the fork window could be
//! borrowed, every such allocation went to the nolock path, where the
//! thread finds every lock held by itself: the huge ones always failed and
//! most others did. The scenario runs in a child process under a watchdog.

mod watchdog;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyalloc::Global;
use anyalloc_storm::{install_handler, storm_signals, ErrnoGuard, ThreadTimer};

#[global_allocator]
static A: Global = Global;

/// Failed or corrupted allocations in the fork handlers (this process).
static BAD: AtomicU64 = AtomicU64::new(0);
/// Allocations the fork handlers made (this process).
static MADE: AtomicU64 = AtomicU64::new(0);
/// Set by the scenario: the handlers do nothing in other tests' forks.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// A huge block kept from prepare to the parent and child handlers.
static mut KEPT: Vec<u8> = Vec::new();

const HUGE: usize = 8 << 20;

/// Allocates `n` blocks of `size` bytes, fills, checks and frees them.
fn churn(n: usize, size: usize) {
    let mut v: Vec<Vec<u8>> = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        BAD.fetch_add(1, Relaxed);
        return;
    }
    for i in 0..n {
        let mut b: Vec<u8> = Vec::new();
        if b.try_reserve_exact(size).is_err() {
            BAD.fetch_add(1, Relaxed);
            continue;
        }
        b.resize(size, i as u8);
        MADE.fetch_add(1, Relaxed);
        v.push(b);
    }
    for (i, b) in v.iter().enumerate() {
        if b[0] != i as u8 || b[size - 1] != i as u8 {
            BAD.fetch_add(1, Relaxed);
        }
    }
}

extern "C" fn prepare() {
    if !ACTIVE.load(Relaxed) {
        return;
    }
    let mut kept: Vec<u8> = Vec::new();
    if kept.try_reserve_exact(HUGE).is_ok() {
        kept.resize(HUGE, 0x5a);
        MADE.fetch_add(1, Relaxed);
    } else {
        BAD.fetch_add(1, Relaxed);
    }
    // SAFETY: only the forking thread's fork handlers touch KEPT, one at a
    // time (glibc runs them in sequence on the forking thread).
    unsafe { *std::ptr::addr_of_mut!(KEPT) = kept };
    churn(1000, 200);
    churn(40, 64 << 10);
}

extern "C" fn after() {
    if !ACTIVE.load(Relaxed) {
        return;
    }
    // SAFETY: as in `prepare`.
    let kept = unsafe { std::mem::take(&mut *std::ptr::addr_of_mut!(KEPT)) };
    if kept.len() == HUGE && (kept[0] != 0x5a || kept[HUGE - 1] != 0x5a) {
        BAD.fetch_add(1, Relaxed);
    }
    drop(kept);
    churn(1, 6 << 20);
    churn(2000, 200);
    churn(100, 64 << 10);
}

extern "C" fn register_early() {
    // SAFETY: the handlers are `extern "C"` functions that live forever.
    unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

extern "C" fn on_timer(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    let mut v: Vec<u64> = Vec::new();
    if v.try_reserve_exact(6).is_ok() {
        v.extend_from_slice(&[7; 6]);
    }
    drop(v);
    HANDLED.fetch_add(1, Relaxed);
}

const FORKS: usize = 20;

#[test]
fn fork_handlers_registered_before_ours_allocate() {
    if watchdog::ran_in_child(
        "fork_handlers_registered_before_ours_allocate",
        Duration::from_secs(120),
        "fork handlers registered before Global's allocating in its fork window",
    ) {
        return;
    }
    anyalloc::init().expect("global heap");
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut keep: Vec<Vec<u8>> = (0..64).map(|_| Vec::new()).collect();
            let mut i = 0usize;
            while !stop.load(Relaxed) {
                keep[i % 64] = vec![i as u8; 1 + (i * 37) % 3000];
                i += 1;
            }
        })
    };
    let [sig, _] = storm_signals();
    install_handler(sig, on_timer, &[]).expect("sigaction");
    let timer = ThreadTimer::start(sig, Duration::from_micros(50), 0).expect("timer");
    ACTIVE.store(true, Relaxed);
    for i in 0..FORKS {
        // SAFETY: the child checks the counters its fork handlers left and
        // _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = BAD.load(Relaxed) == 0 && MADE.load(Relaxed) > 0;
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waiting for our own child (EINTR from the timer: retry).
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "forked child {i}: its fork handlers' allocations failed (status {status:#x})"
        );
    }
    ACTIVE.store(false, Relaxed);
    drop(timer);
    stop.store(true, Relaxed);
    busy.join().unwrap();
    let (bad, made) = (BAD.load(Relaxed), MADE.load(Relaxed));
    println!(
        "{FORKS} forks: {made} allocations in the parent's fork handlers, {bad} failed; {} signals handled",
        HANDLED.load(Relaxed)
    );
    assert_eq!(bad, 0, "allocations in the fork handlers failed");
    assert!(made > 0, "the fork handlers ran");
    assert!(HANDLED.load(Relaxed) > 0, "the timer interrupted the forks");
}
