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
//! Stock still counts against limits, so it must not strand credit:
//!
//! * A batch is at most a sixteenth of the smallest limit on the group's
//!   chain (`Group::batch`; no stock at all under 16 bytes of limit), so
//!   a stock never holds a large share of a limit.
//! * A refused charge returns the free stocks of the group and its
//!   ancestors to the counters (try-locks, any context) and tries once
//!   more, exactly, before it gives up.
//! * A normal-context allocation that is still refused flushes the stocks
//!   of the whole tree its group belongs to (siblings and cousins
//!   included, as the kernel drains every CPU's stock), reclaims, and
//!   retries. The nolock path cannot reach other groups' stocks (that
//!   needs the children registry and references it may not drop), so
//!   there a sibling's unused stock, at most `2 * batch` per CPU, can
//!   still count against a shared ancestor's limit.
//! * A group that is dropped returns its unused stock to its ancestors.
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

/// Bytes pre-charged into a CPU's stock at once, at most (a group's
/// `batch`); a stock keeps at most twice its group's batch, and beyond it
/// uncharges go to the counters.
const STOCK_BATCH: usize = 32 << 10;
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
    /// Bytes pre-charged into a stock at once (see "Per-CPU charge stock").
    batch: usize,
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
/// ([`CHILDREN`]): only normal-context functions take it (`Group::new`,
/// `usage`, `flush_stocks`), the charge paths never touch it, and the
/// global heap's fork handler takes it, so a forked child never inherits
/// it held.
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
        let limit = limit_bytes.unwrap_or(usize::MAX);
        // A sixteenth of the tightest limit on the chain, at most
        // STOCK_BATCH (the parent's batch already reflects its ancestors').
        let batch = (limit / 16)
            .min(STOCK_BATCH)
            .min(parent.map_or(STOCK_BATCH, |p| p.batch));
        let g = Arc::new(Group {
            name: String::from(name),
            limit,
            counter: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            failcnt: AtomicU64::new(0),
            parent: parent.cloned(),
            children: std_like::Children::new(),
            stocks: core::array::from_fn(|_| Stock {
                lock: SlotLock::new(),
                bytes: AtomicUsize::new(0),
            }),
            batch,
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
    /// frees memory; it waits while another thread registers a new group).
    /// In a signal handler that interrupted its own thread's `Group::new`,
    /// the descendants' unused per-CPU stock counts as usage.
    pub fn usage(&self) -> usize {
        self.counter
            .load(Ordering::Acquire)
            .saturating_sub(self.stocked_below())
    }

    fn stocked_below(&self) -> usize {
        match CHILDREN.lock() {
            Some(g) => self.stocked_below_locked(&g),
            // This thread is creating a group (a handler interrupted it
            // there): the descendants' unused stock counts as usage.
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
    /// the stock, else the counters directly. A refusal returns the free
    /// stocks of this group and its ancestors to the counters and tries
    /// once more (see "Per-CPU charge stock"). `false` when a limit still
    /// refuses; the refusing group counts a failure if `count_failure`
    /// (the caller's last attempt).
    pub(crate) fn try_charge(&self, bytes: usize, cpu: usize, count_failure: bool) -> bool {
        if self.charge_from_stock(bytes, cpu) {
            return true;
        }
        self.flush_chain_stocks();
        self.charge_counters(bytes, count_failure)
    }

    /// `try_charge` without the flush, counting no failure.
    fn charge_from_stock(&self, bytes: usize, cpu: usize) -> bool {
        let stock = &self.stocks[cpu % STOCK_SLOTS];
        let Some(_g) = stock.lock.try_lock() else {
            crate::interrupt_point!(AccountCharge);
            return self.charge_counters(bytes, false);
        };
        crate::interrupt_point!(AccountCharge);
        let have = stock.bytes.load(Ordering::Relaxed);
        if have >= bytes {
            stock.bytes.store(have - bytes, Ordering::Release);
            return true;
        }
        // Pre-charge a batch; near a limit, charge exactly what the stock
        // lacks, and use the stock up.
        if self.batch > 0 && self.charge_counters(bytes - have + self.batch, false) {
            stock.bytes.store(self.batch, Ordering::Release);
            return true;
        }
        if self.charge_counters(bytes - have, false) {
            stock.bytes.store(0, Ordering::Release);
            return true;
        }
        false
    }

    /// Uncharges `bytes` from any context (into this CPU's stock when it is
    /// free and not full).
    pub(crate) fn uncharge(&self, bytes: usize, cpu: usize) {
        let stock = &self.stocks[cpu % STOCK_SLOTS];
        if let Some(_g) = stock.lock.try_lock() {
            crate::interrupt_point!(AccountCharge);
            let have = stock.bytes.load(Ordering::Relaxed);
            if have + bytes <= 2 * self.batch {
                stock.bytes.store(have + bytes, Ordering::Release);
                return;
            }
        }
        self.uncharge_counters(bytes);
    }

    /// Returns this group's free stocks to the counters (try-locks: any
    /// context). Busy stocks are skipped.
    fn flush_own_stocks(&self) {
        for s in &self.stocks {
            if s.bytes.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if let Some(_g) = s.lock.try_lock() {
                let b = s.bytes.swap(0, Ordering::AcqRel);
                if b > 0 {
                    self.uncharge_counters(b);
                }
            }
        }
    }

    /// `flush_own_stocks` for this group and every ancestor (any context).
    fn flush_chain_stocks(&self) {
        let mut g = Some(self);
        while let Some(x) = g {
            x.flush_own_stocks();
            g = x.parent.as_deref();
        }
    }

    /// Normal context: returns every free stock of this group and of its
    /// descendants to the counters (reclaim, and before measuring). Busy
    /// stocks are skipped, and so are the descendants when this thread
    /// interrupted itself inside the children registry.
    pub fn flush_stocks(&self) {
        self.flush_own_stocks();
        if let Some(g) = CHILDREN.lock() {
            self.flush_descendants_locked(&g);
        }
    }

    fn flush_descendants_locked(&self, g: &RegistryGuard<'_>) {
        for c in self.children.locked(g).iter().filter_map(|w| w.upgrade()) {
            c.flush_own_stocks();
            c.flush_descendants_locked(g);
        }
    }

    /// Normal context: `flush_stocks` of the root of this group's tree, so
    /// that no group's unused stock counts against a limit this group
    /// shares (before a refused allocation retries).
    pub(crate) fn flush_tree_stocks(&self) {
        let mut root = self;
        while let Some(p) = root.parent.as_deref() {
            root = p;
        }
        root.flush_stocks();
    }
}

impl Drop for Group {
    /// The last reference is gone, so no object is charged to the group and
    /// no context can be using its stocks: what its counter still holds is
    /// unused stock, charged to every ancestor too. Give it back to them.
    fn drop(&mut self) {
        let left = *self.counter.get_mut();
        if let Some(p) = self.parent.as_deref() {
            if left > 0 {
                p.uncharge_counters(left);
            }
        }
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
