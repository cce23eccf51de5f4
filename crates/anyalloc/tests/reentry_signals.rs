//! Re-entry with real signals: a thread allocates and frees
//! through `NoLock` and the heap's nolock calls (page blocks of 16 and
//! 32 KiB, whose per-CPU refills and frees take the zone lock with a
//! try-lock, and small objects) while a per-thread timer interrupts it
//! every few tens of microseconds with a handler that allocates and frees
//! through `Global`, the process's allocator: small vectors and 64 KiB
//! ones (which the normal path serves straight from the zone, under its
//! lock).
//!
//! Before the fix the handler's normal path waited for the zone lock its
//! own thread held. Now the handler, finding its
//! thread inside the allocator, takes the nolock route. The scenario runs in
//! a child process under a watchdog: a deadlock fails the test.

mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use allocator_api2::vec::Vec as NVec;
use anyalloc::{Global, NoLock};
use anyalloc_storm::{install_handler, storm_signals, ErrnoGuard, ThreadTimer};

#[global_allocator]
static A: Global = Global;

static HANDLED: AtomicU64 = AtomicU64::new(0);
static LARGE_OK: AtomicU64 = AtomicU64::new(0);

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // `Global`, fallible (the nolock route may fail; `Box::new` would abort).
    let mut small: Vec<u64> = Vec::new();
    if small.try_reserve_exact(24).is_ok() {
        small.extend_from_slice(&[7; 24]);
    }
    drop(small);
    let mut large: Vec<u8> = Vec::new();
    if large.try_reserve_exact(64 << 10).is_ok() {
        large.push(1);
        LARGE_OK.fetch_add(1, Relaxed);
    }
    drop(large);
    HANDLED.fetch_add(1, Relaxed);
}

/// Rounds of the interrupted thread's loop.
const ROUNDS: usize = 400_000;
/// Blocks it keeps live (a ring): enough to run its per-CPU lists empty and
/// over `high`, so refills and frees reach the zone.
const RING: usize = 48;

#[test]
fn global_handlers_interrupting_nolock_calls() {
    if watchdog::ran_in_child(
        "global_handlers_interrupting_nolock_calls",
        Duration::from_secs(120),
        "Global in handlers interrupting NoLock calls",
    ) {
        return;
    }
    let heap = anyalloc::init().expect("global heap");
    let [sig, _] = storm_signals();
    install_handler(sig, handler, &[]).expect("sigaction");
    // Everything the loop needs is allocated before the timer starts.
    let mut ring: Vec<Option<NVec<u8, NoLock>>> = (0..RING).map(|_| None).collect();
    let mut objs: Vec<Option<std::ptr::NonNull<u8>>> = vec![None; RING];
    let small = Layout::from_size_align(96, 8).unwrap();
    let timer = ThreadTimer::start(sig, Duration::from_micros(20), 0).expect("timer");
    for i in 0..ROUNDS {
        let slot = i % RING;
        // A page block through NoLock (order 2 or 3), replacing the oldest.
        let mut v: NVec<u8, NoLock> = NVec::new_in(NoLock);
        let bytes = if i % 3 == 0 { 32 << 10 } else { 16 << 10 };
        if v.try_reserve_exact(bytes).is_ok() {
            v.push(i as u8);
            ring[slot] = Some(v);
        } else {
            ring[slot] = None;
        }
        // A small object through the heap's nolock calls.
        if let Some(p) = objs[slot].take() {
            // SAFETY: allocated below by this heap, freed once.
            unsafe { heap.free_nolock(p) };
        }
        objs[slot] = heap.alloc_nolock(small);
    }
    drop(timer);
    for p in objs.into_iter().flatten() {
        // SAFETY: as above.
        unsafe { heap.free_nolock(p) };
    }
    drop(ring);
    let handled = HANDLED.load(Relaxed);
    println!(
        "{ROUNDS} rounds, {handled} handlers, {} large Global allocations in handlers",
        LARGE_OK.load(Relaxed)
    );
    assert!(handled > 0, "the timer interrupted the loop");
}
