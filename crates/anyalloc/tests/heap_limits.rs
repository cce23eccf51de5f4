//! Edge cases at the heap's limits: zero-size blocks with huge alignments,
//! the largest zone a configuration may ask for, and regions at the top of
//! the address space.

mod maps;
mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::{Config, Error, Group, Heap, PageAllocator, MAX_MEMORY, PAGE_SIZE};

/// Whether `[addr, addr + len)` lies inside one mapping of this process.
fn mapped(addr: usize, len: usize) -> bool {
    maps::mappings()
        .into_iter()
        .any(|(a, b)| a <= addr && addr + len <= b)
}

/// The blocks `(address, usable bytes)` do not overlap.
fn disjoint(blocks: &[(usize, usize)]) -> bool {
    let mut v = blocks.to_vec();
    v.sort();
    v.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
}

/// A block of size 0 (or 1) aligned beyond 4 MiB is a huge block (its own
/// mapping): it is at least a page, stays mapped until it is freed, and no
/// later allocation lands on it. (A zero-size one used to be an empty
/// mapping, its address free for the next huge block or zone, while the
/// huge table still held it: a later free of it unmapped another block.)
#[test]
fn zero_size_blocks_with_huge_alignments_are_whole_pages_of_their_own() {
    let h = Heap::new(Config::default().memory(4 << 20).maintenance(false).cpus(2)).unwrap();
    let g = Group::new("zero", None, None);
    let mut blocks = Vec::new();
    for align in [8usize << 20, 64 << 20] {
        for size in [0usize, 1] {
            let l = Layout::from_size_align(size, align).unwrap();
            for accounted in [false, true] {
                let p = if accounted {
                    h.alloc_in(l, &g)
                } else {
                    h.alloc(l)
                }
                .unwrap_or_else(|| panic!("{size}/{align}"));
                let addr = p.as_ptr() as usize;
                assert_eq!(addr % align, 0, "{size}/{align}");
                let usable = h.usable_size(p);
                assert_eq!(usable, PAGE_SIZE, "{size}/{align}: one page");
                assert!(mapped(addr, usable), "{size}/{align}: {addr:#x} not mapped");
                // SAFETY: a live block of `usable` bytes.
                unsafe { p.as_ptr().write_bytes(0x5a, usable) };
                blocks.push((addr, usable, l, p));
            }
        }
    }
    assert_eq!(g.usage(), 4 * PAGE_SIZE, "each accounted block: one page");
    // Huge blocks and zones made after them land elsewhere.
    let big = h
        .alloc(Layout::from_size_align(5 << 20, 8 << 20).unwrap())
        .unwrap();
    let zone_blocks: Vec<NonNull<u8>> = (0..4)
        .map(|_| {
            h.alloc(Layout::from_size_align(4 << 20, 8).unwrap())
                .unwrap()
        })
        .collect();
    let mut ranges: Vec<(usize, usize)> = blocks.iter().map(|b| (b.0, b.1)).collect();
    ranges.push((big.as_ptr() as usize, 5 << 20));
    ranges.extend(zone_blocks.iter().map(|p| (p.as_ptr() as usize, 4 << 20)));
    assert!(disjoint(&ranges), "overlapping blocks: {ranges:x?}");
    for &(addr, usable, _, p) in &blocks {
        assert!(!h.pages().contains(addr), "{addr:#x} in a zone");
        // SAFETY: live, `usable` bytes; nothing else wrote there.
        let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), usable) };
        assert!(s.iter().all(|&b| b == 0x5a), "{addr:#x} was overwritten");
    }
    assert_eq!(h.stats().huge_in_use, blocks.len() + 1);
    for (i, &(_, _, l, p)) in blocks.iter().enumerate() {
        // SAFETY: allocated above, freed once.
        unsafe {
            if i % 2 == 0 {
                h.free(p)
            } else {
                h.free_sized(p, l)
            }
        }
    }
    // SAFETY: allocated above, freed once.
    unsafe {
        h.free(big);
        for p in zone_blocks {
            h.free(p);
        }
    }
    let s = h.stats();
    assert_eq!((s.huge_in_use, s.huge_bytes), (0, 0));
    assert_eq!(g.usage(), 0);
}

/// The same through `GlobalAlloc` (the process-wide heap): a zero-size
/// block aligned to 8 MiB is a page of its own, freed like any other.
#[test]
fn global_zero_size_blocks_with_huge_alignments_are_whole_pages() {
    let heap = anyalloc::init().expect("global heap");
    let l = Layout::from_size_align(0, 8 << 20).unwrap();
    let one = Layout::from_size_align(1, 8 << 20).unwrap();
    let mut live = Vec::new();
    for i in 0..4 {
        let layout = if i % 2 == 0 { l } else { one };
        // SAFETY: our `GlobalAlloc` serves size 0 too (a page here).
        let p = NonNull::new(unsafe { anyalloc::Global.alloc(layout) }).expect("memory");
        let addr = p.as_ptr() as usize;
        assert_eq!(addr % (8 << 20), 0);
        assert_eq!(heap.usable_size(p), PAGE_SIZE);
        assert!(mapped(addr, PAGE_SIZE), "{addr:#x} not mapped");
        // SAFETY: one page, live.
        unsafe { p.as_ptr().write(7) };
        live.push((addr, PAGE_SIZE, layout));
    }
    let ranges: Vec<(usize, usize)> = live.iter().map(|b| (b.0, b.1)).collect();
    assert!(disjoint(&ranges), "{ranges:x?}");
    for (addr, _, layout) in live {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { anyalloc::Global.dealloc(addr as *mut u8, layout) };
    }
}

/// A zone numbers its pages with 32-bit indices: `Config::memory` above
/// `MAX_MEMORY` (16 TiB less 4 MiB) is refused with an error naming the
/// limit, by both constructors (it used to be accepted up to 64 TiB, the
/// indices wrapped, and frees hit other pages).
#[test]
fn memory_beyond_what_32_bit_page_indices_number_is_refused() {
    assert_eq!(MAX_MEMORY, (1 << 44) - (4 << 20));
    assert_eq!(MAX_MEMORY % (4 << 20), 0, "whole 4 MiB blocks");
    for bytes in [
        MAX_MEMORY + 1,
        MAX_MEMORY + PAGE_SIZE,
        1 << 44,
        (1 << 44) + (4 << 20),
        1 << 46,
        usize::MAX,
    ] {
        let config = Config::default().memory(bytes).grow(false);
        let pages = PageAllocator::new(config).err();
        let heap = Heap::new(config.maintenance(false)).err();
        for e in [pages, heap] {
            let e = e.expect("refused");
            assert!(
                matches!(e, Error::Config { setting: "Config::memory", value, .. } if value == bytes),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains("at most 17592181850112 bytes (16 TiB - 4 MiB"),
                "{text}"
            );
        }
    }
}

/// The same limit holds for `ANYALLOC_MEMORY`: the global heap names the
/// setting in one line and keeps its default.
#[test]
fn anyalloc_memory_beyond_the_limit_is_ignored() {
    if watchdog::in_child() {
        let heap = anyalloc::init().expect("the global heap, with its defaults");
        let total = heap.stats().pages.total_pages * PAGE_SIZE;
        println!("first zone: {total} bytes");
        assert!(total < MAX_MEMORY, "{total}");
        let p = heap
            .alloc(Layout::from_size_align(100, 8).unwrap())
            .unwrap();
        // SAFETY: allocated just above.
        unsafe { heap.free(p) };
        println!("CHILD DONE");
        return;
    }
    let too_much = ((1usize << 44) + (4 << 20)).to_string();
    let out = watchdog::run_ok(
        "anyalloc_memory_beyond_the_limit_is_ignored",
        &[
            ("ANYALLOC_MEMORY", too_much.as_str()),
            ("ANYALLOC_MAINTENANCE", "0"),
        ],
        Duration::from_secs(60),
        "the global heap with ANYALLOC_MEMORY above the limit",
    );
    println!(
        "child stdout:\n{}\nchild stderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(out.stdout.contains("CHILD DONE"));
    assert!(
        out.stderr.contains(&format!(
            "anyalloc: ANYALLOC_MEMORY=\"{too_much}\" is out of range (too much memory: at most {MAX_MEMORY} bytes"
        )) && out.stderr.contains("; using the default\n"),
        "{}",
        out.stderr
    );
}

/// Regions at the very top of the address space are refused before any
/// byte of them is touched (the addresses here are not memory at all): one
/// whose first page boundary wraps, and one whose page-rounded start fits
/// but whose metadata sum would wrap (it used to pass the fit check with
/// a wrapped sum, and the zone was written there).
#[test]
fn regions_at_the_top_of_the_address_space_are_refused_untouched() {
    struct OneCpu;
    impl anyalloc::Platform for OneCpu {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            1
        }
    }
    static ONE: OneCpu = OneCpu;
    let config = Config::default();
    let at = |a: usize| NonNull::new(a as *mut u8).unwrap();
    // The last page, not page-aligned: no page boundary at or above it.
    for (start, len) in [
        (usize::MAX - 4000, 100),
        (usize::MAX - 4000, 4000),
        (usize::MAX - 8, 8),
    ] {
        let wraps = Error::Region {
            len,
            reason: "the region wraps around the address space",
        };
        // SAFETY: refused before the region is touched.
        let pages = unsafe { PageAllocator::from_region(at(start), len, &ONE, config) };
        let heap = unsafe { Heap::from_region(at(start), len, &ONE, config) };
        assert_eq!(pages.err(), Some(wraps.clone()), "{start:#x}+{len}");
        assert_eq!(heap.err(), Some(wraps), "{start:#x}+{len}");
    }
    // Page-aligned, ending at the top: 20 pages, whose metadata (the
    // descriptors from the 4 MiB boundary below) leaves too few.
    let start = usize::MAX - 20 * PAGE_SIZE + 1;
    let len = 20 * PAGE_SIZE - 1;
    // SAFETY: refused before the region is touched.
    let pages = unsafe { PageAllocator::from_region(at(start), len, &ONE, config) };
    let Err(e) = pages else { panic!("accepted") };
    assert!(
        matches!(e, Error::Region { reason, .. } if reason.starts_with("too small")),
        "{e}"
    );
    // SAFETY: as above.
    let heap = unsafe { Heap::from_region(at(start), len, &ONE, config) };
    let Err(e) = heap else { panic!("accepted") };
    assert!(
        matches!(e, Error::Region { reason, .. } if reason.starts_with("too small")),
        "{e}"
    );
}
