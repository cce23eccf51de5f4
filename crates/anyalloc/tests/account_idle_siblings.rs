//! Idle tenants' stocks do not strand their parent's limit on the nolock
//! path. (Its own process: the flush a refused nolock charge makes of the
//! siblings' stocks only tries the process-wide children registry, which
//! other tests' `Group::new` and `usage` take.)

use anyalloc::{Config, Group, Heap};
use std::alloc::Layout;
use std::sync::Arc;

fn l(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Idle tenants' stocks do not strand their parent's limit on the nolock
/// path: twenty tenants in turn, each allocating 64 KiB in 1000-byte
/// objects and freeing them all, then idle (alive). Each keeps up to two
/// batches (64 KiB) of stock after its frees, so the sixteenth used to
/// leave the parent's 1 MiB all stock, and every later tenant was refused
/// with nothing in use. A refused nolock charge now takes the idle
/// siblings' stocks back (try-locks only) and tries again.
#[test]
fn a_nolock_charge_takes_idle_siblings_stock_back() {
    let h = Heap::new(
        Config::default()
            .memory(64 << 20)
            .cpus(1)
            .maintenance(false),
    )
    .unwrap();
    let parent = Group::new("parent", Some(1 << 20), None);
    let mut idle = Vec::new();
    for t in 0..20 {
        let tenant = Group::new("tenant", None, Some(&parent));
        let held: Vec<_> = (0..64)
            .map(|i| {
                h.alloc_nolock_in(l(1000), &tenant).unwrap_or_else(|| {
                    panic!(
                        "tenant {t}, object {i}: refused with the parent's usage at {} of 1 MiB",
                        parent.usage()
                    )
                })
            })
            .collect();
        for p in held {
            // SAFETY: allocated above from `h`, freed once.
            unsafe { h.free_nolock(p) };
        }
        assert_eq!(tenant.usage(), 0);
        idle.push(tenant);
    }
    assert_eq!(parent.usage(), 0);
    assert_eq!(
        parent.failcnt(),
        0,
        "a refusal before the flush counts no failure"
    );
    // The references the flushes took are released on the heap's list and
    // dropped by its normal-context maintenance.
    h.drain();
    for t in &idle {
        assert_eq!(Arc::strong_count(t), 1);
    }
}
