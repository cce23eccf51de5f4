//! The atomics facade: std's atomics normally, loom's under `cfg(loom)`.
//!
//! Only the primitives in [`crate::sync`] go through this facade; the rest of
//! the crate uses `core::sync::atomic` directly (its statics need `const`
//! constructors, which loom's types do not have).

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// A hint to the CPU that we are spinning (loom: yield to the scheduler).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(loom))]
    core::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// An Acquire fence (loom: its model of one).
#[inline]
pub(crate) fn fence_acquire() {
    #[cfg(not(loom))]
    core::sync::atomic::fence(Ordering::Acquire);
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::Acquire);
}

/// A sequentially consistent fence (loom: its model of one).
#[inline]
pub(crate) fn fence_seq_cst() {
    #[cfg(not(loom))]
    core::sync::atomic::fence(Ordering::SeqCst);
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}
