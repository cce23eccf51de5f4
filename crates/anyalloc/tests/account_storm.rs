//! Accounting under a nested signal storm: handlers charge groups with
//! `alloc_nolock_in` and free with `free_nolock` while threads churn with
//! `alloc_in` / `free`; every group's usage is exactly 0 at the end. The
//! storm counts, and asserts, signals that interrupted another handler
//! (nesting) and signals that interrupted a thread inside `alloc_in` /
//! `free` (re-entry).

use anyalloc::{Config, Group, Heap};
use anyalloc_storm::pattern::{self, Entry};
use anyalloc_storm::{
    inside, install_handler, mix64, storm_signals, HandlerEntry, Stash, StormCounts, ThreadTimer,
    XorShift,
};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static HEAP: OnceLock<Heap> = OnceLock::new();
static GROUPS: OnceLock<[Arc<Group>; 3]> = OnceLock::new();
static STASH: Stash<512> = Stash::new();
static RNG: AtomicU64 = AtomicU64::new(1);
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
static OK: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static COUNTS: StormCounts = StormCounts::new();
static RUNNING: AtomicBool = AtomicBool::new(true);

/// Kinds of a block's owner tag: charged by a handler, or by a thread.
const KIND_HANDLER: usize = 1;
const KIND_THREAD: usize = 2;

/// The entry (address and owner tag: `kind`, a fresh nonce) of a new block
/// of `size` bytes, filled with the kit's owner-tagged pattern.
///
/// # Safety
/// The caller owns `size >= 8` bytes at `p`.
unsafe fn fill(p: NonNull<u8>, size: usize, kind: usize) -> usize {
    let e = Entry::fresh(p.as_ptr() as usize, kind);
    // SAFETY: per the caller.
    unsafe { pattern::fill(e, size) };
    e.0
}

/// Whether the block behind `e` still holds its owner's pattern (its size
/// read from its header); its pointer.
///
/// # Safety
/// The caller owns the block, which was filled by `fill`.
unsafe fn check(e: usize) -> (bool, NonNull<u8>) {
    let e = Entry(e);
    // SAFETY: per the caller; an entry's address is never null.
    unsafe { (pattern::verify(e).is_ok(), NonNull::new_unchecked(e.ptr())) }
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Held until the handler returns: its nesting level.
    let entry = HandlerEntry::enter();
    if !RUNNING.load(Relaxed) {
        return;
    }
    COUNTS.record(&entry);
    let (Some(heap), Some(groups)) = (HEAP.get(), GROUPS.get()) else {
        return;
    };
    let r = mix64(RNG.fetch_add(1, Relaxed));
    for k in 0..4u64 {
        let r = mix64(r ^ k);
        if r.is_multiple_of(3) {
            if let Some(e) = STASH.take(r as usize) {
                // SAFETY: stashed blocks are live allocations of HEAP, owned
                // by whoever swapped them out.
                unsafe {
                    let (intact, p) = check(e);
                    if !intact {
                        VIOLATIONS.fetch_add(1, Relaxed);
                    }
                    heap.free_nolock(p);
                }
            }
            continue;
        }
        let size = 16 + (r >> 8) as usize % 4000;
        let g = &groups[1 + (r >> 20) as usize % 2];
        ATTEMPTS.fetch_add(1, Relaxed);
        if let Some(p) = heap.alloc_nolock_in(Layout::from_size_align(size, 8).unwrap(), g) {
            OK.fetch_add(1, Relaxed);
            // SAFETY: a fresh block of `size` bytes.
            let e = unsafe { fill(p, size, KIND_HANDLER) };
            if !STASH.put(e, r as usize) {
                // SAFETY: not stashed: still ours.
                unsafe { heap.free_nolock(p) };
            }
        }
    }
}

#[test]
fn usage_is_zero_after_a_storm_of_charged_nolock_allocations() {
    let heap = HEAP.get_or_init(|| Heap::new(Config::default().memory(256 << 20)).unwrap());
    let root = Group::new("root", Some(200 << 20), None);
    let a = Group::new("a", Some(100 << 20), Some(&root));
    let b = Group::new("b", None, Some(&root));
    let groups = GROUPS.get_or_init(|| [root.clone(), a.clone(), b.clone()]);
    let [sa, sb] = storm_signals();
    install_handler(sa, handler, &[]).expect("sigaction A");
    install_handler(sb, handler, &[]).expect("sigaction B");
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                let heap = HEAP.get().unwrap();
                let groups = GROUPS.get().unwrap();
                let [sa, sb] = storm_signals();
                let _ta = ThreadTimer::start(sa, Duration::from_micros(100), 0).expect("timer A");
                let _tb = ThreadTimer::start(sb, Duration::from_micros(330), 0).expect("timer B");
                let mut rng = XorShift::new(t + 7);
                let mut held: Vec<usize> = Vec::new();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(2) {
                    if held.len() < 500 && rng.below(2) == 0 {
                        let size = 16 + rng.below(4000) as usize;
                        let g = &groups[1 + rng.below(2) as usize];
                        let l = Layout::from_size_align(size, 8).unwrap();
                        let p = inside(|| heap.alloc_in(l, g)).expect("memory to spare");
                        // SAFETY: fresh block of `size` bytes.
                        held.push(unsafe { fill(p, size, KIND_THREAD) });
                    } else if !held.is_empty() {
                        let e = held.swap_remove(rng.below(held.len() as u64) as usize);
                        // SAFETY: our live block.
                        unsafe {
                            let (intact, p) = check(e);
                            if !intact {
                                VIOLATIONS.fetch_add(1, Relaxed);
                            }
                            inside(|| heap.free(p));
                        }
                    }
                }
                held
            })
        })
        .collect();
    let leftovers: Vec<usize> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    RUNNING.store(false, Relaxed);
    std::thread::sleep(Duration::from_millis(20)); // queued signals run out
    for e in leftovers
        .into_iter()
        .chain(STASH.drain().collect::<Vec<_>>())
    {
        // SAFETY: every remaining block is live and owned by us now.
        unsafe {
            let (intact, p) = check(e);
            assert!(intact, "pattern damaged at {p:?}");
            heap.free(p);
        }
    }
    let (attempts, ok) = (ATTEMPTS.load(Relaxed), OK.load(Relaxed));
    println!(
        "signals {}, nested {}, interrupted inside an allocator call {}, \
         charged nolock attempts {attempts}, ok {ok} ({:.4}%), root peak {} KiB",
        COUNTS.signals(),
        COUNTS.nested(),
        COUNTS.inside(),
        100.0 * ok as f64 / attempts.max(1) as f64,
        root.peak() >> 10
    );
    assert_eq!(VIOLATIONS.load(Relaxed), 0);
    COUNTS.assert_storm();
    assert!(
        ok * 1000 >= attempts * 999,
        "charged nolock success below 99.9%"
    );
    for g in groups {
        assert_eq!(g.usage(), 0, "group {} still charged", g.name());
        assert_eq!(g.failcnt(), 0, "no limit was reached");
    }
    heap.drain();
    let s = heap.pages().stats();
    assert_eq!(s.free_pages, s.total_pages);
}
