//! Interrupt points at the accounting critical sections: a nolock charged
//! allocation and free run while the interrupted context holds this CPU's
//! charge stock (or found it busy), while it links a released group on the
//! heap's release list (or drains that list), and while it holds a group's
//! children registry; usage is exact afterwards.

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Group, Heap};
use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

static HEAP: OnceLock<Heap> = OnceLock::new();
static GROUP: OnceLock<Arc<Group>> = OnceLock::new();
static FIRED: AtomicU64 = AtomicU64::new(0);
/// Per accounting site (index in `Site::ACCOUNT`): hits and nested
/// charged allocations that succeeded there.
static SITE_FIRED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static SITE_OK: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static NESTED_OK: AtomicU64 = AtomicU64::new(0);
static NESTED_FAIL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn hook(site: Site) {
    let Some(i) = Site::ACCOUNT.iter().position(|&s| s == site) else {
        return;
    };
    if IN_HOOK.get() {
        return;
    }
    IN_HOOK.set(true);
    SITE_FIRED[i].fetch_add(1, Ordering::Relaxed);
    if site == Site::AccountCharge {
        FIRED.fetch_add(1, Ordering::Relaxed);
    }
    let heap = HEAP.get().unwrap();
    let g = GROUP.get().unwrap();
    for size in [24, 200, 3000, 20_000] {
        match heap.alloc_nolock_in(Layout::from_size_align(size, 8).unwrap(), g) {
            Some(p) => {
                NESTED_OK.fetch_add(1, Ordering::Relaxed);
                SITE_OK[i].fetch_add(1, Ordering::Relaxed);
                // SAFETY: p is a live allocation of HEAP.
                unsafe { heap.free_nolock(p) };
            }
            None => {
                NESTED_FAIL.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    IN_HOOK.set(false);
}

#[test]
fn charging_is_reentrant_at_its_critical_section() {
    let heap = HEAP.get_or_init(|| {
        Heap::new(
            Config::default()
                .memory(64 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .unwrap()
    });
    let parent = Group::new("parent", Some(32 << 20), None);
    let g = GROUP.get_or_init(|| Group::new("child", None, Some(&parent)));
    set_hook(Some(hook));
    let mut held = Vec::new();
    for i in 0..2000usize {
        let layout = Layout::from_size_align(8 + (i * 131) % 30_000, 8).unwrap();
        let p = if i % 2 == 0 {
            heap.alloc_in(layout, g)
        } else {
            heap.alloc_nolock_in(layout, g)
        };
        held.push(p.expect("within limits"));
        if i % 500 == 0 {
            // The children registry, written and read with the hook on.
            let sibling = Group::new("sibling", None, Some(&parent));
            assert_eq!(sibling.usage(), 0);
            assert!(parent.usage() > 0);
        }
        if i % 3 == 0 {
            let p = held.swap_remove(i % held.len());
            // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
            unsafe { heap.free(p) };
        }
    }
    for p in held {
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { heap.free_nolock(p) };
    }
    set_hook(None);
    let fired = FIRED.load(Ordering::Relaxed);
    let ok = NESTED_OK.load(Ordering::Relaxed);
    let fail = NESTED_FAIL.load(Ordering::Relaxed);
    println!(
        "AccountCharge fired {fired} times; nested charged allocations ok {ok}, failed {fail}"
    );
    assert!(fired > 1000, "the site fired");
    assert_eq!(Site::ACCOUNT.len(), SITE_FIRED.len());
    for (i, site) in Site::ACCOUNT.iter().enumerate() {
        let (f, ok) = (
            SITE_FIRED[i].load(Ordering::Relaxed),
            SITE_OK[i].load(Ordering::Relaxed),
        );
        println!("{site:?}: fired {f}, nested charged allocations ok {ok}");
        assert!(f > 0, "{site:?} never fired");
        assert!(ok > 0, "no nested charged allocation at {site:?}");
    }
    assert_eq!(
        fail, 0,
        "with the stock busy the counters are charged directly"
    );
    assert_eq!(g.usage(), 0);
    assert_eq!(parent.usage(), 0);
    heap.drain();
    let s = heap.pages().stats();
    assert_eq!(s.free_pages, s.total_pages);
}
