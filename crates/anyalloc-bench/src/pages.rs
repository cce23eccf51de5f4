//! Workload 6 (and the `pages` binary): page allocator alloc+free cost,
//! anyalloc `PageAllocator` (normal and nolock paths) against
//! `buddy_system_allocator`, interleaved over several rounds.
//!
//! Every peer manages its own region of the same size, pre-faulted before
//! timing, and is called through the same `&dyn PagePeer` interface (one
//! dynamic call per alloc and per free, for every peer alike).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyalloc::{Config, PageAllocator, PAGE_SIZE};
use buddy_system_allocator::LockedHeap;

use crate::{
    measure, out_of_memory, prefault, progress, Options, Peer, Report, Target, WorkloadResult,
};

/// Bytes each peer manages.
const REGION: usize = 32 << 20;
/// Allocations per batch in the batch workloads.
const BATCH: usize = 64;

pub const NORMAL: &str = "anyalloc normal";
pub const NOLOCK: &str = "anyalloc nolock";
pub const BUDDY: &str = "buddy_system_allocator";
/// The reference row of the page pairs (see [`crate::rseq_floor`]).
pub const FLOOR: &str = "reference: bare rseq per-CPU pop+push";

/// What every peer offers: blocks of `2^order` pages aligned to their size.
pub trait PagePeer {
    fn alloc(&self, order: u32) -> Option<NonNull<u8>>;
    /// # Safety
    /// `p` came from `alloc(order)` on this peer and is not used afterwards.
    unsafe fn free(&self, p: NonNull<u8>, order: u32);
}

pub struct AnyNormal(pub PageAllocator);
pub struct AnyNolock(pub PageAllocator);

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
pub struct Buddy {
    heap: LockedHeap<32>,
    region: *mut u8,
}

impl Buddy {
    pub fn new() -> Buddy {
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

impl Default for Buddy {
    fn default() -> Self {
        Self::new()
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
pub fn anyalloc_pages() -> PageAllocator {
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
pub fn pairs(name: &str, peer: &dyn PagePeer, order: u32, iters: u64) -> std::time::Duration {
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
pub fn batches(name: &str, peer: &dyn PagePeer, order: u32, iters: u64) -> std::time::Duration {
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

/// A page workload: name, op, ops per iteration, loop, order.
pub type PageWork = (
    String,
    &'static str,
    u64,
    fn(&str, &dyn PagePeer, u32, u64) -> Duration,
    u32,
);

/// Pairs of orders 0 to 3 (per-CPU lists) and 6 and 10 (256 KiB and
/// 4 MiB: the buddy lists, on the nolock path under a tried zone lock),
/// batches of orders 0 and 3.
pub fn workloads() -> Vec<PageWork> {
    let mut v: Vec<PageWork> = (0..=3)
        .chain([6, anyalloc::MAX_ORDER])
        .map(|order| {
            (
                format!("page pair order {order}"),
                "alloc+free pair",
                1,
                pairs as fn(&str, &dyn PagePeer, u32, u64) -> Duration,
                order,
            )
        })
        .collect();
    for order in [0, 3] {
        v.push((
            format!("page batch {BATCH} order {order}"),
            "alloc+free (batch: all allocs, then all frees)",
            BATCH as u64,
            batches,
            order,
        ));
    }
    v
}

/// The three page peers, each over its own pre-faulted region, and the
/// bare rseq floor (a reference row of the pairs).
pub struct PagePeers {
    /// anyalloc normal path.
    pub normal: AnyNormal,
    /// anyalloc nolock path.
    pub nolock: AnyNolock,
    /// buddy_system_allocator.
    pub buddy: Buddy,
    /// The bare rseq floor, or why it is skipped.
    pub floor: Result<Box<dyn PagePeer>, String>,
}

/// The bare rseq floor where it can run (x86-64 glibc with rseq).
fn floor() -> Result<Box<dyn PagePeer>, String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    {
        crate::rseq_floor::RseqFloor::new().map(|f| Box::new(f) as Box<dyn PagePeer>)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    {
        Err("the bare rseq floor is written for x86-64 Linux with glibc only".into())
    }
}

impl PagePeers {
    /// Sets up and pre-faults every region.
    pub fn new() -> Self {
        progress("setting up and pre-faulting the page regions");
        PagePeers {
            normal: AnyNormal(anyalloc_pages()),
            nolock: AnyNolock(anyalloc_pages()),
            buddy: Buddy::new(),
            floor: floor().inspect_err(|e| progress(&format!("{FLOOR}: skipped: {e}"))),
        }
    }

    /// The peers that pass `--peer`.
    pub fn list(&self, opts: &Options) -> Vec<(&'static str, &dyn PagePeer)> {
        let mut peers: Vec<(&'static str, &dyn PagePeer)> = vec![
            (NORMAL, &self.normal),
            (NOLOCK, &self.nolock),
            (BUDDY, &self.buddy),
        ];
        peers.retain(|&(name, _)| opts.peer_selected(name));
        peers
    }

    /// After the run: every page free again, no nolock failure.
    /// (notes for the set-up, leaks): a leak is a page not free after the
    /// run and a drain.
    pub fn check(&self) -> (Vec<String>, Vec<String>) {
        let mut lines = Vec::new();
        let mut leaks = Vec::new();
        if let Err(e) = &self.floor {
            lines.push(format!("{FLOOR}: skipped: {e}"));
        }
        for (pname, pa) in [(NORMAL, &self.normal.0), (NOLOCK, &self.nolock.0)] {
            pa.drain();
            let s = pa.stats();
            if s.free_pages != s.total_pages
                || s.nolock_alloc_fail_busy + s.nolock_alloc_fail_empty > 0
            {
                let line = format!("{pname}: unexpected state after the run: {s:?}");
                progress(&line);
                if s.free_pages != s.total_pages {
                    leaks.push(format!(
                        "{pname}: {} of {} pages not free",
                        s.total_pages - s.free_pages,
                        s.total_pages
                    ));
                }
                lines.push(line);
            }
        }
        (lines, leaks)
    }
}

impl Default for PagePeers {
    fn default() -> Self {
        Self::new()
    }
}

/// Measures the page workloads that pass `opts.filter` (matched against
/// `prefix` + name).
pub fn run(opts: &Options, peers: &PagePeers, prefix: &str) -> Vec<WorkloadResult> {
    let list = peers.list(opts);
    let mut results = Vec::new();
    if list.is_empty() {
        return results;
    }
    for (name, op, ops_per_iter, work, order) in workloads() {
        if !opts.selected(&format!("{prefix}{name}")) {
            continue;
        }
        progress(&format!("measuring {name}"));
        let mut ps: Vec<Peer<'_>> = list
            .iter()
            .map(|&(pname, peer)| Peer::new(pname, move |n| work(pname, peer, order, n)))
            .collect();
        // The floor is a reference for the pairs (one pop, one push) of the
        // orders a per-CPU list holds.
        let pcp_pair = ops_per_iter == 1 && order <= anyalloc::PCP_MAX_ORDER;
        if let (Ok(f), true) = (&peers.floor, pcp_pair && opts.peer_selected(FLOOR)) {
            let f: &dyn PagePeer = f.as_ref();
            ps.push(Peer::reference(FLOOR, move |n| work(FLOOR, f, order, n)));
        }
        results.push(measure(opts, &name, op, ops_per_iter, &mut ps));
    }
    results
}

/// Order-0 pair <= 15 ns on the normal path; nolock / normal <= 1.2.
pub fn targets(results: &[WorkloadResult]) -> Vec<Target> {
    let mut targets = Vec::new();
    if let Some(w) = results.iter().find(|w| w.name == "page pair order 0") {
        targets.push(Target::new(
            "order-0 page pair, anyalloc normal / bare rseq floor",
            w.median_of(NORMAL)
                .zip(w.median_of(FLOOR))
                .map(|(a, b)| a / b),
            3.0,
            "x",
            "ratio of medians: the cost over a per-CPU pop+push in restartable sequences",
        ));
        targets.push(Target::new(
            "order-0 page pair, anyalloc normal",
            w.median_of(NORMAL),
            15.0,
            "ns",
            "median ns per alloc+free",
        ));
        targets.push(Target::new(
            "order-0 page pair, anyalloc nolock",
            w.median_of(NOLOCK),
            15.0,
            "ns",
            "median ns per alloc+free",
        ));
    }
    for w in results {
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
    targets
}

/// Set-up lines for reports.
pub fn setup_lines() -> Vec<String> {
    vec![
        format!(
            "pages: each peer its own {} MiB region, every page touched before timing; calls through &dyn PagePeer",
            REGION >> 20
        ),
        format!("{NORMAL}: PageAllocator::alloc_pages / free_pages (grow off, maintenance off); {NOLOCK}: alloc_pages_nolock / free_pages_nolock"),
        format!("{BUDDY}: LockedHeap<32> (spin lock), Layout of 4096<<order aligned to its size"),
        format!("{FLOOR} (pairs only): a per-CPU array pop and push, each a restartable sequence (x86-64 rseq), nothing else; the physical floor of a per-CPU cache"),
    ]
}

/// The `pages` binary.
pub fn bin_main() {
    let opts = Options::from_args(
        "pages",
        "Page allocator benchmark: anyalloc PageAllocator (normal and nolock paths) vs buddy_system_allocator.",
    );
    let peers = PagePeers::new();
    let results = run(&opts, &peers, "");
    let mut setup = setup_lines();
    let (notes, leaks) = peers.check();
    setup.extend(notes);
    setup.extend(leaks);
    let report = Report {
        bench: "pages".into(),
        setup,
        options: opts.clone(),
        targets: targets(&results),
        workloads: results,
    };
    report.print();
}
