//! Real signals: per-thread POSIX timers (`SIGEV_THREAD_ID`, ~10 kHz each,
//! two signals per thread that can interrupt each other's handlers) whose
//! handlers allocate and free with the nolock path while every core churns
//! on the normal path. One handler allocation in eight is a large block
//! (64 KiB to 4 MiB: the zone try-lock path), the rest orders 0..=3. Every
//! block carries an owner-specific pattern checked
//! when it is freed; at the end, after `drain()`, every page must be free
//! again and every invariant hold. The storm counts the signals that
//! interrupted a worker inside an allocator call, and asserts there were
//! some.
//!
//! See `common::run_page_storm` for the storm itself.

mod common;

use common::{run_page_storm, StormConfig};

#[test]
fn page_storm_with_nested_signals() {
    let cfg = StormConfig::default();
    let r = run_page_storm(&cfg);
    println!("{}", r.summary());

    // The storm happened: both signals, nested both ways, work on both paths.
    assert!(
        r.signals_a > 0 && r.signals_b > 0,
        "no signals delivered: {r:?}"
    );
    assert!(
        r.nested_b_in_a > 0 && r.nested_a_in_b > 0,
        "the two signals never nested: {r:?}"
    );
    // Re-entry: signals landed while a worker was inside `alloc_pages` /
    // `free_pages`, and their handlers then used the nolock path.
    assert!(
        r.interrupted_inside_allocator > 0,
        "no signal interrupted an allocator call: {r:?}"
    );
    assert!(r.nolock_attempts > 0 && r.normal_allocs > 0, "{r:?}");
    assert!(
        r.nolock_frees_other_signal > 0,
        "no block crossed between the handlers"
    );
    if cfg.threads > 1 {
        assert!(
            r.cross_thread_frees > 0,
            "no block was freed by another thread"
        );
    }

    // Nothing was handed out twice, nothing leaked, the structure is intact.
    assert_eq!(
        r.violations, 0,
        "pattern violations: two owners of the same memory"
    );
    assert_eq!(r.invariants, Ok(()));
    assert_eq!(
        r.stats.free_pages, r.stats.total_pages,
        "leaked pages: {}",
        r.leaked_pages
    );
    assert_eq!(
        r.stats.buddy_pages, r.stats.total_pages,
        "drain left pages off the buddy lists"
    );
    assert_eq!(r.stats.percpu_pages + r.stats.deferred_pages, 0);
    assert_eq!(
        r.normal_alloc_none, 0,
        "the normal path ran out with memory to spare"
    );

    // The handlers' count and the allocator's count agree.
    assert_eq!(r.nolock_attempts, r.nolock_ok + r.nolock_fail);
    assert_eq!(r.stats.nolock_alloc_ok, r.nolock_ok);
    assert_eq!(
        r.stats.nolock_alloc_fail_busy + r.stats.nolock_alloc_fail_empty,
        r.nolock_fail
    );
    // With 256 MiB to spare nothing is "empty", and busy failures are rare.
    assert_eq!(r.stats.nolock_alloc_fail_empty, 0);
    assert!(
        r.nolock_ok as f64 >= 0.999 * r.nolock_attempts as f64,
        "nolock success {:.4}% < 99.9%",
        r.success_pct()
    );
    // The large blocks on their own: they happened, the counts agree, the
    // stats say why each failure failed, and 99.9% succeeded.
    assert!(r.large_attempts > 0, "no large block was tried: {r:?}");
    assert_eq!(r.large_attempts, r.large_ok + r.large_fail);
    assert_eq!(r.stats.nolock_large_alloc_ok, r.large_ok);
    assert_eq!(
        r.stats.nolock_large_alloc_fail_busy + r.stats.nolock_large_alloc_fail_empty,
        r.large_fail,
        "a large failure without a reason"
    );
    assert!(
        r.large_ok as f64 >= 0.999 * r.large_attempts as f64,
        "large nolock success {:.4}% < 99.9% ({} busy, {} empty of {})",
        r.large_success_pct(),
        r.stats.nolock_large_alloc_fail_busy,
        r.stats.nolock_large_alloc_fail_empty,
        r.large_attempts
    );
}
