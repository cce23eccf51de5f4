//! What the allocator needs from its environment.
//!
//! [`Platform`] is the whole contract: the current CPU id, the CPU count, how
//! to relax while spinning, how a normal-path waiter sleeps and is woken, and
//! how to die on heap corruption. On std, `StdPlatform` provides it (rseq
//! CPU id, futex, write(2) + abort); in `no_std` the embedder implements it
//! (its CPU id, a spin loop with interrupts enabled, its panic path).
//!
//! Every method except [`Platform::wait`], [`Platform::wait_timeout`] and
//! [`Platform::wake_many`] (normal context only) may be called on the
//! nolock path and must itself be safe in any context: no lock that can
//! wait, no allocation, no blocking syscall. The three normal-context ones
//! may sleep, but must not allocate from an allocator built on this
//! platform either: they run while the caller holds some of its locks
//! (a waiter for a zone lock may hold a cache's node lock), and without a
//! [`Platform::thread_id`] a normal-path call that needs one of those
//! waits for its own thread for ever.

use core::sync::atomic::AtomicU32;

#[cfg(all(feature = "std", target_os = "linux"))]
pub mod futex;
#[cfg(feature = "std")]
mod std_os;
#[cfg(feature = "std")]
pub use std_os::StdPlatform;
#[cfg(feature = "std")]
pub(crate) use std_os::{
    address_space_headroom, block_all_signals, monotonic_ns, ordinary_scheduling, os_discard,
    os_release, os_remap, os_reserve, parse_decimal, read_small_file, rseq_area, write_stderr,
    CancelDisabled, KeepErrno, SignalsBlocked,
};

/// Without std there is no rseq area to keep clear of (see
/// `page::zone::descs_offset`).
#[cfg(not(feature = "std"))]
pub(crate) fn rseq_area() -> Option<usize> {
    None
}

mod fatal;
pub(crate) use fatal::{die, FatalMessage};

/// How long [`nap`] sleeps.
#[cfg(feature = "std")]
pub(crate) const NAP: core::time::Duration = core::time::Duration::from_micros(50);

/// Sleeps about [`NAP`] (normal context only; `errno` kept): for a wait
/// that polls for another thread's progress. Unlike `sched_yield`, which
/// returns at once to a real-time (`SCHED_FIFO`) caller when only
/// lower-priority threads are ready, it lets the thread being waited for
/// run even when the caller preempted it on its own CPU.
#[cfg(feature = "std")]
pub(crate) fn nap() {
    #[cfg(target_os = "linux")]
    {
        // Nobody wakes this word: the wait lasts the timeout (or less,
        // after a signal).
        let word = AtomicU32::new(0);
        futex::wait(&word, 0, Some(NAP));
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _errno = KeepErrno::new();
        std::thread::sleep(NAP);
    }
}

/// The environment of an allocator. See the module documentation.
///
/// # Example: a `no_std` embedder with one CPU
///
/// ```
/// use anyalloc::Platform;
/// struct OneCpu;
/// impl Platform for OneCpu {
///     fn cpu_id(&self) -> usize { 0 }
///     fn cpu_count(&self) -> usize { 1 }
/// }
/// assert_eq!(OneCpu.cpu_id(), 0);
/// ```
pub trait Platform: Sync {
    /// The id of the CPU this context runs on, below [`Platform::cpu_count`]
    /// (larger values are reduced modulo the count). Any context; may be
    /// stale by the time it returns (the allocator only uses it as a hint).
    fn cpu_id(&self) -> usize;

    /// How many CPUs there are. Read once, when an allocator is created.
    fn cpu_count(&self) -> usize;

    /// Called while spinning on a lock held by another context: by the
    /// default [`wait`](Self::wait) and [`wait_timeout`](Self::wait_timeout)
    /// (the locks' own short spins before they wait use the CPU's spin
    /// hint), so an override matters only to a platform that keeps those.
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// Normal context only: wait while `*word == expected`; may return
    /// spuriously. The default spins once.
    fn wait(&self, word: &AtomicU32, expected: u32) {
        let _ = (word, expected);
        self.relax();
    }

    /// Normal context only: wait while `*word == expected`, at most about
    /// `nanos` nanoseconds; may return early or spuriously. Used by lock
    /// waiters that poll instead of being woken (`Config::nolock_syscalls`
    /// off). The default spins once.
    fn wait_timeout(&self, word: &AtomicU32, expected: u32, nanos: u64) {
        let _ = (word, expected, nanos);
        self.relax();
    }

    /// Wake one context waiting in [`Platform::wait`] on `word`. Any context:
    /// must not block.
    fn wake_one(&self, word: &AtomicU32) {
        let _ = word;
    }

    /// Wake up to `n` contexts waiting in [`Platform::wait`] on `word` (a
    /// lock held across `fork` wakes all its waiters, so that they give
    /// way). Normal context. The default calls
    /// [`wake_one`](Self::wake_one) `n` times.
    fn wake_many(&self, word: &AtomicU32, n: u32) {
        for _ in 0..n {
            self.wake_one(word);
        }
    }

    /// An id of the current thread (or context) that no other live thread
    /// shares, for the zone lock's owner word: any value but 0, which (the
    /// default) means unknown. Any context. With std the crate uses its own
    /// thread id and never calls this.
    ///
    /// It is a backstop, not a router: with an id, a normal-path call that
    /// waits for a zone lock its own thread holds (an interrupt handler
    /// that interrupted the holder) stops with [`fatal`](Self::fatal)
    /// instead of hanging, except in the instant between the holder's
    /// acquisition and its store of the owner word, where it still hangs.
    /// Without an id it always hangs. Route handlers to the nolock calls
    /// either way.
    fn thread_id(&self) -> usize {
        0
    }

    /// Heap corruption was detected (double free, foreign pointer): report
    /// the one-line `message` and stop. Any context: must not allocate,
    /// format, panic or wait. The default writes the line to stderr with
    /// write(2) and aborts (std); without std it executes the CPU's trap
    /// instruction, so an embedder that wants the message reported
    /// overrides this. (The allocator's internal consistency checks, which
    /// find a bug of its own rather than of the caller, and all but two of
    /// which are compiled into debug builds only, do not go through the
    /// platform: without std they trap at once, with no message.)
    fn fatal(&self, message: &[u8]) -> ! {
        fatal::die(message)
    }
}
