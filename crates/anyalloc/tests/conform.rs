//! Semantic conformance of every allocation API to its contract under odd
//! but legal requests, on the normal and the nolock paths, with and without
//! restartable sequences:
//!
//! * alignment: every power of two from 1 to 1 GiB, with sizes below, at and
//!   just above the alignment, a class or a page block; the largest layouts
//!   Rust allows fail cleanly;
//! * zeroing: `alloc_zeroed`, `Allocator::allocate_zeroed` and `grow_zeroed`
//!   return zeroed memory for recycled objects (whose first words held the
//!   free-list link and the key), recycled page blocks, memory given back to
//!   the OS, and after a shrink in place;
//! * resizing: `Global::realloc` and `NoLock`'s `grow`/`shrink` against a
//!   model (proptest): contents kept up to the smaller size across every
//!   class boundary and move, alignment changes, zero-size blocks;
//! * usable size: every byte `usable_size` reports is the block's own: all
//!   of it written for many live blocks, the neighbours checked.
//!
//! The Heap tests run each heap with `Config::rseq` on and off; the tests of
//! `Global` and `NoLock` (the process-wide heap) run again in a child with
//! glibc's rseq registration off (`rseq_off_in_a_child`).

mod nolock_retry;
mod watchdog;

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::time::Duration;

use allocator_api2::alloc::Allocator;
use anyalloc::{Config, Global, Heap, NoLock, MAX_ORDER, PAGE_SIZE};
use nolock_retry::{first, retried, TRIES};
use proptest::prelude::*;

#[global_allocator]
static A: Global = Global;

/// Held for reading by every test here, for writing by the one that forks
/// (`rseq_off_in_a_child`, whose watchdog spawns the child with `fork`):
/// the fork's handlers hold every heap's locks for the fork's duration,
/// and a nolock call that meets a held lock fails rather than wait (by
/// design, see the README's notes on `fork`). These tests check what the
/// calls return, not how they meet a fork, so none runs beside it.
static FORK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn no_fork_meanwhile() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_GATE.read().unwrap_or_else(|e| e.into_inner())
}

/// The class sizes (the crate's `class::SIZES`).
const CLASS_SIZES: [usize; 39] = [
    8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448,
    512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168,
    8192,
];

/// The largest block the nolock path serves: `2^MAX_ORDER` pages.
const NOLOCK_MAX: usize = PAGE_SIZE << MAX_ORDER;

fn heap(rseq: bool) -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .rseq(rseq),
    )
    .unwrap()
}

/// Whether the nolock path serves `size` bytes aligned to `align`.
fn nolock_serves(size: usize, align: usize) -> bool {
    let bytes = size.max(align).max(1);
    bytes <= 8192 || bytes.div_ceil(PAGE_SIZE).next_power_of_two() <= 1 << MAX_ORDER
}

/// How often the model tries a nolock call: a layout the path serves is
/// retried while the shared heap is busy (`nolock_retry`); one it refuses
/// fails at once.
fn tries_for(size: usize, align: usize) -> u32 {
    if nolock_serves(size, align) {
        TRIES
    } else {
        1
    }
}

/// The byte at offset `i` of a block filled with `seed`.
fn pat(seed: u8, i: usize) -> u8 {
    seed ^ (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ (i >> 16) as u8
}

/// Writes the pattern over `[p, p + n)`.
///
/// # Safety
/// `p` is valid for `n` bytes of writes.
unsafe fn fill(p: *mut u8, n: usize, seed: u8) {
    // SAFETY: the caller's contract.
    let s = unsafe { std::slice::from_raw_parts_mut(p, n) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = pat(seed, i);
    }
}

/// The first offset in `[p, p + n)` that does not hold the pattern.
///
/// # Safety
/// `p` is valid for `n` bytes of reads.
unsafe fn damaged(p: *const u8, n: usize, seed: u8) -> Option<usize> {
    // SAFETY: the caller's contract.
    let s = unsafe { std::slice::from_raw_parts(p, n) };
    s.iter().enumerate().position(|(i, &b)| b != pat(seed, i))
}

/// The first non-zero offset in `[p, p + n)`.
///
/// # Safety
/// `p` is valid for `n` bytes of reads.
unsafe fn nonzero(p: *const u8, n: usize) -> Option<usize> {
    // SAFETY: the caller's contract.
    let s = unsafe { std::slice::from_raw_parts(p, n) };
    s.iter().position(|&b| b != 0)
}

/// Writes every byte of a block of `n` usable bytes, or its first and last
/// 64 KiB and one byte per MiB when it is bigger than 16 MiB (a 1 GiB block
/// would otherwise become resident), and checks them back.
///
/// # Safety
/// `p` is valid for `n` bytes.
unsafe fn touch_all(p: *mut u8, n: usize, seed: u8) {
    const WHOLE: usize = 16 << 20;
    // SAFETY: every range lies within the caller's `n` bytes.
    unsafe {
        if n <= WHOLE {
            fill(p, n, seed);
            assert_eq!(damaged(p, n, seed), None, "{p:?}: {n} usable bytes");
            return;
        }
        let edge = 64 << 10;
        fill(p, edge, seed);
        fill(p.add(n - edge), edge, seed);
        let mut off = edge;
        while off < n - edge {
            p.add(off).write(seed);
            off += 1 << 20;
        }
        assert_eq!(damaged(p, edge, seed), None);
        assert_eq!(damaged(p.add(n - edge), edge, seed), None);
    }
}

/// The sizes worth trying at alignment `align`: below, at and just above
/// it, at and just above every class and page-block size, at and around the
/// nolock path's limit and the huge threshold.
fn sizes_for(align: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 7, 9, 15, 17];
    for s in [align / 2, align.saturating_sub(1), align, align + 1] {
        v.push(s);
    }
    if align <= 64 {
        for c in CLASS_SIZES {
            v.extend([c - 1, c, c + 1]);
        }
        for o in 0..=MAX_ORDER {
            let b = PAGE_SIZE << o;
            v.extend([b - 1, b, b + 1]);
        }
    } else {
        v.extend([8191, 8192, 8193, PAGE_SIZE + 1, NOLOCK_MAX, NOLOCK_MAX + 1]);
    }
    v.sort_unstable();
    v.dedup();
    v.retain(|&s| s <= NOLOCK_MAX + PAGE_SIZE || s <= align);
    v
}

/// Alignment sweep of one heap's path: every power of two to 1 GiB, the
/// sizes of `sizes_for`. Each block is aligned, has `usable_size >= size`,
/// every usable byte is written, and a batch of blocks live together keeps
/// each one's contents (no overlap). The largest layouts fail.
fn alignment_sweep(h: &Heap, nolock: bool, group: Option<&std::sync::Arc<anyalloc::Group>>) {
    for shift in 0..=30u32 {
        let align = 1usize << shift;
        let mut live: Vec<(NonNull<u8>, usize, u8)> = Vec::new();
        for (k, size) in sizes_for(align).into_iter().enumerate() {
            let l = Layout::from_size_align(size, align).unwrap();
            let p = match (nolock, group) {
                (true, None) => h.alloc_nolock(l),
                (false, None) => h.alloc(l),
                (true, Some(g)) => h.alloc_nolock_in(l, g),
                (false, Some(g)) => h.alloc_in(l, g),
            };
            let Some(p) = p else {
                assert!(
                    nolock && !nolock_serves(size, align),
                    "{size} B aligned {align} failed (nolock {nolock})"
                );
                continue;
            };
            assert_eq!(
                p.as_ptr() as usize % align,
                0,
                "{size} B aligned {align} (nolock {nolock}) at {p:?}"
            );
            let usable = h.usable_size(p);
            assert!(usable >= size, "{size} B aligned {align}: usable {usable}");
            let seed = (k as u8).wrapping_mul(13).wrapping_add(shift as u8);
            // SAFETY: `usable` bytes are the block's.
            unsafe { touch_all(p.as_ptr(), usable, seed) };
            live.push((p, usable, seed));
            // Keep at most a few big blocks resident at once.
            if usable > (1 << 20) {
                let (p, usable, seed) = live.pop().unwrap();
                // SAFETY: written above by `touch_all`, live, freed once.
                unsafe {
                    if usable <= 16 << 20 {
                        assert_eq!(damaged(p.as_ptr(), usable, seed), None);
                    }
                    if nolock {
                        h.free_nolock(p)
                    } else {
                        h.free(p)
                    }
                }
            }
        }
        for (p, usable, seed) in live {
            // SAFETY: small live blocks written whole by `touch_all`.
            unsafe {
                assert_eq!(
                    damaged(p.as_ptr(), usable, seed),
                    None,
                    "block {p:?} of {usable} usable bytes aligned {align} was overwritten"
                );
                if nolock {
                    h.free_nolock(p)
                } else {
                    h.free(p)
                }
            }
        }
    }
    // The largest layouts Rust allows: no memory, and no crash.
    for shift in [0u32, 3, 12, 22, 30] {
        let align = 1usize << shift;
        let l = Layout::from_size_align(isize::MAX as usize - (align - 1), align).unwrap();
        let p = if nolock {
            h.alloc_nolock(l)
        } else {
            h.alloc(l)
        };
        assert!(p.is_none(), "{} B aligned {align} succeeded", l.size());
        let l = Layout::from_size_align(usize::MAX / 4, align).unwrap();
        assert!(h.alloc(l).is_none() && h.alloc_zeroed(l).is_none());
    }
}

#[test]
fn heap_alignment_sweep_normal_and_nolock_rseq_on_and_off() {
    let _gate = no_fork_meanwhile();
    for rseq in [true, false] {
        let h = heap(rseq);
        let g = anyalloc::Group::new("sweep", None, None);
        for group in [None, Some(&g)] {
            alignment_sweep(&h, false, group);
            alignment_sweep(&h, true, group);
        }
        assert_eq!(g.usage(), 0);
        let s = h.stats();
        assert_eq!((s.objects_in_use, s.large_in_use, s.huge_in_use), (0, 0, 0));
    }
}

/// Every size class and page order: fill many blocks (their whole usable
/// size), free them (normal or nolock frees, so both recycling routes leave
/// their links and keys in the first words), then `alloc_zeroed` and check
/// every byte of the request is zero. Then the same after `trim`, which gave
/// the free pages back to the OS.
fn zeroing_after_reuse(h: &Heap, nolock_free: bool) {
    let mut sizes: Vec<(usize, usize)> = CLASS_SIZES.iter().map(|&s| (s, 8)).collect();
    sizes.extend(CLASS_SIZES.iter().map(|&s| (s - 3, 1)));
    sizes.extend([(8, 4096), (100, 2048), (64, 8192), (1, 1 << 16)]);
    for o in 0..=MAX_ORDER {
        sizes.push((PAGE_SIZE << o, 8));
        sizes.push(((PAGE_SIZE << o) - 100, 16));
    }
    sizes.push((NOLOCK_MAX + 1, 8)); // huge
    for round in 0..2 {
        for &(size, align) in &sizes {
            let l = Layout::from_size_align(size, align).unwrap();
            let n = if size <= 8192 { 64 } else { 3 };
            let mut blocks = Vec::new();
            for _ in 0..n {
                let p = h.alloc(l).unwrap();
                // SAFETY: the block's usable bytes.
                unsafe { p.as_ptr().write_bytes(0xa5, h.usable_size(p)) };
                blocks.push(p);
            }
            for &p in blocks.iter().rev() {
                // SAFETY: live blocks, freed once.
                unsafe {
                    if nolock_free {
                        h.free_nolock(p)
                    } else {
                        h.free(p)
                    }
                }
            }
            if round == 1 {
                h.drain();
                h.trim();
            }
            let mut again = Vec::new();
            for _ in 0..n {
                let p = h.alloc_zeroed(l).unwrap();
                assert_eq!(p.as_ptr() as usize % align, 0);
                // SAFETY: `size` bytes of a live block.
                let z = unsafe { nonzero(p.as_ptr(), size) };
                assert_eq!(
                    z, None,
                    "alloc_zeroed({size}, {align}) after reuse (round {round}, nolock free \
                     {nolock_free}): byte {z:?} not zero"
                );
                // Dirty it for the next round.
                // SAFETY: as above.
                unsafe { p.as_ptr().write_bytes(0x5a, h.usable_size(p)) };
                again.push(p);
            }
            for p in again {
                // SAFETY: live blocks, freed once.
                unsafe { h.free(p) };
            }
        }
    }
}

#[test]
fn heap_alloc_zeroed_after_every_kind_of_reuse() {
    let _gate = no_fork_meanwhile();
    for rseq in [true, false] {
        let h = heap(rseq);
        zeroing_after_reuse(&h, false);
        zeroing_after_reuse(&h, true);
    }
}

/// `Global::alloc_zeroed` inside a nolock scope (routed to the nolock
/// path) after dirty reuse of the same classes and page blocks.
fn global_zeroed_in_a_nolock_scope() {
    for &size in CLASS_SIZES.iter().chain(&[16384, 65536, 1 << 20]) {
        let l = Layout::from_size_align(size, 8).unwrap();
        let _scope = anyalloc::nolock_scope();
        for round in 0..2 {
            // SAFETY: non-zero layouts; every block freed once.
            unsafe {
                let ps: Vec<_> = (0..16).map(|_| Global.alloc(l)).collect();
                for &p in &ps {
                    assert!(!p.is_null(), "{size} in a nolock scope");
                    p.write_bytes(0xff, size);
                    Global.dealloc(p, l);
                }
                for _ in 0..16 {
                    let p = Global.alloc_zeroed(l);
                    assert!(!p.is_null());
                    assert_eq!(nonzero(p, size), None, "{size}, round {round}");
                    p.write_bytes(0xee, size);
                    Global.dealloc(p, l);
                }
            }
        }
    }
}

/// `NoLock`'s `allocate_zeroed` and `grow_zeroed`: zeroed after reuse, and
/// `grow_zeroed` after a shrink in place zeroes the tail beyond the shrunk
/// size (the bytes the block held before the shrink are not "old" any more).
fn nolock_allocator_zeroing() {
    for &size in CLASS_SIZES.iter().chain(&[9000, 16384, 65536, 1 << 20]) {
        let l = Layout::from_size_align(size, 8).unwrap();
        let ps: Vec<_> = (0..16).map(|_| first(|| NoLock.allocate(l))).collect();
        for p in ps {
            // SAFETY: live blocks of `size` bytes, freed once.
            unsafe {
                p.cast::<u8>().as_ptr().write_bytes(0xff, size);
                NoLock.deallocate(p.cast(), l);
            }
        }
        for _ in 0..16 {
            let p = first(|| NoLock.allocate_zeroed(l));
            assert_eq!(p.len(), size);
            // SAFETY: `size` bytes of a live block.
            unsafe {
                assert_eq!(nonzero(p.cast::<u8>().as_ptr(), size), None, "{size}");
                p.cast::<u8>().as_ptr().write_bytes(0xee, size);
                NoLock.deallocate(p.cast(), l);
            }
        }
        // Shrink (in place or not), then grow_zeroed back.
        let p = first(|| NoLock.allocate(l)).cast::<u8>();
        // SAFETY: `size` bytes of a live block.
        unsafe { p.as_ptr().write_bytes(0xcc, size) };
        let small = Layout::from_size_align(size * 3 / 4 + 1, 8).unwrap();
        // SAFETY: a live block of `l`, `small` no larger.
        let q = first(|| unsafe { NoLock.shrink(p, l, small) }).cast::<u8>();
        // SAFETY: as above, `q` a live block of `small`.
        let r = first(|| unsafe { NoLock.grow_zeroed(q, small, l) });
        assert_eq!(r.len(), size);
        let r = r.cast::<u8>();
        // SAFETY: `size` bytes of a live block.
        unsafe {
            assert_eq!(
                nonzero(r.as_ptr().add(small.size()), size - small.size()),
                None,
                "grow_zeroed after shrink of {size}"
            );
            assert!((0..small.size()).all(|i| *r.as_ptr().add(i) == 0xcc));
            NoLock.deallocate(r, l);
        }
    }
    // Zero-size layouts: dangling, aligned, never the heap's.
    for shift in 0..=20 {
        let z = Layout::from_size_align(0, 1 << shift).unwrap();
        let p = first(|| NoLock.allocate(z));
        assert_eq!(p.len(), 0);
        assert_eq!(p.cast::<u8>().as_ptr() as usize % (1 << shift), 0);
        let h = anyalloc::global_heap().unwrap();
        assert!(!h.pages().contains(p.cast::<u8>().as_ptr() as usize));
        let nz = Layout::from_size_align(100, 1 << shift).unwrap();
        // SAFETY: a zero-size block grown.
        let q = first(|| unsafe { NoLock.grow_zeroed(p.cast(), z, nz) });
        assert_eq!(q.cast::<u8>().as_ptr() as usize % (1 << shift), 0);
        // SAFETY: 100 bytes of a live block.
        unsafe {
            assert_eq!(nonzero(q.cast::<u8>().as_ptr(), 100), None);
            let r = NoLock.shrink(q.cast(), nz, z).unwrap();
            assert_eq!(r.len(), 0);
            NoLock.deallocate(r.cast(), z);
        }
    }
}

fn nolock_allocator_zeroing_and_usable() {
    nolock_allocator_zeroing();
    global_zeroed_in_a_nolock_scope();
    usable_sizes_are_usable();
    global_alignment_sweep();
}

/// `Global` (GlobalAlloc): every alignment to 1 GiB; `alloc_zeroed` after
/// dirty reuse.
fn global_alignment_sweep() {
    let h = anyalloc::global_heap().unwrap();
    for shift in 0..=30u32 {
        let align = 1usize << shift;
        for size in sizes_for(align) {
            if size == 0 {
                continue; // GlobalAlloc: zero-size layouts are the caller's
            }
            let l = Layout::from_size_align(size, align).unwrap();
            for zeroed in [false, true] {
                // SAFETY: a non-zero layout; freed below.
                let p = unsafe {
                    if zeroed {
                        Global.alloc_zeroed(l)
                    } else {
                        Global.alloc(l)
                    }
                };
                assert!(!p.is_null(), "Global: {size} B aligned {align}");
                assert_eq!(p as usize % align, 0, "Global: {size} B aligned {align}");
                let usable = h.usable_size(NonNull::new(p).unwrap());
                assert!(usable >= size);
                // SAFETY: live, `usable` bytes; freed once.
                unsafe {
                    if zeroed && size <= 16 << 20 {
                        assert_eq!(nonzero(p, size), None, "Global zeroed {size} B @{align}");
                    }
                    touch_all(p, usable, shift as u8);
                    Global.dealloc(p, l);
                }
            }
        }
    }
}

/// Many live blocks of every class (and some page blocks), each written over
/// its whole reported usable size with its own pattern, through `Global`
/// and `NoLock` (`usable_size` of the global heap); then every block is
/// checked: a usable size that reached into a neighbour shows as damage.
fn usable_sizes_are_usable() {
    let h = anyalloc::global_heap().unwrap();
    let mut live: Vec<(NonNull<u8>, Layout, usize, u8, bool)> = Vec::new();
    let mut k = 0u8;
    for &c in &CLASS_SIZES {
        for size in [c - 1, c, c + 1] {
            for align in [1usize, 8, 16, 64, 512] {
                for nolock in [false, true] {
                    let l = Layout::from_size_align(size, align).unwrap();
                    for _ in 0..5 {
                        let p = if nolock {
                            first(|| NoLock.allocate(l)).cast::<u8>()
                        } else {
                            // SAFETY: a non-zero layout.
                            NonNull::new(unsafe { Global.alloc(l) }).unwrap()
                        };
                        let u = h.usable_size(p);
                        assert!(u >= size);
                        k = k.wrapping_add(1);
                        // SAFETY: `u` usable bytes.
                        unsafe { fill(p.as_ptr(), u, k) };
                        live.push((p, l, u, k, nolock));
                    }
                }
            }
        }
    }
    for (p, l, u, seed, nolock) in live {
        // SAFETY: live blocks filled above; freed once.
        unsafe {
            assert_eq!(
                damaged(p.as_ptr(), u, seed),
                None,
                "block {p:?} ({l:?}, {u} usable) was overwritten by a neighbour"
            );
            if nolock {
                NoLock.deallocate(p, l)
            } else {
                Global.dealloc(p.as_ptr(), l)
            }
        }
    }
}

#[test]
fn global_and_nolock_alignment_usable_size_zeroing() {
    let _gate = no_fork_meanwhile();
    anyalloc::init().unwrap();
    nolock_allocator_zeroing_and_usable();
}

/// One operation of the resize model.
#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: usize,
        align_shift: u32,
        nolock: bool,
        raw: bool,
    },
    /// `Global::realloc` or a `NoLock` grow/shrink (by the block's kind) of
    /// the live block at `pick`, to `size` (and for `NoLock`, alignment).
    Resize {
        pick: usize,
        size: usize,
        align_shift: u32,
        zeroed: bool,
    },
    Free {
        pick: usize,
    },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=300,
        3 => prop::sample::select(CLASS_SIZES.to_vec()).prop_flat_map(|c| (c - 2)..=(c + 2)),
        2 => 300usize..=9000,
        2 => prop::sample::select((0..=MAX_ORDER).map(|o| PAGE_SIZE << o).collect::<Vec<_>>())
            .prop_flat_map(|b| (b - 2)..=(b + 2)),
        1 => (NOLOCK_MAX - 5)..=(NOLOCK_MAX + 70_000),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let align_shift = prop_oneof![4 => 0u32..=4, 1 => 5u32..=13];
    prop_oneof![
        3 => (size(), align_shift.clone(), any::<bool>(), any::<bool>())
            .prop_map(|(size, align_shift, nolock, raw)| Op::Alloc { size, align_shift, nolock, raw }),
        5 => (any::<usize>(), size(), align_shift, any::<bool>())
            .prop_map(|(pick, size, align_shift, zeroed)| Op::Resize { pick, size, align_shift, zeroed }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

struct Live {
    p: NonNull<u8>,
    layout: Layout,
    seed: u8,
    nolock: bool,
    /// A `NoLock` block handled through its `GlobalAlloc` face.
    raw: bool,
}

fn check(b: &Live) -> Result<(), TestCaseError> {
    // SAFETY: a live block of `layout.size()` bytes, filled with its seed.
    let d = unsafe { damaged(b.p.as_ptr(), b.layout.size(), b.seed) };
    prop_assert_eq!(d, None, "block {:?} ({:?}) damaged", b.p, b.layout);
    Ok(())
}

fn release(b: Live) {
    // SAFETY: a live block with its layout, freed once.
    unsafe {
        if b.raw {
            GlobalAlloc::dealloc(&NoLock, b.p.as_ptr(), b.layout)
        } else if b.nolock {
            NoLock.deallocate(b.p, b.layout)
        } else if b.layout.size() != 0 {
            Global.dealloc(b.p.as_ptr(), b.layout)
        }
    }
}

fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let h = anyalloc::global_heap().unwrap();
    let mut live: Vec<Live> = Vec::new();
    let mut seed = 0u8;
    let result = (|| {
        for op in ops {
            seed = seed.wrapping_add(1);
            match op {
                Op::Alloc {
                    size,
                    align_shift,
                    nolock,
                    raw,
                } => {
                    let l = Layout::from_size_align(size, 1 << align_shift).unwrap();
                    let raw = raw && nolock && size != 0;
                    let tries = tries_for(size, l.align());
                    let p = if raw {
                        retried(tries, || {
                            // SAFETY: a non-zero layout.
                            NonNull::new(unsafe {
                                if seed.is_multiple_of(2) {
                                    GlobalAlloc::alloc_zeroed(&NoLock, l)
                                } else {
                                    GlobalAlloc::alloc(&NoLock, l)
                                }
                            })
                            .ok_or(())
                        })
                        .ok()
                        .map(Ok)
                    } else if nolock {
                        retried(tries, || NoLock.allocate(l)).ok().map(|p| {
                            prop_assert_eq!(p.len(), size);
                            Ok(p.cast::<u8>())
                        })
                    } else if size == 0 {
                        continue;
                    } else {
                        // SAFETY: a non-zero layout.
                        NonNull::new(unsafe { Global.alloc(l) }).map(Ok)
                    };
                    let Some(p) = p else {
                        prop_assert!(
                            nolock && !nolock_serves(size, l.align()),
                            "alloc {l:?} failed"
                        );
                        continue;
                    };
                    let p = p?;
                    prop_assert_eq!(p.as_ptr() as usize % l.align(), 0);
                    if size != 0 {
                        prop_assert!(h.usable_size(p) >= size);
                    }
                    // SAFETY: `size` bytes of a live block.
                    unsafe { fill(p.as_ptr(), size, seed) };
                    live.push(Live {
                        p,
                        layout: l,
                        seed,
                        nolock,
                        raw,
                    });
                }
                Op::Resize {
                    pick,
                    size,
                    align_shift,
                    zeroed,
                } => {
                    if live.is_empty() {
                        continue;
                    }
                    let i = pick % live.len();
                    check(&live[i])?;
                    let b = &live[i];
                    let old = b.layout;
                    let keep = old.size().min(size);
                    let (q, new) = if b.raw {
                        if size == 0 {
                            continue;
                        }
                        let new = Layout::from_size_align(size, old.align()).unwrap();
                        let tries = tries_for(size, new.align());
                        let q = retried(tries, || {
                            let p = b.p.as_ptr();
                            // SAFETY: a live block of `old`, a non-zero new size
                            // (a failed realloc leaves it live and untouched).
                            NonNull::new(unsafe { GlobalAlloc::realloc(&NoLock, p, old, size) })
                                .ok_or(())
                        });
                        match q {
                            Ok(q) => (q, new),
                            Err(()) => {
                                prop_assert!(
                                    !nolock_serves(size, new.align()),
                                    "NoLock realloc {old:?} -> {size} failed"
                                );
                                check(&live[i])?;
                                continue;
                            }
                        }
                    } else if b.nolock {
                        let new = Layout::from_size_align(size, 1 << align_shift).unwrap();
                        let tries = tries_for(size, new.align());
                        // SAFETY: a live block of `old`; grow when not smaller,
                        // shrink otherwise, as the trait requires; a failed
                        // call leaves the block live and untouched.
                        let r = retried(tries, || unsafe {
                            if size >= old.size() {
                                if zeroed {
                                    NoLock.grow_zeroed(b.p, old, new)
                                } else {
                                    NoLock.grow(b.p, old, new)
                                }
                            } else {
                                NoLock.shrink(b.p, old, new)
                            }
                        });
                        match r {
                            Ok(q) => {
                                prop_assert_eq!(q.len(), size);
                                (q.cast::<u8>(), new)
                            }
                            Err(_) => {
                                prop_assert!(
                                    !nolock_serves(size, new.align()),
                                    "NoLock resize {old:?} -> {new:?} failed"
                                );
                                // The block is untouched.
                                check(&live[i])?;
                                continue;
                            }
                        }
                    } else {
                        if size == 0 || old.size() == 0 {
                            continue; // GlobalAlloc: non-zero sizes only
                        }
                        let new = Layout::from_size_align(size, old.align()).unwrap();
                        // SAFETY: a live block of `old`, a non-zero new size.
                        let q = unsafe { Global.realloc(b.p.as_ptr(), old, size) };
                        prop_assert!(!q.is_null(), "Global realloc {old:?} -> {size} failed");
                        (NonNull::new(q).unwrap(), new)
                    };
                    prop_assert_eq!(q.as_ptr() as usize % new.align(), 0, "{:?}", new);
                    let old_seed = live[i].seed;
                    // SAFETY: `keep` bytes of the live result were copied.
                    let d = unsafe { damaged(q.as_ptr(), keep, old_seed) };
                    prop_assert_eq!(d, None, "resize {:?} -> {:?} lost contents", old, new);
                    if zeroed && live[i].nolock && !live[i].raw && size > old.size() {
                        // SAFETY: `size` bytes of the live result.
                        let z = unsafe { nonzero(q.as_ptr().add(old.size()), size - old.size()) };
                        prop_assert_eq!(
                            z,
                            None,
                            "grow_zeroed {:?} -> {:?} tail not zero",
                            old,
                            new
                        );
                    }
                    if size != 0 {
                        prop_assert!(h.usable_size(q) >= size);
                    }
                    // SAFETY: `size` bytes of the live result.
                    unsafe { fill(q.as_ptr(), size, seed) };
                    live[i].p = q;
                    live[i].layout = new;
                    live[i].seed = seed;
                }
                Op::Free { pick } => {
                    if live.is_empty() {
                        continue;
                    }
                    let b = live.swap_remove(pick % live.len());
                    check(&b)?;
                    release(b);
                }
            }
        }
        for b in &live {
            check(b)?;
        }
        Ok(())
    })();
    for b in live.drain(..) {
        release(b);
    }
    result
}

#[test]
fn resize_model() {
    let _gate = no_fork_meanwhile();
    anyalloc::init().unwrap();
    resize_model_cases(64);
}

fn resize_model_cases(cases: u32) {
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..120))| {
        run_model(ops)?;
    });
}

/// Targeted: a block walked through every class and kind and back
/// (small -> large -> huge -> large -> small), by `Global::realloc` and
/// `NoLock`'s grow/shrink, one byte below and above each boundary.
#[test]
fn resize_walk_across_every_boundary() {
    let _gate = no_fork_meanwhile();
    anyalloc::init().unwrap();
    resize_walk();
}

fn resize_walk() {
    let mut steps: Vec<usize> = Vec::new();
    for c in CLASS_SIZES {
        steps.extend([c - 1, c, c + 1]);
    }
    for o in 1..=MAX_ORDER {
        let b = PAGE_SIZE << o;
        steps.extend([b - 1, b, b + 1]);
    }
    steps.push(NOLOCK_MAX * 3);
    let down: Vec<usize> = steps.iter().rev().copied().collect();
    for align in [8usize, 64, 4096] {
        // Global::realloc up and down.
        let mut l = Layout::from_size_align(1, align).unwrap();
        // SAFETY: a non-zero layout.
        let mut p = unsafe { Global.alloc(l) };
        // SAFETY: one byte.
        unsafe { fill(p, 1, 1) };
        for &s in steps.iter().chain(&down) {
            // SAFETY: a live block of `l`, non-zero size.
            let q = unsafe { Global.realloc(p, l, s) };
            assert!(!q.is_null());
            assert_eq!(q as usize % align, 0, "realloc to {s} @{align}");
            // SAFETY: `min` bytes copied; `s` bytes of the result.
            unsafe {
                assert_eq!(
                    damaged(q, l.size().min(s), l.size() as u8),
                    None,
                    "{} -> {s}",
                    l.size()
                );
                fill(q, s, s as u8);
            }
            p = q;
            l = Layout::from_size_align(s, align).unwrap();
        }
        // SAFETY: live, freed once.
        unsafe { Global.dealloc(p, l) };
        // NoLock grow/shrink, alternating the alignment each step.
        let mut l = Layout::from_size_align(1, 8).unwrap();
        let mut p = first(|| NoLock.allocate(l)).cast::<u8>();
        // SAFETY: one byte.
        unsafe { fill(p.as_ptr(), 1, 1) };
        for (k, &s) in steps.iter().chain(&down).enumerate() {
            if s > NOLOCK_MAX {
                continue;
            }
            let new = Layout::from_size_align(s, if k % 2 == 0 { align } else { 8 }).unwrap();
            // SAFETY: a live block of `l`; grow or shrink by size.
            let q = first(|| unsafe {
                if s >= l.size() {
                    NoLock.grow_zeroed(p, l, new)
                } else {
                    NoLock.shrink(p, l, new)
                }
            })
            .cast::<u8>();
            assert_eq!(q.as_ptr() as usize % new.align(), 0);
            // SAFETY: `min` bytes copied; `s` bytes of the result.
            unsafe {
                assert_eq!(damaged(q.as_ptr(), l.size().min(s), l.size() as u8), None);
                if s > l.size() {
                    assert_eq!(nonzero(q.as_ptr().add(l.size()), s - l.size()), None);
                }
                fill(q.as_ptr(), s, s as u8);
            }
            p = q;
            l = new;
        }
        // SAFETY: live, freed once.
        unsafe { NoLock.deallocate(p, l) };
    }
}

/// The `Global` and `NoLock` tests again, in a child whose glibc has no rseq
/// registration: the try-locked per-CPU slots serve every fast path.
#[test]
fn rseq_off_in_a_child() {
    if watchdog::in_child() {
        anyalloc::init().unwrap();
        assert_eq!(
            anyalloc::global_heap().unwrap().stats().fast_path,
            anyalloc::FastPath::SlotLock
        );
        nolock_allocator_zeroing_and_usable();
        resize_walk();
        resize_model_cases(32);
        for rseq in [true, false] {
            let h = heap(rseq);
            alignment_sweep(&h, false, None);
            alignment_sweep(&h, true, None);
            zeroing_after_reuse(&h, true);
        }
        println!("rseq off: done");
        return;
    }
    let _gate = FORK_GATE.write().unwrap_or_else(|e| e.into_inner());
    let out = watchdog::run_ok(
        "rseq_off_in_a_child",
        &[watchdog::RSEQ_OFF],
        Duration::from_secs(600),
        "conformance without rseq",
    );
    print!("{}", out.stdout);
    assert!(out.stdout.contains("rseq off: done"), "{}", out.stdout);
}

/// `Heap::remap_huge`: contents kept to the smaller size, the grown tail
/// zero (fresh pages), the usable size the new one, for blocks of every
/// alignment a huge block can have; a shrink and a grow again.
#[test]
fn remap_huge_keeps_contents_and_grows_zeroed() {
    let _gate = no_fork_meanwhile();
    for rseq in [true, false] {
        let h = heap(rseq);
        for shift in [3u32, 12, 16, 22, 23, 30] {
            let l = Layout::from_size_align(NOLOCK_MAX + 1, 1 << shift).unwrap();
            let mut p = h.alloc(l).unwrap();
            let mut n = h.usable_size(p);
            // SAFETY: `n` usable bytes.
            unsafe { fill(p.as_ptr(), n, 1) };
            for (k, size) in [12 << 20, 6 << 20, NOLOCK_MAX + 4097, 9 << 20]
                .into_iter()
                .enumerate()
            {
                // SAFETY: a live huge block; after `Some` only the result is.
                let Some(q) = (unsafe { h.remap_huge(p, size) }) else {
                    panic!("remap_huge to {size} refused");
                };
                let u = h.usable_size(q);
                assert!(u >= size && u.is_multiple_of(PAGE_SIZE));
                // SAFETY: `u` usable bytes of the live result.
                unsafe {
                    assert_eq!(damaged(q.as_ptr(), n.min(u), k as u8 + 1), None);
                    if u > n {
                        assert_eq!(nonzero(q.as_ptr().add(n), u - n), None, "grown tail");
                    }
                    fill(q.as_ptr(), u, k as u8 + 2);
                }
                p = q;
                n = u;
            }
            // SAFETY: live, freed once.
            unsafe { h.free(p) };
        }
        assert_eq!(h.stats().huge_in_use, 0);
    }
}

/// `Global::realloc` routed to the nolock path (a nolock scope): a huge
/// block cannot grow there (null, the block untouched) but every shrink
/// succeeds and keeps the contents.
#[test]
fn global_realloc_in_a_nolock_scope() {
    let _gate = no_fork_meanwhile();
    anyalloc::init().unwrap();
    let l = Layout::from_size_align(NOLOCK_MAX * 2, 64).unwrap();
    // SAFETY: a non-zero layout; the blocks are freed below.
    unsafe {
        let p = Global.alloc(l);
        assert!(!p.is_null());
        fill(p, l.size(), 9);
        let _scope = anyalloc::nolock_scope();
        assert!(Global.realloc(p, l, NOLOCK_MAX * 3).is_null());
        assert_eq!(damaged(p, l.size(), 9), None);
        let mut cur = (p, l);
        for size in [
            NOLOCK_MAX * 2 - 1,
            NOLOCK_MAX + 1,
            NOLOCK_MAX,
            70_000,
            8193,
            100,
        ] {
            let q = Global.realloc(cur.0, cur.1, size);
            assert!(!q.is_null(), "shrink to {size} in a nolock scope");
            assert_eq!(q as usize % 64, 0);
            assert_eq!(damaged(q, size, 9), None, "shrink to {size}");
            cur = (q, Layout::from_size_align(size, 64).unwrap());
        }
        Global.dealloc(cur.0, cur.1);
    }
}

/// Alignments beyond 1 GiB, to the largest a `Layout` allows (2^63, size
/// 0): served when the address space has room (aligned, usable), refused
/// cleanly otherwise, on every path; never a bad pointer or a crash.
#[test]
fn extreme_alignments_are_served_aligned_or_refused() {
    let _gate = no_fork_meanwhile();
    anyalloc::init().unwrap();
    let h = heap(true);
    let gh = anyalloc::global_heap().unwrap();
    for shift in 31..=63u32 {
        let align = 1usize << shift;
        for size in [0usize, 1, 4097] {
            let Ok(l) = Layout::from_size_align(size, align) else {
                continue;
            };
            for nolock in [false, true] {
                let p = if nolock {
                    h.alloc_nolock(l)
                } else {
                    h.alloc(l)
                };
                assert!(!nolock || p.is_none(), "nolock served {l:?}");
                if let Some(p) = p {
                    assert_eq!(p.as_ptr() as usize % align, 0, "{l:?}");
                    let u = h.usable_size(p);
                    assert!(u >= size);
                    // SAFETY: `u` usable bytes; freed once.
                    unsafe {
                        touch_all(p.as_ptr(), u, shift as u8);
                        h.free(p);
                    }
                }
            }
            if size != 0 {
                // SAFETY: a non-zero layout; freed once.
                unsafe {
                    let p = Global.alloc_zeroed(l);
                    if !p.is_null() {
                        assert_eq!(p as usize % align, 0, "Global {l:?}");
                        let u = gh.usable_size(NonNull::new(p).unwrap());
                        assert_eq!(nonzero(p, size), None);
                        touch_all(p, u, 1);
                        Global.dealloc(p, l);
                    }
                }
            }
            match NoLock.allocate(l) {
                Ok(p) => {
                    assert_eq!(p.len(), size);
                    assert_eq!(p.cast::<u8>().as_ptr() as usize % align, 0);
                    // SAFETY: allocated above with `l`.
                    unsafe { NoLock.deallocate(p.cast(), l) };
                }
                Err(_) => assert!(size != 0, "a zero-size block needs no memory"),
            }
        }
    }
    assert_eq!(h.stats().huge_in_use, 0);
}
