//! A lock for the rarely changed registries (the heaps, accounting
//! groups' children), taken only on normal paths and by the fork handler,
//! and tried (never waited for) by a refused nolock charge.
//!
//! State: one word, `owner`: 0 when free, else the holder's thread id
//! (`context::thread_id`; `usize::MAX` when the id is unknown,
//! without std).
//!
//! * `lock`: CAS 0 -> me (Acquire), spinning a little while another thread
//!   holds it, then (std) polling: sleeps [`POLL`] at a time on `released`
//!   until it changes, so that a holder this waiter preempted (a real-time
//!   thread on the holder's CPU) gets the CPU to finish its section: a
//!   waiter that only spun would keep it off the CPU, a livelock that only
//!   the kernel's real-time throttling breaks. Releases make no system
//!   call (nothing wakes a poller: it re-checks after each sleep);
//!   if *this* thread holds it (it interrupted itself) it returns `None`
//!   at once instead of spinning forever; if this thread holds it across
//!   `fork` (`me | FORK_HELD`, stored by `lock_raw`) and owns the fork
//!   window (the `context` module), it borrows it, unless a borrowed guard
//!   is live (`lent`: a handler that interrupted that section gets `None`,
//!   as above): the guard's drop releases nothing but `lent`. In a
//!   process that may hold orphaned locks (the `fork` module's "Orphaned
//!   locks"), the spin ends after `fork::ORPHAN_PATIENCE` with `None` too,
//!   and marks the lock held across a fork (`cur | FORK_HELD`), which
//!   every caller there gives up on at once;
//! * `try_lock`: one CAS (any context: the nolock charge path uses it to
//!   reach other groups' stocks on a refusal);
//! * release (guard drop): store 0 (Release), then `released + 1`
//!   (a poller that looked before the release does not sleep through it).
//!
//! The owner is set by the acquiring CAS itself, so "this thread holds it"
//! is exact at every instant: a handler that interrupted the holder and
//! asks for the lock gets `None`, never a wait. That is why, unlike the
//! zone lock, it does not mark the thread inside the allocator: the
//! registries' owners allocate under it (a `Vec` push), and those
//! allocations must stay on the normal path, which may wait and so never
//! fails for want of a lock. No allocation path waits for a registry lock
//! held across another thread's `fork` (`lock_giving_way`: an accounted
//! allocation's retry, which flushes its group tree's stocks).
//!
//! It never allocates; only a waiting `lock` makes system calls (its
//! timed sleeps, std only; without std it spins). Not modelled under loom
//! (a `static` needs a `const` constructor): the registries hold plain
//! data, and the protocol is the slot lock's plus the owner check.

use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::context;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct RegistryLock {
    owner: AtomicUsize,
    /// A borrowed guard of the fork window is live: the holder is inside a
    /// section of its own, which a signal handler on its thread must not
    /// enter. Only the window's owner thread (and its handlers, which nest)
    /// touches it.
    lent: AtomicBool,
    /// Bumped by every release: what a polling waiter sleeps on.
    released: AtomicU32,
}

/// How many times a waiting `lock` retries before it starts sleeping.
const SPIN_LIMIT: u32 = 100;

/// How long a waiting `lock` sleeps between looks (std): short against
/// the sections it waits for to end, long enough to let a preempted
/// holder run.
#[cfg(feature = "std")]
const POLL: core::time::Duration = core::time::Duration::from_micros(50);

/// Proof that a [`RegistryLock`] is held; releases it when dropped.
pub(crate) struct RegistryGuard<'a> {
    lock: &'a RegistryLock,
    /// Borrowed in the fork window: dropping it releases nothing.
    borrowed: bool,
}

/// Whether this process may hold orphaned locks (the `fork` module's
/// "Orphaned locks"; without std: no fork).
#[inline]
fn orphaned() -> bool {
    #[cfg(feature = "std")]
    return crate::fork::orphaned();
    #[cfg(not(feature = "std"))]
    false
}

fn me() -> usize {
    match context::thread_id() {
        0 => usize::MAX,
        id => id,
    }
}

impl RegistryLock {
    pub(crate) const fn new() -> Self {
        RegistryLock {
            owner: AtomicUsize::new(0),
            lent: AtomicBool::new(false),
            released: AtomicU32::new(0),
        }
    }

    /// Takes the lock, spinning a little and then sleeping (std) while
    /// another thread holds it; `None` when
    /// this thread holds it already (normal context only).
    pub(crate) fn lock(&self) -> Option<RegistryGuard<'_>> {
        self.lock_waiting(false)
    }

    /// As [`lock`](Self::lock), but also `None`, at once, while a `fork` on
    /// another thread holds the lock (`lock_raw`): that fork may be waiting
    /// for this thread (see the `fork` module's "Other threads give way").
    /// For callers on an allocation's path that can do without the lock.
    pub(crate) fn lock_giving_way(&self) -> Option<RegistryGuard<'_>> {
        self.lock_waiting(true)
    }

    fn lock_waiting(&self, give_way: bool) -> Option<RegistryGuard<'_>> {
        let me = me();
        // When the spin started, in a process that may hold orphaned locks
        // (set on its first turn there).
        #[cfg(feature = "std")]
        let mut orphan_since: Option<std::time::Instant> = None;
        let mut spins = 0u32;
        loop {
            // Read before the CAS: a release after it changes the word, and
            // a sleep on the old value then returns at once.
            #[cfg(all(feature = "std", target_os = "linux"))]
            let released = self.released.load(Ordering::Acquire);
            match self
                .owner
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(RegistryGuard {
                        lock: self,
                        borrowed: false,
                    })
                }
                Err(cur) if cur == me && me != usize::MAX => return None,
                Err(cur) if cur == me | context::FORK_HELD && me != usize::MAX => {
                    // Borrowed once at a time: a handler that interrupted
                    // a borrowed section is told "held by this thread".
                    if !context::owns_fork_window() || self.lent.load(Ordering::Relaxed) {
                        return None;
                    }
                    self.lent.store(true, Ordering::Relaxed);
                    compiler_fence(Ordering::SeqCst);
                    return Some(RegistryGuard {
                        lock: self,
                        borrowed: true,
                    });
                }
                // Held across another thread's fork (`usize::MAX`, an
                // unknown holder, has the bit too but is never held so).
                // In a process that may hold orphaned locks, for every
                // caller: no fork there takes it (their prepares take
                // nothing), so its holder is a thread of the parent held
                // it at the clone, or a wait below marked it so.
                Err(cur)
                    if (give_way || orphaned())
                        && cur & context::FORK_HELD != 0
                        && cur != usize::MAX =>
                {
                    return None
                }
                Err(_cur) => {
                    // A holder that is gone (see the `fork` module's
                    // "Orphaned locks"): `None`, as for this thread's own,
                    // and the lock marked held across a fork, so that the
                    // next callers give up at once (a holder that is alive
                    // after all releases it as usual: its store reads
                    // nothing).
                    #[cfg(feature = "std")]
                    if crate::fork::orphaned()
                        && orphan_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            >= crate::fork::ORPHAN_PATIENCE
                    {
                        if _cur != usize::MAX {
                            let _ = self.owner.compare_exchange(
                                _cur,
                                _cur | context::FORK_HELD,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                        return None;
                    }
                    if spins < SPIN_LIMIT {
                        spins += 1;
                        core::hint::spin_loop();
                        continue;
                    }
                    // The holder is not finishing within a spin: it may be
                    // off the CPU, preempted by this very thread (a
                    // real-time one). Sleep, so that it can run.
                    #[cfg(all(feature = "std", target_os = "linux"))]
                    crate::platform::futex::wait(&self.released, released, Some(POLL));
                    #[cfg(all(feature = "std", not(target_os = "linux")))]
                    std::thread::sleep(POLL);
                    #[cfg(not(feature = "std"))]
                    core::hint::spin_loop();
                }
            }
        }
    }

    /// Takes the lock if it is free right now (any context: one CAS, never
    /// a wait; `None` when anyone holds it, this thread included).
    pub(crate) fn try_lock(&self) -> Option<RegistryGuard<'_>> {
        self.owner
            .compare_exchange(0, me(), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| RegistryGuard {
                lock: self,
                borrowed: false,
            })
    }

    /// Fork support: takes the lock without a guard and marks it held
    /// across the fork (`FORK_HELD`); `false`: this thread holds it already.
    /// Pair with [`force_unlock`](Self::force_unlock).
    #[cfg(feature = "std")]
    pub(crate) fn lock_raw(&self) -> bool {
        match self.lock() {
            Some(g) if !g.borrowed => {
                core::mem::forget(g);
                self.owner
                    .store(me() | context::FORK_HELD, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Releases a lock taken with [`lock_raw`](Self::lock_raw) (here, or in
    /// the parent of this forked child).
    ///
    /// # Safety
    /// `lock_raw` returned `true` and nothing else releases the lock.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn force_unlock(&self) {
        self.owner.store(0, Ordering::Release);
        self.released.fetch_add(1, Ordering::Release);
    }
}

impl RegistryGuard<'_> {
    /// Whether the lock is borrowed in the fork window (held across `fork`
    /// by this thread) rather than taken.
    #[cfg(feature = "std")]
    pub(crate) fn borrowed(&self) -> bool {
        self.borrowed
    }
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        if self.borrowed {
            compiler_fence(Ordering::SeqCst);
            self.lock.lent.store(false, Ordering::Relaxed);
            return;
        }
        self.lock.owner.store(0, Ordering::Release);
        self.lock.released.fetch_add(1, Ordering::Release);
    }
}
