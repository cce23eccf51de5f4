//! Page descriptors: one per page frame, beside the managed region.
//!
//! The kernel's `struct page`, reduced to what this allocator needs. Only the
//! descriptor of a block's *head* page carries state; every other page of a
//! block (and every page never split off) is [`TAIL`], which is also what the
//! OS's zero-filled memory reads as. That is what lets the descriptor array be
//! committed lazily: creating a zone writes no descriptor of its whole
//! largest blocks (they stay untouched until the buddy allocator carves one,
//! `Zone::fresh`), only the head descriptors of the partial blocks at its
//! ends.
//!
//! `state` packs a kind and an order: `kind | order << 8`.
//!
//! | kind        | where the block is                    | who may change it          |
//! |-------------|---------------------------------------|----------------------------|
//! | `TAIL`      | inside a larger block, or untouched   | zone lock (split / merge)   |
//! | `BUDDY`     | on the zone's free list of its order  | zone lock                   |
//! | `PCP`       | on a per-CPU list (or being pushed by the free that claimed it) | that slot's lock (that free) |
//! | `DEFERRED`  | on the zone's deferred-free stack     | the draining zone-lock holder |
//! | `ALLOCATED` | handed out                            | the owner (CAS on free)     |
//! | `FREEING`   | claimed by a free in progress         | that free                  |
//! | `RELEASING` | free, off its list while the maintainer returns its memory to the OS | the maintainer |
//!
//! A free claims the block with one CAS `ALLOCATED|order -> FREEING` (or
//! `-> PCP|order` when it is about to push the block onto its CPU's list: a
//! fast free stores no other state; FREEING again if the push fails), so a
//! double free, a free with the wrong order, or a free of a page that is not
//! a block head fails that CAS and is reported instead of corrupting a list,
//! even when two contexts race to free the same block. A free block whose
//! memory the maintainer is returning to the OS (`madvise`, without the zone
//! lock) is `RELEASING`, never `ALLOCATED`, so a wrong free of it fails the
//! claim too instead of inserting the block into a free list twice.
//!
//! While a block is `ALLOCATED` its `next`/`prev` links are free for the
//! slab layer (partial-slab lists), which also owns `owner`, `inuse`,
//! `freelist` and `carved` (see `crate::slab`). While it is `BUDDY`, the
//! zone uses `carved` (when it became free, and whether its memory is back
//! with the OS) and `inuse` (at most how many of its pages are: see
//! `Zone::gone_pages`).

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};

pub(crate) const TAIL: u32 = 0;
pub(crate) const BUDDY: u32 = 1;
pub(crate) const PCP: u32 = 2;
pub(crate) const DEFERRED: u32 = 3;
pub(crate) const ALLOCATED: u32 = 4;
pub(crate) const FREEING: u32 = 5;
pub(crate) const RELEASING: u32 = 6;

#[inline]
pub(crate) const fn state(kind: u32, order: u32) -> u32 {
    kind | (order << 8)
}
#[inline]
pub(crate) const fn kind_of(state: u32) -> u32 {
    state & 0xff
}
#[inline]
pub(crate) const fn order_of(state: u32) -> u32 {
    (state >> 8) & 0xff
}

/// One page frame's descriptor (32 bytes).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct PageDesc {
    /// `kind | order << 8`, see the module table.
    pub(crate) state: AtomicU32,
    /// List link: buddy free list, per-CPU list, or deferred stack.
    pub(crate) next: AtomicU32,
    /// Back link of the buddy free list.
    pub(crate) prev: AtomicU32,
    /// Slab layer: the owning cache's owner tag (its index + 1, shifted:
    /// `slab::class::tag_of`), or a large-allocation marker, on
    /// every page of a slab and the head page of a large allocation; 0 on
    /// pages the object allocator does not own. The heap clears it before
    /// its own free of the block; the page allocator's public frees report
    /// a block whose owner is set (`PageAllocator::claim_fast`).
    pub(crate) owner: AtomicU16,
    /// Slab layer: objects of this slab out of its free list.
    pub(crate) inuse: AtomicU16,
    /// Slab layer: the slab's free-object list (address, 0 = empty).
    pub(crate) freelist: AtomicUsize,
    /// Slab layer: objects ever carved from the slab's untouched tail.
    pub(crate) carved: AtomicUsize,
}

const _: () = assert!(core::mem::size_of::<PageDesc>() == 32);

impl PageDesc {
    #[inline]
    pub(crate) fn load(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }
    #[inline]
    pub(crate) fn set(&self, s: u32) {
        self.state.store(s, Ordering::Release);
    }
}
