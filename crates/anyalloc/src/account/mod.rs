//! Accounting groups: memcg-like hierarchical limits that hold from any
//! context.
//!
//! A [`Group`] has a usage counter, an optional limit, a peak and a failure
//! count, and an optional parent. Charging `n` bytes adds `n` to the group's
//! counter and every ancestor's with `fetch_add`; if any counter ends above
//! its limit, every counter charged so far is rolled back and the group
//! whose limit refused counts a failure. No lock, no waiting: the nolock
//! path charges at once, never deferred.
//!
//! # Per-CPU charge stock
//!
//! Hierarchical atomics on every allocation would bounce the counters'
//! cache lines between CPUs, so each group keeps a small *stock* of
//! pre-charged bytes per CPU, guarded by a try-only slot lock (as the
//! kernel's per-CPU memcg stock). A charge takes from this CPU's stock when
//! it can; otherwise it pre-charges a batch into the stock (falling back to
//! an exact charge when the batch would cross a limit). An uncharge refills
//! the stock up to a bound and returns the rest. When the stock is busy (a
//! handler interrupted its own thread in there), the counters are charged
//! directly.
//!
//! Pre-charged stock is not usage: [`Group::usage`] subtracts the stocks of
//! the group and its descendants, so it returns to exactly 0 once every
//! accounted object is freed.
//!
//! # Lifetime
//!
//! Every accounted object holds a strong reference to its group (the heap
//! stores the group pointer with the object: in the slab's owner array, or in
//! the page descriptor of a large allocation), so a group outlives its last
//! object. Dropping a reference might free the group, which no nolock
//! context may do, so a free never drops it: it counts the release in the
//! group's `pending` counter and, on the 0 -> 1 transition, parks the group
//! on the heap's release list. Normal-context maintenance takes the list and
//! drops `pending` references of each group. A group is on the list at most
//! once (only the 0 -> 1 transition pushes), and the releasing context's
//! reference keeps it alive until the push is done.

extern crate alloc;

use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::sync::{RegistryGuard, RegistryLock, SlotLock};

/// Bytes pre-charged into a CPU's stock at once.
const STOCK_BATCH: usize = 32 << 10;
/// Unused stock a CPU keeps; beyond it, uncharges go to the counters.
const STOCK_MAX: usize = 2 * STOCK_BATCH;
/// Stock slots per group (CPU ids are reduced modulo this).
const STOCK_SLOTS: usize = 64;

#[repr(align(64))]
struct Stock {
    lock: SlotLock,
    bytes: AtomicUsize,
}

/// A hierarchical accounting group. See the module documentation.
///
/// ```
/// use anyalloc::{Config, Group, Heap};
/// use core::alloc::Layout;
/// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
/// let tenants = Group::new("tenants", Some(1 << 20), None);
/// let alice = Group::new("alice", Some(64 << 10), Some(&tenants));
/// let p = heap.alloc_in(Layout::from_size_align(1000, 8).unwrap(), &alice).unwrap();
/// assert!(alice.usage() >= 1000 && tenants.usage() >= 1000);
/// unsafe { heap.free(p) }; // uncharged automatically
/// assert_eq!(alice.usage(), 0);
/// assert_eq!(tenants.usage(), 0);
/// ```
pub struct Group {
    name: String,
    limit: usize,
    counter: AtomicUsize,
    peak: AtomicUsize,
    failcnt: AtomicU64,
    parent: Option<Arc<Group>>,
    children: std_like::Children,
    stocks: [Stock; STOCK_SLOTS],
    /// References released but not yet dropped (see "Lifetime").
    pending: AtomicUsize,
    /// Link on the heap's release list.
    next_dead: AtomicPtr<Group>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("limit", &(self.limit != usize::MAX).then_some(self.limit))
            .field("usage", &self.usage())
            .field("peak", &self.peak())
            .field("failcnt", &self.failcnt())
            .finish()
    }
}

/// The children registries of every group, under one process-wide lock
/// ([`CHILDREN`]): only normal-context functions take it (`Group::new`;
/// `usage` only tries it), the charge paths never touch it, and the global
/// heap's fork handler takes it, so a forked child never inherits it held.
mod std_like {
    use super::*;
    use core::cell::UnsafeCell;

    /// Guards every group's `Children`.
    pub(crate) static CHILDREN: RegistryLock = RegistryLock::new();

    pub(super) struct Children {
        list: UnsafeCell<Vec<Weak<Group>>>,
    }

    // SAFETY: `list` is only accessed while `CHILDREN` is held (see `with`).
    unsafe impl Sync for Children {}
    // SAFETY: as above; Weak<Group> is Send.
    unsafe impl Send for Children {}

    impl Children {
        pub(super) fn new() -> Self {
            Children {
                list: UnsafeCell::new(Vec::new()),
            }
        }

        /// The list, for a holder of `CHILDREN`.
        pub(super) fn locked<'a>(&'a self, _g: &'a RegistryGuard<'_>) -> &'a Vec<Weak<Group>> {
            // SAFETY: `_g` proves `CHILDREN` is held, for as long as the
            // borrow lasts.
            unsafe { &*self.list.get() }
        }

        /// Runs `f` on the list under `CHILDREN` (normal context: spins while
        /// another thread holds it). `None` without running `f` when this
        /// thread holds it already (it interrupted itself in there).
        pub(super) fn with<R>(&self, f: impl FnOnce(&mut Vec<Weak<Group>>) -> R) -> Option<R> {
            let _g = CHILDREN.lock()?;
            crate::interrupt_point!(GroupChildren);
            // SAFETY: the lock is held for the whole access.
            Some(f(unsafe { &mut *self.list.get() }))
        }
    }
}
pub(crate) use std_like::CHILDREN;

impl Group {
    /// A new group with an optional byte limit and an optional parent.
    /// Normal context (it allocates).
    pub fn new(name: &str, limit_bytes: Option<usize>, parent: Option<&Arc<Group>>) -> Arc<Group> {
        let g = Arc::new(Group {
            name: String::from(name),
            limit: limit_bytes.unwrap_or(usize::MAX),
            counter: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            failcnt: AtomicU64::new(0),
            parent: parent.cloned(),
            children: std_like::Children::new(),
            stocks: core::array::from_fn(|_| Stock {
                lock: SlotLock::new(),
                bytes: AtomicUsize::new(0),
            }),
            pending: AtomicUsize::new(0),
            next_dead: AtomicPtr::new(core::ptr::null_mut()),
        });
        if let Some(p) = parent {
            // Not registered (its stock then counts as the parent's usage)
            // only when this thread interrupted itself inside the registry.
            let _ = p.children.with(|c| {
                c.retain(|w| w.strong_count() > 0);
                c.push(Arc::downgrade(&g));
            });
        }
        g
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limit in bytes, if any.
    pub fn limit(&self) -> Option<usize> {
        (self.limit != usize::MAX).then_some(self.limit)
    }

    /// Bytes charged by live objects of this group and its descendants.
    /// Exact when nothing is allocating concurrently. Normal context (it
    /// briefly holds references to descendants, and dropping the last one
    /// frees memory); it never waits: if a descendant is being created
    /// right now, the descendants' unused per-CPU stock counts as usage.
    pub fn usage(&self) -> usize {
        self.counter
            .load(Ordering::Acquire)
            .saturating_sub(self.stocked_below())
    }

    fn stocked_below(&self) -> usize {
        match CHILDREN.try_lock() {
            Some(g) => self.stocked_below_locked(&g),
            // Another context is creating a group right now: the
            // descendants' unused stock counts as usage.
            None => self.own_stock(),
        }
    }

    fn own_stock(&self) -> usize {
        self.stocks
            .iter()
            .map(|s| s.bytes.load(Ordering::Acquire))
            .sum()
    }

    fn stocked_below_locked(&self, g: &RegistryGuard<'_>) -> usize {
        self.own_stock()
            + self
                .children
                .locked(g)
                .iter()
                .filter_map(|w| w.upgrade())
                .map(|c| c.stocked_below_locked(g))
                .sum::<usize>()
    }

    /// The highest the charged counter has been (including per-CPU stock).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// How many charges a limit of this group refused.
    pub fn failcnt(&self) -> u64 {
        self.failcnt.load(Ordering::Relaxed)
    }

    /// Charges `bytes` to this group and every ancestor, or none of them.
    fn charge_counters(&self, bytes: usize, count_failure: bool) -> bool {
        let mut g = Some(self);
        while let Some(cur) = g {
            let new = cur.counter.fetch_add(bytes, Ordering::AcqRel) + bytes;
            if new > cur.limit {
                cur.counter.fetch_sub(bytes, Ordering::AcqRel);
                if count_failure {
                    cur.failcnt.fetch_add(1, Ordering::Relaxed);
                }
                // Roll back the descendants charged before `cur`.
                let mut r = Some(self);
                while let Some(x) = r {
                    if core::ptr::eq(x, cur) {
                        break;
                    }
                    x.counter.fetch_sub(bytes, Ordering::AcqRel);
                    r = x.parent.as_deref();
                }
                return false;
            }
            cur.peak.fetch_max(new, Ordering::Relaxed);
            g = cur.parent.as_deref();
        }
        true
    }

    fn uncharge_counters(&self, bytes: usize) {
        let mut g = Some(self);
        while let Some(cur) = g {
            cur.counter.fetch_sub(bytes, Ordering::AcqRel);
            g = cur.parent.as_deref();
        }
    }

    /// Charges `bytes` from any context: this CPU's stock, else a batch into
    /// the stock, else the counters directly. `false` when a limit refuses.
    pub(crate) fn try_charge(&self, bytes: usize, cpu: usize) -> bool {
        let stock = &self.stocks[cpu % STOCK_SLOTS];
        let Some(_g) = stock.lock.try_lock() else {
            crate::interrupt_point!(AccountCharge);
            return self.charge_counters(bytes, true);
        };
        crate::interrupt_point!(AccountCharge);
        let have = stock.bytes.load(Ordering::Relaxed);
        if have >= bytes {
            stock.bytes.store(have - bytes, Ordering::Release);
            return true;
        }
        // Pre-charge a batch; near a limit, charge exactly.
        let batch = bytes + STOCK_BATCH;
        if self.charge_counters(batch, false) {
            stock.bytes.store(have + batch - bytes, Ordering::Release);
            return true;
        }
        self.charge_counters(bytes, true)
    }

    /// Uncharges `bytes` from any context (into this CPU's stock when it is
    /// free and not full).
    pub(crate) fn uncharge(&self, bytes: usize, cpu: usize) {
        let stock = &self.stocks[cpu % STOCK_SLOTS];
        if let Some(_g) = stock.lock.try_lock() {
            crate::interrupt_point!(AccountCharge);
            let have = stock.bytes.load(Ordering::Relaxed);
            if have + bytes <= STOCK_MAX {
                stock.bytes.store(have + bytes, Ordering::Release);
                return;
            }
        }
        self.uncharge_counters(bytes);
    }

    /// Normal context: returns every free stock to the counters (reclaim,
    /// and before measuring). Busy stocks are skipped.
    pub fn flush_stocks(&self) {
        for s in &self.stocks {
            if let Some(_g) = s.lock.try_lock() {
                let b = s.bytes.swap(0, Ordering::AcqRel);
                if b > 0 {
                    self.uncharge_counters(b);
                }
            }
        }
    }

    /// The parent group, if any.
    pub(crate) fn parent_group(&self) -> Option<&Group> {
        self.parent.as_deref()
    }
}

/// Takes a strong reference for an accounted object: returns the raw
/// pointer the heap stores with the object.
pub(crate) fn retain(group: &Arc<Group>) -> usize {
    Arc::into_raw(Arc::clone(group)) as usize
}

/// Releases an accounted object's reference from any context: counted
/// now, dropped later by [`drop_released`] in normal context.
///
/// # Safety
/// `raw` came from [`retain`] and is released once.
pub(crate) unsafe fn release(raw: usize, list: &crate::sync::IndexStack) {
    // SAFETY: the reference being released keeps the group alive here.
    let g = unsafe { &*(raw as *const Group) };
    if g.pending.fetch_add(1, Ordering::AcqRel) == 0 {
        list.push(raw, |_, next| {
            g.next_dead.store(next as *mut Group, Ordering::Relaxed);
            // Linked, not yet published on the release list.
            crate::interrupt_point!(GroupRelease);
        });
    }
}

/// Normal context: drops every released reference.
pub(crate) fn drop_released(list: &crate::sync::IndexStack) {
    let mut r = list.take_all();
    while r != crate::sync::NIL {
        let g = r as *const Group;
        // SAFETY: the group is alive: its pending references are not dropped
        // yet. Read the link before anything can push it again.
        let (next, n) = unsafe {
            let next = (*g).next_dead.load(Ordering::Relaxed) as usize;
            (next, (*g).pending.swap(0, Ordering::AcqRel))
        };
        crate::interrupt_point!(GroupRelease);
        for _ in 0..n {
            // SAFETY: each pending count stands for one reference from
            // `retain` that was released and not yet dropped.
            unsafe { Arc::decrement_strong_count(g) };
        }
        r = next;
    }
}
