//! Freed huge mappings kept for reuse (std, normal path only).
//!
//! A huge block (above 4 MiB) is a mapping of its own. Unmapped at every
//! free, a program that allocates and frees one in a loop paid an `mmap`,
//! two `munmap`s and a page fault for every page it touched, every time:
//! about 1.4 ms per 4 MiB block written once, 100-150 times glibc, mimalloc
//! and jemalloc, which all keep such memory (glibc raises its mmap
//! threshold up to 32 MiB, the others cache it). So a normal-path free
//! keeps a mapping of up to [`MAX_BLOCK`] bytes here, at most [`SLOTS`] of
//! them and [`MAX_BYTES`] in all, and a huge allocation takes the smallest
//! one that fits (its tail, if any, unmapped) before it maps anything. The
//! maintainer (or, without one, the inline decay: `Config::decay`) unmaps
//! what stayed unused for its idle epochs; `drain`
//! (`Heap::trim`, reclaim) and a dropped heap unmap everything.
//!
//! Each slot is one word, `(address >> 12) << PAGE_BITS | pages` (0:
//! empty), so a put is one compare-and-swap from 0 and a take one from the
//! word it read back to 0: no slot in between. The byte count changes apart
//! from the slot (a put reserves before it fills a slot, a take subtracts
//! after it emptied one), so a `fork` can clone a thread between the two:
//! the forked child counts the slots again ([`recount`](HugeCache::recount)).
//! The module only does the bookkeeping: its callers map, unmap and zero.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::PAGE_SIZE;

/// Slots: mappings kept at most.
pub(crate) const SLOTS: usize = 8;
/// The largest mapping kept: glibc's largest mmap threshold (on 64-bit).
pub(crate) const MAX_BLOCK: usize = 32 << 20;
/// Bytes kept at most, over all slots.
pub(crate) const MAX_BYTES: usize = 64 << 20;

/// Bits of a slot word that hold the page count (the address, shifted
/// right by 12, takes the other 45: enough for 57-bit addresses).
const PAGE_BITS: u32 = 19;
const _: () = assert!(MAX_BLOCK / PAGE_SIZE < 1 << PAGE_BITS);

/// See the module documentation.
pub(crate) struct HugeCache {
    slots: [AtomicU64; SLOTS],
    /// When each slot was last filled (the heap's epoch): a hint for the
    /// maintainer, read and written apart from the slot word.
    stamps: [AtomicUsize; SLOTS],
    /// Bytes in the slots; reserved before a put, so it never exceeds
    /// [`MAX_BYTES`].
    bytes: AtomicUsize,
}

fn pack(addr: usize, size: usize) -> u64 {
    ((addr as u64 >> 12) << PAGE_BITS) | (size / PAGE_SIZE) as u64
}

fn unpack(w: u64) -> (usize, usize) {
    (
        ((w >> PAGE_BITS) << 12) as usize,
        (w & ((1 << PAGE_BITS) - 1)) as usize * PAGE_SIZE,
    )
}

impl HugeCache {
    pub(crate) const fn new() -> Self {
        HugeCache {
            slots: [const { AtomicU64::new(0) }; SLOTS],
            stamps: [const { AtomicUsize::new(0) }; SLOTS],
            bytes: AtomicUsize::new(0),
        }
    }

    /// Keeps the mapping `[addr, addr + size)` (page-aligned, nothing uses
    /// it) at `epoch`; `false` when it is too large or the cache is full:
    /// then it is still the caller's to unmap.
    pub(crate) fn put(&self, addr: usize, size: usize, epoch: usize) -> bool {
        // Only huge blocks proper: the few small blocks mapped beside the
        // heap during a fork would fill the slots for nothing.
        if size <= crate::page::MAX_BLOCK || size > MAX_BLOCK || addr >> 57 != 0 {
            return false;
        }
        let reserved = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
        if reserved <= MAX_BYTES {
            crate::interrupt_point!(HugeCachePut);
            let w = pack(addr, size);
            for (slot, stamp) in self.slots.iter().zip(&self.stamps) {
                if slot.load(Ordering::Relaxed) == 0 {
                    stamp.store(epoch, Ordering::Relaxed);
                    if slot
                        .compare_exchange(0, w, Ordering::Release, Ordering::Relaxed)
                        .is_ok()
                    {
                        return true;
                    }
                }
            }
        }
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        false
    }

    /// The smallest kept mapping of at least `size` bytes whose address is
    /// a multiple of `align`, taken out of the cache: `(address, its
    /// size)`. The caller unmaps what it does not need beyond `size`.
    pub(crate) fn take(&self, size: usize, align: usize) -> Option<(usize, usize)> {
        // A slot taken by another thread between the scan and the swap:
        // look again, a bounded number of times.
        for _ in 0..SLOTS {
            let mut best: Option<(usize, u64)> = None;
            for (i, slot) in self.slots.iter().enumerate() {
                let w = slot.load(Ordering::Relaxed);
                let (a, s) = unpack(w);
                if w != 0
                    && s >= size
                    && a % align == 0
                    && best.is_none_or(|(_, b)| s < unpack(b).1)
                {
                    best = Some((i, w));
                }
            }
            let (i, w) = best?;
            if self.slots[i]
                .compare_exchange(w, 0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let (a, s) = unpack(w);
                self.bytes.fetch_sub(s, Ordering::Relaxed);
                return Some((a, s));
            }
        }
        None
    }

    /// Takes every mapping kept at least `idle` epochs before `epoch`
    /// (every one when `all`), handing each (address, size) to `release`.
    pub(crate) fn take_idle(
        &self,
        epoch: usize,
        idle: usize,
        all: bool,
        mut release: impl FnMut(usize, usize),
    ) {
        for (slot, stamp) in self.slots.iter().zip(&self.stamps) {
            let w = slot.load(Ordering::Relaxed);
            if w == 0 {
                continue;
            }
            if !all && epoch.wrapping_sub(stamp.load(Ordering::Relaxed)) < idle {
                continue;
            }
            if slot
                .compare_exchange(w, 0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let (a, s) = unpack(w);
                self.bytes.fetch_sub(s, Ordering::Relaxed);
                release(a, s);
            }
        }
    }

    /// In a forked child, the only thread: the byte count set to what the
    /// slots hold. A put or take of a thread the child does not have may
    /// have been cloned between its count and its slot (see the module
    /// documentation): counted, its bytes would stay for good, with no slot
    /// to take them off, and the room of the cache less by as much.
    pub(crate) fn recount(&self) {
        let bytes = self
            .slots
            .iter()
            .map(|slot| unpack(slot.load(Ordering::Relaxed)).1)
            .sum();
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Bytes kept now.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}
