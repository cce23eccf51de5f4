//! Accounting groups: memcg-like hierarchical limits that hold from any
//! context.
//!
//! A [`Group`] has a usage counter, an optional limit, a peak and a failure
//! count, and an optional parent. Charging `n` bytes adds `n` to the
//! counters of every ancestor and of the group, root first (see
//! "Counters"), each with a compare-and-swap loop that checks the limit
//! first, so no counter ever goes above its limit (not even for a moment:
//! a charge that cannot fit never touches it); if a level's limit
//! refuses, the counters charged above it are rolled back and the group
//! whose limit refused counts a failure. No lock, no
//! waiting (lock-free: a retry means another context changed the counter):
//! the nolock path charges at once, never deferred.
//!
//! # Counters
//!
//! A counter never holds less than its children's counters together:
//! charges add to the levels root first, uncharges subtract leaf first.
//! So a group that is dropped can give everything its counter still holds
//! back to its ancestors ("Lifetime"). A `fork` that clones another thread
//! halfway up a charge or down an uncharge leaves the child's upper levels
//! that charge's bytes too many (lost there for good, as the contents of
//! a stock held at the clone are), never too few. (Charged leaf first, the
//! group cloned halfway held bytes its parent never got; dropped, it gave
//! them back, and the parent's counter wrapped below zero: every later
//! charge of the tree was refused.)
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
//!   more, exactly. Still refused, it returns the free stocks of every
//!   descendant of the group whose limit refused (the charging group's
//!   siblings and cousins under it: an idle tenant keeps up to
//!   `2 * batch` per CPU) and tries again; refused then by a group
//!   further up the chain, it does the same for that group (at most once
//!   per level), else that was the last try. That walk try-locks the
//!   children registry (skipped when another context holds it), and the
//!   references it takes to the descendants are released on the heap's
//!   release list (see "Lifetime"), never dropped there, so the nolock
//!   path may do it.
//! * A normal-context allocation that is still refused flushes the stocks
//!   of the whole tree its group belongs to (as the kernel drains every
//!   CPU's stock; waiting for the registry if need be), reclaims, and
//!   retries.
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
/// ([`CHILDREN`]): only normal-context functions wait for it
/// (`Group::new`, `usage`, `flush_stocks`), a refused charge only tries
/// it (never waits; it allocates and frees nothing under it), and the
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

        /// Takes out the entry of `child`, a child being dropped (its weak
        /// reference keeps the child's allocation). Frees nothing: the
        /// dropping child's allocation outlives its drop.
        pub(super) fn forget(&self, child: *const Group, _g: &RegistryGuard<'_>) {
            crate::interrupt_point!(GroupChildren);
            // SAFETY: `_g` proves `CHILDREN` is held, and only for this
            // call: no other borrow of the list is live.
            let list = unsafe { &mut *self.list.get() };
            if let Some(i) = list.iter().position(|w| core::ptr::eq(w.as_ptr(), child)) {
                list.swap_remove(i);
            }
        }

        /// Runs `f` on the list under `CHILDREN` (normal context: waits while
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
    ///
    /// ```
    /// use anyalloc::Group;
    /// let tenants = Group::new("tenants", Some(1 << 20), None);
    /// let alice = Group::new("alice", None, Some(&tenants)); // limited by its parent only
    /// assert_eq!((alice.name(), alice.limit()), ("alice", None));
    /// assert_eq!(tenants.usage(), 0);
    /// ```
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
    ///
    /// ```
    /// use anyalloc::Group;
    /// assert_eq!(Group::new("cache", None, None).name(), "cache");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limit in bytes, if any.
    ///
    /// ```
    /// use anyalloc::Group;
    /// assert_eq!(Group::new("capped", Some(64 << 10), None).limit(), Some(64 << 10));
    /// assert_eq!(Group::new("free", None, None).limit(), None);
    /// ```
    pub fn limit(&self) -> Option<usize> {
        (self.limit != usize::MAX).then_some(self.limit)
    }

    /// Bytes charged by live objects of this group and its descendants.
    /// Exact when nothing is allocating concurrently. Normal context (it
    /// briefly holds references to descendants, and dropping the last one
    /// frees memory; it waits while another thread registers a new group).
    /// In a signal handler that interrupted its own thread's `Group::new`,
    /// the descendants' unused per-CPU stock counts as usage.
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let parent = Group::new("parent", None, None);
    /// let child = Group::new("child", None, Some(&parent));
    /// let p = heap.alloc_in(Layout::from_size_align(500, 8).unwrap(), &child).unwrap();
    /// assert!(child.usage() >= 500);
    /// assert_eq!(parent.usage(), child.usage()); // a descendant's usage counts
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// assert_eq!((parent.usage(), child.usage()), (0, 0));
    /// ```
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
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let group = Group::new("bursty", None, None);
    /// let p = heap.alloc_in(Layout::from_size_align(2000, 8).unwrap(), &group).unwrap();
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// assert_eq!(group.usage(), 0);
    /// assert!(group.peak() >= 2000, "the high-water mark stays");
    /// ```
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// How many charges a limit of this group refused.
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let group = Group::new("small", Some(1024), None);
    /// assert_eq!(group.failcnt(), 0);
    /// assert!(heap.alloc_nolock_in(Layout::from_size_align(4096, 8).unwrap(), &group).is_none());
    /// assert!(group.failcnt() >= 1);
    /// ```
    pub fn failcnt(&self) -> u64 {
        self.failcnt.load(Ordering::Relaxed)
    }

    /// Charges `bytes` to this group and every ancestor, or none of them
    /// (`Err`: the group whose limit refused).
    ///
    /// Each level is a compare-and-swap loop (load, check the limit, swap
    /// in the sum): a counter never goes above its limit, not even for a
    /// moment, so a charge that does not fit is refused without touching
    /// the counter, and concurrent charges that fit never see it over the
    /// limit (adding first and rolling back on excess refused them, and
    /// let `usage` read more than the limit). Lock-free: a retry means
    /// another context changed the counter, so the work is bounded by the
    /// contention (a context interrupted between load and swap retries once
    /// its handler's change is seen). Every level's limit is checked
    /// before any level is charged, so a charge that cannot fit at one
    /// level never holds the others meanwhile (charged, then rolled back:
    /// charges that fit there were refused); only a level that a
    /// concurrent charge filled after that check makes the levels above it
    /// roll back, which stayed within their limits. The levels are charged
    /// root first (see "Counters"; `uncharge_counters` goes leaf first).
    fn charge_counters(&self, bytes: usize) -> Result<(), &Group> {
        let mut g = Some(self);
        while let Some(cur) = g {
            if cur
                .after_charge(cur.counter.load(Ordering::Relaxed), bytes)
                .is_none()
            {
                return Err(cur);
            }
            g = cur.parent.as_deref();
        }
        // Root first (see "Counters"): level `up` is the group `up` steps
        // above this one.
        let levels = core::iter::successors(Some(self), |x| x.parent.as_deref()).count();
        for up in (0..levels).rev() {
            let cur = self.up(up);
            let Some(new) = cur.charge_one(bytes) else {
                // Roll back the ancestors charged before `cur`.
                let mut r = cur.parent.as_deref();
                while let Some(x) = r {
                    x.counter.fetch_sub(bytes, Ordering::AcqRel);
                    r = x.parent.as_deref();
                }
                return Err(cur);
            };
            cur.peak.fetch_max(new, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The group `n` steps up the chain from this one (0: this one); `n`
    /// is below the chain's length.
    fn up(&self, n: usize) -> &Group {
        let mut g = self;
        for _ in 0..n {
            g = g.parent.as_deref().unwrap_or(g);
        }
        g
    }

    /// Adds `bytes` to this group's counter alone if the sum stays within
    /// its limit: the new value, or `None` (counter unchanged).
    /// The counter after a charge of `bytes` to `now`, if that stays
    /// within the limit.
    #[inline]
    fn after_charge(&self, now: usize, bytes: usize) -> Option<usize> {
        now.checked_add(bytes).filter(|&n| n <= self.limit)
    }

    #[inline]
    fn charge_one(&self, bytes: usize) -> Option<usize> {
        let mut old = self.counter.load(Ordering::Relaxed);
        #[cfg(feature = "interrupt-points")]
        let mut first = true;
        loop {
            let new = self.after_charge(old, bytes)?;
            // Between the load and the swap, on the first attempt only (a
            // hook that charges each time would otherwise fail every swap).
            #[cfg(feature = "interrupt-points")]
            if core::mem::take(&mut first) {
                crate::interrupt_point!(AccountCharge);
            }
            match self
                .counter
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(new),
                Err(seen) => old = seen,
            }
        }
    }

    /// Uncharges `bytes` from this group and every ancestor, leaf first
    /// (see "Counters").
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
    /// once more; if a limit still refuses, the free stocks of the refusing
    /// group's descendants (this group's siblings and cousins under it,
    /// idle tenants' included) are returned too, and the charge is tried
    /// again, and again after the same for each group further up the chain
    /// that refuses it then (see "Per-CPU charge stock"). Try-locks only, never a
    /// wait: nolock. `false` when a limit still refuses; the refusing group
    /// counts a failure if `count_failure` (the caller's last attempt).
    /// References to descendants taken meanwhile are released on
    /// `released` (the heap's release list), never dropped here.
    pub(crate) fn try_charge(
        &self,
        bytes: usize,
        cpu: usize,
        count_failure: bool,
        released: &crate::sync::IndexStack,
    ) -> bool {
        if self.charge_from_stock(bytes, cpu) {
            return true;
        }
        self.flush_chain_stocks();
        let mut refused = match self.charge_counters(bytes) {
            Ok(()) => return true,
            Err(refused) => refused,
        };
        // A retry refused further up the chain (the flushed stock made room
        // below, not there) flushes that group's descendants in turn: at
        // most once per level.
        while refused.flush_descendants_nolock(released) > 0 {
            match self.charge_counters(bytes) {
                Ok(()) => return true,
                Err(r) if refused.is_ancestor(r) => refused = r,
                Err(r) => {
                    refused = r;
                    break;
                }
            }
        }
        if count_failure {
            refused.failcnt.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Whether `g` is a strict ancestor of this group.
    fn is_ancestor(&self, g: &Group) -> bool {
        core::iter::successors(self.parent.as_deref(), |x| x.parent.as_deref())
            .any(|x| core::ptr::eq(x, g))
    }

    /// `try_charge` without the flush, counting no failure.
    fn charge_from_stock(&self, bytes: usize, cpu: usize) -> bool {
        let stock = &self.stocks[cpu % STOCK_SLOTS];
        let Some(_g) = stock.lock.try_lock() else {
            crate::interrupt_point!(AccountCharge);
            return self.charge_counters(bytes).is_ok();
        };
        crate::interrupt_point!(AccountCharge);
        let have = stock.bytes.load(Ordering::Relaxed);
        if have >= bytes {
            stock.bytes.store(have - bytes, Ordering::Release);
            return true;
        }
        // Pre-charge a batch; near a limit, charge exactly what the stock
        // lacks, and use the stock up.
        if self.batch > 0 && self.charge_counters(bytes - have + self.batch).is_ok() {
            stock.bytes.store(self.batch, Ordering::Release);
            return true;
        }
        if self.charge_counters(bytes - have).is_ok() {
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
    /// context). Busy stocks are skipped. Returns the bytes returned.
    fn flush_own_stocks(&self) -> usize {
        let mut returned = 0;
        for s in &self.stocks {
            if s.bytes.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if let Some(_g) = s.lock.try_lock() {
                let b = s.bytes.swap(0, Ordering::AcqRel);
                if b > 0 {
                    self.uncharge_counters(b);
                    returned += b;
                }
            }
        }
        returned
    }

    /// Any context: returns the free stocks of every descendant of this
    /// group to the counters, if the children registry is free right now
    /// (a try-lock: `0` at once when another context holds it). Each
    /// descendant is held by a reference taken from its registry entry
    /// (so that it cannot be torn down meanwhile), and that reference is
    /// released on `released`, to be dropped by the heap in normal context,
    /// as an object's is: dropping it here might free the group. Returns
    /// the bytes returned. Work: the descendants' stock slots, only on a
    /// refused charge.
    fn flush_descendants_nolock(&self, released: &crate::sync::IndexStack) -> usize {
        let Some(g) = CHILDREN.try_lock() else {
            return 0;
        };
        crate::interrupt_point!(GroupChildren);
        self.flush_descendants_parked(&g, released)
    }

    fn flush_descendants_parked(
        &self,
        g: &RegistryGuard<'_>,
        released: &crate::sync::IndexStack,
    ) -> usize {
        let mut returned = 0;
        for w in self.children.locked(g) {
            let Some(c) = w.upgrade() else {
                continue;
            };
            returned += c.flush_own_stocks();
            returned += c.flush_descendants_parked(g, released);
            // SAFETY: a reference of our own, released once.
            unsafe { release(Arc::into_raw(c) as usize, released) };
        }
        returned
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
    ///
    /// ```
    /// use anyalloc::{Config, Group, Heap};
    /// use core::alloc::Layout;
    /// let heap = Heap::new(Config::default().memory(16 << 20)).unwrap();
    /// let group = Group::new("measured", Some(1 << 20), None);
    /// let p = heap.alloc_in(Layout::from_size_align(100, 8).unwrap(), &group).unwrap();
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free(p) };
    /// group.flush_stocks(); // pre-charged bytes go back to the counters
    /// assert_eq!(group.usage(), 0);
    /// ```
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
    /// shares (before a refused allocation retries). While a `fork` on
    /// another thread holds the children registry, only the root's own
    /// stocks: that fork may be waiting for this allocation (see the `fork`
    /// module's "Other threads give way").
    pub(crate) fn flush_tree_stocks(&self) {
        let mut root = self;
        while let Some(p) = root.parent.as_deref() {
            root = p;
        }
        root.flush_own_stocks();
        if let Some(g) = CHILDREN.lock_giving_way() {
            root.flush_descendants_locked(&g);
        }
    }
}

impl Drop for Group {
    /// The last reference is gone, so no object is charged to the group and
    /// no context can be using its stocks: what its counter still holds is
    /// unused stock, charged to every ancestor too. Give it back to them.
    /// And its entry in the parent's registry goes, if the registry is
    /// free right now: a try-lock, so a drop never waits (for a `fork`,
    /// say), and a drop inside a walk of the registry (`usage` held the
    /// last reference) leaves the list alone. An entry left keeps the
    /// group's allocation until the parent's next `Group::new`.
    fn drop(&mut self) {
        let left = *self.counter.get_mut();
        if let Some(p) = self.parent.as_deref() {
            if left > 0 {
                p.uncharge_counters(left);
            }
            if let Some(g) = CHILDREN.try_lock() {
                p.children.forget(self, &g);
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

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    extern crate std;

    use super::*;
    use crate::sync::IndexStack;
    use std::sync::{Barrier, Mutex};

    /// One test at a time: the flush of the siblings' stocks only tries the
    /// process-wide children registry, which `Group::new` takes.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Pins the calling thread to `cpu` if this process may run there
    /// (else leaves it alone): the fillers and the doomed charges below run
    /// in parallel, whatever the scheduler would do.
    fn pin(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is an empty set; these calls only read
        // and change the calling thread's affinity.
        unsafe {
            let mut allowed: libc::cpu_set_t = core::mem::zeroed();
            if libc::sched_getaffinity(0, core::mem::size_of_val(&allowed), &mut allowed) != 0 {
                return;
            }
            let Some(c) = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &allowed))
                .nth(cpu)
            else {
                return;
            };
            let mut one: libc::cpu_set_t = core::mem::zeroed();
            libc::CPU_SET(c, &mut one);
            libc::sched_setaffinity(0, core::mem::size_of_val(&one), &one);
        }
    }

    /// Fillers that together charge exactly a shared limit are never
    /// refused, however often a charge that can never fit is tried at the
    /// same time, and no counter is ever seen above its limit. (Adding
    /// first and rolling back on excess let the doomed charge push the
    /// shared counter over the limit for a moment, refusing the fillers
    /// that charged meanwhile.)
    #[test]
    fn charges_that_fit_are_never_refused_because_of_one_that_does_not() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        const FILLERS: usize = 2;
        const STEPS: usize = 200_000;
        const STEP: usize = 8;
        let limit = FILLERS * STEPS * STEP;
        let parent = Group::new("parent", Some(limit), None);
        let kids: Vec<_> = (0..FILLERS)
            .map(|_| Group::new("filler", None, Some(&parent)))
            .collect();
        let greedy = Group::new("greedy", None, Some(&parent));
        let done = AtomicUsize::new(0);
        let refused = AtomicUsize::new(0);
        let above = AtomicUsize::new(0);
        let tries = AtomicUsize::new(0);
        let start = Barrier::new(FILLERS + 1);
        std::thread::scope(|s| {
            for k in &kids {
                let (start, done, refused, tries) = (&start, &done, &refused, &tries);
                let (above, parent) = (&above, &parent);
                s.spawn(move || {
                    pin(0);
                    start.wait();
                    // Only while the doomed charges are being tried.
                    while tries.load(Ordering::Relaxed) == 0 {
                        core::hint::spin_loop();
                    }
                    for _ in 0..STEPS {
                        if k.charge_counters(STEP).is_err() {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        if parent.counter.load(Ordering::Acquire) > limit {
                            above.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            // A charge that never fits (more than the whole limit), at a
            // sibling and directly at the parent, until every filler is
            // done; and the shared counter is never above the limit.
            s.spawn(|| {
                pin(1);
                start.wait();
                while done.load(Ordering::Acquire) < FILLERS {
                    assert!(greedy.charge_counters(limit + 1).is_err());
                    assert!(parent.charge_counters(limit + 1).is_err());
                    tries.fetch_add(2, Ordering::Relaxed);
                    if parent.counter.load(Ordering::Acquire) > limit {
                        above.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        });
        let (refused, above) = (refused.into_inner(), above.into_inner());
        std::println!(
            "{} doomed charges; fillers refused {refused} times; counter read above the limit {above} times",
            tries.into_inner()
        );
        assert_eq!(refused, 0, "a charge that fitted was refused");
        assert_eq!(above, 0, "the counter was seen above its limit");
        assert_eq!(parent.counter.load(Ordering::Relaxed), limit);
        assert!(parent.peak() <= limit);
        assert_eq!(greedy.counter.load(Ordering::Relaxed), 0);
        for k in &kids {
            assert_eq!(k.counter.load(Ordering::Relaxed), STEPS * STEP);
            k.uncharge_counters(STEPS * STEP);
        }
        assert_eq!(parent.counter.load(Ordering::Relaxed), 0);
    }

    /// Idle siblings' stocks do not strand their parent's limit: tenants
    /// that charged and uncharged on various CPUs each keep up to two
    /// batches of stock, more than the whole limit together; a new
    /// tenant's charge (the nolock entry point: try-locks only) gets that
    /// credit back when the limit refuses it. The references the walk took
    /// wait on the release list, and dropping them leaves the tenants with
    /// one reference each.
    #[test]
    fn a_refused_charge_takes_idle_siblings_stock_back() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        const LIMIT: usize = 1 << 20;
        const CHARGE: usize = 1000;
        let released = IndexStack::new();
        let parent = Group::new("parent", Some(LIMIT), None);
        let mut tenants = Vec::new();
        for t in 0..40 {
            let k = Group::new("tenant", None, Some(&parent));
            let cpu = t % STOCK_SLOTS;
            // 64 KiB each, then all of it uncharged (into this CPU's stock,
            // up to two batches).
            for _ in 0..64 {
                assert!(
                    k.try_charge(CHARGE, cpu, true, &released),
                    "tenant {t}: refused with usage {} of {LIMIT}",
                    parent.usage()
                );
            }
            for _ in 0..64 {
                k.uncharge(CHARGE, cpu);
            }
            assert_eq!(k.usage(), 0);
            tenants.push(k);
        }
        assert_eq!(parent.usage(), 0);
        assert_eq!(parent.failcnt(), 0);
        drop_released(&released);
        for k in &tenants {
            assert_eq!(
                Arc::strong_count(k),
                1,
                "a reference left on the release list"
            );
        }
        // Still charged to the parent: the last tenants' stocks (a bounded
        // amount), not the whole limit.
        assert!(parent.counter.load(Ordering::Relaxed) < LIMIT);
    }

    /// A charge that cannot fit further up the chain refuses no charge
    /// that fits, even below: a context interrupted inside such a charge
    /// (between a counter's load and its swap, at each level it reaches)
    /// charges a sibling for what fits everywhere. (The levels below the
    /// refusing one used to be charged first and rolled back: interrupted
    /// at the level between, the doomed charge held its parent's counter,
    /// and the sibling's charge, which fits, failed there.)
    #[cfg(feature = "interrupt-points")]
    #[test]
    fn a_charge_refused_further_up_refuses_no_charge_that_fits_below() {
        use crate::interrupt::{set_hook, Site};
        use core::cell::Cell;
        use std::sync::OnceLock;
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        const K: usize = 1 << 10;
        static SIBLING: OnceLock<Arc<Group>> = OnceLock::new();
        static REFUSED: AtomicUsize = AtomicUsize::new(0);
        std::thread_local! {
            static ARMED: Cell<bool> = const { Cell::new(false) };
        }
        fn hook(site: Site) {
            if site != Site::AccountCharge || !ARMED.get() {
                return;
            }
            ARMED.set(false);
            let sibling = SIBLING.get().unwrap();
            match sibling.charge_counters(40 * K) {
                Ok(()) => sibling.uncharge_counters(40 * K),
                Err(_) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                }
            }
            ARMED.set(true);
        }
        let root = Group::new("root", Some(100 * K), None);
        let upper = Group::new("upper", None, Some(&root));
        let mid = Group::new("mid", Some(100 * K), Some(&upper));
        let doomed = Group::new("doomed", None, Some(&mid));
        let sibling = SIBLING.get_or_init(|| Group::new("sibling", None, Some(&mid)));
        let cousin = Group::new("cousin", None, Some(&root));
        // Root at 60 of 100 KiB: 40 KiB fit under mid, 70 do not.
        assert!(cousin.charge_counters(60 * K).is_ok());
        set_hook(Some(hook));
        ARMED.set(true);
        let r = doomed.charge_counters(70 * K);
        ARMED.set(false);
        set_hook(None);
        assert!(r.is_err());
        assert_eq!(
            REFUSED.load(Ordering::Relaxed),
            0,
            "a charge that fits was refused"
        );
        assert_eq!(mid.counter.load(Ordering::Relaxed), 0);
        cousin.uncharge_counters(60 * K);
        assert_eq!(root.counter.load(Ordering::Relaxed), 0);
        assert_eq!(sibling.counter.load(Ordering::Relaxed), 0);
    }

    /// A refusal that moves up the chain after the flush takes that
    /// group's idle stock back too: a charge refused by its parent's limit
    /// gets room there from an idle sibling's stock, and is then refused by
    /// the grandparent's limit, whose other subtree (an idle cousin) holds
    /// most of that limit as stock. (Only the first refusing group's
    /// descendants used to be flushed: the charge failed, with the
    /// grandparent counting a failure, and its limit stranded in stock.)
    #[test]
    fn a_refusal_further_up_after_the_flush_takes_that_groups_idle_stock_back() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        const K: usize = 1 << 10;
        let released = IndexStack::new();
        let root = Group::new("root", Some(1024 * K), None);
        let mid = Group::new("mid", Some(512 * K), Some(&root));
        let a = Group::new("a", None, Some(&mid));
        let b = Group::new("b", None, Some(&mid));
        let cousin = Group::new("cousin", None, Some(&root));
        // b: 8 KiB of idle stock; a: 496 KiB in use (mid at 504 of 512 KiB).
        assert!(b.charge_counters(8 * K).is_ok());
        b.uncharge(8 * K, 1);
        assert!(a.charge_counters(496 * K).is_ok());
        // The cousin: 520 KiB of idle stock (root at its limit).
        for cpu in 0..8 {
            assert!(cousin.charge_counters(64 * K).is_ok());
            cousin.uncharge(64 * K, cpu);
        }
        assert!(cousin.charge_counters(8 * K).is_ok());
        cousin.uncharge(8 * K, 8);
        assert_eq!(root.counter.load(Ordering::Relaxed), 1024 * K);
        assert_eq!(root.usage(), 496 * K);
        assert!(
            a.try_charge(16 * K, 0, true, &released),
            "refused with root usage {} of {} KiB",
            root.usage() / K,
            1024
        );
        assert_eq!((mid.failcnt(), root.failcnt()), (0, 0));
        a.uncharge_counters(512 * K);
        assert_eq!(root.usage(), 0);
        drop_released(&released);
        for g in [&a, &b, &cousin] {
            assert_eq!(Arc::strong_count(g), 1);
        }
    }
}
