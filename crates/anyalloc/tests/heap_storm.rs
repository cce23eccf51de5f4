//! Real signals on a shared object heap.
//!
//! Worker threads churn on the normal path (`Heap::alloc` / `Heap::free`,
//! 8 B to 64 KiB, random lifetimes, a share of the objects handed to another
//! worker and freed there) while each worker's two per-thread POSIX timers
//! (`SIGEV_THREAD_ID`, ~10 kHz each) interrupt it. The two timer signals are
//! different (`SIGRTMIN`, `SIGRTMIN + 1`) and each masks only itself while its
//! handler runs, so each can interrupt the other's handler (nesting is
//! bounded: no `SA_NODEFER`). Handlers allocate and free with the nolock path
//! (8 B to 32 KiB, mostly small; one request in 16 a large block of 64 KiB
//! to 4 MiB, the page allocator's zone try-lock path; now and then one
//! above 4 MiB, which the nolock path must refuse and count as too large),
//! keep a few objects in a per-thread stash of
//! atomics (no `Vec`, `Box` or printing in a handler) and free them later,
//! possibly from the other signal's handler; they also free objects the
//! workers allocated. A maintenance thread runs `Heap::maintain` every
//! 10 ms meanwhile (deferred frees, stocking the slots that ran empty,
//! returning idle memory to the OS).
//!
//! Every object is filled with a pattern derived from its handle (address,
//! size and a random owner tag) and checked when it is freed: two owners of
//! the same memory would break it. At the end everything is freed and
//! drained: no object may be left in use, every page must be free and on the
//! buddy lists, the page allocator's invariants must hold, and at least
//! 99.9% of the nolock allocations must have succeeded, the large ones on
//! their own too, with every failure's reason in the stats. Re-entry is
//! counted, not assumed: the storm asserts that signals landed while a worker
//! was inside `Heap::alloc` / `Heap::free`.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};

// Only the re-entry evidence (`common::inside`, `common::HandlerEntry`) is
// used from the shared kit; the rest of this storm is self-contained.
mod common;

// ----- object handles and patterns -------------------------------------------

/// Request sizes, ascending; a handle stores an index into this table. The
/// handlers use the first `HANDLER_SIZES` entries (up to 32 KiB) and the
/// large ones from `LARGE_SIZES` on; the workers the first `WORKER_SIZES`.
const SIZES: [usize; 76] = [
    8,
    9,
    12,
    15,
    16,
    20,
    24,
    28,
    31,
    32,
    40,
    47,
    48,
    56,
    64,
    72,
    80,
    96,
    100,
    112,
    128,
    150,
    160,
    192,
    200,
    224,
    256,
    300,
    320,
    384,
    448,
    500,
    512,
    640,
    700,
    768,
    896,
    1000,
    1024,
    1280,
    1536,
    1792,
    2000,
    2048,
    2560,
    3072,
    3584,
    4000,
    4096,
    5120,
    6000,
    7168,
    8000,
    8192,
    8193,
    12000,
    16384,
    20000,
    24576,
    30000,
    32768,
    40000,
    49152,
    65536, // workers up to here
    65537,
    100_000,
    131_072,
    200_000,
    262_144,
    500_000,
    524_288,
    1_000_000,
    1 << 20,
    2_000_000,
    2 << 20,
    4 << 20,
];
/// Entries of `SIZES` the workers use (up to 64 KiB).
const WORKER_SIZES: usize = 64;
/// The handlers' large entries of `SIZES`: `SIZES[LARGE_SIZES - 1..]` (64 KiB
/// to 4 MiB).
const LARGE_SIZES: usize = 64;
/// What the handlers ask for above 4 MiB (refused on the nolock path).
const TOO_LARGE: usize = (4 << 20) + 1;
/// Entries of `SIZES` the handlers may use (up to 32 KiB).
const HANDLER_SIZES: usize = 61;
/// Entries of `SIZES` up to 1 KiB: the "small" ones most requests use.
const SMALL_SIZES: usize = 39;

const _: () = assert!(SIZES[HANDLER_SIZES - 1] == 32768 && SIZES[SMALL_SIZES - 1] == 1024);
const _: () = assert!(SIZES[LARGE_SIZES - 1] == 65536 && SIZES[SIZES.len() - 1] == 4 << 20);

/// Bits of a handle: the address (below 2^47 on Linux x86-64 / aarch64
/// userspace), then 7 bits of size index, then 10 bits of owner tag.
const ADDR_BITS: u32 = 47;

fn pack(ptr: NonNull<u8>, size_idx: usize, tag: u64) -> usize {
    let p = ptr.as_ptr() as usize;
    if p >> ADDR_BITS != 0 {
        // Cannot happen with the default mmap layout; never silently lose
        // bits of an address (this also runs in handlers: no panic there).
        std::process::abort();
    }
    p | (size_idx & 127) << ADDR_BITS | ((tag & 0x3ff) as usize) << (ADDR_BITS + 7)
}

/// `(ptr, size)` of a handle.
fn unpack(h: usize) -> (*mut u8, usize) {
    (
        (h & ((1 << ADDR_BITS) - 1)) as *mut u8,
        SIZES[(h >> ADDR_BITS) & 127],
    )
}

/// splitmix64's finaliser.
const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Objects above this are filled and checked in sampled words (one per
/// 256 bytes, and the last one): 4 MiB in full would dominate a handler.
const SAMPLED_ABOVE: usize = 65536;

/// Fills (`write`) or checks the sampled words of a large object.
///
/// # Safety
/// As for [`fill`].
unsafe fn sampled(h: usize, write: bool) -> bool {
    let (p, size) = unpack(h);
    let seed = mix64(h as u64);
    let mut ok = true;
    for i in (0..size - 8).step_by(256).chain([size - 8]) {
        // SAFETY: `i + 8 <= size`: inside the caller's object.
        unsafe {
            let w = p.add(i) as *mut u64;
            if write {
                w.write_unaligned(seed.wrapping_add(i as u64));
            } else {
                ok &= std::hint::black_box(w.read_unaligned()) == seed.wrapping_add(i as u64);
            }
        }
    }
    ok
}

/// Fills the object behind `h` with its pattern (all `size` bytes, or a
/// sample above `SAMPLED_ABOVE`).
///
/// # Safety
/// The caller owns the object behind `h`, at least `size` bytes.
unsafe fn fill(h: usize) {
    let (p, size) = unpack(h);
    if size > SAMPLED_ABOVE {
        // SAFETY: forwarded contract.
        unsafe { sampled(h, true) };
        return;
    }
    let seed = mix64(h as u64);
    let mut i = 0;
    while i + 8 <= size {
        // SAFETY: `i + 8 <= size`: inside the caller's object.
        unsafe { (p.add(i) as *mut u64).write_unaligned(seed.wrapping_add(i as u64)) };
        i += 8;
    }
    while i < size {
        // SAFETY: `i < size`: inside the caller's object.
        unsafe {
            p.add(i)
                .write_volatile((seed >> (8 * (i % 8))) as u8 ^ i as u8)
        };
        i += 1;
    }
}

/// Whether the object behind `h` still holds its pattern.
///
/// # Safety
/// As for [`fill`].
unsafe fn check(h: usize) -> bool {
    let (p, size) = unpack(h);
    if size > SAMPLED_ABOVE {
        // SAFETY: forwarded contract.
        return unsafe { sampled(h, false) };
    }
    let seed = mix64(h as u64);
    let mut ok = true;
    let mut i = 0;
    while i + 8 <= size {
        // SAFETY: as in `fill`.
        let w = unsafe { (p.add(i) as *const u64).read_unaligned() };
        ok &= std::hint::black_box(w) == seed.wrapping_add(i as u64);
        i += 8;
    }
    while i < size {
        // SAFETY: as in `fill`.
        ok &= unsafe { p.add(i).read_volatile() } == (seed >> (8 * (i % 8))) as u8 ^ i as u8;
        i += 1;
    }
    ok
}

/// A request layout; aborts instead of panicking (handlers call it).
fn layout(size: usize, align: usize) -> Layout {
    match Layout::from_size_align(size, align) {
        Ok(l) => l,
        Err(_) => std::process::abort(),
    }
}

/// A fixed set of handles in atomics: `put` is one CAS (0 -> handle), `take`
/// one swap (-> 0), so a thread and the handlers nested on top of it never
/// lose or duplicate an entry.
struct Stash<const N: usize> {
    slots: [AtomicUsize; N],
}

impl<const N: usize> Stash<N> {
    const fn new() -> Self {
        Stash {
            slots: [const { AtomicUsize::new(0) }; N],
        }
    }
    fn put(&self, h: usize, start: usize) -> bool {
        (0..N).any(|k| {
            self.slots[(start + k) % N]
                .compare_exchange(0, h, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }
    fn take(&self, start: usize) -> Option<usize> {
        (0..N).find_map(|k| {
            let s = &self.slots[(start + k) % N];
            if s.load(Ordering::Relaxed) == 0 {
                return None;
            }
            match s.swap(0, Ordering::AcqRel) {
                0 => None,
                h => Some(h),
            }
        })
    }
}

// ----- signals and timers ------------------------------------------------------

type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for `sig` (`SA_SIGINFO | SA_RESTART`), blocking only
/// `sig` itself while it runs.
fn install_handler(sig: libc::c_int, handler: Handler) {
    // SAFETY: a zeroed `sigaction` is a valid starting value; the fields we
    // rely on are set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `sa.sa_mask` is a valid sigset_t; sigaction only reads `sa`.
    let rc = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, sig);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
}

/// Sends `sig` to the calling thread now (async-signal-safe).
fn raise_here(sig: libc::c_int) {
    // SAFETY: tgkill to our own thread with a signal whose handler is
    // installed; no memory is passed.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
    }
}

/// A POSIX timer sending a signal to one thread; deleted on drop.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn for_current_thread(sig: libc::c_int, period: Duration, value: usize) -> ThreadTimer {
        // SAFETY: an all-zero sigevent is valid; the SIGEV_THREAD_ID fields
        // are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_value = libc::sigval {
            sival_ptr: value as *mut libc::c_void,
        };
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        assert_eq!(rc, 0, "timer_create: {}", std::io::Error::last_os_error());
        let ts = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `id` is the timer just created; `spec` is valid.
        let rc = unsafe { libc::timer_settime(id, 0, &spec, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "timer_settime: {}", std::io::Error::last_os_error());
        ThreadTimer(id)
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: a live timer owned by this value.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// Saves `errno` and restores it on drop (handlers must not clobber it).
struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    fn save() -> Self {
        // SAFETY: `__errno_location` returns this thread's errno slot.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// xorshift64 for the workers.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ----- the storm's shared state ----------------------------------------------

const MAX_THREADS: usize = 8;
const HANDLER_STASH: usize = 16;
const MAILBOX: usize = 32;
/// Nolock allocation attempts per handler run.
const OPS_PER_SIGNAL: usize = 2;

/// The shared heap (leaked: handlers may only ever see a live heap).
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
static SIGNAL_A: AtomicUsize = AtomicUsize::new(0);

/// Per-thread handler state, indexed by the timers' `sigval`.
struct HandlerState {
    stash: Stash<HANDLER_STASH>,
    rng: AtomicU64,
    /// Whether the handler of signal A / B is running on this thread.
    active: [AtomicBool; 2],
    runs: [AtomicU64; 2],
}

static HANDLERS: [HandlerState; MAX_THREADS] = [const {
    HandlerState {
        stash: Stash::new(),
        rng: AtomicU64::new(0),
        active: [const { AtomicBool::new(false) }; 2],
        runs: [const { AtomicU64::new(0) }; 2],
    }
}; MAX_THREADS];

/// Worker `i` frees what lands in `MAILBOXES[i]` (put there by worker `i-1`);
/// its handlers take from it too.
static MAILBOXES: [Stash<MAILBOX>; MAX_THREADS] = [const { Stash::new() }; MAX_THREADS];

/// Owner tags: bit 10 set for objects from the normal path (workers), bit 9
/// for objects from signal B's handler.
const TAG_WORKER: u64 = 1 << 9;
const TAG_SIGNAL_B: u64 = 1 << 8;

struct Counters {
    signals: [AtomicU64; 2],
    nested: [AtomicU64; 2],
    /// Handler runs that interrupted a worker's allocator call.
    inside: AtomicU64,
    attempts: AtomicU64,
    ok: AtomicU64,
    fail: AtomicU64,
    /// Of those, the large ones (64 KiB to 4 MiB): attempts, ok, fail.
    large: [AtomicU64; 3],
    /// Requests above 4 MiB (not counted in `attempts`): all must fail.
    too_large: AtomicU64,
    too_large_served: AtomicU64,
    handler_frees: AtomicU64,
    handler_frees_other_signal: AtomicU64,
    handler_frees_of_worker_objects: AtomicU64,
    normal_allocs: AtomicU64,
    normal_none: AtomicU64,
    normal_frees: AtomicU64,
    cross_thread_frees: AtomicU64,
    worker_frees_of_handler_objects: AtomicU64,
    violations: AtomicU64,
}

static C: Counters = Counters {
    signals: [const { AtomicU64::new(0) }; 2],
    nested: [const { AtomicU64::new(0) }; 2],
    inside: AtomicU64::new(0),
    attempts: AtomicU64::new(0),
    ok: AtomicU64::new(0),
    fail: AtomicU64::new(0),
    large: [const { AtomicU64::new(0) }; 3],
    too_large: AtomicU64::new(0),
    too_large_served: AtomicU64::new(0),
    handler_frees: AtomicU64::new(0),
    handler_frees_other_signal: AtomicU64::new(0),
    handler_frees_of_worker_objects: AtomicU64::new(0),
    normal_allocs: AtomicU64::new(0),
    normal_none: AtomicU64::new(0),
    normal_frees: AtomicU64::new(0),
    cross_thread_frees: AtomicU64::new(0),
    worker_frees_of_handler_objects: AtomicU64::new(0),
    violations: AtomicU64::new(0),
};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ----- handlers ----------------------------------------------------------------

/// Checks and nolock-frees an object (in a handler; `which` is the signal).
fn handler_free(heap: &Heap, h: usize, which: usize) {
    // SAFETY: `h` came out of a stash or mailbox through one atomic swap, so
    // this context owns the object.
    if !unsafe { check(h) } {
        bump(&C.violations);
    }
    let tag = (h >> (ADDR_BITS + 7)) as u64;
    if tag & TAG_WORKER != 0 {
        bump(&C.handler_frees_of_worker_objects);
    } else if (tag & TAG_SIGNAL_B != 0) != (which == 1) {
        bump(&C.handler_frees_other_signal);
    }
    bump(&C.handler_frees);
    // SAFETY: allocated by this heap and owned here (see above).
    unsafe { heap.free_nolock(NonNull::new_unchecked(unpack(h).0)) };
}

/// The storm's handler (both signals). Async-signal-safe: atomics, plain
/// memory accesses, `tgkill` and the heap's nolock path only.
extern "C" fn storm_handler(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::save();
    // Held until the handler returns: its nesting level.
    let entry = common::HandlerEntry::enter();
    if entry.interrupted_allocator {
        bump(&C.inside);
    }
    let sig_a = SIGNAL_A.load(Ordering::Relaxed) as libc::c_int;
    let which = usize::from(sig != sig_a);
    bump(&C.signals[which]);
    let heap = HEAP.load(Ordering::Acquire);
    if heap.is_null() {
        return;
    }
    // SAFETY: the heap is leaked, so a non-null pointer stays valid.
    let heap = unsafe { &*heap };
    // SAFETY: a timer signal's siginfo: `si_value` carries the worker index.
    let index = unsafe { (*info).si_value().sival_ptr as usize };
    if index >= MAX_THREADS {
        return;
    }
    let st = &HANDLERS[index];
    st.active[which].store(true, Ordering::Relaxed);
    if st.active[1 - which].load(Ordering::Relaxed) {
        bump(&C.nested[which]);
    }
    let run = st.runs[which].fetch_add(1, Ordering::Relaxed);
    for op in 0..OPS_PER_SIGNAL {
        // A nested handler cannot tear this state: one fetch_add.
        let r = mix64(st.rng.fetch_add(1, Ordering::Relaxed) ^ (index as u64) << 56);
        // One request in 16 large (64 KiB to 4 MiB; one of those in 64 above
        // 4 MiB); of the rest 7 in 8 small (<= 1 KiB), the others up to 32 KiB.
        let large = (r >> 58).is_multiple_of(16);
        if large && (r >> 3).is_multiple_of(64) {
            bump(&C.too_large);
            if let Some(p) = heap.alloc_nolock(layout(TOO_LARGE, 8)) {
                bump(&C.too_large_served);
                // SAFETY: just allocated here, not used.
                unsafe { heap.free_nolock(p) };
            }
            continue;
        }
        let idx = if large {
            LARGE_SIZES - 1 + ((r >> 3) % (SIZES.len() - LARGE_SIZES + 1) as u64) as usize
        } else if !r.is_multiple_of(8) {
            ((r >> 3) % SMALL_SIZES as u64) as usize
        } else {
            SMALL_SIZES + ((r >> 3) % (HANDLER_SIZES - SMALL_SIZES) as u64) as usize
        };
        let align = [1, 8, 16, 64][((r >> 12) % 4) as usize];
        bump(&C.attempts);
        if large {
            bump(&C.large[0]);
        }
        match heap.alloc_nolock(layout(SIZES[idx], align)) {
            Some(p) => {
                bump(&C.ok);
                if large {
                    bump(&C.large[1]);
                }
                if !(p.as_ptr() as usize).is_multiple_of(align) {
                    bump(&C.violations);
                }
                let tag = (r >> 20) & 0xff | if which == 1 { TAG_SIGNAL_B } else { 0 };
                let h = pack(p, idx, tag);
                // SAFETY: just allocated: this context owns it.
                unsafe { fill(h) };
                // Every 64th run forces the other signal to nest right here,
                // while this handler holds an object it has not stashed.
                if op == 0 && run.is_multiple_of(64) {
                    raise_here(sig_a + (1 - which) as libc::c_int);
                }
                if !st.stash.put(h, (r >> 32) as usize) {
                    handler_free(heap, h, which);
                }
            }
            None => {
                bump(&C.fail);
                if large {
                    bump(&C.large[2]);
                }
            }
        }
        // Free a stashed object half of the time (maybe the other signal's).
        if (r >> 40) & 1 == 0 {
            if let Some(h) = st.stash.take((r >> 44) as usize) {
                handler_free(heap, h, which);
            }
        }
        // Now and then free an object a worker allocated on the normal path.
        if (r >> 50).is_multiple_of(16) {
            if let Some(h) = MAILBOXES[index].take((r >> 54) as usize) {
                handler_free(heap, h, which);
            }
        }
    }
    st.active[which].store(false, Ordering::Relaxed);
}

// ----- workers -----------------------------------------------------------------

fn worker_free(heap: &Heap, h: usize) {
    // SAFETY: the worker owns `h` (its own list, or swapped out of a stash).
    if !unsafe { check(h) } {
        bump(&C.violations);
    }
    bump(&C.normal_frees);
    // SAFETY: allocated by this heap, owned here.
    common::inside(|| unsafe { heap.free(NonNull::new_unchecked(unpack(h).0)) });
}

fn worker(heap: &'static Heap, index: usize, threads: usize, stop: &AtomicBool) {
    let sig_a = SIGNAL_A.load(Ordering::Relaxed) as libc::c_int;
    let timers = [
        ThreadTimer::for_current_thread(sig_a, Duration::from_micros(100), index),
        ThreadTimer::for_current_thread(sig_a + 1, Duration::from_micros(110), index),
    ];
    let mut rng = XorShift(mix64(0x5eed + index as u64) | 1);
    // (handle, expiry)
    let mut held: Vec<(usize, u64)> = Vec::with_capacity(4096);
    let mut now = 0u64;
    let next_box = &MAILBOXES[(index + 1) % threads];
    while !stop.load(Ordering::Relaxed) {
        now += 1;
        let r = rng.next();
        if held.len() < 3000 {
            let idx = if !r.is_multiple_of(8) {
                ((r >> 3) % SMALL_SIZES as u64) as usize
            } else {
                SMALL_SIZES + ((r >> 3) % (WORKER_SIZES - SMALL_SIZES) as u64) as usize
            };
            let align = [1, 8, 16, 64, 1, 8, 16, 4096][((r >> 12) % 8) as usize];
            let l = layout(SIZES[idx], align);
            match common::inside(|| heap.alloc(l)) {
                Some(p) => {
                    bump(&C.normal_allocs);
                    if !(p.as_ptr() as usize).is_multiple_of(align) {
                        bump(&C.violations);
                    }
                    let h = pack(p, idx, TAG_WORKER | (r >> 20) & 0xff);
                    // SAFETY: just allocated: owned by this worker.
                    unsafe { fill(h) };
                    // Lifetimes: mostly short, some long.
                    let life = if (r >> 30).is_multiple_of(4) {
                        (r >> 32) % 4096
                    } else {
                        (r >> 32) % 64
                    };
                    held.push((h, now + life));
                }
                None => bump(&C.normal_none),
            }
        }
        // Look at a few random held objects; free (or hand over) the expired.
        for k in 0..3 {
            if held.is_empty() {
                break;
            }
            let i = ((r >> (k * 16)) % held.len() as u64) as usize;
            if held[i].1 <= now {
                let (h, _) = held.swap_remove(i);
                if threads > 1 && (r >> 48).is_multiple_of(8) && next_box.put(h, (r >> 52) as usize) {
                    continue;
                }
                worker_free(heap, h);
            }
        }
        // Objects another worker handed over.
        if (r >> 56).is_multiple_of(4) {
            if let Some(h) = MAILBOXES[index].take((r >> 58) as usize) {
                bump(&C.cross_thread_frees);
                worker_free(heap, h);
            }
        }
        // Now and then free an object this thread's handlers stashed.
        if (r >> 60) == 0 {
            if let Some(h) = HANDLERS[index].stash.take(r as usize) {
                bump(&C.worker_frees_of_handler_objects);
                worker_free(heap, h);
            }
        }
    }
    drop(timers);
    for (h, _) in held.drain(..) {
        worker_free(heap, h);
    }
}

#[test]
fn heap_storm_with_nested_signals() {
    let started = Instant::now();
    // Maintenance passes run on a thread of ours (every 10 ms), so they can
    // be stopped before the final checks (which need a quiet heap).
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(256 << 20)
                .grow(false)
                .maintenance(false),
        )
        .expect("heap"),
    ));
    let (sig_a, sig_b) = (libc::SIGRTMIN(), libc::SIGRTMIN() + 1);
    SIGNAL_A.store(sig_a as usize, Ordering::Relaxed);
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    install_handler(sig_a, storm_handler);
    install_handler(sig_b, storm_handler);

    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let duration = Duration::from_secs(3);
    let stop = AtomicBool::new(false);
    let passes = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let stop = &stop;
            s.spawn(move || worker(heap, t, threads, stop));
        }
        let (stop, passes) = (&stop, &passes);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                heap.maintain();
                bump(passes);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    });
    // Every thread a timer could signal has been joined: no handler runs.
    let churn = started.elapsed();

    for st in &HANDLERS[..threads] {
        while let Some(h) = st.stash.take(0) {
            worker_free(heap, h);
        }
    }
    for m in &MAILBOXES[..threads] {
        while let Some(h) = m.take(0) {
            worker_free(heap, h);
        }
    }
    let before_drain = heap.stats();
    heap.drain();
    let s = heap.stats();
    let p = s.pages;
    let invariants = heap.pages().check_invariants();

    let (attempts, ok, fail) = (load(&C.attempts), load(&C.ok), load(&C.fail));
    let pct = 100.0 * ok as f64 / attempts.max(1) as f64;
    let [l_att, l_ok, l_fail] = [0, 1, 2].map(|i| load(&C.large[i]));
    let l_pct = 100.0 * l_ok as f64 / l_att.max(1) as f64;
    println!(
        "large nolock (64 KiB..4 MiB): attempts {l_att}, ok {l_ok}, fail {l_fail} \
         (busy {}, empty {}), success {l_pct:.4}%; stock {} pages; \
         above 4 MiB: {} asked, {} served, {} counted too large",
        p.nolock_large_alloc_fail_busy,
        p.nolock_large_alloc_fail_empty,
        before_drain.pages.stock_pages,
        load(&C.too_large),
        load(&C.too_large_served),
        s.nolock_alloc_fail_too_large,
    );
    println!(
        "heap storm: {threads} threads x 2 timers (100/110 us) for {:.2} s\n\
         signals: A {} B {}; nested: B in A {}, A in B {}; interrupted inside an allocator call: {}\n\
         nolock alloc: attempts {attempts}, ok {ok}, fail {fail} (busy {}, empty {}), success {pct:.4}%\n\
         handler frees: {} ({} of the other signal's objects, {} of workers' objects); \
         nolock frees deferred: {} (cached before drain: {} in sheaves+barn, {} deferred)\n\
         normal path: allocs {} (none {}), frees {} ({} cross-thread, {} of handler objects)\n\
         page allocator: nolock ok {}, fail busy {}, fail empty {}, frees deferred {}; maintenance passes {}\n\
         violations: {}; after drain: objects {} large {} huge {}; pages total {} free {} buddy {}; invariants {:?}",
        churn.as_secs_f64(),
        load(&C.signals[0]),
        load(&C.signals[1]),
        load(&C.nested[1]),
        load(&C.nested[0]),
        load(&C.inside),
        s.nolock_alloc_fail_busy,
        s.nolock_alloc_fail_empty,
        load(&C.handler_frees),
        load(&C.handler_frees_other_signal),
        load(&C.handler_frees_of_worker_objects),
        s.nolock_free_deferred,
        before_drain
            .classes
            .iter()
            .map(|c| c.cached_in_sheaves + c.cached_in_barn)
            .sum::<usize>(),
        before_drain.classes.iter().map(|c| c.deferred).sum::<usize>(),
        load(&C.normal_allocs),
        load(&C.normal_none),
        load(&C.normal_frees),
        load(&C.cross_thread_frees),
        load(&C.worker_frees_of_handler_objects),
        p.nolock_alloc_ok,
        p.nolock_alloc_fail_busy,
        p.nolock_alloc_fail_empty,
        p.nolock_free_deferred,
        load(&passes),
        load(&C.violations),
        s.objects_in_use,
        s.large_in_use,
        s.huge_in_use,
        p.total_pages,
        p.free_pages,
        p.buddy_pages,
        invariants,
    );

    // The storm happened: both signals, nesting both ways, both paths.
    assert!(load(&C.signals[0]) > 0 && load(&C.signals[1]) > 0);
    assert!(
        load(&C.nested[0]) > 0 && load(&C.nested[1]) > 0,
        "the two signals never nested"
    );
    assert!(
        load(&C.inside) > 0,
        "no signal interrupted an allocator call"
    );
    assert!(attempts > 0 && load(&C.normal_allocs) > 0);
    assert!(load(&C.handler_frees_other_signal) > 0);
    assert!(load(&C.cross_thread_frees) > 0);
    // The heap's own counters agree with the handlers' (only they use nolock).
    assert_eq!(s.nolock_alloc_ok, ok, "heap counted other nolock successes");
    assert_eq!(
        s.nolock_alloc_fail_busy + s.nolock_alloc_fail_empty,
        fail,
        "heap counted other nolock failures"
    );

    // No memory had two owners, nothing leaked, the structure is intact.
    assert_eq!(load(&C.violations), 0, "pattern or alignment violations");
    assert_eq!(load(&C.normal_none), 0, "normal path ran out with 256 MiB");
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.large_in_use, 0);
    assert_eq!(s.huge_in_use, 0);
    for c in &s.classes {
        assert_eq!(
            (c.cached_in_sheaves, c.cached_in_barn, c.deferred, c.slabs),
            (0, 0, 0, 0),
            "class {} holds memory after drain",
            c.size
        );
    }
    assert_eq!(p.free_pages, p.total_pages, "pages leaked");
    assert_eq!(p.buddy_pages, p.total_pages, "pages off the buddy lists");
    assert_eq!(invariants, Ok(()));
    assert!(
        ok * 1000 >= attempts * 999,
        "nolock success {pct:.4}% < 99.9% ({fail} of {attempts} failed)"
    );
    // The large blocks on their own: they happened, the page allocator's
    // large counters match the handlers' and give every failure's reason,
    // and 99.9% succeeded; above 4 MiB every request was refused and
    // counted as too large.
    assert!(l_att > 0, "no large block was tried");
    assert_eq!(p.nolock_large_alloc_ok, l_ok);
    assert_eq!(
        p.nolock_large_alloc_fail_busy + p.nolock_large_alloc_fail_empty,
        l_fail,
        "a large failure without a reason"
    );
    assert!(
        l_ok * 1000 >= l_att * 999,
        "large nolock success {l_pct:.4}% < 99.9% ({l_fail} of {l_att} failed)"
    );
    assert!(load(&C.too_large) > 0, "no request above 4 MiB was tried");
    assert_eq!(load(&C.too_large_served), 0, "nolock served above 4 MiB");
    assert_eq!(s.nolock_alloc_fail_too_large, load(&C.too_large));
}
