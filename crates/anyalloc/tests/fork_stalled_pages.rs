//! Page allocations by the thread a fork waits for: they must not hold it.
//!
//! glibc's `fork` takes its stdio list lock and its NSS database lock after
//! every `pthread_atfork` prepare handler, so after the heap's, which holds
//! every zone lock. A signal handler that interrupted the holder of one of
//! those and calls `PageAllocator::alloc_pages` (routed: the normal path,
//! since it did not interrupt the allocator) misses (the zones' locks give
//! way to the fork), and the fork waits for the interrupted thread. Each
//! such call used to wait up to a second for the fork before it returned
//! no block, and a storm's handler calls come one after another: the fork
//! and the thread crawled for tens of seconds (a `page_crossfire` run in CI
//! took 53 s so, its forker stuck in glibc's `fork` behind a worker that a
//! handler interrupted inside `malloc`).
//!
//! Here a prepare handler that runs after the heap's stands for that lock
//! (`tests/fork_hold`, as in `fork_gives_way`): it waits until the
//! "holder" thread has made its page calls, which it starts only once the
//! fork holds the heap's locks. The calls (orders 0 to 10, [`CALLS`] of them) may be served by
//! the nolock path or refused, but together wait at most about one second
//! for the fork (its patience, once per fork), not a second each: the
//! watchdog's limit is far below [`CALLS`] seconds. Afterwards every block
//! is freed and every page comes back.

mod fork_hold;
mod watchdog;

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap, MAX_ORDER};
use fork_hold::fork_waiting_for;

/// Page calls the holder makes while the fork waits for it.
const CALLS: usize = 60;

#[test]
fn page_calls_of_the_thread_a_fork_waits_for_do_not_hold_it() {
    if watchdog::ran_in_child(
        "page_calls_of_the_thread_a_fork_waits_for_do_not_hold_it",
        Duration::from_secs(20),
        "page calls of the thread a fork waits for",
    ) {
        return;
    }
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap(),
    ));
    let before = heap.pages().stats();
    let (served, refused, took) = fork_waiting_for(
        move || {
            let pa = heap.pages();
            let start = Instant::now();
            let mut served = Vec::new();
            let mut refused = 0;
            for i in 0..CALLS {
                let order = (i as u32 * 7) % (MAX_ORDER + 1);
                match pa.alloc_pages(order) {
                    Some(p) => served.push((p.as_ptr() as usize, order)),
                    None => refused += 1,
                }
            }
            (served, refused, start.elapsed())
        },
        || 0,
    );
    println!(
        "{CALLS} page calls while the fork waited for their thread: {} served, {refused} refused, in {took:?}",
        served.len()
    );
    let pa = heap.pages();
    for (p, order) in served {
        // SAFETY: allocated above with `order`, freed once.
        unsafe { pa.free_pages(NonNull::new(p as *mut u8).unwrap(), order) };
    }
    // After the fork, every order is served again.
    for order in 0..=MAX_ORDER {
        let p = pa.alloc_pages(order).expect("served once the fork ended");
        // SAFETY: allocated just now with `order`.
        unsafe { pa.free_pages(p, order) };
    }
    pa.drain();
    let s = pa.stats();
    assert_eq!(s.free_pages, s.total_pages, "pages lost: {s:?}");
    assert_eq!(s.total_pages, before.total_pages);
    pa.check_invariants().unwrap();
}
