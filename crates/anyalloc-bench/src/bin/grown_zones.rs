//! `grown_zones`: what a free costs when its object lies in a zone that
//! growth added, against one in the first zone.
//!
//! The first zone's page lookup is an inline window; the others' is the zone
//! map (`page::zone_map`), reached through an out-of-line copy of the same
//! fast route. Two heaps: in one (a 64 MiB first zone), objects come from
//! the first zone; in the other (a 1 MiB first zone), the first zone is
//! used up by pages held through its page allocator before anything else,
//! so every object comes from a grown zone (checked: its 4 MiB granule is
//! not the first zone's). Each round times a 64 B `alloc` + `free_sized`
//! pair, a batch of 1000 x 64 B (all allocations, then all frees), and a
//! 16 KiB and a 64 KiB pair (page blocks of orders 2 and 4: the per-CPU
//! page lists of the block's zone), and an order-0 nolock pair of the
//! heap's page allocator, on both heaps, alternating; the medians over the
//! rounds are printed, and their ratios.
//! Informational: no target, no exit code but for a setup that went wrong.
//!
//! `cargo run --release -p anyalloc-bench --bin grown_zones [-- ROUNDS]`

use std::alloc::Layout;
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use anyalloc::{Config, Heap};

const PAIRS: usize = 2_000_000;
const BATCHES: usize = 2_000;

fn heap(first_zone: usize) -> Heap {
    Heap::new(Config::default().memory(first_zone)).expect("a heap")
}

/// ns per alloc+free pair, over `n` pairs.
fn pairs(h: &Heap, l: Layout, n: usize) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let p = h.alloc(l).expect("memory to spare");
        // SAFETY: a live block of `l`, freed once.
        unsafe { h.free_sized(black_box(p), l) };
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// ns per `alloc_pages_nolock(0)` + `free_pages_nolock` pair of the
/// heap's page allocator.
fn page_nolock_pairs(h: &Heap, n: usize) -> f64 {
    let pages = h.pages();
    let t = Instant::now();
    for _ in 0..n {
        let p = pages
            .alloc_pages_nolock(0)
            .expect("an idle allocator serves nolock calls");
        // SAFETY: a live order-0 block, freed once.
        unsafe { pages.free_pages_nolock(black_box(p), 0) };
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// ns per object of a 1000-object batch (alloc and free).
fn batch(h: &Heap, l: Layout, v: &mut Vec<NonNull<u8>>) -> f64 {
    let t = Instant::now();
    for _ in 0..BATCHES {
        for _ in 0..1000 {
            v.push(h.alloc(l).expect("memory to spare"));
        }
        for p in v.drain(..) {
            // SAFETY: live blocks of `l`, each freed once.
            unsafe { h.free_sized(black_box(p), l) };
        }
    }
    t.elapsed().as_nanos() as f64 / (BATCHES * 1000) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS: a number"))
        .unwrap_or(11);
    let l = Layout::from_size_align(64, 8).unwrap();
    let page = Layout::from_size_align(16 << 10, 8).unwrap();
    let page4 = Layout::from_size_align(64 << 10, 8).unwrap();
    let first = heap(64 << 20);
    let grown = heap(1 << 20);
    let mut held = Vec::new();
    let first_granule = grown
        .pages()
        .alloc_pages(0)
        .expect("a fresh heap has pages");
    held.push(first_granule);
    while grown.stats().pages.zones < 2 {
        held.push(grown.pages().alloc_pages(0).expect("the heap grows"));
    }
    for layout in [l, page, page4] {
        let probe = grown.alloc(layout).expect("memory to spare");
        let in_grown = probe.as_ptr() as usize >> 22 != first_granule.as_ptr() as usize >> 22;
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { grown.free_sized(probe, layout) };
        if !in_grown {
            eprintln!("grown_zones: the second heap's blocks are still in its first zone");
            std::process::exit(1);
        }
    }
    let mut v = Vec::with_capacity(1000);
    // Per row, per heap (first, grown): the rounds' figures.
    let mut rows: [[Vec<f64>; 2]; 5] = Default::default();
    for r in 0..rounds {
        // The starting heap alternates.
        for which in [r % 2, 1 - r % 2] {
            let h = if which == 0 { &first } else { &grown };
            let figures = [
                pairs(h, l, PAIRS),
                batch(h, l, &mut v),
                pairs(h, page, PAIRS / 10),
                pairs(h, page4, PAIRS / 10),
                page_nolock_pairs(h, PAIRS / 10),
            ];
            for (row, x) in rows.iter_mut().zip(figures) {
                row[which].push(x);
            }
        }
    }
    println!("Heap::alloc + free_sized (the last row: its page allocator's");
    println!("alloc_pages_nolock(0) + free_pages_nolock), medians of {rounds} rounds (ns)");
    println!("                          first zone   grown zone   grown / first");
    let names = [
        "64 B pair",
        "64 B batch 1000, /obj",
        "16 KiB pair",
        "64 KiB pair",
        "page nolock pair",
    ];
    for (what, [a, b]) in names.into_iter().zip(rows) {
        let (a, b) = (median(a), median(b));
        println!("  {what:<22}{a:12.2}{b:13.2}{:15.2}x", b / a);
    }
    for p in held {
        // SAFETY: allocated through the heap's page allocator with order 0.
        unsafe { grown.pages().free_pages(p, 0) };
    }
}
