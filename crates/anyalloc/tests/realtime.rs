//! Real-time threads and preemption: a `SCHED_FIFO` thread pinned to the
//! CPU of a `SCHED_OTHER` thread that it preempted in the middle of an
//! allocator section.
//!
//! The holder runs a normal-path call on CPU `c` and, at an interrupt
//! point inside a critical section (feature `interrupt-points`), wakes the
//! real-time thread, pinned to `c` too: the kernel switches to it at once
//! (a higher priority on the same CPU), with the holder preempted inside
//! its section. While the real-time thread runs, the holder cannot: if the
//! real-time thread's call spins on something only the holder can change,
//! it spins until the kernel's real-time throttling (`sched_rt_runtime_us`,
//! by default 0.95 s of every second) or the fair server lets the holder
//! run for a moment, and without throttling for ever (a livelock; the
//! watchdog fails the test). A call that waits the way the normal path may
//! (a futex or a timed sleep) lets the holder run, finish its section and
//! release.
//!
//! The verdict is a count, not a time, from the real-time thread's
//! `getrusage(RUSAGE_THREAD)` and the holder's progress:
//!
//! * the holder ran again during the call (it only can while the
//!   real-time thread blocks or is throttled): then the call must have
//!   blocked (`ru_nvcsw`): a spinning call never does;
//! * the call was preempted (`ru_nivcsw`): nothing but the kernel's
//!   real-time throttling preempts the only real-time thread of the CPU,
//!   and that takes a spin through the period's budget (0.95 s by
//!   default), which no call that does not wait for the holder comes near;
//! * a nolock call must neither block nor let the holder run.
//!
//! The elapsed times are printed for the report only.
//!
//! The counts assume that nothing else preempts the real-time thread on
//! the first CPU meanwhile: no real-time thread of a higher priority, and
//! no CPU stopper (the kernel runs one on a CPU to move a thread off it,
//! as when another process pins a running thread elsewhere; it counts as
//! an involuntary switch). So the tests of this file run one at a time
//! ([`ran_alone`]), each scenario in its own child; a run of other
//! programs that pin threads beside them can still make one fail.
//!
//! Needs `SCHED_FIFO` (root, or `RLIMIT_RTPRIO`) and at least one CPU; a
//! machine without it fails the test with a message, or skips it with
//! `ANYALLOC_ALLOW_SKIP=1`.

mod watchdog;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Group, Heap};
use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Held by the parent while a test's child runs, so that the tests of
/// this file run one at a time: they all pin their threads to the first
/// CPU, and one child's pinning (or its real-time thread) would preempt
/// another's real-time thread there.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// [`watchdog::ran_in_child`], one test at a time ([`ONE_AT_A_TIME`]).
fn ran_alone(name: &str, limit: Duration, what: &str) -> bool {
    if watchdog::in_child() {
        return false;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    watchdog::ran_in_child(name, limit, what)
}

/// The holder's kernel thread id (0: none yet).
static HOLDER_TID: AtomicI32 = AtomicI32::new(0);
/// The site the holder parks at (a `Site as u8`).
static TARGET: AtomicU8 = AtomicU8::new(u8::MAX);
/// The holder reached the site (once per round).
static REACHED: AtomicBool = AtomicBool::new(false);
/// The holder ran again after it woke the real-time thread at the site.
static RESUMED: AtomicU64 = AtomicU64::new(0);
/// The holder's call returned.
static HOLDER_DONE: AtomicBool = AtomicBool::new(false);
/// The pipe whose write wakes the real-time thread: [read end, write end].
static PIPE: OnceLock<[i32; 2]> = OnceLock::new();

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Wakes the real-time thread (blocked reading the pipe).
fn wake_rt() {
    let w = PIPE.get().unwrap()[1];
    // SAFETY: one byte from a live buffer to our pipe.
    assert_eq!(unsafe { libc::write(w, [1u8].as_ptr().cast(), 1) }, 1);
}

/// Nolock work the holder does at every other site (as a signal handler
/// of its own would), to reach the nolock path's sections too, with the
/// heap whose blocks it allocates and frees.
static NESTED: Mutex<Option<Nested>> = Mutex::new(None);

struct Nested {
    heap: Arc<Heap>,
    /// Blocks allocated at one site and freed at a later one.
    stash: Vec<(usize, Layout)>,
}

thread_local! {
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// The holder's nested nolock work at a site: frees what an earlier site
/// allocated, and allocates blocks of each size range for a later one
/// (pages, too). The small ones come 200 at a time, most of a sheaf of
/// their class (254 objects of 16 bytes), so that at some sites the
/// allocations run the main sheaf dry (a refill, a spare swap) and the
/// frees fill it (a swap, a flush to the barn): the nolock slow paths run
/// beside the section the holder is parked in, not only the fast ones.
/// (Not enough to park objects on the deferred stack, which takes every
/// sheaf of the CPU and the barn full or busy; `heap_deferred_gate` and
/// the storms cover that path.)
fn nested_work() {
    let Ok(mut guard) = NESTED.try_lock() else {
        return;
    };
    let Some(n) = guard.as_mut() else {
        return;
    };
    for (p, l) in n.stash.drain(..) {
        // SAFETY: allocated from this heap below, at an earlier site; once.
        unsafe {
            n.heap
                .free_nolock_sized(NonNull::new(p as *mut u8).unwrap(), l)
        };
    }
    for (size, count) in [(16, 200), (200, 4), (3000, 4), (64 << 10, 1), (1 << 20, 1)] {
        let l = layout(size);
        for _ in 0..count {
            if let Some(p) = n.heap.alloc_nolock(l) {
                n.stash.push((p.as_ptr() as usize, l));
            }
        }
    }
    if let Some(p) = n.heap.pages().alloc_pages_nolock(0) {
        // SAFETY: allocated above with order 0, freed once.
        unsafe { n.heap.pages().free_pages_nolock(p, 0) };
    }
}

fn hook(site: Site) {
    if gettid() != HOLDER_TID.load(Ordering::Relaxed) {
        return;
    }
    if site as u8 != TARGET.load(Ordering::Relaxed) {
        if !IN_HOOK.get() {
            IN_HOOK.set(true);
            nested_work();
            IN_HOOK.set(false);
        }
        return;
    }
    if REACHED.swap(true, Ordering::SeqCst) {
        return;
    }
    // The real-time thread, woken on this CPU, preempts this thread on
    // the way out of the write: this thread stays here, inside the
    // section, until the real-time thread blocks or ends (or the kernel
    // throttles it).
    wake_rt();
    RESUMED.fetch_add(1, Ordering::SeqCst);
}

fn pin(cpu: usize) {
    // SAFETY: a valid set of one CPU, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

fn first_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; the call fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .unwrap()
    }
}

/// Makes the calling thread SCHED_FIFO at priority 80 (above the usual
/// real-time load, such as the `realtime` example's 50, that may share the
/// machine); whether it could.
fn make_fifo() -> bool {
    let param = libc::sched_param { sched_priority: 80 };
    // SAFETY: our own thread, a valid parameter block.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) == 0 }
}

/// (voluntary, involuntary) context switches of the calling thread so far.
fn switches() -> (i64, i64) {
    // SAFETY: a zeroed rusage is valid; the call fills it.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut ru), 0);
        (ru.ru_nvcsw, ru.ru_nivcsw)
    }
}

/// Whether SCHED_FIFO is available to this process (checked on a
/// throw-away thread); prints why not, and with `ANYALLOC_ALLOW_SKIP=1`
/// the caller skips.
fn fifo_available() -> bool {
    if std::thread::spawn(make_fifo).join().unwrap() {
        return true;
    }
    if std::env::var_os("ANYALLOC_ALLOW_SKIP").is_some() {
        println!("skipped: SCHED_FIFO is not permitted here (needs root or RLIMIT_RTPRIO)");
        return false;
    }
    panic!("SCHED_FIFO is not permitted here (needs root or RLIMIT_RTPRIO); ANYALLOC_ALLOW_SKIP=1 skips");
}

/// What a call of the real-time thread did while the holder was parked.
#[derive(Debug, Clone, Copy)]
struct Probe {
    voluntary: i64,
    involuntary: i64,
    /// The holder ran again during the call.
    resumed: bool,
    elapsed: Duration,
}

/// Runs `f` on the real-time thread and reports what it did.
fn probe(f: impl FnOnce()) -> Probe {
    let r0 = RESUMED.load(Ordering::SeqCst);
    let before = switches();
    let start = Instant::now();
    f();
    let elapsed = start.elapsed();
    let after = switches();
    Probe {
        voluntary: after.0 - before.0,
        involuntary: after.1 - before.1,
        resumed: RESUMED.load(Ordering::SeqCst) != r0,
        elapsed,
    }
}

/// Runs `holder` on a SCHED_OTHER thread pinned to one CPU, parks it at
/// `site` (preempted there by the real-time thread), and runs `rt` on a
/// SCHED_FIFO thread pinned to the same CPU. `holder` gets a function
/// that says whether it reached the site (it should stop its work then);
/// `rt` runs only if it did, and its result is returned (`Err`: the
/// real-time thread could not preempt the holder there).
fn preempted_at<R: Send + 'static>(
    site: Site,
    holder: impl FnOnce(&dyn Fn() -> bool) + Send + 'static,
    rt: impl FnOnce() -> R + Send + 'static,
) -> Option<Result<R, String>> {
    let fds = *PIPE.get_or_init(|| {
        let mut fds = [0i32; 2];
        // SAFETY: a valid array of two descriptors for the call to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        fds
    });
    HOLDER_TID.store(0, Ordering::SeqCst);
    REACHED.store(false, Ordering::SeqCst);
    HOLDER_DONE.store(false, Ordering::SeqCst);
    TARGET.store(site as u8, Ordering::SeqCst);
    set_hook(Some(hook));
    let cpu = first_cpu();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rt_thread = std::thread::spawn(move || {
        pin(cpu);
        assert!(make_fifo(), "SCHED_FIFO");
        ready_tx.send(()).unwrap();
        let mut b = 0u8;
        // SAFETY: one byte into a live buffer from our pipe.
        assert_eq!(
            unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) },
            1
        );
        if !REACHED.load(Ordering::SeqCst) {
            return None;
        }
        // Woken at the site, the real-time thread runs before the holder
        // can go on, unless the kernel throttles real-time threads right
        // now (an earlier call spun through this period's budget).
        if HOLDER_DONE.load(Ordering::SeqCst) {
            return Some(Err(String::from(
                "the holder finished before the real-time thread ran (throttled after an earlier spin?)",
            )));
        }
        Some(Ok(rt()))
    });
    ready_rx.recv().unwrap();
    let holder_thread = std::thread::spawn(move || {
        pin(cpu);
        HOLDER_TID.store(gettid(), Ordering::SeqCst);
        holder(&|| REACHED.load(Ordering::SeqCst));
        HOLDER_TID.store(0, Ordering::SeqCst);
        HOLDER_DONE.store(true, Ordering::SeqCst);
        if !REACHED.load(Ordering::SeqCst) {
            wake_rt();
        }
    });
    holder_thread.join().unwrap();
    let out = rt_thread.join().unwrap();
    set_hook(None);
    out
}

/// A real-time thread's accounted allocation over its group's limit
/// (`Heap::alloc_in`, the normal path, which may wait) while a preempted
/// thread of the same CPU holds the accounting groups' children registry
/// (`Group::new` of an unrelated group): the retry returns the tree's
/// stocks under that registry lock, and must let the holder run rather than
/// spin on the lock (it spun, without end but for RT throttling).
#[test]
fn accounted_retry_waits_for_a_preempted_registry_holder() {
    if ran_alone(
        "accounted_retry_waits_for_a_preempted_registry_holder",
        Duration::from_secs(60),
        "a real-time accounted allocation against a preempted registry holder",
    ) || !fifo_available()
    {
        return;
    }
    let heap =
        Arc::new(Heap::new(Config::default().memory(16 << 20).maintenance(false)).expect("a heap"));
    let other = Group::new("other tenant", None, None);
    let tight = Group::new("tight", Some(1024), None);
    let h = heap.clone();
    let out = preempted_at(
        Site::GroupChildren,
        move |_| {
            // Holds the children registry at `GroupChildren`.
            let child = Group::new("new child", None, Some(&other));
            drop(child);
        },
        move || {
            probe(|| {
                // Over the limit: refused, then the normal path's retry.
                let p = h.alloc_in(Layout::from_size_align(4096, 8).unwrap(), &tight);
                assert!(p.is_none(), "4 KiB fits no group of 1 KiB");
            })
        },
    )
    .expect("the holder reached GroupChildren")
    .unwrap();
    println!("real-time call: {out:?}");
    assert!(
        out.voluntary > 0,
        "the real-time thread never blocked while the preempted holder held the registry: \
         it spun ({:?}, {} involuntary switches)",
        out.elapsed,
        out.involuntary
    );
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// The holder's normal-path work: every kind of allocation and free of the
/// heap (objects of each size range, large blocks, huge blocks, pages,
/// accounted objects, a new group), then drain, maintenance passes and
/// trim; it stops starting new operations once it reached its site (and
/// frees what it holds).
fn holder_work(heap: &Heap, group: &Arc<Group>, stop: &dyn Fn() -> bool) {
    const SIZES: [usize; 11] = [
        16,
        48,
        200,
        1000,
        3000,
        8000,
        20_000,
        64 << 10,
        300 << 10,
        1 << 20,
        3 << 20,
    ];
    for round in 0..2 {
        let mut live = Vec::new();
        for size in SIZES {
            for _ in 0..if size < 10_000 { 300 } else { 3 } {
                if stop() {
                    break;
                }
                if let Some(p) = heap.alloc(layout(size)) {
                    live.push(p);
                }
            }
        }
        let mut charged = Vec::new();
        for _ in 0..64 {
            if stop() {
                break;
            }
            if let Some(p) = heap.alloc_in(layout(100), group) {
                charged.push(p);
            }
        }
        for (i, p) in live.into_iter().chain(charged).enumerate() {
            // SAFETY: allocated above from `heap`, freed once. Some frees
            // take the nolock path, whose deferred frees the normal path
            // then drains.
            unsafe {
                if i % 3 == round % 3 {
                    heap.free_nolock(p)
                } else {
                    heap.free(p)
                }
            }
        }
        if !stop() {
            if let Some(mut p) = heap.alloc(layout(8 << 20)) {
                // SAFETY: a live huge allocation; after `Some` only the
                // result is.
                if let Some(q) = unsafe { heap.remap_huge(p, 16 << 20) } {
                    p = q;
                }
                // SAFETY: allocated above, freed once.
                unsafe { heap.free(p) };
            }
        }
        for order in 0..=10 {
            if stop() {
                break;
            }
            if let Some(p) = heap.pages().alloc_pages(order) {
                // SAFETY: allocated above with this order, freed once.
                unsafe { heap.pages().free_pages(p, order) };
            }
        }
        if !stop() {
            drop(Group::new("child", None, Some(group)));
        }
        for _ in 0..3 {
            if !stop() {
                heap.maintain();
            }
        }
        if !stop() {
            heap.drain();
        }
        if !stop() {
            heap.trim();
        }
    }
}

/// The real-time thread's nolock calls: objects of each size range, an
/// accounted object, pages of orders 0 to 10; each freed at once.
fn nolock_calls(heap: &Heap, group: &Arc<Group>) {
    for size in [16, 200, 3000, 8000, 64 << 10, 1 << 20] {
        if let Some(p) = heap.alloc_nolock(layout(size)) {
            // SAFETY: allocated above, freed once.
            unsafe { heap.free_nolock(p) };
        }
    }
    if let Some(p) = heap.alloc_nolock_in(layout(100), group) {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free_nolock(p) };
    }
    for order in [0, 3, 6, 10] {
        if let Some(p) = heap.pages().alloc_pages_nolock(order) {
            // SAFETY: allocated above with this order, freed once.
            unsafe { heap.pages().free_pages_nolock(p, order) };
        }
    }
}

/// The real-time thread's normal-path calls: as [`nolock_calls`], and a
/// huge block.
fn normal_calls(heap: &Heap, group: &Arc<Group>) {
    for size in [16, 200, 3000, 8000, 64 << 10, 1 << 20, 8 << 20] {
        if let Some(p) = heap.alloc(layout(size)) {
            // SAFETY: allocated above, freed once.
            unsafe { heap.free(p) };
        }
    }
    if let Some(p) = heap.alloc_in(layout(100), group) {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    for order in [0, 3, 6, 10] {
        if let Some(p) = heap.pages().alloc_pages(order) {
            // SAFETY: allocated above with this order, freed once.
            unsafe { heap.pages().free_pages(p, order) };
        }
    }
}

/// A fork of the real-time thread (its prepare handler takes every heap's
/// locks), probed; the child exits at once and is reaped after the probe.
fn probe_fork() -> Probe {
    let mut pid = 0;
    let p = probe(|| {
        // SAFETY: the child only calls `_exit`.
        pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
    });
    assert!(pid > 0, "fork");
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    p
}

/// At every interrupt point of the heap, its page allocator and the
/// accounting layer that the holder's normal-path work reaches, a
/// real-time thread of the holder's CPU preempts it there and calls:
///
/// * the nolock path (objects of each size range, pages of orders 0 to 10,
///   an accounted object; each freed at once): it must neither block nor
///   let the holder run (a call that waits for the holder's progress,
///   spinning, only ends when RT throttling lets the holder run);
/// * the normal path (the same and a huge block): it may wait, but a call
///   during which the holder ran must have blocked to let it (a spinning
///   one only lets it run when throttled).
#[test]
fn rt_calls_never_spin_on_a_preempted_holder() {
    if ran_alone(
        "rt_calls_never_spin_on_a_preempted_holder",
        Duration::from_secs(240),
        "real-time calls at every site of a preempted holder",
    ) || !fifo_available()
    {
        return;
    }
    let heap =
        Arc::new(Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("a heap"));
    let group = Group::new("tenant", None, None);
    heap.register_shrinker(|_| 0);
    *NESTED.lock().unwrap() = Some(Nested {
        heap: heap.clone(),
        stash: Vec::new(),
    });
    let sites: Vec<Site> = [Site::PAGE, Site::RELEASE, Site::HEAP, Site::ACCOUNT]
        .concat()
        .into_iter()
        .collect();
    let mut bad = Vec::new();
    let mut missed = Vec::new();
    for site in sites {
        // Two rounds, each with the holder parked at the site when the
        // real-time thread starts: its calls, then a fork.
        for fork in [false, true] {
            let (h, g) = (heap.clone(), group.clone());
            let (h2, g2) = (heap.clone(), group.clone());
            let out = preempted_at(
                site,
                move |stop| holder_work(&h, &g, stop),
                move || {
                    if fork {
                        vec![("fork", false, probe_fork())]
                    } else {
                        vec![
                            ("nolock calls", true, probe(|| nolock_calls(&h2, &g2))),
                            ("normal calls", false, probe(|| normal_calls(&h2, &g2))),
                        ]
                    }
                },
            );
            let probes = match out {
                None => {
                    // (Not reached: no fork round either.)
                    missed.push(site);
                    break;
                }
                Some(Err(e)) => {
                    bad.push(format!("{site:?}: {e}"));
                    continue;
                }
                Some(Ok(probes)) => probes,
            };
            for (what, nolock, p) in probes {
                println!("{site:?}: {what}: {p:?}");
                if nolock && (p.voluntary != 0 || p.involuntary != 0 || p.resumed) {
                    bad.push(format!(
                        "{site:?}: the {what} waited for the holder ({p:?})"
                    ));
                }
                if p.involuntary != 0 || (p.resumed && p.voluntary == 0) {
                    bad.push(format!(
                        "{site:?}: the {what} spun until the holder was let run ({p:?})"
                    ));
                }
            }
        }
    }
    println!("not reached by the holder's work: {missed:?}");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// A real-time thread's first `anyalloc::init()` while a preempted thread
/// of its CPU is creating the global heap (parked inside the creation, at
/// `GlobalCreation`): the real-time call waits for the creation to end,
/// and must let the creator run to end it (it yielded in a loop, which
/// returns at once to a real-time caller: a spin until RT throttling).
#[test]
fn global_creation_waits_for_a_preempted_creator() {
    if ran_alone(
        "global_creation_waits_for_a_preempted_creator",
        Duration::from_secs(60),
        "a real-time init() against a preempted creator of the global heap",
    ) || !fifo_available()
    {
        return;
    }
    assert!(
        anyalloc::global_heap().is_none(),
        "the global heap is not made before the test"
    );
    let out = preempted_at(
        Site::GlobalCreation,
        |_| {
            anyalloc::init_without_maintainer(false).expect("the global heap");
        },
        || {
            let mut made = false;
            let p = probe(|| made = anyalloc::init_without_maintainer(false).is_some());
            assert!(made, "the real-time thread got the global heap");
            p
        },
    )
    .expect("the creation reached GlobalCreation")
    .unwrap();
    println!("real-time call: {out:?}");
    assert!(
        out.involuntary == 0 && (out.voluntary > 0 || !out.resumed),
        "the real-time thread spun while the preempted creator made the global heap: {out:?}"
    );
}

/// As above, with a `fork` of the real-time thread: its prepare handler
/// waits for the creation in progress to end before the clone, and must
/// let the preempted creator run to end it (it yielded in a loop).
#[test]
fn fork_waits_for_a_preempted_creator() {
    if ran_alone(
        "fork_waits_for_a_preempted_creator",
        Duration::from_secs(60),
        "a real-time fork against a preempted creator of the global heap",
    ) || !fifo_available()
    {
        return;
    }
    assert!(
        anyalloc::global_heap().is_none(),
        "the global heap is not made before the test"
    );
    let out = preempted_at(
        Site::GlobalCreation,
        |_| {
            anyalloc::init_without_maintainer(false).expect("the global heap");
        },
        probe_fork,
    )
    .expect("the creation reached GlobalCreation")
    .unwrap();
    println!("real-time fork: {out:?}");
    assert!(
        out.involuntary == 0 && (out.voluntary > 0 || !out.resumed),
        "the real-time fork spun while the preempted creator made the global heap: {out:?}"
    );
}

/// The kernel thread ids of this process's threads named `name`.
fn threads_named(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim_end() == name).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// A maintenance thread started by a real-time thread pinned to one CPU
/// (`Heap::new` there, or the first `anyalloc::init()` of a program that
/// uses the global heap through `NoLock` only) runs as an ordinary thread
/// on the CPUs of the process's main thread. It inherited both from its
/// creator: at the creator's real-time priority, a maintenance pass
/// (drains, trims with `madvise`) held off the application's real-time
/// threads of that priority on its CPU; pinned to the creator's CPU, it
/// starved whenever the real-time thread kept that CPU busy.
#[test]
fn maintainer_runs_as_an_ordinary_thread() {
    if ran_alone(
        "maintainer_runs_as_an_ordinary_thread",
        Duration::from_secs(60),
        "the scheduling of a maintainer started by a real-time thread",
    ) || !fifo_available()
    {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let main_cpus = {
        // SAFETY: a zeroed cpu_set_t is valid; the call fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            libc::CPU_COUNT(&set)
        }
    };
    let heap = std::thread::spawn(|| {
        pin(first_cpu());
        assert!(make_fifo(), "SCHED_FIFO");
        Heap::new(Config::default().memory(16 << 20)).expect("a heap")
    })
    .join()
    .unwrap();
    assert!(heap.start_maintenance(), "a maintainer");
    // (`comm` holds 15 bytes of the name.)
    watchdog::wait_for(|| !threads_named("anyalloc-mainta").is_empty());
    let tids = threads_named("anyalloc-mainta");
    assert_eq!(tids.len(), 1, "one maintainer: {tids:?}");
    let tid = tids[0];
    let sched = || {
        // SAFETY: a thread of this process, alive while the heap is; a
        // zeroed cpu_set_t is valid, the call fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            (libc::sched_getscheduler(tid), libc::CPU_COUNT(&set))
        }
    };
    // The thread sets its own scheduling as it starts: give it the time.
    watchdog::wait_for(|| sched() == (libc::SCHED_OTHER, main_cpus));
    let (policy, maintainer_cpus) = sched();
    println!(
        "maintainer {tid}: policy {policy} (SCHED_OTHER {}), {maintainer_cpus} CPUs \
         (main thread {main_cpus}, machine {cpus})",
        libc::SCHED_OTHER
    );
    assert_eq!(
        policy,
        libc::SCHED_OTHER,
        "the maintainer inherited its creator's real-time policy"
    );
    assert_eq!(
        maintainer_cpus, main_cpus,
        "the maintainer inherited its creator's CPU pinning"
    );
    drop(heap);
}
