//! Blocks that cross allocation APIs, threads and contexts, under a nested
//! signal storm: every block is allocated through one way in and freed
//! through another that accepts it, by whichever thread or signal handler
//! finds it first, while the threads that allocated some of them have
//! exited. The ways in are a `Heap`'s `alloc`, `alloc_nolock`, `alloc_in`
//! and `alloc_nolock_in` (a group), its page allocator's `alloc_pages` and
//! `alloc_pages_nolock`, and the global heap through `Global` and `NoLock`;
//! the ways out are `free`, `free_nolock`, `free_sized`,
//! `free_nolock_sized`, `free_pages`, `free_pages_nolock`, `Global`'s
//! `dealloc` and `NoLock`'s two (`GlobalAlloc` and `Allocator`). Every block
//! carries its owner's pattern, checked before its free; at the end the
//! group's usage is 0, both heaps count no live block, and the heap's
//! pages are all free again. Run with glibc's rseq on and off.

mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use allocator_api2::alloc::Allocator;
use anyalloc::{Config, Global, Group, Heap, NoLock, PAGE_SIZE};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::{
    inside, install_handler, mix64, storm_signals, HandlerEntry, Stash, StormCounts, ThreadTimer,
};

static HEAP: OnceLock<Heap> = OnceLock::new();
static GROUP: OnceLock<Arc<Group>> = OnceLock::new();
static STASH: Stash<1024> = Stash::new();
static RNG: AtomicU64 = AtomicU64::new(1);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static COUNTS: StormCounts = StormCounts::new();
/// Blocks allocated, and freed, per way in (`Way as usize`).
static ALLOCATED: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static FREED: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static RUNNING: AtomicBool = AtomicBool::new(true);

/// How a block came in: the entry's kind (three bits).
#[derive(Clone, Copy, Debug)]
enum Way {
    Alloc = 0,
    AllocNolock = 1,
    AllocIn = 2,
    AllocNolockIn = 3,
    Pages = 4,
    PagesNolock = 5,
    Global = 6,
    NoLock = 7,
}

const WAYS: [Way; 8] = [
    Way::Alloc,
    Way::AllocNolock,
    Way::AllocIn,
    Way::AllocNolockIn,
    Way::Pages,
    Way::PagesNolock,
    Way::Global,
    Way::NoLock,
];

/// A block's size from a random word: across the small classes, the
/// large blocks and (rarely) 4 MiB; a page block's is a whole order
/// (0 to 4). At least 8 bytes (the pattern's header).
fn size_for(way: Way, r: u64) -> usize {
    match way {
        Way::Pages | Way::PagesNolock => PAGE_SIZE << (r % 5),
        _ => match r % 16 {
            0..=10 => 8 + (r >> 8) as usize % 1000,
            11..=13 => 1000 + (r >> 8) as usize % 9000,
            14 => 9000 + (r >> 8) as usize % 300_000,
            _ => [PAGE_SIZE, 64 << 10, 1 << 20, 4 << 20][(r >> 8) as usize % 4],
        },
    }
}

/// The layout a block of `size` bytes was allocated with: its alignment
/// follows from its size, so that a sized free can name it again.
fn layout_of(size: usize) -> Layout {
    Layout::from_size_align(size, 8 << (size % 5)).unwrap()
}

/// Allocates a block the way `way` says, fills it with a fresh owner
/// pattern, and returns its entry (`None`: no memory in this context).
fn allocate(way: Way, r: u64) -> Option<usize> {
    let heap = HEAP.get()?;
    let group = GROUP.get()?;
    let size = size_for(way, r);
    let l = layout_of(size);
    let p = match way {
        Way::Alloc => heap.alloc(l),
        Way::AllocNolock => heap.alloc_nolock(l),
        Way::AllocIn => heap.alloc_in(l, group),
        Way::AllocNolockIn => heap.alloc_nolock_in(l, group),
        Way::Pages => heap
            .pages()
            .alloc_pages((size / PAGE_SIZE).trailing_zeros()),
        Way::PagesNolock => heap
            .pages()
            .alloc_pages_nolock((size / PAGE_SIZE).trailing_zeros()),
        // SAFETY: a non-zero layout.
        Way::Global => NonNull::new(unsafe { Global.alloc(l) }),
        Way::NoLock => NoLock.allocate(l).ok().map(|p| p.cast::<u8>()),
    }?;
    ALLOCATED[way as usize].fetch_add(1, Relaxed);
    let e = Entry::fresh(p.as_ptr() as usize, way as usize);
    // SAFETY: a fresh block of at least `size` bytes.
    unsafe { pattern::fill(e, size) };
    Some(e.0)
}

/// Checks a block's pattern and frees it through a way out, chosen by
/// `r`, among those its way in allows.
///
/// # Safety
/// The caller owns the block of entry `e`, filled by `allocate`.
unsafe fn release(e: usize, r: u64) {
    let heap = HEAP.get().unwrap();
    let e = Entry(e);
    // SAFETY: per the caller.
    let size = match unsafe { pattern::verify(e) } {
        Ok(size) => size,
        Err(_) => {
            VIOLATIONS.fetch_add(1, Relaxed);
            return; // damaged: leave it (the test fails)
        }
    };
    let way = WAYS[e.kind()];
    let p = NonNull::new(e.ptr()).unwrap();
    let l = layout_of(size);
    // SAFETY: per the caller, a live block of `way` with layout `l`
    // (and for a page block, the order its size names), freed once.
    unsafe {
        match way {
            Way::Pages | Way::PagesNolock => {
                let order = (size / PAGE_SIZE).trailing_zeros();
                if r.is_multiple_of(2) {
                    heap.pages().free_pages(p, order)
                } else {
                    heap.pages().free_pages_nolock(p, order)
                }
            }
            Way::Global | Way::NoLock => match r % 3 {
                0 => Global.dealloc(p.as_ptr(), l),
                1 => GlobalAlloc::dealloc(&NoLock, p.as_ptr(), l),
                _ => NoLock.deallocate(p, l),
            },
            _ => match r % 4 {
                0 => heap.free(p),
                1 => heap.free_nolock(p),
                2 => heap.free_sized(p, l),
                _ => heap.free_nolock_sized(p, l),
            },
        }
    }
    FREED[way as usize].fetch_add(1, Relaxed);
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let entry = HandlerEntry::enter();
    if !RUNNING.load(Relaxed) {
        return;
    }
    COUNTS.record(&entry);
    let r = mix64(RNG.fetch_add(1, Relaxed));
    for k in 0..4u64 {
        let r = mix64(r ^ k);
        if r.is_multiple_of(2) {
            if let Some(e) = STASH.take(r as usize) {
                // SAFETY: taken out of the stash: ours.
                unsafe { release(e, r >> 32) };
            }
        } else if let Some(e) = allocate(WAYS[(r >> 4) as usize % 8], r >> 8) {
            if !STASH.put(e, r as usize) {
                // SAFETY: not stashed: still ours.
                unsafe { release(e, r >> 40) };
            }
        }
    }
}

/// A worker: allocates, frees and trades blocks through the stash for
/// `run`, under two per-thread timers, and leaves blocks in the stash when
/// it exits (for other threads and handlers to free).
fn worker(seed: u64, run: Duration) {
    let [sa, sb] = storm_signals();
    let _ta = ThreadTimer::start(sa, Duration::from_micros(100), 0).expect("timer A");
    let _tb = ThreadTimer::start(sb, Duration::from_micros(330), 0).expect("timer B");
    let mut held: Vec<usize> = Vec::new();
    let mut r = seed;
    let start = Instant::now();
    while start.elapsed() < run {
        r = mix64(r);
        match r % 8 {
            0..=2 if held.len() < 300 => {
                if let Some(e) = inside(|| allocate(WAYS[(r >> 4) as usize % 8], r >> 8)) {
                    held.push(e);
                }
            }
            3 if !held.is_empty() => {
                // Trade: stash one of ours, take whatever is there.
                let e = held.swap_remove((r >> 8) as usize % held.len());
                let got = STASH.swap((r >> 20) as usize, e);
                if got != 0 {
                    held.push(got);
                }
            }
            _ if !held.is_empty() => {
                let e = held.swap_remove((r >> 8) as usize % held.len());
                // SAFETY: ours.
                inside(|| unsafe { release(e, r >> 32) });
            }
            _ => {}
        }
    }
    // Half of what is left goes to the stash, for others to free after
    // this thread is gone; the rest is freed here.
    for (i, e) in held.into_iter().enumerate() {
        if i % 2 == 1 || !STASH.put(e, i) {
            // SAFETY: ours.
            unsafe { release(e, i as u64) };
        }
    }
}

#[test]
fn blocks_cross_every_way_in_and_out_under_a_signal_storm() {
    const NAME: &str = "blocks_cross_every_way_in_and_out_under_a_signal_storm";
    if !watchdog::in_child() {
        // No maintainer for the global heap: a pass moving objects between
        // sheaves and slabs would put its hands' objects in the counts.
        const QUIET: (&str, &str) = ("ANYALLOC_MAINTENANCE", "0");
        for env in [&[QUIET][..], &[QUIET, watchdog::RSEQ_OFF][..]] {
            let out = watchdog::run_ok(
                NAME,
                env,
                Duration::from_secs(120),
                "blocks crossing APIs under a signal storm",
            );
            print!("{env:?}: {}", out.stdout);
        }
        return;
    }
    let global = anyalloc::init().unwrap();
    global.drain();
    let global_base = (
        global.stats().objects_in_use,
        global.stats().large_in_use,
        global.stats().huge_in_use,
    );
    let heap = HEAP
        .get_or_init(|| Heap::new(Config::default().memory(256 << 20).maintenance(false)).unwrap());
    let group = GROUP.get_or_init(|| Group::new("crossing", None, None));
    let [sa, sb] = storm_signals();
    install_handler(sa, handler, &[]).expect("sigaction A");
    install_handler(sb, handler, &[]).expect("sigaction B");
    // Two workers at a time, each living a quarter of a second: threads
    // exit while blocks they allocated are still live elsewhere.
    for round in 0..6u64 {
        let a = std::thread::spawn(move || worker(2 * round + 1, Duration::from_millis(250)));
        let b = std::thread::spawn(move || worker(2 * round + 2, Duration::from_millis(250)));
        a.join().unwrap();
        b.join().unwrap();
    }
    RUNNING.store(false, Relaxed);
    for e in STASH.drain().collect::<Vec<_>>() {
        // SAFETY: no handler runs any more: every stashed block is ours.
        unsafe { release(e, e as u64 >> 4) };
    }
    let counts: Vec<(u64, u64)> = (0..8)
        .map(|i| (ALLOCATED[i].load(Relaxed), FREED[i].load(Relaxed)))
        .collect();
    println!(
        "signals {}, nested {}, inside an allocator call {}; allocated/freed per way {:?}",
        COUNTS.signals(),
        COUNTS.nested(),
        COUNTS.inside(),
        WAYS.iter().zip(&counts).collect::<Vec<_>>()
    );
    assert_eq!(VIOLATIONS.load(Relaxed), 0, "damaged blocks");
    for (way, &(allocated, freed)) in WAYS.iter().zip(&counts) {
        assert!(allocated > 0, "{way:?} never served");
        assert_eq!(allocated, freed, "{way:?}");
    }
    COUNTS.assert_storm();
    assert_eq!(group.usage(), 0, "the group is still charged");
    heap.drain();
    let s = heap.stats();
    assert_eq!(
        (s.objects_in_use, s.large_in_use, s.huge_in_use),
        (0, 0, 0),
        "the heap counts live blocks"
    );
    assert_eq!(
        s.pages.free_pages, s.pages.total_pages,
        "pages still in use"
    );
    global.drain();
    let g = global.stats();
    assert_eq!(
        (g.objects_in_use, g.large_in_use, g.huge_in_use),
        global_base,
        "the global heap counts live blocks"
    );
}

/// Sizes at and around every class and page-block boundary (and 0).
const BOUNDARY_SIZES: &[usize] = &[
    0,
    1,
    7,
    8,
    9,
    15,
    16,
    17,
    24,
    31,
    32,
    33,
    48,
    63,
    64,
    65,
    96,
    127,
    128,
    129,
    255,
    256,
    257,
    511,
    512,
    513,
    1023,
    1024,
    1025,
    2047,
    2048,
    2049,
    4095,
    4096,
    4097,
    8191,
    8192,
    8193,
    16383,
    16384,
    16385,
    65535,
    65536,
    65537,
    1 << 20,
    (1 << 20) + 1,
    4 << 20,
    (4 << 20) + 1,
];

/// Every way into a `Heap` against every way out, one block at a time, at
/// every boundary size and alignments from 1 to 2 MiB, with glibc's rseq
/// fast path on and off: each block is aligned, its whole usable size
/// writable, and after its free (a sized free told the right layout, or
/// one of another class) the heap counts no live block and the group no
/// charge; at the end every page is free and the group's references are
/// gone with the heap.
#[test]
fn every_way_in_against_every_way_out_at_every_boundary() {
    // In a child of its own: the storm above forks (its children), and
    // during another thread's fork a nolock call may be refused and a
    // nolock free parks its block, which the exact counts below would see.
    const NAME: &str = "every_way_in_against_every_way_out_at_every_boundary";
    if !watchdog::in_child() {
        watchdog::run_ok(NAME, &[], Duration::from_secs(120), NAME);
        return;
    }
    #[derive(Clone, Copy, Debug)]
    enum In {
        Alloc,
        Nolock,
        Group,
        NolockGroup,
    }
    #[derive(Clone, Copy, Debug)]
    enum Out {
        Free,
        Nolock,
        Sized,
        NolockSized,
        SizedWrong,
        NolockSizedWrong,
    }
    for rseq in [true, false] {
        let h = Heap::new(
            Config::default()
                .memory(64 << 20)
                .cpus(2)
                .maintenance(false)
                .rseq(rseq),
        )
        .unwrap();
        let g = Group::new("matrix", None, None);
        for align in [1usize, 8, 16, 64, 4096, 8192, 1 << 16, 1 << 21] {
            for &size in BOUNDARY_SIZES {
                let l = Layout::from_size_align(size, align).unwrap();
                // A layout of another class: half the size, or triple.
                let wrong =
                    Layout::from_size_align(if size > 8 { size / 2 } else { size * 3 }, 1).unwrap();
                for way_in in [In::Alloc, In::Nolock, In::Group, In::NolockGroup] {
                    for way_out in [
                        Out::Free,
                        Out::Nolock,
                        Out::Sized,
                        Out::NolockSized,
                        Out::SizedWrong,
                        Out::NolockSizedWrong,
                    ] {
                        let p = match way_in {
                            In::Alloc => h.alloc(l),
                            In::Nolock => h.alloc_nolock(l),
                            In::Group => h.alloc_in(l, &g),
                            In::NolockGroup => h.alloc_nolock_in(l, &g),
                        };
                        let what = format!("{way_in:?} -> {way_out:?}, {l:?}, rseq {rseq}");
                        let Some(p) = p else {
                            // Only the nolock path may refuse: above 4 MiB
                            // of block.
                            assert!(
                                matches!(way_in, In::Nolock | In::NolockGroup)
                                    && size.max(align) > 4 << 20,
                                "{what}: refused"
                            );
                            continue;
                        };
                        assert_eq!(p.as_ptr() as usize % align, 0, "{what}");
                        let usable = h.usable_size(p);
                        assert!(usable >= size, "{what}: usable {usable}");
                        if matches!(way_in, In::Group | In::NolockGroup) {
                            assert_eq!(g.usage(), usable, "{what}: charged");
                        }
                        // SAFETY: `usable` bytes of a live block, freed once
                        // below.
                        unsafe {
                            p.as_ptr().write_bytes(0x5a, usable);
                            match way_out {
                                Out::Free => h.free(p),
                                Out::Nolock => h.free_nolock(p),
                                Out::Sized => h.free_sized(p, l),
                                Out::NolockSized => h.free_nolock_sized(p, l),
                                Out::SizedWrong => h.free_sized(p, wrong),
                                Out::NolockSizedWrong => h.free_nolock_sized(p, wrong),
                            }
                        }
                        assert_eq!(g.usage(), 0, "{what}: still charged");
                        let s = h.stats();
                        assert_eq!(
                            (s.objects_in_use, s.large_in_use, s.huge_in_use),
                            (0, 0, 0),
                            "{what}: live blocks counted"
                        );
                    }
                }
            }
        }
        h.drain();
        h.trim();
        let s = h.stats();
        assert_eq!(s.pages.free_pages, s.pages.total_pages, "rseq {rseq}");
        drop(h);
        assert_eq!(Arc::strong_count(&g), 1, "references to the group left");
    }
}
