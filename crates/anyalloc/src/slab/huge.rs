//! The registry of huge allocations (above 4 MiB, mmap'd on the normal path).
//!
//! A fixed open-addressing table of `(address, size)` pairs with atomic
//! entries, so a free from any context can tell a huge allocation from a
//! foreign pointer without taking a lock or touching the pointed-to memory.
//!
//! Entry states of the address word: `EMPTY` (never used: ends a probe),
//! `TOMB` (removed: probes continue past it), `BUSY` (being filled by an
//! insert), or the allocation's address. An insert CASes `EMPTY`/`TOMB` to
//! `BUSY`, stores the size, then publishes the address (Release). A remove
//! reads the size first, then CASes the address to `TOMB`: the entry cannot
//! be reused before that CAS, so the size it read is the allocation's.

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

    /// Records a huge allocation; `false` when the table is full.
    pub(crate) fn insert(&self, addr: usize, size: usize, group: usize) -> bool {
        let h = Self::home(addr);
        for i in h..h + HUGE_ENTRIES {
            let e = self.entry(i);
            let cur = e.addr.load(Ordering::Relaxed);
            if (cur == EMPTY || cur == TOMB)
                && e.addr
                    .compare_exchange(cur, BUSY, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // BUSY: lookups pass over the entry, inserts skip it.
                crate::interrupt_point!(HugeBusy);
                e.size.store(size, Ordering::Relaxed);
                e.group.store(group, Ordering::Relaxed);
                e.addr.store(addr, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// The size of the huge allocation at `addr`, if there is one.
    pub(crate) fn size_of(&self, addr: usize) -> Option<usize> {
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

    /// Removes the allocation at `addr`; returns its size and group, `None`
    /// if it is not registered (never allocated, or already freed).
    pub(crate) fn remove(&self, addr: usize) -> Option<(usize, usize)> {
        let h = Self::home(addr);
        for i in h..h + HUGE_ENTRIES {
            let e = self.entry(i);
            match e.addr.load(Ordering::Acquire) {
                EMPTY => return None,
                a if a == addr => {
                    let size = e.size.load(Ordering::Relaxed);
                    let group = e.group.load(Ordering::Relaxed);
                    if e.addr
                        .compare_exchange(addr, TOMB, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        return Some((size, group));
                    }
                    return None; // a racing free removed it first
                }
                _ => {}
            }
        }
        None
    }
}
