//! Synchronisation primitives that are safe to use from any context.
//!
//! The building blocks, each small enough to be model-checked with
//! loom: four public ones, then four the crate keeps to itself.
//!
//! * [`SlotLock`]: a try-only lock for per-CPU slots. It has no `lock()`: a
//!   busy slot means "fall back", never "spin". This is the userspace
//!   counterpart of the kernel's `local_trylock_t`; it must be a real CAS
//!   because a userspace thread can be preempted or migrate while holding it.
//! * [`ZoneLock`]: a lock with both `lock()` (spin briefly, then wait through
//!   the [`Platform`](crate::Platform)) and `try_lock()`. The normal path uses
//!   `lock()`, the nolock path only `try_lock()`; no path ever does
//!   "try_lock, then lock".
//! * [`IndexStack`]: an intrusive lock-free stack of words with `push` and
//!   `take_all` only (no single pop, hence no ABA problem). It holds the
//!   deferred object frees that could not take a lock.
//! * [`TaggedStack`]: an intrusive lock-free stack of `u32` page indices
//!   with a version tag, so it can also `pop` one element (O(1), ABA-safe):
//!   the zones' per-order deferred page frees.
//! * `FastGate` (crate-internal): the gate of a cache's normal fast path,
//!   closed while objects may wait on its deferred stack.
//! * `ShortOrders` (crate-internal): which orders of a zone's nolock stock
//!   may have an empty cell, so that zone-lock holders refill only those.
//! * `RegistryLock` (crate-internal): a lock with an owner word for the
//!   rarely changed registries (heaps, groups' children): waiters spin a
//!   little, then sleep in short naps (std), so that a holder preempted by
//!   a real-time waiter on its CPU runs; a thread that interrupted itself
//!   inside one gets `None` instead of waiting.
//!
//! * `wake_word` (crate-internal): how any context owes the maintenance
//!   thread a wake, at most one system call per sleep, none lost.
//!
//! None of them allocates. Under `cfg(loom)` they use loom's atomics (see
//! the `atomic` module) so the loom tests beside them explore every
//! interleaving (or, where marked, every interleaving within a bound on
//! preemptions), and their futex waits are the `loom_futex` module's: a
//! waiter sleeps until a wake picks it, so a lost wake-up is a deadlock
//! loom reports.

pub(crate) mod atomic;
mod fast_gate;
#[cfg(all(test, loom))]
mod handoff_loom;
#[cfg(all(feature = "std", target_arch = "x86_64", target_os = "linux"))]
mod hidden_word;
mod index_stack;
#[cfg(loom)]
mod loom_futex;
mod registry_lock;
pub(crate) mod rseq;
mod short_orders;
mod slot_lock;
mod tagged_stack;
pub(crate) mod wake_word;
mod zone_lock;

pub(crate) use fast_gate::FastGate;
#[cfg(all(feature = "std", target_arch = "x86_64", target_os = "linux"))]
pub(crate) use hidden_word::hidden_word;
pub use index_stack::{IndexStack, NIL};
pub(crate) use registry_lock::{RegistryGuard, RegistryLock};
pub(crate) use short_orders::ShortOrders;
/// The held state the rseq lock sequence stores (`rseq::lock_slot`).
#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
))]
pub(crate) use slot_lock::HELD as SLOT_HELD;
pub use slot_lock::{SlotGuard, SlotLock};
pub use tagged_stack::{TaggedStack, TAGGED_NIL};
pub use zone_lock::{Mode, ZoneGuard, ZoneLock};
