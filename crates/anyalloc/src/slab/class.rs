//! Size classes: 8 bytes to 8 KiB, four per doubling above 64 bytes.
//!
//! Spacing is 4 bytes up to 32, 8 up to 64, then four classes per power of
//! two (jemalloc-like but finer at the small end), so a request above 16
//! bytes wastes at most 20% of its class. A class's *natural alignment* is
//! the largest power of two dividing its size (capped at one page): objects
//! sit at multiples of the size from a page-aligned slab start. A request
//! whose alignment exceeds that moves up to the first class that provides it.

use crate::PAGE_SIZE;

/// Object sizes of the classes, ascending.
pub(crate) const SIZES: [u32; 39] = [
    8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448,
    512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168,
    8192,
];
/// Number of classes.
pub(crate) const CLASSES: usize = SIZES.len();
/// The largest object served by a class.
pub(crate) const MAX_SMALL: usize = 8192;

/// Entries of the lookup tables: every size from 0 to 8 KiB.
const STEPS: usize = MAX_SMALL + 1;

/// How a page descriptor names the cache that owns the page: its *owner
/// tag*, the cache's owner id (index + 1) shifted left by `TAG_SHIFT`.
/// The tag is the very index the fast-path sequences address a cache and
/// its level-0 slots with (`HeapCore::cache_at`: `(index + 1) *
/// SLOT_BYTES`), so a fast path that has a tag in hand (from the size
/// tables, or from the page's descriptor) needs no shift to use it, and a
/// sized free compares its table entry with the descriptor's tag as both
/// are loaded.
pub(crate) const TAG_SHIFT: u32 = 6;

/// The owner tag of the cache whose index is `index` (see [`TAG_SHIFT`]).
#[inline(always)]
pub(crate) const fn tag_of(index: usize) -> usize {
    (index + 1) << TAG_SHIFT
}

/// The cache index an owner tag names (see [`TAG_SHIFT`]).
#[inline(always)]
pub(crate) const fn index_of_tag(tag: usize) -> usize {
    (tag >> TAG_SHIFT) - 1
}

/// The owner tag of the plain cache of each size up to 8 KiB
/// (`ClassTables::plain`).
const fn lookup_plain() -> [u16; STEPS] {
    let mut t = [0u16; STEPS];
    let mut i = 0;
    let mut c = 0;
    while i < STEPS {
        let size = if i == 0 { 1 } else { i };
        while (SIZES[c] as usize) < size {
            c += 1;
        }
        t[i] = tag_of(c) as u16;
        i += 1;
    }
    t
}

/// `lookup_plain` for requests aligned to `align`: each entry moves up to the
/// first class whose natural alignment provides it.
const fn lookup_aligned(align: usize) -> [u16; STEPS] {
    let plain = lookup_plain();
    let mut t = [0u16; STEPS];
    let mut i = 0;
    while i < STEPS {
        let mut c = index_of_tag(plain[i] as usize);
        while natural_align(c) < align {
            c += 1;
        }
        t[i] = tag_of(c) as u16;
        i += 1;
    }
    t
}

/// The natural alignment of class `c`.
#[inline]
pub(crate) const fn natural_align(c: usize) -> usize {
    let a = 1usize << SIZES[c].trailing_zeros();
    if a > PAGE_SIZE {
        PAGE_SIZE
    } else {
        a
    }
}

/// The size-to-class tables of the fast paths: for every size from 0 to
/// 8 KiB, the owner tag of the plain cache that serves it ([`tag_of`] its
/// class), by alignment, and the sized free's hint.
///
/// Indexed by the size itself, so that one load serves every small size
/// with no index computation. Tags, because that is what page descriptors
/// hold and what the sequences address a cache with: the sized free
/// compares its entry with the descriptor's tag as loaded, and both fast
/// paths hand the entry to the sequences as it is. (With class + 1 in a
/// byte, as until this layout, each of them shifted it first: one
/// instruction of a free and one of an allocation, for twice the tables'
/// bytes now, 64 KiB per heap.)
///
/// Every heap keeps a copy in its metadata area at a fixed offset from its
/// core (`HeapCore::tables`), so the fast paths address an entry from the
/// core pointer they hold anyway: no table address to form or load (a
/// `static` in this crate is reached through the GOT from an inlining
/// crate; a `const` would be copied into every code unit that indexes it).
/// [`TABLES`] is the original, which the build copies and the slow paths
/// and tests read.
#[repr(C)]
pub(crate) struct ClassTables {
    /// Alignment up to 4.
    plain: [u16; STEPS],
    /// 8-byte alignment (the common Rust case): skips the 4-aligned classes
    /// 12, 20 and 28.
    align8: [u16; STEPS],
    /// 16-byte alignment (C's `malloc`, `max_align_t`, `u128`): skips the
    /// classes whose size is not a multiple of 16.
    align16: [u16; STEPS],
    /// `plain` with [`TINY_HINT`] set in the tiny classes' entries
    /// ([`tag_hint`](Self::tag_hint)).
    hint: [u16; STEPS],
}

/// The tables, as every heap's copy starts.
pub(crate) static TABLES: ClassTables = ClassTables {
    plain: lookup_plain(),
    align8: lookup_aligned(8),
    align16: lookup_aligned(16),
    hint: hint_table(),
};

impl ClassTables {
    /// The owner tag of the plain cache serving a request ([`tag_of`] its
    /// class): the common cases of [`class_for`], one table load each
    /// (alignment up to 16, any small size). `None` means "ask
    /// `class_for`", not "large".
    #[inline(always)]
    pub(crate) fn tag_fast(&self, size: usize, align: usize) -> Option<usize> {
        if size <= MAX_SMALL {
            // 8 first: the common Rust case takes one test.
            if align == 8 {
                return Some(self.align8[size] as usize);
            }
            if align <= 4 {
                return Some(self.plain[size] as usize);
            }
            if align == 16 {
                return Some(self.align16[size] as usize);
            }
        }
        None
    }

    /// The owner tag of the plain cache a block of `size` bytes most likely
    /// belongs to, for a free told the layout: [`tag_fast`](Self::tag_fast)
    /// without the alignment, with [`TINY_HINT`] set for the tiny classes
    /// (8 and 12 bytes, whose key word sits elsewhere). A hint, not an
    /// answer: the caller checks it against the page's owner tag, so a keyed
    /// class's free matches with one comparison and a tiny class's never
    /// does (no owner tag has that bit); a mismatch takes the tiny or the
    /// layout-blind path. The class differs from the allocation's only for
    /// requests whose size is not a multiple of an alignment above 4 (a
    /// Rust type's size always is), or whose alignment is above 8.
    #[inline(always)]
    pub(crate) fn tag_hint(&self, size: usize) -> Option<usize> {
        if size <= MAX_SMALL {
            Some(self.hint[size] as usize)
        } else {
            None
        }
    }
}

/// [`ClassTables::tag_fast`] of [`TABLES`], as a class.
#[inline(always)]
pub(crate) fn class_fast(size: usize, align: usize) -> Option<usize> {
    TABLES.tag_fast(size, align).map(index_of_tag)
}

/// Set in a [`tag_hint`](ClassTables::tag_hint) of a tiny class.
/// Above every owner tag a page descriptor can hold but `LARGE_OWNER`
/// (plain and accounted caches: `tag_of(0)` to `tag_of(2 * CLASSES - 1)`),
/// whose bits include it, so `owner | TINY_HINT == hint` says "this tiny
/// class" exactly.
pub(crate) const TINY_HINT: usize = 0x4000;
const _: () = assert!(tag_of(2 * CLASSES - 1) < TINY_HINT && TINY_HINT < u16::MAX as usize);

/// `ClassTables::hint`'s contents.
const fn hint_table() -> [u16; STEPS] {
    let mut t = lookup_plain();
    let mut i = 0;
    while i < STEPS {
        if (t[i] as usize) < crate::slab::cache::FIRST_KEYED_TAG {
            t[i] |= TINY_HINT as u16;
        }
        // Either a keyed class's tag or a tiny one's with the bit: the
        // sized free relies on it (an entry equal to an owner tag is keyed).
        let k = t[i] as usize;
        assert!(k & TINY_HINT != 0 || (k >= crate::slab::cache::FIRST_KEYED_TAG && k < TINY_HINT));
        i += 1;
    }
    t
}

/// [`tag_hint`] as a class (the tiny bit taken off), for the tests.
///
/// [`tag_hint`]: ClassTables::tag_hint
#[cfg(test)]
fn class_hint(size: usize) -> Option<usize> {
    TABLES.tag_hint(size).map(|k| index_of_tag(k & !TINY_HINT))
}

/// A layout that class `c` serves and maps back to `c`: its size, and its
/// natural alignment up to 16 (the most `class_fast` serves), so a slow path
/// handed only the class of a `class_fast` request keeps that request's
/// alignment when it falls back to larger classes. For slow paths that
/// must not keep the caller's layout alive across a fast path.
#[inline]
pub(crate) fn layout_of(c: usize) -> core::alloc::Layout {
    let align = if natural_align(c) < 16 {
        natural_align(c)
    } else {
        16
    };
    // SAFETY: class sizes are non-zero and far below isize::MAX; the
    // alignment is a power of two.
    unsafe { core::alloc::Layout::from_size_align_unchecked(SIZES[c] as usize, align) }
}

/// The class serving `size` bytes aligned to `align`, or `None` for large
/// requests (more than 8 KiB, or alignment above a page).
#[inline]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    if let Some(c) = class_fast(size, align) {
        return Some(c);
    }
    if size > MAX_SMALL || align > PAGE_SIZE {
        return None;
    }
    // A class aligned to `align` is a multiple of it, so none below
    // `align` bytes qualifies: start there. (From `size`, a 64-byte request
    // aligned to 4 KiB walked 25 classes, computing each one's alignment:
    // `posix_memalign(4096, 64)` took 41 ns against jemalloc's 12.)
    let mut c = index_of_tag(TABLES.plain[size.max(align)] as usize);
    while natural_align(c) < align {
        c += 1;
        if c == CLASSES {
            return None;
        }
    }
    Some(c)
}

/// The next larger class that still satisfies `align`.
#[inline]
pub(crate) fn next_class(c: usize, align: usize) -> Option<usize> {
    (c + 1..CLASSES).find(|&n| natural_align(n) >= align)
}

/// The largest object a request of `size` bytes aligned to `align` can be
/// given, or `None` for a request no class serves: its class `c`, or the
/// next larger class (the nolock route's fallback when `c` is re-entered on
/// every level) that keeps the alignment the fallback asks for, which is
/// `layout_of(c)`'s when the request came by the fast path. At most twice
/// `c`'s size: `posix_memalign(4096, 462)` may get an 8 KiB object,
/// `malloc(9)` (the 16-byte class, its fallback aligned to 16) a 32-byte
/// one.
pub(crate) fn largest_for(size: usize, align: usize) -> Option<usize> {
    let c = class_for(size, align)?;
    let kept = align.max(layout_of(c).align());
    Some(SIZES[next_class(c, kept).unwrap_or(c)] as usize)
}

/// Page order of the slabs of class `c`: the smallest order (at most 3, so
/// the nolock path can make slabs) holding at least 8 objects when possible.
pub(crate) const fn slab_order(c: usize) -> u32 {
    let size = SIZES[c] as usize;
    let mut order = 0;
    while order < 3 && (PAGE_SIZE << order) < 8 * size {
        order += 1;
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_object_bounds_both_classes_the_nolock_route_tries() {
        for align in (0..=PAGE_SIZE.trailing_zeros()).map(|b| 1 << b) {
            for size in 1..=MAX_SMALL {
                let Some(c) = class_for(size, align) else {
                    assert_eq!(largest_for(size, align), None);
                    continue;
                };
                let most = largest_for(size, align).unwrap();
                assert!(SIZES[c] as usize <= most, "{size} aligned to {align}");
                // The general path's fallback keeps the request's alignment;
                // a fast path's, the class layout's (at least as strict).
                for kept in [align, layout_of(c).align()] {
                    if let Some(n) = next_class(c, kept) {
                        assert!(SIZES[n] as usize <= most, "{size} aligned to {align}");
                    }
                }
                assert!(most <= 2 * SIZES[c] as usize, "{size} aligned to {align}");
            }
        }
        // The case a storm found: the 4 KiB class, then the 8 KiB one.
        assert_eq!(largest_for(462, 4096), Some(8192));
        // The 16-byte class, then the next one aligned to 16.
        assert_eq!(largest_for(9, 8), Some(32));
    }

    #[test]
    fn a_class_layout_maps_back_to_its_class_and_keeps_its_requests_alignment() {
        for c in 0..CLASSES {
            let l = layout_of(c);
            assert_eq!(class_fast(l.size(), l.align()), Some(c), "class {c}");
            assert_eq!(class_for(l.size(), l.align()), Some(c), "class {c}");
        }
        // Every request `class_fast` maps to c asks for at most c's layout's
        // alignment, so a fallback to a larger class that satisfies that
        // layout satisfies the request.
        for size in 1..=MAX_SMALL {
            for align in [1, 2, 4, 8, 16] {
                if let Some(c) = class_fast(size, align) {
                    assert!(align <= layout_of(c).align(), "size {size} align {align}");
                }
            }
        }
    }

    #[test]
    fn every_size_gets_the_smallest_fitting_class_with_bounded_waste() {
        for size in 1..=MAX_SMALL {
            let c = class_for(size, 1).unwrap();
            let s = SIZES[c] as usize;
            assert!(s >= size);
            assert!(
                c == 0 || (SIZES[c - 1] as usize) < size,
                "size {size} not in smallest class"
            );
            if size > 16 {
                assert!(
                    (s - size) * 4 <= s,
                    "size {size} wastes more than 25% in class {s}"
                );
                assert!(
                    (s - size) * 4 <= size,
                    "size {size} wastes more than 25% of itself in class {s}"
                );
            }
        }
    }

    #[test]
    fn alignment_is_honoured() {
        let mut align = 1;
        while align <= PAGE_SIZE {
            for size in [1, 7, 8, 13, 100, 1000, 3000, 4096, 5000, 8192] {
                if let Some(c) = class_for(size, align) {
                    assert!(SIZES[c] as usize >= size);
                    assert!(natural_align(c) >= align);
                } else {
                    assert!(size > MAX_SMALL, "no class for {size}/{align}");
                }
            }
            align *= 2;
        }
        assert_eq!(class_for(8193, 8), None);
        assert_eq!(class_for(8, 8192), None);
    }

    /// The table shortcut picks exactly what the search would: the
    /// smallest class that fits the size and has the alignment.
    #[test]
    fn the_fast_lookup_agrees_with_the_search() {
        let mut hits = 0;
        for align in (0..=PAGE_SIZE.trailing_zeros()).map(|b| 1 << b) {
            for size in 1..=MAX_SMALL + 1 {
                let searched =
                    (0..CLASSES).find(|&c| SIZES[c] as usize >= size && natural_align(c) >= align);
                if let Some(c) = class_fast(size, align) {
                    hits += 1;
                    assert_eq!(Some(c), searched, "size {size} align {align}");
                }
                assert_eq!(
                    class_for(size, align),
                    searched,
                    "size {size} align {align}"
                );
            }
        }
        // Every small size with alignment up to 16 takes the shortcut.
        assert_eq!(hits, 5 * MAX_SMALL);
    }

    /// The free's hint names the class `class_fast` gave the allocation
    /// whenever the size is a multiple of the alignment (every Rust type),
    /// and says "large" above the small sizes.
    #[test]
    fn the_free_hint_agrees_with_the_allocation_for_type_layouts() {
        // (From `align` up: `GlobalAlloc` is never asked for 0 bytes.)
        for align in [1, 2, 4, 8, 16] {
            for size in (align..=MAX_SMALL).step_by(align) {
                assert_eq!(
                    class_hint(size),
                    class_fast(size, align),
                    "size {size} align {align}"
                );
            }
        }
        assert_eq!(class_hint(MAX_SMALL + 1), None);
        // An 8-aligned request of 12 bytes is served by the 16-byte class:
        // the hint (12) differs, and the owner check sends that free the
        // layout-blind way.
        assert_eq!(class_fast(12, 8).map(|c| SIZES[c]), Some(16));
        assert_eq!(class_hint(12).map(|c| SIZES[c]), Some(12));
    }

    /// Exactly the tiny classes' hints carry the tiny bit, and with it
    /// they match no owner tag but their own class's (`owner | TINY_HINT`).
    #[test]
    fn tiny_hints_match_no_owner_directly() {
        let first_keyed = crate::slab::cache::FIRST_KEYED_CLASS;
        for size in 1..=MAX_SMALL {
            let k = TABLES.tag_hint(size).unwrap();
            let tiny = class_fast(size, 1).unwrap() < first_keyed;
            assert_eq!(k & TINY_HINT != 0, tiny, "size {size}");
            let tags = (0..2 * CLASSES).map(tag_of);
            for owner in tags.chain([usize::from(u16::MAX)]) {
                let own = owner == tag_of(class_fast(size, 1).unwrap());
                assert_eq!(owner == k, !tiny && own, "size {size} owner {owner}");
                assert_eq!(
                    (owner | TINY_HINT) == k,
                    tiny && own,
                    "size {size} owner {owner}"
                );
            }
        }
    }

    #[test]
    fn slab_orders_fit_the_nolock_path() {
        for (c, &size) in SIZES.iter().enumerate() {
            let o = slab_order(c);
            assert!(o <= 3);
            assert!((PAGE_SIZE << o) / size as usize >= 4);
        }
    }
}
