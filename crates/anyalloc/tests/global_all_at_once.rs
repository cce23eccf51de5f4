//! Every kind of caller at once, on `Global` as the process's allocator,
//! the things the other storms run apart:
//!
//! * churn threads (Vec, String, HashMap; Vecs grown by push and shrunk
//!   across the size classes and past 4 MiB; raw blocks reallocated) under
//!   two per-thread timers whose handlers, installed with SA_NODEFER, also
//!   nest in themselves (and raise their own signal now and then, up to 3
//!   deep): they allocate, realloc and free through `Global` and `NoLock`,
//!   free and realloc blocks other threads and handlers left, and one in
//!   200 forks (the child allocates and `_exit`s) and waits for its child;
//! * a process-wide SIGALRM (setitimer) that lands on whichever thread does
//!   not block it: the forker inside its fork (the prepare handler holding
//!   the heap's locks), the trimmer inside `trim` or `drain`, a thread
//!   being created or exiting; its handler allocates and reallocs, and now
//!   and then calls `trim`, `drain` and `stats` itself;
//! * a thread that forks without a pause (the child frees its parent's
//!   block and one another thread left in a slot, allocates, moves a huge
//!   block, runs `trim`, `drain` and `maintain`, and one time in four forks
//!   a grandchild that allocates);
//! * threads created and exiting four at a time, each with its own timer
//!   and thread-local blocks;
//! * a thread that runs `trim`, `drain`, `maintain` and `stats` without a
//!   pause.
//!
//! Every block carries its size and a tag of its address at both ends,
//! checked before it is freed and across each realloc. A watchdog turns a
//! hang into a failure with every thread's backtrace (gdb, if installed); a
//! child that does not exit 0 within 20 s is reported (with its backtrace)
//! and killed; afterwards the heap's counts of objects, large and huge
//! blocks in use must be back where they were. `ALL_AT_ONCE_SECS` sets the
//! storm's length (default 3).

use allocator_api2::vec::Vec as NVec;
use anyalloc::{Global, NoLock};
use anyalloc_storm::{storm_signals, ErrnoGuard, ThreadTimer, XorShift};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::time::{Duration, Instant};

#[global_allocator]
static A: Global = Global;

static STOP: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
/// The watchdog started (its thread's own allocations are made before the
/// counts are taken).
static WATCHDOG_READY: AtomicBool = AtomicBool::new(false);
static SIG_A: AtomicI32 = AtomicI32::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
static NESTED: AtomicU64 = AtomicU64::new(0);
static H_ALLOC_OK: AtomicU64 = AtomicU64::new(0);
static H_ALLOC_FAIL: AtomicU64 = AtomicU64::new(0);
static H_FORKS: AtomicU64 = AtomicU64::new(0);
static FORKS: AtomicU64 = AtomicU64::new(0);
static THREADS: AtomicU64 = AtomicU64::new(0);
static TRIMS: AtomicU64 = AtomicU64::new(0);
static BAD_CHILD: AtomicU64 = AtomicU64::new(0);
/// SIGALRM handlers running now, and whether they should do nothing.
static ALARM_RUNNING: AtomicU64 = AtomicU64::new(0);
static ALARM_OFF: AtomicBool = AtomicBool::new(false);
/// Forks allowed from handlers (off while the storm winds down).
static HANDLER_FORKS_ON: AtomicBool = AtomicBool::new(true);

const MAGIC: u64 = 0x5a17_c0de_d00d_f00d;

/// A block shared between threads and handlers: a lock-free array of
/// pointers; each block holds its size and a tag at its start and its end.
const SLOTS: usize = 256;
static SHARED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

fn write_raw(s: &str) {
    // SAFETY: writes a live slice to fd 2; a short write only loses text.
    unsafe { libc::write(2, s.as_ptr().cast(), s.len()) };
}

fn die(s: &str) -> ! {
    write_raw(s);
    write_raw("\n");
    std::process::abort()
}

fn tag(p: usize, size: usize) -> u64 {
    (p as u64) ^ (size as u64).rotate_left(17) ^ MAGIC
}

/// Writes the header and the end tag of a block of `size` (>= 16) bytes.
///
/// # Safety
/// `p` is valid for `size` bytes.
unsafe fn mark(p: *mut u8, size: usize) {
    let t = tag(p as usize, size);
    // SAFETY: per the contract; unaligned writes of whole words inside it.
    unsafe {
        (p as *mut u64).write_unaligned(size as u64);
        (p.add(8) as *mut u64).write_unaligned(t);
        if size >= 24 {
            (p.add(size - 8) as *mut u64).write_unaligned(t);
        }
    }
}

/// Checks a marked block and returns its size; aborts on a mismatch.
///
/// # Safety
/// `p` was marked and is still owned by the caller.
unsafe fn check(p: *mut u8, who: &str) -> usize {
    // SAFETY: per the contract, the header is readable.
    let size = unsafe { (p as *const u64).read_unaligned() } as usize;
    if !(16..=(64 << 20)).contains(&size) {
        write_raw(who);
        die(": block header overwritten (size)");
    }
    let t = tag(p as usize, size);
    // SAFETY: per the contract, the block is `size` bytes.
    let (h, e) = unsafe {
        (
            (p.add(8) as *const u64).read_unaligned(),
            if size >= 24 {
                (p.add(size - 8) as *const u64).read_unaligned()
            } else {
                t
            },
        )
    };
    if h != t || e != t {
        write_raw(who);
        die(": block tag overwritten");
    }
    size
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 16).unwrap()
}

/// Allocates a marked block through `Global` (null tolerated in handlers):
/// one size in three with `alloc_zeroed`, whose first and last 4 KiB must
/// be zero.
fn g_alloc(size: usize) -> *mut u8 {
    let zeroed = size.is_multiple_of(3);
    // SAFETY: a non-zero size.
    let p = unsafe {
        if zeroed {
            GlobalAlloc::alloc_zeroed(&A, layout(size))
        } else {
            GlobalAlloc::alloc(&A, layout(size))
        }
    };
    if !p.is_null() && zeroed {
        let edge = size.min(4096);
        // SAFETY: the block is `size` bytes; both ranges lie inside it.
        let (head, tail) = unsafe {
            (
                std::slice::from_raw_parts(p, edge),
                std::slice::from_raw_parts(p.add(size - edge), edge),
            )
        };
        if head.iter().chain(tail).any(|&b| b != 0) {
            die("all at once: alloc_zeroed's block is not zeroed");
        }
    }
    if !p.is_null() {
        // SAFETY: just allocated with `size` bytes.
        unsafe { mark(p, size) };
    }
    p
}

/// Checks and frees a marked block through `Global`.
///
/// # Safety
/// `p` is a marked block from `g_alloc`/`g_realloc`, owned by the caller.
unsafe fn g_free(p: *mut u8, who: &str) {
    // SAFETY: per the contract.
    let size = unsafe { check(p, who) };
    // SAFETY: allocated by `A` with this layout.
    unsafe { GlobalAlloc::dealloc(&A, p, layout(size)) };
}

/// Reallocates a marked block; on failure the old block stays (returned).
///
/// # Safety
/// As `g_free`.
unsafe fn g_realloc(p: *mut u8, new: usize, who: &str) -> (*mut u8, bool) {
    // SAFETY: per the contract.
    let old = unsafe { check(p, who) };
    // SAFETY: allocated by `A` with this layout; new size non-zero.
    let q = unsafe { GlobalAlloc::realloc(&A, p, layout(old), new) };
    if q.is_null() {
        return (p, false);
    }
    // The old header moved with the block: its size word and tag (of the
    // old address) must be intact.
    // SAFETY: `q` is valid for `new` >= 16 bytes.
    let (s, t) = unsafe {
        (
            (q as *const u64).read_unaligned(),
            (q.add(8) as *const u64).read_unaligned(),
        )
    };
    if s as usize != old || t != tag(p as usize, old) {
        write_raw(who);
        die(": realloc lost the block's contents");
    }
    // SAFETY: `q` is valid for `new` bytes.
    unsafe { mark(q, new) };
    (q, true)
}

/// Puts a block in a shared slot; the block found there (if any) is freed.
fn share(p: *mut u8, slot: usize, who: &str) {
    let old = SHARED[slot % SLOTS].swap(p as usize, Relaxed);
    if old != 0 {
        // SAFETY: a shared block is owned by whoever swapped it out.
        unsafe { g_free(old as *mut u8, who) };
    }
}

fn take_shared(slot: usize) -> *mut u8 {
    SHARED[slot % SLOTS].swap(0, Relaxed) as *mut u8
}

fn handler_size(r: &mut XorShift) -> usize {
    match r.below(100) {
        0..=69 => 16 + r.below(2048) as usize,
        70..=89 => 4096 + r.below(60 << 10) as usize,
        90..=98 => (64 << 10) + r.below(1 << 20) as usize,
        _ => (4 << 20) + r.below(2 << 20) as usize,
    }
}

thread_local! {
    /// Per-thread handler depth, for the nesting counters; const-initialised
    /// (no lazy initialisation that could allocate in a handler).
    static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Waits up to `secs` for `pid`; reports (with its backtrace) and kills a
/// child that does not exit, and counts a child that did not exit 0.
/// Allocates nothing (used in handlers too).
fn reap(pid: libc::pid_t, secs: u64) {
    let mut status = 0;
    let mut waited_ms = 0;
    loop {
        // SAFETY: our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                BAD_CHILD.fetch_add(1, Relaxed);
                write_raw("all at once: a child did not exit 0\n");
            }
            return;
        }
        if r < 0 {
            // EINTR: try again; anything else is a bug here.
            // SAFETY: errno of this thread.
            if unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            die("all at once: waitpid failed");
        }
        if waited_ms >= secs * 1000 {
            BAD_CHILD.fetch_add(1, Relaxed);
            write_raw("all at once: a child hangs; its backtrace follows\n");
            backtrace_of(pid);
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: a valid timespec; no remainder wanted.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        waited_ms += 1;
    }
}

/// Runs gdb on `pid` (all threads' backtraces to stderr) and waits for it.
/// Allocates nothing in this process: the child execs at once.
fn backtrace_of(pid: libc::pid_t) {
    let mut num = [0u8; 16];
    let mut n = pid as u32;
    let mut i = num.len() - 1;
    num[i] = 0;
    loop {
        i -= 1;
        num[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let gdb = b"gdb\0";
    let batch = b"-batch\0";
    let p = b"-p\0";
    let ex = b"-ex\0";
    let cmd = b"thread apply all bt\0";
    let argv: [*const libc::c_char; 8] = [
        gdb.as_ptr().cast(),
        batch.as_ptr().cast(),
        p.as_ptr().cast(),
        num[i..].as_ptr().cast(),
        ex.as_ptr().cast(),
        cmd.as_ptr().cast(),
        std::ptr::null(),
        std::ptr::null(),
    ];
    // A raw clone, not fork(): fork's prepare handler would wait for the
    // heap's locks, which the hang being reported may hold.
    // SAFETY: the child only dup2s and execs with the argv built above.
    unsafe {
        let c = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0)
            as libc::pid_t;
        if c == 0 {
            libc::dup2(2, 1);
            libc::execvp(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
        if c > 0 {
            let mut st = 0;
            libc::waitpid(c, &mut st, 0);
        }
    }
}

/// A forked child: allocates and frees through `Global` (the normal path,
/// or the nolock one if the fork came from a handler that interrupted the
/// allocator), then `_exit(0)`. The child of the forking thread
/// (`from_thread`) must get every block; it also frees a block another
/// thread left in a slot, moves a huge block, runs `trim`, `drain` and
/// `maintain`, and with `grandchild` forks a child that allocates and trims.
fn child_work(seed: u64, from_thread: bool, grandchild: bool) -> ! {
    BAD_CHILD.store(0, Relaxed); // the parent's count, copied
    let mut r = XorShift::new(seed | 1);
    for _ in 0..20 {
        let p = g_alloc(16 + r.below(8192) as usize);
        if !p.is_null() {
            // SAFETY: marked just now, ours.
            unsafe { g_free(p, "child") };
        } else if from_thread {
            die("all at once: an allocation failed in a forking thread's child");
        }
    }
    if from_thread {
        let p = take_shared(r.below(SLOTS as u64) as usize);
        if !p.is_null() {
            // SAFETY: the child's copy of a slot's block: ours now.
            unsafe { g_free(p, "child's slot") };
        }
        let p = g_alloc(5 << 20);
        if p.is_null() {
            die("all at once: a huge allocation failed in a forking thread's child");
        }
        // SAFETY: marked just now, ours.
        let (q, _) = unsafe { g_realloc(p, 9 << 20, "child huge") };
        // SAFETY: ours.
        unsafe { g_free(q, "child huge") };
        let heap = anyalloc::global_heap().unwrap();
        heap.trim();
        heap.drain();
        heap.maintain();
        if grandchild {
            // SAFETY: the grandchild only allocates, trims and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                child_work(r.next_u64(), false, false);
            }
            if pid < 0 {
                die("all at once: a child's fork failed");
            }
            reap(pid, 20);
            if BAD_CHILD.load(Relaxed) != 0 {
                // SAFETY: ends the child.
                unsafe { libc::_exit(1) }
            }
        }
    }
    // SAFETY: ends the child without running the parent's atexit work.
    unsafe { libc::_exit(0) }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    HANDLED.fetch_add(1, Relaxed);
    let depth = DEPTH.with(|d| {
        let v = d.get() + 1;
        d.set(v);
        v
    });
    if depth > 1 {
        NESTED.fetch_add(1, Relaxed);
    }
    // SAFETY: the kernel's siginfo for this signal.
    let seed = unsafe { (*info).si_value().sival_ptr as u64 };
    let mut r = XorShift::new(
        (seed ^ anyalloc_storm::thread::now_ns() ^ ((depth as u64) << 40)).wrapping_mul(0x9e37) | 1,
    );
    if depth <= 4 {
        handler_work(sig, depth, &mut r);
    }
    DEPTH.with(|d| d.set(depth - 1));
}

fn handler_work(sig: libc::c_int, depth: u32, r: &mut XorShift) {
    // Own blocks: allocate, maybe realloc, check, free or share.
    let mut mine: [*mut u8; 4] = [std::ptr::null_mut(); 4];
    for m in mine.iter_mut() {
        let p = g_alloc(handler_size(r));
        if p.is_null() {
            H_ALLOC_FAIL.fetch_add(1, Relaxed);
        } else {
            H_ALLOC_OK.fetch_add(1, Relaxed);
            *m = p;
        }
    }
    for m in mine.iter_mut() {
        if !m.is_null() && r.below(2) == 0 {
            // SAFETY: ours, marked.
            let (q, _) = unsafe { g_realloc(*m, handler_size(r), "handler realloc") };
            *m = q;
        }
    }
    // A NoLock vector grown and shrunk.
    let mut v: NVec<u64, NoLock> = NVec::new_in(NoLock);
    let want = r.below(3000) as usize;
    if v.try_reserve(want).is_ok() {
        for i in 0..want {
            v.push(i as u64);
        }
        v.truncate(want / 3);
        v.shrink_to_fit();
        for (i, x) in v.iter().enumerate() {
            if *x != i as u64 {
                die("all at once: NoLock vector lost its contents");
            }
        }
    }
    drop(v);
    // Take a block someone else left, free or keep it moving.
    let p = take_shared(r.below(SLOTS as u64) as usize);
    if !p.is_null() {
        if r.below(2) == 0 {
            // SAFETY: swapped out: ours.
            unsafe { g_free(p, "handler shared") };
        } else {
            // SAFETY: ours.
            let (q, _) = unsafe { g_realloc(p, handler_size(r), "handler shared realloc") };
            share(q, r.below(SLOTS as u64) as usize, "handler share");
        }
    }
    for m in mine {
        if m.is_null() {
            continue;
        }
        if r.below(3) == 0 {
            share(m, r.below(SLOTS as u64) as usize, "handler share");
        } else {
            // SAFETY: ours.
            unsafe { g_free(m, "handler") };
        }
    }
    // Nest in ourselves (SA_NODEFER) now and then.
    if depth < 3 && r.below(16) == 0 {
        anyalloc_storm::raise_here(sig);
    }
    // Fork now and then, from a churn thread's timer handler (never on a
    // thread that forks itself: glibc's fork lock would wait for itself).
    if sig == SIG_A.load(Relaxed)
        && depth == 1
        && HANDLER_FORKS_ON.load(Relaxed)
        && r.below(200) == 0
    {
        // SAFETY: the child only allocates, frees and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child_work(r.next_u64(), false, false);
        }
        if pid > 0 {
            H_FORKS.fetch_add(1, Relaxed);
            reap(pid, 20);
        }
    }
}

extern "C" fn alarm_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SeqCst: the flag's store and this count's load in the storm's end,
    // this count's increment and the flag's load here, may not pass each
    // other.
    ALARM_RUNNING.fetch_add(1, SeqCst);
    if !ALARM_OFF.load(SeqCst) {
        alarm_work();
    }
    ALARM_RUNNING.fetch_sub(1, SeqCst);
}

fn alarm_work() {
    let _errno = ErrnoGuard::save();
    HANDLED.fetch_add(1, Relaxed);
    let mut r = XorShift::new(anyalloc_storm::thread::now_ns() | 1);
    if let Some(heap) = anyalloc::global_heap() {
        match r.below(64) {
            0 => {
                heap.trim();
            }
            1 => heap.drain(),
            2 => {
                let _ = heap.stats();
            }
            _ => {}
        }
    }
    let p = g_alloc(handler_size(&mut r));
    if p.is_null() {
        H_ALLOC_FAIL.fetch_add(1, Relaxed);
        return;
    }
    H_ALLOC_OK.fetch_add(1, Relaxed);
    // SAFETY: ours.
    let (q, _) = unsafe { g_realloc(p, handler_size(&mut r), "alarm realloc") };
    share(q, r.below(SLOTS as u64) as usize, "alarm share");
}

fn install(
    sig: libc::c_int,
    h: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
    nodefer: bool,
) {
    // SAFETY: a zeroed sigaction filled in; the handler has the SA_SIGINFO
    // signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = h as usize;
        sa.sa_flags =
            libc::SA_SIGINFO | libc::SA_RESTART | if nodefer { libc::SA_NODEFER } else { 0 };
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

fn check_vec(v: &[u8], seed: u8) {
    for (i, b) in v.iter().enumerate().step_by(509) {
        if *b != seed.wrapping_add(i as u8) {
            die("all at once: a Vec lost its contents");
        }
    }
}

fn churn(id: usize) {
    let [sa, sb] = storm_signals();
    let _timers = (
        ThreadTimer::start(sa, Duration::from_micros(97 + id as u64 * 13), id * 2 + 1).unwrap(),
        ThreadTimer::start(sb, Duration::from_micros(151 + id as u64 * 7), id * 2 + 2).unwrap(),
    );
    let mut r = XorShift::new(0x1234_5678 + id as u64);
    let mut map: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut s = String::new();
    while !STOP.load(Relaxed) {
        match r.below(10) {
            0..=2 => {
                // A Vec grown by push across classes, sometimes to huge.
                let target = match r.below(20) {
                    0 => (4 << 20) + r.below(8 << 20) as usize,
                    1..=4 => r.below(1 << 20) as usize,
                    _ => r.below(8192) as usize,
                };
                let seed = r.next_u64() as u8;
                let mut v = Vec::new();
                let mut i = 0usize;
                while i < target {
                    let n = (target - i).min(1 + r.below(4096) as usize);
                    v.extend((i..i + n).map(|k| seed.wrapping_add(k as u8)));
                    i += n;
                }
                check_vec(&v, seed);
                v.truncate(target / (1 + r.below(8) as usize));
                v.shrink_to_fit();
                check_vec(&v, seed);
                let key = r.below(512);
                if let Some(old) = map.insert(key, v) {
                    if !old.is_empty() {
                        check_vec(&old, old[0]);
                    }
                }
            }
            3..=4 => {
                if let Some(v) = map.remove(&r.below(512)) {
                    if !v.is_empty() {
                        check_vec(&v, v[0]);
                    }
                }
            }
            5 => {
                s.push_str("all at once storm text ");
                if s.len() > 200_000 || r.below(50) == 0 {
                    if !s.starts_with("all at once storm text ") {
                        die("all at once: a String lost its contents");
                    }
                    s = String::new();
                }
            }
            6..=7 => {
                let p = g_alloc(handler_size(&mut r).max(16));
                if !p.is_null() {
                    share(p, r.below(SLOTS as u64) as usize, "churn share");
                } else if !STOP.load(Relaxed) {
                    die("all at once: a normal-path allocation failed");
                }
            }
            _ => {
                let p = take_shared(r.below(SLOTS as u64) as usize);
                if !p.is_null() {
                    // SAFETY: ours.
                    let (q, ok) = unsafe { g_realloc(p, handler_size(&mut r), "churn realloc") };
                    if !ok {
                        die("all at once: a normal-path realloc failed");
                    }
                    // SAFETY: ours.
                    unsafe { g_free(q, "churn free") };
                }
            }
        }
    }
    drop(map);
}

fn forker() {
    let mut r = XorShift::new(77);
    while !STOP.load(Relaxed) {
        let keep = g_alloc(16 + r.below(100_000) as usize);
        // SAFETY: the child only allocates, frees and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if !keep.is_null() {
                // SAFETY: the forking thread's block, copied into the child.
                unsafe { g_free(keep, "child keep") };
            }
            child_work(r.next_u64(), true, r.below(4) == 0);
        }
        assert!(pid > 0, "fork failed");
        FORKS.fetch_add(1, Relaxed);
        reap(pid, 20);
        if !keep.is_null() {
            // SAFETY: ours.
            unsafe { g_free(keep, "forker keep") };
        }
    }
}

thread_local! {
    static TL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn spawner() {
    let mut n = 0u64;
    let [sa, _] = storm_signals();
    while !STOP.load(Relaxed) {
        let handles: Vec<_> = (0..4)
            .map(|k| {
                n += 1;
                let seed = n;
                std::thread::spawn(move || {
                    let _t = ThreadTimer::start(
                        sa,
                        Duration::from_micros(50 + k * 10),
                        1000 + seed as usize,
                    )
                    .unwrap();
                    let mut r = XorShift::new(seed | 1);
                    TL.with(|tl| {
                        let mut tl = tl.borrow_mut();
                        for _ in 0..8 {
                            tl.push(vec![7u8; r.below(20_000) as usize]);
                        }
                    });
                    for _ in 0..50 {
                        let p = g_alloc(16 + r.below(3000) as usize);
                        share(p, r.below(SLOTS as u64) as usize, "thread share");
                        let q = take_shared(r.below(SLOTS as u64) as usize);
                        if !q.is_null() {
                            // SAFETY: ours.
                            unsafe { g_free(q, "thread free") };
                        }
                    }
                    THREADS.fetch_add(1, Relaxed);
                    // The timer stops with `_t`; the thread-locals go last.
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}

fn trimmer() {
    let heap = anyalloc::global_heap().unwrap();
    let mut k = 0u64;
    while !STOP.load(Relaxed) {
        match k % 4 {
            0 => {
                heap.trim();
            }
            1 => heap.drain(),
            2 => heap.maintain(),
            _ => {
                let _ = heap.stats();
            }
        }
        k += 1;
        TRIMS.fetch_add(1, Relaxed);
        std::thread::sleep(Duration::from_micros(300));
    }
}

fn heap_class_size(i: usize) -> usize {
    anyalloc::global_heap().unwrap().stats().classes[i].size
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Counts {
    objects: usize,
    large: usize,
    huge: usize,
}

/// Objects in use per size class (an array: taking it allocates nothing).
fn per_class() -> [usize; 64] {
    let heap = anyalloc::global_heap().unwrap();
    let mut out = [0; 64];
    for (o, c) in out.iter_mut().zip(heap.stats().classes.iter()) {
        *o = c.objects_in_use;
    }
    out
}

fn counts() -> Counts {
    let heap = anyalloc::global_heap().unwrap();
    heap.drain();
    heap.trim();
    let s = heap.stats();
    Counts {
        objects: s.objects_in_use,
        large: s.large_in_use,
        huge: s.huge_in_use,
    }
}

#[test]
fn every_kind_of_caller_at_once() {
    anyalloc::init().unwrap();
    let secs: u64 = std::env::var("ALL_AT_ONCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let [sa, sb] = storm_signals();
    SIG_A.store(sa, Relaxed);
    install(sa, handler, true);
    install(sb, handler, true);
    install(libc::SIGALRM, alarm_handler, false);

    // The watchdog: every thread's backtrace, then abort.
    let me = std::process::id() as libc::pid_t;
    let limit = secs + 60;
    std::thread::spawn(move || {
        anyalloc_storm::mask(&[libc::SIGALRM], true);
        let start = Instant::now();
        WATCHDOG_READY.store(true, Relaxed);
        while start.elapsed() < Duration::from_secs(limit) {
            if DONE.load(Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        write_raw("all at once: the storm hangs; every thread's backtrace follows\n");
        backtrace_of(me);
        die("all at once: hang");
    });

    while !WATCHDOG_READY.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The test harness's main thread makes its own allocations while this
    // test starts (its channel, its thread handle): take the counts once
    // they stay still.
    let mut before = counts();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let again = counts();
        if again == before {
            break;
        }
        before = again;
    }
    let classes_before = per_class();
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for id in 0..3 {
        handles.push(std::thread::spawn(move || churn(id)));
    }
    handles.push(std::thread::spawn(forker));
    handles.push(std::thread::spawn(spawner));
    handles.push(std::thread::spawn(trimmer));
    let it = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 700,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 700,
        },
    };
    // SAFETY: a valid itimerval; no old value wanted.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
    // The main thread does not take SIGALRM (it collects the results).
    anyalloc_storm::mask(&[libc::SIGALRM], true);
    std::thread::sleep(Duration::from_secs(secs));
    HANDLER_FORKS_ON.store(false, Relaxed);
    STOP.store(true, Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let off = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    // SAFETY: a valid itimerval; no old value wanted.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &off, std::ptr::null_mut()) };
    // A SIGALRM sent before the timer stopped may still land on a thread
    // that does not block it (the test harness's main thread): from now on
    // its handler leaves no block behind; wait for one already running.
    ALARM_OFF.store(true, SeqCst);
    while ALARM_RUNNING.load(SeqCst) != 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for slot in 0..SLOTS {
        let p = take_shared(slot);
        if !p.is_null() {
            // SAFETY: ours.
            unsafe { g_free(p, "final") };
        }
    }
    let after = counts();
    if after != before {
        let classes_after = per_class();
        for (i, (b, a)) in classes_before.iter().zip(&classes_after).enumerate() {
            if a != b {
                println!("class {i} (size {}): {b} -> {a}", heap_class_size(i));
            }
        }
        for k in 0..5 {
            std::thread::sleep(Duration::from_millis(200));
            println!("after {} ms more: {:?}", (k + 1) * 200, counts());
        }
    }
    let elapsed = t0.elapsed();
    DONE.store(true, Relaxed);
    let heap = anyalloc::global_heap().unwrap();
    let st = heap.stats();
    println!(
        "all at once: {:.1} s: {} signals ({} nested), handler allocs {} ok / {} failed, {} forks + {} from handlers, {} threads, {} trims; in use before {:?} after {:?}; pages {} of {} free; nolock ok {} busy {} empty {} fork_mapped {}",
        elapsed.as_secs_f64(),
        HANDLED.load(Relaxed),
        NESTED.load(Relaxed),
        H_ALLOC_OK.load(Relaxed),
        H_ALLOC_FAIL.load(Relaxed),
        FORKS.load(Relaxed),
        H_FORKS.load(Relaxed),
        THREADS.load(Relaxed),
        TRIMS.load(Relaxed),
        before,
        after,
        st.pages.free_pages,
        st.pages.total_pages,
        st.nolock_alloc_ok,
        st.nolock_alloc_fail_busy,
        st.nolock_alloc_fail_empty,
        st.fork_mapped,
    );
    assert_eq!(BAD_CHILD.load(Relaxed), 0, "a child hung or failed");
    assert!(HANDLED.load(Relaxed) > 0 && NESTED.load(Relaxed) > 0);
    assert!(FORKS.load(Relaxed) > 0 && THREADS.load(Relaxed) > 0);
    assert_eq!(before, after, "blocks in use before and after the storm");
}
