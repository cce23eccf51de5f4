//! The atomics facade: std's atomics normally, loom's under `cfg(loom)`.
//!
//! Only the primitives in [`crate::sync`] go through this facade; the rest of
//! the crate uses `core::sync::atomic` directly (its statics need `const`
//! constructors, which loom's types do not have).

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// A hint to the CPU that we are spinning. Not under loom: the bounded
/// spins that use it look again without yielding there (a loom yield lets
/// the other threads run first, which would hide the path after the spin).
#[cfg(not(loom))]
#[inline]
pub(crate) fn spin_hint() {
    core::hint::spin_loop();
}
