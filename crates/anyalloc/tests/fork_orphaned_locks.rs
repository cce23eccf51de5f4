//! The child of a `fork` made by a signal handler that interrupted the
//! allocator must not wait for ever for a lock that another thread of its
//! parent held at the clone.
//!
//! Such a fork's prepare handler takes no lock (its own thread, inside the
//! allocator, may hold them), so the child inherits every lock the
//! parent's other threads held then, and none of those threads exists
//! there. Once the handler returns, the child's thread goes on as usual:
//! its normal path used to wait for those locks for ever. Now it gives way
//! to them after `fork::ORPHAN_PATIENCE` and is served by the nolock path
//! (the `fork` module's "Orphaned locks").
//!
//! In every scenario thread H holds heap A's zone lock (paused at
//! `Site::ZoneAlloc`, inside a normal allocation of a block above the
//! per-CPU lists), and a signal handler on the main thread forks while the
//! main thread is inside the allocator:
//!
//! 1. the main thread is inside heap B's zone lock (its own hook raises the
//!    signal there); in the child it finishes that allocation, then
//!    allocates from A, which needs A's zone lock;
//! 2. the main thread is waiting for A's zone lock itself (another thread
//!    signals it once `/proc` shows it asleep in a futex wait): in the
//!    child its wait goes on, for a holder that is not there;
//! 3. as 1, while a third thread forks on its own: its prepare has counted
//!    itself and waits for A's zone lock (held by H) at the clone, and
//!    has not reached B. In the child that fork is not in progress: B must
//!    grow beyond its first zone, at once. Before the fix the child kept
//!    the count, and B's first miss waited a second for that fork, then
//!    failed (1 of 1);
//! 4. the main thread forks on its own, and its prepare waits for A's zone
//!    lock (held by H) when another thread signals it: the handler forks
//!    (taking nothing), and in that child the main thread's prepare goes
//!    on, for a holder that is not there. Before the fix its bare wait
//!    gave way after the patience and aborted (1 of 1); now it leaves that
//!    lock, its fork ends in the child (whose own child and itself then
//!    use A), and its release leaves the lock alone;
//! 5. as 1, with A's locks polling (`Config::nolock_syscalls(false)`):
//!    a contended wait there never announces itself, and polled for ever
//!    for a lock whose holder is gone unless it first checks whether the
//!    process may hold orphaned locks (hung, 1 of 1, with that check
//!    removed from `ZoneLock::lock_contended`);
//! 6. as 1, and in the child a thread of its own, L, holds B's zone lock
//!    (paused at `Site::ZoneAlloc`) until the main thread waits for it:
//!    a holder that is alive is waited for, not given way to (which would
//!    mark the lock orphaned for every later caller): the main thread's
//!    block comes from B's only zone. With `fork::ORPHAN_PATIENCE` taken
//!    as 0 in `ZoneLock::lock_orphaned`, it gave way at once, and B grew
//!    (1 of 1);
//! 7. as 1, with A unable to grow (`Config::grow(false)`) and pages
//!    cached on one CPU's per-CPU lists: the child gets every one of
//!    them. The normal path reaches only the level-0 list (refilling it
//!    needs A's zone lock), the nolock path the other levels too; without
//!    that fallback in `PageAllocator::alloc_pages` for an orphaned
//!    process, the child got 90 of 122 (1 of 1).
//!
//! In 4, once the handler's child has finished the fork its handler
//! interrupted, that fork's release must leave A's zone lock as it is (a
//! thread of the parent held it, and no thread here releases it: the data
//! it guards may be half changed). Both that child and its own child check
//! that A's first block there comes from a zone added for it, not from
//! the first zone, whose lock H held; before `ZoneLock::force_unlock` left
//! such a lock alone, it released it, and the block came from the first
//! zone (1 of 1 with that check reverted).
//!
//! In 3 the child also drops a heap made before the clone: the heap
//! registry, which the forker's prepare held then, stays held in the
//! child, and the heap stays on its list (no fork there walks it) rather
//! than abort as a heap dropped by its registry's own holder (1 of 1 with
//! that case removed from `fork::unregister`).
//!
//! The children of 1, 2, 4 and 5 then allocate blocks and objects from A on the
//! normal path, drain and trim A, and fork once more (a fork in such a
//! child takes no lock either: its prepare would wait for the same locks).
//! Before the fix every child hung (the watchdog killed it).

mod handler_fork;
mod watchdog;
mod zone_holder;

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Heap};

/// The block H allocates under A's zone lock (256 KiB: above the per-CPU
/// lists, so the zone's).
const ORDER: u32 = 6;

/// Roles: H holds A's zone lock; the main thread, in scenario 1, raises
/// the signal inside B's.
const HOLDER: u8 = 1;
const RAISER: u8 = 2;
/// Scenario 6's live holder in the child.
const LIVE_HOLDER: u8 = 3;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// 0: H has not paused yet; 1: H holds A's zone lock; 2: the signal was
/// raised; 3: H may go on.
static STEP: AtomicUsize = AtomicUsize::new(0);
/// Scenario 6: L holds B's zone lock; the main thread's id in the child.
static LIVE_HOLDING: AtomicBool = AtomicBool::new(false);
static MAIN_TID: AtomicI32 = AtomicI32::new(0);

fn hook(site: Site) {
    if site != Site::ZoneAlloc {
        return;
    }
    match ROLE.get() {
        HOLDER if STEP.load(SeqCst) == 0 => {
            STEP.store(1, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while STEP.load(SeqCst) < 3 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        RAISER if STEP.load(SeqCst) == 1 => {
            STEP.store(2, SeqCst);
            handler_fork::raise();
        }
        LIVE_HOLDER if !LIVE_HOLDING.load(SeqCst) => {
            // Until the main thread waits for this lock (its polls are
            // timed futex waits), at most 10 s.
            LIVE_HOLDING.store(true, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !handler_fork::in_futex_wait(MAIN_TID.load(SeqCst)) && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        _ => {}
    }
}

fn heap() -> Heap {
    Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap")
}

/// A heap whose locks' waiters poll rather than sleep until woken.
fn polling_heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .nolock_syscalls(false),
    )
    .expect("heap")
}

/// The child's work, once the handler has returned: everything must come
/// back (an allocation may fail, as nothing may wait for A's zone lock,
/// but here the nolock path serves them). Returns the exit code.
fn child_work(a: &Heap) -> i32 {
    let mut code = 0;
    // A block above the per-CPU lists: A's zone lock, then the nolock path.
    match a.pages().alloc_pages(ORDER) {
        // SAFETY: allocated just above with this order, freed once.
        Some(p) => unsafe { a.pages().free_pages(p, ORDER) },
        None => {
            handler_fork::say("child: no block of order 6\n");
            code = 1;
        }
    }
    // Objects: enough slabs to need pages from the zone.
    let layout = Layout::from_size_align(64, 8).unwrap();
    let mut objs = [std::ptr::null_mut::<u8>(); 4096];
    let mut got = 0;
    for o in objs.iter_mut() {
        if let Some(p) = a.alloc(layout) {
            *o = p.as_ptr();
            got += 1;
        }
    }
    for &o in objs.iter().filter(|o| !o.is_null()) {
        // SAFETY: allocated above from `a`, freed once.
        unsafe { a.free(std::ptr::NonNull::new_unchecked(o)) };
    }
    if got != objs.len() {
        handler_fork::say("child: objects missing\n");
        code = 2;
    }
    a.drain();
    a.trim();
    // A fork here: its prepare must not wait for A's zone lock either.
    // SAFETY: the grandchild only _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if pid < 0 || unsafe { libc::waitpid(pid, &mut status, 0) } != pid || status != 0 {
        handler_fork::say("child: its own fork failed\n");
        code = 3;
    }
    if code == 0 {
        handler_fork::say("child: served, drained, trimmed and forked\n");
    }
    code
}

/// Spawns H, which allocates a block of `ORDER` from `a` under its zone
/// lock and pauses there (step 1) until step 3; returns once it has.
fn spawn_holder<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    a: &'env Heap,
) -> std::thread::ScopedJoinHandle<'scope, ()> {
    let h = s.spawn(|| {
        ROLE.set(HOLDER);
        zone_holder::allocate_under_the_zone_lock(a.pages(), ORDER);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while STEP.load(SeqCst) < 1 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(STEP.load(SeqCst), 1, "H did not pause with A's zone lock");
    h
}

/// In the parent: waits for the handler's child (it must not hang), lets
/// H go on, and checks the child's status.
fn check_child(h: std::thread::ScopedJoinHandle<'_, ()>) {
    let status = handler_fork::reap(Duration::from_secs(20));
    STEP.store(3, SeqCst);
    h.join().unwrap();
    handler_fork::assert_child_ok(status);
}

#[test]
fn a_handler_forks_inside_another_heap() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_another_heap",
        Duration::from_secs(90),
        "a fork in a handler inside heap B, then heap A in the child",
    ) {
        return;
    }
    handler_forks_inside_b(heap());
}

#[test]
fn a_handler_forks_inside_another_heap_whose_locks_poll() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_another_heap_whose_locks_poll",
        Duration::from_secs(90),
        "a fork in a handler inside heap B, then heap A (polling locks) in the child",
    ) {
        return;
    }
    handler_forks_inside_b(polling_heap());
}

#[test]
fn a_handler_forks_inside_another_heap_then_a_live_holder_is_waited_for() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_another_heap_then_a_live_holder_is_waited_for",
        Duration::from_secs(90),
        "a fork in a handler inside heap B, then a lock of B held by a thread of the child",
    ) {
        return;
    }
    let (a, b) = (heap(), heap());
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
        ROLE.set(0);
        if handler_fork::in_child() {
            // SAFETY: gettid has no preconditions.
            MAIN_TID.store(unsafe { libc::gettid() }, SeqCst);
            let code = std::thread::scope(|s| {
                let l = s.spawn(|| {
                    ROLE.set(LIVE_HOLDER);
                    zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
                });
                while !LIVE_HOLDING.load(SeqCst) {
                    std::thread::yield_now();
                }
                let zones = b.pages().stats().zones;
                zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
                l.join().unwrap();
                if zones != 1 || b.pages().stats().zones != 1 {
                    handler_fork::say("child: gave way to a lock of B held by a live thread\n");
                    return 1;
                }
                0
            });
            set_hook(None);
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        check_child(h);
    });
    set_hook(None);
}

#[test]
fn a_handler_forks_inside_another_heap_that_cannot_grow() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_another_heap_that_cannot_grow",
        Duration::from_secs(90),
        "a fork in a handler inside heap B, then pages of A (no growth) in the child",
    ) {
        return;
    }
    let a = Heap::new(
        Config::default()
            .memory(64 << 20)
            .maintenance(false)
            .grow(false),
    )
    .expect("heap");
    // Pages cached on A's per-CPU lists, at every level of one CPU's (the
    // thread pinned, in the child too: the nolock path takes no other
    // CPU's level-0 list, which only a fenced drain may touch).
    assert!(anyalloc_storm::thread::pin_to_cpu(
        anyalloc_storm::thread::current_cpu()
    ));
    let warm: Vec<_> = (0..1000)
        .map(|_| a.pages().alloc_pages(0).unwrap())
        .collect();
    for p in warm {
        // SAFETY: allocated above with order 0, freed once.
        unsafe { a.pages().free_pages(p, 0) };
    }
    let cached = a.pages().stats().percpu_pages;
    assert!(cached > 0, "no page cached on A's per-CPU lists");
    let b = heap();
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
        ROLE.set(0);
        handler_fork::finish_in_child(|| {
            let mut pages = Vec::new();
            while pages.len() < 100_000 {
                match a.pages().alloc_pages(0) {
                    Some(p) => pages.push(p),
                    None => break,
                }
            }
            let got = pages.len();
            for p in pages {
                // SAFETY: allocated above with order 0, freed once.
                unsafe { a.pages().free_pages(p, 0) };
            }
            if got < cached {
                handler_fork::say(&format!(
                    "child: {got} of the {cached} pages cached on A's per-CPU lists\n"
                ));
                return 1;
            }
            handler_fork::say("child: every cached page served\n");
            0
        });
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        check_child(h);
    });
    set_hook(None);
}

/// Scenarios 1 and 5 (A given).
fn handler_forks_inside_b(a: Heap) {
    let b = heap();
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
        ROLE.set(0);
        handler_fork::finish_in_child(|| child_work(&a));
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        check_child(h);
    });
    set_hook(None);
}

#[test]
fn a_handler_forks_while_its_thread_waits_for_the_lock() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_its_thread_waits_for_the_lock",
        Duration::from_secs(90),
        "a fork in a handler while its thread waits for heap A's zone lock",
    ) {
        return;
    }
    let a = heap();
    handler_fork::install();
    set_hook(Some(hook));
    // SAFETY: pthread_self and gettid have no preconditions.
    let (main, main_tid) = unsafe { (libc::pthread_self() as usize, libc::gettid()) };
    let started = AtomicBool::new(false);
    let status = std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        // The signaller, once the main thread sleeps on A's zone lock (in
        // a futex wait, which /proc shows); then (the main thread waits for
        // H meanwhile) it waits for the child and lets H go on.
        let signaller = s.spawn(|| {
            while !started.load(SeqCst) {
                std::thread::yield_now();
            }
            handler_fork::wait_until_in_futex(
                main_tid,
                "the main thread did not wait for the lock",
            );
            STEP.store(2, SeqCst);
            let status = handler_fork::signal_and_reap(main);
            STEP.store(3, SeqCst);
            status
        });
        started.store(true, SeqCst);
        zone_holder::allocate_under_the_zone_lock(a.pages(), ORDER - 1);
        handler_fork::finish_in_child(|| child_work(&a));
        h.join().unwrap();
        signaller.join().unwrap()
    });
    set_hook(None);
    handler_fork::assert_child_ok(status);
}

/// The thread id of the thread that forks on its own in scenario 3.
static FORKER_TID: AtomicI32 = AtomicI32::new(0);

/// Scenario 3's child: B, which no lock of which was held at the clone,
/// must serve more than its first zone (it grows), and at once: the fork
/// in progress on the forker at the clone is not in progress here.
fn grow_work(b: &Heap) -> i32 {
    const BLOCKS: usize = (80 << 20) / (anyalloc::PAGE_SIZE << ORDER);
    let mut blocks = [std::ptr::null_mut::<u8>(); BLOCKS];
    let start = Instant::now();
    let mut got = 0;
    for p in blocks.iter_mut() {
        match b.pages().alloc_pages(ORDER) {
            Some(q) => {
                *p = q.as_ptr();
                got += 1;
            }
            None => break,
        }
    }
    let took = start.elapsed();
    for &p in blocks.iter().filter(|p| !p.is_null()) {
        // SAFETY: allocated above from B with this order, freed once.
        unsafe {
            b.pages()
                .free_pages(std::ptr::NonNull::new_unchecked(p), ORDER)
        };
    }
    if got != BLOCKS {
        handler_fork::say("child: B did not grow (a fork of the parent's seemed in progress)\n");
        return 1;
    }
    if took > Duration::from_secs(5) {
        handler_fork::say(
            "child: B's blocks took seconds (waits for a fork not in progress here)\n",
        );
        return 2;
    }
    0
}

#[test]
fn a_handler_forks_while_another_thread_forks() {
    if watchdog::ran_in_child(
        "a_handler_forks_while_another_thread_forks",
        Duration::from_secs(90),
        "a fork in a handler while another thread's fork waits in its prepare",
    ) {
        return;
    }
    // B first: the forker's prepare locks A (made last, first in the
    // registry), waits there for H, and has not reached B at the clone.
    let b = heap();
    let a = heap();
    // Dropped in the child (in the parent, once the forker's fork ended).
    let c = heap();
    handler_fork::install();
    set_hook(Some(hook));
    std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        let forker = s.spawn(|| {
            // SAFETY: gettid has no preconditions.
            FORKER_TID.store(unsafe { libc::gettid() }, SeqCst);
            // SAFETY: the child only _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(0) };
            }
            assert!(pid > 0, "the forker's fork failed");
            watchdog::wait_child(pid, Duration::from_secs(20))
        });
        // The forker's prepare is counted, holds the registries and waits
        // for A's zone lock (its only futex wait here).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(FORKER_TID.load(SeqCst) != 0
            && handler_fork::in_futex_wait(FORKER_TID.load(SeqCst)))
            && Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        assert!(
            handler_fork::in_futex_wait(FORKER_TID.load(SeqCst)),
            "the forker's prepare did not wait for A's zone lock"
        );
        ROLE.set(RAISER);
        zone_holder::allocate_under_the_zone_lock(b.pages(), ORDER);
        ROLE.set(0);
        if handler_fork::in_child() {
            set_hook(None);
            let code = grow_work(&b);
            drop(c);
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        assert_eq!(STEP.load(SeqCst), 2, "the signal was not raised");
        check_child(h);
        let status = forker.join().unwrap().expect("the forker's child hung");
        assert!(watchdog::exited_ok(status), "the forker's child failed");
    });
    set_hook(None);
}

/// Scenario 4: the handler's child's status, as the signaller saw it (-1:
/// hung; -2: not yet).
static HANDLER_CHILD_STATUS: AtomicI32 = AtomicI32::new(-2);

#[test]
fn a_handler_forks_inside_its_threads_prepare() {
    if watchdog::ran_in_child(
        "a_handler_forks_inside_its_threads_prepare",
        Duration::from_secs(90),
        "a fork in a handler while its thread's own fork waits in its prepare",
    ) {
        return;
    }
    let a = heap();
    handler_fork::install();
    set_hook(Some(hook));
    // SAFETY: gettid has no preconditions.
    let main_tid = unsafe { libc::gettid() };
    // SAFETY: pthread_self has no preconditions.
    let main = unsafe { libc::pthread_self() } as usize;
    std::thread::scope(|s| {
        let h = spawn_holder(s, &a);
        // Once the main thread's prepare waits for A's zone lock (its only
        // futex wait there), the signaller interrupts it; the handler
        // forks; then (the main thread's fork waits for H meanwhile) the
        // signaller waits for the handler's child and lets H go on.
        let signaller = s.spawn(move || {
            handler_fork::wait_until_in_futex(main_tid, "the main thread's prepare did not wait");
            STEP.store(2, SeqCst);
            let status = handler_fork::signal_and_reap(main);
            HANDLER_CHILD_STATUS.store(status.unwrap_or(-1), SeqCst);
            STEP.store(3, SeqCst);
        });
        // SAFETY: each child below runs the allocator's calls of
        // `child_work` (or none) and _exits.
        let pid = unsafe { libc::fork() };
        if handler_fork::in_child() {
            // The handler's child, where this fork went on (`pid`: its own
            // child), or that child (0).
            set_hook(None);
            let mut code = 0;
            // A's first zone, whose lock H held at the clone, stays out of
            // reach: a block that fits there comes from a zone added for it.
            let zones = a.pages().stats().zones;
            match a.pages().alloc_pages(ORDER) {
                // SAFETY: allocated just above with this order, freed once.
                Some(p) => unsafe { a.pages().free_pages(p, ORDER) },
                None => code = 6,
            }
            if zones != 1 || a.pages().stats().zones == 1 {
                handler_fork::say("child: A's first zone, whose lock H held, served a block\n");
                code = 7;
            }
            if code == 0 {
                code = child_work(&a);
            }
            if pid > 0 {
                let status = watchdog::wait_child(pid, Duration::from_secs(20));
                if !status.is_some_and(watchdog::exited_ok) {
                    handler_fork::say("child: the fork its handler interrupted failed in it\n");
                    code = 4;
                }
            } else if pid < 0 {
                code = 5;
            }
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(code) };
        }
        if pid == 0 {
            // The main thread's own fork's child (its prepare took every
            // lock): nothing to check here.
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "the main thread's fork failed");
        let status = watchdog::wait_child(pid, Duration::from_secs(30));
        assert!(
            status.is_some_and(watchdog::exited_ok),
            "the main thread's own child failed: {status:?}"
        );
        signaller.join().unwrap();
        h.join().unwrap();
    });
    set_hook(None);
    let status = HANDLER_CHILD_STATUS.load(SeqCst);
    assert!(handler_fork::child() > 0, "the handler did not fork");
    assert_ne!(
        status, -1,
        "the handler's child hung: it waited for a lock held by a thread it does not have"
    );
    assert!(
        watchdog::exited_ok(status),
        "the handler's child failed: status {status:#x}"
    );
}
