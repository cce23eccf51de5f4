//! A shrinker that panics ends the process with a one-line message from
//! anyalloc, wherever it runs: a shrinker runs inside allocations (perhaps
//! a `GlobalAlloc` call, which must not unwind) and on the maintenance
//! thread, so its panic is not let unwind through the allocator.
//!
//! Before, a panic on the maintenance thread killed that thread alone: the
//! heap went on without maintenance, and the thread stayed counted as a
//! maintainer, so that once the main thread had ended another heap's
//! maintainer took a live worker thread for one of its kind and ended the
//! process under it with status 0 (`maintain::only_maintainers_left`).
//!
//! Each scenario runs in a child process under a watchdog (`tests/watchdog`),
//! which must die of `SIGABRT` with the line on its stderr.

mod watchdog;

use std::alloc::Layout;
use std::time::{Duration, Instant};

use anyalloc::{Config, Group, Heap};

/// Exit code of a child whose shrinker's panic did not end it.
const SURVIVED: i32 = 42;
/// The line's words.
const EXPECT: &str = "anyalloc: a shrinker panicked";

/// Runs `scenario` in a child (this test binary, filtered to `test`) and
/// checks that it aborts with the line.
fn expect_abort(test: &str, scenario: fn()) {
    if watchdog::in_child() {
        scenario();
        eprintln!("survived: the shrinker's panic of {test} did not end the process");
        std::process::exit(SURVIVED);
    }
    let out = watchdog::run(test, &[], Duration::from_secs(60), test);
    watchdog::assert_aborted_with(&out, test, EXPECT);
    assert!(
        out.stderr.contains("a shrinker's bug"),
        "{test}: the panic's own message is missing; stderr:\n{}",
        out.stderr
    );
}

#[test]
fn a_shrinker_panic_on_the_maintenance_thread_aborts() {
    expect_abort("a_shrinker_panic_on_the_maintenance_thread_aborts", || {
        let heap = Heap::new(Config::default().memory(1 << 20).grow(false)).unwrap();
        heap.register_shrinker(|_| {
            if std::thread::current().name() == Some("anyalloc-maintainer") {
                panic!("a shrinker's bug");
            }
            0
        });
        // Below the low watermark: the maintainer's passes run the
        // shrinkers, within about a second.
        let mut held = Vec::new();
        while let Some(p) = heap.pages().alloc_pages(0) {
            held.push(p);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("survived: 20 s went by with the heap below its low watermark");
    });
}

#[test]
fn a_shrinker_panic_inside_an_allocation_aborts() {
    expect_abort("a_shrinker_panic_inside_an_allocation_aborts", || {
        let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
        heap.register_shrinker(|_| panic!("a shrinker's bug"));
        let group = Group::new("full", Some(16 << 10), None);
        let layout = Layout::from_size_align(16 << 10, 8).unwrap();
        let p = heap.alloc_in(layout, &group).unwrap();
        // Over the limit: the allocation runs the shrinkers.
        let q = heap.alloc_in(layout, &group);
        eprintln!("survived: the allocation returned {q:?} ({p:?} held)");
    });
}
