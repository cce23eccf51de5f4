//! A huge allocation registers its block in the table of huge blocks,
//! then counts it (`huge_in_use`, `huge_bytes`); a huge free takes it out,
//! then uncounts it. A forked child counts them again from its table (a
//! thread it does not have may have been cloned in between: see
//! `fork_huge_count`). But a signal handler that forks can interrupt that
//! window on the forking thread itself: no lock is held there, so its fork
//! is an ordinary one, and the child's recount ran before its thread
//! finished the step. The child then counted an allocation's block twice
//! (`huge_in_use` 2 for one block), or a free's never (`huge_in_use`
//! wrapped to `usize::MAX`, and with it the room the heap keeps for blocks
//! mapped beside it during a fork).
//!
//! Deterministic: an interrupt point raises `SIGUSR1` at `Site::HugeCount`
//! (then at `Site::FreeHuge`, of a normal free and of a nolock one) on the allocating thread, whose handler forks. The child checks
//! its counts once the step has ended.

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering::SeqCst};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The site whose signal forks (its `u8` value + 1; 0: none yet).
static SITE: AtomicU8 = AtomicU8::new(0);
/// Armed: the next signal at `SITE` forks.
static ARMED: AtomicBool = AtomicBool::new(false);
/// What the handler's `fork` returned (-1: not yet).
static FORKED: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handler(_: libc::c_int) {
    if ARMED.swap(false, SeqCst) {
        // SAFETY: the child goes on with the interrupted step, reads
        // statistics and _exits.
        FORKED.store(unsafe { libc::fork() }, SeqCst);
    }
}

fn hook(site: Site) {
    if SITE.load(SeqCst) == site as u8 + 1 && ARMED.load(SeqCst) {
        // SAFETY: raise has no memory preconditions; the handler is set.
        unsafe { libc::raise(libc::SIGUSR1) };
    }
}

/// Arms a fork at `site`, runs `step`, and returns the fork's result.
fn fork_at(site: Site, step: impl FnOnce()) -> libc::pid_t {
    FORKED.store(-1, SeqCst);
    SITE.store(site as u8 + 1, SeqCst);
    ARMED.store(true, SeqCst);
    set_hook(Some(hook));
    step();
    set_hook(None);
    let pid = FORKED.load(SeqCst);
    assert!(pid >= 0, "no fork at {site:?}");
    pid
}

/// In the child (`pid` 0): exits 0 if the heap counts `live` blocks of
/// `bytes`, else 3. In the parent: the child's exit code.
fn check_child(pid: libc::pid_t, heap: &Heap, live: usize, bytes: usize) -> i32 {
    if pid == 0 {
        let s = heap.stats();
        let code = if (s.huge_in_use, s.huge_bytes) == (live, bytes) {
            0
        } else {
            3
        };
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    let status = watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung");
    assert!(libc::WIFEXITED(status), "the child did not exit: {status}");
    libc::WEXITSTATUS(status)
}

#[test]
fn a_handler_forks_inside_a_huge_step_on_its_own_thread() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_a_huge_step_on_its_own_thread",
        Duration::from_secs(60),
        "a signal handler forks between a huge block's table entry and its count",
    ) {
        return;
    }
    // SAFETY: a plain handler for SIGUSR1 (a zeroed sigaction is valid).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as extern "C" fn(libc::c_int) as usize;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let heap = Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .decay(false),
    )
    .expect("heap");
    const SIZE: usize = 8 << 20;
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    let mut p = None;
    let pid = fork_at(Site::HugeCount, || p = heap.alloc(layout));
    let p = p.expect("a huge block");
    let alloc = check_child(pid, &heap, 1, SIZE);
    // SAFETY: allocated above, freed once (in each process).
    let pid = fork_at(Site::FreeHuge, || unsafe { heap.free(p) });
    let free = check_child(pid, &heap, 0, 0);
    // A nolock free (not inside the allocator either: called directly,
    // as in a nolock scope).
    let p = heap.alloc(layout).expect("a huge block");
    // SAFETY: allocated above, freed once (in each process).
    let pid = fork_at(Site::FreeHuge, || unsafe { heap.free_nolock(p) });
    let scoped = check_child(pid, &heap, 0, 0);
    assert_eq!(
        (alloc, free, scoped),
        (0, 0, 0),
        "the child's huge_in_use/huge_bytes were wrong (3) after a fork in an allocation's \
         window (first), a free's (second) or a nolock free's (third)"
    );
}
