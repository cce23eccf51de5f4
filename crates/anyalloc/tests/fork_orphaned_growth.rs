//! An orphaned child (the `fork` module's "Orphaned locks") whose heap
//! cannot grow must still be served.
//!
//! Thread H fills heap A with 1 MiB blocks until A grows, and pauses there
//! with A's growth lock held (`Site::ZoneGrow`); the main thread, inside
//! heap B's zone lock, raises a signal whose handler forks (its prepare
//! takes nothing). In the child A is full and its growth lock stays held
//! for good: its misses give way to the lock, and the nolock path has
//! nothing of that size. Before the fix A's allocations failed there once
//! its reserve was gone ("child: 1 and 1 (accounted) of 16 blocks", 1 of
//! 1; found by a storm of forking handlers whose children went on, where
//! the children's large allocations failed, in 4 runs of 4); now such a
//! miss maps the block beside the heap, as
//! during a stalled fork (`HeapStats::fork_mapped`, which the child checks:
//! without the count, 1 of 1), plain and accounted alike.

mod handler_fork;
mod watchdog;
mod zone_holder;

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Group, Heap};

/// The block the main thread allocates under B's zone lock (above the
/// per-CPU lists, so the zone's).
const ORDER: u32 = 6;
/// A's blocks (in the child: as many).
const BLOCK: usize = 1 << 20;
const BLOCKS: usize = 16;

const GROWER: u8 = 1;
const RAISER: u8 = 2;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// 0: H has not paused yet; 1: H holds A's growth lock; 2: the signal was
/// raised; 3: H may go on.
static STEP: AtomicUsize = AtomicUsize::new(0);

fn hook(site: Site) {
    match (ROLE.get(), site) {
        (GROWER, Site::ZoneGrow) if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while STEP.load(SeqCst) < 3 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        (RAISER, Site::ZoneAlloc) if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            handler_fork::raise();
        }
        _ => {}
    }
}

/// `BLOCKS` blocks of `BLOCK` bytes from A (`group`: accounted), written
/// and freed; how many came.
fn blocks(a: &Heap, group: Option<&std::sync::Arc<Group>>) -> usize {
    let layout = Layout::from_size_align(BLOCK, 8).unwrap();
    let mut got = [std::ptr::null_mut::<u8>(); BLOCKS];
    for p in got.iter_mut() {
        let q = match group {
            None => a.alloc(layout),
            Some(g) => a.alloc_in(layout, g),
        };
        if let Some(q) = q {
            // SAFETY: a live block of BLOCK bytes.
            unsafe { q.as_ptr().write_bytes(0x5a, BLOCK) };
            *p = q.as_ptr();
        }
    }
    let n = got.iter().filter(|p| !p.is_null()).count();
    for &p in got.iter().filter(|p| !p.is_null()) {
        // SAFETY: allocated above from A, freed once.
        unsafe { a.free(std::ptr::NonNull::new_unchecked(p)) };
    }
    n
}

fn child_work(a: &Heap) -> i32 {
    let plain = blocks(a, None);
    let group = Group::new("child", None, None);
    let accounted = blocks(a, Some(&group));
    if plain != BLOCKS || accounted != BLOCKS {
        handler_fork::say(&format!(
            "child: {plain} and {accounted} (accounted) of {BLOCKS} blocks\n"
        ));
        return 1;
    }
    if group.usage() != 0 {
        handler_fork::say("child: the group still charged\n");
        return 2;
    }
    // Every block the full heap could not serve was mapped beside it, and
    // counted so.
    if a.stats().fork_mapped == 0 {
        handler_fork::say("child: no block counted as mapped beside the heap\n");
        return 3;
    }
    handler_fork::say("child: served beside the full heap\n");
    0
}

#[test]
fn a_handler_forks_while_another_thread_grows_the_heap() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_another_thread_grows_the_heap",
        Duration::from_secs(90),
        "a fork in a handler while another thread grows heap A",
    ) {
        return;
    }
    let a = Heap::new(Config::default().memory(8 << 20).maintenance(false)).expect("heap");
    let b = Heap::new(Config::default().memory(8 << 20).maintenance(false)).expect("heap");
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            ROLE.set(GROWER);
            let layout = Layout::from_size_align(BLOCK, 8).unwrap();
            // Until A grows (the blocks go with the heap).
            while STEP.load(SeqCst) == 0 {
                a.alloc(layout).expect("A grows");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while STEP.load(SeqCst) < 1 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(STEP.load(SeqCst), 1, "H did not grow A");
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
        ROLE.set(0);
        handler_fork::finish_in_child(|| child_work(&a));
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        let status = handler_fork::reap(Duration::from_secs(30));
        STEP.store(3, SeqCst);
        h.join().unwrap();
        handler_fork::assert_child_ok(status);
    });
    set_hook(None);
}
