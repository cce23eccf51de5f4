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
//!
//! # The hot leaf
//!
//! A lookup through the root is a chain of three dependent loads before
//! the descriptor (the root, its leaf, the cell), where the first zone's
//! window needs one (its descriptors). A page free waits for that chain
//! before its claim's locked instruction, so each link shows: an order-0
//! page pair in a grown zone took 14.1 ns on an Intel Xeon, against 8.3 in
//! the first zone. The map's first leaf is therefore also kept beside the
//! root as the *hot leaf*, with its root index: an address in that 64 GiB
//! of address space (where `mmap` puts the zones that follow the first,
//! unless the address space is crowded) finds its cell from two loads of
//! the map's own words, which do not depend on each other, and the chain
//! is one link shorter. Any other address takes the root as before.
//!
//! The hot leaf is set once, by the growth that makes the map's first leaf
//! (invariant 3): its pointer first, then its index (Release), so a lookup
//! that reads the index (Acquire) finds the leaf. Until then the index is
//! [`NO_HOT`], which no address's root index equals.

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

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
    /// The root index of the hot leaf, or [`NO_HOT`] (see the module
    /// docs): written once, after `hot_leaf`.
    hot_index: AtomicUsize,
    /// The hot leaf (null while `hot_index` is `NO_HOT`): also in the
    /// root, at `hot_index`.
    hot_leaf: AtomicPtr<Leaf>,
}

/// `ZoneMap::hot_index` before the map has a leaf: above every root index
/// an address can have (`addr >> ROOT_SHIFT` is below 2^28).
const NO_HOT: usize = usize::MAX;

impl ZoneMap {
    pub(crate) fn new() -> Self {
        ZoneMap {
            root: AtomicPtr::new(empty_root()),
            hot_index: AtomicUsize::new(NO_HOT),
            hot_leaf: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The leaf for root index `hi` (`addr >> ROOT_SHIFT`), if the map has
    /// one: the hot leaf without a load from the root, else the root's.
    #[inline(always)]
    fn leaf(&self, hi: usize) -> Option<&Leaf> {
        let leaf = if hi == self.hot_index.load(Ordering::Acquire) {
            // Stored before the index (Release) that was just read
            // (Acquire): the hot leaf, non-null.
            let leaf = self.hot_leaf.load(Ordering::Relaxed);
            // SAFETY: as the comment above says.
            unsafe { core::hint::assert_unchecked(!leaf.is_null()) };
            leaf
        } else {
            if hi >= ROOT_LEN {
                return None;
            }
            let root = self.root.load(Ordering::Acquire);
            // The root is `EMPTY_ROOT` or was made by `insert`, and is
            // released only by `release` (which needs `&mut self`).
            // SAFETY: so it is a live `Root`, all null, or published with
            // Release after it was zeroed: all its entries are null or
            // leaves.
            let leaf = unsafe { &*root }.leaves[hi].load(Ordering::Acquire);
            if leaf.is_null() {
                return None;
            }
            leaf
        };
        // SAFETY: a published leaf (the root's, or the hot one, which is
        // one of the root's) lives as long as the map.
        Some(unsafe { &*leaf })
    }

    /// The zone whose pages hold `addr`, and the descriptor of its page,
    /// if an entered zone does. Any context: loads only.
    #[inline]
    pub(crate) fn get(&self, addr: usize) -> Option<(&Zone, &PageDesc)> {
        let leaf = self.leaf(addr >> ROOT_SHIFT)?;
        let cell = &leaf.cells[(addr >> GRANULE_SHIFT) & (LEAF_LEN - 1)];
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
                // The map's first leaf is the hot one: the leaf, then its
                // index (see the module docs).
                if self.hot_index.load(Ordering::Relaxed) == NO_HOT {
                    self.hot_leaf.store(leaf, Ordering::Relaxed);
                    self.hot_index.store(hi, Ordering::Release);
                }
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
        *self.hot_index.get_mut() = NO_HOT;
        *self.hot_leaf.get_mut() = core::ptr::null_mut();
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

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::{ZoneMap, NO_HOT, ROOT_SHIFT};
    use crate::{Config, PageAllocator, PAGE_SIZE};
    use core::sync::atomic::Ordering::Relaxed;
    use std::vec::Vec;

    /// What `get` finds for `addr`, as addresses (comparable).
    fn found(map: &ZoneMap, addr: usize) -> Option<(usize, usize)> {
        map.get(addr)
            .map(|(z, d)| (z as *const _ as usize, d as *const _ as usize))
    }

    /// The map's first leaf becomes the hot one (its root index and the
    /// root's own pointer), and a lookup through it finds, for every page
    /// of a zone and for the addresses around it, exactly what a lookup
    /// through the root finds: the zone, and the page's own descriptor.
    /// (A zone of another allocator, entered in a map of the test's own:
    /// the map needs only the zone's pages and descriptors.)
    #[test]
    fn the_hot_leaf_finds_what_the_root_finds() {
        let pa = PageAllocator::new(Config::default().memory(10 << 20).grow(false)).unwrap();
        let z = pa.zone_at(0);
        let mut map = ZoneMap::new();
        assert_eq!(map.hot_index.load(Relaxed), NO_HOT);
        map.insert(z, z.start, z.end).unwrap();
        let hi = z.start >> ROOT_SHIFT;
        assert_eq!(map.hot_index.load(Relaxed), hi, "the first leaf is hot");
        let root = map.root.load(Relaxed);
        // SAFETY: the map's own root, made by the insert above.
        let in_root = unsafe { &*root }.leaves[hi].load(Relaxed);
        assert_eq!(map.hot_leaf.load(Relaxed), in_root);

        let probes: Vec<usize> = (z.start..z.end)
            .step_by(PAGE_SIZE)
            .flat_map(|a| [a, a + PAGE_SIZE - 1])
            .chain([z.start - 1, z.end, z.end + (4 << 20), 0, usize::MAX])
            .chain([(hi + 1) << ROOT_SHIFT, hi.wrapping_sub(1) << ROOT_SHIFT])
            .collect();
        let hot: Vec<_> = probes.iter().map(|&a| found(&map, a)).collect();
        // The same lookups through the root alone.
        map.hot_index.store(NO_HOT, Relaxed);
        let via_root: Vec<_> = probes.iter().map(|&a| found(&map, a)).collect();
        assert_eq!(hot, via_root);
        for (&a, f) in probes.iter().zip(&hot) {
            let expect = z.contains(a).then(|| {
                (
                    z as *const _ as usize,
                    z.desc(z.index_of(a)) as *const _ as usize,
                )
            });
            assert_eq!(*f, expect, "{a:#x}");
        }
        map.hot_index.store(hi, Relaxed);
        map.release();
        assert_eq!(map.hot_index.load(Relaxed), NO_HOT);
        assert!(map.hot_leaf.load(Relaxed).is_null());
        assert!(found(&map, z.start).is_none());
    }
}
