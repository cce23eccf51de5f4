//! One size class's cache: per-CPU sheaves, a barn, and partial slabs.
//!
//! # Structure
//!
//! * **Slots** (per CPU, per context level, like the page allocator's): each
//!   holds a *main* and a *spare* `Sheaf`, arrays of free object pointers
//!   (`sheaf_capacity` of them: about 7.5 KiB worth, 30 to 126), guarded by
//!   a try-only [`SlotLock`]. The slot holds `top`, a pointer to the main
//!   sheaf's next free entry (sheaves are 1 KiB-aligned with their objects
//!   first, so `top`'s low bits are the count and its high bits the
//!   sheaf), and the spare as a pointer. Allocation pops from main, free
//!   pushes to main; when main is empty (full) the slot trades it for the
//!   spare or a barn sheaf by pointer, never by copying objects. Level-0
//!   slots (the fast paths') live in the heap's per-CPU region (see
//!   `LEVEL0_STRIDE`); the others follow the cache's own array, level by
//!   level.
//! * **Node** (one per cache, under a [`ZoneLock`]): the *barn* of full and
//!   empty sheaves, and the *partial slabs* (slabs with free objects), one
//!   doubly linked list per zone through the slab head pages' descriptor
//!   links (`next`/`prev`, unused by the page layer while a block is
//!   allocated).
//! * **Slabs**: runs of `2^order` pages. Every page of a slab has `owner =
//!   class + 1` in its descriptor; the head page's descriptor holds the free
//!   list (`freelist`, links stored in the free objects themselves), the count
//!   of objects out of the slab (`inuse`), and how many objects were ever
//!   carved from the slab's untouched tail (`carved`: fresh slabs are carved
//!   lazily, so their pages are not touched before use).
//! * **Deferred stack**: objects whose nolock free found every lock held;
//!   the object's first word is the link. Drained by the next normal-path
//!   operation on this cache and by `Heap::drain`; a nolock allocation that
//!   finds the node lock held takes objects from it (`alloc_deferred`).
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
//! search that finds the node lock held cannot look in the barn and the
//! free list: the object is parked on `suspects` (never handed out from
//! there) until a normal drain searches again, with the lock. Allocation
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
//! holds the cache's `BARN_SHEAVES` others (full or empty). Sheaves change
//! places whole, under the slot lock (and the node lock for the barn): a
//! sheaf leaving main gets its count written from `top` first, a sheaf
//! becoming main sets `top` from its count. While a sheaf is main its own
//! count is stale; `top` is the truth. `is_free`'s unlocked scan may miss
//! a sheaf that changes places while it looks, never report an object that
//! was not free. No sheaf
//! is ever allocated or freed: the slots and sheaves live in the heap's
//! metadata area, zero-filled, and a zeroed slot or sheaf is valid (a slot
//! gets its sheaves and its capacity when first taken, `Cache::prepare`). The
//! barn's empty sheaves that were never used are not on its list but
//! counted (`Node::fresh`, handed out from the end of the area). So
//! building a heap writes none of them, and their pages are not resident
//! until a cache needs them.
//!
//! # Lock order
//!
//! slot, then node, then the page allocator's locks. A node holder never
//! takes a slot. The nolock path only `try_lock`s.

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

/// Offset of the key word in an object of `class`: 8, or 0 for the tiny
/// classes (objects smaller than 16 bytes), whose key word is the link.
#[inline(always)]
const fn key_off(class: usize) -> usize {
    if class < FIRST_KEYED_CLASS {
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

/// Object pointers a sheaf has room for (the sheaf is 1 KiB); a class uses
/// [`sheaf_capacity`] of them.
pub(crate) const SHEAF_CAP: usize = 126;
/// Bytes of objects a sheaf of a class holds at most, unless that is fewer
/// than 30 objects: 30 objects of 256 bytes and above, up to `SHEAF_CAP`
/// of the smallest. Small objects come and go in larger numbers, and a
/// sheaf of them is cheap to keep; large ones keep the caches' memory
/// bounded.
const SHEAF_BYTES: usize = 30 * 256;

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
/// Sheaves in each cache's barn.
pub(crate) const BARN_SHEAVES: usize = 32;
/// At most this many bytes of free objects wait in full barn sheaves per
/// cache (big classes keep fewer full sheaves); beyond it, a flush returns
/// objects to their slabs so memory freed is memory returned.
const BARN_BYTES: usize = 256 << 10;
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
/// the fast path finds a cache's level-0 slot from one word of the cache's
/// first line (`level0`) and the CPU id.
///
/// A power of two (the caches' slots rounded up; the rest of each CPU's
/// region is address space never touched), so a sequence finds its CPU's
/// slot with a shift (`LEVEL0_SHIFT`) rather than a multiplication.
pub(crate) const LEVEL0_STRIDE: usize = (super::CACHES * SLOT_BYTES).next_power_of_two();
/// `log2(LEVEL0_STRIDE)`.
pub(crate) const LEVEL0_SHIFT: u32 = LEVEL0_STRIDE.trailing_zeros();

/// An array of free object pointers, its objects first and 1 KiB-aligned:
/// a pointer to the next free entry (a slot's `top`) is the sheaf in its
/// high bits and 8 times the count in its low ten (0: empty; a full sheaf's
/// 126 entries end at 1008).
#[repr(C, align(1024))]
pub(crate) struct Sheaf {
    objs: [AtomicUsize; SHEAF_CAP],
    /// The count, while the sheaf is not a slot's main (then `top` says).
    count: AtomicUsize,
    next: AtomicPtr<Sheaf>,
}

const _: () = assert!(core::mem::size_of::<Sheaf>() == 1024);
/// `top`'s bits below a sheaf's alignment: 8 times the main sheaf's count.
const TOP_COUNT_BITS: usize = core::mem::align_of::<Sheaf>() - 1;
const _: () = assert!(core::mem::offset_of!(Sheaf, objs) == 0 && SHEAF_CAP * 8 <= TOP_COUNT_BITS);

// The rseq sequences' view of a sheaf and a slot (`sync::rseq::layout`).
// (Under loom the lock is loom's model type, and rseq is never used.)
#[cfg(not(loom))]
const _: () = {
    use crate::sync::rseq::layout as l;
    assert!(core::mem::align_of::<Sheaf>() == l::SHEAF_ALIGN);
    assert!(core::mem::offset_of!(SheafSlot, lock) == l::SLOT_LOCK);
    assert!(core::mem::offset_of!(SheafSlot, top) == l::SLOT_TOP);
    assert!(core::mem::offset_of!(SheafSlot, limit) == l::SLOT_LIMIT);
    assert!(core::mem::offset_of!(SheafSlot, nolock_ok) == l::SLOT_NOLOCK_OK);
    assert!(core::mem::size_of::<SheafSlot>() == SLOT_BYTES);
    assert!(core::mem::size_of::<SlotLock>() == 1);
};

impl Sheaf {
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
#[repr(C, align(64))]
pub(crate) struct SheafSlot {
    pub(crate) lock: SlotLock,
    /// Objects its sheaves hold at most (the class's `sheaf_capacity`). 0
    /// until the slot is first taken (`Cache::prepare`).
    cap: core::sync::atomic::AtomicU32,
    /// The main sheaf's next free entry: the sheaf's address plus 8 times
    /// its count. 0 until prepared, which makes every pop sequence fail.
    top: AtomicUsize,
    /// The main sheaf's address plus 8 times `cap`: the push sequence fails
    /// at `top >= limit`, so every push fails until the slot is prepared.
    limit: AtomicUsize,
    spare: AtomicPtr<Sheaf>,
    /// Nolock allocations served from this slot, less the counts that
    /// aborted pops took back here: only the sum over the slots is
    /// meaningful (`page::slot_count_total`).
    pub(crate) nolock_ok: AtomicU64,
    /// Set when a nolock allocation found this slot empty; the maintainer
    /// keeps such slots stocked. A normal allocation does not set it: its
    /// refill can wait for the node lock, so a stock kept for it would only
    /// hold memory. Cleared by drain.
    demand: core::sync::atomic::AtomicU32,
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
        self.top
            .store(self.top.load(Ordering::Relaxed) - 8, Ordering::Relaxed);
        Some(o)
    }
    /// Pushes onto the main sheaf unless it is full (slot held). The object
    /// is stored before `top` covers it.
    #[inline]
    fn main_push(&self, obj: usize, _g: &SlotGuard<'_>) -> bool {
        let t = self.top.load(Ordering::Relaxed);
        if t >= self.limit.load(Ordering::Relaxed) {
            return false;
        }
        let Some((sheaf, n)) = self.main_view() else {
            return false;
        };
        sheaf.objs[n].store(obj, Ordering::Relaxed);
        // Release: the entry before the `top` that covers it.
        self.top.store(t + 8, Ordering::Release);
        true
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
    fn set_main(&self, sheaf: *mut Sheaf, _g: &SlotGuard<'_>) {
        let cap = self.cap.load(Ordering::Relaxed) as usize;
        // SAFETY: per the caller, one of the cache's sheaves.
        let n = unsafe { &*sheaf }.len();
        crate::check!(
            sheaf as usize & TOP_COUNT_BITS == 0 && n <= cap,
            "a main sheaf misaligned or over capacity"
        );
        self.limit
            .store(sheaf as usize + cap * 8, Ordering::Relaxed);
        // Release: the sheaf's entries (written by whoever filled it, seen
        // here through the locks) before the `top` that covers them.
        self.top.store(sheaf as usize + n * 8, Ordering::Release);
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

/// The shared part of a cache, under `lock`.
struct Node {
    lock: ZoneLock,
    full: AtomicPtr<Sheaf>,
    empty: AtomicPtr<Sheaf>,
    /// Barn sheaves never used yet, besides the `empty` list: the first
    /// `fresh` of the barn's part of the sheaf area (`barn`), zero-filled.
    fresh: AtomicUsize,
    barn: *mut Sheaf,
    /// Objects in full barn sheaves (the node counters are written under
    /// the lock, `ZoneGuard::add`).
    barn_objects: AtomicUsize,
    partial: [AtomicU32Head; MAX_ZONES],
    empty_slabs: AtomicUsize,
    /// Exchanges with the barn so far, and (maintenance) for how many passes
    /// that count has not moved.
    barn_ops: AtomicUsize,
    barn_idle: IdleWatch,
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
    /// Objects a sheaf of this class holds: 30 for objects of 256 bytes and
    /// up, more for smaller ones (about 7.5 KiB of objects, at most 126).
    pub sheaf_capacity: usize,
    /// Free objects cached in per-CPU sheaves.
    pub cached_in_sheaves: usize,
    /// Free objects cached in full sheaves in the barn.
    pub cached_in_barn: usize,
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
    /// [`start_bound`]`(size, objs)`, `objs * (size * start_magic mod
    /// 2^64)`: the bound of the object-start test, which also excludes the
    /// slab's tail (owner words, bitmap, slack). It is at most the slab's
    /// bytes, so it fits in 32 bits (asserted for every class).
    start_bound: u32,
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
    level0: *const SheafSlot,
    class: usize,
    /// Slabs of accounted caches end with an array of owner groups, one
    /// word per object (0: none).
    pub(crate) accounted: bool,
    /// Index of this cache in the heap (owner ids are index + 1).
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
    assert!(offset_of!(Cache, normal_cpus) < 64 && offset_of!(Cache, nolock_cpus) < 64);
    assert!(offset_of!(Cache, level0) < 64);
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
pub(crate) fn cache_sheaf_bytes(cpus: usize) -> usize {
    (2 * cpus * LEVELS + BARN_SHEAVES) * core::mem::size_of::<Sheaf>()
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
    /// Index of the cache in the heap (owner ids are index + 1).
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
        } = setup;
        let nslots = cpus * LEVELS;
        let slots = slot_meta as *mut SheafSlot;
        let level0 = level0 as *mut SheafSlot;
        let sheaves = sheaf_meta as *mut Sheaf;
        crate::check!(sheaves.is_aligned(), "the sheaves are misaligned");
        // SAFETY: per the contract, all of it is ours to write; sheaves are
        // zero-filled, i.e. valid empty sheaves.
        unsafe {
            this.write(Cache {
                class,
                key,
                accounted,
                index,
                size: SIZES[class] as usize,
                start_magic: start_magic(SIZES[class]),
                slab_mask: ((PAGE_SIZE << class::slab_order(class)) - 1) as u32,
                start_bound: start_bound(SIZES[class], objects_per_slab(class, accounted)) as u32,
                recip: recip(SIZES[class]),
                order: class::slab_order(class),
                objs: objects_per_slab(class, accounted),
                cap: sheaf_capacity(class),
                node: Node {
                    lock: ZoneLock::new(),
                    full: AtomicPtr::new(core::ptr::null_mut()),
                    empty: AtomicPtr::new(core::ptr::null_mut()),
                    fresh: AtomicUsize::new(BARN_SHEAVES),
                    barn: sheaves.add(2 * nslots),
                    barn_objects: AtomicUsize::new(0),
                    partial: [const { AtomicU32Head::new(NIL) }; MAX_ZONES],
                    empty_slabs: AtomicUsize::new(0),
                    barn_ops: AtomicUsize::new(0),
                    barn_idle: IdleWatch::new(),
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

    /// Takes an empty sheaf from the barn (node lock held): from its list,
    /// else one never used. Null when the barn has none.
    fn take_empty(&self, _node: &ZoneGuard<'_>) -> *mut Sheaf {
        let empty = self.node.empty.load(Ordering::Relaxed);
        if !empty.is_null() {
            // SAFETY: barn sheaves are cache sheaves; the node lock gives us
            // the barn lists.
            let next = unsafe { (*empty).next.load(Ordering::Relaxed) };
            self.node.empty.store(next, Ordering::Relaxed);
            return empty;
        }
        let fresh = self.node.fresh.load(Ordering::Relaxed);
        if fresh == 0 {
            return core::ptr::null_mut();
        }
        self.node.fresh.store(fresh - 1, Ordering::Relaxed);
        // The first `fresh` barn sheaves are unused and zero-filled: valid
        // empty sheaves (`barn` has BARN_SHEAVES of them, init).
        self.node.barn.wrapping_add(fresh - 1)
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

    /// Whether the node lock's waiters poll (see `ZoneLock::set_polling`).
    pub(crate) fn set_polling(&self, poll: bool) {
        self.node.lock.set_polling(poll);
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

    /// Takes this CPU's slot at `level` for a slow path of this context. With
    /// rseq, the level-0 slot is taken by the lock sequence (ordered with
    /// every fast-path sequence on the CPU it runs on, whose slot it
    /// returns); every other slot by its try-lock.
    #[inline]
    fn lock_own(&self, cpu: usize, level: usize) -> Option<(&SheafSlot, SlotGuard<'_>)> {
        if self.rseq && level == 0 {
            // SAFETY: as in `fast_pop`.
            let Some(cpu) = (unsafe {
                crate::sync::rseq::lock_slot::<LEVEL0_STRIDE>(
                    self.rseq_off,
                    self.level0.cast(),
                    self.cpus,
                )
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

    // ----- allocation --------------------------------------------------------

    /// Normal-path allocation. Fast path: nothing deferred, and an object in
    /// the main sheaf of this CPU's level-0 slot.
    #[inline(always)]
    pub(crate) fn alloc(&self, pages: &PageAllocator) -> Option<usize> {
        if self.normal_fast_ok() {
            if let Some(o) = self.fast_pop::<false>(pages) {
                return Some(o);
            }
        }
        self.alloc_slow(pages, pages.cpu())
    }

    /// Whether a normal operation may try the fast path: with rseq always
    /// (the sequences apply the gate, `normal_cpus`), otherwise when nothing
    /// is deferred.
    #[inline(always)]
    fn normal_fast_ok(&self) -> bool {
        self.rseq || self.deferred.is_empty()
    }

    /// The sequences' CPU count for `mode` (0: the fast path is closed).
    #[inline(always)]
    fn seq_cpus(&self, mode: Mode) -> usize {
        match mode {
            Mode::Normal => self.normal_cpus.cpus(),
            Mode::NoLock => self.nolock_cpus,
        }
    }

    /// A validated free of `mode` that [`seq_push`](Self::seq_push) did
    /// not take: the whole free (the try-locked fast path without rseq).
    #[inline(never)]
    pub(crate) fn free_miss(&self, pages: &PageAllocator, obj: usize, mode: Mode) {
        match mode {
            Mode::Normal => self.free(pages, obj),
            Mode::NoLock => self.free_nolock(pages, obj),
        }
    }

    /// The fast path of both allocation paths: pop from the main sheaf of
    /// this CPU's level-0 slot, if the slot is free and main is not empty.
    /// With rseq, a restartable sequence (no atomic instruction); otherwise
    /// under the slot's try-lock.
    #[inline(always)]
    fn fast_pop<const COUNT_NOLOCK: bool>(&self, pages: &PageAllocator) -> Option<usize> {
        if self.rseq {
            return self.seq_pop::<COUNT_NOLOCK>();
        }
        self.locked_pop::<COUNT_NOLOCK>(pages)
    }

    /// The allocation fast path alone: `fast_pop` with rseq, the gate of
    /// the mode applied (`normal_cpus`, `nolock_cpus`). `None`, at once when
    /// the gate is closed or without rseq: take [`alloc`](Self::alloc) or
    /// [`alloc_nolock`](Self::alloc_nolock) (which keeps the try-locked
    /// variant and its call out of the callers' fast path).
    ///
    /// The slot array's address, `level0`, is read from the cache's first
    /// line, which the gate's read brings in anyway.
    #[inline(always)]
    pub(crate) fn seq_pop<const COUNT_NOLOCK: bool>(&self) -> Option<usize> {
        let mode = if COUNT_NOLOCK {
            Mode::NoLock
        } else {
            Mode::Normal
        };
        // `raw_offset` is glibc's area offset (the heap's build ran
        // `prepare_offset`). A non-zero CPU count means `rseq` was chosen at
        // init: the area is registered (this cache's `rseq_off`), and
        // `level0` is CPU 0's level-0 slot, the first of a slot per one of
        // those CPUs, `LEVEL0_STRIDE` bytes apart, laid out as the sequences
        // expect (asserted above), living as long as the cache.
        // SAFETY: as just said (with 0 CPUs the sequence touches only this
        // thread's rseq area); level-0 slots are changed only by sequences
        // and by lock holders, as `sync::rseq` prescribes.
        unsafe {
            crate::sync::rseq::sheaf_pop::<COUNT_NOLOCK, LEVEL0_SHIFT>(
                crate::sync::rseq::raw_offset(),
                self.level0.cast(),
                self.seq_cpus(mode),
            )
        }
    }

    /// `fast_pop` without rseq: under the slot's try-lock. Out of line, so
    /// that the rseq fast path around it needs no stack frame.
    #[inline(never)]
    fn locked_pop<const COUNT_NOLOCK: bool>(&self, pages: &PageAllocator) -> Option<usize> {
        let slot = self.slot(pages.cpu(), 0);
        let g = slot.lock.try_lock()?;
        crate::interrupt_point!(SheafAlloc);
        let o = slot.main_pop(&g)?;
        if COUNT_NOLOCK {
            crate::page::bump(&slot.nolock_ok, &g);
        }
        Some(o)
    }

    /// The fast path of both free paths: push onto the main sheaf of this
    /// CPU's level-0 slot, if the slot is free and main has room. (A double
    /// free never gets here: the key test before it sent it to the exact
    /// search.)
    #[inline(always)]
    fn fast_push(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> bool {
        if self.rseq {
            return self.seq_push(obj, mode);
        }
        self.locked_push(pages, obj)
    }

    /// The free fast path of a validated object alone: `fast_push` with
    /// rseq, the gate of `mode` applied (see `seq_pop`). `false`: the
    /// object is still the caller's; hand it to
    /// [`free_miss`](Self::free_miss).
    #[inline(always)]
    pub(crate) fn seq_push(&self, obj: usize, mode: Mode) -> bool {
        // SAFETY: as in `seq_pop`; `obj` is a validated object of this
        // cache being freed.
        unsafe {
            crate::sync::rseq::sheaf_push::<LEVEL0_SHIFT>(
                crate::sync::rseq::raw_offset(),
                self.level0.cast(),
                self.seq_cpus(mode),
                obj,
            )
        }
    }

    /// `fast_push` without rseq: under the slot's try-lock, out of line.
    #[inline(never)]
    fn locked_push(&self, pages: &PageAllocator, obj: usize) -> bool {
        let slot = self.slot(pages.cpu(), 0);
        let Some(g) = slot.lock.try_lock() else {
            return false;
        };
        crate::interrupt_point!(SheafFree);
        slot.main_push(obj, &g)
    }

    /// Normal-path allocation: deferred frees first, then the slot (spare,
    /// refill), or the slabs directly when the slot is busy. `None` at once
    /// for a thread inside the allocator or in a nolock scope: the caller
    /// takes the nolock path (see [`crate::context`]).
    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, pages: &PageAllocator, cpu: usize) -> Option<usize> {
        if crate::context::nested() {
            return None;
        }
        self.drain_and_reopen(pages);
        if let Some((slot, g)) = self.lock_own(cpu, 0) {
            crate::interrupt_point!(SheafAlloc);
            if let Some(o) = self.pop_slot(slot, &g) {
                return Some(o);
            }
            return self.refill(slot, &g, pages, Mode::Normal).ok();
        }
        // The slot is held by another context: straight to the slabs.
        let node = self.node.lock.lock_in(Mode::Normal, pages.platform())?;
        self.take_object(&node, pages, Mode::Normal).ok()
    }

    /// Nolock allocation. Fast path: this CPU's level-0 slot has an object
    /// in its main sheaf. Otherwise [`alloc_nolock_slow`](Self::alloc_nolock_slow).
    #[inline(always)]
    pub(crate) fn alloc_nolock(&self, pages: &PageAllocator) -> Result<usize, Fail> {
        match self.fast_pop::<true>(pages) {
            Some(o) => Ok(o),
            None => self.alloc_nolock_slow(pages, pages.cpu()),
        }
    }

    /// Nolock allocation, the whole search: every level of this CPU's slots
    /// (spare sheaves, refills with a tried node lock), the other CPUs'
    /// sheaves, then the slabs directly, all with `try_lock`.
    #[cold]
    #[inline(never)]
    fn alloc_nolock_slow(&self, pages: &PageAllocator, cpu: usize) -> Result<usize, Fail> {
        let mut busy = false;
        let mut node_busy = false;
        for level in 0..LEVELS {
            let Some((slot, g)) = self.lock_own(cpu, level) else {
                busy = true;
                continue;
            };
            crate::interrupt_point!(SheafAlloc);
            if let Some(o) = self.pop_slot(slot, &g) {
                crate::page::bump(&slot.nolock_ok, &g);
                return Ok(o);
            }
            if node_busy {
                continue;
            }
            match self.refill(slot, &g, pages, Mode::NoLock) {
                Ok(o) => {
                    crate::page::bump(&slot.nolock_ok, &g);
                    return Ok(o);
                }
                Err(Fail::Busy) => {
                    busy = true;
                    node_busy = true;
                }
                Err(Fail::Empty) => {}
            }
        }
        for other in (0..self.cpus).filter(|&c| c != cpu % self.cpus) {
            for level in (0..LEVELS).filter(|&l| self.remote_nolock_ok(l)) {
                let i = slot_index(other, self.cpus, level);
                let slot = self.slot_at(i);
                if slot.cached() == 0 {
                    continue;
                }
                let Some(g) = slot.lock.try_lock() else {
                    busy = true;
                    continue;
                };
                self.prepare(i, slot, &g);
                if let Some(o) = self.pop_slot(slot, &g) {
                    crate::page::bump(&slot.nolock_ok, &g);
                    return Ok(o);
                }
            }
        }
        if !node_busy {
            if let Some(node) = self.node.lock.try_lock(pages.platform()) {
                let r = self.take_object(&node, pages, Mode::NoLock);
                if r.is_ok() {
                    self.nolock_ok_slotless.fetch_add(1, Ordering::Relaxed);
                }
                return r.map_err(|e| if busy { Fail::Busy } else { e });
            }
        }
        let o = self.alloc_deferred(pages, cpu).ok_or(Fail::Busy)?;
        self.nolock_ok_slotless.fetch_add(1, Ordering::Relaxed);
        Ok(o)
    }

    /// Nolock allocation while the node lock is held elsewhere (another
    /// CPU's refill or flush, the maintainer, or the context this one
    /// interrupted): the objects that frees parked on the deferred stack
    /// meanwhile, waiting for a normal context to return them to their
    /// slabs, are free objects of this cache like a sheaf's. Takes the
    /// stack, keeps its first object, moves as many of the rest as the main
    /// sheaf of a slot of this CPU has room for (if one can be locked), and
    /// puts the remainder back without walking it
    /// ([`IndexStack::put_back`]), so the work does not grow with the
    /// backlog. Then, as `defer` does after a push, it closes the normal
    /// fast path, so the next normal operation drains what was put back.
    ///
    /// Without this, the two CPUs' bursts of nolock allocations, each
    /// holding the node lock in turn for its refills, sent each other to
    /// the next class up while their frees piled up here: memory that no
    /// allocation could reuse until a normal context drained it.
    ///
    /// (Accounted caches too: a free uncharges before the cache sees the
    /// object, and an allocation charges whatever object it is given.)
    #[cold]
    fn alloc_deferred(&self, pages: &PageAllocator, cpu: usize) -> Option<usize> {
        // Every object below is on a chain this context took (`take_all`,
        // or `put_back`'s own take) and owns.
        let link = |o: usize| self.deferred_link(pages, o);
        let _taker = self.deferred_taker()?;
        let first = self.deferred.take_all();
        if first == crate::sync::NIL {
            return None;
        }
        crate::interrupt_point!(ObjectDeferredDrain);
        let mut rest = link(first);
        let mut taken = 1;
        if rest != crate::sync::NIL {
            if let Some((slot, g)) = (0..LEVELS).find_map(|l| self.lock_own(cpu, l)) {
                while rest != crate::sync::NIL && slot.main_len() < self.cap {
                    let next = link(rest);
                    if !slot.main_push(rest, &g) {
                        break;
                    }
                    // A free object in a sheaf carries the key in its key
                    // word: for tiny classes that word held the link.
                    self.set_free_mark(rest);
                    crate::interrupt_point!(ObjectDeferredDrain);
                    taken += 1;
                    rest = next;
                }
            }
        }
        self.deferred_count.fetch_sub(taken, Ordering::Relaxed);
        if rest != crate::sync::NIL {
            self.put_back_deferred(pages, rest);
        }
        Some(first)
    }

    #[inline]
    fn pop_slot(&self, slot: &SheafSlot, g: &SlotGuard<'_>) -> Option<usize> {
        if let Some(o) = slot.main_pop(g) {
            return Some(o);
        }
        if slot.spare().len() > 0 {
            slot.swap(g);
            return slot.main_pop(g);
        }
        None
    }

    /// Main and spare are empty: trade main for a full sheaf from the barn,
    /// or fill it from the slabs. Returns one object.
    #[cold]
    fn refill(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<usize, Fail> {
        // This slot ran empty on the nolock path: the maintainer keeps it
        // stocked from now on.
        if mode == Mode::NoLock {
            slot.demand.store(1, Ordering::Relaxed);
        }
        let node = self
            .node
            .lock
            .lock_in(mode, pages.platform())
            .ok_or(Fail::Busy)?;
        crate::interrupt_point!(SheafRefill);
        if self.trade_main_for_full(slot, g, &node) {
            // Refill runs when the spare is empty too: trade it as well when
            // the barn has another full sheaf, so the next refill (and its
            // node lock) comes two sheaves later instead of one.
            if slot.spare().len() == 0 {
                self.trade_spare_for_full(slot, g, &node);
            }
            return slot.main_pop(g).ok_or(Fail::Empty);
        }
        let first = self.take_object(&node, pages, mode)?;
        // Fill main from the slabs that have free objects; don't make new
        // slabs just to fill a sheaf.
        while slot.main_len() < self.cap && !self.partial_is_empty(pages) {
            crate::interrupt_point!(SheafRefill);
            match self.take_object(&node, pages, mode) {
                Ok(o) => {
                    slot.main_push(o, g);
                }
                Err(_) => break,
            }
        }
        Ok(first)
    }

    fn partial_is_empty(&self, pages: &PageAllocator) -> bool {
        (0..pages.zone_count()).all(|z| self.node.partial[z].load(Ordering::Relaxed) == NIL)
    }

    /// Takes one object from a partial slab, making a new slab if none has
    /// free objects (through the nolock page path in nolock mode).
    fn take_object(
        &self,
        node: &ZoneGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<usize, Fail> {
        crate::interrupt_point!(PartialLocked);
        for zi in 0..pages.zone_count() {
            let head = self.node.partial[zi].load(Ordering::Relaxed);
            if head != NIL {
                let zone = pages.zone_at(zi);
                return Ok(self.take_from_slab(zone, zi, head, node));
            }
        }
        // Normal mode holds the node lock here, so the page allocator must
        // not run shrinkers (one could free into this very cache): the heap
        // runs them itself, with no lock held, when this fails.
        let slab = match mode {
            Mode::Normal => pages
                .alloc_pages_without_reclaim(self.order)
                .ok_or(Fail::Empty),
            Mode::NoLock => pages.alloc_pages_nolock_why(self.order),
        }?;
        let (zi, zone, head) = pages.locate_known(slab.as_ptr() as usize);
        self.init_slab(zone, zi, head, node);
        Ok(self.take_from_slab(zone, zi, head, node))
    }

    fn init_slab(&self, zone: &Zone, zi: usize, head: u32, node: &ZoneGuard<'_>) {
        for i in 0..(1u32 << self.order) {
            zone.desc(head + i)
                .owner
                .store(self.index as u16 + 1, Ordering::Relaxed);
        }
        let d = zone.desc(head);
        d.inuse.store(0, Ordering::Relaxed);
        d.freelist.store(0, Ordering::Relaxed);
        d.carved.store(0, Ordering::Relaxed);
        #[cfg(feature = "debug-checks")]
        {
            let (words, _) = self.bitmap(zone.addr_of(head));
            for w in words {
                w.store(0, Ordering::Relaxed);
            }
        }
        if self.accounted {
            // The owner array may hold stale words from the pages' last use.
            for i in 0..self.objs {
                self.owner_word(zone.addr_of(head), i)
                    .store(0, Ordering::Relaxed);
            }
        }
        node.add(&self.slabs, 1);
        node.add(&self.node.empty_slabs, 1);
        self.partial_push(zone, zi, head, node);
    }

    fn take_from_slab(&self, zone: &Zone, zi: usize, head: u32, node: &ZoneGuard<'_>) -> usize {
        let d = zone.desc(head);
        let free = d.freelist.load(Ordering::Relaxed);
        let obj = if free != 0 {
            let next = self.slab_link(free, d.carved.load(Ordering::Relaxed), zone.platform());
            d.freelist.store(next, Ordering::Relaxed);
            free
        } else {
            let c = d.carved.load(Ordering::Relaxed);
            crate::check!(c < self.objs, "carving beyond a full slab");
            d.carved.store(c + 1, Ordering::Relaxed);
            let obj = zone.addr_of(head) + c * self.size;
            // Free, as every object off a slab is (its key word says so, as
            // a free leaves it), until an allocation hands it out: so a
            // free of it while it waits in a sheaf is the double free it
            // is (with a stale or zero key word it was taken, and the
            // object was later handed out twice).
            self.set_free_mark(obj);
            obj
        };
        let inuse = d.inuse.load(Ordering::Relaxed) as usize + 1;
        d.inuse.store(inuse as u16, Ordering::Relaxed);
        if inuse == 1 {
            node.add(&self.node.empty_slabs, 1usize.wrapping_neg());
        }
        if inuse == self.objs {
            self.partial_remove(zone, zi, head, node);
        }
        node.add(&self.out_of_slabs, 1);
        obj
    }

    // ----- partial lists (node lock held) -------------------------------------

    fn partial_push(&self, zone: &Zone, zi: usize, head: u32, _node: &ZoneGuard<'_>) {
        let list = &self.node.partial[zi];
        let old = list.load(Ordering::Relaxed);
        let d = zone.desc(head);
        d.next.store(old, Ordering::Relaxed);
        d.prev.store(NIL, Ordering::Relaxed);
        if old != NIL {
            zone.desc(old).prev.store(head, Ordering::Relaxed);
        }
        list.store(head, Ordering::Relaxed);
    }

    fn partial_remove(&self, zone: &Zone, zi: usize, head: u32, _node: &ZoneGuard<'_>) {
        let d = zone.desc(head);
        let next = d.next.load(Ordering::Relaxed);
        let prev = d.prev.load(Ordering::Relaxed);
        if prev == NIL {
            self.node.partial[zi].store(next, Ordering::Relaxed);
        } else {
            zone.desc(prev).next.store(next, Ordering::Relaxed);
        }
        if next != NIL {
            zone.desc(next).prev.store(prev, Ordering::Relaxed);
        }
    }

    // ----- free ----------------------------------------------------------------

    /// Normal-path free of a validated object. Fast path: nothing deferred,
    /// and room in the main sheaf of this CPU's level-0 slot.
    #[inline(always)]
    pub(crate) fn free(&self, pages: &PageAllocator, obj: usize) {
        if !(self.normal_fast_ok() && self.fast_push(pages, obj, Mode::Normal)) {
            self.free_slow(pages, pages.cpu(), obj);
        }
    }

    /// The normal free's slow path; a thread inside the allocator or in a
    /// nolock scope takes the nolock one.
    #[cold]
    #[inline(never)]
    fn free_slow(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        if crate::context::nested() {
            return self.free_nolock_slow(pages, cpu, obj);
        }
        self.drain_and_reopen(pages);
        self.free_normal(pages, cpu, obj);
    }

    #[inline]
    fn free_normal(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        if let Some((slot, g)) = self.lock_own(cpu, 0) {
            crate::interrupt_point!(SheafFree);
            if self.push_slot(slot, &g, obj, pages, Mode::Normal).is_ok() {
                return;
            }
        }
        match self.node.lock.lock_in(Mode::Normal, pages.platform()) {
            Some(node) => self.return_to_slab(obj, pages, &node, Mode::Normal),
            // A stalled fork on another thread holds it: the nolock free,
            // whose sheaves the nolock path uses again at once (see
            // `fork::fork_stalled`).
            #[cfg(feature = "std")]
            None if crate::fork::fork_stalled() => self.free_nolock_slow(pages, cpu, obj),
            // This thread holds the node lock itself (it interrupted
            // itself), or a fork on another thread does: park the object
            // on the deferred stack. (Not a nolock level's sheaf: a free in
            // progress there at the clone would leave that slot held, and
            // its sheaf out of reach, in the child; a push on the stack is
            // one CAS.)
            None => {
                self.defer(obj);
                pages.wake_maintainer();
            }
        }
    }

    /// Nolock free of a validated object. Fast path: room in the main sheaf
    /// of this CPU's level-0 slot. Otherwise [`free_nolock_slow`](Self::free_nolock_slow).
    #[inline(always)]
    pub(crate) fn free_nolock(&self, pages: &PageAllocator, obj: usize) {
        if !self.fast_push(pages, obj, Mode::NoLock) {
            self.free_nolock_slow(pages, pages.cpu(), obj);
        }
    }

    /// Nolock free, the whole search: a slot at any level, else the slab
    /// under a tried node lock, else the deferred stack. Never fails.
    #[cold]
    #[inline(never)]
    fn free_nolock_slow(&self, pages: &PageAllocator, cpu: usize, obj: usize) {
        for level in 0..LEVELS {
            if let Some((slot, g)) = self.lock_own(cpu, level) {
                crate::interrupt_point!(SheafFree);
                if self.push_slot(slot, &g, obj, pages, Mode::NoLock).is_ok() {
                    return;
                }
            }
        }
        if let Some(node) = self.node.lock.try_lock(pages.platform()) {
            self.return_to_slab(obj, pages, &node, Mode::NoLock);
            return;
        }
        self.defer(obj);
        pages.wake_maintainer();
    }

    fn defer(&self, obj: usize) {
        // (The caller wakes the maintainer after the push.)
        self.deferred_count.fetch_add(1, Ordering::Relaxed);
        self.free_deferred.fetch_add(1, Ordering::Relaxed);
        self.deferred.push(obj, |o, next| {
            // `o` is a validated object being freed, owned by this free.
            self.set_deferred_link(o, next);
            crate::interrupt_point!(ObjectDeferredPush);
        });
        self.normal_cpus.close_after_push();
    }

    /// Puts a chain this context took off the deferred stack (from `chain`,
    /// not `NIL`) back on it, then closes the normal fast path as `defer`
    /// does: a drain that ran while the chain was taken saw an empty stack
    /// and may have reopened it (see `FastGate`).
    fn put_back_deferred(&self, pages: &PageAllocator, chain: usize) {
        self.deferred.put_back(
            chain,
            |o| self.deferred_link(pages, o),
            |o, next| self.set_deferred_link(o, next),
        );
        self.normal_cpus.close_after_push();
    }

    /// A deferred object's link: its first word, keyed (`set_deferred_link`).
    /// `o` is on a deferred chain the caller took (`take_all`) and owns.
    /// The link must be the end of the stack or an object of this cache:
    /// anything else means `o` was written after its free (a use after
    /// free, say by the code a handler's free interrupted), which is
    /// reported rather than followed.
    fn deferred_link(&self, pages: &PageAllocator, o: usize) -> usize {
        // SAFETY: per the caller: an object of this cache (at least 8
        // bytes) on a chain it owns, whose link `set_deferred_link` wrote,
        // made visible by the take's Acquire.
        let next = unsafe { (o as *const usize).read_unaligned() } ^ self.key;
        if next != crate::sync::NIL && !self.is_object_of(pages, next) {
            corrupt_link(pages.platform(), o);
        }
        next
    }

    /// Whether `addr` is the start of an object slot of this cache (its
    /// page is owned by this cache). Any context, no lock.
    fn is_object_of(&self, pages: &PageAllocator, addr: usize) -> bool {
        pages.locate_indexed(addr).is_some_and(|(_, zone, idx)| {
            zone.desc(idx).owner.load(Ordering::Acquire) as usize == self.index + 1
        }) && self.is_object_start(addr)
    }

    /// Writes a deferred object's link into its first word, keyed. `o` is a
    /// free object of this cache that the caller owns (being freed, or on a
    /// deferred chain it took).
    fn set_deferred_link(&self, o: usize, next: usize) {
        // SAFETY: per the caller: an object of this cache (at least 8
        // bytes) that no other context uses.
        unsafe { (o as *mut usize).write_unaligned(next ^ self.key) };
    }

    /// Normal context, a slow path: drains the deferred stack if anything is
    /// on it, then reopens the fast path if it was closed (`normal_cpus`).
    #[inline]
    fn drain_and_reopen(&self, pages: &PageAllocator) {
        if !self.deferred.is_empty() || !self.suspects.is_empty() {
            self.drain_deferred(pages);
        }
        if self.rseq && self.normal_cpus.cpus() == 0 {
            self.normal_cpus.reopen(self.cpus, &self.deferred);
        }
    }

    /// In a forked child (its only thread, before anything else uses the
    /// cache): counts `deferred_count` again from the deferred stack. A
    /// nolock free of another thread of the parent may have been cloned
    /// between its count and its push (`defer`), or a nolock allocation
    /// between taking objects off the stack and uncounting them: the
    /// child's count would cover objects on no stack (lost to the child, as
    /// the thread that held them), which no drain ever takes off it.
    #[cfg(feature = "std")]
    pub(crate) fn recount_deferred_after_fork(&self, pages: &PageAllocator) {
        // Takers of the parent's other threads (or cloned before they
        // uncounted themselves) are not here.
        self.takers.store(0, Ordering::Relaxed);
        let mut n = 0;
        let mut o = self.deferred.head();
        while o != crate::sync::NIL {
            n += 1;
            // On the stack, with nothing else running: its link is written.
            o = self.deferred_link(pages, o);
        }
        self.deferred_count.store(n, Ordering::Relaxed);
    }

    /// Counts this context as a taker of the deferred stack or the
    /// suspects, until the guard is dropped; `None` (uncounted) while a
    /// fork on another thread is in progress: it may have looked for takers
    /// already, so the stacks are left alone. Counted first, then the forks
    /// read (both `SeqCst`, as `prepare` counts itself in `FORKING` before
    /// `lock_all` reads the takers): either that fork waits for this one,
    /// or this one sees the fork. Counts nest (a drain of the suspects
    /// counts itself, then each `is_free` it runs). Any context.
    fn deferred_taker(&self) -> Option<DeferredTaker<'_>> {
        self.takers.fetch_add(1, Ordering::SeqCst);
        let taker = DeferredTaker(&self.takers);
        #[cfg(feature = "std")]
        if crate::fork::fork_mark().forking_elsewhere() {
            return None;
        }
        Some(taker)
    }

    /// Contexts that hold a chain taken off the deferred stack or the
    /// suspects (see `takers`).
    #[cfg(feature = "std")]
    pub(crate) fn deferred_takers(&self) -> u32 {
        self.takers.load(Ordering::SeqCst)
    }

    /// Normal context: frees every deferred object through the normal path.
    pub(crate) fn drain_deferred(&self, pages: &PageAllocator) {
        if !self.suspects.is_empty() {
            self.drain_suspects(pages);
        }
        if self.deferred.is_empty() {
            return;
        }
        // No signal handler runs on this thread while the chain is counted
        // (those that come meanwhile run once it is drained): one that
        // forks would wait for this count, its own thread's.
        #[cfg(feature = "std")]
        let _quiet = crate::platform::SignalsBlocked::new();
        let Some(_taker) = self.deferred_taker() else {
            return;
        };
        let mut o = self.deferred.take_all();
        let cpu = pages.cpu();
        while o != crate::sync::NIL {
            // The chain is ours (take_all).
            let next = self.deferred_link(pages, o);
            crate::interrupt_point!(ObjectDeferredDrain);
            self.deferred_count.fetch_sub(1, Ordering::Relaxed);
            self.free_normal(pages, cpu, o);
            o = next;
        }
    }

    /// Pushes onto a held slot: main, else spare, else trade the full main for
    /// an empty barn sheaf, else flush main to the slabs. `Err` when the node
    /// lock was needed and busy (nolock).
    #[inline]
    fn push_slot(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        obj: usize,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<(), Fail> {
        if slot.main_last() == obj {
            pages.fatal_at("anyalloc: double free of object ", obj, "");
        }
        if slot.main_push(obj, g) {
            return Ok(());
        }
        if slot.spare().len() < self.cap {
            slot.swap(g);
            slot.main_push(obj, g);
            return Ok(());
        }
        self.flush(slot, g, pages, mode)?;
        slot.main_push(obj, g);
        Ok(())
    }

    /// Main and spare are full: give main to the barn for an empty sheaf, or
    /// return main's objects to their slabs.
    #[cold]
    fn flush(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        mode: Mode,
    ) -> Result<(), Fail> {
        let node = self
            .node
            .lock
            .lock_in(mode, pages.platform())
            .ok_or(Fail::Busy)?;
        crate::interrupt_point!(SheafFlush);
        if self.trade_main_for_empty(slot, g, &node) {
            // Flush runs when the spare is full too: trade it as well when
            // the barn has room, so the next flush comes two sheaves later.
            if slot.spare().len() >= self.cap {
                self.trade_spare_for_empty(slot, g, &node);
            }
            return Ok(());
        }
        self.flush_main(slot, g, pages, &node, mode);
        Ok(())
    }

    /// Node lock held, and `slot` held by the caller (`g`), its main sheaf
    /// empty: a full barn sheaf becomes main, the old main joining the
    /// barn's empty list. `false` when the barn has no full sheaf.
    fn trade_main_for_full(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        node: &ZoneGuard<'_>,
    ) -> bool {
        let Some(full) = self.take_full(node) else {
            return false;
        };
        let old = slot.detach_main(g);
        slot.set_main(full, g);
        self.give_empty(old, node);
        true
    }

    /// Node lock held, and `slot` held by the caller (`g`): an empty barn
    /// sheaf becomes main, the old main joining the barn's full list.
    /// `false` when the barn has no room (`BARN_BYTES`) or no empty sheaf.
    fn trade_main_for_empty(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        node: &ZoneGuard<'_>,
    ) -> bool {
        let Some(empty) = self.barn_empty_with_room(node) else {
            return false;
        };
        let old = slot.detach_main(g);
        slot.set_main(empty, g);
        self.give_full(old, node);
        true
    }

    /// Node lock held, and `slot` held by the caller (`_g`), its spare
    /// sheaf empty: trades the spare for a full barn sheaf, the old one
    /// joining the barn's empty list. `false` when the barn has no full
    /// sheaf.
    fn trade_spare_for_full(
        &self,
        slot: &SheafSlot,
        _g: &SlotGuard<'_>,
        node: &ZoneGuard<'_>,
    ) -> bool {
        let Some(full) = self.take_full(node) else {
            return false;
        };
        // (A load and a store: the slot lock is held, no locked swap needed.)
        let old = slot.spare.load(Ordering::Relaxed);
        slot.spare.store(full, Ordering::Release);
        self.give_empty(old, node);
        true
    }

    /// Node lock held, and `slot` held by the caller (`_g`): trades its
    /// spare sheaf for an empty barn sheaf, the old one joining the barn's
    /// full list. `false` when the barn has no room (`BARN_BYTES`) or no
    /// empty sheaf.
    fn trade_spare_for_empty(
        &self,
        slot: &SheafSlot,
        _g: &SlotGuard<'_>,
        node: &ZoneGuard<'_>,
    ) -> bool {
        let Some(empty) = self.barn_empty_with_room(node) else {
            return false;
        };
        let old = slot.spare.load(Ordering::Relaxed);
        slot.spare.store(empty, Ordering::Release);
        self.give_full(old, node);
        true
    }

    /// Takes the barn's first full sheaf off its list (node lock held),
    /// counting its objects out of the barn and one exchange.
    fn take_full(&self, node: &ZoneGuard<'_>) -> Option<*mut Sheaf> {
        let full = self.node.full.load(Ordering::Relaxed);
        // SAFETY: barn sheaves are cache sheaves (live as long as the
        // heap); the node lock gives us the barn lists.
        let f = unsafe { full.as_ref() }?;
        self.node
            .full
            .store(f.next.load(Ordering::Relaxed), Ordering::Relaxed);
        node.add(&self.node.barn_objects, f.len().wrapping_neg());
        node.add(&self.node.barn_ops, 1);
        Some(full)
    }

    /// Puts `sheaf`, now empty, on the barn's empty list (node lock held).
    fn give_empty(&self, sheaf: *mut Sheaf, _node: &ZoneGuard<'_>) {
        // SAFETY: a cache sheaf the caller took out of a slot or the barn.
        let e = unsafe { &*sheaf };
        e.next
            .store(self.node.empty.load(Ordering::Relaxed), Ordering::Relaxed);
        self.node.empty.store(sheaf, Ordering::Relaxed);
    }

    /// Puts `sheaf`, now full, on the barn's full list (node lock held),
    /// counting its objects into the barn and one exchange.
    fn give_full(&self, sheaf: *mut Sheaf, node: &ZoneGuard<'_>) {
        // SAFETY: as in `give_empty`.
        let f = unsafe { &*sheaf };
        node.add(&self.node.barn_objects, f.len());
        node.add(&self.node.barn_ops, 1);
        f.next
            .store(self.node.full.load(Ordering::Relaxed), Ordering::Relaxed);
        self.node.full.store(sheaf, Ordering::Relaxed);
    }

    /// An empty barn sheaf to take a sheaf's worth of objects, if the barn
    /// has room for them (`BARN_BYTES`) and an empty sheaf (node lock held).
    fn barn_empty_with_room(&self, node: &ZoneGuard<'_>) -> Option<*mut Sheaf> {
        let room =
            (self.node.barn_objects.load(Ordering::Relaxed) + self.cap) * self.size <= BARN_BYTES;
        if !room {
            return None;
        }
        let empty = self.take_empty(node);
        (!empty.is_null()).then_some(empty)
    }

    /// Returns every object of a held slot's main sheaf to its slab (node
    /// lock held).
    fn flush_main(
        &self,
        slot: &SheafSlot,
        g: &SlotGuard<'_>,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        while let Some(o) = slot.main_pop(g) {
            crate::interrupt_point!(SheafFlush);
            self.return_to_slab(o, pages, node, mode);
        }
    }

    fn flush_sheaf(&self, sheaf: &Sheaf, pages: &PageAllocator, node: &ZoneGuard<'_>, mode: Mode) {
        while let Some(o) = sheaf.pop() {
            crate::interrupt_point!(SheafFlush);
            self.return_to_slab(o, pages, node, mode);
        }
    }

    /// Returns an object to its slab (node lock held); releases the slab to
    /// the page allocator when it empties beyond the reserve.
    fn return_to_slab(&self, obj: usize, pages: &PageAllocator, node: &ZoneGuard<'_>, mode: Mode) {
        crate::interrupt_point!(PartialLocked);
        let (zi, zone, idx) = pages.locate_known(obj);
        let head = idx & !((1u32 << self.order) - 1);
        let d = zone.desc(head);
        let inuse = d.inuse.load(Ordering::Relaxed) as usize;
        if inuse == 0 {
            // More objects came back than went out: a double free that the
            // key did not catch (two racing frees of one object).
            pages.fatal_at(
                "anyalloc: double free of object ",
                obj,
                " (its slab has no object in use)",
            );
        }
        // SAFETY: `obj` is a free object of this slab (validated by the
        // caller), at least 8 bytes; its first word becomes the list link
        // (XOR the key, see "Double-free detection").
        unsafe {
            (obj as *mut usize).write_unaligned(d.freelist.load(Ordering::Relaxed) ^ self.key)
        };
        d.freelist.store(obj, Ordering::Relaxed);
        d.inuse.store((inuse - 1) as u16, Ordering::Relaxed);
        node.add(&self.out_of_slabs, 1usize.wrapping_neg());
        if inuse == self.objs {
            self.partial_push(zone, zi, head, node);
        }
        if inuse == 1 {
            node.add(&self.node.empty_slabs, 1);
            let empties = self.node.empty_slabs.load(Ordering::Relaxed);
            if empties > EMPTY_SLAB_RESERVE {
                self.release_slab(zone, zi, head, pages, node, mode);
            }
        }
    }

    fn release_slab(
        &self,
        zone: &Zone,
        zi: usize,
        head: u32,
        pages: &PageAllocator,
        node: &ZoneGuard<'_>,
        mode: Mode,
    ) {
        self.partial_remove(zone, zi, head, node);
        node.add(&self.node.empty_slabs, 1usize.wrapping_neg());
        node.add(&self.slabs, 1usize.wrapping_neg());
        for i in 0..(1u32 << self.order) {
            zone.desc(head + i).owner.store(0, Ordering::Relaxed);
        }
        // Off the partial list, no cache owns its pages, not yet freed.
        crate::interrupt_point!(ReleaseSlab);
        // SAFETY: the non-null slab address was allocated with this order and
        // every object is back (inuse == 0); nothing refers to it any more.
        unsafe {
            let p = NonNull::new_unchecked(zone.addr_of(head) as *mut u8);
            pages.free_pages_in(p, self.order, mode)
        }
    }

    /// Returns every object in the barn's full sheaves to its slab (node
    /// lock held); the sheaves become empty barn sheaves.
    fn flush_barn(&self, pages: &PageAllocator, node: &ZoneGuard<'_>) {
        let mut s = self
            .node
            .full
            .swap(core::ptr::null_mut(), Ordering::Relaxed);
        while !s.is_null() {
            // SAFETY: barn sheaves are cache sheaves; node lock held.
            let sh = unsafe { &*s };
            let next = sh.next.load(Ordering::Relaxed);
            node.add(&self.node.barn_objects, sh.len().wrapping_neg());
            self.flush_sheaf(sh, pages, node, Mode::Normal);
            self.give_empty(s, node);
            s = next;
        }
    }

    /// Maintenance (normal context):
    /// - a barn that has seen no exchange for `idle_passes` passes returns
    ///   its objects to their slabs (free objects cached there pin their
    ///   slabs' pages);
    /// - a slot whose sheaves have not changed for `idle_passes` passes is
    ///   flushed to the slabs and forgets its demand;
    /// - a slot that a nolock allocation found empty (`demand`) and that
    ///   holds less than half a sheaf gets its spare filled (from the barn or
    ///   the slabs), so a burst of nolock allocations finds objects ready.
    pub(crate) fn maintain_slots(&self, pages: &PageAllocator, idle_passes: u32) {
        self.drain_and_reopen(pages);
        let idle = self
            .node
            .barn_idle
            .observe(self.node.barn_ops.load(Ordering::Relaxed));
        if idle >= idle_passes && self.node.barn_objects.load(Ordering::Relaxed) > 0 {
            if let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) {
                self.flush_barn(pages, &node);
            }
        }
        for (i, slot) in self.slots().enumerate() {
            // Never taken (every sequence fails on a slot never prepared):
            // nothing to watch.
            if slot.cap.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let idle = slot.idle.observe(
                slot.spare.load(Ordering::Relaxed) as usize
                    ^ slot.top.load(Ordering::Relaxed).rotate_left(16)
                    ^ slot.main_last()
                    ^ slot.spare_if_any().map_or(0, Sheaf::len) << 56,
            );
            if idle >= idle_passes && slot.cached() > 0 {
                let Some((_, g)) = self.lock_remote(i) else {
                    continue;
                };
                let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) else {
                    return;
                };
                self.flush_main(slot, &g, pages, &node, Mode::Normal);
                self.flush_sheaf(slot.spare(), pages, &node, Mode::Normal);
                slot.demand.store(0, Ordering::Relaxed);
                continue;
            }
            if slot.demand.load(Ordering::Relaxed) == 0 || slot.cached() >= self.cap / 2 {
                continue;
            }
            let Some((_, g)) = self.lock_remote(i) else {
                continue;
            };
            if slot.spare().len() > 0 {
                continue;
            }
            // Fill the empty spare the way a refill fills an empty main.
            slot.swap(&g);
            let filled = self.refill(slot, &g, pages, Mode::Normal);
            if let Ok(o) = filled {
                // A refill from the slabs can fill the sheaf completely
                // besides the object it returns: then that one goes back.
                if !slot.main_push(o, &g) && !slot.spare().push(o, self.cap) {
                    match self.node.lock.lock_in(Mode::Normal, pages.platform()) {
                        Some(node) => self.return_to_slab(o, pages, &node, Mode::Normal),
                        None => self.defer(o),
                    }
                }
            }
            slot.swap(&g);
        }
    }

    /// Normal context: deferred objects, every slot that can be taken, and
    /// the barn back to the slabs; every empty slab back to the page
    /// allocator.
    pub(crate) fn drain(&self, pages: &PageAllocator) {
        self.drain_deferred(pages);
        for i in 0..self.nslots {
            // An empty slot (never used, or emptied) is left alone: taking
            // a level-0 slot under rseq costs a fence, an interrupt of its
            // CPU. (A hint: a slot filled concurrently is that context's.)
            if self.slot_at(i).cached() == 0 {
                self.slot_at(i).demand.store(0, Ordering::Relaxed);
                continue;
            }
            let Some((slot, g)) = self.lock_remote(i) else {
                continue;
            };
            slot.demand.store(0, Ordering::Relaxed);
            // `None`: this thread holds the node lock itself (it interrupted
            // itself): nothing more to drain now.
            let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) else {
                return;
            };
            self.flush_main(slot, &g, pages, &node, Mode::Normal);
            self.flush_sheaf(slot.spare(), pages, &node, Mode::Normal);
        }
        let Some(node) = self.node.lock.lock_in(Mode::Normal, pages.platform()) else {
            return;
        };
        self.flush_barn(pages, &node);
        // Release the reserve of empty slabs too.
        for zi in 0..pages.zone_count() {
            let zone = pages.zone_at(zi);
            let mut i = self.node.partial[zi].load(Ordering::Relaxed);
            while i != NIL {
                let next = zone.desc(i).next.load(Ordering::Relaxed);
                crate::interrupt_point!(CacheDrain);
                if zone.desc(i).inuse.load(Ordering::Relaxed) == 0 {
                    self.release_slab(zone, zi, i, pages, &node, Mode::Normal);
                }
                i = next;
            }
        }
    }

    /// Every CPU's level-0 slot lock (the normal path's, whose holders may
    /// wait for the node lock), for fork (`SlotLock::hold_all`).
    #[cfg(feature = "std")]
    pub(crate) fn level0_locks(&self) -> impl Iterator<Item = &SlotLock> + Clone {
        (0..self.cpus).map(move |c| &self.slot_at(slot_index(c, self.cpus, 0)).lock)
    }

    /// Fork support: takes the node lock without a guard.
    #[cfg(feature = "std")]
    pub(crate) fn lock_node_raw(&self, pages: &PageAllocator) {
        self.node.lock.lock_raw(pages.platform());
    }

    /// Releases the node lock taken by `lock_node_raw`.
    ///
    /// # Safety
    /// `lock_node_raw` was called and not yet undone.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_node_raw(&self, pages: &PageAllocator) {
        // SAFETY: per the caller.
        unsafe { self.node.lock.force_unlock(pages.platform()) };
    }

    /// This cache's counters.
    pub(crate) fn stats(&self) -> ClassStats {
        let cached_in_sheaves: usize = self.slots().map(|s| s.cached()).sum();
        let cached_in_barn = self.node.barn_objects.load(Ordering::Relaxed);
        let deferred = self.deferred_count.load(Ordering::Relaxed);
        let out = self.out_of_slabs.load(Ordering::Relaxed);
        ClassStats {
            size: self.size,
            objects_in_use: out.saturating_sub(cached_in_sheaves + cached_in_barn + deferred),
            slabs: self.slabs.load(Ordering::Relaxed),
            sheaf_capacity: self.cap,
            cached_in_sheaves,
            cached_in_barn,
            deferred,
        }
    }

    pub(crate) fn nolock_ok(&self) -> u64 {
        crate::page::slot_count_total(self.slots().map(|s| s.nolock_ok.load(Ordering::Relaxed)))
            + self.nolock_ok_slotless.load(Ordering::Relaxed)
    }

    // ----- validation ------------------------------------------------------------

    /// Both free paths, before the object goes anywhere: the O(1) key test
    /// (see "Double-free detection"), then the key is written. `false`:
    /// the object was parked as a suspect (`suspects`) and the free is
    /// done; the caller must not free it anywhere else.
    #[inline(always)]
    #[must_use]
    pub(crate) fn check_free(
        &self,
        pages: &PageAllocator,
        zone: &Zone,
        obj: usize,
        mode: Mode,
    ) -> bool {
        if self.key_suspect(pages, zone, obj) && !self.suspect_double_free(pages, obj, mode) {
            return false;
        }
        let kw = (obj + key_off(self.class)) as *mut usize;
        // SAFETY: `obj` is a validated object of this cache (at least 8
        // bytes, 16 when the key is at 8), owned by this free.
        unsafe { kw.write_unaligned(self.key) };
        true
    }

    /// The key test alone, which changes nothing: whether the key
    /// word of the validated object `obj` says it may be free (it holds the
    /// key, or, in the tiny classes, something that looks like a free-list
    /// link). Only the exact search (`is_free`) decides.
    fn key_suspect(&self, pages: &PageAllocator, zone: &Zone, obj: usize) -> bool {
        let off = key_off(self.class);
        // SAFETY: `obj` is a validated object of this cache (at least
        // `off + 8` bytes); reading its key word changes nothing.
        let w = unsafe { ((obj + off) as *const usize).read_unaligned() } ^ self.key;
        w == 0 || (off == 0 && self.tiny_suspect(pages, zone, w))
    }

    /// The key test's common case, for the fast paths: the key word does
    /// not match, and (tiny classes, whose key word is the free-list link)
    /// it does not look like a link either: not NIL, not an address in the
    /// first zone, with no other zone to ask about. Then it writes the key
    /// and says `true`; otherwise it changes nothing and the caller takes
    /// [`free_checked`](Self::free_checked), which decides exactly as
    /// [`check_free`](Self::check_free) does.
    ///
    /// `class` is this cache's class (the caller has it in hand: the key
    /// word's place follows from it, without a load).
    #[inline(always)]
    pub(crate) fn check_free_quick(&self, pages: &PageAllocator, obj: usize, class: usize) -> bool {
        crate::check!(class == self.class, "a quick key test of another class");
        let off = key_off(class);
        let kw = (obj + off) as *mut usize;
        // SAFETY: as in `check_free`: a validated object of this class, at
        // least `off + 8` bytes.
        let w = unsafe { kw.read_unaligned() } ^ self.key;
        if w == 0
            || (off == 0
                && (w == crate::sync::NIL || pages.in_first_zone(w) || pages.zone_count() > 1))
        {
            return false;
        }
        // SAFETY: as in `check_free`.
        unsafe { kw.write_unaligned(self.key) };
        true
    }

    /// A free whose quick key test could not decide: the full test
    /// ([`check_free`](Self::check_free)), then the free of `mode`.
    #[cold]
    #[inline(never)]
    pub(crate) fn free_checked(&self, pages: &PageAllocator, zone: &Zone, obj: usize, mode: Mode) {
        if self.check_free(pages, zone, obj, mode) {
            self.free_miss(pages, obj, mode);
        }
    }

    /// Tiny classes: whether a first word XOR the key looks like a free
    /// object's link (the end of the deferred stack, or a heap address:
    /// the object's own zone first, the others only if there are others).
    #[inline(never)]
    fn tiny_suspect(&self, pages: &PageAllocator, zone: &Zone, w: usize) -> bool {
        w == crate::sync::NIL || zone.contains(w) || (pages.zone_count() > 1 && pages.contains(w))
    }

    /// Writes the key into a free object's key word (as a free's key test
    /// leaves it).
    fn set_free_mark(&self, obj: usize) {
        // SAFETY: `obj` is a free object of this cache owned by the caller
        // (taken off the deferred stack and held in a locked slot, or just
        // carved under the node lock), at least `key_off + 8` bytes.
        unsafe { ((obj + key_off(self.class)) as *mut usize).write_unaligned(self.key) };
    }

    /// `clear_free_mark` for a caller that has the class in hand (the key
    /// word's place follows from it, without a load).
    #[inline(always)]
    pub(crate) fn clear_free_mark_of(&self, obj: usize, class: usize) {
        crate::check!(class == self.class, "a key word of another class");
        // SAFETY: `obj` is an object of this cache being handed out, at
        // least `key_off(class) + 8` bytes, owned by the allocating context.
        unsafe { ((obj + key_off(class)) as *mut usize).write_unaligned(0) };
    }

    /// Allocation: the object is live, its key word no longer says "free".
    #[inline(always)]
    pub(crate) fn clear_free_mark(&self, obj: usize) {
        self.clear_free_mark_of(obj, self.class);
    }

    /// The key matched: abort if the object really is free. A normal free
    /// of a thread inside the allocator or in a nolock scope searches as
    /// the nolock route it takes does (`routed`): it only tries the node
    /// lock, whose holder may be waiting for a lock its interrupted context
    /// holds.
    ///
    /// `true`: not free, the free goes on. When the search cannot decide
    /// (the node lock is busy), the object is parked on `suspects` instead
    /// and `false` returned: going on would put a double-freed object in a
    /// sheaf while it is still on its slab's free list or in the barn, and
    /// it would be handed out twice.
    #[cold]
    #[inline(never)]
    fn suspect_double_free(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> bool {
        match self.is_free(pages, obj, super::routed(mode)) {
            Some(true) => double_free(pages.platform(), obj),
            Some(false) => true,
            None => {
                self.park_suspect(obj);
                pages.wake_maintainer();
                false
            }
        }
    }

    /// Parks `obj` on `suspects` (linked as the deferred stack is). Any
    /// context.
    fn park_suspect(&self, obj: usize) {
        self.suspects
            .push(obj, |o, next| self.set_deferred_link(o, next));
    }

    /// Normal context: checks every parked suspect again, now able to wait
    /// for the node lock: one still free elsewhere, or handed out since
    /// (its key word cleared by the allocation), was freed twice;
    /// the others are freed (user data that equalled the key).
    ///
    /// A taker (`deferred_taker`), as the deferred stack's drain: the
    /// whole stack is taken, then each object checked and freed without a
    /// lock a fork holds; cloned halfway, the rest of the chain would be
    /// lost to the child, its objects counted in use there for good. While
    /// a fork is in progress the stack is left alone; signals are blocked
    /// while counted (a handler of this thread that forks would wait for
    /// its own thread's count).
    fn drain_suspects(&self, pages: &PageAllocator) {
        #[cfg(feature = "std")]
        let _quiet = crate::platform::SignalsBlocked::new();
        let Some(_taker) = self.deferred_taker() else {
            return;
        };
        let mut o = self.suspects.take_all();
        while o != crate::sync::NIL {
            let off = key_off(self.class);
            // SAFETY: a parked object of this cache (at least `off + 8`
            // bytes), ours; reading its key word changes nothing.
            let kw = unsafe { ((o + off) as *const usize).read_unaligned() };
            // Tiny classes: the key word is the link. A parked object is
            // never handed out from here; one handed out from where it was
            // still free (freed twice) lost its link to the allocation,
            // which cleared the word (or to its new owner's writes): it no
            // longer decodes to the end or an object of this cache. That
            // is the double free (the rest of the chain is lost with the
            // link, and the process ends here), not the use after free that
            // `deferred_link` would report.
            if off == 0
                && kw ^ self.key != crate::sync::NIL
                && !self.is_object_of(pages, kw ^ self.key)
            {
                double_free(pages.platform(), o);
            }
            // The chain is ours (take_all).
            let next = self.deferred_link(pages, o);
            crate::interrupt_point!(ObjectDeferredDrain);
            match self.is_free(pages, o, super::routed(Mode::Normal)) {
                Some(true) => double_free(pages.platform(), o),
                _ if off != 0 && kw != self.key => double_free(pages.platform(), o),
                Some(false) => {
                    if off == 0 {
                        self.set_free_mark(o);
                    }
                    self.free_normal(pages, pages.cpu(), o);
                }
                // Still undecided (this drain runs nested): back it goes.
                None => self.park_suspect(o),
            }
            o = next;
        }
    }

    /// The exact check: whether `obj` is free in this cache right now: in
    /// a sheaf of some slot, on the deferred stack, in a barn sheaf or on
    /// its slab's free list. The sheaves are read without their slot locks
    /// (a concurrent move may hide the object: then it is not reported);
    /// the barn and the free list need the node lock, which the nolock path
    /// only tries (busy: not reported).
    /// `None`: the node lock was busy (nolock), so the barn and the free
    /// list were not searched; or a fork on another thread is in progress,
    /// so the deferred stack and the suspects were not taken to be searched
    /// (see `deferred_taker`).
    fn is_free(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> Option<bool> {
        let in_first = |sh: &Sheaf, n: usize| {
            sh.objs[..n.min(SHEAF_CAP)]
                .iter()
                .any(|o| o.load(Ordering::Relaxed) == obj)
        };
        let in_sheaf = |sh: &Sheaf| in_first(sh, sh.len());
        if self.slots().any(|s| {
            s.main_view().is_some_and(|(sh, n)| in_first(sh, n))
                || s.spare_if_any().is_some_and(in_sheaf)
        }) {
            return Some(true);
        }
        // The deferred stack and the suspects are taken whole below: a
        // taker, as their drains (a fork waits for it; while one is in
        // progress nothing is taken, and the search is undecided), until
        // both are put back (dropped before the node lock, which a fork
        // takes once the takers are done).
        let taker = self.deferred_taker()?;
        // The deferred stack: take it (we own the chain), look, put it back
        // whole (behind whatever was pushed meanwhile).
        let first = self.deferred.take_all();
        // Re-entered here, a normal operation finds no deferred object.
        crate::interrupt_point!(DoubleFreeCheck);
        let found = self.chain_holds(pages, first, obj);
        if first != crate::sync::NIL {
            self.put_back_deferred(pages, first);
        }
        if found {
            return Some(true);
        }
        // The parked suspects, the same way (no gate to close: nothing is
        // handed out from there).
        let first = self.suspects.take_all();
        let found = self.chain_holds(pages, first, obj);
        if first != crate::sync::NIL {
            self.suspects.put_back(
                first,
                |o| self.deferred_link(pages, o),
                |o, next| self.set_deferred_link(o, next),
            );
        }
        if found {
            return Some(true);
        }
        drop(taker);
        // Busy (nolock): undecided.
        let _node = self.node.lock.lock_in(mode, pages.platform())?;
        let mut s = self.node.full.load(Ordering::Relaxed);
        while !s.is_null() {
            // SAFETY: barn sheaves are cache sheaves; the node lock is held.
            let sh = unsafe { &*s };
            if in_sheaf(sh) {
                return Some(true);
            }
            s = sh.next.load(Ordering::Relaxed);
        }
        let (_, zone, idx) = pages.locate_known(obj);
        let d = zone.desc(idx & !((1u32 << self.order) - 1));
        let mut f = d.freelist.load(Ordering::Relaxed);
        for _ in 0..self.objs {
            if f == 0 {
                break;
            }
            if f == obj {
                return Some(true);
            }
            // `f` is on this slab's free list (node lock held).
            f = self.slab_link(f, d.carved.load(Ordering::Relaxed), pages.platform());
        }
        Some(false)
    }

    /// Whether the chain from `first` (taken off the deferred stack or the
    /// suspects with `take_all`, so ours until put back) holds `obj`.
    fn chain_holds(&self, pages: &PageAllocator, first: usize, obj: usize) -> bool {
        // The whole chain: each link is checked as it is followed.
        let mut found = false;
        let mut o = first;
        while o != crate::sync::NIL {
            found |= o == obj;
            o = self.deferred_link(pages, o);
        }
        found
    }

    /// The link of `obj`, a free object on its slab's free list (node lock
    /// held), decoded: 0 (the end) or another object of the same slab,
    /// already carved (`carved` objects were). Anything else means the
    /// object was written after its free (a use after free overwrote its
    /// first word): abort instead of handing out memory at whatever address
    /// the write made of the link. A canonical value written there decodes
    /// to a non-canonical address (the key is non-canonical), so any such
    /// write is caught; only data that matches the key's pattern could
    /// decode to another object of the slab.
    fn slab_link(&self, obj: usize, carved: usize, platform: &dyn Platform) -> usize {
        // Its first word is the list link XOR the key (unaligned in 12-byte classes).
        // SAFETY: `obj` is a free object of this slab (pushed by
        // `return_to_slab`; node lock held), at least 8 bytes long.
        let next = unsafe { (obj as *const usize).read_unaligned() } ^ self.key;
        if next == crate::sync::NIL {
            // The end of the deferred stack or of the suspects, which no
            // slab list holds: a free pushed the object there (parking it
            // as a suspect, say, when its exact check could not take the
            // node lock) while it was free on this list. A double free.
            double_free(platform, obj);
        }
        if next != 0 {
            let mask = self.slab_mask as usize;
            let same_slab = next & !mask == obj & !mask;
            if !same_slab
                || !self.is_object_start(next)
                || self.index_in_slab(next & mask) >= carved
            {
                corrupt_link(platform, obj);
            }
        }
        next
    }

    /// Checks that `addr` (in a page this cache owns) is the start of an
    /// object slot; aborts otherwise, naming the call `what` ("free").
    #[inline(always)]
    pub(crate) fn validate(&self, pages: &PageAllocator, addr: usize, what: &str) {
        if !self.is_object_start(addr) {
            self.interior_pointer(pages, addr, what);
        }
    }

    /// Whether the validated object `obj` is free right now, for a check
    /// that must not change it (`usable_size`): the key test of a free,
    /// without writing the key, then (a suspect) the exact search, which
    /// only tries the node lock. Any context.
    pub(crate) fn is_freed(&self, pages: &PageAllocator, zone: &Zone, obj: usize) -> bool {
        self.key_suspect(pages, zone, obj) && self.is_free(pages, obj, Mode::NoLock) == Some(true)
    }

    /// Whether `addr` (in a page this cache owns) is the start of an object
    /// slot.
    #[inline(always)]
    pub(crate) fn is_object_start(&self, addr: usize) -> bool {
        let off = addr as u32 & self.slab_mask;
        is_start(off, self.start_magic, self.start_bound as u64)
    }

    #[cold]
    #[inline(never)]
    fn interior_pointer(&self, pages: &PageAllocator, addr: usize, what: &str) -> ! {
        pages.fatal(
            crate::platform::FatalMessage::new()
                .text("anyalloc: ")
                .text(what)
                .text(" of ")
                .hex(addr)
                .text(", which is not the start of an object (interior pointer into a ")
                .dec(self.size)
                .text("-byte object)"),
        )
    }

    /// `off / size` for an offset inside a slab, by multiplication (exact
    /// for multiples of `size`; see `recip`).
    #[inline(always)]
    fn index_in_slab(&self, off: usize) -> usize {
        index_by_recip(off as u32, self.recip)
    }

    /// Accounted caches: the owner word of object `n` of the slab at `slab`.
    fn owner_word(&self, slab: usize, n: usize) -> &AtomicUsize {
        crate::check!(
            self.accounted && n < self.objs,
            "an owner word out of range"
        );
        let bytes = PAGE_SIZE << self.order;
        let array = slab + bytes - bitmap_bytes(self.class) - self.objs * 8;
        // SAFETY: the owner array is the 8-aligned tail of a live slab of
        // this cache reserved by `objects_per_slab`; n < objs.
        unsafe { &*((array + n * 8) as *const AtomicUsize) }
    }

    /// Accounted caches: takes every group reference out of the owner array
    /// of the slab whose head page is `head` (the heap is going away: no
    /// other context uses it), calling `f` with each (those of live
    /// objects: a free object's word is 0).
    pub(crate) fn take_owners(&self, zone: &Zone, head: u32, mut f: impl FnMut(usize)) {
        let slab = zone.addr_of(head);
        for n in 0..self.objs {
            let g = self.owner_word(slab, n).swap(0, Ordering::AcqRel);
            if g != 0 {
                f(g);
            }
        }
    }

    /// Accounted caches: the owner word of the (validated) object `addr` in
    /// page `idx` of `zone`.
    pub(crate) fn owner_of(&self, zone: &Zone, idx: u32, addr: usize) -> &AtomicUsize {
        let head = idx & !((1u32 << self.order) - 1);
        let slab = zone.addr_of(head);
        self.owner_word(slab, self.index_in_slab(addr - slab))
    }

    /// The per-object state bitmap of the slab starting at `slab` and the bit
    /// of an object offset: `(words, bits per word)`.
    #[cfg(feature = "debug-checks")]
    fn bitmap(&self, slab: usize) -> (&[core::sync::atomic::AtomicU64], usize) {
        let bytes = PAGE_SIZE << self.order;
        let words = self.objs.div_ceil(64);
        let start = slab + bytes - (bytes / self.size).div_ceil(64) * 8;
        // SAFETY: the bitmap area is the slab's 8-aligned tail, reserved by
        // `objects_per_slab`, part of a live slab of this cache.
        (
            unsafe {
                core::slice::from_raw_parts(start as *const core::sync::atomic::AtomicU64, words)
            },
            64,
        )
    }

    /// debug-checks: flips an object's state bit; aborts on a double free.
    #[cfg(feature = "debug-checks")]
    pub(crate) fn mark(
        &self,
        pages: &PageAllocator,
        zone: &Zone,
        idx: u32,
        addr: usize,
        allocated: bool,
    ) {
        let head = idx & !((1u32 << self.order) - 1);
        let slab = zone.addr_of(head);
        let n = self.index_in_slab(addr - slab);
        let (words, bits) = self.bitmap(slab);
        let bit = 1u64 << (n % bits);
        let w = &words[n / bits];
        if allocated {
            let old = w.fetch_or(bit, Ordering::AcqRel);
            crate::check!(old & bit == 0, "an object was handed out twice");
        } else {
            let old = w.fetch_and(!bit, Ordering::AcqRel);
            if old & bit == 0 {
                pages.fatal_at("anyalloc: double free of object ", addr, "");
            }
        }
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
                for off in 0..bytes {
                    let start = off % size == 0 && ((off / size) as usize) < objs;
                    assert_eq!(
                        is_start(off, magic, bound),
                        start,
                        "class {size}, accounted {accounted}, offset {off}"
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
}
