//! The maintenance thread (std): the userspace counterpart of kswapd and
//! `irq_work`.
//!
//! It sleeps on the heap's wake word (a futex) and is woken from any context
//! by a nolock free that had to park memory on a deferred list (an atomic
//! add and a futex wake: async-signal-safe, never blocking). Each wake it
//! drains the deferred lists at once; every 50 ms it also runs a full pass
//! (`HeapCore::maintain_pass`): per-CPU lists and sheaves that saw demand
//! are stocked, caches and barns left unchanged for half a second give their
//! objects back to the slabs and their pages back to the buddy lists,
//! shrinkers run below the low watermark, and free blocks of 256 KiB or
//! more that stayed idle for half a second go back to the OS (`MADV_DONTNEED`).
//!
//! It never holds a lock a nolock caller needs for longer than an ordinary
//! normal-path operation would: it uses the same normal-path functions. It
//! blocks every signal, so no handler can interrupt it inside a lock.

extern crate std;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::slab::HeapCore;

const NONE: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;

/// How often the maintainer runs a full pass, and how long it sleeps when
/// nothing wakes it.
const PERIOD: Duration = Duration::from_millis(50);
/// Epoch length for idle-memory accounting.
const EPOCH: Duration = Duration::from_millis(100);
/// Epochs a free block stays idle before it goes back to the OS.
const IDLE_EPOCHS: usize = 5;
/// Passes (one per `PERIOD`) a per-CPU cache or a barn stays unchanged
/// before its objects and pages go back: half a second. With `IDLE_EPOCHS`
/// this puts memory freed by a burst back with the OS within about 1.5 s.
const IDLE_PASSES: u32 = 10;

/// A heap's maintenance thread, if started.
pub(crate) struct MaintainerSlot {
    state: AtomicU8,
    handle: UnsafeCell<Option<std::thread::JoinHandle<()>>>,
}

impl MaintainerSlot {
    pub(crate) fn new() -> Self {
        MaintainerSlot {
            state: AtomicU8::new(NONE),
            handle: UnsafeCell::new(None),
        }
    }

    /// Starts the thread for the core at `core` unless one runs; returns
    /// whether a thread runs (or is being started) afterwards.
    pub(crate) fn start(&self, core: usize) -> bool {
        match self
            .state
            .compare_exchange(NONE, STARTING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(_) => return true,
        }
        let spawned = std::thread::Builder::new()
            .name(std::string::String::from("anyalloc-maintainer"))
            .spawn(move || {
                // SAFETY: the core outlives the thread: `stop` joins it
                // before the heap releases the core.
                run(unsafe { &*(core as *const HeapCore) })
            });
        match spawned {
            Ok(h) => {
                // SAFETY: only the context that won the CAS writes the
                // handle, before publishing RUNNING.
                unsafe { *self.handle.get() = Some(h) };
                self.state.store(RUNNING, Ordering::Release);
                true
            }
            Err(_) => {
                self.state.store(NONE, Ordering::Release);
                false
            }
        }
    }

    /// In a forked child: the thread stayed in the parent. Forgets it (its
    /// handle names a thread that does not exist here), so that `start`
    /// starts a new one; returns whether one ran in the parent.
    pub(crate) fn forget_after_fork(&self) -> bool {
        // SAFETY: only the forking thread exists in the child: nothing else
        // reads or writes the handle.
        core::mem::forget(unsafe { (*self.handle.get()).take() });
        self.state.swap(NONE, Ordering::AcqRel) == RUNNING
    }

    /// Stops and joins the thread, if one runs.
    pub(crate) fn stop(&self, core: &HeapCore) {
        if self.state.load(Ordering::Acquire) != RUNNING {
            return;
        }
        core.stop.store(true, Ordering::Release);
        core.wake_maintainer();
        // SAFETY: RUNNING was published after the handle was written; `stop`
        // runs from the heap's drop, with exclusive access to the handle.
        if let Some(h) = unsafe { (*self.handle.get()).take() } {
            let _ = h.join();
        }
        self.state.store(NONE, Ordering::Release);
    }
}

fn wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned word, which outlives the call, and
    // returns at the latest after the relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            seen,
            &ts as *const libc::timespec,
        );
    }
}

fn run(core: &HeapCore) {
    // Signals go to other threads: a handler interrupting this thread while
    // it holds a zone or node lock, and allocating through `Global` (whose
    // re-entry routing does not know about this thread), would wait on a
    // lock its own thread holds.
    // SAFETY: a filled sigset_t and a null old-set pointer are valid
    // arguments; this only changes the calling thread's mask.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, core::ptr::null_mut());
    }
    let start = Instant::now();
    let mut last_pass: Option<Instant> = None;
    loop {
        let seen = core.wake.load(Ordering::Acquire);
        if core.stop.load(Ordering::Acquire) {
            return;
        }
        core.drain_deferred_only();
        if last_pass.is_none_or(|t| t.elapsed() >= PERIOD) {
            let epoch = (start.elapsed().as_millis() / EPOCH.as_millis()) as usize + 1;
            core.maintain_pass(epoch, IDLE_EPOCHS, IDLE_PASSES);
            last_pass = Some(Instant::now());
        }
        wait(&core.wake, seen, PERIOD);
    }
}
