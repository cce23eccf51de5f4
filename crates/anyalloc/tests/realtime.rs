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
//! The verdict is a count, not a time: the real-time thread's voluntary
//! context switches during its call (`getrusage(RUSAGE_THREAD)`'s
//! `ru_nvcsw`). A spinning call never blocks (the kernel only preempts it:
//! `ru_nivcsw`), a call that waits for the preempted holder must block at
//! least once, since nothing but the holder's progress ends the wait. The
//! elapsed time is printed for the report only.
//!
//! Needs `SCHED_FIFO` (root, or `RLIMIT_RTPRIO`) and at least one CPU; a
//! machine without it fails the test with a message, or skips it with
//! `ANYALLOC_ALLOW_SKIP=1`.

mod watchdog;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, Group, Heap};
use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The holder's kernel thread id (0: none yet).
static HOLDER_TID: AtomicI32 = AtomicI32::new(0);
/// The site the holder parks at (a `Site as u8`).
static TARGET: AtomicU8 = AtomicU8::new(u8::MAX);
/// The holder reached the site (once).
static FIRED: AtomicBool = AtomicBool::new(false);
/// The holder's call returned.
static HOLDER_DONE: AtomicBool = AtomicBool::new(false);
/// The pipe whose write wakes the real-time thread: [read end, write end].
static PIPE: OnceLock<[i32; 2]> = OnceLock::new();

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn hook(site: Site) {
    if site as u8 != TARGET.load(Ordering::Relaxed)
        || gettid() != HOLDER_TID.load(Ordering::Relaxed)
        || FIRED.swap(true, Ordering::Relaxed)
    {
        return;
    }
    let w = PIPE.get().unwrap()[1];
    // SAFETY: one byte from a live buffer to our pipe. The real-time
    // thread, woken on this CPU, preempts this thread on return.
    assert_eq!(unsafe { libc::write(w, [1u8].as_ptr().cast(), 1) }, 1);
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

/// Makes the calling thread SCHED_FIFO at priority 10; whether it could.
fn make_fifo() -> bool {
    let param = libc::sched_param { sched_priority: 10 };
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

/// What the real-time thread saw.
struct RtOutcome {
    /// The holder was still inside its call when the real-time call began.
    holder_inside: bool,
    voluntary: i64,
    involuntary: i64,
    elapsed: Duration,
}

/// Runs `holder` on a SCHED_OTHER thread pinned to one CPU, parks it at
/// `site` (preempted there by the real-time thread), and runs `rt` on a
/// SCHED_FIFO thread pinned to the same CPU.
fn preempted_at(
    site: Site,
    holder: impl FnOnce() + Send + 'static,
    rt: impl FnOnce() + Send + 'static,
) -> RtOutcome {
    let mut fds = [0i32; 2];
    // SAFETY: a valid array of two descriptors for the call to fill.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    PIPE.set(fds).unwrap();
    TARGET.store(site as u8, Ordering::Relaxed);
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
        let holder_inside = !HOLDER_DONE.load(Ordering::SeqCst);
        let before = switches();
        let start = Instant::now();
        rt();
        let elapsed = start.elapsed();
        let after = switches();
        RtOutcome {
            holder_inside,
            voluntary: after.0 - before.0,
            involuntary: after.1 - before.1,
            elapsed,
        }
    });
    ready_rx.recv().unwrap();
    let holder_thread = std::thread::spawn(move || {
        pin(cpu);
        HOLDER_TID.store(gettid(), Ordering::SeqCst);
        holder();
        HOLDER_DONE.store(true, Ordering::SeqCst);
    });
    holder_thread.join().unwrap();
    let out = rt_thread.join().unwrap();
    set_hook(None);
    assert!(FIRED.load(Ordering::Relaxed), "the holder reached {site:?}");
    println!(
        "{site:?}: real-time call took {:?}, {} voluntary and {} involuntary context switches",
        out.elapsed, out.voluntary, out.involuntary
    );
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
    if watchdog::ran_in_child(
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
        move || {
            // Holds the children registry at `GroupChildren`.
            let child = Group::new("new child", None, Some(&other));
            drop(child);
        },
        move || {
            // Over the limit: refused, then the normal path's retry.
            let p = h.alloc_in(Layout::from_size_align(4096, 8).unwrap(), &tight);
            assert!(p.is_none(), "4 KiB fits no group of 1 KiB");
        },
    );
    assert!(
        out.holder_inside,
        "the real-time call began inside the holder's section"
    );
    assert!(
        out.voluntary > 0,
        "the real-time thread never blocked while the preempted holder held the registry: \
         it spun ({:?}, {} involuntary switches)",
        out.elapsed,
        out.involuntary
    );
}
