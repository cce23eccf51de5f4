//! Forks while another thread is paused at an interrupt point: the harness
//! of the tests that check what a fork clones of a thread caught inside the
//! allocator.
//!
//! The pausing thread (marked with [`become_pauser`]) stops at its first
//! visit of the round's site until the main thread's fork has returned, or
//! for 50 ms. A fork that waits for what that thread is doing (a lock it
//! holds, a block it moves) lets the pause run out and clones the thread
//! after it; a fork that does not clones it halfway, which each child
//! checks.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};

thread_local! {
    /// Set on the thread that pauses.
    static PAUSER: Cell<bool> = const { Cell::new(false) };
}
/// The site to pause at (`Site as u8`).
static PAUSE_AT: AtomicU8 = AtomicU8::new(u8::MAX);
/// The pauser is paused at the site (this round).
static PAUSED: AtomicBool = AtomicBool::new(false);
/// The main thread's `fork` returned (this round).
static FORKED: AtomicBool = AtomicBool::new(false);

/// Marks the calling thread as the one that pauses.
pub fn become_pauser() {
    PAUSER.set(true);
}

fn pause(site: Site) {
    if site as u8 != PAUSE_AT.load(SeqCst) || !PAUSER.get() || PAUSED.load(SeqCst) {
        return;
    }
    PAUSED.store(true, SeqCst);
    let until = Instant::now() + Duration::from_millis(50);
    while !FORKED.load(SeqCst) && Instant::now() < until {
        std::thread::yield_now();
    }
}

/// What [`fork_during_pauses`] saw.
pub struct Forks {
    /// Rounds whose fork came while the pauser was paused.
    pub paused: usize,
    /// Children whose check failed (or that died).
    pub failed: usize,
    /// Children that had not exited after 5 s (the rounds stop at the
    /// first).
    pub hung: usize,
}

/// `rounds` forks, each once the pauser (another thread, running meanwhile)
/// is paused at `site`; each child runs `check` and exits with status 0 if
/// it returned `true`. Installs the interrupt hook for the duration.
pub fn fork_during_pauses(site: Site, rounds: usize, check: impl Fn() -> bool) -> Forks {
    PAUSE_AT.store(site as u8, SeqCst);
    set_hook(Some(pause));
    let mut forks = Forks {
        paused: 0,
        failed: 0,
        hung: 0,
    };
    for _ in 0..rounds {
        FORKED.store(false, SeqCst);
        PAUSED.store(false, SeqCst);
        while !PAUSED.load(SeqCst) {
            std::thread::yield_now();
        }
        forks.paused += 1;
        // SAFETY: the child runs the caller's check and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = check();
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        FORKED.store(true, SeqCst);
        assert!(pid > 0, "fork failed");
        match crate::watchdog::wait_child(pid, Duration::from_secs(5)) {
            Some(status) if !crate::watchdog::exited_ok(status) => forks.failed += 1,
            Some(_) => {}
            None => {
                forks.hung += 1;
                break;
            }
        }
    }
    set_hook(None);
    forks
}

/// A child's last check: every free page of `pages` can be had (largest
/// blocks first, then what is left), none is lost to a list the fork
/// cloned half done, and the invariants hold before and after. Reports
/// what failed on stderr.
#[allow(dead_code)] // not every test of the harness checks the pages
pub fn every_free_page_can_be_had(pages: &anyalloc::PageAllocator) -> bool {
    if let Err(e) = pages.check_invariants() {
        eprintln!("child: {e}");
        return false;
    }
    let mut got = Vec::new();
    for order in (0..=anyalloc::MAX_ORDER).rev() {
        while let Some(p) = pages.alloc_pages(order) {
            got.push((p, order));
        }
    }
    let s = pages.stats();
    for (p, order) in got {
        // SAFETY: allocated above with `order`.
        unsafe { pages.free_pages(p, order) };
    }
    if s.buddy_pages != 0 {
        eprintln!("child: {} free pages could not be allocated", s.buddy_pages);
        return false;
    }
    pages.check_invariants().is_ok()
}
