//! What a `no_std` embedder's [`Platform`] and region may be, to the letter
//! of their contract, without breaking the allocator: a region full of
//! garbage, two heaps over adjacent regions, CPU ids at or above the
//! configured count that change at every call.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyalloc::{Config, Heap, Platform, PAGE_SIZE};

/// A page-aligned region of `len` bytes leaked from the process heap,
/// filled with `byte`.
fn region(len: usize, byte: u8) -> NonNull<u8> {
    let buf: &'static mut [u8] = Box::leak(vec![byte; len + PAGE_SIZE].into_boxed_slice());
    let start = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
    NonNull::new(start as *mut u8).unwrap()
}

struct OneCpu;
impl Platform for OneCpu {
    fn cpu_id(&self) -> usize {
        0
    }
    fn cpu_count(&self) -> usize {
        1
    }
}
static ONE: OneCpu = OneCpu;

/// Fills `size` bytes at `p` with a pattern of `tag`.
fn fill(p: NonNull<u8>, size: usize, tag: usize) {
    for i in 0..size {
        // SAFETY: the caller's block of at least `size` bytes.
        unsafe { p.as_ptr().add(i).write((tag ^ i) as u8) };
    }
}

fn intact(p: NonNull<u8>, size: usize, tag: usize) -> bool {
    // SAFETY: as in `fill`.
    (0..size).all(|i| unsafe { p.as_ptr().add(i).read() } == (tag ^ i) as u8)
}

/// Every size class and large sizes, on both paths, from `heap`; every
/// block filled, checked and freed; then all memory is back.
fn churn(heap: &Heap) {
    let mut held = Vec::new();
    for round in 0..3 {
        for size in (8..=64 << 10).step_by(517).chain([1 << 20, 2 << 20]) {
            let l = Layout::from_size_align(size, 8).unwrap();
            let got = if (size + round) % 2 == 0 {
                heap.alloc(l)
            } else {
                heap.alloc_nolock(l)
            };
            let p = got.unwrap_or_else(|| panic!("no block of {size} bytes"));
            fill(p, size, held.len());
            held.push((p, size));
        }
        for (i, &(p, size)) in held.iter().enumerate() {
            assert!(intact(p, size, i), "block {i} of {size} bytes overwritten");
        }
        for (i, (p, _)) in held.drain(..).enumerate() {
            // SAFETY: allocated above, freed once.
            unsafe {
                if i % 3 == 0 {
                    heap.free_nolock(p)
                } else {
                    heap.free(p)
                }
            };
        }
    }
    heap.drain();
    let s = heap.stats();
    assert_eq!((s.objects_in_use, s.large_in_use), (0, 0), "{s:?}");
    assert_eq!(s.pages.free_pages, s.pages.total_pages, "{s:?}");
    heap.pages().check_invariants().unwrap();
}

/// The region's contents are arbitrary: the heap never takes them for
/// metadata (a region of all ones, or of 0xa5, works as a zeroed one does).
#[test]
fn a_region_full_of_garbage_works() {
    for byte in [0xff, 0xa5] {
        let len = 24 << 20;
        // SAFETY: a leaked region, ours alone, never freed.
        let heap =
            unsafe { Heap::from_region(region(len, byte), len, &ONE, Config::default()) }.unwrap();
        churn(&heap);
    }
}

/// Two heaps over adjacent regions: each serves only its own memory, and
/// neither takes the other's pages for its own.
#[test]
fn heaps_over_adjacent_regions_stay_apart() {
    let len = 16 << 20;
    let both = region(2 * len, 0x5a);
    // SAFETY: two halves of one leaked region, one per heap.
    let (a, b) = unsafe {
        (
            Heap::from_region(both, len, &ONE, Config::default()).unwrap(),
            Heap::from_region(both.add(len), len, &ONE, Config::default()).unwrap(),
        )
    };
    let (lo, mid, hi) = (
        both.as_ptr() as usize,
        both.as_ptr() as usize + len,
        both.as_ptr() as usize + 2 * len,
    );
    for heap in [&a, &b] {
        churn(heap);
    }
    let mut held = Vec::new();
    for size in [8, 100, 4000, 40_000, 1 << 20] {
        let l = Layout::from_size_align(size, 8).unwrap();
        while let Some(p) = a.alloc(l) {
            assert!((lo..mid).contains(&(p.as_ptr() as usize)));
            assert!(!b.pages().contains(p.as_ptr() as usize));
            held.push((&a, p));
        }
        while let Some(p) = b.alloc_nolock(l) {
            assert!((mid..hi).contains(&(p.as_ptr() as usize)));
            assert!(!a.pages().contains(p.as_ptr() as usize));
            held.push((&b, p));
        }
    }
    for (h, p) in held {
        // SAFETY: allocated above from `h`, freed once.
        unsafe { h.free(p) };
    }
}

/// CPU ids far above the configured count, different at every call (a
/// platform whose id is only a hint): slots are shared modulo the count,
/// every block stays intact, and all memory comes back.
#[test]
fn cpu_ids_above_the_count_that_change_at_every_call() {
    struct Wild;
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    impl Platform for Wild {
        fn cpu_id(&self) -> usize {
            let n = CALLS.fetch_add(1, Ordering::Relaxed);
            match n % 4 {
                0 => usize::MAX - n % 7,
                1 => n,
                2 => 3 + n % 5,
                _ => 0,
            }
        }
        fn cpu_count(&self) -> usize {
            3
        }
    }
    static WILD: Wild = Wild;
    let len = 48 << 20;
    // SAFETY: a leaked region, ours alone, never freed.
    let heap = unsafe { Heap::from_region(region(len, 0), len, &WILD, Config::default()) }.unwrap();
    assert_eq!(heap.pages().cpus(), 3);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| churn_shared(&heap));
        }
    });
    let calls = CALLS.load(Ordering::Relaxed);
    assert!(calls > 100, "{calls} calls");
    churn(&heap);
}

/// `churn` without the final checks, for several threads at once.
fn churn_shared(heap: &Heap) {
    let mut held = Vec::new();
    for size in (8..=64 << 10).step_by(1021).chain([1 << 20]) {
        let l = Layout::from_size_align(size, 8).unwrap();
        let p = if size % 2 == 0 {
            heap.alloc(l)
        } else {
            heap.alloc_nolock(l)
        };
        let p = p.unwrap_or_else(|| panic!("no block of {size} bytes"));
        fill(p, size, held.len());
        held.push((p, size));
    }
    for (i, (p, size)) in held.into_iter().enumerate() {
        assert!(intact(p, size, i), "block {i} of {size} bytes overwritten");
        // SAFETY: allocated above, freed once.
        unsafe {
            if i % 2 == 0 {
                heap.free_nolock(p)
            } else {
                heap.free(p)
            }
        };
    }
}
