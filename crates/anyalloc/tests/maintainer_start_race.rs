//! Two calls of `Heap::start_maintenance` at once, and the thread's spawn
//! refused: the heap must keep giving idle memory back from its own calls
//! (the inline decay, `Config::decay`), since no thread does.
//!
//! The call that wins the start parks at the interrupt point just before
//! the spawn (`Site::MaintainerSpawn`) while the other call finds the start
//! in progress and returns; then the process's address space is capped at
//! what it maps already, so the spawn (a thread stack) fails. The loser
//! used to switch the decay off on the winner's behalf: with the spawn
//! refused the heap had neither, and no pass ever ran again.

mod proc_self;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

static PARKED: AtomicBool = AtomicBool::new(false);
static LOSER_DONE: AtomicBool = AtomicBool::new(false);

fn set_address_space_limit(bytes: libc::rlim_t) {
    let l = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit for this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &l) }, 0);
}

/// At the spawn: waits for the other call to have returned, then caps the
/// address space at what is mapped now, so the thread's stack cannot be.
fn hook(site: Site) {
    if site != Site::MaintainerSpawn {
        return;
    }
    PARKED.store(true, Ordering::SeqCst);
    while !LOSER_DONE.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    set_address_space_limit(proc_self::mapped_bytes() as u64);
}

#[test]
fn a_refused_spawn_leaves_the_inline_decay_on() {
    if watchdog::ran_in_child(
        "a_refused_spawn_leaves_the_inline_decay_on",
        Duration::from_secs(120),
        "two starts of the maintenance thread, the spawn refused",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    // Everything the calls below need is mapped before the cap.
    let l = Layout::from_size_align(300_000, 8).unwrap();
    let warm = heap.alloc(l).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { heap.free(warm) };
    set_hook(Some(hook));
    let (winner, loser) = std::thread::scope(|s| {
        let winner = s.spawn(|| heap.start_maintenance());
        while !PARKED.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let loser = heap.start_maintenance();
        LOSER_DONE.store(true, Ordering::SeqCst);
        (winner.join().unwrap(), loser)
    });
    set_hook(None);
    set_address_space_limit(libc::RLIM_INFINITY);
    assert!(loser, "the second call found the start in progress");
    assert!(!winner, "the spawn was refused");
    // The heap's own slow calls must run decay passes again.
    let start = Instant::now();
    let mut calls = 0u64;
    while heap.stats().maintenance_passes == 0 && start.elapsed() < Duration::from_secs(30) {
        let p = heap.alloc(l).expect("memory to spare");
        // SAFETY: a live block of 300,000 bytes, ours, freed once.
        unsafe {
            std::ptr::write_bytes(p.as_ptr(), 7, 4096);
            heap.free(p);
        }
        std::thread::sleep(Duration::from_millis(1));
        calls += 1;
    }
    assert!(
        heap.stats().maintenance_passes > 0,
        "no thread and {calls} slow-path calls: the inline decay ran no pass"
    );
}
