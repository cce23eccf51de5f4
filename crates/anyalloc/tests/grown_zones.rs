//! Memory in the zones that growth adds is found, validated and freed like
//! the first zone's: blocks and objects there are looked up through the
//! zone map (a few loads, no walk over the zones), and frees of objects
//! there take the same fast route.
//!
//! A grown zone is a reservation of its own, aligned to 4 MiB: it never
//! shares a 4 MiB granule with the first zone. So an object whose granule
//! is not the first zone's lies in a grown zone, which the tests check
//! rather than assume.

use std::alloc::Layout;
use std::ptr::NonNull;

use anyalloc::{Config, Heap, PageAllocator, MAX_ORDER, PAGE_SIZE};

mod free_route;
mod nolock_retry;

use free_route::free_by_route;

const GRANULE_SHIFT: u32 = 22;

/// A heap (a CPU slot set per possible CPU: the restartable fast paths,
/// where the platform offers them) whose first zone (1 MiB) is used up by
/// pages held through its page allocator, so that it grew: new objects
/// come from grown zones. Returns the heap, the held pages (order 0) and
/// the first zone's granule.
fn grown_heap() -> (Heap, Vec<NonNull<u8>>, usize) {
    let h = Heap::new(Config::default().memory(1 << 20)).unwrap();
    let first = h.pages().alloc_pages(0).expect("a fresh heap has pages");
    let granule = first.as_ptr() as usize >> GRANULE_SHIFT;
    let mut held = vec![first];
    while h.stats().pages.zones < 2 {
        held.push(h.pages().alloc_pages(0).expect("the heap grows"));
    }
    (h, held, granule)
}

fn pattern(p: NonNull<u8>, size: usize) -> u8 {
    ((p.as_ptr() as usize >> 4) ^ size) as u8
}

/// Checks that the live block `p` of `size` bytes still holds the
/// pattern it was filled with.
fn assert_filled(p: NonNull<u8>, size: usize) {
    // SAFETY: the caller's block is live and `size` bytes long.
    let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
    assert!(bytes.iter().all(|&b| b == pattern(p, size)));
}

/// Frees every block (normal and nolock frees in turn), drains, and checks
/// that every page is free again and the allocator's invariants hold.
fn free_all_and_check(pa: &PageAllocator, blocks: impl IntoIterator<Item = (NonNull<u8>, u32)>) {
    for (i, (p, order)) in blocks.into_iter().enumerate() {
        // SAFETY: each block was allocated with its order and is freed once.
        unsafe {
            if i % 2 == 0 {
                pa.free_pages(p, order);
            } else {
                pa.free_pages_nolock(p, order);
            }
        }
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    pa.check_invariants().unwrap();
}

#[test]
fn page_blocks_of_every_zone_are_found_and_freed() {
    let pa = PageAllocator::new(Config::default().memory(1 << 20).min_reserve(0)).unwrap();
    let mut held = Vec::new();
    while pa.stats().zones < 6 {
        held.push(pa.alloc_pages(MAX_ORDER).expect("the allocator grows"));
    }
    let granules: std::collections::BTreeSet<usize> = held
        .iter()
        .map(|p| p.as_ptr() as usize >> GRANULE_SHIFT)
        .collect();
    assert_eq!(
        granules.len(),
        held.len(),
        "two 4 MiB blocks in one granule"
    );
    for p in &held {
        let a = p.as_ptr() as usize;
        assert!(pa.contains(a) && pa.contains(a + (PAGE_SIZE << MAX_ORDER) - 1));
    }
    let local = 0u64;
    assert!(!pa.contains(&local as *const u64 as usize));
    assert!(!pa.contains(usize::MAX - 4095));
    // Freed through both paths: each free's claim finds its block's zone.
    free_all_and_check(&pa, held.into_iter().map(|p| (p, MAX_ORDER)));
}

/// Blocks of the per-CPU lists' orders (0 to 3) in grown zones go onto
/// their own zone's lists when freed (the same fast path as the first
/// zone's, on the block's zone), and allocations (normal and nolock) pop
/// them from there: a
/// churn over three zones and more keeps every live block distinct and
/// inside the allocator, and every page comes back.
#[test]
fn small_blocks_of_grown_zones_churn_through_their_own_lists() {
    let pa = PageAllocator::new(Config::default().memory(1 << 20).min_reserve(0)).unwrap();
    let mut live: Vec<(NonNull<u8>, u32)> = Vec::new();
    let mut order = 0;
    while pa.stats().zones < 3 {
        live.push((pa.alloc_pages(order).expect("the allocator grows"), order));
        order = (order + 1) % 4;
    }
    let check = |live: &[(NonNull<u8>, u32)]| {
        let mut ranges: Vec<(usize, usize)> = live
            .iter()
            .map(|&(p, o)| (p.as_ptr() as usize, p.as_ptr() as usize + (PAGE_SIZE << o)))
            .collect();
        ranges.sort();
        assert!(
            ranges.windows(2).all(|w| w[0].1 <= w[1].0),
            "two live blocks overlap"
        );
        assert!(ranges
            .iter()
            .all(|&(a, b)| pa.contains(a) && pa.contains(b - 1)));
    };
    check(&live);
    for round in 0..20 {
        // Free every other block (normal and nolock frees in turn), then
        // allocate as many of the same orders again.
        let mut kept = Vec::new();
        let mut freed = Vec::new();
        for (i, (p, o)) in live.drain(..).enumerate() {
            if (i + round) % 2 == 0 {
                // SAFETY: allocated with order `o`, freed once.
                unsafe {
                    if i % 4 < 2 {
                        pa.free_pages(p, o);
                    } else {
                        pa.free_pages_nolock(p, o);
                    }
                }
                freed.push(o);
            } else {
                kept.push((p, o));
            }
        }
        live = kept;
        // Normal and nolock allocations in turn: both pop the grown zones'
        // lists. (Nothing else uses this allocator: no lock is busy.)
        for (i, o) in freed.into_iter().enumerate() {
            let p = if i % 2 == 0 {
                pa.alloc_pages(o)
            } else {
                pa.alloc_pages_nolock(o)
            };
            live.push((p.expect("memory freed just now"), o));
        }
        check(&live);
    }
    free_all_and_check(&pa, live);
}

/// Objects of every small class (and page blocks) allocated in grown zones,
/// filled, checked and freed through each free (`free_sized`, `free`,
/// their nolock forms): every object comes back, and every page.
#[test]
fn objects_in_grown_zones_are_freed_by_every_route() {
    let (h, held, first_granule) = grown_heap();
    let sizes = [
        8usize, 12, 16, 24, 48, 64, 100, 256, 1000, 4096, 7000, 20_000,
    ];
    let mut live = Vec::new();
    for round in 0..40 {
        for &size in &sizes {
            let layout = Layout::from_size_align(size, 8).unwrap();
            let p = if round % 3 == 2 {
                h.alloc_nolock(layout)
                    .expect("an idle heap serves nolock calls")
            } else {
                h.alloc(layout).expect("the heap grows")
            };
            // SAFETY: a fresh block of `size` bytes.
            unsafe { p.as_ptr().write_bytes(pattern(p, size), size) };
            live.push((p, layout));
        }
    }
    let grown = live
        .iter()
        .filter(|(p, _)| p.as_ptr() as usize >> GRANULE_SHIFT != first_granule)
        .count();
    assert!(
        grown * 2 > live.len(),
        "only {grown} of {} blocks outside the first zone",
        live.len()
    );
    for (i, (p, layout)) in live.into_iter().enumerate() {
        assert_filled(p, layout.size());
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { free_by_route(&h, p, layout, i) };
    }
    for p in held {
        // SAFETY: allocated through the heap's page allocator with order 0.
        unsafe { h.pages().free_pages(p, 0) };
    }
    h.drain();
    let s = h.stats();
    assert_eq!((s.objects_in_use, s.large_in_use), (0, 0));
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
}

/// The heap's large blocks of the per-CPU lists' orders (16 to 64 KiB) in
/// grown zones: freed onto their own zone's lists and taken again from
/// there, by normal and nolock calls, over many rounds with some blocks
/// kept across them. No two live blocks overlap, each keeps its contents,
/// most lie outside the first zone, and every page comes back.
#[test]
fn large_blocks_of_grown_zones_churn_through_their_own_lists() {
    let (h, held, first_granule) = grown_heap();
    let sizes = [9000usize, 16 << 10, 32 << 10, 64 << 10];
    let mut kept: Vec<(NonNull<u8>, Layout)> = Vec::new();
    let mut outside = 0usize;
    let mut total = 0usize;
    for round in 0..30 {
        let mut live = std::mem::take(&mut kept);
        for i in 0..24 {
            let size = sizes[i % sizes.len()];
            let layout = Layout::from_size_align(size, 8).unwrap();
            let p = if (round + i) % 3 == 0 {
                nolock_retry::first(|| h.alloc_nolock(layout).ok_or("refused"))
            } else {
                h.alloc(layout).expect("the heap grows")
            };
            // SAFETY: a fresh block of `size` bytes.
            unsafe { p.as_ptr().write_bytes(pattern(p, size), size) };
            total += 1;
            outside += usize::from(p.as_ptr() as usize >> GRANULE_SHIFT != first_granule);
            live.push((p, layout));
        }
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|(p, l)| (p.as_ptr() as usize, p.as_ptr() as usize + l.size()))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "two live blocks overlap: {w:x?}");
        }
        for (i, (p, layout)) in live.into_iter().enumerate() {
            assert_filled(p, layout.size());
            if i % 5 == 0 {
                kept.push((p, layout));
                continue;
            }
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { free_by_route(&h, p, layout, i) };
        }
    }
    assert!(
        outside * 4 > total * 3,
        "only {outside} of {total} blocks outside the first zone"
    );
    for (p, layout) in kept {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { h.free_sized(p, layout) };
    }
    for p in held {
        // SAFETY: allocated through the heap's page allocator with order 0.
        unsafe { h.pages().free_pages(p, 0) };
    }
    h.drain();
    let s = h.stats();
    assert_eq!(s.large_in_use, 0);
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
    h.pages().check_invariants().unwrap();
}

/// Growth serves the thread that grew: three threads that each want six
/// largest blocks (4 MiB) of a growing heap that starts at 8 MiB, while
/// two others allocate middle orders (16-128 KiB, which split largest
/// blocks) as fast as they can. Every normal-path allocation must
/// succeed. Before a fresh zone served its grower ahead of everyone else,
/// about one round in ten lost one: the others split or took every
/// largest block of the new zone before its grower got there, and the
/// grower reported no memory with room left to add.
#[test]
fn growth_serves_its_grower_against_racing_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const ROUNDS: usize = 200;
    const GROWERS: usize = 3;
    const WANTED: usize = 6;
    for round in 0..ROUNDS {
        let heap = Heap::new(
            Config::default()
                .memory(8 << 20)
                .grow(true)
                .maintenance(false),
        )
        .unwrap();
        let pa = heap.pages();
        let stop = AtomicBool::new(false);
        let (largest, middle) = std::thread::scope(|s| {
            let growers: Vec<_> = (0..GROWERS)
                .map(|_| {
                    s.spawn(|| {
                        (0..WANTED)
                            .map(|_| pa.alloc_pages(MAX_ORDER).map(|p| p.as_ptr() as usize))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let splitters: Vec<_> = (0..2u32)
                .map(|t| {
                    let stop = &stop;
                    s.spawn(move || {
                        let mut held = Vec::new();
                        let mut i = t;
                        while !stop.load(Ordering::Relaxed) && held.len() < 2000 {
                            let order = 2 + i % 4;
                            let p = pa.alloc_pages(order).expect("a growing heap");
                            held.push((p.as_ptr() as usize, order));
                            i += 1;
                        }
                        held
                    })
                })
                .collect();
            let largest: Vec<_> = growers
                .into_iter()
                .flat_map(|g| g.join().unwrap())
                .collect();
            stop.store(true, Ordering::Relaxed);
            let middle: Vec<_> = splitters
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            (largest, middle)
        });
        let missed = largest.iter().filter(|p| p.is_none()).count();
        assert_eq!(
            missed,
            0,
            "round {round}: {missed} of {} largest blocks refused by a heap \
             that could still grow ({} zones)",
            largest.len(),
            pa.stats().zones
        );
        let blocks = largest
            .into_iter()
            .map(|p| (p.unwrap(), MAX_ORDER))
            .chain(middle)
            .map(|(p, order)| (NonNull::new(p as *mut u8).unwrap(), order));
        free_all_and_check(pa, blocks);
    }
}
