//! Scripted interleavings: threads paused at interrupt points in a set
//! order, for the tests that check one exact window of the allocator (most
//! often, what a `fork` clones of a thread caught halfway through a step).
//!
//! A scenario has a step counter, 0 when [`play`] starts a script. Each
//! thread that takes part names its role with [`act`] (1, 2, ...: the main
//! thread has none). A [`Pause`] says: when the thread of role `role`
//! reaches interrupt point `site` while the step is `at`, the step becomes
//! `at + 1` and the thread waits there until the step is at least `until`,
//! which the main thread sets with [`advance_to`] once it has done its part
//! (or for the pause's patience, 5 s unless [`Pause::briefly`] says less).
//! A wait that runs out only means that the scenario did not go as planned,
//! which the test asserts with [`reached`]; the watchdog ends a run that
//! hangs anyway.
//!
//! ```ignore
//! // Role 1 holds the zone lock, role 2's nolock allocation stops between
//! // its take and its mark; step 3: the holder may go on; 4: forked.
//! static SCRIPT: [Pause; 2] = [
//!     Pause::new(1, Site::ZoneAlloc, 0, 3),
//!     Pause::new(2, Site::StockTaken, 1, 4),
//! ];
//! ```

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{ClassStats, Config, Heap};

/// One pause of a script (see the module documentation).
pub struct Pause {
    role: u8,
    site: Site,
    at: usize,
    until: usize,
    patience: Duration,
}

impl Pause {
    /// Role `role` pauses at `site` when the step is `at`, until the step
    /// is `until`.
    pub const fn new(role: u8, site: Site, at: usize, until: usize) -> Pause {
        Pause {
            role,
            site,
            at,
            until,
            patience: Duration::from_secs(5),
        }
    }

    /// The same pause, waiting at most `patience` (for a pause that the
    /// step under test may rightly cut short: a fork that waits for the
    /// paused thread lets it run out, then clones the thread after it).
    pub const fn briefly(self, patience: Duration) -> Pause {
        Pause { patience, ..self }
    }
}

thread_local! {
    /// This thread's role (0: none).
    static ROLE: Cell<u8> = const { Cell::new(0) };
}
/// The scenario's step.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// The script being played (`SCRIPT_LEN` pauses).
static SCRIPT: AtomicPtr<Pause> = AtomicPtr::new(std::ptr::null_mut());
static SCRIPT_LEN: AtomicUsize = AtomicUsize::new(0);

/// The interrupt hook: takes the pause this thread's role has at `site` at
/// the current step, if any.
fn hook(site: Site) {
    let role = ROLE.get();
    if role == 0 {
        return;
    }
    let script = SCRIPT.load(SeqCst);
    let len = SCRIPT_LEN.load(SeqCst);
    // SAFETY: `play` stores a `'static` slice's start and its length.
    let script = unsafe { std::slice::from_raw_parts(script, len) };
    let step = STEP.load(SeqCst);
    let Some(p) = script
        .iter()
        .find(|p| p.role == role && p.site == site && p.at == step)
    else {
        return;
    };
    STEP.store(step + 1, SeqCst);
    let deadline = Instant::now() + p.patience;
    while STEP.load(SeqCst) < p.until && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Starts `script` at step 0 (installs the interrupt hook until [`end`]).
pub fn play(script: &'static [Pause]) {
    STEP.store(0, SeqCst);
    SCRIPT_LEN.store(0, SeqCst);
    SCRIPT.store(script.as_ptr().cast_mut(), SeqCst);
    SCRIPT_LEN.store(script.len(), SeqCst);
    set_hook(Some(hook));
}

/// Ends the script: no more pauses.
pub fn end() {
    set_hook(None);
}

/// Makes the calling thread play `role`.
pub fn act(role: u8) {
    ROLE.set(role);
}

/// The current step.
pub fn step() -> usize {
    STEP.load(SeqCst)
}

/// Waits (at most 5 s) for the step to reach `n`.
pub fn wait_step(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while step() < n && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Waits for step `n`, and asserts that the scenario is exactly there:
/// `what` says what step `n` means, for the failure's message.
pub fn reached(n: usize, what: &str) {
    wait_step(n);
    assert_eq!(step(), n, "the scenario did not reach step {n} ({what})");
}

/// Sets the step to `n`: the pauses waiting for `n` go on.
pub fn advance_to(n: usize) {
    STEP.store(n, SeqCst);
}

/// Forks. The child runs `child` and `_exit`s with the code it returns;
/// the parent sets the step to `forked` (releasing the pauses that wait
/// for the fork) and waits for the child, at most 10 s (panics if it
/// hung). Returns the child's wait status.
pub fn fork_child(forked: usize, child: impl FnOnce() -> i32) -> libc::c_int {
    // SAFETY: the children of these tests use the heap (whose fork
    // handlers made it usable), read statistics and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(code) };
    }
    advance_to(forked);
    assert!(pid > 0, "fork failed");
    crate::watchdog::wait_child(pid, Duration::from_secs(10)).expect("the child hung")
}

/// Asserts that a child of [`fork_child`] exited with status 0; `what`
/// says what its other codes mean.
pub fn assert_child_ok(status: libc::c_int, what: &str) {
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: status {status}"
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "{what} (exit code {})",
        libc::WEXITSTATUS(status)
    );
}

/// The heap of the object scenarios: 64 MiB, one CPU slot set and no
/// restartable sequences (every thread meets the slots and the node lock
/// the script's pauses hold), no maintenance thread and no inline decay
/// (nothing runs but the script: a decay pass would take the deferred
/// objects a scenario parks).
pub fn one_slot_heap() -> Heap {
    let config = Config::default()
        .memory(64 << 20)
        .cpus(1)
        .rseq(false)
        .maintenance(false)
        .decay(false);
    Heap::new(config).expect("heap")
}

/// The layout of an object of `size` bytes (align 8).
pub fn layout_of(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// The statistics of the class of exactly `size` bytes.
pub fn class_of(heap: &Heap, size: usize) -> ClassStats {
    *heap
        .stats()
        .classes
        .iter()
        .find(|c| c.size == size)
        .unwrap()
}

/// `n` normal allocations of `size` bytes, as addresses.
pub fn alloc_n(heap: &Heap, size: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| heap.alloc(layout_of(size)).expect("memory").as_ptr() as usize)
        .collect()
}

/// Frees every block (addresses of live blocks of `heap` the caller
/// allocated, each freed once).
pub fn free_all(heap: &Heap, blocks: impl IntoIterator<Item = usize>) {
    for p in blocks {
        // SAFETY: per the caller, a live block of `heap`, freed once.
        unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
    }
}

/// The counts of the class that serves `size`: (objects in use, deferred
/// objects).
pub fn class_counts(heap: &Heap, size: usize) -> (usize, usize) {
    let s = heap.stats();
    let c = s.classes.iter().find(|c| c.size >= size).unwrap();
    (c.objects_in_use, c.deferred)
}

/// The pauses of [`spawn_slot_holders`]' threads: role 1 (H) in its refill
/// (level 0 and the class's node lock held) at step 0, roles 2 and 3 (T1,
/// T2) at their allocations on levels 1 and 2 at steps 1 and 2; all three
/// wait for step `until`. Step 3: every slot of the class and its node lock
/// are held. A script with more roles adds its pauses after these.
pub const fn slot_holders(until: usize) -> [Pause; 3] {
    [
        Pause::new(1, Site::SheafRefill, 0, until),
        Pause::new(2, Site::SheafAlloc, 1, until),
        Pause::new(3, Site::SheafAlloc, 2, until),
    ]
}

/// The three threads of an object scenario that hold a class's slots: role
/// 1 (H) allocates on the normal path, roles 2 and 3 (T1, T2) with the
/// nolock path, each once the previous one has paused (the script,
/// [`slot_holders`], pauses H in its refill with level 0 and the node lock
/// held, T1 and T2 on levels 1 and 2). Each thread returns its object's
/// address (0: none).
pub fn spawn_slot_holders<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    heap: &'scope Heap,
    layout: std::alloc::Layout,
) -> Vec<std::thread::ScopedJoinHandle<'scope, usize>> {
    (1..=3u8)
        .map(|role| {
            s.spawn(move || {
                act(role);
                wait_step(usize::from(role) - 1);
                let p = if role == 1 {
                    heap.alloc(layout)
                } else {
                    heap.alloc_nolock(layout)
                };
                p.map_or(0, |p| p.as_ptr() as usize)
            })
        })
        .collect()
}

/// Frees each of `blocks` that is not 0 (the addresses
/// [`spawn_slot_holders`]' threads return, 0 for none).
///
/// # Safety
/// Each non-zero address is a live block of `heap`, freed nowhere else.
pub unsafe fn free_held(heap: &Heap, blocks: impl IntoIterator<Item = usize>) {
    for p in blocks.into_iter().filter(|&p| p != 0) {
        // SAFETY: per the caller.
        unsafe { heap.free(std::ptr::NonNull::new(p as *mut u8).unwrap()) };
    }
}
