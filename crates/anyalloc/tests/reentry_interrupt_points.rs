//! Re-entry, deterministically (feature `interrupt-points`): a
//! "signal handler" that uses the normal path (`Global`, and the global
//! heap's `Heap` / `PageAllocator` entries directly) right where a `NoLock`
//! call of its own thread holds a lock taken with `try_lock`.
//!
//! The hook runs at one chosen site of one nolock operation of the test
//! thread, exactly as a handler interrupting it there would:
//!
//! * `PcpRefill` under `alloc_pages_nolock` (a `NoLock` 16 KiB block): the
//!   zone lock is held by a try-lock;
//! * `SheafRefill` under `alloc_nolock` (a `NoLock` 256-byte box): the
//!   class's node lock is held by a try-lock, and the level-0 slot too;
//! * `NolockZoneFree` under `free_pages_nolock` (a `NoLock` free of a
//!   128 KiB block, which has no per-CPU list): the zone lock again.
//!
//! There the hook calls every normal-path entry that could wait for that
//! lock: `Global` (small and large, alloc and free), `Heap::alloc`,
//! `alloc_zeroed`, `alloc_in`, `free`, `drain`, `maintain`,
//! `PageAllocator::alloc_pages`, `free_pages`, `drain`. Before the fix the
//! first of them waits forever for its own thread; now each takes the
//! nolock route (and may fail). Each scenario runs in a child process under
//! a watchdog, so a deadlock fails the test.

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::Duration;

use allocator_api2::boxed::Box as NBox;
use allocator_api2::vec::Vec as NVec;
use anyalloc::interrupt::{self, Site};
use anyalloc::{Global, Group, NoLock};

#[global_allocator]
static A: Global = Global;

/// The site the hook fires at (once), as `Site as u8 + 1`; 0: disarmed.
static ARMED: AtomicU8 = AtomicU8::new(0);
static FIRED: AtomicU32 = AtomicU32::new(0);
/// Normal-path calls the hook made that returned.
static RETURNED: AtomicU32 = AtomicU32::new(0);
/// Order-5 (128 KiB) requests on the normal path that went through the page
/// allocator's nolock path for large orders (its `nolock_large_alloc_*`
/// counters moved, whether they were served or not): each proves the call
/// was routed (the normal path never touches those counters).
static ROUTED: AtomicU32 = AtomicU32::new(0);

/// The page allocator's large nolock allocations so far, served or not.
fn nolock_large(pages: &anyalloc::PageAllocator) -> u64 {
    let s = pages.stats();
    s.nolock_large_alloc_ok + s.nolock_large_alloc_fail_busy + s.nolock_large_alloc_fail_empty
}

/// Counts one routed call if `f` moved the large nolock counters.
fn routed<R>(pages: &anyalloc::PageAllocator, f: impl FnOnce() -> R) -> R {
    let before = nolock_large(pages);
    let r = f();
    if nolock_large(pages) > before {
        ROUTED.fetch_add(1, Ordering::SeqCst);
    }
    r
}

fn arm(site: Site) {
    FIRED.store(0, Ordering::SeqCst);
    ARMED.store(site as u8 + 1, Ordering::SeqCst);
}

fn hook(site: Site) {
    let want = site as u8 + 1;
    if ARMED.load(Ordering::Relaxed) != want
        || ARMED
            .compare_exchange(want, 0, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    FIRED.fetch_add(1, Ordering::SeqCst);
    normal_calls();
}

/// Every normal-path entry a handler could reach; each must return.
fn normal_calls() {
    let heap = anyalloc::global_heap().expect("the global heap exists");
    let done = || RETURNED.fetch_add(1, Ordering::SeqCst);
    // Global, small and large (a large block takes the zone lock directly
    // on the normal path). Fallible: the nolock route may fail.
    let mut small: Vec<u8> = Vec::new();
    if small.try_reserve_exact(256).is_ok() {
        small.extend_from_slice(&[1; 256]);
    }
    drop(small);
    done();
    let mut large: Vec<u8> = Vec::new();
    if routed(heap.pages(), || large.try_reserve_exact(128 << 10)).is_ok() {
        large.push(1);
    }
    drop(large);
    done();
    // The heap's normal entries.
    for size in [256usize, 16 << 10, 64 << 10, 128 << 10] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let p = if size == 128 << 10 {
            routed(heap.pages(), || heap.alloc(layout))
        } else {
            heap.alloc(layout)
        };
        if let Some(p) = p {
            // SAFETY: allocated just above, freed once.
            unsafe { heap.free(p) };
        }
        if let Some(p) = heap.alloc_zeroed(layout) {
            // SAFETY: as above.
            unsafe { heap.free(p) };
        }
        done();
    }
    let group = GROUP.with(|g| g.clone());
    if let Some(p) = heap.alloc_in(Layout::from_size_align(512, 8).unwrap(), &group) {
        // SAFETY: allocated just above, freed once.
        unsafe { heap.free(p) };
    }
    done();
    heap.drain();
    done();
    heap.maintain();
    done();
    // The page allocator's normal entries.
    let pages = heap.pages();
    for order in [0u32, 2, 4, 5] {
        let p = if order == 5 {
            routed(pages, || pages.alloc_pages(order))
        } else {
            pages.alloc_pages(order)
        };
        if let Some(p) = p {
            // SAFETY: allocated just above with this order, freed once.
            unsafe { pages.free_pages(p, order) };
        }
        done();
    }
    pages.drain();
    done();
}

/// Normal-path calls `normal_calls` makes that must return.
const CALLS: u32 = 14;

std::thread_local! {
    // Created before the hook is armed (creating a group allocates).
    static GROUP: std::sync::Arc<Group> = Group::new("hook", None, None);
}

fn prepare() {
    GROUP.with(|_| ());
    anyalloc::init().expect("global heap");
    interrupt::set_hook(Some(hook));
}

fn finish(site: Site) {
    assert_eq!(
        FIRED.load(Ordering::SeqCst),
        1,
        "the hook fired at {site:?}"
    );
    assert_eq!(
        RETURNED.load(Ordering::SeqCst),
        CALLS,
        "every normal-path call made at {site:?} returned"
    );
    assert_eq!(
        ROUTED.load(Ordering::SeqCst),
        3,
        "the order-5 requests at {site:?} (Global, Heap::alloc, alloc_pages) took the nolock route"
    );
    interrupt::set_hook(None);
    println!("scenario at {site:?}: ok");
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn normal_path_inside_a_nolock_page_refill() {
    if !watchdog::in_child() {
        watchdog::run_ok(
            "normal_path_inside_a_nolock_page_refill",
            &[("ANYALLOC_MAINTENANCE", "0")],
            LIMIT,
            "normal path at PcpRefill of a NoLock page allocation",
        );
        return;
    }
    prepare();
    arm(Site::PcpRefill);
    // 16 KiB blocks (order 2) from NoLock until one refills its slot.
    let mut keep = Vec::with_capacity(1000);
    for _ in 0..1000 {
        if FIRED.load(Ordering::SeqCst) != 0 {
            break;
        }
        let mut v: NVec<u8, NoLock> = NVec::new_in(NoLock);
        if v.try_reserve_exact(16 << 10).is_ok() {
            v.push(7);
            keep.push(v);
        }
    }
    ARMED.store(0, Ordering::SeqCst);
    drop(keep);
    finish(Site::PcpRefill);
}

#[test]
fn normal_path_inside_a_nolock_sheaf_refill() {
    if !watchdog::in_child() {
        watchdog::run_ok(
            "normal_path_inside_a_nolock_sheaf_refill",
            &[("ANYALLOC_MAINTENANCE", "0")],
            LIMIT,
            "normal path at SheafRefill of a NoLock object allocation",
        );
        return;
    }
    prepare();
    arm(Site::SheafRefill);
    let mut keep = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        if FIRED.load(Ordering::SeqCst) != 0 {
            break;
        }
        if let Ok(b) = NBox::try_new_in([3u8; 256], NoLock) {
            keep.push(b);
        }
    }
    ARMED.store(0, Ordering::SeqCst);
    drop(keep);
    finish(Site::SheafRefill);
}

#[test]
fn normal_path_inside_a_nolock_zone_free() {
    if !watchdog::in_child() {
        watchdog::run_ok(
            "normal_path_inside_a_nolock_zone_free",
            &[("ANYALLOC_MAINTENANCE", "0")],
            LIMIT,
            "normal path at NolockZoneFree of a NoLock page free",
        );
        return;
    }
    prepare();
    // 128 KiB blocks (order 5) have no per-CPU list: their nolock free goes
    // straight to the zone with a try-lock.
    let heap = anyalloc::global_heap().unwrap();
    let layout = Layout::from_size_align(128 << 10, 8).unwrap();
    let p = heap.alloc(layout).expect("a 128 KiB block");
    arm(Site::NolockZoneFree);
    // SAFETY: allocated above, freed once.
    unsafe { heap.free_nolock(p) };
    ARMED.store(0, Ordering::SeqCst);
    finish(Site::NolockZoneFree);
}
