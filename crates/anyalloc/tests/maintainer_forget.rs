//! `Heap::forget_maintainer_after_fork` is safe to call anywhere: in the
//! process that started the maintenance thread it must not forget it.
//!
//! It used to forget the thread wherever it was called: the heap's drop then
//! found no thread to stop and freed the heap's memory while the thread,
//! still running, went on using it. Alone in its test binary, so that no
//! other test's heap starts or stops a maintenance thread meanwhile.

use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

/// This process's threads named like a maintenance thread (a thread's
/// name is cut to 15 bytes).
fn maintainers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "anyalloc-mainta")
        .count()
}

#[test]
fn forgetting_the_maintainer_in_its_own_process_does_nothing() {
    let before = maintainers();
    let heap = Heap::new(Config::default().memory(16 << 20)).expect("heap");
    assert!(heap.start_maintenance(), "a maintenance thread runs");
    // The thread names itself once it runs.
    assert!(
        wait_for(|| maintainers() == before + 1),
        "the heap's maintenance thread never showed"
    );
    assert!(
        !heap.forget_maintainer_after_fork(),
        "no thread of a parent to forget: this process started it"
    );
    // Still the heap's: the drop stops and joins it.
    drop(heap);
    assert!(
        wait_for(|| maintainers() == before),
        "the maintenance thread outlived its heap"
    );
}

/// Whether `cond` holds within 5 s.
fn wait_for(cond: impl Fn() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while !cond() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
