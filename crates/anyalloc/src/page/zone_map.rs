//! The zone map: which zone holds an address, in O(1), for the zones that
//! growth added.
//!
//! The first zone has its own lookup window (`FirstZone`), checked inline
//! by every fast path. The zones growth adds (`PageAllocator::grow`, each
//! twice the last) are entered here, so a pointer into any of them is
//! found with a fixed number of loads, never a walk over the zones:
//!
//! ```text
//! addr:   | 63..48: 0 | 47..36: root index | 35..22: leaf index | 21..0 |
//! root:   [AtomicPtr<Leaf>; 4096]     one per 64 GiB of address space
//! leaf:   [Cell; 16384]               one per 4 MiB granule
//! cell:   { zone, descs }             the zone; its descriptors, biased
//! ```
//!
//! A cell's `descs` is the zone's `desc_bias`, set only when the whole
//! granule is the zone's pages: then the descriptor of the page holding
//! `addr` is `descs + (addr >> PAGE_SHIFT)`, one addition after the cell's
//! load (no bounds check, no load from the zone). A granule that holds the
//! zone's pages only in part has a null `descs`, and its lookups check the
//! zone's bounds.
//!
//! # Invariants
//!
//! 1. **A granule holds pages of one zone at most.** Every grown zone is a
//!    reservation of its own, aligned to [`MAX_BLOCK`] (the granule), with
//!    its pages first and its metadata after them: a granule that holds a
//!    zone's last pages holds only that zone's metadata besides. So a
//!    granule's entry names the one zone whose pages it may hold. A
//!    granule wholly inside the zone's pages gets the biased descriptors
//!    too; any other (the rest of it is metadata, or beyond the
//!    reservation) is looked up with the zone's bounds
//!    (`Zone::contains`).
//! 2. **Entries are written once, before the zone is published**, and never
//!    change (zones are never removed while the allocator lives): any
//!    pointer into a zone was handed out after its publication, so a
//!    lookup of it finds the entry (Release stores here, Acquire loads in
//!    `get`). A lookup of an address no zone holds finds null, or a zone
//!    whose bounds exclude it. A cell's zone is stored before its biased
//!    descriptors, so a lookup that finds the descriptors finds the zone
//!    too (even a lookup of a stray pointer while the zone is entered).
//! 3. **Only growth writes** (normal context, under the growth lock, or in
//!    `PageAllocator::new` before anything else can see the allocator), so
//!    writers never race. Leaves are made before any entry of a zone is
//!    written: a zone whose leaf cannot be made leaves no entry behind.
//! 4. **Lookups never wait and never allocate**: a few loads, in any
//!    context. Addresses at or above 2^48 (which no reservation of ours
//!    reaches: `mmap` without a hint stays below 2^47) have no entry; a
//!    zone there could not be entered, and its creation fails instead.
//!
//! The root (32 KiB) and the leaves (256 KiB each, one per 64 GiB of
//! address space that holds a grown zone) are OS reservations, touched
//! only where entries are written, and released when the allocator is
//! dropped. Until its first grown zone, a map's root is `EMPTY_ROOT`, one
//! all-null root shared by every map and never written, so a lookup needs
//! no null test of the root.

use core::sync::atomic::{AtomicPtr, Ordering};

use super::zone::{Zone, MAX_BLOCK};
use super::PageDesc;
use crate::PAGE_SHIFT;

/// Address bits a map covers.
const ADDR_BITS: u32 = 48;
/// `log2(MAX_BLOCK)`: a granule is one largest block.
const GRANULE_SHIFT: u32 = MAX_BLOCK.trailing_zeros();
/// Granules per leaf: `2^LEAF_BITS` (64 GiB of address space).
const LEAF_BITS: u32 = 14;
const LEAF_LEN: usize = 1 << LEAF_BITS;
/// Leaves per root.
const ROOT_LEN: usize = 1 << (ADDR_BITS - GRANULE_SHIFT - LEAF_BITS);
/// The first address bit of a root index.
const ROOT_SHIFT: u32 = GRANULE_SHIFT + LEAF_BITS;

const _: () = assert!(MAX_BLOCK.is_power_of_two() && GRANULE_SHIFT == 22 && ROOT_LEN == 4096);

/// One granule's entry (all null: no zone).
struct Cell {
    /// The zone whose pages the granule holds.
    zone: AtomicPtr<Zone>,
    /// The zone's `desc_bias` when the granule is all its pages, else null.
    descs: AtomicPtr<PageDesc>,
}

struct Leaf {
    cells: [Cell; LEAF_LEN],
}

struct Root {
    leaves: [AtomicPtr<Leaf>; ROOT_LEN],
}

/// Why a zone could not be entered (growth reports either as a refused
/// reservation, and tries a smaller zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapError {
    /// The OS refused the root's or a leaf's reservation.
    NoMemory,
    /// The zone lies at or above 2^48.
    OutOfRange,
}

/// The root of every map that has no grown zone yet: all its leaves null,
/// never written (`root_or_make` replaces it before any entry is made). A
/// lookup needs no null test of the root. Page-aligned, whole pages of its
/// own, like a reserved root: were `release` ever to hand it to the OS,
/// the next lookup would fault at once rather than go on unnoticed.
static EMPTY_ROOT: PageAligned = PageAligned(Root {
    leaves: [const { AtomicPtr::new(core::ptr::null_mut()) }; ROOT_LEN],
});

#[repr(C, align(4096))]
struct PageAligned(Root);

const _: () = assert!(core::mem::size_of::<Root>().is_multiple_of(crate::PAGE_SIZE));

/// [`EMPTY_ROOT`]'s address, as a map's root holds it.
fn empty_root() -> *mut Root {
    (&raw const EMPTY_ROOT.0).cast_mut()
}

/// Which grown zone holds an address (see the module docs).
pub(crate) struct ZoneMap {
    /// [`EMPTY_ROOT`] until the first grown zone is entered, then a root
    /// of this map's own.
    root: AtomicPtr<Root>,
}

impl ZoneMap {
    pub(crate) fn new() -> Self {
        ZoneMap {
            root: AtomicPtr::new(empty_root()),
        }
    }

    /// The zone whose pages hold `addr`, and the descriptor of its page,
    /// if an entered zone does. Any context: loads only.
    #[inline]
    pub(crate) fn get(&self, addr: usize) -> Option<(&Zone, &PageDesc)> {
        let root = self.root.load(Ordering::Acquire);
        let hi = addr >> ROOT_SHIFT;
        if hi >= ROOT_LEN {
            return None;
        }
        // The root is `EMPTY_ROOT` or was made by `insert`, and is released
        // only by `release` (which needs `&mut self`).
        // SAFETY: so it is a live `Root`, all null, or published with Release
        // after it was zeroed: all its entries are null or leaves.
        let leaf = unsafe { &*root }.leaves[hi].load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        // SAFETY: as for the root: a published leaf lives as long as the map.
        let cell = &unsafe { &*leaf }.cells[(addr >> GRANULE_SHIFT) & (LEAF_LEN - 1)];
        // The biased descriptors first: the common case, a granule of pages
        // alone, needs neither the zone's null test nor its bounds.
        let descs = cell.descs.load(Ordering::Acquire);
        if !descs.is_null() {
            let z = cell.zone.load(Ordering::Relaxed);
            let d = descs.wrapping_add(addr >> PAGE_SHIFT);
            // Why `z` and `d` are live and non-null:
            // 1. `insert` stores a cell's zone before its `descs` (Release),
            //    so after this Acquire load of a non-null `descs` the zone
            //    is non-null too: a zone initialised before it was entered,
            //    which lives as long as the allocator (invariant 2).
            // 2. A non-null `descs` is that zone's `desc_bias`, entered only
            //    for a granule wholly inside its pages, and `addr` is in the
            //    granule: so the sum is the descriptor of `addr`'s page, in
            //    the zone's array, which lives as long as the zone.
            // SAFETY: 1 and 2 above.
            return unsafe {
                core::hint::assert_unchecked(!z.is_null() && !d.is_null());
                Some((&*z, &*d))
            };
        }
        let z = cell.zone.load(Ordering::Acquire);
        if z.is_null() {
            return None;
        }
        // SAFETY: an entry names a zone that was initialised before it was
        // entered (Release) and lives as long as the allocator (invariant 2).
        let z = unsafe { &*z };
        z.contains(addr).then(|| (z, z.desc(z.index_of(addr))))
    }

    /// Enters `zone`, whose pages are `[start, end)`, in every granule they
    /// touch. Normal context, one writer at a time (invariant 3), before
    /// the zone is published. On an error nothing refers to the zone.
    pub(crate) fn insert(
        &self,
        zone: *const Zone,
        start: usize,
        end: usize,
    ) -> Result<(), MapError> {
        crate::check!(start < end, "an empty zone entered in the zone map");
        let last = end - 1;
        if last >> ROOT_SHIFT >= ROOT_LEN {
            return Err(MapError::OutOfRange);
        }
        let root = self.root_or_make()?;
        // Every leaf first (invariant 3): a failure writes no entry.
        for hi in (start >> ROOT_SHIFT)..=(last >> ROOT_SHIFT) {
            if root.leaves[hi].load(Ordering::Relaxed).is_null() {
                let leaf = reserve::<Leaf>().ok_or(MapError::NoMemory)?;
                root.leaves[hi].store(leaf, Ordering::Release);
            }
        }
        // SAFETY: the caller's zone, initialised (its descriptors too).
        let bias = unsafe { &*zone }.desc_bias();
        for g in (start >> GRANULE_SHIFT)..=(last >> GRANULE_SHIFT) {
            let leaf = root.leaves[g >> LEAF_BITS].load(Ordering::Relaxed);
            // SAFETY: made above (or before) and never released while the
            // map lives.
            let cell = &unsafe { &*leaf }.cells[g & (LEAF_LEN - 1)];
            crate::check!(
                cell.zone.load(Ordering::Relaxed).is_null(),
                "a granule of two zones"
            );
            // The zone first: a lookup that finds `descs` takes the zone
            // without testing it (`get`).
            cell.zone.store(zone.cast_mut(), Ordering::Release);
            // The biased descriptors only for a granule of pages alone.
            let whole = g << GRANULE_SHIFT >= start && (g + 1) << GRANULE_SHIFT <= end;
            if whole {
                cell.descs.store(bias.cast_mut(), Ordering::Release);
            }
        }
        Ok(())
    }

    fn root_or_make(&self) -> Result<&Root, MapError> {
        let mut root = self.root.load(Ordering::Relaxed);
        if root == empty_root() {
            root = reserve::<Root>().ok_or(MapError::NoMemory)?;
            self.root.store(root, Ordering::Release);
        }
        // SAFETY: a live root (see `get`).
        Ok(unsafe { &*root })
    }

    /// Releases the root and the leaves. The allocator is being dropped:
    /// nothing looks anything up any more.
    pub(crate) fn release(&mut self) {
        let root = core::mem::replace(self.root.get_mut(), empty_root());
        if root == empty_root() {
            return;
        }
        // SAFETY: `&mut self`: no lookup runs; the root and its leaves are
        // `reserve`'s reservations of their types' sizes, released once.
        unsafe {
            for leaf in &(*root).leaves {
                let leaf = leaf.load(Ordering::Relaxed);
                if !leaf.is_null() {
                    crate::platform::os_release(leaf.cast(), core::mem::size_of::<Leaf>());
                }
            }
            crate::platform::os_release(root.cast(), core::mem::size_of::<Root>());
        }
    }
}

/// A zeroed `T` (an array of null pointers) reserved from the OS, or
/// `None` when refused.
fn reserve<T>() -> Option<*mut T> {
    // Zeroed memory is a valid array of null atomic pointers.
    crate::platform::os_reserve(core::mem::size_of::<T>(), crate::PAGE_SIZE).map(|p| p.cast())
}
