//! Accounting against a ground truth, under a nested signal storm: handlers
//! charge a three-level tree of groups with `alloc_nolock_in` and free with
//! `free_nolock`; threads allocate into the same groups with `alloc_in`
//! (objects, large and huge blocks) and free with `free`, and now and then
//! make a short-lived group, charge a few blocks to it and drop their
//! reference to it while the blocks live. Every success adds the block's
//! usable size to a count of its group's, every free takes it off. Limits
//! refuse some charges; no `usage` ever reads above its group's limit. At
//! the end, with blocks still live, every group's `usage` is exactly the
//! sum of its subtree's counts; with everything freed, 0, and the
//! short-lived groups are gone.

use anyalloc::{Config, Group, Heap};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::{
    inside, install_handler, mix64, storm_signals, HandlerEntry, Stash, StormCounts, ThreadTimer,
    XorShift,
};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The tree: 0 root (limit), 1 `a` (limit) under it, 2 `a1` and 3 `a2`
/// (a tight limit) under `a`, 4 `b` under the root, 5 `b1` under `b`. Kind
/// 6 stands for the short-lived groups, all under `b1`.
const GROUPS: usize = 6;
const SHORT: usize = 6;
const PARENT: [Option<usize>; GROUPS + 1] =
    [None, Some(0), Some(1), Some(1), Some(0), Some(4), Some(5)];
const LIMIT: [Option<usize>; GROUPS] = [
    Some(160 << 20),
    Some(24 << 20),
    None,
    Some(2 << 20),
    None,
    None,
];

static HEAP: OnceLock<Heap> = OnceLock::new();
static TREE: OnceLock<Vec<Arc<Group>>> = OnceLock::new();
static STASH: Stash<512> = Stash::new();
/// Live bytes charged to each kind's group, by this test's count.
static TRUTH: [AtomicUsize; GROUPS + 1] = [const { AtomicUsize::new(0) }; GROUPS + 1];
static RNG: AtomicU64 = AtomicU64::new(1);
static COUNTS: StormCounts = StormCounts::new();
static HANDLER_OK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static RUNNING: AtomicBool = AtomicBool::new(true);

/// Records a new block of group `kind`: filled, counted. Its entry.
///
/// # Safety
/// The caller owns the fresh block `p` of at least `size >= 8` bytes.
unsafe fn record(heap: &Heap, p: NonNull<u8>, size: usize, kind: usize) -> usize {
    let e = Entry::fresh(p.as_ptr() as usize, kind);
    // SAFETY: per the caller.
    unsafe { pattern::fill(e, size) };
    TRUTH[kind].fetch_add(heap.usable_size(p), Relaxed);
    e.0
}

/// Uncounts the block of entry `e` (checking its pattern) and returns its
/// pointer, to be freed.
///
/// # Safety
/// The caller owns the live block of `e`, recorded by `record`.
unsafe fn forget(heap: &Heap, e: usize) -> NonNull<u8> {
    let e = Entry(e);
    // SAFETY: per the caller.
    if unsafe { pattern::verify(e) }.is_err() {
        VIOLATIONS.fetch_add(1, Relaxed);
    }
    // SAFETY: an entry's address is a live block, never null.
    let p = unsafe { NonNull::new_unchecked(e.ptr()) };
    TRUTH[e.kind()].fetch_sub(heap.usable_size(p), Relaxed);
    p
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let entry = HandlerEntry::enter();
    if !RUNNING.load(Relaxed) {
        return;
    }
    COUNTS.record(&entry);
    let (Some(heap), Some(tree)) = (HEAP.get(), TREE.get()) else {
        return;
    };
    let r = mix64(RNG.fetch_add(1, Relaxed));
    for k in 0..4u64 {
        let r = mix64(r ^ k);
        if r.is_multiple_of(3) {
            if let Some(e) = STASH.take(r as usize) {
                // SAFETY: stashed blocks are live, recorded, and owned by
                // whoever took them out.
                unsafe { heap.free_nolock(forget(heap, e)) };
            }
            continue;
        }
        // Objects and large blocks (up to 48 KiB).
        let size = 16 + (r >> 8) as usize % if r & 0x80 == 0 { 4000 } else { 48 << 10 };
        let kind = 1 + (r >> 24) as usize % (GROUPS - 1);
        let layout = Layout::from_size_align(size, 8).unwrap();
        if let Some(p) = heap.alloc_nolock_in(layout, &tree[kind]) {
            HANDLER_OK.fetch_add(1, Relaxed);
            // SAFETY: a fresh block of `size` bytes.
            let e = unsafe { record(heap, p, size, kind) };
            if !STASH.put(e, r as usize) {
                // SAFETY: not stashed: still ours.
                unsafe { heap.free_nolock(forget(heap, e)) };
            }
        }
    }
}

/// The sum of the counts of `g`'s subtree.
fn truth_below(g: usize) -> usize {
    (0..=GROUPS)
        .filter(|&k| {
            let mut x = Some(k);
            while let Some(y) = x {
                if y == g {
                    return true;
                }
                x = PARENT[y];
            }
            false
        })
        .map(|k| TRUTH[k].load(Relaxed))
        .sum()
}

#[test]
fn usage_matches_a_ground_truth_after_a_storm() {
    // No maintenance thread: its drop of a released group (which gives
    // the group's stock back to the parent) would race with the `usage`
    // reads checked below.
    let heap = HEAP
        .get_or_init(|| Heap::new(Config::default().memory(256 << 20).maintenance(false)).unwrap());
    let tree = TREE.get_or_init(|| {
        let mut t: Vec<Arc<Group>> = Vec::new();
        for g in 0..GROUPS {
            let parent = PARENT[g].map(|p| &t[p]);
            let made = Group::new(&format!("g{g}"), LIMIT[g], parent);
            t.push(made);
        }
        t
    });
    let [sa, sb] = storm_signals();
    install_handler(sa, handler, &[]).expect("sigaction A");
    install_handler(sb, handler, &[]).expect("sigaction B");
    // The short-lived groups, to see them go.
    let shorts: Arc<std::sync::Mutex<Vec<Weak<Group>>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let done = done.clone();
        std::thread::spawn(move || {
            let tree = TREE.get().unwrap();
            let mut reads = 0u64;
            while !done.load(Relaxed) {
                for (g, group) in tree.iter().enumerate() {
                    let u = group.usage();
                    if let Some(l) = LIMIT[g] {
                        assert!(u <= l, "{} read {u} above its limit {l}", group.name());
                    }
                    assert!(u < 1 << 40, "{} read {u}: below zero", group.name());
                    reads += 1;
                }
                std::thread::yield_now();
            }
            reads
        })
    };
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let shorts = shorts.clone();
            std::thread::spawn(move || {
                let heap = HEAP.get().unwrap();
                let tree = TREE.get().unwrap();
                let [sa, sb] = storm_signals();
                let _ta = ThreadTimer::start(sa, Duration::from_micros(100), 0).expect("timer A");
                let _tb = ThreadTimer::start(sb, Duration::from_micros(330), 0).expect("timer B");
                let mut rng = XorShift::new(t + 11);
                let mut held: Vec<usize> = Vec::new();
                let start = Instant::now();
                let mut first = true;
                while start.elapsed() < Duration::from_secs(2) {
                    // The first round makes a short-lived group, however
                    // few rounds the storm leaves the worker (a debug
                    // build's handlers check patterns at length).
                    let roll = if first { 0 } else { rng.below(1000) };
                    first = false;
                    if roll < 3 {
                        // A short-lived group: a few blocks, then our
                        // reference goes while they live.
                        let short = Group::new("short", None, Some(&tree[5]));
                        shorts.lock().unwrap().push(Arc::downgrade(&short));
                        for _ in 0..4 {
                            let size = 16 + rng.below(3000) as usize;
                            let l = Layout::from_size_align(size, 8).unwrap();
                            if let Some(p) = inside(|| heap.alloc_in(l, &short)) {
                                // SAFETY: a fresh block of `size` bytes.
                                held.push(unsafe { record(heap, p, size, SHORT) });
                            }
                        }
                    } else if held.len() < 400 && roll < 520 {
                        let size = match rng.below(100) {
                            0 => (4 << 20) + 1 + rng.below(2 << 20) as usize, // huge
                            1..=5 => 16 + rng.below(1 << 20) as usize,        // large
                            _ => 16 + rng.below(4000) as usize,
                        };
                        let kind = 1 + rng.below(GROUPS as u64 - 1) as usize;
                        let l = Layout::from_size_align(size, 8).unwrap();
                        if let Some(p) = inside(|| heap.alloc_in(l, &tree[kind])) {
                            // SAFETY: a fresh block of `size` bytes.
                            held.push(unsafe { record(heap, p, size, kind) });
                        }
                    } else if !held.is_empty() {
                        let e = held.swap_remove(rng.below(held.len() as u64) as usize);
                        // SAFETY: our live, recorded block.
                        unsafe {
                            let p = forget(heap, e);
                            inside(|| heap.free(p));
                        }
                    }
                }
                held
            })
        })
        .collect();
    let mut leftovers: Vec<usize> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    RUNNING.store(false, Relaxed);
    done.store(true, Relaxed);
    let reads = monitor.join().unwrap();
    std::thread::sleep(Duration::from_millis(20)); // queued signals run out
    leftovers.extend(STASH.drain());
    println!(
        "signals {}, nested {}, interrupted inside an allocator call {}, handler charges ok {}, \
         live blocks {}, short-lived groups {}, usage reads {reads}, failcnt {:?}",
        COUNTS.signals(),
        COUNTS.nested(),
        COUNTS.inside(),
        HANDLER_OK.load(Relaxed),
        leftovers.len(),
        shorts.lock().unwrap().len(),
        tree.iter().map(|g| g.failcnt()).collect::<Vec<_>>(),
    );
    assert_eq!(VIOLATIONS.load(Relaxed), 0);
    COUNTS.assert_storm();
    assert!(HANDLER_OK.load(Relaxed) > 1000, "the handlers charged");
    assert!(!shorts.lock().unwrap().is_empty(), "no short-lived group");
    // Blocks still live: every usage is its subtree's count (the released
    // groups dropped first: short-lived ones whose blocks are all freed).
    heap.drain();
    for (g, group) in tree.iter().enumerate() {
        assert_eq!(
            group.usage(),
            truth_below(g),
            "{} with blocks live",
            group.name()
        );
        assert!(group.peak() >= group.usage());
    }
    assert!(tree[0].usage() > 0, "blocks live at the end");
    for e in leftovers {
        // SAFETY: every remaining block is live, recorded and ours now.
        unsafe { heap.free(forget(heap, e)) };
    }
    for (g, group) in tree.iter().enumerate() {
        assert_eq!(truth_below(g), 0);
        assert_eq!(group.usage(), 0, "{} with everything freed", group.name());
    }
    heap.drain();
    for w in shorts.lock().unwrap().iter() {
        assert_eq!(
            w.strong_count(),
            0,
            "a short-lived group outlived its blocks"
        );
    }
    let s = heap.pages().stats();
    assert_eq!(s.free_pages, s.total_pages);
}
