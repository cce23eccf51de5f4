//! The maintenance thread (std): the userspace counterpart of kswapd and
//! `irq_work`.
//!
//! It sleeps on the heap's wake word (a futex) and is woken from any context
//! by a nolock free that had to park memory on a deferred list: an atomic
//! OR of `WAKE_OWED`, and a futex wake only on the 0 -> 1 transition while
//! the maintainer announced it sleeps (`MAINTAINER_SLEEPING`), so at most
//! one wake per sleep (async-signal-safe, never blocking). With
//! `Config::nolock_syscalls(false)` nobody wakes it: it looks at the word
//! every millisecond instead. Each wake it
//! drains the deferred lists at once; every 50 ms it also runs a full pass
//! ([`Maintained::pass`]): per-CPU lists and sheaves that a nolock
//! allocation found empty are stocked (a normal one can wait for the lock
//! instead), caches and barns left unchanged for half a second give their
//! objects back to the slabs and their pages back to the buddy lists,
//! shrinkers run below the low watermark, and free blocks of 256 KiB or
//! more that stayed idle for half a second go back to the OS (`MADV_DONTNEED`),
//! smaller ones after two seconds (a bounded number per pass).
//!
//! It never holds a lock a nolock caller needs for longer than an ordinary
//! normal-path operation would: it uses the same normal-path functions. It
//! blocks every signal, so no handler can interrupt it inside a lock.
//!
//! A heap without the thread (std) does the give-back part of this work
//! from its own normal-path slow calls instead, bounded and at most once
//! per [`EPOCH`]: the inline decay (`Config::decay`, `HeapCore::decay`).
//! It uses these constants, and stops once a thread starts.
//!
//! The thread drives whatever implements [`Maintained`] (the heap's core),
//! so this module depends on no allocator layer: the heap owns its
//! maintainer, not the other way round.

extern crate std;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::sync::wake_word::{self, MAINTAINER_SLEEPING};

/// What the maintenance thread drives: implemented by the heap's core.
pub(crate) trait Maintained: Sync + 'static {
    /// The wake word: `WAKE_OWED` set by wakers, `MAINTAINER_SLEEPING` set
    /// by the thread while it sleeps on it (a futex).
    fn wake_word(&self) -> &AtomicU32;
    /// Set (Release) when the thread must exit.
    fn stop_flag(&self) -> &AtomicBool;
    /// Wakes the thread now, whether or not a wake is owed (normal context).
    fn wake_now(&self);
    /// Whether the nolock path may wake the thread (else it polls).
    fn nolock_syscalls(&self) -> bool;
    /// The quick duty after a wake: deferred frees only.
    fn drain_deferred(&self);
    /// One full maintenance pass, `elapsed` epochs after the thread's
    /// previous one (the first: since the thread started, plus one). The
    /// core advances its epoch counter by `elapsed`, the counter that
    /// `Heap::maintain` advances by one per call: one clock for both, so a
    /// block's stamp is read against the clock that made it. Blocks idle
    /// for `idle_epochs` epochs go back to the OS, caches unchanged for
    /// `idle_passes` passes go back to the slabs and the page allocator.
    fn pass(&self, elapsed: usize, idle_epochs: usize, idle_passes: u32);
}

const NONE: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;

/// How often the maintainer runs a full pass, and how long it sleeps when
/// nothing wakes it.
const PERIOD: Duration = Duration::from_millis(50);
/// How long it sleeps when nothing may wake it (`nolock_syscalls` off).
const POLL: Duration = Duration::from_millis(1);
/// Epoch length for idle-memory accounting (also the inline decay's: at
/// most one pass per epoch, `Config::decay`).
pub(crate) const EPOCH: Duration = Duration::from_millis(100);
/// Epochs a free block stays idle before it goes back to the OS.
pub(crate) const IDLE_EPOCHS: usize = 5;
/// Passes (one per `PERIOD`) a per-CPU cache or a barn stays unchanged
/// before its objects and pages go back: half a second. With `IDLE_EPOCHS`
/// this puts memory freed by a burst back with the OS within about 1.5 s.
pub(crate) const IDLE_PASSES: u32 = 10;

/// A heap's maintenance thread, if started.
pub(crate) struct MaintainerSlot {
    state: AtomicU8,
    handle: UnsafeCell<Option<std::thread::JoinHandle<()>>>,
    /// The process the thread was started in: a forked child has a copy of
    /// the slot but not the thread.
    pid: core::sync::atomic::AtomicI32,
}

impl MaintainerSlot {
    pub(crate) fn new() -> Self {
        MaintainerSlot {
            state: AtomicU8::new(NONE),
            handle: UnsafeCell::new(None),
            pid: core::sync::atomic::AtomicI32::new(0),
        }
    }

    /// Starts the thread for `core` unless one runs; returns whether a
    /// thread runs (or is being started) afterwards. `on_spawn` runs once
    /// the thread exists and its start is published, in the call that made
    /// it only (not in one that found a start in progress, which may yet
    /// fail). `core` must stay
    /// where it is until [`stop`](Self::stop) has returned.
    pub(crate) fn start<M: Maintained>(&self, core: &M, on_spawn: impl FnOnce()) -> bool {
        match self
            .state
            .compare_exchange(NONE, STARTING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(_) => return true,
        }
        // The process the thread runs in, from now on: a start in progress
        // here is told from one a forked child inherited
        // (`forget_if_forked`).
        // SAFETY: getpid has no preconditions.
        self.pid.store(unsafe { libc::getpid() }, Ordering::Relaxed);
        let core = core as *const M as usize;
        // A thread inherits its creator's signal mask, and glibc's thread
        // start restores it before the thread's first instruction of ours:
        // spawned from a thread with signals unblocked (the start-up
        // constructor, `init`, `Heap::new`), it could take a
        // process-directed signal before `run_loop` blocks them, running a
        // handler meant for the program's threads, or dying of a signal
        // (`SIGTERM`) that the program blocks in every thread of its own and
        // takes with `sigwait`. Spawned with every signal blocked, it is
        // born with them blocked.
        crate::interrupt_point!(MaintainerSpawn);
        let quiet = crate::platform::SignalsBlocked::new();
        let spawned = std::thread::Builder::new()
            .name(std::string::String::from("anyalloc-maintainer"))
            .spawn(move || {
                // SAFETY: the core outlives the thread: `stop` joins it
                // before the heap releases the core.
                run(unsafe { &*(core as *const M) })
            });
        drop(quiet);
        match spawned {
            Ok(h) => {
                crate::interrupt_point!(MaintainerSpawned);
                // SAFETY: only the context that won the CAS writes the
                // handle, before publishing RUNNING.
                unsafe { *self.handle.get() = Some(h) };
                self.state.store(RUNNING, Ordering::Release);
                // Only now: a fork before RUNNING leaves its child a start
                // in progress, which `forget_after_fork` does not count as
                // a thread of the parent, so the child's heap must still be
                // as it was without one (its inline decay on).
                on_spawn();
                true
            }
            Err(_) => {
                self.state.store(NONE, Ordering::Release);
                false
            }
        }
    }

    /// [`forget_after_fork`](Self::forget_after_fork) for the public call,
    /// which any code may make, in any process: a thread started (or being
    /// started) in this very process runs here and is not forgotten (the
    /// heap's drop must stop and join it before the core goes, and another
    /// thread of this process may be writing its handle), and a slot that
    /// never started one has nothing to forget. Returns whether a thread
    /// of the parent was forgotten.
    pub(crate) fn forget_if_forked(&self) -> bool {
        // SAFETY: getpid has no preconditions.
        if self.pid.load(Ordering::Relaxed) == unsafe { libc::getpid() } {
            return false;
        }
        if self.state.load(Ordering::Acquire) == NONE {
            // The parent's maintenance threads are still not counted here.
            forget_live_after_fork();
            return false;
        }
        self.forget_after_fork()
    }

    /// In a forked child: the thread stayed in the parent. Forgets it (its
    /// handle names a thread that does not exist here), so that `start`
    /// starts a new one; returns whether one ran in the parent.
    pub(crate) fn forget_after_fork(&self) -> bool {
        // SAFETY: only the forking thread exists in the child: nothing else
        // reads or writes the handle.
        core::mem::forget(unsafe { (*self.handle.get()).take() });
        // No maintenance thread of the parent runs here: the count starts
        // again at 0 (unless this child's own threads are counted already).
        forget_live_after_fork();
        self.state.swap(NONE, Ordering::AcqRel) == RUNNING
    }

    /// Stops and joins the thread, if one runs. In a forked child whose
    /// parent ran it (nobody called `forget_after_fork`) there is no thread
    /// to stop or join (joining it would report it dead): the handle is
    /// forgotten instead.
    pub(crate) fn stop(&self, core: &impl Maintained) {
        if self.state.load(Ordering::Acquire) != RUNNING {
            return;
        }
        // SAFETY: getpid has no preconditions.
        if self.pid.load(Ordering::Relaxed) != unsafe { libc::getpid() } {
            self.forget_after_fork();
            return;
        }
        core.stop_flag().store(true, Ordering::Release);
        core.wake_now();
        // SAFETY: RUNNING was published after the handle was written; `stop`
        // runs from the heap's drop, with exclusive access to the handle.
        if let Some(h) = unsafe { (*self.handle.get()).take() } {
            // `pthread_join` is a cancellation point: a cancel pending on
            // the dropping thread acted there, and the drop never gave the
            // heap back. It acts after the drop instead.
            let _no_cancel = crate::platform::CancelDisabled::new();
            // Joined with `pthread_join` itself, not `JoinHandle::join`: a
            // signal handler may fork during the wait, and its child, which
            // goes on with this drop once the handler returns, has no such
            // thread; glibc's join returns at once there (the thread's
            // descriptor reads as ended), and std's join, finding no result
            // from the thread, panicked in the middle of the drop. (The
            // result is not read: the thread returns nothing, and a panic
            // that ended it was ignored before too.)
            use std::os::unix::thread::JoinHandleExt;
            let t = h.into_pthread_t();
            // SAFETY: the thread's handle was consumed above, so nothing
            // else joins or detaches it; joined once.
            unsafe { libc::pthread_join(t, core::ptr::null_mut()) };
        }
        self.state.store(NONE, Ordering::Release);
    }
}

fn wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    crate::platform::futex::wait(word, seen, Some(timeout));
}

/// Maintenance threads running in this process: the count (low 32 bits)
/// and the process it was counted in (its pid, high 32 bits). A forked
/// child inherits the parent's word but none of its threads: a word
/// counted in another process counts 0 here, so the child's first update
/// (`forget_after_fork`, or its first maintainer's start) starts again
/// from 0, and [`live`] reads 0 before that. (A reset by each heap's
/// `forget_after_fork` alone would be wrong once the child has started a
/// maintainer of its own and forgets another heap's: the word keeps
/// the count of the process it belongs to.)
static LIVE: AtomicU64 = AtomicU64::new(0);

fn this_pid() -> u64 {
    // SAFETY: getpid has no preconditions.
    u64::from(unsafe { libc::getpid() } as u32)
}

/// Applies `f` to this process's count of maintenance threads.
fn update_live(f: impl Fn(u64) -> u64) {
    let me = this_pid();
    let _ = LIVE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
        let n = if w >> 32 == me { w & 0xffff_ffff } else { 0 };
        Some(me << 32 | (f(n) & 0xffff_ffff))
    });
}

/// Maintenance threads running in this process.
fn live() -> u64 {
    let w = LIVE.load(Ordering::Relaxed);
    if w >> 32 == this_pid() {
        w & 0xffff_ffff
    } else {
        0
    }
}

/// In a forked child: the parent's maintenance threads are not counted
/// here (a count made in this process already is kept).
fn forget_live_after_fork() {
    update_live(|n| n);
}

/// How often a maintenance thread checks whether it is all that is left of
/// the process (see [`only_maintainers_left`]).
const LAST_THREAD_CHECK: Duration = Duration::from_secs(1);

/// Whether the process's main thread has ended (`pthread_exit`: a zombie
/// until the process exits) and every thread still running is a
/// maintenance thread. glibc ends a process when its last thread exits
/// (`exit(0)`); a maintenance thread would keep it alive for ever, with
/// every signal blocked, so nothing but SIGKILL could end it. Reads
/// `/proc/self/stat` into a stack buffer (no allocation); `false` when it
/// cannot.
fn only_maintainers_left() -> bool {
    let mut buf = [0u8; 1024];
    let Some(text) = crate::platform::read_small_file(c"/proc/self/stat", &mut buf) else {
        return false;
    };
    // After the command name (in parentheses, which it may contain): the
    // state, then 16 more fields, then the thread count.
    let Some(close) = text.iter().rposition(|&b| b == b')') else {
        return false;
    };
    let mut fields = text[close + 1..]
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty());
    let leader_gone = matches!(fields.next(), Some([b'Z'] | [b'X']));
    let threads = fields
        .nth(16)
        .and_then(|f| core::str::from_utf8(f).ok())
        .and_then(|f| f.parse::<usize>().ok());
    match threads {
        // The ended main thread still counts until the process exits.
        Some(t) if leader_gone => t.saturating_sub(1) as u64 <= live(),
        _ => false,
    }
}

fn run(core: &impl Maintained) {
    update_live(|n| n + 1);
    /// Uncounts the thread when it ends, also if a panic unwinds out of the
    /// loop (a shrinker's no longer can: it aborts, see `run_shrinkers`):
    /// still counted, the dead thread would let another maintainer take a
    /// live thread for one of its kind (see `only_maintainers_left`) and
    /// end the process under it.
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            update_live(|n| n.saturating_sub(1));
        }
    }
    let _counted = Counted;
    run_loop(core);
}

fn run_loop(core: &impl Maintained) {
    // Signals go to other threads: a handler interrupting this thread while
    // it holds a zone or node lock, and allocating through `Global` (whose
    // re-entry routing does not know about this thread), would wait on a
    // lock its own thread holds. For the thread's whole life. (It was
    // spawned with them blocked, so this changes nothing unless another
    // path starts it.)
    crate::platform::block_all_signals();
    // An ordinary thread on the main thread's CPUs, whatever started it (a
    // real-time thread pinned to one CPU: see `ordinary_scheduling`).
    crate::platform::ordinary_scheduling();
    let start = Instant::now();
    let mut last_pass: Option<Instant> = None;
    // The thread's own epochs (time since it started) at its last pass.
    let mut last_epoch = 0;
    let mut last_check = Instant::now();
    let nap = if core.nolock_syscalls() { PERIOD } else { POLL };
    loop {
        // Take the owed wake before the work: work announced from now on
        // owes another round.
        let owed = wake_word::take_owed(core.wake_word());
        if core.stop_flag().load(Ordering::Acquire) {
            return;
        }
        if owed || nap == PERIOD {
            core.drain_deferred();
        }
        if last_pass.is_none_or(|t| t.elapsed() >= PERIOD) {
            let epoch = (start.elapsed().as_millis() / EPOCH.as_millis()) as usize + 1;
            core.pass(epoch - last_epoch, IDLE_EPOCHS, IDLE_PASSES);
            last_epoch = epoch;
            last_pass = Some(Instant::now());
        }
        if last_check.elapsed() >= LAST_THREAD_CHECK {
            last_check = Instant::now();
            if only_maintainers_left() {
                // What the last thread's exit would have done.
                // SAFETY: exit has no preconditions; no lock of the heap
                // is held here.
                unsafe { libc::exit(0) };
            }
        }
        // Announce the sleep; sleep only if nothing was owed meanwhile (the
        // futex compares the word with exactly MAINTAINER_SLEEPING, so a
        // wake owed after the announcement ends the wait at once).
        if wake_word::announce_sleep(core.wake_word()) {
            wait(core.wake_word(), MAINTAINER_SLEEPING, nap);
        }
        wake_word::end_sleep(core.wake_word());
    }
}
