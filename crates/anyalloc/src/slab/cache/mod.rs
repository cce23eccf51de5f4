//! One size class's cache: per-CPU sheaves, a barn, and partial slabs.
//!
//! # Structure
//!
//! * **Slots** (per CPU, per context level, like the page allocator's): each
//!   holds a *main* and a *spare* `Sheaf`, arrays of free object pointers
//!   (`sheaf_capacity` of them: about 15 KiB worth, 30 to 254), guarded by
//!   a try-only [`SlotLock`]. The slot holds `top`, a pointer to the main
//!   sheaf's next free entry (sheaves are 2 KiB-aligned with their objects
//!   first, so `top`'s low bits are the count and its high bits the
//!   sheaf), and the spare as a pointer. Allocation pops from main, free
//!   pushes to main; when main is empty (full) the slot trades it for the
//!   spare or a barn sheaf by pointer, never by copying objects. Level-0
//!   slots (the fast paths') live in the heap's per-CPU region (see
//!   `LEVEL0_STRIDE`); the others follow the cache's own array, level by
//!   level.
//! * **Barn** (one per cache, under its own [`ZoneLock`]): full and empty
//!   sheaves that the slots trade theirs for, a few pointer stores under a
//!   lock held for nothing else, so that a nolock refill can trade with the
//!   barn while a slab operation holds the node lock (the context it
//!   interrupted, say), rather than giving up on its class.
//! * **Node** (one per cache, under a [`ZoneLock`]): the *partial slabs*
//!   (slabs with free objects), one doubly linked list per zone through the
//!   slab head pages' descriptor links (`next`/`prev`, unused by the page
//!   layer while a block is allocated).
//! * **Slabs**: runs of `2^order` pages. Every page of a slab has its
//!   cache's owner tag (`class::tag_of(index)`) as `owner` in its
//!   descriptor; the head page's descriptor holds the free
//!   list (`freelist`, links stored in the free objects themselves), the count
//!   of objects out of the slab (`inuse`), and how many objects were ever
//!   carved from the slab's untouched tail (`carved`: fresh slabs are carved
//!   lazily, so their pages are not touched before use).
//! * **Deferred stack**: objects whose nolock free found every lock held;
//!   the object's first word is the link. Drained by the next normal-path
//!   operation on this cache and by `Heap::drain`; a nolock allocation that
//!   finds the node lock held takes objects from it (`alloc_deferred`).
//!
//! The code, by file: this one holds the types, the constants and a
//! cache's setup; `allocate` and `free` the paths of each mode;
//! `barn` the exchanges of sheaves with the barn and the slabs, flushes,
//! maintenance and `drain`; `validate` the checks a pointer passes before
//! a cache takes it back.
//!
//! # Double-free detection (every build)
//!
//! As glibc's tcache key: each heap has a secret `key` (a non-canonical
//! address, so never a heap address), and a free writes it into the freed
//! object's *key word*: the second word for objects of 16 bytes or more,
//! the first for the 8- and 12-byte classes. A free that finds the key
//! there already (O(1): one load and compare) suspects a double free and
//! makes the exact check, `Cache::is_free`: it searches every sheaf, the
//! deferred stack, the barn and the object's slab free list, and aborts
//! with a one-line message only when it finds the object (user data that
//! happens to equal the key costs a search, never an abort). A nolock
//! search that finds the node or the barn lock held cannot look in the
//! barn and the free list: the object is parked on `suspects` (never
//! handed out from there) until a normal drain searches again, with the
//! locks. Allocation
//! clears the key word; carving an object from a slab's untouched tail
//! writes it (the object is free until handed out, in a sheaf meanwhile).
//! The links of the slab free lists and the deferred
//! stack (first words) are stored XOR the key, so in the tiny classes,
//! whose key word is that link, a free object's first word XOR the key is
//! 0, [`NIL`](crate::sync::NIL) or a heap address: those values are
//! suspects too. A link is checked whenever it is followed: a slab free
//! list's must be 0 or an object of the same slab (`Cache::slab_link`), the
//! deferred stack's the end or an object of the cache
//! (`Cache::deferred_link`); anything else means the object was written
//! after its free, which is reported.
//!
//! # Sheaf conservation
//!
//! Every slot, once prepared, holds a main sheaf and a spare; the barn
//! holds the cache's others (`BarnSize::sheaves`, full or empty). Sheaves change
//! places whole, under the slot lock (and the barn lock for the barn): a
//! sheaf leaving main gets its count written from `top` first, a sheaf
//! becoming main sets `top` from its count. While a sheaf is main its own
//! count is stale; `top` is the truth. `is_free`'s unlocked scan may miss
//! a sheaf that changes places while it looks, never report an object that
//! was not free. No sheaf
//! is ever allocated or freed: the slots and sheaves live in the heap's
//! metadata area, zero-filled, and a zeroed slot or sheaf is valid (a slot
//! gets its sheaves and its capacity when first taken, `Cache::prepare`). The
//! barn's empty sheaves that were never used are not on its list but
//! counted (`Barn::fresh`, handed out from the end of the area). So
//! building a heap writes none of them, and their pages are not resident
//! until a cache needs them.
//!
//! # Lock order
//!
//! slot, then node, then barn, then the page allocator's locks. A node or
//! barn holder never takes a slot. Only a flush of the barn to the slabs,
//! and the exact double-free search, hold the node and the barn together;
//! a refill or a flush lets the barn go before it takes the node. The
//! nolock path only `try_lock`s.

mod allocate;
mod barn;
mod free;
mod validate;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::class::{self, SIZES};
use crate::idle::IdleWatch;
use crate::page::{slot_index, Fail, Mode, PageAllocator, Zone, LEVELS, MAX_ZONES, NIL};
use crate::platform::{FatalMessage, Platform};
use crate::sync::{FastGate, IndexStack, SlotGuard, SlotLock, ZoneGuard, ZoneLock};
use crate::PAGE_SIZE;

/// The first class whose objects hold the key at offset 8 (16 bytes and
/// up); the smaller ones hold it at 0 (see "Double-free detection").
pub(crate) const FIRST_KEYED_CLASS: usize = 2;
const _: () = assert!(SIZES[FIRST_KEYED_CLASS - 1] < 16 && SIZES[FIRST_KEYED_CLASS] >= 16);
/// [`FIRST_KEYED_CLASS`]'s owner tag: a plain cache's tag below it is a
/// tiny class's (tags grow with the class).
pub(crate) const FIRST_KEYED_TAG: usize = super::class::tag_of(FIRST_KEYED_CLASS);

/// Offset of the key word in an object of `class`: 8, or 0 for the tiny
/// classes (objects smaller than 16 bytes), whose key word is the link.
#[inline(always)]
const fn key_off(class: usize) -> usize {
    key_off_of_tag(class::tag_of(class))
}

/// [`key_off`] of the class whose owner tag is `tag`, tested on the tag
/// itself: the fast paths hold the tag, and a caller that has already
/// branched on it (`tag >= FIRST_KEYED_TAG`) lets the compiler fold this
/// test away, which it does not do through the class's index (measured: the
/// sized free computed the offset from the index, 7 instructions, and kept
/// the tiny classes' checks inline).
#[inline(always)]
pub(crate) const fn key_off_of_tag(tag: usize) -> usize {
    if tag < FIRST_KEYED_TAG {
        0
    } else {
        8
    }
}
// Validation's 32-bit words (the slab mask, `recip`) and its object-start
// test (`start_magic`, exact for 32-bit offsets) need every slab to fit in
// 32 bits; `start_bound` needs the test's bound to fit too.
const _: () = {
    let mut c = 0;
    while c < SIZES.len() {
        assert!(SIZES[c] >= 2 && (PAGE_SIZE << class::slab_order(c)) <= 1 << 32);
        assert!(start_bound(SIZES[c], objects_per_slab(c, false)) <= u32::MAX as u64);
        assert!(start_bound(SIZES[c], objects_per_slab(c, true)) <= u32::MAX as u64);
        c += 1;
    }
};

/// Object pointers a sheaf has room for (the sheaf is 2 KiB); a class uses
/// [`sheaf_capacity`] of them.
pub(crate) const SHEAF_CAP: usize = 254;
/// Bytes of objects a sheaf of a class holds at most, unless that is fewer
/// than 30 objects: 30 objects of 512 bytes and above, 240 of 64 bytes, up
/// to `SHEAF_CAP` of the smallest. Small objects come and go in larger
/// numbers, and a sheaf of them is cheap to keep; large ones keep the
/// caches' memory bounded.
///
/// Each slot trade with the spare or the barn is a slow path (the slot's
/// lock sequence, a locked instruction, and for the barn its lock): at
/// half these bytes (1 KiB sheaves, 120 objects of 64 bytes) those slow
/// paths took about a tenth of the time of 1000 allocations of 64 bytes
/// followed by their frees, and the batch ran 0.2-0.3 ns per pair slower.
const SHEAF_BYTES: usize = 60 * 256;

/// Objects per sheaf of class `c`: `SHEAF_BYTES` of them, between 30 and
/// `SHEAF_CAP`.
pub(crate) const fn sheaf_capacity(c: usize) -> usize {
    let n = SHEAF_BYTES / SIZES[c] as usize;
    if n < 30 {
        30
    } else if n > SHEAF_CAP {
        SHEAF_CAP
    } else {
        n
    }
}
/// How much each cache's barn of a heap may hold: `sheaves` sheaves (laid
/// out in the metadata area, full or empty), and at most `bytes` bytes of
/// free objects waiting in its full ones (big classes keep fewer full
/// sheaves). Beyond that a flush returns objects to their slabs, so that
/// memory freed is memory returned.
///
/// The barn is what a batch of frees fills and the next batch of
/// allocations empties without the slabs: a class whose live objects swing
/// by more than the barn (and the slots' sheaves) holds sends the rest of
/// the swing through the slabs under the node lock (a slab's run of
/// objects at a time, each object's link written and read), which costs
/// several times a sheaf trade. Measured on the Intel host
/// (batches of `n` allocations then their frees, `Global` against
/// mimalloc, ns per pair): with 16 sheaves and 256 KiB, 10,000 x 64 B took
/// 9.1 against 5.2, 4000 x 256 B 13.6 against 6.9 and 1000 x 1 KiB 15.9
/// against 14.3; with 64 sheaves and 1 MiB, 4.0, 5.0 and 5.7, and batches
/// that fit in the smaller barn did not move.
///
/// So the barn scales with the heap ([`for_memory`](Self::for_memory)): a
/// small heap keeps the small barn, whose memory would be a large share of
/// it, and whose sheaves a heap over an embedder's region carves from that
/// region ([`MIN`](Self::MIN)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BarnSize {
    /// Bytes of objects its full sheaves may hold together.
    pub(crate) bytes: usize,
}

impl BarnSize {
    /// Bytes of the bound per sheaf of the barn: 16 KiB, above the 15 KiB
    /// that the fullest sheaf of `SHEAF_BYTES` holds.
    const BYTES_PER_SHEAF: usize = 16 << 10;

    /// The smallest barn: 16 sheaves, 256 KiB.
    pub(crate) const MIN: BarnSize = BarnSize { bytes: 256 << 10 };
    /// The largest: 64 sheaves, 1 MiB.
    pub(crate) const MAX: BarnSize = BarnSize { bytes: 1 << 20 };

    /// Sheaves in the barn (laid out in the metadata area): one per 16
    /// KiB of its bound.
    pub(crate) const fn sheaves(self) -> usize {
        self.bytes / Self::BYTES_PER_SHEAF
    }

    /// The barn of a heap whose first zone has `memory` bytes: a
    /// sixty-fourth of it, between [`MIN`](Self::MIN) (heaps of up to 16
    /// MiB) and [`MAX`](Self::MAX) (64 MiB and more, the default), with a
    /// sheaf per 16 KiB.
    ///
    /// ```text
    /// memory:  <= 16 MiB   32 MiB   >= 64 MiB
    /// barn:    256 KiB     512 KiB  1 MiB
    /// sheaves: 16          32       64
    /// ```
    pub(crate) const fn for_memory(memory: usize) -> BarnSize {
        let mut bytes = memory / 64;
        if bytes < Self::MIN.bytes {
            bytes = Self::MIN.bytes;
        } else if bytes > Self::MAX.bytes {
            bytes = Self::MAX.bytes;
        }
        BarnSize { bytes }
    }
}
const _: () = {
    assert!(BarnSize::MIN.sheaves() == 16 && BarnSize::MAX.sheaves() == 64);
    assert!(BarnSize::for_memory(0).bytes == BarnSize::MIN.bytes);
    assert!(BarnSize::for_memory(usize::MAX).bytes == BarnSize::MAX.bytes);
    assert!(BarnSize::for_memory(64 << 20).bytes == BarnSize::MAX.bytes);
    assert!(BarnSize::for_memory(16 << 20).bytes == BarnSize::MIN.bytes);
};
/// Empty slabs a cache keeps before returning slabs to the page allocator.
const EMPTY_SLAB_RESERVE: usize = 1;

/// Bytes of a sheaf slot: a cache line (its sheaves are elsewhere; under
/// loom the lock is loom's larger model type).
pub(crate) const SLOT_BYTES: usize = core::mem::size_of::<SheafSlot>();
#[cfg(not(loom))]
const _: () = assert!(SLOT_BYTES == 64);

/// Bytes from one CPU's level-0 slot of a cache to the next CPU's: the heap
/// keeps the level-0 slots of every cache side by side per CPU (see
/// `slab::MetaLayout`), so a CPU's fast paths touch one small region, and
/// the fast path finds a cache's level-0 slot from the heap's core, the
/// cache's index and the CPU id (`slab::HeapCore::cache_at`); the slow
/// paths from the cache's `level0`.
///
/// A power of two (the caches' slots rounded up; the rest of each CPU's
/// region is address space never touched), so a sequence finds its CPU's
/// slot with a shift (`LEVEL0_SHIFT`) rather than a multiplication.
pub(crate) const LEVEL0_STRIDE: usize = (super::CACHES * SLOT_BYTES).next_power_of_two();
/// `log2(LEVEL0_STRIDE)`.
pub(crate) const LEVEL0_SHIFT: u32 = LEVEL0_STRIDE.trailing_zeros();

/// An array of free object pointers, its objects first and 2 KiB-aligned:
/// a pointer to the next free entry (a slot's `top`) is the sheaf in its
/// high bits and 8 times the count in its low eleven (0: empty; a full
/// sheaf's 254 entries end at 2032).
#[repr(C, align(2048))]
pub(crate) struct Sheaf {
    objs: [AtomicUsize; SHEAF_CAP],
    /// The count, while the sheaf is not a slot's main (then `top` says).
    count: AtomicUsize,
    next: AtomicPtr<Sheaf>,
}

const _: () = assert!(core::mem::size_of::<Sheaf>() == 2048);
/// `top`'s bits below a sheaf's alignment: 8 times the main sheaf's count.
const TOP_COUNT_BITS: usize = core::mem::align_of::<Sheaf>() - 1;
const _: () = assert!(core::mem::offset_of!(Sheaf, objs) == 0 && SHEAF_CAP * 8 <= TOP_COUNT_BITS);

// The rseq sequences' view of a sheaf and a slot (`sync::rseq::layout`).
// (Under loom the lock is loom's model type, and rseq is never used.)
#[cfg(not(loom))]
const _: () = {
    use crate::sync::rseq::layout as l;
    assert!(core::mem::align_of::<Sheaf>() == l::SHEAF_ALIGN);
    assert!(core::mem::offset_of!(SheafSlot, lock) == l::SHEAF_SLOT_LOCK);
    assert!(core::mem::offset_of!(SheafSlot, top) == l::SLOT_TOP);
    assert!(core::mem::offset_of!(SheafSlot, limit_lo) == l::SLOT_LIMIT);
    assert!(core::mem::offset_of!(SheafSlot, limit_mid) == l::SLOT_LIMIT + 4);
    assert!(core::mem::offset_of!(SheafSlot, limit_hi) == l::SLOT_LIMIT + 6);
    assert!(core::mem::offset_of!(SheafSlot, nolock_ok) == l::SLOT_NOLOCK_OK);
    assert!(core::mem::size_of::<SheafSlot>() == SLOT_BYTES);
    assert!(core::mem::size_of::<SlotLock>() == 1);
};

impl Sheaf {
    /// The `top` of a slot whose main sheaf this is, holding `n` objects.
    #[inline]
    fn top_at(&self, n: usize) -> usize {
        self as *const Sheaf as usize + n * 8
    }
    /// The count, Acquire: a lock-free reader (`Cache::is_free`'s scan)
    /// that finds `n` objects finds the first `n` entries written (see
    /// "Unlocked readers" on [`SheafSlot`]).
    #[inline]
    fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
    #[inline]
    fn pop(&self) -> Option<usize> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        self.count.store(n - 1, Ordering::Relaxed);
        Some(self.objs[n - 1].load(Ordering::Relaxed))
    }
    /// Pushes `obj` unless the sheaf holds `cap` objects already.
    #[inline]
    fn push(&self, obj: usize, cap: usize) -> bool {
        let n = self.len();
        if n >= cap {
            return false;
        }
        self.objs[n].store(obj, Ordering::Relaxed);
        // Release: the entry before the count that covers it.
        self.count.store(n + 1, Ordering::Release);
        true
    }
}

/// One CPU's (at one context level) sheaves of one cache: the main sheaf
/// through `top`, a pointer to its next free entry (so the fast paths load
/// one word to find both the sheaf and its count), the spare by pointer.
/// Both are traded whole (see "Sheaf conservation").
///
/// # Unlocked readers
///
/// `Cache::is_free`'s scan reads slots without their locks, and must never
/// take an object for free that is not: it must not see a count that
/// covers an entry with an older object in it (popped and handed out since,
/// perhaps the very object being freed). So every store that makes entries
/// visible is Release and comes after them (`top` in `main_push` and
/// `set_main`, `spare`, a sheaf's `count` in `Sheaf::push` and when it
/// leaves main), and the scan loads `top`, `spare` and `count` with
/// Acquire. On x86-64 (TSO) these are the plain moves they replace, and
/// the restartable sequences' commits are plain stores; on weakly ordered
/// CPUs (aarch64, which runs the try-locked fallback) they are what makes
/// the scan sound.
///
/// # The push gate
///
/// The push sequence compares `top` with one word, the gate: `limit` (the
/// main sheaf's address plus 8 times `cap`) in its low seven bytes, the
/// slot's lock byte in its top byte. Read as a signed number, the gate is
/// `limit` while the slot is free and negative while it is held (every
/// held state of [`SlotLock`] has its top bit set), so one comparison
/// fails the push both on a full main sheaf and on a held slot. The
/// fields below spell the word out for Rust (no two fields overlap, so
/// the lock byte is only ever accessed as a byte); only a holder writes
/// `limit`'s bytes ([`set_limit`](Self::set_limit)), and a push that
/// reads them torn finds the lock's bit too. The push reads the gate
/// before `top` (see `sync::rseq::sheaf_push` for why the order matters);
/// the pop tests the lock byte itself, first.
#[repr(C, align(64))]
pub(crate) struct SheafSlot {
    /// Objects its sheaves hold at most (the class's `sheaf_capacity`). 0
    /// until the slot is first taken (`Cache::prepare`).
    cap: core::sync::atomic::AtomicU32,
    /// Set when a nolock allocation found this slot empty; the maintainer
    /// keeps such slots stocked. A normal allocation does not set it: its
    /// refill can wait for the node lock, so a stock kept for it would only
    /// hold memory. Cleared by drain.
    demand: core::sync::atomic::AtomicU32,
    /// The main sheaf's next free entry: the sheaf's address plus 8 times
    /// its count. 0 until prepared, which makes every pop sequence fail.
    top: AtomicUsize,
    /// The push gate (see "The push gate"): `limit`, the main sheaf's
    /// address plus 8 times `cap` (0 until prepared), in its low seven
    /// bytes (here, low first)...
    limit_lo: core::sync::atomic::AtomicU32,
    limit_mid: core::sync::atomic::AtomicU16,
    limit_hi: core::sync::atomic::AtomicU8,
    /// ...and the lock, its top byte.
    pub(crate) lock: SlotLock,
    spare: AtomicPtr<Sheaf>,
    /// Nolock allocations served from this slot, less the counts that
    /// aborted pops took back here: only the sum over the slots is
    /// meaningful (`page::slot_count_total`).
    pub(crate) nolock_ok: AtomicU64,
    /// Maintenance: for how many passes the slot's sheaves have not changed.
    idle: IdleWatch,
}

impl SheafSlot {
    /// The main sheaf and its count, from one reading of `top` (racy for a
    /// reader that does not hold the slot); `None` before the slot is
    /// prepared.
    #[inline]
    fn main_view(&self) -> Option<(&Sheaf, usize)> {
        // Acquire: the entries `top` covers (see "Unlocked readers").
        let t = self.top.load(Ordering::Acquire);
        if t == 0 {
            return None;
        }
        // SAFETY: a non-zero `top` points into one of the cache's sheaves
        // (`set_main`), which live in the heap's metadata area as long as
        // the heap (init); the sheaf starts at the alignment below it.
        let sheaf = unsafe { &*((t & !TOP_COUNT_BITS) as *const Sheaf) };
        Some((sheaf, (t & TOP_COUNT_BITS) / 8))
    }
    /// Objects in the main sheaf (racy unless held).
    #[inline]
    fn main_len(&self) -> usize {
        (self.top.load(Ordering::Relaxed) & TOP_COUNT_BITS) / 8
    }
    /// Pops from the main sheaf (slot held: no sequence runs on it).
    #[inline]
    fn main_pop(&self, _g: &SlotGuard<'_>) -> Option<usize> {
        let (sheaf, n) = self.main_view()?;
        if n == 0 {
            return None;
        }
        let o = sheaf.objs[n - 1].load(Ordering::Relaxed);
        self.top.store(sheaf.top_at(n - 1), Ordering::Relaxed);
        Some(o)
    }
    /// Pushes onto the main sheaf unless it is full (slot held). The object
    /// is stored before `top` covers it.
    #[inline]
    fn main_push(&self, obj: usize, _g: &SlotGuard<'_>) -> bool {
        let Some((sheaf, n)) = self.main_view() else {
            return false;
        };
        if n >= self.cap.load(Ordering::Relaxed) as usize {
            return false;
        }
        sheaf.objs[n].store(obj, Ordering::Relaxed);
        // Release: the entry before the `top` that covers it.
        self.top.store(sheaf.top_at(n + 1), Ordering::Release);
        true
    }
    /// Sets the push gate's `limit` (slot held: the lock byte above it is
    /// the holder's, and only the holder writes these bytes).
    #[inline]
    fn set_limit(&self, limit: usize, _g: &SlotGuard<'_>) {
        crate::check!(limit >> 56 == 0, "a sheaf address above 2^56");
        self.limit_lo.store(limit as u32, Ordering::Relaxed);
        self.limit_mid
            .store((limit >> 32) as u16, Ordering::Relaxed);
        self.limit_hi.store((limit >> 48) as u8, Ordering::Relaxed);
    }
    /// The object on top of the main sheaf, or 0 (racy unless held).
    #[inline]
    fn main_last(&self) -> usize {
        match self.main_view() {
            Some((sheaf, n)) if n > 0 => sheaf.objs[n - 1].load(Ordering::Relaxed),
            _ => 0,
        }
    }
    /// Makes `sheaf` (one of the cache's, off every list, its count
    /// current) the main sheaf (slot held). The slot's old main must have
    /// been taken off with [`detach_main`](Self::detach_main) first.
    #[inline]
    fn set_main(&self, sheaf: *mut Sheaf, g: &SlotGuard<'_>) {
        let cap = self.cap.load(Ordering::Relaxed) as usize;
        // SAFETY: per the caller, one of the cache's sheaves.
        let s = unsafe { &*sheaf };
        let n = s.len();
        crate::check!(
            sheaf as usize & TOP_COUNT_BITS == 0 && n <= cap,
            "a main sheaf misaligned or over capacity"
        );
        self.set_limit(s.top_at(cap), g);
        // Release: the sheaf's entries (written by whoever filled it, seen
        // here through the locks) before the `top` that covers them.
        self.top.store(s.top_at(n), Ordering::Release);
    }
    /// The main sheaf with its count written back (slot held), for the
    /// caller to put elsewhere and replace with [`set_main`](Self::set_main).
    #[inline]
    fn detach_main(&self, _g: &SlotGuard<'_>) -> *mut Sheaf {
        let t = self.top.load(Ordering::Relaxed);
        crate::check!(t != 0, "the main sheaf of a slot never prepared");
        let sheaf = (t & !TOP_COUNT_BITS) as *mut Sheaf;
        // SAFETY: as in `main_view`.
        unsafe { &*sheaf }
            .count
            .store((t & TOP_COUNT_BITS) / 8, Ordering::Release);
        sheaf
    }
    /// The spare sheaf, for a holder of a prepared slot (every slot a
    /// `Cache` hands out locked is prepared).
    #[inline]
    fn spare(&self) -> &Sheaf {
        let p = self.spare.load(Ordering::Relaxed);
        crate::check!(!p.is_null(), "the spare sheaf of a slot never prepared");
        // SAFETY: once prepared, spare always points to one of the cache's
        // sheaves, which live in the heap's metadata area as long as the
        // heap (init).
        unsafe { &*p }
    }
    /// The spare sheaf, if the slot was ever prepared (for readers that
    /// do not hold the slot).
    #[inline]
    fn spare_if_any(&self) -> Option<&Sheaf> {
        // Acquire: the sheaf's count and entries (see "Unlocked readers").
        // SAFETY: null, or as in `spare`.
        unsafe { self.spare.load(Ordering::Acquire).as_ref() }
    }
    /// Main becomes spare and spare main (slot held): two pointers change,
    /// no object moves.
    #[inline]
    fn swap(&self, g: &SlotGuard<'_>) {
        let old = self.detach_main(g);
        let spare = self.spare.load(Ordering::Relaxed);
        self.spare.store(old, Ordering::Release);
        self.set_main(spare, g);
    }
    /// Objects cached in this slot (racy).
    pub(crate) fn cached(&self) -> usize {
        self.main_len() + self.spare_if_any().map_or(0, Sheaf::len)
    }
}

/// The slabs of a cache, under `lock`: the partial lists and the count of
/// empty slabs (the node counters are written under the lock,
/// `ZoneGuard::add`).
struct Node {
    lock: ZoneLock,
    partial: [AtomicU32Head; MAX_ZONES],
    empty_slabs: AtomicUsize,
}

/// The barn of a cache, under its own `lock` (see "Lock order"): the lists
/// of full and empty sheaves, the contents of the sheaves on them, and its
/// counters (written under the lock, [`BarnGuard::add`]).
struct Barn {
    lock: ZoneLock,
    full: AtomicPtr<Sheaf>,
    empty: AtomicPtr<Sheaf>,
    /// Barn sheaves never used yet, besides the `empty` list: the first
    /// `fresh` of the barn's part of the sheaf area (`sheaves`),
    /// zero-filled.
    fresh: AtomicUsize,
    sheaves: *mut Sheaf,
    /// Its sheaves, and the bytes of objects the full ones may hold
    /// together.
    size: BarnSize,
    /// Objects in full barn sheaves.
    objects: AtomicUsize,
    /// Exchanges with the barn so far, and (maintenance) for how many passes
    /// that count has not moved.
    ops: AtomicUsize,
    idle: IdleWatch,
}

/// Proof that the barn's lock is held (a [`ZoneGuard`] of the barn's lock,
/// typed apart from the node's): its lists, the sheaves on them and its
/// counters are the holder's.
pub(super) struct BarnGuard<'a>(ZoneGuard<'a>);

impl BarnGuard<'_> {
    /// Adds `n` (wrapping) to a barn counter, as [`ZoneGuard::add`].
    fn add(&self, counter: &AtomicUsize, n: usize) {
        self.0.add(counter, n);
    }
}

type AtomicU32Head = core::sync::atomic::AtomicU32;

/// Counters of a cache, for [`HeapStats`](super::HeapStats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Object size of the class in bytes.
    pub size: usize,
    /// Objects handed out and not freed.
    pub objects_in_use: usize,
    /// Slabs the class holds.
    pub slabs: usize,
    /// Objects a sheaf of this class holds: 30 for objects of 512 bytes and
    /// up, more for smaller ones (about 15 KiB of objects, at most 254).
    pub sheaf_capacity: usize,
    /// Free objects cached in per-CPU sheaves.
    pub cached_in_sheaves: usize,
    /// Free objects cached in full sheaves in the barn.
    pub cached_in_barn: usize,
    /// Free objects the barn's full sheaves may hold at most: as many full
    /// sheaves as its sheaves and its byte bound allow. That bound grows
    /// with the heap's first zone, from 256 KiB (heaps of up to 16 MiB,
    /// and heaps over an embedder's region) to 1 MiB (64 MiB and more);
    /// what a batch of frees brings beyond the slots' sheaves and this
    /// goes back to the slabs. (Accounted objects have caches, and barns,
    /// of their own: this is one barn's.)
    pub barn_capacity: usize,
    /// Objects parked on the deferred stack.
    pub deferred: usize,
}

/// See the module documentation.
///
/// `repr(C)`, so that what the fast paths read (the gates, the
/// object-start test, the key, the level-0 slots' address) comes first and
/// shares one cache line: a free touches one line of its cache, not four.
#[repr(C, align(512))]
pub(crate) struct Cache {
    /// The gate of the normal fast paths: the CPU count they hand to the
    /// sequences, `cpus` while open (`rseq`, and nothing deferred as far as
    /// the gate knows), 0 while closed (see [`FastGate`] for the protocol
    /// and why it is never left open over a parked object). `defer` closes
    /// it after its push, and so does every context that took the deferred
    /// stack and puts part of it back (`alloc_deferred`, `is_free`); a
    /// normal slow path that finds it closed drains, then reopens it
    /// (`drain_and_reopen`).
    normal_cpus: FastGate,
    /// The CPU count the nolock fast paths hand to the sequences: `cpus`
    /// with `rseq`, else 0 (see `normal_cpus`).
    nolock_cpus: usize,
    /// CPU 0's level-0 slot; CPU `c`'s is `c * LEVEL0_STRIDE` bytes further.
    /// (The fast-path sequences compute it from the heap's layout instead:
    /// `HeapCore::cache_at`, which checks the two agree in debug builds.)
    level0: *const SheafSlot,
    /// The heap's secret (see "Double-free detection").
    key: usize,
    /// Validation's multiplier, [`start_magic`]`(size)`: an offset `off`
    /// in a slab is the start of an object exactly when
    /// `off.wrapping_mul(start_magic)` is below `start_bound` (see
    /// [`is_start`]). One multiplication and one
    /// comparison, no division.
    start_magic: u64,
    /// The bytes of a slab minus one. Slabs are buddy blocks of their
    /// order, naturally aligned (a zone's base is aligned to the largest
    /// block), so an address's offset in its slab is `addr & slab_mask`.
    ///
    /// This and `start_bound` are two fields, not one word loaded once:
    /// the free's test then takes its operands from memory, two
    /// instructions fewer than splitting a word (measured: about 0.1 ns of
    /// a small pair, which is bound by the instructions it runs).
    slab_mask: u32,
    /// [`start_mask`]`(size, objs, slab_mask)`: an address whose bits
    /// under this mask are all 0 is an object's start without the
    /// multiplication. `size - 1` for a power-of-two size whose slab is
    /// all objects, so that this test is its whole check there (one `test`
    /// with its operand from memory, where the multiplication's check
    /// takes five instructions: measured, that check was about 0.2 ns of
    /// the batch's 2.3 ns free, which is not bound by its instruction
    /// count). `u32::MAX` for the other classes: their test fails but at
    /// an address whose low 32 bits are 0 (a slab's start, since slabs
    /// are naturally aligned and at most 2^32 bytes), so they take the
    /// multiplication with one predictable branch more. (`slab_mask`
    /// there, true at every slab's first object, mispredicted once a
    /// slab: 48 to 384-byte batches took 0.15-0.4 ns more a pair.) It
    /// fills `slab_mask`'s padding.
    start_mask: u32,
    /// [`start_bound`]`(size, objs)`, `objs * (size * start_magic mod
    /// 2^64)`: the bound of the object-start test, which also excludes the
    /// slab's tail (owner words, bitmap, slack). It is at most the slab's
    /// bytes, so it fits in 32 bits (asserted for every class).
    start_bound: u64,
    class: usize,
    /// Slabs of accounted caches end with an array of owner groups, one
    /// word per object (0: none).
    pub(crate) accounted: bool,
    /// Index of this cache in the heap (its owner tag is
    /// `class::tag_of(index)`).
    index: usize,
    size: usize,
    /// `ceil(2^32 / size)`: `(off * recip) >> 32` is `off / size` exactly
    /// for every multiple of `size` inside a slab (off * (recip - 2^32 /
    /// size) < 2^15 * 2^13 < 2^32), for the slow paths that need an
    /// object's index.
    recip: u32,
    order: u32,
    objs: usize,
    /// Objects per sheaf (`sheaf_capacity`).
    cap: usize,
    node: Node,
    barn: Barn,
    deferred: IndexStack,
    deferred_count: AtomicUsize,
    /// Freed objects whose key said "maybe a double free" when the exact
    /// check could not decide (a nolock free that found the node lock
    /// held): never handed out from here; the next normal drain checks
    /// them again with the lock (`drain_suspects`). Linked as the deferred
    /// stack is.
    suspects: IndexStack,
    /// Contexts holding a chain they took off the deferred stack or the
    /// suspects (`take_all`) to drain or search it, not yet freed, checked
    /// or put back ([`DeferredTaker`]): a fork waits for them
    /// (`HeapCore::lock_all`), so that no chain is cloned in the hands of a
    /// thread the child does not have (its objects would be lost there, and
    /// counted in use for good: a suspect is counted in use until a drain
    /// frees it).
    takers: core::sync::atomic::AtomicU32,
    /// The slots of the other levels, level by level (`slot_index`):
    /// `(LEVELS - 1) * cpus` of them.
    slots: *const SheafSlot,
    /// The cache's sheaves outside its slots: the spare of slot `i` is
    /// sheaf `i`, the barn's follow.
    sheaves: *mut Sheaf,
    /// All slots: `cpus * LEVELS`.
    nslots: usize,
    cpus: usize,
    /// The fast path runs as restartable sequences on the level-0 slots
    /// (chosen once, at init; see `sync::rseq`). Otherwise it try-locks
    /// them like every other slot.
    rseq: bool,
    /// With `rseq`: the rseq area's offset from the thread pointer (glibc's
    /// `__rseq_offset`, the same for every thread of the process), kept
    /// here so the fast path loads it from this cache's own line.
    rseq_off: isize,
    /// Slabs this cache holds (written under the node lock, `ZoneGuard::add`).
    slabs: AtomicUsize,
    /// Objects out of slabs (in sheaves, in the barn, deferred, or in use;
    /// written under the node lock, `ZoneGuard::add`).
    out_of_slabs: AtomicUsize,
    pub(crate) fail_busy: AtomicU64,
    pub(crate) fail_empty: AtomicU64,
    pub(crate) free_deferred: AtomicU64,
    /// Nolock allocations served without a slot of this CPU to count them
    /// in (`nolock_ok` of a slot): a slab under a tried node lock, or the
    /// deferred stack (`alloc_deferred`).
    nolock_ok_slotless: AtomicU64,
}

// The fast paths' fields share the first cache line; a cache is 512 bytes
// (the class reaches its cache with a shift). (Under loom the atomics are
// loom's model types, and rseq is never used.)
#[cfg(not(loom))]
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Cache, key) < 64 && offset_of!(Cache, start_magic) < 64);
    assert!(offset_of!(Cache, slab_mask) < 64 && offset_of!(Cache, start_bound) < 64);
    assert!(offset_of!(Cache, start_mask) < 64);
    // The sheaf sequences' target is the cache itself
    // (`sync::rseq::layout`).
    use crate::sync::rseq::layout as l;
    assert!(offset_of!(Cache, normal_cpus) == l::SHEAF_NORMAL_CPUS);
    assert!(offset_of!(Cache, nolock_cpus) == l::SHEAF_NOLOCK_CPUS);
    assert!(core::mem::size_of::<FastGate>() == 8);
    assert!(core::mem::size_of::<Cache>() == 512);
};

/// Bytes of one cache's slots above level 0 (written when the heap is
/// built; the heap packs every cache's slots together, so they share
/// pages). The level-0 slots are in the heap's per-CPU region.
pub(crate) fn cache_slot_bytes(cpus: usize) -> usize {
    cpus * (LEVELS - 1) * SLOT_BYTES
}

/// Bytes of one cache's sheaves (a main and a spare per slot, then the
/// barn's; zero-filled, written only once used). A multiple of a sheaf's
/// alignment, so that every cache's area, laid out after an aligned start,
/// keeps its sheaves aligned.
pub(crate) fn cache_sheaf_bytes(cpus: usize, barn: BarnSize) -> usize {
    (2 * cpus * LEVELS + barn.sheaves()) * core::mem::size_of::<Sheaf>()
}

/// The object-start multiplier of `size`: `m = floor(2^64 / size) + 1`.
///
/// Why one comparison decides "a multiple of `size` below `objs * size`"
/// (after Lemire, Kaser and Kurz, "Faster remainder by direct
/// computation", 2019, whose divisibility test this extends with the
/// bound): let `e = size * m - 2^64`, so `1 <= e <= size` (`e = size` when
/// `size` is a power of two). Write a 32-bit `off` as `q * size + r` with
/// `r < size`. Then `off * m = q * 2^64 + q * e + r * m`, so modulo 2^64
/// the product is `q * e + r * m`, which does not wrap (`q * e <= 2^32`,
/// `r * m < 2^64 - 2^64 / size + size`, and `2^64 / size > 2^32 + size`
/// for any size up to 2^31):
///
/// - `r = 0`, a multiple: the product is `q * e`, below `objs * e`
///   exactly when `q < objs`;
/// - `r > 0`: the product is at least `m > 2^32 >= objs * e`.
///
/// So `off * m mod 2^64 < objs * e` exactly for the objects' starts.
const fn start_magic(size: u32) -> u64 {
    ((1u128 << 64) / size as u128) as u64 + 1
}

/// The bound that goes with [`start_magic`] for `objs` objects of `size`.
const fn start_bound(size: u32, objs: usize) -> u64 {
    (size as u64).wrapping_mul(start_magic(size)) * objs as u64
}

/// The mask of an address's bits that are all 0 only at an object's start
/// (see `Cache::start_mask`), for `objs` objects of `size` in slabs of
/// `slab_mask + 1` bytes: `size - 1` when `size` is a power of two and the
/// objects fill the slab (every multiple of the size in it starts one),
/// else `u32::MAX` (only an address at offset 0 of a slab aligned to 2^32
/// bytes passes, and such an offset starts an object: `objs` is at least
/// 1).
const fn start_mask(size: u32, objs: usize, slab_mask: u32) -> u32 {
    if size.is_power_of_two() && size as u64 * objs as u64 == slab_mask as u64 + 1 {
        size - 1
    } else {
        u32::MAX
    }
}

/// Whether slab offset `off` is the start of one of the objects that
/// [`start_magic`] and [`start_bound`] describe: exact for every 32-bit
/// `off`.
#[inline(always)]
fn is_start(off: u32, magic: u64, bound: u64) -> bool {
    (off as u64).wrapping_mul(magic) < bound
}

/// Reports a double free of object `obj`, and aborts.
#[cold]
#[inline(never)]
fn double_free(platform: &dyn Platform, obj: usize) -> ! {
    platform.fatal(
        FatalMessage::new()
            .text("anyalloc: double free of object ")
            .hex(obj)
            .line(),
    )
}

/// Reports a free object whose free-list link a write after its free
/// corrupted (see `Cache::slab_link`), and aborts.
#[cold]
#[inline(never)]
fn corrupt_link(platform: &dyn Platform, obj: usize) -> ! {
    platform.fatal(
        FatalMessage::new()
            .text("anyalloc: use after free: the free object ")
            .hex(obj)
            .text(" was written to (its free-list link is corrupt)")
            .line(),
    )
}

/// `ceil(2^32 / size)` (see `Cache::recip`).
const fn recip(size: u32) -> u32 {
    (1u64 << 32).div_ceil(size as u64) as u32
}

/// `off / size` for an offset inside a slab that is a multiple of `size`,
/// from `size`'s [`recip`].
#[inline(always)]
fn index_by_recip(off: u32, recip: u32) -> usize {
    ((off as u64 * recip as u64) >> 32) as usize
}

/// The bytes of a slab of class `c` minus one (`Cache::slab_mask`).
const fn slab_mask(c: usize) -> u32 {
    ((PAGE_SIZE << class::slab_order(c)) - 1) as u32
}

/// Bytes at a slab's end reserved for the `debug-checks` bitmap.
const fn bitmap_bytes(c: usize) -> usize {
    let bytes = PAGE_SIZE << class::slab_order(c);
    if cfg!(feature = "debug-checks") {
        (bytes / SIZES[c] as usize).div_ceil(64) * 8
    } else {
        0
    }
}

/// Objects a slab of class `c` holds. The slab's tail holds, from the end:
/// the `debug-checks` bitmap, then (accounted caches) one owner word per
/// object.
pub(crate) const fn objects_per_slab(c: usize, accounted: bool) -> usize {
    let room = (PAGE_SIZE << class::slab_order(c)) - bitmap_bytes(c);
    let per_object = SIZES[c] as usize + if accounted { 8 } else { 0 };
    room / per_object
}

/// What one cache is: its place in the heap, its class, and the heap-wide
/// choices it shares.
pub(crate) struct CacheSetup {
    /// Index of the cache in the heap (its owner tag is
    /// `class::tag_of(index)`).
    pub(crate) index: usize,
    /// Size class.
    pub(crate) class: usize,
    /// Whether objects carry an owner group word.
    pub(crate) accounted: bool,
    /// CPU slot sets.
    pub(crate) cpus: usize,
    /// With the rseq fast path: glibc's rseq area offset.
    pub(crate) rseq_off: Option<isize>,
    /// The heap's double-free key.
    pub(crate) key: usize,
    /// The barn's sheaves (in the sheaf area) and byte cap.
    pub(crate) barn: BarnSize,
}

impl Cache {
    /// Initialises the cache `setup` describes at `this`, with CPU 0's
    /// level-0 slot at `level0` (CPU `c`'s `c * LEVEL0_STRIDE` bytes
    /// further), its other slots at `slot_meta` (`cache_slot_bytes(cpus)`
    /// long) and its sheaves at `sheaf_meta` (`cache_sheaf_bytes(cpus)`
    /// long), all zero-filled and 64-byte aligned, the sheaves aligned as
    /// a `Sheaf`.
    ///
    /// # Safety
    /// `this`, the `cpus` level-0 slots, `slot_meta` and `sheaf_meta` are
    /// valid for writes, suitably aligned, zero-filled (the metadata), and
    /// live and unused by anything else as long as the cache.
    pub(crate) unsafe fn init(
        this: *mut Cache,
        setup: CacheSetup,
        level0: *mut u8,
        slot_meta: *mut u8,
        sheaf_meta: *mut u8,
    ) {
        let CacheSetup {
            index,
            class,
            accounted,
            cpus,
            rseq_off,
            key,
            barn,
        } = setup;
        let nslots = cpus * LEVELS;
        let slots = slot_meta as *mut SheafSlot;
        let level0 = level0 as *mut SheafSlot;
        let sheaves = sheaf_meta as *mut Sheaf;
        crate::check!(sheaves.is_aligned(), "the sheaves are misaligned");
        let (size, objs, mask) = (
            SIZES[class],
            objects_per_slab(class, accounted),
            slab_mask(class),
        );
        // SAFETY: per the contract, all of it is ours to write; sheaves are
        // zero-filled, i.e. valid empty sheaves.
        unsafe {
            this.write(Cache {
                class,
                key,
                accounted,
                index,
                size: size as usize,
                start_magic: start_magic(size),
                slab_mask: mask,
                start_mask: start_mask(size, objs, mask),
                start_bound: start_bound(size, objs),
                recip: recip(size),
                order: class::slab_order(class),
                objs,
                cap: sheaf_capacity(class),
                node: Node {
                    lock: ZoneLock::new(),
                    partial: [const { AtomicU32Head::new(NIL) }; MAX_ZONES],
                    empty_slabs: AtomicUsize::new(0),
                },
                barn: Barn {
                    lock: ZoneLock::new(),
                    full: AtomicPtr::new(core::ptr::null_mut()),
                    empty: AtomicPtr::new(core::ptr::null_mut()),
                    fresh: AtomicUsize::new(barn.sheaves()),
                    sheaves: sheaves.add(2 * nslots),
                    size: barn,
                    objects: AtomicUsize::new(0),
                    ops: AtomicUsize::new(0),
                    idle: IdleWatch::new(),
                },
                deferred: IndexStack::new(),
                deferred_count: AtomicUsize::new(0),
                suspects: IndexStack::new(),
                takers: core::sync::atomic::AtomicU32::new(0),
                level0,
                slots,
                sheaves,
                nslots,
                cpus,
                rseq: rseq_off.is_some(),
                normal_cpus: FastGate::new(if rseq_off.is_some() { cpus } else { 0 }),
                nolock_cpus: if rseq_off.is_some() { cpus } else { 0 },
                rseq_off: rseq_off.unwrap_or(0),
                slabs: AtomicUsize::new(0),
                out_of_slabs: AtomicUsize::new(0),
                fail_busy: AtomicU64::new(0),
                fail_empty: AtomicU64::new(0),
                free_deferred: AtomicU64::new(0),
                nolock_ok_slotless: AtomicU64::new(0),
            });
            // The slots are left as the zero-filled metadata: a free lock,
            // an empty main sheaf, no spare and capacity 0, which `prepare`
            // completes when the slot is first taken. So building a heap
            // makes none of them resident.
        }
    }

    /// Takes an empty sheaf from the barn (barn lock held): from its list,
    /// else one never used. Null when the barn has none.
    fn take_empty(&self, _barn: &BarnGuard<'_>) -> *mut Sheaf {
        let empty = self.barn.empty.load(Ordering::Relaxed);
        if !empty.is_null() {
            // SAFETY: barn sheaves are cache sheaves; the barn lock gives us
            // the barn lists.
            let next = unsafe { (*empty).next.load(Ordering::Relaxed) };
            self.barn.empty.store(next, Ordering::Relaxed);
            return empty;
        }
        let fresh = self.barn.fresh.load(Ordering::Relaxed);
        if fresh == 0 {
            return core::ptr::null_mut();
        }
        self.barn.fresh.store(fresh - 1, Ordering::Relaxed);
        // The first `fresh` barn sheaves are unused and zero-filled: valid
        // empty sheaves (`sheaves` has `BarnSize::sheaves` of them, init).
        self.barn.sheaves.wrapping_add(fresh - 1)
    }

    /// Takes the barn's lock the way `mode` may (see [`Mode`]).
    pub(super) fn lock_barn<'a>(
        &'a self,
        mode: Mode,
        pages: &'a PageAllocator,
    ) -> Option<BarnGuard<'a>> {
        self.barn
            .lock
            .lock_in(mode, pages.platform())
            .map(BarnGuard)
    }

    /// The node lock, then the barn's (the lock order), each taken the way
    /// `mode` may: `None` when either is busy (nolock) or gives way (see
    /// `ZoneLock::lock_in`).
    pub(super) fn lock_node_and_barn<'a>(
        &'a self,
        mode: Mode,
        pages: &'a PageAllocator,
    ) -> Option<(ZoneGuard<'a>, BarnGuard<'a>)> {
        let node = self.node.lock.lock_in(mode, pages.platform())?;
        let barn = self.lock_barn(mode, pages)?;
        Some((node, barn))
    }

    /// Whether the fast path runs as restartable sequences.
    pub(crate) fn uses_rseq(&self) -> bool {
        self.rseq
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The size class this cache serves.
    pub(crate) fn class(&self) -> usize {
        self.class
    }

    /// Whether the node and barn locks' waiters poll (see
    /// `ZoneLock::set_polling`).
    pub(crate) fn set_polling(&self, poll: bool) {
        self.node.lock.set_polling(poll);
        self.barn.lock.set_polling(poll);
    }

    #[inline]
    pub(crate) fn slot(&self, cpu: usize, level: usize) -> &SheafSlot {
        self.slot_at(slot_index(cpu, self.cpus, level))
    }

    /// Slot `i` of `nslots`, numbered as `slot_index` says: the first
    /// `cpus` are the level-0 slots, in the heap's per-CPU region.
    #[inline]
    fn slot_at(&self, i: usize) -> &SheafSlot {
        crate::check!(i < self.nslots, "a slot index out of range");
        let slot = if i < self.cpus {
            self.level0.wrapping_byte_add(i * LEVEL0_STRIDE)
        } else {
            self.slots.wrapping_add(i - self.cpus)
        };
        // SAFETY: `init` wrote all `nslots` slots where this finds them;
        // they live as long as the cache.
        unsafe { &*slot }
    }

    /// Completes slot `i` the first time it is taken (the heap leaves
    /// slots zero-filled, see `init`): its capacity, its main sheaf (which
    /// opens it to the sequences) and its spare, sheaves `2i` and `2i + 1`
    /// of the cache's area. The holder's guard is the proof that nobody
    /// else writes it.
    #[inline]
    fn prepare(&self, i: usize, slot: &SheafSlot, g: &SlotGuard<'_>) {
        if slot.cap.load(Ordering::Relaxed) == 0 {
            crate::check!(i < self.nslots, "a slot index out of range");
            slot.cap.store(self.cap as u32, Ordering::Relaxed);
            slot.spare
                .store(self.sheaves.wrapping_add(2 * i + 1), Ordering::Relaxed);
            slot.set_main(self.sheaves.wrapping_add(2 * i), g);
        }
    }

    /// CPU 0's level-0 slot of this cache.
    pub(crate) fn level0_addr(&self) -> *const u8 {
        self.level0.cast()
    }

    /// This cache as [`HeapCore::cache_at`](super::HeapCore) names it for
    /// the fast-path sequences: the heap's core (the metadata area's
    /// start, `CACHES_OFF` before the first cache) and the index.
    #[inline]
    pub(crate) fn core_and_idx(&self) -> (*const u8, usize) {
        let me = (self as *const Self).cast::<u8>();
        let base = me.wrapping_sub(super::CACHES_OFF + self.index * core::mem::size_of::<Self>());
        (base, super::class::tag_of(self.index))
    }

    /// Takes this CPU's slot at `level` for a slow path of this context. With
    /// rseq, the level-0 slot is taken by the lock sequence (ordered with
    /// every fast-path sequence on the CPU it runs on, whose slot it
    /// returns); every other slot by its try-lock.
    #[inline]
    fn lock_own(&self, cpu: usize, level: usize) -> Option<(&SheafSlot, SlotGuard<'_>)> {
        if self.rseq && level == 0 {
            // SAFETY: as in `fast_pop`.
            let Some(cpu) = (unsafe {
                crate::sync::rseq::lock_slot::<
                    LEVEL0_STRIDE,
                    { crate::sync::rseq::layout::SHEAF_SLOT_LOCK },
                >(self.rseq_off, self.level0.cast(), self.cpus)
            }) else {
                return self.borrow_level0(cpu);
            };
            let slot = self.slot(cpu, 0);
            // SAFETY: the lock sequence just set this slot's flag for us.
            let g = unsafe { slot.lock.adopt() };
            self.prepare(slot_index(cpu, self.cpus, 0), slot, &g);
            return Some((slot, g));
        }
        let i = slot_index(cpu, self.cpus, level);
        let slot = self.slot_at(i);
        let g = slot.lock.try_lock()?;
        self.prepare(i, slot, &g);
        Some((slot, g))
    }

    /// The lock sequence found this CPU's level-0 slot busy: on the fork
    /// window's owner thread, a slot held across the fork is borrowed
    /// (`SlotLock::borrow`; `cpu` was read after the fork handler took it,
    /// so no sequence that read it free is still in flight on it).
    #[cold]
    fn borrow_level0(&self, cpu: usize) -> Option<(&SheafSlot, SlotGuard<'_>)> {
        if !crate::context::owns_fork_window() {
            return None;
        }
        let i = slot_index(cpu, self.cpus, 0);
        let slot = self.slot_at(i);
        let g = slot.lock.borrow()?;
        self.prepare(i, slot, &g);
        Some((slot, g))
    }

    /// Takes slot `i` (of `nslots`) from a context that may be on any CPU:
    /// the maintainer, `drain`. With rseq, a level-0 slot is then fenced
    /// (every sequence on its CPU restarted, see `sync::rseq`) before it is
    /// returned: a syscall, so normal context only.
    fn lock_remote(&self, i: usize) -> Option<(&SheafSlot, SlotGuard<'_>)> {
        let slot = self.slot_at(i);
        let g = slot.lock.try_lock()?;
        // Level-0 slots come first (`slot_index`): slot `i < cpus` is CPU `i`'s.
        if self.rseq && i < self.cpus && !crate::sync::rseq::fence_cpu(i) {
            return None; // cannot stop that CPU's sequences: leave the slot
        }
        self.prepare(i, slot, &g);
        Some((slot, g))
    }

    /// Whether the nolock path may take another CPU's slot at `level`:
    /// not a level-0 slot under rseq (that would need a fence, a syscall).
    #[inline]
    fn remote_nolock_ok(&self, level: usize) -> bool {
        !(self.rseq && level == 0)
    }

    fn slots(&self) -> impl Iterator<Item = &SheafSlot> {
        (0..self.nslots).map(move |i| self.slot_at(i))
    }

    /// Every CPU's level-0 slot lock (the normal path's, whose holders may
    /// wait for the node lock), for fork (`SlotLock::hold_all`).
    #[cfg(feature = "std")]
    pub(crate) fn level0_locks(&self) -> impl Iterator<Item = &SlotLock> + Clone {
        (0..self.cpus).map(move |c| &self.slot_at(slot_index(c, self.cpus, 0)).lock)
    }

    /// Fork support: takes the node lock, then the barn's (the lock
    /// order), without guards.
    #[cfg(feature = "std")]
    pub(crate) fn lock_node_raw(&self, pages: &PageAllocator) {
        self.node.lock.lock_raw(pages.platform());
        self.barn.lock.lock_raw(pages.platform());
    }

    /// Releases the locks taken by `lock_node_raw`.
    ///
    /// # Safety
    /// `lock_node_raw` was called and not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_node_raw(&self, pages: &PageAllocator) {
        // SAFETY: per the caller.
        unsafe {
            self.barn.lock.force_unlock(pages.platform());
            self.node.lock.force_unlock(pages.platform());
        }
    }

    /// This cache's counters.
    pub(crate) fn stats(&self) -> ClassStats {
        let cached_in_sheaves: usize = self.slots().map(|s| s.cached()).sum();
        let cached_in_barn = self.barn.objects.load(Ordering::Relaxed);
        let deferred = self.deferred_count.load(Ordering::Relaxed);
        let out = self.out_of_slabs.load(Ordering::Relaxed);
        ClassStats {
            size: self.size,
            objects_in_use: out.saturating_sub(cached_in_sheaves + cached_in_barn + deferred),
            slabs: self.slabs.load(Ordering::Relaxed),
            sheaf_capacity: self.cap,
            cached_in_sheaves,
            cached_in_barn,
            barn_capacity: self.barn_capacity(),
            deferred,
        }
    }

    /// Objects the barn's full sheaves may hold ([`ClassStats::barn_capacity`]):
    /// `barn_empty_with_room` gives a sheaf's worth a place while they
    /// fit in the byte bound, and the barn has only so many sheaves.
    fn barn_capacity(&self) -> usize {
        let size = self.barn.size;
        (size.bytes / (self.cap * self.size)).min(size.sheaves()) * self.cap
    }

    pub(crate) fn nolock_ok(&self) -> u64 {
        crate::page::slot_count_total(self.slots().map(|s| s.nolock_ok.load(Ordering::Relaxed)))
            + self.nolock_ok_slotless.load(Ordering::Relaxed)
    }
}

/// One context in a cache's count of deferred-stack takers (see
/// `Cache::takers`), from creation to drop.
struct DeferredTaker<'a>(&'a core::sync::atomic::AtomicU32);

impl Drop for DeferredTaker<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validation's arithmetic is exact for every class and every byte
    /// offset in a slab, plain and accounted: the object-start test says
    /// yes exactly at the starts of the slab's objects (not in its tail),
    /// and the reciprocal gives their index.
    #[test]
    fn validation_arithmetic_is_exact_for_every_offset() {
        for (c, &size) in SIZES.iter().enumerate() {
            let r = recip(size);
            let bytes = (PAGE_SIZE << class::slab_order(c)) as u32;
            for accounted in [false, true] {
                let objs = objects_per_slab(c, accounted);
                let (magic, bound) = (start_magic(size), start_bound(size, objs));
                let mask = start_mask(size, objs, slab_mask(c));
                for off in 0..bytes {
                    let start = off % size == 0 && ((off / size) as usize) < objs;
                    assert_eq!(
                        is_start(off, magic, bound),
                        start,
                        "class {size}, accounted {accounted}, offset {off}"
                    );
                    // The shortcut says yes only at a start; the whole
                    // check (`is_object_start`'s) is exact.
                    assert!(off & mask != 0 || start, "class {size}: mask at {off}");
                    assert_eq!(
                        off & mask == 0 || is_start(off, magic, bound),
                        start,
                        "class {size}, accounted {accounted}, offset {off}: the whole check"
                    );
                    if off % size == 0 {
                        assert_eq!(index_by_recip(off, r), (off / size) as usize);
                    }
                }
            }
        }
        // The test holds for any 32-bit offset, not only inside a slab.
        for &size in SIZES.iter() {
            let objs = (u32::MAX / size) as usize;
            let (magic, bound) = (start_magic(size), start_bound(size, objs));
            for off in [
                u32::MAX,
                u32::MAX - size + 1,
                u32::MAX / size * size,
                (u32::MAX / size - 1) * size,
                1 << 31,
                (1 << 31) + 1,
            ] {
                let start = off % size == 0 && ((off / size) as usize) < objs;
                assert_eq!(is_start(off, magic, bound), start, "{size} {off}");
            }
        }
    }

    /// The lock, as the sheaf sequences see it (the push through its gate,
    /// see "The push gate"; the pop through the lock byte at its new
    /// place): with the slot free, the pop and the push succeed (the pop
    /// fails on an empty main sheaf); while the slot is held, in any of
    /// the lock's held states and however it was taken (its try-lock, the
    /// lock sequence, fork's `hold_all`), both fail.
    #[cfg(all(feature = "std", target_os = "linux"))]
    #[test]
    fn a_held_slot_fails_both_sheaf_sequences() {
        use anyalloc_storm::thread::{current_cpu, pin_to_cpu};
        use core::alloc::Layout;
        // Pinned, so that the sequences run on the slot under test.
        let cpu = current_cpu();
        assert!(pin_to_cpu(cpu));
        let heap = crate::Heap::new(crate::Config::default().memory(16 << 20).maintenance(false))
            .expect("a heap");
        let layout = Layout::from_size_align(64, 8).unwrap();
        let cache = heap.core().cache(class::class_for(64, 8).unwrap());
        if !cache.rseq {
            std::eprintln!("rseq is not in use here: the gate is not tested");
            return;
        }
        // Raw pops and pushes here come in pairs (an object popped is
        // pushed back), so the heap's own view of its objects (with
        // `debug-checks`, its allocation bitmaps) stays true.
        let a = heap.alloc(layout).unwrap();
        let b = heap.alloc(layout).unwrap().as_ptr() as usize;
        let slot = cache.slot(cpu, 0);
        // `a` back to this CPU's main sheaf: not empty, not full.
        // SAFETY: `a` is this heap's, freed once.
        unsafe { heap.free(a) };
        let cap = slot.cap.load(Ordering::Relaxed) as usize;
        assert!(slot.main_len() > 0 && slot.main_len() < cap);
        let free_ok = |what: &str| {
            let o = cache.seq_pop::<false>().expect(what);
            assert!(cache.seq_push(o, Mode::Normal), "{what}: the push");
        };
        let held_fails = |what: &str| {
            assert!(slot.lock.is_locked(), "{what}");
            assert_eq!(cache.seq_pop::<false>(), None, "{what}: the pop");
            assert_eq!(cache.seq_pop::<true>(), None, "{what}: the counting pop");
            assert!(!cache.seq_push(b, Mode::Normal), "{what}: the push");
            assert!(!cache.seq_push(b, Mode::NoLock), "{what}: the nolock push");
        };
        free_ok("free");
        {
            let _g = slot.lock.try_lock().expect("a free slot");
            held_fails("held (try-lock)");
        }
        free_ok("free again");
        {
            let (s, _h) = cache.lock_own(cpu, 0).expect("the lock sequence");
            assert!(core::ptr::eq(s, slot));
            held_fails("held (the lock sequence)");
        }
        free_ok("free after the lock sequence");
        assert!(SlotLock::hold_all(
            core::iter::once(&slot.lock),
            std::time::Duration::from_secs(1)
        ));
        held_fails("held across a fork");
        // SAFETY: `hold_all` took it just above.
        unsafe { SlotLock::release_all(core::iter::once(&slot.lock)) };
        free_ok("free after the fork");
        // An empty main fails the pop (the push's failure on a full one is
        // what every free that swaps sheaves runs into).
        let mut popped = std::vec::Vec::new();
        while let Some(o) = cache.seq_pop::<false>() {
            popped.push(o);
        }
        assert!(!popped.is_empty() && slot.main_len() == 0);
        assert_eq!(cache.seq_pop::<true>(), None, "an empty main");
        for o in popped.into_iter().rev() {
            assert!(cache.seq_push(o, Mode::Normal), "a main with room");
        }
        // SAFETY: `b` is this heap's, freed once (no push above took it).
        unsafe { heap.free(NonNull::new(b as *mut u8).unwrap()) };
    }
}
