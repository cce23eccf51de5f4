//! The registry of huge allocations (above 4 MiB, mmap'd on the normal path).
//!
//! A fixed open-addressing table of `(address, size)` pairs with atomic
//! entries, so a free from any context can tell a huge allocation from a
//! foreign pointer without taking a lock or touching the pointed-to memory.
//!
//! Entry states of the address word: `EMPTY` (never used: ends a probe),
//! `TOMB` (removed: probes continue past it), `BUSY` (being filled by an
//! insert, or an entry whose block is being moved: lookups and removes pass
//! over it, inserts skip it), or the allocation's address. An insert CASes
//! `EMPTY`/`TOMB` to `BUSY`, stores the size, then publishes the address
//! (Release). A remove reads the size first, then CASes the address to
//! `TOMB`: the entry cannot be reused before that CAS, so the size it read
//! is the allocation's.
//!
//! A block that moves (`mremap`) keeps its entry meanwhile: a claim CASes
//! the address to `BUSY` instead of `TOMB`. The insert of the new address
//! that follows fills the claimed entry, or a free entry that comes before
//! it on the new address's probe path and then turns the claimed entry into
//! `TOMB`. No other insert can take the claimed entry in between, so a full
//! table stays full and the block's insert cannot fail.

use core::sync::atomic::{AtomicUsize, Ordering};

const EMPTY: usize = 0;
const TOMB: usize = 1;
const BUSY: usize = 2;

/// Entries in the table: at most this many huge allocations live at once.
pub(crate) const HUGE_ENTRIES: usize = 4096;

#[repr(C)]
pub(crate) struct Entry {
    addr: AtomicUsize,
    size: AtomicUsize,
    /// The accounting group reference of the allocation (0: none).
    group: AtomicUsize,
}

/// An entry taken by [`HugeTable::claim`]: `BUSY`, and the claimer's until
/// [`HugeTable::insert_claimed`] consumes it. Dropped instead, the entry
/// stays `BUSY` for good (one entry of the table lost).
#[must_use = "a claimed entry is lost unless insert_claimed gives it back"]
pub(crate) struct Claimed {
    /// The entry's index in the table.
    index: usize,
    /// The size of the allocation the entry held.
    pub(crate) size: usize,
    /// The accounting group reference of that allocation (0: none).
    pub(crate) group: usize,
}

/// See the module documentation. Lives in the heap's (zeroed) metadata area.
pub(crate) struct HugeTable {
    entries: *const Entry,
}

impl HugeTable {
    /// Bytes of zeroed metadata the table needs.
    pub(crate) const BYTES: usize = HUGE_ENTRIES * core::mem::size_of::<Entry>();

    /// # Safety
    /// `entries` points to `BYTES` zero-filled bytes, 8-aligned, that live as
    /// long as the table and are used by nothing else.
    pub(crate) unsafe fn new(entries: *mut u8) -> Self {
        HugeTable {
            entries: entries as *const Entry,
        }
    }

    fn entry(&self, i: usize) -> &Entry {
        // SAFETY: i < HUGE_ENTRIES (callers mask it) and the entries live as
        // long as the table (new's contract); zero bytes are valid atomics.
        unsafe { &*self.entries.add(i & (HUGE_ENTRIES - 1)) }
    }

    fn home(addr: usize) -> usize {
        ((addr >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) & (HUGE_ENTRIES - 1)
    }

    /// Whether `addr` may be a registered allocation's address: not one of
    /// the entry states (`EMPTY`, `TOMB`, `BUSY`), which an address word
    /// also holds. A lookup of a pointer equal to one (`NonNull::dangling()`
    /// is 1) must not match a removed or busy entry: mappings are never
    /// there.
    fn may_be_registered(addr: usize) -> bool {
        addr > BUSY
    }

    /// Records a huge allocation; `false` when the table is full.
    pub(crate) fn insert(&self, addr: usize, size: usize, group: usize) -> bool {
        let h = Self::home(addr);
        (h..h + HUGE_ENTRIES).any(|i| self.take(self.entry(i), addr, size, group))
    }

    /// Records the allocation in entry `e` if the entry is free (`EMPTY` or
    /// `TOMB`): CAS to `BUSY`, then the size and group, then the address
    /// (Release). `false` (nothing written) if it is not free.
    fn take(&self, e: &Entry, addr: usize, size: usize, group: usize) -> bool {
        let cur = e.addr.load(Ordering::Relaxed);
        if (cur == EMPTY || cur == TOMB)
            && e.addr
                .compare_exchange(cur, BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            // BUSY: lookups pass over the entry, inserts skip it.
            crate::interrupt_point!(HugeBusy);
            Self::fill(e, addr, size, group);
            return true;
        }
        false
    }

    /// Writes the allocation into entry `e`, which is `BUSY` and the
    /// caller's: the size and group, then the address (Release).
    fn fill(e: &Entry, addr: usize, size: usize, group: usize) {
        e.size.store(size, Ordering::Relaxed);
        e.group.store(group, Ordering::Relaxed);
        e.addr.store(addr, Ordering::Release);
    }

    /// The size of the huge allocation at `addr`, if there is one.
    pub(crate) fn size_of(&self, addr: usize) -> Option<usize> {
        if !Self::may_be_registered(addr) {
            return None;
        }
        let h = Self::home(addr);
        for i in h..h + HUGE_ENTRIES {
            let e = self.entry(i);
            match e.addr.load(Ordering::Acquire) {
                EMPTY => return None,
                a if a == addr => return Some(e.size.load(Ordering::Relaxed)),
                _ => {}
            }
        }
        None
    }

    /// The registered allocation whose pages hold `addr` (a pointer into
    /// it, not its start), if any: for reports only (a racy scan of the
    /// whole table).
    pub(crate) fn holding(&self, addr: usize) -> Option<usize> {
        (0..HUGE_ENTRIES).find_map(|i| {
            let e = self.entry(i);
            let a = e.addr.load(Ordering::Acquire);
            let size = e.size.load(Ordering::Relaxed);
            (Self::may_be_registered(a) && addr.wrapping_sub(a) < size).then_some(a)
        })
    }

    /// Removes the allocation at `addr`; returns its size and group, `None`
    /// if it is not registered (never allocated, or already freed).
    pub(crate) fn remove(&self, addr: usize) -> Option<(usize, usize)> {
        self.take_out(addr, TOMB).map(|c| (c.size, c.group))
    }

    /// Takes the entry of the allocation at `addr` while its block moves:
    /// the address word goes from `addr` to `BUSY`, so lookups and removes
    /// pass over the entry and inserts skip it, and the entry stays the
    /// claimer's until [`insert_claimed`](Self::insert_claimed). Returns the
    /// entry with the allocation's size and group; `None` if `addr` is not
    /// registered.
    pub(crate) fn claim(&self, addr: usize) -> Option<Claimed> {
        let c = self.take_out(addr, BUSY)?;
        // BUSY: the block is the claimer's, and its entry too.
        crate::interrupt_point!(HugeBusy);
        Some(c)
    }

    /// Finds the entry holding `addr` and CASes its address word to `to`
    /// (`TOMB`: removed; `BUSY`: claimed). The size and group are read
    /// before the CAS: the entry cannot be reused before it, so they are
    /// the allocation's. `None` if `addr` is not registered, or a racing
    /// free took it out first.
    fn take_out(&self, addr: usize, to: usize) -> Option<Claimed> {
        if !Self::may_be_registered(addr) {
            return None;
        }
        let h = Self::home(addr);
        for i in h..h + HUGE_ENTRIES {
            let e = self.entry(i);
            match e.addr.load(Ordering::Acquire) {
                EMPTY => return None,
                a if a == addr => {
                    let size = e.size.load(Ordering::Relaxed);
                    let group = e.group.load(Ordering::Relaxed);
                    let taken = e
                        .addr
                        .compare_exchange(addr, to, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok();
                    return taken.then_some(Claimed {
                        index: i & (HUGE_ENTRIES - 1),
                        size,
                        group,
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Entries claimed (`BUSY`) right now: blocks being moved, or
    /// entries being filled. A walk of the whole table, for tests.
    pub(crate) fn claimed(&self) -> usize {
        (0..HUGE_ENTRIES)
            .filter(|&i| self.entry(i).addr.load(Ordering::Relaxed) == BUSY)
            .count()
    }

    /// The allocations in the table and their bytes: a racy count unless
    /// nothing else uses the table (a forked child, before anything else).
    pub(crate) fn live(&self) -> (usize, usize) {
        (0..HUGE_ENTRIES)
            .map(|i| self.entry(i))
            .filter(|e| Self::may_be_registered(e.addr.load(Ordering::Acquire)))
            .fold((0, 0), |(n, bytes), e| {
                (n + 1, bytes + e.size.load(Ordering::Relaxed))
            })
    }

    /// Removes every allocation from the table, calling `f(addr, size,
    /// group)` for each: for a heap going away, which nothing else uses.
    pub(crate) fn take_all(&self, mut f: impl FnMut(usize, usize, usize)) {
        for i in 0..HUGE_ENTRIES {
            let e = self.entry(i);
            let addr = e.addr.load(Ordering::Acquire);
            if Self::may_be_registered(addr) {
                let (size, group) = (
                    e.size.load(Ordering::Relaxed),
                    e.group.load(Ordering::Relaxed),
                );
                e.addr.store(TOMB, Ordering::Release);
                f(addr, size, group);
            }
        }
    }

    /// Records the allocation at `addr` (the claimed block, moved or not)
    /// and gives up the claimed entry. The probe starts at `addr`'s home:
    /// when it reaches the claimed entry, the allocation goes there (the
    /// entry is already `BUSY` and the caller's); when it first finds an
    /// `EMPTY` or `TOMB` entry, it takes that one as
    /// [`insert`](Self::insert) does, then turns the claimed entry into
    /// `TOMB`.
    ///
    /// This cannot fail: the claimed entry lies on every probe path, so the
    /// probe ends at it at the latest. Lookups of `addr` find it: the entry
    /// it lands in is the first free or claimed one of its probe path when
    /// the probe passed, every entry before it held an address, a `TOMB` or
    /// `BUSY`, and entries never go back to `EMPTY`.
    pub(crate) fn insert_claimed(&self, claimed: Claimed, addr: usize, size: usize, group: usize) {
        let mut i = Self::home(addr);
        while i != claimed.index {
            if self.take(self.entry(i), addr, size, group) {
                self.entry(claimed.index)
                    .addr
                    .store(TOMB, Ordering::Release);
                return;
            }
            i = (i + 1) & (HUGE_ENTRIES - 1);
        }
        Self::fill(self.entry(claimed.index), addr, size, group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// A distinct page-aligned fake address for each `i` (above the states).
    fn addr(i: usize) -> usize {
        (i + 1) << 22
    }

    /// The size recorded for `addr(i)` by `full`.
    fn size(i: usize) -> usize {
        (i + 1) << 12
    }

    /// Zeroed, 8-aligned memory for a table.
    fn memory() -> Vec<u64> {
        vec![0; HugeTable::BYTES / 8]
    }

    /// A table over `mem` with `addr(i)` for every `i < HUGE_ENTRIES` in it:
    /// every entry used, so a plain insert fails.
    fn full(mem: &mut [u64]) -> HugeTable {
        assert_eq!(mem.len() * 8, HugeTable::BYTES);
        assert!(mem.iter().all(|&w| w == 0));
        // SAFETY: `mem` is BYTES zeroed bytes, 8-aligned (u64s); the caller
        // keeps it alive as long as the table and uses it for nothing else.
        let t = unsafe { HugeTable::new(mem.as_mut_ptr().cast()) };
        for i in 0..HUGE_ENTRIES {
            assert!(t.insert(addr(i), size(i), i));
        }
        assert!(!t.insert(addr(HUGE_ENTRIES), 1, 0), "the table is full");
        t
    }

    /// The index of the entry holding `a`.
    fn index_of(t: &HugeTable, a: usize) -> usize {
        (0..HUGE_ENTRIES)
            .find(|&i| t.entry(i).addr.load(Ordering::Relaxed) == a)
            .unwrap()
    }

    /// Every `addr(i)` but `except` is found with its size.
    fn others_found(t: &HugeTable, except: usize) {
        for i in (0..HUGE_ENTRIES).filter(|&i| i != except) {
            assert_eq!(t.size_of(addr(i)), Some(size(i)), "addr({i})");
        }
    }

    /// The entry states are no addresses: a lookup, remove or claim of 1
    /// or 2 (dangling pointers) matches no removed or claimed entry.
    #[test]
    fn an_entry_state_is_not_found_as_an_address() {
        let mut mem = memory();
        let t = full(&mut mem);
        assert_eq!(t.remove(addr(3)), Some((size(3), 3)));
        let c = t.claim(addr(5)).unwrap();
        for state in [EMPTY, TOMB, BUSY] {
            assert_eq!(t.size_of(state), None, "{state}");
            assert!(t.remove(state).is_none(), "{state}");
            assert!(t.claim(state).is_none(), "{state}");
        }
        t.insert_claimed(c, addr(5), size(5), 5);
        others_found(&t, 3);
    }

    #[test]
    fn a_claimed_entry_is_hidden_and_kept_from_inserts() {
        let mut mem = memory();
        let t = full(&mut mem);
        let c = t.claim(addr(7)).unwrap();
        assert_eq!((c.size, c.group), (size(7), 7));
        assert_eq!(t.entry(c.index).addr.load(Ordering::Relaxed), BUSY);
        assert_eq!(t.size_of(addr(7)), None);
        assert!(t.remove(addr(7)).is_none());
        assert!(t.claim(addr(7)).is_none());
        assert!(
            !t.insert(addr(HUGE_ENTRIES), 1, 0),
            "a claimed entry is taken"
        );
        t.insert_claimed(c, addr(7), size(7), 7);
        others_found(&t, usize::MAX);
    }

    #[test]
    fn a_moved_block_is_recorded_in_a_full_table() {
        let mut mem = memory();
        let t = full(&mut mem);
        let c = t.claim(addr(7)).unwrap();
        let index = c.index;
        let new = addr(HUGE_ENTRIES + 1);
        t.insert_claimed(c, new, 13 << 20, 7);
        assert_eq!(t.entry(index).addr.load(Ordering::Relaxed), new);
        assert_eq!(t.size_of(new), Some(13 << 20));
        assert_eq!(t.size_of(addr(7)), None);
        others_found(&t, 7);
        assert!(
            !t.insert(addr(HUGE_ENTRIES), 1, 0),
            "the table is still full"
        );
        assert_eq!(t.remove(new), Some((13 << 20, 7)));
        assert!(t.insert(addr(HUGE_ENTRIES), 1, 0));
    }

    #[test]
    fn a_block_that_did_not_move_is_recorded_again_in_its_entry() {
        let mut mem = memory();
        let t = full(&mut mem);
        let c = t.claim(addr(100)).unwrap();
        let index = c.index;
        t.insert_claimed(c, addr(100), 9 << 20, 3);
        assert_eq!(t.entry(index).addr.load(Ordering::Relaxed), addr(100));
        assert_eq!(t.size_of(addr(100)), Some(9 << 20));
        others_found(&t, 100);
        assert!(
            !t.insert(addr(HUGE_ENTRIES), 1, 0),
            "the table is still full"
        );
        assert_eq!(t.remove(addr(100)), Some((9 << 20, 3)));
    }

    #[test]
    fn a_moved_block_takes_a_free_entry_before_the_claimed_one() {
        let mut mem = memory();
        let t = full(&mut mem);
        // One free entry (a TOMB) and one claimed entry in a full table.
        let free = index_of(&t, addr(20));
        assert_eq!(t.remove(addr(20)), Some((size(20), 20)));
        let c = t.claim(addr(30)).unwrap();
        let claimed = c.index;
        // A new address whose probe passes the free entry before the claimed
        // one (about every other address does).
        let before = |a: usize| {
            let h = HugeTable::home(a);
            (free.wrapping_sub(h) & (HUGE_ENTRIES - 1))
                < (claimed.wrapping_sub(h) & (HUGE_ENTRIES - 1))
        };
        let new = (HUGE_ENTRIES..).map(addr).find(|&a| before(a)).unwrap();
        t.insert_claimed(c, new, 6 << 20, 0);
        assert_eq!(t.entry(free).addr.load(Ordering::Relaxed), new);
        assert_eq!(t.entry(claimed).addr.load(Ordering::Relaxed), TOMB);
        assert_eq!(t.size_of(new), Some(6 << 20));
        assert_eq!(t.size_of(addr(30)), None);
        // The claimed entry was given up: one insert fits, then none.
        assert!(t.insert(addr(HUGE_ENTRIES), 1, 0));
        assert!(!t.insert(addr(HUGE_ENTRIES + 1), 1, 0));
    }

    #[test]
    fn a_moved_block_takes_an_empty_entry_and_gives_up_the_claimed_one() {
        let mut mem = memory();
        // SAFETY: as in `full` (`memory` is zeroed and lives to the end).
        let t = unsafe { HugeTable::new(mem.as_mut_ptr().cast()) };
        assert!(t.insert(addr(0), size(0), 0));
        let c = t.claim(addr(0)).unwrap();
        let claimed = c.index;
        let new = addr(1);
        assert_ne!(HugeTable::home(new), claimed);
        t.insert_claimed(c, new, 5 << 20, 0);
        assert_eq!(t.entry(claimed).addr.load(Ordering::Relaxed), TOMB);
        assert_eq!(t.size_of(new), Some(5 << 20));
        assert_eq!(t.size_of(addr(0)), None);
        // One entry used: every other one can be filled.
        for i in 2..HUGE_ENTRIES + 1 {
            assert!(t.insert(addr(i), size(i), 0), "addr({i})");
        }
        assert!(!t.insert(addr(HUGE_ENTRIES + 1), 1, 0));
    }
}
