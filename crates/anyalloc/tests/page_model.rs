//! Model-based tests: random sequences of page operations against a simple
//! model (the set of held blocks), on an allocator over a test-owned region
//! whose CPU id the test chooses, so every step is deterministic and
//! proptest can shrink a failure to a minimal sequence.
//!
//! After every step: results aligned and inside managed memory, no overlap
//! with any held block, conservation (`free_pages + held == total_pages`),
//! the nolock path never refused for a busy lock (nothing else runs) and
//! never took the buddy lists below the min watermark, every structural
//! invariant. At the end, after freeing everything and `drain()`: every page
//! on the buddy lists and every max-order block allocatable again.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ptr::NonNull;

use anyalloc::{Config, PageAllocator, Platform, MAX_ORDER, PAGE_SIZE, PCP_MAX_ORDER};
use proptest::prelude::*;

/// Slot sets of the test allocators.
const CPUS: usize = 2;

thread_local! {
    /// The CPU id the test platform reports to this thread.
    static CPU: Cell<usize> = const { Cell::new(0) };
}

/// A platform whose CPU id is whatever the test set for this thread.
struct TestPlatform;

impl Platform for TestPlatform {
    fn cpu_id(&self) -> usize {
        CPU.with(|c| c.get())
    }
    fn cpu_count(&self) -> usize {
        CPUS
    }
}

static PLATFORM: TestPlatform = TestPlatform;

/// A heap region aligned to the largest block, freed on drop (after the
/// allocator over it, which is declared later in [`Fixture`]).
struct Region {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

impl Region {
    fn new(bytes: usize) -> Region {
        let layout = std::alloc::Layout::from_size_align(bytes, PAGE_SIZE << MAX_ORDER).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        Region {
            ptr: NonNull::new(p).expect("region allocation"),
            layout,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

struct Fixture {
    pa: PageAllocator,
    _region: Region,
}

/// An allocator over a fresh region of `mib` MiB plus 1 MiB for metadata,
/// `CPUS` slot sets.
fn fixture(mib: usize) -> Fixture {
    let region = Region::new((mib + 1) << 20);
    // SAFETY: the region is valid for its whole length, used by nothing
    // else, and outlives the allocator (field order in `Fixture`).
    let pa = unsafe {
        PageAllocator::from_region(
            region.ptr,
            region.layout.size(),
            &PLATFORM,
            Config::default().cpus(CPUS).grow(false),
        )
    }
    .expect("allocator over the region");
    Fixture {
        pa,
        _region: region,
    }
}

/// The zone's min watermark, as the allocator computes it (`Zone::init`):
/// 1/256 of the zone, at least 4 and at most 4096 pages.
fn min_watermark(total_pages: usize) -> usize {
    (total_pages / 256).clamp(4, 4096)
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { order: u32, nolock: bool },
    Free { pick: usize, nolock: bool },
    Drain,
    Cpu(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Mostly small orders, sometimes large ones.
        6 => (0u32..=4, any::<bool>()).prop_map(|(order, nolock)| Op::Alloc { order, nolock }),
        1 => (5u32..=MAX_ORDER).prop_map(|order| Op::Alloc { order, nolock: false }),
        1 => (4u32..=MAX_ORDER).prop_map(|order| Op::Alloc { order, nolock: true }),
        7 => (any::<usize>(), any::<bool>()).prop_map(|(pick, nolock)| Op::Free { pick, nolock }),
        1 => Just(Op::Drain),
        1 => (0usize..CPUS + 1).prop_map(Op::Cpu),
    ]
}

/// The model: held blocks by address, with their order and a tag written
/// into the first word of each of their pages.
#[derive(Default)]
struct Model {
    held: BTreeMap<usize, (u32, u64)>,
    held_pages: usize,
    next_tag: u64,
}

impl Model {
    fn overlaps(&self, addr: usize, order: u32) -> Option<usize> {
        let end = addr + (PAGE_SIZE << order);
        if let Some((&a, &(o, _))) = self.held.range(..=addr).next_back() {
            if a + (PAGE_SIZE << o) > addr {
                return Some(a);
            }
        }
        self.held.range(addr..end).next().map(|(&a, _)| a)
    }

    fn insert(&mut self, addr: usize, order: u32) {
        self.next_tag += 1;
        let tag = self.next_tag;
        for page in 0..1usize << order {
            // SAFETY: the block was just handed to us; each page's first word
            // is inside it.
            unsafe { ((addr + page * PAGE_SIZE) as *mut u64).write(tag ^ page as u64) };
        }
        self.held.insert(addr, (order, tag));
        self.held_pages += 1 << order;
    }

    fn remove(&mut self, addr: usize) -> u32 {
        let (order, tag) = self.held.remove(&addr).unwrap();
        for page in 0..1usize << order {
            // SAFETY: we still own the block (freed only after this check).
            let w = unsafe { ((addr + page * PAGE_SIZE) as *const u64).read() };
            assert_eq!(
                w,
                tag ^ page as u64,
                "block {addr:#x} page {page} was overwritten"
            );
        }
        self.held_pages -= 1 << order;
        order
    }
}

fn free_block(pa: &PageAllocator, addr: usize, order: u32, nolock: bool) {
    let p = NonNull::new(addr as *mut u8).unwrap();
    // SAFETY: the model held this block, allocated with `order`, and has
    // just given it up.
    unsafe {
        if nolock {
            pa.free_pages_nolock(p, order)
        } else {
            pa.free_pages(p, order)
        }
    }
}

fn run_model(mib: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    CPU.with(|c| c.set(0));
    let fx = fixture(mib);
    let pa = &fx.pa;
    let total = pa.stats().total_pages;
    let min = min_watermark(total);
    let max_blocks = total >> MAX_ORDER;
    let mut m = Model::default();

    for op in ops {
        let before = pa.stats();
        match *op {
            Op::Alloc { order, nolock } => {
                let got = if nolock {
                    pa.alloc_pages_nolock(order)
                } else {
                    pa.alloc_pages(order)
                };
                let after = pa.stats();
                if nolock && order > PCP_MAX_ORDER && got.is_none() {
                    // Nothing else runs: the zone lock was free, so only a
                    // shortage above the watermark can refuse it.
                    prop_assert_eq!(
                        after.nolock_alloc_fail_empty,
                        before.nolock_alloc_fail_empty + 1,
                        "nolock order {} failed without a shortage",
                        order
                    );
                }
                if nolock {
                    prop_assert_eq!(
                        after.nolock_alloc_fail_busy,
                        before.nolock_alloc_fail_busy,
                        "nolock failed as busy with nothing else running"
                    );
                    if after.buddy_pages < before.buddy_pages {
                        prop_assert!(
                            after.buddy_pages >= min,
                            "nolock took the buddy lists from {} to {} pages, below min {}",
                            before.buddy_pages,
                            after.buddy_pages,
                            min
                        );
                    }
                }
                if let Some(p) = got {
                    let addr = p.as_ptr() as usize;
                    prop_assert_eq!(addr % (PAGE_SIZE << order), 0, "misaligned block");
                    prop_assert!(pa.contains(addr) && pa.contains(addr + (PAGE_SIZE << order) - 1));
                    if let Some(other) = m.overlaps(addr, order) {
                        return Err(TestCaseError::fail(format!(
                            "block {addr:#x} order {order} overlaps held block {other:#x}"
                        )));
                    }
                    m.insert(addr, order);
                } else if !nolock && m.held_pages == 0 && order <= MAX_ORDER {
                    prop_assert!(
                        false,
                        "normal alloc of order {} failed with nothing held",
                        order
                    );
                }
            }
            Op::Free { pick, nolock } => {
                if m.held.is_empty() {
                    continue;
                }
                let addr = *m.held.keys().nth(pick % m.held.len()).unwrap();
                let order = m.remove(addr);
                free_block(pa, addr, order, nolock);
            }
            Op::Drain => {
                pa.drain();
                let s = pa.stats();
                prop_assert_eq!(
                    s.percpu_pages + s.deferred_pages,
                    0,
                    "drain left pages behind"
                );
            }
            Op::Cpu(c) => CPU.with(|cpu| cpu.set(c)),
        }
        let s = pa.stats();
        prop_assert_eq!(
            s.free_pages + m.held_pages,
            total,
            "conservation after {:?}",
            op
        );
        prop_assert_eq!(s.total_pages, total);
        prop_assert_eq!(pa.check_invariants(), Ok(()), "after {:?}", op);
    }

    // Free everything (alternating paths), drain: all pages coalesced.
    let rest: Vec<usize> = m.held.keys().copied().collect();
    for (i, addr) in rest.into_iter().enumerate() {
        let order = m.remove(addr);
        free_block(pa, addr, order, i % 2 == 1);
    }
    pa.drain();
    let s = pa.stats();
    prop_assert_eq!(s.free_pages, total);
    prop_assert_eq!(s.buddy_pages, total, "pages left off the buddy lists");
    prop_assert_eq!(pa.check_invariants(), Ok(()));
    let mut big = Vec::new();
    for _ in 0..max_blocks {
        let b = pa.alloc_pages(MAX_ORDER);
        prop_assert!(
            b.is_some(),
            "max-order block {} of {} not available: not coalesced",
            big.len() + 1,
            max_blocks
        );
        big.push(b.unwrap());
    }
    for b in big {
        // SAFETY: allocated just above with MAX_ORDER.
        unsafe { pa.free_pages(b, MAX_ORDER) };
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in proptest::collection::vec(op_strategy(), 1..300)) {
        // 4 MiB (~1250 pages, one max-order block and the rest): a few
        // large allocations reach the watermarks and exhaustion.
        run_model(4, &ops)?;
    }
}

/// The sequences most likely to hit the watermark and the other CPUs' stock:
/// long runs of nolock allocations on alternating CPUs.
#[test]
fn exhausting_the_nolock_path_on_two_cpus_matches_the_model() {
    let mut ops = Vec::new();
    for round in 0..3 {
        ops.push(Op::Cpu(1));
        ops.push(Op::Alloc {
            order: 0,
            nolock: true,
        });
        ops.push(Op::Free {
            pick: 0,
            nolock: false,
        });
        ops.push(Op::Cpu(0));
        for i in 0..3000 {
            ops.push(Op::Alloc {
                order: ((i + round) % 4) as u32,
                nolock: true,
            });
        }
        for i in 0..3000 {
            ops.push(Op::Free {
                pick: i * 7,
                nolock: i % 3 == 0,
            });
        }
    }
    run_model(16, &ops).unwrap();
}

/// Regression: a nolock allocation that finds its own CPU's slots empty at
/// the watermark and another CPU's slot stocked only with other orders must
/// not refill that slot past the watermark. (It computed `usize::MAX + need`
/// as the reserve: an overflow panic in debug builds, and in release a wrap
/// to "no reserve", which let the nolock path empty the zone.)
#[test]
fn nolock_never_refills_another_cpus_slot_below_min() {
    let fx = fixture(16);
    let pa = &fx.pa;
    let total = pa.stats().total_pages;
    let min = min_watermark(total);
    // CPU 1's normal slot gets a stock of order-0 pages only.
    CPU.with(|c| c.set(1));
    let p = pa.alloc_pages_nolock(0).unwrap();
    // SAFETY: allocated just above.
    unsafe { pa.free_pages(p, 0) };
    assert!(pa.stats().percpu_pages > 0);
    // CPU 0 takes order-1 blocks with the nolock path until refused.
    CPU.with(|c| c.set(0));
    let mut held = Vec::new();
    while let Some(p) = pa.alloc_pages_nolock(1) {
        held.push(p);
        assert!(held.len() <= total / 2, "never refused");
    }
    let s = pa.stats();
    assert!(
        s.buddy_pages >= min,
        "the nolock path took the buddy lists to {} pages, below min {min}",
        s.buddy_pages
    );
    assert_eq!(s.nolock_alloc_fail_empty, 1);
    for p in held {
        // SAFETY: allocated above with order 1.
        unsafe { pa.free_pages_nolock(p, 1) };
    }
    pa.drain();
    assert_eq!(pa.stats().buddy_pages, total);
    pa.check_invariants().unwrap();
}

/// An allocator over an embedder's region manages exactly that region:
/// "`config`'s memory size and growth settings do not apply (the region is
/// the cap)", even with growth left on in the config. Exhaustion fails
/// instead of adding OS zones (which the allocator would not release on
/// drop: it does not own its mappings).
#[test]
fn a_region_allocator_never_grows() {
    let region = Region::new(2 << 20);
    // SAFETY: as in `fixture`; `region` outlives `pa` (dropped first below).
    let pa = unsafe {
        PageAllocator::from_region(
            region.ptr,
            region.layout.size(),
            &PLATFORM,
            Config::default(),
        )
    }
    .unwrap();
    let total = pa.stats().total_pages;
    let mut held = Vec::new();
    while let Some(p) = pa.alloc_pages(0) {
        held.push(p);
        assert!(
            held.len() <= total,
            "allocated more pages than the region has"
        );
    }
    assert_eq!(
        held.len(),
        total,
        "the normal path may use every page, reserve included"
    );
    assert_eq!(pa.stats().zones, 1);
    for p in held {
        // SAFETY: allocated above with order 0.
        unsafe { pa.free_pages(p, 0) };
    }
    drop(pa);
}
