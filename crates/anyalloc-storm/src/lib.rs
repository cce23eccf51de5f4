//! The signal-storm kit: what every anyalloc storm needs, in one place.
//!
//! A *storm* runs worker threads on an allocator's normal path while
//! per-thread POSIX timers interrupt them with signals whose handlers
//! allocate and free on the nolock path, possibly nested in each other. The
//! allocator's tests (`crates/anyalloc/tests`), the `anyalloc stress`
//! command, the benchmark suite's survival and burst workloads and the
//! examples all run storms; this crate is the machinery they share, so a
//! fix or a stronger check lands in all of them at once. It does not depend
//! on `anyalloc` (the allocator's tests use it as a dev-dependency) and
//! knows nothing of any allocator: the storms themselves, with their
//! workloads, counters and assertions, stay with their users.
//!
//! | module | what |
//! |---|---|
//! | [`signal`] | handlers (`SA_SIGINFO`, a chosen mask), per-thread timers ([`ThreadTimer`], `SIGEV_THREAD_ID`), signal masks, raising a signal on this thread, `errno` preservation, reading a timer signal's value |
//! | [`reentry`] | evidence of re-entry: the narrow per-thread "inside an allocator call" flag ([`inside`]) and the handlers' nesting depth ([`HandlerEntry`]) |
//! | [`stash`] | [`Stash`]: a fixed array of atomic handles that a thread and the handlers nested on top of it share without losing or duplicating one; [`HandlerSlot`]: what one thread's handlers share (a stash, a random counter, run counts) |
//! | [`pattern`] | owner-tagged block contents: a handle ([`Entry`]) packs an address with a kind and a per-allocation nonce; the fill is derived from address, size, kind and nonce, so two owners of one block are caught even when they asked for the same size |
//! | [`rng`] | [`XorShift`] for threads and [`mix64`] for handlers |
//! | [`thread`] | thread id, CPU pinning, the current CPU, a monotonic clock |
//!
//! # What a signal handler may call
//!
//! A handler may have interrupted anything, including `malloc` or a lock
//! holder on its own thread, so what it calls must be async-signal-safe: no
//! allocation through the global allocator, no lock, no formatting or
//! printing, no lazily initialised `thread_local!` (its first access may
//! allocate or register a destructor). Everything in this crate that is
//! marked **handler-safe** keeps to that: it is built from atomics, plain
//! memory accesses, `const`-initialised thread-locals without destructors,
//! and system calls that POSIX lists as async-signal-safe (`clock_gettime`,
//! `tgkill`, `getpid`, `gettid`, `sched_getcpu`, `write`). In particular:
//!
//! * handler-safe: [`inside`], [`in_allocator`], [`Reentry`],
//!   [`HandlerEntry`], [`raise_here`], [`ErrnoGuard`],
//!   [`signal::signal_value`], [`signal::timer_signal`], [`signal::die`],
//!   every method of [`Stash`] except `drain` (which is meant for teardown,
//!   but is no less safe) and of [`HandlerSlot`], everything in [`pattern`]
//!   and [`rng`],
//!   [`thread::gettid`], [`thread::current_cpu`], [`thread::now_ns`];
//! * normal context only (they report failure through `std::io::Error` or
//!   may panic): [`install_handler`], [`mask`], [`ThreadTimer::start`] and
//!   its drop, [`thread::pin_to_cpu`].
//!
//! Nothing here panics on a handler-safe path: where a handle cannot be
//! built (an address beyond 48 bits) the process gets a one-line message
//! through `write(2)` and aborts ([`signal::die`]).
//!
//! # Example
//!
//! ```
//! use anyalloc_storm::{install_handler, storm_signals, ErrnoGuard, HandlerEntry, ThreadTimer};
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//! use std::time::Duration;
//!
//! static SIGNALS: AtomicU64 = AtomicU64::new(0);
//!
//! extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
//!     let _errno = ErrnoGuard::save();
//!     let _entry = HandlerEntry::enter(); // this handler's nesting level
//!     SIGNALS.fetch_add(1, Relaxed);
//! }
//!
//! let [a, _b] = storm_signals();
//! install_handler(a, handler, &[]).unwrap();
//! let timer = ThreadTimer::start(a, Duration::from_micros(200), 0).unwrap();
//! while SIGNALS.load(Relaxed) < 3 {
//!     std::hint::spin_loop();
//! }
//! drop(timer);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod pattern;
pub mod reentry;
pub mod rng;
pub mod signal;
pub mod stash;
pub mod thread;

pub use pattern::{Entry, Mismatch};
pub use reentry::{in_allocator, inside, HandlerEntry, Reentry, StormCounts};
pub use rng::{mix64, XorShift};
pub use signal::{
    install_handler, mask, raise_here, storm_signals, ErrnoGuard, Handler, ThreadTimer,
};
pub use stash::{HandlerSlot, Stash};
