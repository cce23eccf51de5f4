//! Evidence of re-entry: did a signal land while its thread was inside an
//! allocator call, and did it interrupt another storm handler?
//!
//! A storm is about re-entry, so it counts it rather than assuming it. The
//! worker raises a narrow flag around exactly each allocator call
//! ([`inside`]); a handler, first thing, takes a [`HandlerEntry`], which
//! records whether the flag was up (the handler interrupted an allocator
//! call) and how many storm handlers were already running on the thread
//! (nesting), and holds the handler's nesting level until it is dropped.
//!
//! The state is a [`Reentry`]: two atomics that only one thread and the
//! handlers running on top of it ever change (anyone may read them). Each
//! thread has one of its own behind the free functions ([`inside`],
//! [`in_allocator`], [`HandlerEntry::enter`]): a `const`-initialised
//! thread-local without a destructor, which a handler reads with a plain
//! thread-local access (no lazy initialisation, no allocation). A program
//! that wants another thread to read the state (a watchdog) puts a
//! [`Reentry`] in a static slot of that thread instead and uses its
//! methods.
//!
//! Why relaxed accesses and compiler fences suffice: the flag is changed
//! by the thread and by handlers that interrupt it, and every handler puts
//! back what it changed before it returns, so the thread never sees a
//! handler's change; a handler that interrupts the thread sees everything
//! the thread did before the interruption (same thread). Only the compiler
//! could move the call's code outside the flag, and the fences forbid it.

use std::marker::PhantomData;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{compiler_fence, AtomicU32, AtomicU64, Ordering};

/// One thread's re-entry state: the allocator calls it is inside and the
/// storm handlers running on it. Handler-safe.
#[derive(Debug, Default)]
pub struct Reentry {
    /// Allocator calls this thread (its code or its handlers) is inside.
    in_alloc: AtomicU32,
    /// Storm handlers running right now on this thread.
    depth: AtomicU32,
}

impl Reentry {
    /// A thread outside any allocator call and any handler.
    pub const fn new() -> Self {
        Reentry {
            in_alloc: AtomicU32::new(0),
            depth: AtomicU32::new(0),
        }
    }

    /// Runs `f`, one allocator call, with the in-allocator flag raised
    /// around exactly that call. Call it only on the thread this state
    /// belongs to (or in its handlers). A plain load and store suffice (no
    /// read-modify-write: this sits on the timed path of the storms): a
    /// handler that lands between them sees the flag as it was, which is
    /// right, as the call has not begun or has ended.
    #[inline(always)]
    pub fn inside<R>(&self, f: impl FnOnce() -> R) -> R {
        let n = self.in_alloc.load(Ordering::Relaxed);
        self.in_alloc.store(n + 1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        let r = f();
        compiler_fence(Ordering::SeqCst);
        self.in_alloc.store(n, Ordering::Relaxed);
        r
    }

    /// Whether the thread is inside an allocator call (see
    /// [`Reentry::inside`]).
    #[inline]
    pub fn in_allocator(&self) -> bool {
        self.in_alloc.load(Ordering::Relaxed) != 0
    }

    /// Storm handlers running on the thread right now.
    #[inline]
    pub fn depth(&self) -> u32 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Call first thing in a storm handler running on this state's thread;
    /// keep the value until the handler returns.
    #[inline]
    pub fn enter(&self) -> HandlerEntry<'_> {
        HandlerEntry::on(Some(self))
    }

    fn arrive(&self) -> (u32, bool) {
        let in_allocator = self.in_allocator();
        let depth = self.depth.fetch_add(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        (depth, in_allocator)
    }

    fn leave(&self) {
        compiler_fence(Ordering::SeqCst);
        self.depth.fetch_sub(1, Ordering::Relaxed);
    }
}

std::thread_local! {
    /// The calling thread's state. Const-initialised and without a
    /// destructor: a handler's access is a plain thread-local load.
    static THREAD: Reentry = const { Reentry::new() };
}

/// Runs `f`, one allocator call, with the calling thread's in-allocator flag
/// raised around exactly that call ([`Reentry::inside`] on the thread's own
/// state). Handler-safe.
#[inline(always)]
pub fn inside<R>(f: impl FnOnce() -> R) -> R {
    THREAD.with(|t| t.inside(f))
}

/// Whether the calling thread is inside an allocator call (see [`inside`]).
/// Handler-safe.
#[inline]
pub fn in_allocator() -> bool {
    THREAD.with(Reentry::in_allocator)
}

/// What a storm handler learns on entry; dropping it ends the handler's
/// nesting level. Handler-safe. Not `Send`: it belongs to the handler (and
/// thread) that took it.
#[must_use = "the handler's nesting level ends when this is dropped"]
pub struct HandlerEntry<'a> {
    /// `None`: the calling thread's own state.
    on: Option<&'a Reentry>,
    depth: u32,
    in_allocator: bool,
    _not_send: PhantomData<*const ()>,
}

impl HandlerEntry<'static> {
    /// Call first thing in a storm handler; keep the value until the handler
    /// returns. Uses the calling thread's own state (the one [`inside`]
    /// raises).
    #[inline]
    pub fn enter() -> Self {
        HandlerEntry::on(None)
    }
}

impl<'a> HandlerEntry<'a> {
    fn on(on: Option<&'a Reentry>) -> Self {
        let (depth, in_allocator) = match on {
            Some(r) => r.arrive(),
            None => THREAD.with(Reentry::arrive),
        };
        HandlerEntry {
            on,
            depth,
            in_allocator,
            _not_send: PhantomData,
        }
    }

    /// Storm handlers that were already running on this thread when this
    /// one began (0: it interrupted ordinary code).
    #[inline]
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// This handler interrupted another storm handler on the same thread.
    #[inline]
    pub fn nested(&self) -> bool {
        self.depth > 0
    }

    /// The thread was inside an allocator call when this handler began: a
    /// call of its ordinary code or, for a nested handler, one of the
    /// interrupted handler's own calls (if it raised the flag around them).
    #[inline]
    pub fn in_allocator(&self) -> bool {
        self.in_allocator
    }

    /// This handler interrupted an allocator call of the thread's ordinary
    /// code directly (not another handler running on top of one).
    #[inline]
    pub fn interrupted_allocator(&self) -> bool {
        self.depth == 0 && self.in_allocator
    }
}

impl Drop for HandlerEntry<'_> {
    fn drop(&mut self) {
        match self.on {
            Some(r) => r.leave(),
            None => THREAD.with(Reentry::leave),
        }
    }
}

/// The counts a storm keeps of its handlers' runs: every run, the nested
/// ones, and those that interrupted an allocator call of the thread's
/// ordinary code; and the check, at the end, that the storm did what it
/// was for. Handler-safe (relaxed atomics), `const`-constructed for a
/// `static`.
pub struct StormCounts {
    signals: AtomicU64,
    nested: AtomicU64,
    inside: AtomicU64,
}

impl StormCounts {
    /// All counts at 0.
    pub const fn new() -> Self {
        StormCounts {
            signals: AtomicU64::new(0),
            nested: AtomicU64::new(0),
            inside: AtomicU64::new(0),
        }
    }

    /// Counts the run of a handler entered as `entry`; returns how many
    /// runs came before it.
    pub fn record(&self, entry: &HandlerEntry<'_>) -> u64 {
        let run = self.signals.fetch_add(1, Relaxed);
        if entry.nested() {
            self.nested.fetch_add(1, Relaxed);
        }
        if entry.interrupted_allocator() {
            self.inside.fetch_add(1, Relaxed);
        }
        run
    }

    /// Handler runs so far.
    pub fn signals(&self) -> u64 {
        self.signals.load(Relaxed)
    }

    /// Runs that interrupted another storm handler.
    pub fn nested(&self) -> u64 {
        self.nested.load(Relaxed)
    }

    /// Runs that interrupted an allocator call of ordinary code.
    pub fn inside(&self) -> u64 {
        self.inside.load(Relaxed)
    }

    /// Panics unless the storm happened (more than 1000 runs), two signals
    /// nested at least once, and a signal interrupted an allocator call.
    pub fn assert_storm(&self) {
        assert!(self.signals() > 1000, "the storm happened");
        assert!(self.nested() > 0, "the two signals never nested");
        assert!(self.inside() > 0, "no signal interrupted an allocator call");
    }
}

impl Default for StormCounts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_see_the_flag_and_the_depth() {
        let outer = HandlerEntry::enter();
        assert_eq!((outer.depth(), outer.in_allocator()), (0, false));
        inside(|| {
            assert!(in_allocator());
            let nested = HandlerEntry::enter();
            assert!(nested.nested() && nested.in_allocator());
            assert!(!nested.interrupted_allocator(), "it interrupted a handler");
        });
        drop(outer);
        inside(|| {
            let e = HandlerEntry::enter();
            assert!(e.interrupted_allocator() && !e.nested());
        });
        assert!(!in_allocator());
    }

    #[test]
    fn a_slot_state_is_separate_and_readable() {
        static SLOT: Reentry = Reentry::new();
        let e = SLOT.enter();
        assert_eq!(SLOT.depth(), 1);
        SLOT.inside(|| {
            assert!(SLOT.in_allocator() && !in_allocator());
            let n = SLOT.enter();
            assert_eq!((n.depth(), SLOT.depth()), (1, 2));
        });
        drop(e);
        assert_eq!(SLOT.depth(), 0);
    }
}
