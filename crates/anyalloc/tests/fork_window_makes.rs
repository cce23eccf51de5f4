//! What a fork handler registered before `Global`'s makes inside its fork
//! window: a zone, a heap, a group. Each must be as safe across the fork as
//! what existed before the window.
//!
//! `pthread_atfork` runs prepare handlers in the reverse order of
//! registration, so handlers that a `.preinit_array` function registers
//! here (it runs before every `.init_array` constructor, anyalloc's
//! included) run while anyalloc's prepare handler holds every heap lock,
//! and allocate by borrowing those locks (the `context` module's fork
//! window). Other threads keep running meanwhile. Three scenarios, each
//! made deterministic with interrupt points:
//!
//! 1. A zone grown inside the window. The handler allocates 12 blocks of
//!    1 MiB from a private heap of 4 MiB, which grows. Another thread
//!    allocates 256 KiB blocks with `alloc_nolock`, 16 at a time (more
//!    than the zones' lock-free stocks hold); once the heap has grown, its
//!    first zone section (`Site::NolockZoneAlloc` or `Site::ZoneAlloc`)
//!    pauses until the fork has returned. Unless the window locked the new
//!    zone before publishing it, the thread holds that zone's lock at the
//!    clone, and the forked child, freeing the window's blocks (they live
//!    in the new zones), waits for ever. With the zone held, the thread's
//!    allocations fail instead, and the handler stops waiting for the
//!    pause after two of them.
//! 2. A heap made by `Heap::new` (maintenance on) inside the window. The
//!    handler frees a huge block of it with `free_nolock`, which leaves the
//!    unmap to the maintenance thread and wakes it; the thread pauses at
//!    its first maintenance site (`Site::HugeDeferredDrain`, the heap's
//!    maintenance lock held) until the fork has returned. Unless the window
//!    locked the heap before the thread started, it holds that lock at the
//!    clone, and the forked child's `drain()`, or its next `fork()`, waits
//!    for ever. (The maintainer is told from the global heap's by its
//!    thread id; every CPU's small-object caches of the global heap are
//!    stocked before each fork, because the new thread's start allocates
//!    there, and an empty cache would make it wait for the global heap's
//!    locks, which the window holds, instead of reaching the site.)
//! 3. `Group::new` in the window (40 on one parent), interrupted inside the
//!    borrowed children registry by a signal handler that calls
//!    `Group::new` on the same parent. The signal is raised at the first
//!    section's `GroupChildren` site, and in every section at its first
//!    allocator site (the registry's `Vec` growing; with rseq only an
//!    allocation that misses the fast path, which has no site, gets
//!    there). The registry lock must lend itself once at a time: the
//!    handler must not enter the section (its own `GroupChildren` site
//!    counts an entry). One that did, in the middle of the `Vec`'s growth,
//!    grew it itself and freed the old buffer, which the interrupted growth
//!    then freed again: a double free.
//!
//! Before these were fixed, 1 and 2 left the forked child hung (a child
//! that has not exited after 3 s counts as hung: it is killed and the test
//! fails), and 3 aborted on the double free (with rseq, only because the
//! first fork's growths miss the fast path; were they all to take it, the
//! handler's entry into the registry, counted at the first section's
//! entry, still fails the test).
//! The fork handlers are binary-wide: they act only when the running
//! test's scenario set `SCENARIO` (in the watchdog's child process only,
//! cleared in every forked child). Each scenario runs in a child process
//! under a watchdog.

mod watchdog;

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Global, Group, Heap};
use anyalloc_storm::{install_handler, raise_here, storm_signals, ErrnoGuard};

#[global_allocator]
static A: Global = Global;

/// Which scenario the fork handlers run (set only in the watchdog's child,
/// and cleared in every forked child).
static SCENARIO: AtomicU8 = AtomicU8::new(NONE);
const NONE: u8 = 0;
const GROWN_ZONE: u8 = 1;
const WINDOW_HEAP: u8 = 2;
const GROUP_SIGNAL: u8 = 3;

/// Forks in each scenario (a scenario stops at the first hung child).
const ROUNDS: usize = 4;
/// How long a forked child may take before it counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(3);

extern "C" fn prepare() {
    match SCENARIO.load(SeqCst) {
        GROWN_ZONE => grown_zone::prepare(),
        WINDOW_HEAP => window_heap::prepare(),
        GROUP_SIGNAL => group_signal::prepare(),
        _ => {}
    }
}

/// The parent and child handlers: the window is over.
extern "C" fn after() {
    window_heap::IN_WINDOW.store(false, SeqCst);
}

extern "C" fn register_early() {
    // SAFETY: the handlers are `extern "C"` functions that live forever.
    unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
}

#[used]
#[link_section = ".preinit_array"]
static REGISTER_EARLY: extern "C" fn() = register_early;

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Forks; the child runs `child` (which returns its exit status) and
/// `_exit`s. Returns the child's pid.
fn fork_child(child: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child runs only `child`, which uses the heaps under test
    // (the point of the test), and then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        SCENARIO.store(NONE, SeqCst);
        let status = child();
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(status) };
    }
    assert!(pid > 0, "fork failed");
    pid
}

/// Spins until `flag` is set or `limit` has passed.
fn wait_for(flag: &AtomicBool, limit: Duration) {
    let until = Instant::now() + limit;
    while !flag.load(SeqCst) && Instant::now() < until {
        std::thread::yield_now();
    }
}

mod grown_zone {
    use super::*;

    /// The private heap the window grows (this round).
    pub(super) static HEAP: Mutex<Option<Arc<Heap>>> = Mutex::new(None);
    /// The window's 1 MiB blocks (addresses), freed by the forked child.
    pub(super) static HELD: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    /// The window grew the heap (this round).
    pub(super) static GROWN: AtomicBool = AtomicBool::new(false);
    /// The pauser is inside a zone section, pausing (this round).
    pub(super) static PAUSED: AtomicBool = AtomicBool::new(false);
    /// It was when the window ended (this round): it held that zone's lock
    /// at the clone unless the window held the zone.
    pub(super) static PAUSED_AT_FORK: AtomicBool = AtomicBool::new(false);
    /// The main thread's `fork` returned (this round).
    pub(super) static FORKED: AtomicBool = AtomicBool::new(false);
    /// Allocations the pauser started after the growth that failed without
    /// pausing (this round): every zone was held.
    pub(super) static TRIED: AtomicU64 = AtomicU64::new(0);
    /// The heap's zones once the window grew it (this round).
    pub(super) static ZONES: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        /// Set on the thread that pauses inside its zone sections.
        pub(super) static PAUSER: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn zones(h: &Heap) -> usize {
        (0..)
            .take_while(|&i| h.pages().zone_stats(i).is_some())
            .count()
    }

    /// The prepare handler: grows the heap, then waits until the pauser
    /// has paused in a zone section, or has twice tried every zone without
    /// pausing (they are all held), or for 2 s.
    pub(super) fn prepare() {
        let heap = HEAP.lock().unwrap().clone().expect("the round's heap");
        let held: Vec<usize> = (0..12)
            .map(|_| {
                let p = heap.alloc(layout(1 << 20)).expect("1 MiB in the window");
                p.as_ptr() as usize
            })
            .collect();
        ZONES.store(zones(&heap), SeqCst);
        *HELD.lock().unwrap() = held;
        GROWN.store(true, SeqCst);
        let until = Instant::now() + Duration::from_secs(2);
        while !PAUSED.load(SeqCst) && TRIED.load(SeqCst) < 2 && Instant::now() < until {
            std::thread::yield_now();
        }
        PAUSED_AT_FORK.store(PAUSED.load(SeqCst), SeqCst);
    }

    /// Pauses the pauser in its first zone section once the heap has grown,
    /// until the fork has returned (or for 200 ms).
    pub(super) fn hook(site: Site) {
        if !PAUSER.get() || !GROWN.load(SeqCst) || PAUSED.load(SeqCst) {
            return;
        }
        if site != Site::NolockZoneAlloc && site != Site::ZoneAlloc {
            return;
        }
        PAUSED.store(true, SeqCst);
        wait_for(&FORKED, Duration::from_millis(200));
    }
}

#[test]
fn zone_grown_in_the_fork_window_is_held_across_the_fork() {
    if watchdog::ran_in_child(
        "zone_grown_in_the_fork_window_is_held_across_the_fork",
        Duration::from_secs(120),
        "a zone grown in the fork window, another thread in it at the fork",
    ) {
        return;
    }
    use grown_zone::*;
    set_hook(Some(hook));
    SCENARIO.store(GROWN_ZONE, SeqCst);
    let (mut hung, mut failed, mut paused) = (0, 0, 0);
    let mut grew = Vec::new();
    for round in 0..ROUNDS {
        let cfg = Config::default().memory(4 << 20).maintenance(false);
        let heap = Arc::new(Heap::new(cfg).expect("heap"));
        *HEAP.lock().unwrap() = Some(heap.clone());
        let before = zones(&heap);
        for flag in [&GROWN, &PAUSED, &PAUSED_AT_FORK, &FORKED] {
            flag.store(false, SeqCst);
        }
        TRIED.store(0, SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(false));
        let pauser = {
            let (heap, stop, running) = (heap.clone(), stop.clone(), running.clone());
            std::thread::spawn(move || {
                PAUSER.set(true);
                // 16 blocks at a time: more than the zones' lock-free
                // stocks hold, so that some come from a zone section.
                let mut live = Vec::with_capacity(16);
                while !stop.load(SeqCst) {
                    let grown = GROWN.load(SeqCst);
                    for _ in 0..16 {
                        match heap.alloc_nolock(layout(256 << 10)) {
                            Some(p) => live.push(p),
                            None => {
                                if grown && !PAUSED.load(SeqCst) {
                                    TRIED.fetch_add(1, SeqCst);
                                }
                                break;
                            }
                        }
                    }
                    for p in live.drain(..) {
                        // SAFETY: allocated above from this heap, freed once.
                        unsafe { heap.free_nolock(p) };
                    }
                    running.store(true, SeqCst);
                }
            })
        };
        // Started (a thread still starting could wait in the window for a
        // lock of the global heap, and never try the new zone).
        wait_for(&running, Duration::from_secs(10));
        let pid = fork_child(|| {
            for &p in HELD.lock().unwrap().iter() {
                // SAFETY: a block of this heap that the window allocated
                // (the parent frees its own copy).
                unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
            }
            i32::from(heap.alloc(layout(256 << 10)).is_none())
        });
        FORKED.store(true, SeqCst);
        let status = watchdog::wait_child(pid, HUNG_AFTER);
        stop.store(true, SeqCst);
        pauser.join().unwrap();
        paused += usize::from(PAUSED_AT_FORK.load(SeqCst));
        grew.push((before, ZONES.load(SeqCst)));
        for p in std::mem::take(&mut *HELD.lock().unwrap()) {
            // SAFETY: allocated by the window from this heap, freed once.
            unsafe { heap.free(NonNull::new(p as *mut u8).unwrap()) };
        }
        *HEAP.lock().unwrap() = None;
        match status {
            None => {
                hung += 1;
                println!("round {round}: the forked child hung (killed)");
                break;
            }
            Some(s) if !watchdog::exited_ok(s) => failed += 1,
            Some(_) => {}
        }
    }
    SCENARIO.store(NONE, SeqCst);
    set_hook(None);
    println!(
        "{} forks, zones before -> after the window's growth {grew:?}; the other thread \
         paused in a zone section at {paused} of them; {hung} children hung, {failed} failed",
        grew.len()
    );
    assert_eq!(
        hung, 0,
        "a forked child hung: a zone grown in the fork window was not held across the fork"
    );
    assert_eq!(failed, 0, "a forked child could not free or allocate");
    assert!(grew.iter().all(|&(b, a)| a > b), "the window grew the heap");
}

mod window_heap {
    use super::*;

    /// The heap the window made (this round).
    pub(super) static HEAP: Mutex<Option<Heap>> = Mutex::new(None);
    /// Between the window's `Heap::new` and the end of the fork.
    pub(super) static IN_WINDOW: AtomicBool = AtomicBool::new(false);
    /// The window heap's maintainer is paused at a maintenance site.
    pub(super) static PAUSED: AtomicBool = AtomicBool::new(false);
    /// It was when the window ended (this round).
    pub(super) static PAUSED_AT_FORK: AtomicBool = AtomicBool::new(false);
    /// The main thread's `fork` returned (this round).
    pub(super) static FORKED: AtomicBool = AtomicBool::new(false);
    /// Thread ids of the maintenance threads that ran before the window
    /// (the global heap's): not the window heap's (0: none).
    pub(super) static OLD_MAINTAINERS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];

    /// Sites where a maintenance pass holds a lock of the heap.
    const MAINTENANCE_SITES: &[Site] = &[
        Site::PcpDrain,
        Site::SheafFlush,
        Site::ObjectDeferredDrain,
        Site::DeferredDrain,
        Site::ReleaseIdle,
        Site::ReleaseSlab,
        Site::CacheDrain,
        Site::HugeDeferredDrain,
    ];

    /// The name `maintain.rs` gives maintenance threads, as the kernel
    /// keeps it (15 bytes).
    const MAINTAINER: &[u8] = b"anyalloc-mainta";

    /// This process's threads named as maintenance threads.
    pub(super) fn maintainers() -> Vec<i32> {
        let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
        tasks
            .filter_map(|t| {
                let t = t.ok()?;
                let comm = std::fs::read(t.path().join("comm")).ok()?;
                comm.starts_with(MAINTAINER)
                    .then(|| t.file_name().to_str()?.parse().ok())?
            })
            .collect()
    }

    /// Stocks every allowed CPU's caches of small objects in the global
    /// heap: a thread started inside the window (the window heap's
    /// maintainer: std copies its name at its start) that found its CPU's
    /// cache empty would wait for a lock of the global heap, which the
    /// window holds, and reach no maintenance site. The objects are freed
    /// on the CPU they stock, by a thread pinned there.
    pub(super) fn stock_small_objects() {
        // SAFETY: a zeroed cpu_set_t is the empty set, which
        // sched_getaffinity fills (the calling thread's allowed CPUs).
        let allowed = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
            set
        };
        for cpu in 0..libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is below CPU_SETSIZE: inside the set.
            if !unsafe { libc::CPU_ISSET(cpu, &allowed) } {
                continue;
            }
            std::thread::spawn(move || {
                if anyalloc_storm::thread::pin_to_cpu(cpu) {
                    let objects: Vec<Vec<u8>> =
                        (0..512).map(|i| Vec::with_capacity(1 + i % 64)).collect();
                    drop(objects);
                }
            })
            .join()
            .unwrap();
        }
    }

    /// Whether the calling thread is the window heap's maintenance thread:
    /// a maintenance thread not running before the window.
    fn window_maintainer() -> bool {
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes to a 16-byte buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        if !name.starts_with(MAINTAINER) {
            return false;
        }
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        OLD_MAINTAINERS.iter().all(|t| t.load(SeqCst) != me)
    }

    /// The prepare handler: makes a heap (its maintainer starts), frees a
    /// huge block of it with `free_nolock` (which leaves the unmap to the
    /// maintainer and wakes it), and gives the maintainer up to 300 ms to
    /// reach a maintenance site.
    pub(super) fn prepare() {
        let h = Heap::new(Config::default().memory(4 << 20)).expect("Heap::new in the window");
        IN_WINDOW.store(true, SeqCst);
        let huge = h
            .alloc(layout(8 << 20))
            .expect("a huge block in the window");
        // SAFETY: allocated just above from this heap, freed once.
        unsafe { h.free_nolock(huge) };
        *HEAP.lock().unwrap() = Some(h);
        wait_for(&PAUSED, Duration::from_millis(300));
        PAUSED_AT_FORK.store(PAUSED.load(SeqCst), SeqCst);
    }

    /// Pauses the window heap's maintainer at its first maintenance site
    /// inside the window, until the fork has returned (or for 2.5 s).
    pub(super) fn hook(site: Site) {
        if !IN_WINDOW.load(SeqCst)
            || PAUSED.load(SeqCst)
            || !MAINTENANCE_SITES.contains(&site)
            || !window_maintainer()
        {
            return;
        }
        PAUSED.store(true, SeqCst);
        wait_for(&FORKED, Duration::from_millis(2500));
    }
}

#[test]
fn heap_made_in_the_fork_window_is_held_across_the_fork() {
    if watchdog::ran_in_child(
        "heap_made_in_the_fork_window_is_held_across_the_fork",
        Duration::from_secs(120),
        "a heap made in the fork window, its maintainer in it at the fork",
    ) {
        return;
    }
    use window_heap::*;
    anyalloc::init().expect("global heap");
    set_hook(Some(hook));
    SCENARIO.store(WINDOW_HEAP, SeqCst);
    let (mut hung, mut failed, mut paused, mut forks) = (0, 0, 0, 0);
    for round in 0..ROUNDS {
        let old = maintainers();
        assert!(old.len() <= OLD_MAINTAINERS.len(), "maintainers {old:?}");
        for (i, slot) in OLD_MAINTAINERS.iter().enumerate() {
            slot.store(old.get(i).copied().unwrap_or(0), SeqCst);
        }
        for flag in [&PAUSED, &PAUSED_AT_FORK, &FORKED] {
            flag.store(false, SeqCst);
        }
        stock_small_objects();
        let pid = fork_child(|| {
            let guard = HEAP.lock().unwrap();
            let h = guard.as_ref().expect("the window's heap");
            h.drain();
            // A second fork: its prepare handler takes every heap's locks.
            let grandchild = fork_child(|| 0);
            i32::from(
                watchdog::wait_child(grandchild, HUNG_AFTER)
                    .is_none_or(|s| !watchdog::exited_ok(s)),
            )
        });
        FORKED.store(true, SeqCst);
        forks += 1;
        let status = watchdog::wait_child(pid, HUNG_AFTER);
        paused += usize::from(PAUSED_AT_FORK.load(SeqCst));
        drop(HEAP.lock().unwrap().take());
        match status {
            None => {
                hung += 1;
                println!("round {round}: the forked child hung (killed)");
                break;
            }
            Some(s) if !watchdog::exited_ok(s) => failed += 1,
            Some(_) => {}
        }
    }
    SCENARIO.store(NONE, SeqCst);
    set_hook(None);
    println!(
        "{forks} forks; the window heap's maintainer paused at a maintenance site at {paused} \
         of them; {hung} children hung, {failed} failed"
    );
    assert_eq!(
        hung, 0,
        "a forked child hung: a heap made in the fork window was not held across the fork"
    );
    assert_eq!(failed, 0, "a forked child's drain or fork failed");
}

mod group_signal {
    use super::*;

    /// Children made by the window on one parent, each fork.
    pub(super) const CHILDREN: usize = 40;

    /// Signals raised at the window's `GroupChildren` site (entering the
    /// borrowed registry section).
    pub(super) static RAISED_AT_ENTRY: AtomicU64 = AtomicU64::new(0);
    /// Signals raised at an allocator site inside that section.
    pub(super) static RAISED_INSIDE: AtomicU64 = AtomicU64::new(0);
    /// Handlers that ran inside the section and made a group.
    pub(super) static HANDLED: AtomicU64 = AtomicU64::new(0);
    /// Times a handler's `Group::new` entered the registry section while
    /// the interrupted `Group::new` was inside it.
    pub(super) static REENTERED: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        /// The fork's parent group (the main thread's).
        pub(super) static PARENT: RefCell<Option<Arc<Group>>> = const { RefCell::new(None) };
        /// The handlers' groups, kept until the fork is over (with room
        /// reserved beforehand: a handler's push allocates nothing), so
        /// that the registry holds no dead entry for `retain` to free.
        pub(super) static FROM_HANDLERS: RefCell<Vec<Arc<Group>>> =
            const { RefCell::new(Vec::new()) };
        /// The prepare handler is making groups.
        static ARMED: Cell<bool> = const { Cell::new(false) };
        /// The signal is raised on entering the next registry section too.
        static AT_ENTRY: Cell<bool> = const { Cell::new(false) };
        /// Inside `Group::new`'s registry section (its `GroupChildren`
        /// site passed), no signal raised at an allocator site there yet.
        static IN_SECTION: Cell<bool> = const { Cell::new(false) };
        /// The signal was raised here (its handler runs inside the section).
        static RAISING: Cell<bool> = const { Cell::new(false) };
        /// The signal handler is running.
        static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
    }

    /// The prepare handler: makes `CHILDREN` groups on the parent, keeping
    /// them until the end (the registry's `Vec` grows several times), the
    /// signal raised on entering the registry in the first.
    pub(super) fn prepare() {
        let parent = PARENT.with_borrow(Clone::clone).expect("the fork's parent");
        let mut kept = Vec::with_capacity(CHILDREN);
        ARMED.set(true);
        for i in 0..CHILDREN {
            AT_ENTRY.set(i == 0);
            kept.push(Group::new("child", None, Some(&parent)));
            IN_SECTION.set(false);
        }
        ARMED.set(false);
    }

    /// Sends the signal to this thread; its handler runs before this returns.
    fn raise(count: &AtomicU64) {
        count.fetch_add(1, SeqCst);
        RAISING.set(true);
        raise_here(storm_signals()[0]);
        RAISING.set(false);
    }

    /// In the window's `Group::new`: raises the signal on entering the
    /// registry section (`GroupChildren`) if `AT_ENTRY`, and at the first
    /// allocator site inside it (the section's only allocations: its `Vec`
    /// growing; without rseq every allocation passes a site, with rseq only
    /// those that miss the fast path). In the handler's `Group::new`:
    /// counts an entry into the section.
    pub(super) fn hook(site: Site) {
        if !ARMED.get() {
            return;
        }
        if IN_HANDLER.get() {
            if site == Site::GroupChildren {
                REENTERED.fetch_add(1, SeqCst);
            }
            return;
        }
        if site == Site::GroupChildren {
            IN_SECTION.set(true);
            if AT_ENTRY.get() {
                raise(&RAISED_AT_ENTRY);
            }
        } else if IN_SECTION.get() {
            IN_SECTION.set(false);
            raise(&RAISED_INSIDE);
        }
    }

    /// Makes a group on the same parent, kept in `FROM_HANDLERS`.
    pub(super) extern "C" fn on_signal(
        _: libc::c_int,
        _: *mut libc::siginfo_t,
        _: *mut libc::c_void,
    ) {
        let _errno = ErrnoGuard::save();
        if !RAISING.get() {
            return;
        }
        IN_HANDLER.set(true);
        if let Some(parent) = PARENT.with_borrow(Clone::clone) {
            let g = Group::new("from a handler", None, Some(&parent));
            FROM_HANDLERS.with_borrow_mut(|k| {
                if k.len() < k.capacity() {
                    k.push(g);
                }
            });
            HANDLED.fetch_add(1, SeqCst);
        }
        IN_HANDLER.set(false);
    }
}

#[test]
fn group_registry_is_lent_once_in_the_fork_window() {
    if watchdog::ran_in_child(
        "group_registry_is_lent_once_in_the_fork_window",
        Duration::from_secs(120),
        "a signal handler's Group::new inside the fork window's Group::new",
    ) {
        return;
    }
    use group_signal::*;
    let sig = storm_signals()[0];
    install_handler(sig, on_signal, &[]).expect("sigaction");
    set_hook(Some(hook));
    SCENARIO.store(GROUP_SIGNAL, SeqCst);
    let (mut hung, mut failed) = (0, 0);
    let mut inside = Vec::new();
    for round in 0..ROUNDS {
        let before = RAISED_INSIDE.load(SeqCst);
        let parent = Group::new("parent", None, None);
        PARENT.set(Some(parent.clone()));
        FROM_HANDLERS.with_borrow_mut(|k| k.reserve(2 * CHILDREN));
        let pid = fork_child(|| 0);
        let status = watchdog::wait_child(pid, HUNG_AFTER);
        // Walks the registry (every child's Weak).
        let _ = parent.usage();
        PARENT.set(None);
        FROM_HANDLERS.with_borrow_mut(Vec::clear);
        inside.push(RAISED_INSIDE.load(SeqCst) - before);
        match status {
            None => {
                hung += 1;
                println!("round {round}: the forked child hung (killed)");
                break;
            }
            Some(s) if !watchdog::exited_ok(s) => failed += 1,
            Some(_) => {}
        }
    }
    SCENARIO.store(NONE, SeqCst);
    set_hook(None);
    let at_entry = RAISED_AT_ENTRY.load(SeqCst);
    let raised = at_entry + RAISED_INSIDE.load(SeqCst);
    let (handled, reentered) = (HANDLED.load(SeqCst), REENTERED.load(SeqCst));
    println!(
        "{ROUNDS} forks: signals raised in the window's borrowed children registry: {at_entry} \
         on entering it, {inside:?} at an allocator site inside it; {handled} handlers made a \
         group there, {reentered} of them entered the registry; {hung} children hung, \
         {failed} failed"
    );
    assert_eq!(
        reentered, 0,
        "a signal handler's Group::new entered the children registry while the Group::new \
         it interrupted was inside it: the fork window lent the registry twice"
    );
    assert_eq!(hung, 0, "a forked child hung");
    assert_eq!(failed, 0, "a forked child failed");
    assert_eq!(
        at_entry, ROUNDS as u64,
        "a signal raised on entering the registry"
    );
    assert_eq!(
        handled, raised,
        "a raised signal's handler did not run there"
    );
}
