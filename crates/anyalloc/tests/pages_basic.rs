//! Basic behaviour of the page allocator: both paths, conservation, errors.

mod proc_self;

use anyalloc::{Config, Error, PageAllocator, MAX_ORDER, PAGE_SIZE};

fn small() -> PageAllocator {
    PageAllocator::new(Config::default().memory(16 << 20).cpus(2).grow(false)).unwrap()
}

#[test]
fn every_order_round_trips_and_everything_comes_back() {
    let pa = small();
    let total = pa.stats().total_pages;
    assert_eq!(total, 4096);
    let mut held = Vec::new();
    for order in 0..=MAX_ORDER {
        let p = pa.alloc_pages(order).expect("normal alloc");
        assert_eq!(
            p.as_ptr() as usize % (PAGE_SIZE << order),
            0,
            "aligned to its size"
        );
        held.push((p, order));
    }
    // The normal allocations above took half the zone: the nolock path
    // serves the small orders and the large ones up to what is left.
    for order in 0..MAX_ORDER {
        held.push((pa.alloc_pages_nolock(order).expect("nolock alloc"), order));
    }
    // No two blocks overlap.
    let mut ranges: Vec<(usize, usize)> = held
        .iter()
        .map(|(p, o)| {
            (
                p.as_ptr() as usize,
                (p.as_ptr() as usize) + (PAGE_SIZE << o),
            )
        })
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "blocks overlap: {w:?}");
    }
    for (i, (p, o)) in held.into_iter().enumerate() {
        // SAFETY: each block was allocated above with this order.
        unsafe {
            if i % 2 == 0 {
                pa.free_pages(p, o)
            } else {
                pa.free_pages_nolock(p, o)
            }
        }
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    assert_eq!(
        s.buddy_pages, s.total_pages,
        "drain returns everything to the buddy lists"
    );
    pa.check_invariants().unwrap();
    // Fully coalesced: every 4 MiB block can be allocated again.
    let a = pa.alloc_pages(MAX_ORDER).unwrap();
    let b = pa.alloc_pages(MAX_ORDER);
    assert!(b.is_some());
    // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
    unsafe {
        pa.free_pages(a, MAX_ORDER);
        pa.free_pages(b.unwrap(), MAX_ORDER);
    }
}

#[test]
fn out_of_range_orders_are_refused() {
    let pa = small();
    assert!(pa.alloc_pages(MAX_ORDER + 1).is_none());
    assert!(pa.alloc_pages_nolock(MAX_ORDER + 1).is_none());
    assert!(pa.alloc_pages_nolock(u32::MAX).is_none());
}

#[test]
fn configuration_errors_name_the_setting() {
    let e = PageAllocator::new(Config::default().memory(4096)).unwrap_err();
    assert!(matches!(
        e,
        Error::Config {
            setting: "Config::memory",
            value: 4096,
            ..
        }
    ));
    assert!(e.to_string().contains("Config::memory = 4096"), "{e}");
    let e = PageAllocator::new(Config::default().cpus(0)).unwrap_err();
    assert!(e.to_string().contains("Config::cpus = 0"), "{e}");
}

#[test]
fn exhaustion_without_growth_fails_and_nolock_keeps_the_reserve() {
    let pa = PageAllocator::new(Config::default().memory(1 << 20).cpus(1).grow(false)).unwrap();
    let mut held = Vec::new();
    while let Some(p) = pa.alloc_pages_nolock(0) {
        held.push(p);
    }
    let s = pa.stats();
    assert!(s.nolock_alloc_fail_empty >= 1);
    assert!(s.free_pages > 0, "nolock stops at the min watermark");
    while let Some(p) = pa.alloc_pages(0) {
        held.push(p);
    }
    assert_eq!(
        pa.stats().free_pages,
        0,
        "normal path may use the reserve last"
    );
    for p in held {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { pa.free_pages(p, 0) };
    }
    pa.drain();
    assert_eq!(pa.stats().free_pages, 256);
}

#[test]
fn growth_adds_zones_on_the_normal_path_only() {
    let pa = PageAllocator::new(Config::default().memory(1 << 20).cpus(1)).unwrap();
    let mut held = Vec::new();
    for _ in 0..600 {
        held.push(pa.alloc_pages(0).expect("grows"));
    }
    assert!(pa.stats().zones >= 2);
    for p in held {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { pa.free_pages_nolock(p, 0) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    pa.check_invariants().unwrap();
}

/// A zone's descriptors (32 bytes per page) are written only for the
/// blocks it has handed out so far: creating one of 64 GiB used to free
/// every 4 MiB block into the buddy lists, writing one descriptor page in
/// eight (64 MiB) and taking tens of milliseconds. Its untouched blocks
/// are carved on demand, and every page still comes back.
#[test]
fn creating_a_big_allocator_touches_little_memory() {
    let before = proc_self::rss_bytes() >> 10;
    let pa = PageAllocator::new(Config::default().memory(64 << 30).grow(false)).unwrap();
    let after = proc_self::rss_bytes() >> 10;
    assert_eq!(pa.stats().total_pages, 64 << 18);
    assert_eq!(pa.stats().free_pages, 64 << 18);
    assert!(
        after.saturating_sub(before) < 4096,
        "64 GiB allocator touched {} KiB",
        after - before
    );
    pa.check_invariants().unwrap();
    // Blocks of every order, and many of the largest, carved from the
    // untouched part in turn; no two overlap.
    let mut held = Vec::new();
    for order in (0..=MAX_ORDER).chain([MAX_ORDER; 100]) {
        held.push((pa.alloc_pages(order).expect("memory to spare"), order));
    }
    for order in 0..=MAX_ORDER {
        held.push((pa.alloc_pages_nolock(order).expect("nolock too"), order));
    }
    let mut ranges: Vec<(usize, usize)> = held
        .iter()
        .map(|&(p, o)| (p.as_ptr() as usize, p.as_ptr() as usize + (PAGE_SIZE << o)))
        .collect();
    ranges.sort();
    assert!(
        ranges.windows(2).all(|w| w[0].1 <= w[1].0),
        "blocks overlap"
    );
    pa.check_invariants().unwrap();
    for (p, order) in held {
        // SAFETY: allocated above with this order, freed once.
        unsafe { pa.free_pages(p, order) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    pa.check_invariants().unwrap();
}

/// A zone made of a partial largest block at each end and untouched
/// largest blocks between (a region that does not start or end on a 4 MiB
/// boundary): every page can be allocated, once, and comes back.
#[test]
fn an_unaligned_region_is_used_to_its_last_page() {
    use std::ptr::NonNull;
    const MIB: usize = 1 << 20;
    // 4 MiB-aligned backing; the region starts 1 MiB + 3 pages in.
    let layout = std::alloc::Layout::from_size_align(32 * MIB, 4 * MIB).unwrap();
    // SAFETY: a non-zero size.
    let base = unsafe { std::alloc::alloc(layout) };
    assert!(!base.is_null());
    let start = MIB + 3 * PAGE_SIZE;
    let len = 22 * MIB + 5 * PAGE_SIZE;
    // SAFETY: the region lies inside the block just allocated, which
    // outlives the allocator (freed at the end) and nothing else uses.
    let pa = unsafe {
        PageAllocator::from_region(
            NonNull::new(base.add(start)).unwrap(),
            len,
            anyalloc::StdPlatform::get(),
            Config::default().cpus(1).min_reserve(0),
        )
    }
    .unwrap();
    let total = pa.stats().total_pages;
    pa.check_invariants().unwrap();
    let mut held = Vec::new();
    for order in (0..=MAX_ORDER).rev() {
        while let Some(p) = pa.alloc_pages(order) {
            held.push((p, order));
        }
    }
    let got: usize = held.iter().map(|&(_, o)| 1usize << o).sum();
    assert_eq!(got, total, "every page handed out");
    let mut ranges: Vec<(usize, usize)> = held
        .iter()
        .map(|&(p, o)| (p.as_ptr() as usize, p.as_ptr() as usize + (PAGE_SIZE << o)))
        .collect();
    ranges.sort();
    assert!(
        ranges.windows(2).all(|w| w[0].1 <= w[1].0),
        "blocks overlap"
    );
    for (p, order) in held {
        // SAFETY: allocated above with this order, freed once.
        unsafe { pa.free_pages(p, order) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    pa.check_invariants().unwrap();
    drop(pa);
    // SAFETY: allocated above with `layout`; the allocator is gone.
    unsafe { std::alloc::dealloc(base, layout) };
}

/// A region that starts past a 4 MiB boundary and ends before the next
/// one has no untouched largest block: the (empty) untouched part then
/// sits at its end, off a 4 MiB boundary, and the zone is still
/// consistent (the invariant check used to report "the untouched part's
/// bound is wrong" for it).
#[test]
fn a_region_inside_one_largest_block_checks_clean() {
    use std::ptr::NonNull;
    const MIB: usize = 1 << 20;
    let layout = std::alloc::Layout::from_size_align(4 * MIB, 4 * MIB).unwrap();
    // SAFETY: a non-zero size.
    let base = unsafe { std::alloc::alloc(layout) };
    assert!(!base.is_null());
    // SAFETY: the region (1 MiB in, 2 MiB long) lies inside the block just
    // allocated, which outlives the allocator and nothing else uses.
    let pa = unsafe {
        PageAllocator::from_region(
            NonNull::new(base.add(MIB)).unwrap(),
            2 * MIB,
            anyalloc::StdPlatform::get(),
            Config::default().cpus(1).min_reserve(0),
        )
    }
    .unwrap();
    pa.check_invariants().unwrap();
    let p = pa.alloc_pages(0).expect("memory");
    // SAFETY: allocated just above with order 0, freed once.
    unsafe { pa.free_pages(p, 0) };
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages);
    pa.check_invariants().unwrap();
    drop(pa);
    // SAFETY: allocated above with `layout`; the allocator is gone.
    unsafe { std::alloc::dealloc(base, layout) };
}

#[test]
fn min_reserve_is_validated_and_kept_from_the_nolock_path() {
    // Bad values name the setting.
    let e = PageAllocator::new(Config::default().memory(16 << 20).min_reserve(8 << 20 | 1))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                setting: "Config::min_reserve",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("Config::min_reserve"), "{e}");
    // A region zone checks it against its own pages.
    let len = 4 << 20;
    let region = std::ptr::NonNull::from(Box::leak(vec![0u8; len].into_boxed_slice())).cast();
    // SAFETY: the leaked region is ours alone and never freed.
    let e = unsafe {
        PageAllocator::from_region(
            region,
            len,
            anyalloc::StdPlatform::get(),
            Config::default().min_reserve(3 << 20),
        )
    }
    .unwrap_err();
    assert!(matches!(
        e,
        Error::Config {
            setting: "Config::min_reserve",
            ..
        }
    ));

    // 16 MiB with a 5 MiB reserve (1280 pages): the nolock path stops at
    // 2816 pages taken, whatever the orders; the normal path goes on.
    let pa = PageAllocator::new(
        Config::default()
            .memory(16 << 20)
            .grow(false)
            .cpus(1)
            .min_reserve(5 << 20),
    )
    .unwrap();
    let total = pa.stats().total_pages;
    let mut held = Vec::new();
    for order in [10, 9, 8, 7, 6, 5, 4, 4, 3, 2, 1, 0]
        .into_iter()
        .cycle()
        .take(200)
    {
        if let Some(p) = pa.alloc_pages_nolock(order) {
            held.push((p, order, true));
        }
    }
    while let Some(p) = pa.alloc_pages_nolock(0) {
        held.push((p, 0, true));
    }
    // Exhausted down to the last page above the reserve, and not one below.
    let s = pa.stats();
    assert_eq!(s.buddy_pages, 1280, "{s:?}");
    assert!(s.nolock_alloc_fail_empty > 0, "{s:?}");
    assert_eq!(s.nolock_alloc_fail_busy, 0, "{s:?}");
    // The normal path reaches into the reserve.
    while let Some(p) = pa.alloc_pages(4) {
        held.push((p, 4, false));
    }
    assert!(pa.stats().buddy_pages < 1280 / 2);
    for (p, order, nolock) in held {
        // SAFETY: allocated above with `order`, freed once.
        unsafe {
            if nolock {
                pa.free_pages_nolock(p, order)
            } else {
                pa.free_pages(p, order)
            }
        }
    }
    pa.drain();
    assert_eq!(pa.stats().buddy_pages, total);
}

/// A thread allowed only some CPUs (taskset, a cpuset) still runs on CPU ids
/// up to the possible count: the default slot count covers them all, so the
/// restartable-sequence fast path is kept wherever the machine offers it.
#[test]
fn a_thread_restricted_to_one_cpu_keeps_the_rseq_fast_path() {
    let unrestricted = PageAllocator::new(Config::default().memory(16 << 20).grow(false))
        .unwrap()
        .stats()
        .fast_path;
    let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let (restricted, cpus) = std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
        // inside it; sched_setaffinity(0) changes only this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(last, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0,
                "could not restrict the thread to CPU {last}"
            );
        }
        let pa = PageAllocator::new(Config::default().memory(16 << 20).grow(false)).unwrap();
        let p = pa.alloc_pages(0).expect("a page");
        // SAFETY: just allocated with order 0.
        unsafe { pa.free_pages(p, 0) };
        (pa.stats().fast_path, pa.cpus())
    })
    .join()
    .unwrap();
    println!("unrestricted {unrestricted:?}; restricted to CPU {last}: {restricted:?} with {cpus} slot sets");
    assert_eq!(
        restricted, unrestricted,
        "restricting the CPUs changed the fast path"
    );
    assert!(cpus > last, "no slot set for CPU {last}");
}

/// Nolock frees beyond the room of this CPU's slot drain it in batches
/// under a tried zone lock, as normal frees do: the per-CPU lists end with
/// at most one slot's room (`high + batch`, at most 112 pages) plus what the
/// normal refills stocked the two handler-level slots with (a batch of each
/// order used, at most 16 pages each: 64 here), instead of filling every
/// level's slot (3 x 112 pages) and then taking the zone lock once per
/// block.
#[test]
fn nolock_frees_past_a_full_slot_drain_it_in_batches() {
    // One CPU slot set: whichever CPU the thread runs on, one level-0 slot.
    let pa = PageAllocator::new(Config::default().memory(64 << 20).cpus(1).grow(false)).unwrap();
    let before = pa.stats().free_pages;
    for order in [0, 3] {
        let blocks: Vec<_> = (0..(1024 >> order))
            .map(|_| pa.alloc_pages(order).unwrap())
            .collect();
        for p in blocks {
            // SAFETY: allocated above with this order, freed once.
            unsafe { pa.free_pages_nolock(p, order) };
        }
        let s = pa.stats();
        assert!(
            s.percpu_pages <= 112 + 64,
            "order {order}: {} pages left on the per-CPU lists",
            s.percpu_pages
        );
        assert_eq!(
            s.deferred_pages, 0,
            "order {order}: nothing had to be parked"
        );
        assert_eq!(s.free_pages, before, "order {order}: every page came back");
    }
    pa.check_invariants().unwrap();
}
