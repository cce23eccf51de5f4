//! An orphaned child (the `fork` module's "Orphaned locks") whose
//! accounting registry stayed held must not wait the patience out at
//! every call that needs it.
//!
//! Thread H registers a group under `root` and pauses with the groups'
//! children registry held (`Site::GroupChildren`); the main thread, inside
//! heap B's zone lock, raises a signal whose handler forks (its prepare
//! takes nothing). In the child the registry stays held for good. A wait
//! for it gives up after `fork::ORPHAN_PATIENCE` (0.2 s), but the next one
//! waited as long again: the child's 20 `Group::new` under `root` and 5
//! `root.usage()` took 25 patiences, over 5 s (before the fix, 1 of 1:
//! 5.0 s; found by a storm whose children made groups, heaps and
//! accounted allocations and took tens of seconds). Now the first wait
//! that runs out marks the lock held across a fork, and the next callers
//! give up at once, as a zone lock's do.
//!
//! Likewise a zone lock's patient callers (`Heap::drain`, `trim`) waited
//! the patience out again for a lock already marked orphaned: thread D
//! holds heap A's maintenance lock (paused in `Heap::drain` at
//! `Site::CacheDrain`) at the clone, and the child's 10 drains of A took
//! 10 patiences (with a trim, 2.2 s before the fix, 1 of 1).

mod handler_fork;
mod watchdog;
mod zone_holder;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Group, Heap};

const REGISTRAR: u8 = 1;
const RAISER: u8 = 2;
const DRAINER: u8 = 3;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// 0: H has not paused yet; 1: H holds the registry; 2: the signal was
/// raised; 3: H may go on.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// D holds heap A's maintenance lock (inside `Heap::drain`).
static DRAINING: AtomicBool = AtomicBool::new(false);

fn hook(site: Site) {
    match (ROLE.get(), site) {
        (REGISTRAR, Site::GroupChildren) if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while STEP.load(SeqCst) < 3 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        (DRAINER, Site::CacheDrain) if !DRAINING.load(SeqCst) => {
            DRAINING.store(true, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while STEP.load(SeqCst) < 3 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        (RAISER, Site::ZoneAlloc) if STEP.load(SeqCst) == 1 && DRAINING.load(SeqCst) => {
            STEP.store(2, SeqCst);
            handler_fork::raise();
        }
        _ => {}
    }
}

/// The child's calls that need the registry: far quicker than one
/// patience each (25 of them took 5 s before the fix).
fn child_work(root: &std::sync::Arc<Group>, a: &Heap) -> i32 {
    let start = Instant::now();
    let kids: Vec<_> = (0..20)
        .map(|_| Group::new("kid", Some(1 << 20), Some(root)))
        .collect();
    for _ in 0..5 {
        let _ = root.usage();
    }
    drop(kids);
    let took = start.elapsed();
    if took >= Duration::from_secs(2) {
        handler_fork::say(&format!("child: 25 calls took {took:?}\n"));
        return 1;
    }
    // A's maintenance lock (patient callers: `drain`, `trim`): 10 drains,
    // 2 s before the fix.
    let start = Instant::now();
    for _ in 0..10 {
        a.drain();
    }
    a.trim();
    let took = start.elapsed();
    if took >= Duration::from_millis(1500) {
        handler_fork::say(&format!("child: 10 drains and a trim took {took:?}\n"));
        return 2;
    }
    handler_fork::say("child: groups made, usage read, A drained\n");
    0
}

#[test]
fn a_handler_forks_while_another_thread_registers_a_group() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_another_thread_registers_a_group",
        Duration::from_secs(90),
        "a fork in a handler while another thread holds the groups' registry",
    ) {
        return;
    }
    let a = Heap::new(Config::default().memory(8 << 20).maintenance(false)).expect("heap");
    let b = Heap::new(Config::default().memory(8 << 20).maintenance(false)).expect("heap");
    // A slab on a partial list of A's (one object of two live), for D's
    // drain to walk.
    let layout = std::alloc::Layout::from_size_align(64, 8).unwrap();
    let (kept, freed) = (a.alloc(layout).unwrap(), a.alloc(layout).unwrap());
    // SAFETY: allocated just above, freed once.
    unsafe { a.free(freed) };
    let root = Group::new("root", None, None);
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            ROLE.set(REGISTRAR);
            Group::new("held", None, Some(&root))
        });
        let d = s.spawn(|| {
            ROLE.set(DRAINER);
            a.drain();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while (STEP.load(SeqCst) < 1 || !DRAINING.load(SeqCst)) && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(STEP.load(SeqCst), 1, "H did not hold the registry");
        assert!(DRAINING.load(SeqCst), "D did not hold A's maintenance lock");
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), 6);
        ROLE.set(0);
        handler_fork::finish_in_child(|| child_work(&root, &a));
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        let status = handler_fork::reap(Duration::from_secs(30));
        STEP.store(3, SeqCst);
        drop(h.join().unwrap());
        d.join().unwrap();
        handler_fork::assert_child_ok(status);
    });
    set_hook(None);
    // SAFETY: allocated above, freed once.
    unsafe { a.free(kept) };
}
