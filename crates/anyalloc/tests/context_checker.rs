//! The debug context checker: a normal-path function called inside a
//! nolock scope aborts with a message naming it. Active in debug builds and
//! with the `debug-checks` feature.

#![cfg(any(debug_assertions, feature = "debug-checks"))]

use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::process::Command;

const SCENARIO: &str = "ANYALLOC_CONTEXT_SCENARIO";

fn run_child(test: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(SCENARIO, "1")
        .output()
        .unwrap()
}

#[test]
fn heap_alloc_inside_a_nolock_scope_aborts() {
    if std::env::var_os(SCENARIO).is_some() {
        let heap = Heap::new(Config::default().memory(4 << 20)).unwrap();
        let _scope = anyalloc::nolock_scope();
        // Allowed: the nolock path.
        let p = heap.alloc_nolock(Layout::new::<u64>()).unwrap();
        // SAFETY: the pointer came from this heap, is live, and is freed exactly once.
        unsafe { heap.free_nolock(p) };
        // Not allowed: aborts here.
        let _ = heap.alloc(Layout::new::<u64>());
        std::process::exit(0);
    }
    let out = run_child("heap_alloc_inside_a_nolock_scope_aborts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "stderr: {stderr}");
    assert!(
        stderr.contains(
            "anyalloc: Heap::alloc may wait for a lock, but was called inside a nolock scope"
        ),
        "stderr: {stderr}"
    );
}

#[test]
fn page_alloc_inside_a_nolock_scope_aborts() {
    if std::env::var_os(SCENARIO).is_some() {
        let pages = anyalloc::PageAllocator::new(Config::default().memory(4 << 20)).unwrap();
        let _scope = anyalloc::nolock_scope();
        let _ = pages.alloc_pages(0);
        std::process::exit(0);
    }
    let out = run_child("page_alloc_inside_a_nolock_scope_aborts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "stderr: {stderr}");
    assert!(
        stderr.contains("PageAllocator::alloc_pages may wait"),
        "stderr: {stderr}"
    );
}
