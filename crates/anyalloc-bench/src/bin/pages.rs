//! `pages`: page allocator alloc+free cost, anyalloc (normal and nolock
//! paths) against `buddy_system_allocator`, interleaved over several rounds.
//!
//! Every peer manages its own region of the same size, pre-faulted before
//! timing, and is called through the same `&dyn PagePeer` interface (one
//! dynamic call per alloc and per free, for every peer alike).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use anyalloc::{Config, PageAllocator, PAGE_SIZE};
use anyalloc_bench::{measure, out_of_memory, prefault, progress, Options, Peer, Report, Target};
use buddy_system_allocator::LockedHeap;

/// Bytes each peer manages.
const REGION: usize = 32 << 20;
/// Allocations per batch in the batch workloads.
const BATCH: usize = 64;

const NORMAL: &str = "anyalloc normal";
const NOLOCK: &str = "anyalloc nolock";
const BUDDY: &str = "buddy_system_allocator";

/// What every peer offers: blocks of `2^order` pages aligned to their size.
trait PagePeer {
    fn alloc(&self, order: u32) -> Option<NonNull<u8>>;
    /// # Safety
    /// `p` came from `alloc(order)` on this peer and is not used afterwards.
    unsafe fn free(&self, p: NonNull<u8>, order: u32);
}

struct AnyNormal(PageAllocator);
struct AnyNolock(PageAllocator);

impl PagePeer for AnyNormal {
    #[inline]
    fn alloc(&self, order: u32) -> Option<NonNull<u8>> {
        self.0.alloc_pages(order)
    }
    #[inline]
    unsafe fn free(&self, p: NonNull<u8>, order: u32) {
        // SAFETY: forwarded from the caller: `p` is a live block of `order`
        // from this allocator.
        unsafe { self.0.free_pages(p, order) }
    }
}

impl PagePeer for AnyNolock {
    #[inline]
    fn alloc(&self, order: u32) -> Option<NonNull<u8>> {
        self.0.alloc_pages_nolock(order)
    }
    #[inline]
    unsafe fn free(&self, p: NonNull<u8>, order: u32) {
        // SAFETY: forwarded from the caller: `p` is a live block of `order`
        // from this allocator.
        unsafe { self.0.free_pages_nolock(p, order) }
    }
}

/// `buddy_system_allocator`'s spin-locked heap over a `REGION`-byte region
/// aligned to its size.
struct Buddy {
    heap: LockedHeap<32>,
    region: *mut u8,
}

impl Buddy {
    fn new() -> Buddy {
        let layout = Layout::from_size_align(REGION, REGION).expect("region layout");
        // SAFETY: the layout has a non-zero size.
        let region = unsafe { System.alloc(layout) };
        if region.is_null() {
            out_of_memory("System", "the buddy_system_allocator region");
        }
        // SAFETY: `region` is REGION fresh writable bytes that only this
        // peer uses.
        unsafe { prefault(region, REGION) };
        let heap = LockedHeap::<32>::new();
        // SAFETY: the region is valid, unused by anything else and lives
        // until `Buddy` is dropped, after the heap's last use.
        unsafe { heap.lock().init(region as usize, REGION) };
        Buddy { heap, region }
    }

    fn layout(order: u32) -> Layout {
        let size = PAGE_SIZE << order;
        Layout::from_size_align(size, size).expect("block layout")
    }
}

impl Drop for Buddy {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(REGION, REGION).expect("region layout");
        // SAFETY: allocated in `new` with this layout; the heap that used it
        // is no longer used.
        unsafe { System.dealloc(self.region, layout) };
    }
}

impl PagePeer for Buddy {
    #[inline]
    fn alloc(&self, order: u32) -> Option<NonNull<u8>> {
        self.heap.lock().alloc(Self::layout(order)).ok()
    }
    #[inline]
    unsafe fn free(&self, p: NonNull<u8>, order: u32) {
        self.heap.lock().dealloc(p, Self::layout(order));
    }
}

/// An anyalloc page allocator over `REGION` bytes (no growth), with every
/// page touched once before timing.
fn anyalloc_pages() -> PageAllocator {
    let pa = PageAllocator::new(
        Config::default()
            .memory(REGION)
            .grow(false)
            .maintenance(false),
    )
    .unwrap_or_else(|e| panic!("PageAllocator::new: {e}"));
    let mut blocks = Vec::with_capacity(REGION / PAGE_SIZE);
    while let Some(p) = pa.alloc_pages(0) {
        blocks.push(p);
    }
    for &p in &blocks {
        // SAFETY: `p` is a page we own until it is freed below.
        unsafe { prefault(p.as_ptr(), PAGE_SIZE) };
    }
    for p in blocks {
        // SAFETY: allocated above with order 0 and not used again.
        unsafe { pa.free_pages(p, 0) };
    }
    pa.drain();
    pa
}

/// `iters` times: allocate one block and free it.
#[inline(never)]
fn pairs(name: &str, peer: &dyn PagePeer, order: u32, iters: u64) -> std::time::Duration {
    let peer = black_box(peer);
    let t = Instant::now();
    for _ in 0..iters {
        let Some(p) = peer.alloc(black_box(order)) else {
            out_of_memory(name, "a page block");
        };
        // SAFETY: `p` was just allocated with `order` and is not used again.
        unsafe { peer.free(black_box(p), order) };
    }
    t.elapsed()
}

/// `iters` times: allocate `BATCH` blocks, then free them in allocation
/// order.
#[inline(never)]
fn batches(name: &str, peer: &dyn PagePeer, order: u32, iters: u64) -> std::time::Duration {
    let peer = black_box(peer);
    let mut held = [NonNull::<u8>::dangling(); BATCH];
    let t = Instant::now();
    for _ in 0..iters {
        for slot in held.iter_mut() {
            let Some(p) = peer.alloc(black_box(order)) else {
                out_of_memory(name, "a page block");
            };
            *slot = p;
        }
        for &p in black_box(&held).iter() {
            // SAFETY: each entry was allocated with `order` in this
            // iteration and is freed exactly once.
            unsafe { peer.free(p, order) };
        }
    }
    t.elapsed()
}

fn main() {
    let opts = Options::from_args(
        "pages",
        "Page allocator benchmark: anyalloc PageAllocator (normal and nolock paths) vs buddy_system_allocator.",
    );
    progress("setting up and pre-faulting the regions");
    let normal = AnyNormal(anyalloc_pages());
    let nolock = AnyNolock(anyalloc_pages());
    let buddy = Buddy::new();
    let mut peers: Vec<(&str, &dyn PagePeer)> =
        vec![(NORMAL, &normal), (NOLOCK, &nolock), (BUDDY, &buddy)];
    peers.retain(|&(name, _)| opts.peer_selected(name));

    type Work = fn(&str, &dyn PagePeer, u32, u64) -> std::time::Duration;
    let workloads: [(String, &str, u64, Work, u32); 4] = [
        ("pair order 0".into(), "alloc+free pair", 1, pairs, 0),
        ("pair order 3".into(), "alloc+free pair", 1, pairs, 3),
        (
            format!("batch {BATCH} order 0"),
            "alloc+free (batch: all allocs, then all frees)",
            BATCH as u64,
            batches,
            0,
        ),
        (
            format!("batch {BATCH} order 3"),
            "alloc+free (batch: all allocs, then all frees)",
            BATCH as u64,
            batches,
            3,
        ),
    ];

    let mut results = Vec::new();
    for (name, op, ops_per_iter, work, order) in &workloads {
        if !opts.selected(name) || peers.is_empty() {
            continue;
        }
        progress(&format!("measuring {name}"));
        let mut ps: Vec<Peer<'_>> = peers
            .iter()
            .map(|&(pname, peer)| Peer::new(pname, move |n| work(pname, peer, *order, n)))
            .collect();
        results.push(measure(&opts, name, op, *ops_per_iter, &mut ps));
    }

    for (pname, pa) in [(NORMAL, &normal.0), (NOLOCK, &nolock.0)] {
        pa.drain();
        let s = pa.stats();
        if s.free_pages != s.total_pages || s.nolock_alloc_fail_busy + s.nolock_alloc_fail_empty > 0
        {
            progress(&format!("{pname}: unexpected state after the run: {s:?}"));
        }
    }

    let mut targets = Vec::new();
    let find = |name: &str| results.iter().find(|w| w.name == name);
    if let Some(w) = find("pair order 0") {
        targets.push(Target::new(
            "order-0 pair, anyalloc normal (per-CPU list)",
            w.median_of(NORMAL),
            15.0,
            "ns",
            "median ns per alloc+free",
        ));
    }
    for w in &results {
        let ratio = w
            .median_of(NOLOCK)
            .zip(w.median_of(NORMAL))
            .map(|(a, b)| a / b);
        targets.push(Target::new(
            format!("nolock / normal, {}", w.name),
            ratio,
            1.2,
            "x",
            "ratio of medians",
        ));
    }

    let report = Report {
        bench: "pages".into(),
        setup: vec![
            format!(
                "each peer: its own {} MiB region, every page touched before timing; calls through &dyn PagePeer",
                REGION >> 20
            ),
            format!("{NORMAL}: PageAllocator::alloc_pages / free_pages (grow off, maintenance off)"),
            format!("{NOLOCK}: PageAllocator::alloc_pages_nolock / free_pages_nolock"),
            format!("{BUDDY}: LockedHeap<32> (spin lock), Layout of 4096<<order aligned to its size"),
        ],
        options: opts,
        workloads: results,
        targets,
    };
    report.print();
}
