//! Basic behaviour of the object allocator.

use anyalloc::{Config, Error, Heap, PageAllocator, PAGE_SIZE};
use std::alloc::Layout;
use std::ptr::NonNull;

fn heap() -> Heap {
    Heap::new(Config::default().memory(64 << 20).cpus(2)).unwrap()
}

/// 64 MiB, no growth, no maintenance thread: page counts change only by
/// what the test does.
fn quiet_heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .grow(false)
            .maintenance(false),
    )
    .unwrap()
}

fn fill(p: NonNull<u8>, len: usize, seed: u8) {
    // SAFETY: the block is a live allocation of at least that many bytes, owned by this test.
    unsafe { std::ptr::write_bytes(p.as_ptr(), seed, len) };
}

fn check(p: NonNull<u8>, len: usize, seed: u8) {
    // SAFETY: the block is a live allocation of at least that many bytes, owned by this test.
    let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), len) };
    assert!(s.iter().all(|&b| b == seed), "pattern damaged at {p:?}");
}

#[test]
fn sizes_and_alignments_round_trip_and_pages_come_back() {
    let h = heap();
    let mut held = Vec::new();
    let mut align = 1;
    while align <= 4 * PAGE_SIZE {
        for size in [
            1usize,
            8,
            12,
            17,
            24,
            100,
            1000,
            4096,
            5000,
            8192,
            8193,
            20000,
            1 << 20,
            5 << 20,
        ] {
            let l = Layout::from_size_align(size, align).unwrap();
            for nolock in [false, true] {
                let p = if nolock {
                    h.alloc_nolock(l)
                } else {
                    h.alloc(l)
                };
                if nolock && size.max(align) > 4 << 20 {
                    assert!(p.is_none(), "nolock serves up to 4 MiB");
                    continue;
                }
                let p = p.unwrap_or_else(|| panic!("alloc {size}/{align} nolock={nolock}"));
                assert_eq!(p.as_ptr() as usize % align, 0, "{size}/{align}");
                assert!(h.usable_size(p) >= size);
                let seed = (held.len() % 251) as u8;
                fill(p, size, seed);
                held.push((p, size, seed));
            }
        }
        align *= 2;
    }
    for (i, (p, size, seed)) in held.into_iter().enumerate() {
        check(p, size, seed);
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe {
            if i % 3 == 0 {
                h.free_nolock(p)
            } else {
                h.free(p)
            }
        }
    }
    let s = h.stats();
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.large_in_use, 0);
    assert_eq!(s.huge_in_use, 0);
    h.drain();
    let p = h.pages().stats();
    assert_eq!(p.free_pages, p.total_pages);
    assert_eq!(p.buddy_pages, p.total_pages);
    h.pages().check_invariants().unwrap();
}

/// Every small size with every alignment up to 16 (the fast paths' table
/// lookups, read from the heap's own copy of the tables) gets the smallest
/// of the heap's classes (as its statistics list them, ascending) that
/// holds it at that alignment, and a sized free told the same
/// layout (the hint table: tiny classes through their own arm) takes each
/// one back: nothing stays in use.
#[test]
fn every_small_size_gets_its_class_and_comes_back_through_the_sized_free() {
    let h = quiet_heap();
    let class_sizes: Vec<usize> = h.stats().classes.iter().map(|c| c.size).collect();
    assert!(class_sizes.is_sorted() && class_sizes.last() == Some(&8192));
    for align in [1usize, 2, 4, 8, 16] {
        for size in 1..=8192usize {
            let l = Layout::from_size_align(size, align).unwrap();
            let want = class_sizes
                .iter()
                .copied()
                .find(|&c| c >= size && (c & c.wrapping_neg()) >= align)
                .unwrap();
            for nolock in [false, true] {
                let p = if nolock {
                    h.alloc_nolock(l)
                } else {
                    h.alloc(l)
                };
                let p = p.unwrap_or_else(|| panic!("alloc {size}/{align} nolock={nolock}"));
                assert_eq!(p.as_ptr() as usize % align, 0, "{size}/{align}");
                assert_eq!(h.usable_size(p), want, "{size}/{align}");
                // SAFETY: live, from this heap, freed once with its layout.
                unsafe {
                    if nolock {
                        h.free_nolock_sized(p, l)
                    } else {
                        h.free_sized(p, l)
                    }
                }
            }
        }
    }
    assert_eq!(h.stats().objects_in_use, 0);
}

#[test]
fn small_objects_do_not_overlap() {
    let h = heap();
    let mut v: Vec<(usize, usize)> = Vec::new();
    for i in 0..20000usize {
        let size = 8 + (i * 37) % 2000;
        let p = if i % 2 == 0 {
            h.alloc(Layout::from_size_align(size, 8).unwrap())
        } else {
            h.alloc_nolock(Layout::from_size_align(size, 8).unwrap())
        };
        let p = p.unwrap();
        v.push((p.as_ptr() as usize, size));
    }
    let mut sorted = v.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {w:?}");
    }
    // A nolock allocation that finds its class and the next one up busy (the
    // maintainer holds their node locks while it stocks or flushes) is
    // served by a page block instead: a large allocation, counted apart.
    let s = h.stats();
    assert_eq!(s.objects_in_use + s.large_in_use, 20000, "{s:?}");
    assert!(
        s.large_in_use <= 10000,
        "only nolock allocations fall back: {s:?}"
    );
    for (a, _) in v {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { h.free(NonNull::new(a as *mut u8).unwrap()) };
    }
    let s = h.stats();
    assert_eq!((s.objects_in_use, s.large_in_use), (0, 0), "{s:?}");
    h.drain();
    let p = h.pages().stats();
    assert_eq!(p.free_pages, p.total_pages);
}

#[test]
fn cross_thread_frees_neither_leak_nor_grow() {
    let h = std::sync::Arc::new(heap());
    let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(1024);
    let producer = {
        let h = h.clone();
        std::thread::spawn(move || {
            for i in 0..200_000usize {
                let p = h
                    .alloc(Layout::from_size_align(16 + i % 200, 8).unwrap())
                    .unwrap();
                tx.send(p.as_ptr() as usize).unwrap();
            }
        })
    };
    let consumer = {
        let h = h.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while let Ok(a) = rx.recv() {
                let p = NonNull::new(a as *mut u8).unwrap();
                // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
                unsafe {
                    if n % 2 == 0 {
                        h.free(p)
                    } else {
                        h.free_nolock(p)
                    }
                }
                n += 1;
            }
            n
        })
    };
    producer.join().unwrap();
    assert_eq!(consumer.join().unwrap(), 200_000);
    let s = h.stats();
    assert_eq!(s.objects_in_use, 0);
    // Bounded: at most a few MiB of pages are held by caches at the end.
    let held = s.pages.total_pages - s.pages.free_pages;
    assert!(
        held < 2048,
        "caches hold {held} pages after cross-thread churn"
    );
    h.drain();
    let p = h.pages().stats();
    assert_eq!(p.free_pages, p.total_pages);
}

#[test]
fn exhaustion_and_growth() {
    let capped = Heap::new(Config::default().memory(1 << 20).cpus(1).grow(false)).unwrap();
    let mut v = Vec::new();
    while let Some(p) = capped.alloc(Layout::from_size_align(1000, 8).unwrap()) {
        v.push(p);
        assert!(v.len() < 100_000);
    }
    assert!(capped
        .alloc_nolock(Layout::from_size_align(1000, 8).unwrap())
        .is_none());
    assert!(capped.stats().nolock_alloc_fail_empty >= 1);
    for p in v {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { capped.free(p) };
    }
    let growing = Heap::new(Config::default().memory(1 << 20).cpus(1)).unwrap();
    let v: Vec<_> = (0..5000)
        .map(|_| {
            growing
                .alloc(Layout::from_size_align(1000, 8).unwrap())
                .unwrap()
        })
        .collect();
    assert!(growing.pages().stats().zones > 1);
    for p in v {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { growing.free(p) };
    }
    growing.drain();
    let p = growing.pages().stats();
    assert_eq!(p.free_pages, p.total_pages);
}

#[test]
fn the_nolock_stock_fills_on_demand_and_idles_back() {
    let h = quiet_heap();
    assert_eq!(h.stats().pages.stock_pages, 0, "no stock before demand");
    // A nolock request of 1 MiB (order 8): served from the buddy lists under
    // a tried zone lock, and from then on order 8 is kept stocked.
    let l = Layout::from_size_align(1 << 20, 8).unwrap();
    let p = h.alloc_nolock(l).expect("memory to spare");
    let s = h.stats().pages;
    assert_eq!(s.stock_pages % 256, 0);
    assert!(s.stock_pages >= 256, "order 8 stocked: {s:?}");
    assert_eq!(s.nolock_large_alloc_ok, 1);
    // SAFETY: allocated above, freed once.
    unsafe { h.free_nolock(p) };
    // A maintenance pass with demand keeps the stock...
    let p = h.alloc_nolock(l).expect("memory to spare");
    h.maintain();
    assert!(h.stats().pages.stock_pages > 0);
    // ...passes without demand give it back to the buddy lists.
    // SAFETY: allocated above, freed once.
    unsafe { h.free_nolock(p) };
    for _ in 0..3 {
        h.maintain();
    }
    let s = h.stats().pages;
    assert_eq!(s.stock_pages, 0, "an idle stock went back: {s:?}");
    assert_eq!(s.free_pages, s.total_pages);
}

/// Maintenance tops up a per-CPU page list that a nolock allocation found
/// empty (a burst in a handler then finds pages), and not one that only the
/// normal path found empty: a normal refill can wait for the zone lock, so a
/// stock kept for it would only hold memory.
#[test]
fn page_lists_are_stocked_for_the_nolock_path_only() {
    let h = Heap::new(
        Config::default()
            .memory(64 << 20)
            .grow(false)
            .maintenance(false)
            .cpus(1),
    )
    .unwrap();
    // 16 KiB: an order-2 block from the page allocator's per-CPU lists.
    let l = Layout::from_size_align(16 << 10, 8).unwrap();
    let percpu = |h: &Heap| h.stats().pages.percpu_pages;
    h.drain();
    assert_eq!(percpu(&h), 0, "drained");
    let p = h.alloc(l).expect("memory to spare");
    let before = percpu(&h);
    h.maintain();
    assert_eq!(
        percpu(&h),
        before,
        "maintenance stocked a list that only the normal path found empty"
    );
    // SAFETY: allocated above, freed once.
    unsafe { h.free(p) };
    h.drain();
    assert_eq!(percpu(&h), 0, "drained");
    let p = h.alloc_nolock(l).expect("memory to spare");
    let before = percpu(&h);
    h.maintain();
    assert!(
        percpu(&h) > before,
        "maintenance did not stock the list the nolock path found empty: {before} pages"
    );
    // SAFETY: allocated above, freed once.
    unsafe { h.free_nolock(p) };
    h.drain();
    let s = h.stats().pages;
    assert_eq!(s.free_pages, s.total_pages, "pages lost: {s:?}");
}

/// 64 KiB blocks (order 4, above the page allocator's per-CPU orders) have
/// a per-CPU list of the heap's own, which both modes share: with rseq, a
/// free puts the block there and the next allocation of that size on the
/// CPU, normal or nolock, takes it back without the zone lock; a drain
/// gives the listed blocks back to the buddy lists.
fn sixty_four_kib_blocks_come_back_from_a_per_cpu_list(nolock: bool) {
    let h = quiet_heap();
    let l = Layout::from_size_align(64 << 10, 8).unwrap();
    let rseq = h.stats().fast_path == anyalloc::FastPath::Rseq;
    let total = h.stats().pages.total_pages;
    let large_nolock = || {
        let s = h.stats().pages;
        s.nolock_large_alloc_ok + s.nolock_large_alloc_fail_busy + s.nolock_large_alloc_fail_empty
    };
    let (ok0, large0) = (h.stats().nolock_alloc_ok, large_nolock());
    for _ in 0..100 {
        let before = h.stats().pages;
        let p = if nolock {
            h.alloc_nolock(l)
        } else {
            h.alloc(l)
        };
        let p = p.expect("memory to spare");
        // SAFETY: a fresh 64 KiB block.
        unsafe { p.as_ptr().write_bytes(0x5a, 64 << 10) };
        // SAFETY: allocated above, freed once.
        unsafe {
            if nolock {
                h.free_nolock(p)
            } else {
                h.free(p)
            }
        };
        let after = h.stats().pages;
        assert_eq!(after.free_pages, before.free_pages, "a page went missing");
        if !rseq {
            assert_eq!(after.percpu_pages, 0, "no per-CPU list without rseq");
        }
    }
    if nolock {
        assert_eq!(
            h.stats().nolock_alloc_ok - ok0,
            100,
            "every nolock block counted"
        );
        // The page allocator's large nolock path (buddy lists under a tried
        // lock): once to make the first block with rseq, every time without.
        let want = if rseq { 1 } else { 100 };
        assert_eq!(
            large_nolock() - large0,
            want,
            "nolock blocks from the buddy lists"
        );
    }
    if rseq {
        let listed = h.stats().pages.percpu_pages;
        assert_eq!(listed, 16, "the freed block waits on the per-CPU list");
    }
    h.drain();
    let s = h.stats().pages;
    assert_eq!(s.percpu_pages, 0, "drain empties the per-CPU lists");
    assert_eq!(s.free_pages, total, "every page came back");
    h.pages().check_invariants().unwrap();
}

/// Runs `f` on a thread of its own pinned to one CPU (one CPU, one
/// per-CPU list: every pair after the first finds its block there). The
/// pin ends with that thread, not with the test's.
fn on_one_cpu(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(
                anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu()),
                "could not pin the thread"
            );
            f()
        });
    });
}

#[test]
fn normal_64_kib_blocks_come_back_from_a_per_cpu_list() {
    on_one_cpu(|| sixty_four_kib_blocks_come_back_from_a_per_cpu_list(false));
}

#[test]
fn nolock_64_kib_blocks_come_back_from_the_same_per_cpu_list() {
    on_one_cpu(|| sixty_four_kib_blocks_come_back_from_a_per_cpu_list(true));
}

/// A nested call (here `Global` inside a nolock scope) of a large order
/// without a per-CPU list (128 KiB) takes the nolock path for large orders,
/// as the large nolock counters show; one of 64 KiB first tries the heap's
/// per-CPU list, which any context may use, and finds the block a normal
/// pair left there.
#[test]
fn nested_large_requests_take_the_nolock_path() {
    on_one_cpu(nested_large_requests);
}

fn nested_large_requests() {
    use std::alloc::GlobalAlloc;
    let heap = anyalloc::init().expect("global heap");
    let rseq = heap.stats().fast_path == anyalloc::FastPath::Rseq;
    let large = || {
        let s = heap.stats().pages;
        s.nolock_large_alloc_ok + s.nolock_large_alloc_fail_busy + s.nolock_large_alloc_fail_empty
    };
    for (size, from_list) in [(128usize << 10, false), (64 << 10, rseq)] {
        let l = Layout::from_size_align(size, 8).unwrap();
        for _ in 0..10 {
            // A normal pair (with rseq, a 64 KiB one leaves the block on
            // this CPU's list).
            // SAFETY: a non-zero size; the block is freed once, with its layout.
            unsafe {
                let p = anyalloc::Global.alloc(l);
                assert!(!p.is_null());
                anyalloc::Global.dealloc(p, l);
            }
            let before = large();
            {
                let _nested = anyalloc::nolock_scope();
                // SAFETY: as above.
                unsafe {
                    let p = anyalloc::Global.alloc(l);
                    assert!(!p.is_null(), "memory to spare");
                    anyalloc::Global.dealloc(p, l);
                }
            }
            assert_eq!(
                large(),
                before + u64::from(!from_list),
                "the nested {size}-byte request took the nolock path (per-CPU list: {from_list})"
            );
        }
    }
}

/// `Global::dealloc` names the class from the layout's size alone and lets
/// the page's owner decide. Layouts whose size is not a multiple of their
/// alignment, or whose alignment is above 8, are served by another class
/// than their size names: those frees must take the layout-blind path and
/// free the right object, with nothing lost and nothing handed out twice.
#[test]
fn global_frees_of_layouts_served_by_another_class_free_the_right_object() {
    use std::alloc::GlobalAlloc;
    let heap = anyalloc::init().expect("global heap");
    let in_use = |size: usize| {
        let s = heap.stats();
        s.classes
            .iter()
            .find(|c| c.size == size)
            .unwrap()
            .objects_in_use
    };
    // (size, align, the class that serves it)
    let cases = [
        (12, 8, 16),
        (20, 8, 24),
        (28, 8, 32),
        (8, 16, 16),
        (40, 16, 48),
        (100, 64, 128),
    ];
    for (size, align, class) in cases {
        let l = Layout::from_size_align(size, align).unwrap();
        let before = in_use(class);
        for round in 0..3u8 {
            let live: Vec<NonNull<u8>> = (0..300)
                .map(|i| {
                    // SAFETY: a non-zero size.
                    let p = NonNull::new(unsafe { anyalloc::Global.alloc(l) }).expect("memory");
                    assert_eq!(p.as_ptr() as usize % align, 0, "{size}/{align} aligned");
                    fill(p, size, round.wrapping_add(i as u8));
                    p
                })
                .collect();
            assert_eq!(
                in_use(class),
                before + 300,
                "{size}/{align} is served by the {class}-byte class"
            );
            for (i, &p) in live.iter().enumerate() {
                check(p, size, round.wrapping_add(i as u8));
            }
            for &p in &live {
                // SAFETY: allocated above with `l`, freed once.
                unsafe { anyalloc::Global.dealloc(p.as_ptr(), l) };
            }
            assert_eq!(
                in_use(class),
                before,
                "{size}/{align}: every object came back"
            );
        }
    }
}

/// `free_sized` and `free_nolock_sized` take every kind of block back,
/// whatever the layout names: the layout it was allocated with (the fast
/// arms), or one that names another class, a large block for an object, or
/// an object for a large block (the layout-blind path). Counts come back to
/// where they were, and the memory is handed out again intact.
#[test]
fn sized_frees_take_every_block_back_whatever_the_layout_names() {
    let h = quiet_heap();
    let l = |size: usize, align: usize| Layout::from_size_align(size, align).unwrap();
    // (allocated with, freed with)
    let cases = [
        (l(16, 8), l(16, 8)),
        (l(64, 8), l(64, 8)),
        (l(200, 8), l(200, 8)),
        (l(4096, 8), l(4096, 8)),
        (l(8192, 8), l(8192, 8)),
        (l(12, 4), l(12, 4)),
        (l(12, 8), l(12, 8)),
        (l(100, 64), l(100, 64)),
        (l(16 << 10, 8), l(16 << 10, 8)),
        (l(64 << 10, 8), l(64 << 10, 8)),
        (l(1 << 20, 4096), l(1 << 20, 4096)),
        (l(64, 8), l(128, 8)),
        (l(64, 8), l(64 << 10, 8)),
        (l(16 << 10, 8), l(64, 8)),
        (l(8192, 8), l(16, 8)),
    ];
    let before = h.stats();
    for nolock in [false, true] {
        for (round, &(alloc_l, free_l)) in cases.iter().enumerate() {
            let seed = round as u8 + 1;
            let live: Vec<NonNull<u8>> = (0..40)
                .map(|_| {
                    let p = h.alloc(alloc_l).expect("memory");
                    assert_eq!(p.as_ptr() as usize % alloc_l.align(), 0);
                    fill(p, alloc_l.size(), seed);
                    p
                })
                .collect();
            for &p in &live {
                check(p, alloc_l.size(), seed);
                // SAFETY: allocated above from `h`, freed once.
                unsafe {
                    if nolock {
                        h.free_nolock_sized(p, free_l)
                    } else {
                        h.free_sized(p, free_l)
                    }
                };
            }
            let s = h.stats();
            assert_eq!(
                (s.objects_in_use, s.large_in_use, s.huge_in_use),
                (
                    before.objects_in_use,
                    before.large_in_use,
                    before.huge_in_use
                ),
                "{alloc_l:?} freed as {free_l:?} (nolock: {nolock}): every block came back"
            );
        }
    }
    assert_eq!(before.objects_in_use, 0);
    h.drain();
    let p = h.pages().stats();
    assert_eq!(p.free_pages, p.total_pages, "no page lost");
    h.pages().check_invariants().unwrap();
}

/// A heap over a region whose start is not page-aligned (64 bytes past a
/// page boundary): the metadata moves up to the next page, so every cache
/// is aligned as its type requires (a debug build checks each reference),
/// and objects of every class come and go.
#[test]
fn heap_from_a_region_that_starts_off_a_page_boundary() {
    struct OneCpu;
    impl anyalloc::Platform for OneCpu {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            1
        }
    }
    static PLATFORM: OneCpu = OneCpu;
    let len = 16 << 20;
    let buf: &'static mut [u8] = Box::leak(vec![0u8; len + 2 * PAGE_SIZE].into_boxed_slice());
    let page = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
    let region = NonNull::new((page + 64) as *mut u8).unwrap();
    // SAFETY: the region lies inside the leaked buffer, which nothing else
    // uses and which is never freed.
    let heap = unsafe { Heap::from_region(region, len, &PLATFORM, Config::default()) }.unwrap();
    let mut held = Vec::new();
    for size in (8..=8192).step_by(40) {
        let l = Layout::from_size_align(size, 8).unwrap();
        held.push(heap.alloc(l).unwrap());
        held.push(heap.alloc_nolock(l).unwrap());
    }
    let s = heap.stats();
    assert_eq!(s.objects_in_use + s.large_in_use, held.len(), "{s:?}");
    for p in held {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    let s = heap.stats();
    assert_eq!((s.objects_in_use, s.large_in_use), (0, 0), "{s:?}");
}

/// `from_region` checks the CPU count it would build slot sets for, from
/// the configuration or from the platform, as `Heap::new` does: a count
/// above `MAX_CPUS` is a clear error, not per-CPU metadata whose size
/// overflows (it used to pass the fit check and write past the region).
/// A region whose end wraps the address space is named as such.
#[test]
fn from_region_rejects_cpu_counts_above_the_maximum() {
    struct Many;
    impl anyalloc::Platform for Many {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            usize::MAX / 2
        }
    }
    static MANY: Many = Many;
    let len = 16 << 20;
    let buf: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
    let region = NonNull::new(buf.as_mut_ptr()).unwrap();
    for cpus in [anyalloc::MAX_CPUS + 1, 5000, usize::MAX / 2] {
        let config = Config::default().cpus(cpus);
        // SAFETY: the leaked buffer is ours alone; every call fails before
        // touching it.
        let pages = unsafe { PageAllocator::from_region(region, len, &MANY, config) };
        let heap = unsafe { Heap::from_region(region, len, &MANY, config) };
        for e in [pages.err(), heap.err()] {
            assert_eq!(
                e,
                Some(Error::Config {
                    setting: "Config::cpus",
                    value: cpus,
                    reason: "at most 4096 CPUs are supported",
                })
            );
        }
    }
    // The platform's count, when the configuration leaves it open.
    // SAFETY: as above.
    let pages = unsafe { PageAllocator::from_region(region, len, &MANY, Config::default()) };
    let heap = unsafe { Heap::from_region(region, len, &MANY, Config::default()) };
    for e in [pages.err(), heap.err()] {
        let e = e.expect("refused");
        assert!(
            matches!(e, Error::Config { setting: "Platform::cpu_count", value, .. } if value == usize::MAX / 2),
            "{e}"
        );
        assert!(
            e.to_string().contains("set Config::cpus to use fewer"),
            "{e}"
        );
    }
    // With Config::cpus set, the platform's count does not matter.
    // SAFETY: as above; the allocator is dropped before the next use.
    let ok = unsafe { Heap::from_region(region, len, &MANY, Config::default().cpus(2)) };
    assert!(ok.is_ok(), "{:?}", ok.err());
    drop(ok);
    // A region whose end wraps: both constructors name it.
    let high = NonNull::new((usize::MAX - 4095) as *mut u8).unwrap();
    let wraps = Error::Region {
        len: 1 << 20,
        reason: "the region wraps around the address space",
    };
    // SAFETY: refused before the region is touched.
    let pages =
        unsafe { PageAllocator::from_region(high, 1 << 20, &MANY, Config::default().cpus(1)) };
    let heap = unsafe { Heap::from_region(high, 1 << 20, &MANY, Config::default().cpus(1)) };
    assert_eq!(pages.err(), Some(wraps.clone()));
    assert_eq!(heap.err(), Some(wraps));
}

/// `Heap::from_region` refusing a region names the region the caller
/// passed: a region whose metadata fit but whose remaining pages did not
/// was reported with the length of that remainder ("unusable memory region
/// of 49152 bytes" for a region of 3.2 MB).
#[test]
fn a_heap_region_too_small_for_its_pages_is_reported_with_its_own_length() {
    struct OneCpu;
    impl anyalloc::Platform for OneCpu {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            1
        }
    }
    static PLATFORM: OneCpu = OneCpu;
    let max = 16 << 20;
    let buf: &'static mut [u8] = Box::leak(vec![0u8; max + PAGE_SIZE].into_boxed_slice());
    let page = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
    let region = NonNull::new(page as *mut u8).unwrap();
    let mut reasons = Vec::new();
    let mut len = PAGE_SIZE;
    loop {
        assert!(len <= max, "no region up to {max} bytes holds a heap");
        // SAFETY: the region lies inside the leaked buffer, which nothing
        // else uses and which is never freed.
        match unsafe { Heap::from_region(region, len, &PLATFORM, Config::default()) } {
            Ok(_) => break,
            Err(Error::Region { len: named, reason }) => {
                assert_eq!(named, len, "{reason}");
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
            Err(e) => panic!("{e}"),
        }
        len += PAGE_SIZE;
    }
    // Both refusals were seen: no room for the metadata, then no room for
    // 16 pages after it.
    assert_eq!(reasons.len(), 2, "{reasons:?}");
}

/// Dropping a heap that has accounted blocks walks its zones' blocks to
/// uncharge them; a zone's untouched largest blocks hold no block and
/// are skipped, as `Heap::stats` skips them. The walk used to read them
/// one descriptor per page: for a 64 GiB zone, 16 Mi descriptors (512 MiB
/// of untouched metadata, 131072 page faults, about 180 ms) for one
/// accounted object.
#[test]
fn dropping_a_big_accounted_heap_skips_its_untouched_blocks() {
    fn minor_faults() -> i64 {
        // SAFETY: a zeroed rusage is valid; getrusage only writes it.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid rusage to fill, for this thread.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        u.ru_minflt
    }
    let g = anyalloc::Group::new("big", None, None);
    let h = Heap::new(Config::default().memory(64 << 30).maintenance(false)).unwrap();
    let p = h.alloc_in(Layout::new::<u64>(), &g).unwrap();
    assert!(g.usage() > 0, "charged");
    let before = minor_faults();
    drop(h);
    let faults = minor_faults() - before;
    assert!(
        faults < 4096,
        "dropping the heap took {faults} page faults (reading untouched descriptors)"
    );
    assert_eq!(g.usage(), 0, "uncharged at drop");
    let _ = p;
}

/// Safe code can leave nolock scopes open for good (`mem::forget` of the
/// guard). At 65,535 open scopes the count saturates and stays: the thread
/// keeps taking the nolock route, as it did inside the first of them. (It
/// used to wrap round to "no scope" at 65,536, sending the thread back to
/// the normal route, which can wait; debug builds panicked on the
/// overflow.)
#[test]
fn forgotten_nolock_scopes_never_wrap_round_to_none() {
    std::thread::spawn(|| {
        for _ in 0..70_000 {
            std::mem::forget(anyalloc::nolock_scope());
            assert!(anyalloc::in_nolock_scope());
        }
        // A guard opened and dropped at the limit leaves the scopes open.
        drop(anyalloc::nolock_scope());
        assert!(anyalloc::in_nolock_scope(), "the scope count wrapped round");
        // Allocation still works there.
        let b = Box::new([7u8; 100]);
        assert_eq!(b[99], 7);
    })
    .join()
    .unwrap();
}

/// `Platform::cpu_count` is read once when a heap is made over a region,
/// as its documentation says: a platform whose count changes between calls
/// (CPUs brought online meanwhile; the freestanding example's count comes
/// from the thread's affinity mask) gets a heap whose metadata and page
/// allocator agree on one count. (`Heap::from_region` read it twice: the
/// heap's metadata was laid out for the first count and the page allocator
/// got the second, so a larger second count made the caches' per-CPU slots
/// and sheaves run past the metadata into the zone's pages, where they were
/// handed out as memory and overwritten.)
#[test]
fn a_region_heap_reads_the_cpu_count_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Hotplug;
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    impl anyalloc::Platform for Hotplug {
        fn cpu_id(&self) -> usize {
            0
        }
        fn cpu_count(&self) -> usize {
            // One CPU at the first call, 64 at every later one.
            if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
                1
            } else {
                64
            }
        }
    }
    static PLATFORM: Hotplug = Hotplug;
    let len = 32 << 20;
    let buf: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
    let region = NonNull::new(buf.as_mut_ptr()).unwrap();
    // SAFETY: the region is the leaked buffer, which nothing else uses and
    // which is never freed.
    let heap = unsafe { Heap::from_region(region, len, &PLATFORM, Config::default()) }.unwrap();
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        1,
        "cpu_count read more than once"
    );
    assert_eq!(
        heap.pages().cpus(),
        1,
        "the page allocator's count is not the heap's"
    );
    // Every page handed out is overwritten: nothing of the heap lives there.
    let pages = heap.pages();
    let mut held = Vec::new();
    while let Some(p) = pages.alloc_pages(0) {
        fill(p, PAGE_SIZE, 0xa5);
        held.push(p);
    }
    for p in held {
        // SAFETY: allocated above with order 0, freed once.
        unsafe { pages.free_pages(p, 0) };
    }
    let mut objs = Vec::new();
    for size in (8..=8192).step_by(40) {
        let l = Layout::from_size_align(size, 8).unwrap();
        for p in [heap.alloc(l).unwrap(), heap.alloc_nolock(l).unwrap()] {
            fill(p, size, size as u8);
            objs.push((p, size));
        }
    }
    for (p, size) in objs {
        check(p, size, size as u8);
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    let s = heap.stats();
    assert_eq!((s.objects_in_use, s.large_in_use), (0, 0), "{s:?}");
}
