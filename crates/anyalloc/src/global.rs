//! The process-wide heap: the drop-in [`Global`] allocator, the explicit
//! [`NoLock`] allocator, and [`nolock_scope`].
//!
//! # Routing
//!
//! `Global` is a thin layer over the heap's routed normal path: the thread's
//! context word (the `context` module: `DEPTH`, raised by the allocator's own
//! locks, and `SCOPE`, by [`nolock_scope`]) is read on the slow paths, and a
//! call that finds its thread inside the allocator (a signal handler that
//! interrupted it there) or in a nolock scope takes the nolock path. The
//! fast path (this CPU's sheaf, in a restartable sequence, or under a slot
//! try-lock without one) is the same for both routes and reads nothing.
//!
//! # Initialisation
//!
//! The heap is created on first use by an atomic state machine
//! (`UNINIT -> INITIALIZING -> READY`, or `FAILED`). Whoever wins the CAS
//! creates it, reading its configuration with `getenv` (no allocation):
//!
//! | variable          | meaning                                     | default |
//! |-------------------|---------------------------------------------|---------|
//! | `ANYALLOC_MEMORY` | first zone size, bytes; suffixes k, m, g, t | 256m    |
//! | `ANYALLOC_CPUS`   | CPU slot sets (fewer than the possible CPU ids: no rseq fast path, see [`Config::cpus`]) | one per possible CPU id, at most 4096 |
//! | `ANYALLOC_GROW`   | `0` makes `ANYALLOC_MEMORY` a hard cap      | 1       |
//! | `ANYALLOC_MAINTENANCE` | `0`: no maintenance thread             | 1       |
//! | `ANYALLOC_DECAY` | `0`: without a maintenance thread, idle memory is not given back by the allocation calls (`Config::decay`) | 1 |
//! | `ANYALLOC_NOLOCK_SYSCALLS` | `0`: the nolock path makes no system call (`Config::nolock_syscalls`) | 1 |
//!
//! Values are read strictly: a size is digits and an optional unit (`k`,
//! `m`, `g`, `t`, either case, optionally followed by `b` or `ib`), a
//! switch `0` or `1` (any other number means on; or `on`/`off`,
//! `true`/`false`, `yes`/`no`). A value
//! that does not parse, or that [`Config`] refuses, is named in one line
//! on stderr and that setting keeps its default; the other settings apply.
//!
//! A nolock caller that finds another context initialising gets null; a
//! normal caller waits, unless the creator's thread is in another process
//! (a forked child cloned during the creation, by a fork whose prepare
//! did not wait for it): then the first normal caller takes the creation
//! over. The creating call is marked inside the allocator, so
//! a signal handler that interrupts the creation on its own thread takes
//! the nolock route (and gets null) instead of waiting for itself. Creating
//! the heap makes a few `mmap` calls: call [`init`] early if even the first
//! nolock allocation must not make them.
//!
//! # Setup owed to an ordinary context
//!
//! Two things must never run in a signal handler: registering the fork
//! handlers (`pthread_atfork` takes libc's fork lock and allocates) and
//! starting the maintenance thread (`pthread_create` takes libc's thread
//! locks and allocates). A call that may be a signal handler cannot tell,
//! even at depth 0 (a handler that interrupted code outside the
//! allocator), so neither ever runs in `Global`'s or `NoLock`'s calls. They
//! run only at points that are ordinary context by construction:
//!
//! * the crate's start-up constructor (`.init_array`, before `main`):
//!   registers the fork handlers (they hold the locks of the global heap,
//!   once there is one, and of every heap made with [`Heap::new`] across
//!   `fork`), and, when `Global` is the process's allocator (it allocates one
//!   probe byte and checks who served it), creates the global heap and
//!   starts its maintainer;
//! * [`init`]: creates the heap if needed and does whatever is still owed
//!   (the fork handlers if the constructor did not run, the maintainer if a
//!   nolock call created the heap).
//!
//! So a heap first created from a signal handler (by `NoLock` in a program
//! whose allocator is another one) has no maintainer until [`init`] runs.
//!
//! # Fork
//!
//! The `pthread_atfork` handlers registered here hold every heap's locks
//! across `fork` (the global heap and every `Heap::new`); see the `fork`
//! module.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};

use crate::config::{Config, Error};
use crate::context;
use crate::slab::{Heap, HeapCore};

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

struct HeapCell {
    state: AtomicU8,
    heap: UnsafeCell<MaybeUninit<Heap>>,
}

// SAFETY: `heap` is written once, by the context that won the
// UNINIT -> INITIALIZING CAS, and read only after READY was published with
// Release; Heap itself is Sync.
unsafe impl Sync for HeapCell {}

static GLOBAL_HEAP: HeapCell = HeapCell {
    state: AtomicU8::new(UNINIT),
    heap: UnsafeCell::new(MaybeUninit::uninit()),
};

/// The global heap's core, published (Release) with READY and null before:
/// `Global`'s fast paths load this one word instead of the state and then
/// the heap. The global heap is never dropped, so once non-null it stays
/// valid.
///
/// On x86-64 Linux the word is a hidden symbol loaded with one RIP-relative
/// instruction (`sync::hidden_word`): reached through the GOT, as a static
/// of this crate would be from `Global`'s fast paths inlined into the
/// user's crate, it cost one more dependent load at the head of every
/// allocation and free.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod core_word {
    use core::sync::atomic::{AtomicPtr, Ordering};

    use crate::slab::HeapCore;

    crate::sync::hidden_word!(mod word = "anyalloc_global_core");

    /// Publishes the ready heap's core (Release).
    pub(super) fn publish(core: *mut HeapCore) {
        // SAFETY: the hidden word: 8-aligned, 8 bytes, null at start, live
        // for the whole process, and accessed only atomically (here, and by
        // `load`).
        let cell = unsafe { &*(word::addr() as *const AtomicPtr<HeapCore>) };
        cell.store(core, Ordering::Release);
    }

    /// The word, with Acquire ordering.
    #[inline(always)]
    pub(super) fn load() -> *mut HeapCore {
        word::load_acquire() as *mut HeapCore
    }
}

/// Elsewhere, a plain static.
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod core_word {
    use core::sync::atomic::{AtomicPtr, Ordering};

    use crate::slab::HeapCore;

    static GLOBAL_CORE: AtomicPtr<HeapCore> = AtomicPtr::new(core::ptr::null_mut());

    pub(super) fn publish(core: *mut HeapCore) {
        GLOBAL_CORE.store(core, Ordering::Release);
    }

    #[inline(always)]
    pub(super) fn load() -> *mut HeapCore {
        GLOBAL_CORE.load(Ordering::Acquire)
    }
}

/// The global heap's core, if the heap is ready.
#[inline(always)]
fn global_core() -> Option<&'static HeapCore> {
    let c = core_word::load();
    // SAFETY: non-null only after the heap was written (Release, read with
    // Acquire above); the global heap lives as long as the process.
    unsafe { c.as_ref() }
}

/// The process-wide heap, creating it if needed (normal context: waits for
/// a concurrent initialisation), and doing the setup still owed to an
/// ordinary context (see the module documentation): call it from ordinary
/// code, never from a signal handler. Errors ([`Error::Reserve`]) when the
/// heap could not be created: the OS refused the memory. (A setting in the
/// environment that does not parse or is out of range is not an error: it
/// is named on stderr and keeps its default.)
///
/// ```
/// use core::alloc::Layout;
/// // Early in `main`, from ordinary code:
/// let heap = anyalloc::init().expect("the OS gave the heap its memory");
/// let p = heap.alloc(Layout::new::<u64>()).unwrap();
/// // SAFETY: allocated above, freed once.
/// unsafe { heap.free(p) };
/// assert!(core::ptr::eq(heap, anyalloc::init().unwrap())); // one heap per process
/// ```
pub fn init() -> Result<&'static Heap, Error> {
    let h = match global_heap() {
        Some(h) => h,
        None => init_slow(false, true).ok_or(Error::Reserve {
            bytes: env_config(false).config.memory_bytes(),
        })?,
    };
    ordinary_setup(h);
    Ok(h)
}

/// The process-wide heap if it exists already (for its statistics, say).
///
/// ```
/// let heap = anyalloc::init().unwrap();
/// let same = anyalloc::global_heap().expect("`init` created it");
/// assert!(core::ptr::eq(heap, same));
/// ```
#[inline(always)]
pub fn global_heap() -> Option<&'static Heap> {
    if GLOBAL_HEAP.state.load(Ordering::Acquire) == READY {
        // SAFETY: READY is stored (Release) after the heap was written.
        Some(unsafe { (*GLOBAL_HEAP.heap.get()).assume_init_ref() })
    } else {
        None
    }
}

/// Waits while another thread creates the global heap: for the fork
/// handler's prepare (normal context), before it looks for the heap to hold
/// its locks. Cloned half made, the heap would stay `INITIALIZING` for ever
/// in the child, whose first `init` or normal-path allocation would wait
/// for a creator that does not exist there. The creation takes no lock, so
/// it ends; a creation of the forking thread's own (interrupted by a signal
/// handler that forked) never gets here: that prepare takes nothing.
pub(crate) fn wait_for_creation() {
    // (Not for a creator in another process: it will never end here, and
    // the next normal call takes it over, see `creator_gone`.)
    while GLOBAL_HEAP.state.load(Ordering::Acquire) == INITIALIZING && !creator_gone() {
        // A sleep, not a yield: the creator may be a thread this one
        // preempted on its CPU (a real-time caller).
        crate::platform::nap();
    }
}

/// The process whose thread is creating the global heap (its `getpid`):
/// stored by each caller that found the heap `UNINIT`, just before its CAS
/// to `INITIALIZING`, so that while the state is `INITIALIZING` it names
/// the process whose thread won (callers of one process store the same
/// value; a forked child inherits the value with the state).
static CREATOR: AtomicI32 = AtomicI32::new(0);

/// Whether the creation in progress runs in another process: this one is a
/// forked child cloned while a thread of its parent created the heap (a
/// fork whose prepare took nothing, called by a signal handler that
/// interrupted the allocator, does not wait for the creation; the `fork`
/// module's "Orphaned locks"). No thread here will ever finish it.
fn creator_gone() -> bool {
    let c = CREATOR.load(Ordering::Acquire);
    // SAFETY: getpid has no preconditions.
    c != 0 && c != unsafe { libc::getpid() }
}

/// In a forked child whose parent's thread was creating the global heap
/// (`creator_gone`): takes the creation over, if this caller is the first
/// of this process to try (`false`: another one did, and it is this
/// process's creation now, to be waited for). What the parent's thread
/// did with the cell before the clone is not read, except a heap that was
/// complete already (its core published: only READY was missing), which
/// is kept.
fn take_over_creation() -> bool {
    let c = CREATOR.load(Ordering::Acquire);
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    c != 0
        && c != me
        && CREATOR
            .compare_exchange(c, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
}

/// Whether the heap's creator wanted a maintainer that nobody started yet.
static MAINTAINER_OWED: AtomicBool = AtomicBool::new(false);
/// Whether the fork handlers are registered.
static ATFORK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// The heap for a `NoLock` call: created if needed, never waiting for a
/// creation in progress elsewhere. Never does the owed setup (the call may
/// be a signal handler).
#[inline]
fn nolock_heap() -> Option<&'static Heap> {
    match global_heap() {
        Some(h) => Some(h),
        None => init_slow(true, true),
    }
}

/// Ordinary context only (`init`, the start-up constructor): registers the
/// fork handlers if not yet, and starts the maintainer if it is owed.
fn ordinary_setup(h: &Heap) {
    register_fork_handlers();
    if MAINTAINER_OWED.swap(false, Ordering::AcqRel) {
        h.start_maintenance();
    }
}

/// Registers the fork handlers (they hold the locks of the global heap and
/// of every heap made with [`Heap::new`] across `fork`) unless they are registered already. Ordinary context only
/// (`pthread_atfork` takes libc's lock and allocates). The crate's
/// start-up constructor and [`init`] call it; a C `malloc` built on this
/// heap (`crates/anyalloc-c`) calls it before any other library's
/// `pthread_atfork` registration, so that the heap's prepare handler, the
/// first registered, runs after every other one (prepare handlers run in
/// the reverse order of registration) and holds the locks for the clone
/// only, as glibc's malloc does.
#[doc(hidden)]
pub fn register_fork_handlers() {
    if !ATFORK_REGISTERED.swap(true, Ordering::AcqRel) {
        crate::fork::register_atfork();
    }
}

/// The process-wide heap, created if needed like [`init`] but without
/// starting the maintenance thread: for a C `malloc` built on this heap
/// (`crates/anyalloc-c`), whose first call runs inside the dynamic loader,
/// where spawning a thread (which calls `malloc`) is not safe. With
/// `nolock`, an initialisation in progress elsewhere gives `None` at once
/// instead of a wait. The caller may start the maintainer later with
/// [`Heap::start_maintenance`]. It never does setup owed to an ordinary
/// context (the crate's start-up constructor registers the fork handlers,
/// or [`init`] does).
#[doc(hidden)]
pub fn init_without_maintainer(nolock: bool) -> Option<&'static Heap> {
    match global_heap() {
        Some(h) => Some(h),
        None => init_slow(nolock, false),
    }
}

#[cold]
fn init_slow(nolock: bool, maintainer: bool) -> Option<&'static Heap> {
    loop {
        // Marked before the state can become INITIALIZING: a signal handler
        // on this thread that interrupts the creation (from the CAS on)
        // sees the thread inside the allocator, takes the nolock route, and
        // gets null instead of waiting for INITIALIZING to end. (Marked
        // after the CAS, a handler in between would wait for ever for its
        // own thread.)
        let _inside = context::Inside::enter();
        if GLOBAL_HEAP.state.load(Ordering::Acquire) == UNINIT {
            // SAFETY: getpid has no preconditions.
            CREATOR.store(unsafe { libc::getpid() }, Ordering::Release);
        }
        let won = match GLOBAL_HEAP.state.compare_exchange(
            UNINIT,
            INITIALIZING,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(UNINIT),
            // A creation whose thread stayed in the parent process: taken
            // over by one normal caller (see `take_over_creation`).
            Err(INITIALIZING) if !nolock && take_over_creation() => {
                if !core_word::load().is_null() {
                    // Complete but for READY: the heap is whole.
                    if maintainer && env_flag(c"ANYALLOC_MAINTENANCE") != Some(false) {
                        MAINTAINER_OWED.store(true, Ordering::Release);
                    }
                    GLOBAL_HEAP.state.store(READY, Ordering::Release);
                    return global_heap();
                }
                Ok(INITIALIZING)
            }
            Err(state) => Err(state),
        };
        match won {
            Ok(_) => {
                crate::interrupt_point!(GlobalCreation);
                let env = env_config(true);
                let mut config = env.config;
                // The first zone is address space only, but a limit on it
                // (`ulimit -v` or `-d`) counts it: unless ANYALLOC_MEMORY
                // asked for a size, the default takes at most a quarter of
                // the room the limit leaves (the heap grows on demand; a
                // first zone that barely fits would leave no room for
                // anything else), and if even that is refused, 32 MiB
                // halved down to 4 MiB.
                if !env.memory_set {
                    let headroom = crate::platform::address_space_headroom();
                    config = config.memory(first_zone_size(headroom));
                }
                let mut built = Heap::new_without_maintainer(config);
                if !env.memory_set && matches!(built, Err(Error::Reserve { .. })) {
                    let mut size = FALLBACK_FIRST_ZONE.min(config.memory_bytes() / 2);
                    while matches!(built, Err(Error::Reserve { .. })) && size >= MIN_FIRST_ZONE {
                        config = config.memory(size);
                        built = Heap::new_without_maintainer(config);
                        size /= 2;
                    }
                }
                return match built {
                    Ok(h) => {
                        // SAFETY: we won the CAS: no other context reads or
                        // writes the cell until READY is published.
                        let h = unsafe { (*GLOBAL_HEAP.heap.get()).write(h) };
                        // Made inside a fork window: held across the fork
                        // before any other thread can use it.
                        crate::fork::adopt_global(h);
                        core_word::publish(h.core_ptr().cast_mut());
                        // The maintainer starts at an ordinary point (see
                        // the module documentation), never here: this call
                        // may be a signal handler.
                        if maintainer && env_flag(c"ANYALLOC_MAINTENANCE") != Some(false) {
                            MAINTAINER_OWED.store(true, Ordering::Release);
                        }
                        GLOBAL_HEAP.state.store(READY, Ordering::Release);
                        global_heap()
                    }
                    Err(_) => {
                        GLOBAL_HEAP.state.store(FAILED, Ordering::Release);
                        crate::platform::write_stderr(
                            b"anyalloc: could not create the global heap (check ANYALLOC_MEMORY and ANYALLOC_CPUS)\n",
                        );
                        None
                    }
                };
            }
            Err(READY) => return global_heap(),
            Err(FAILED) => return None,
            Err(_) if nolock => return None, // initialising elsewhere: never wait
            // Created by another thread: wait. A sleep, not a yield: the
            // creator may be a thread this one preempted on its CPU (a
            // real-time caller), which a yield would not let run.
            Err(_) => crate::platform::nap(),
        }
    }
}

/// The first zone the global heap falls back to when the default one
/// cannot be reserved (a limit on address space), and the smallest.
const FALLBACK_FIRST_ZONE: usize = 32 << 20;
const MIN_FIRST_ZONE: usize = 4 << 20;

/// The default first zone under a limit on address space that leaves
/// `headroom` bytes to map (`None`: no limit): at most a quarter of that,
/// in whole 4 MiB blocks, between 4 MiB and the default 256 MiB.
fn first_zone_size(headroom: Option<usize>) -> usize {
    match headroom {
        Some(room) => {
            ((room / 4) & !(MIN_FIRST_ZONE - 1)).clamp(MIN_FIRST_ZONE, DEFAULT_FIRST_ZONE)
        }
        None => DEFAULT_FIRST_ZONE,
    }
}

/// The global heap's settings from the environment.
#[derive(Clone, Copy)]
struct EnvConfig {
    config: Config,
    /// Whether a valid `ANYALLOC_MEMORY` chose the first zone's size (else
    /// the default, which a limit on address space may shrink).
    memory_set: bool,
}

/// Reads the heap's configuration from the environment without allocating.
/// Each setting is checked on its own: one that does not parse, or that
/// the configuration refuses (`Config::validate`), is named in one line on
/// stderr (with `report`) and left at its default, and the others still
/// apply.
fn env_config(report: bool) -> EnvConfig {
    let mut c = Config::default().memory(DEFAULT_FIRST_ZONE);
    let mut memory_set = false;
    if let Some((v, raw)) = env_setting(c"ANYALLOC_MEMORY", SIZE, report) {
        if let Some(next) = checked(c.memory(v), c"ANYALLOC_MEMORY", raw, report) {
            c = next;
            memory_set = true;
        }
    }
    if let Some((v, raw)) = env_setting(c"ANYALLOC_CPUS", COUNT, report) {
        c = checked(c.cpus(v), c"ANYALLOC_CPUS", raw, report).unwrap_or(c);
    }
    if let Some((v, _)) = env_setting(c"ANYALLOC_GROW", FLAG, report) {
        c = c.grow(v);
    }
    if let Some((v, _)) = env_setting(c"ANYALLOC_NOLOCK_SYSCALLS", FLAG, report) {
        c = c.nolock_syscalls(v);
    }
    if let Some((v, _)) = env_setting(c"ANYALLOC_DECAY", FLAG, report) {
        c = c.decay(v);
    }
    EnvConfig {
        config: c,
        memory_set,
    }
}

/// The first zone when `ANYALLOC_MEMORY` does not choose one.
const DEFAULT_FIRST_ZONE: usize = 256 << 20;

/// `next` (a valid configuration with one setting changed, to `value`,
/// the variable `name` as read) if it is valid; else (reported when
/// `report`) `None`.
fn checked(next: Config, name: &core::ffi::CStr, value: &[u8], report: bool) -> Option<Config> {
    match next.validate() {
        Ok(()) => Some(next),
        Err(e) => {
            let reason = match e {
                Error::Config { reason, .. } => reason,
                _ => "refused",
            };
            if report {
                report_setting(name, value, b"is out of range (", reason.as_bytes(), b")");
            }
            None
        }
    }
}

/// The value of the environment variable `name`, if set.
fn env_value(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated; getenv returns null or a pointer to
    // a NUL-terminated string owned by the environment.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null result of getenv: a valid C string, which lives as
    // long as nobody changes the variable (nothing here keeps it longer
    // than the configuration is being read).
    Some(unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes())
}

/// A setting parsed with `parse` (see the [`Parser`]s), with the value as
/// read; `None` when unset or invalid (an invalid one is reported when
/// `report`).
fn env_setting<T>(
    name: &core::ffi::CStr,
    parse: Parser<T>,
    report: bool,
) -> Option<(T, &'static [u8])> {
    let value = env_value(name)?;
    match (parse.parse)(value) {
        Some(v) => Some((v, value)),
        None => {
            if report {
                report_setting(name, value, parse.expected, b"", b"");
            }
            None
        }
    }
}

/// How one kind of setting is read, and what its error says is expected.
#[derive(Clone, Copy)]
struct Parser<T> {
    parse: fn(&[u8]) -> Option<T>,
    expected: &'static [u8],
}

/// A size: decimal digits and an optional unit, `k`, `m`, `g` or `t`
/// (powers of 1024, either case), which may be followed by `b` or `ib`
/// (`64M`, `64mb`, `64MiB`); a bare `b` means bytes. Nothing else: no
/// sign, space, fraction, or other trailing text.
const SIZE: Parser<usize> = Parser {
    parse: parse_size_bytes,
    expected: b"is not a size (expected e.g. 256M, 4G)",
};

/// A count: decimal digits only.
const COUNT: Parser<usize> = Parser {
    parse: parse_digits,
    expected: b"is not a number (expected e.g. 4)",
};

/// A switch: `0` or `1` (any other number means on, as it always did),
/// or `on`/`off`, `true`/`false`, `yes`/`no` in either case.
const FLAG: Parser<bool> = Parser {
    parse: parse_flag_bytes,
    expected: b"is not a switch (expected 0 or 1)",
};

/// An `ANYALLOC_*` switch read by another part of the program (the C
/// library's `ANYALLOC_MAINTENANCE`), parsed and reported like the heap's
/// own: `None` when unset or invalid (then one line on stderr).
#[doc(hidden)]
pub fn env_flag(name: &core::ffi::CStr) -> Option<bool> {
    env_setting(name, FLAG, true).map(|(v, _)| v)
}

use crate::platform::parse_decimal as parse_digits;

fn parse_size_bytes(bytes: &[u8]) -> Option<usize> {
    let split = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    let (digits, suffix) = bytes.split_at(split);
    let n = parse_digits(digits)?;
    let lower = |i: usize| suffix.get(i).map(u8::to_ascii_lowercase);
    let shift = match lower(0) {
        None => return Some(n),
        Some(b'b') if suffix.len() == 1 => return Some(n),
        Some(b'k') => 10,
        Some(b'm') => 20,
        Some(b'g') => 30,
        Some(b't') => 40,
        Some(_) => return None,
    };
    let unit_tail_ok = match suffix.len() {
        1 => true,
        2 => lower(1) == Some(b'b'),
        3 => lower(1) == Some(b'i') && lower(2) == Some(b'b'),
        _ => false,
    };
    if !unit_tail_ok {
        return None;
    }
    n.checked_mul(1usize << shift)
}

fn parse_flag_bytes(bytes: &[u8]) -> Option<bool> {
    if let Some(n) = parse_digits(bytes) {
        return Some(n != 0);
    }
    let word = |w: &[u8]| bytes.eq_ignore_ascii_case(w);
    if word(b"on") || word(b"true") || word(b"yes") {
        Some(true)
    } else if word(b"off") || word(b"false") || word(b"no") {
        Some(false)
    } else {
        None
    }
}

/// Writes one line to stderr, with one write(2) (nothing allocated, no
/// formatting machinery): `anyalloc: NAME="value" <what><detail><close>;
/// using the default`. A long value is cut short (`...`), and bytes that
/// are not printable ASCII are written as `?`.
fn report_setting(name: &core::ffi::CStr, value: &[u8], what: &[u8], detail: &[u8], close: &[u8]) {
    const MAX_VALUE: usize = 64;
    let mut m = crate::platform::FatalMessage::new()
        .text("anyalloc: ")
        .bytes(name.to_bytes())
        .text("=\"");
    for &b in value.iter().take(MAX_VALUE) {
        m = m.bytes(&[if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'?'
        }]);
    }
    if value.len() > MAX_VALUE {
        m = m.text("...");
    }
    let mut m = m
        .text("\" ")
        .bytes(what)
        .bytes(detail)
        .bytes(close)
        .text("; using the default");
    // The line ends with a newline even when cut short.
    crate::platform::write_stderr(m.line());
}

/// Runs from `.init_array` before `main` (after libc's own initialisation):
/// ordinary context, where the setup that must never run in a signal
/// handler happens (see the module documentation).
extern "C" fn startup() {
    register_fork_handlers();
    // Is `Global` the process's allocator? Allocate a probe byte through
    // the global allocator and see whether the global heap served it.
    let probe = Layout::new::<u8>();
    // SAFETY: a non-zero-size layout; freed below with the same layout.
    let p = unsafe { std::alloc::alloc(probe) };
    if p.is_null() {
        return;
    }
    let ours = global_heap().is_some_and(|h| h.pages().contains(p as usize));
    // SAFETY: allocated just above with `probe`.
    unsafe { std::alloc::dealloc(p, probe) };
    if let (true, Some(h)) = (ours, global_heap()) {
        ordinary_setup(h);
    }
}

#[used]
#[link_section = ".init_array"]
static STARTUP: extern "C" fn() = startup;

/// The drop-in global allocator: every `Box`, `Vec` and `String` from a heap
/// that is safe to re-enter.
///
/// ```no_run
/// #[global_allocator]
/// static A: anyalloc::Global = anyalloc::Global;
/// ```
///
/// A call that interrupted its own thread inside the allocator (a signal
/// handler allocating) takes the nolock path, as does every call inside a
/// [`nolock_scope`]. Such a call may return null, which `Box::new` turns into
/// an abort: inside handlers, prefer the fallible APIs (`try_reserve`,
/// `Box::try_new_in(.., NoLock)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

// SAFETY: memory comes from the heap's allocation functions, which return
// blocks of at least `layout.size()` bytes aligned to `layout.align()` that
// are not handed out again before they are freed; dealloc frees only what
// alloc returned.
unsafe impl GlobalAlloc for Global {
    /// The fast path is the heap's: one load finds the ready heap, and
    /// everything else (creation, every slow path) is one tail call.
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match global_core() {
            Some(c) => raw(c.alloc(layout)),
            None => alloc_creating(layout),
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Only a ready heap can have handed out a non-null `ptr` (and
        // `free_sized` ignores a null one).
        match global_core() {
            // SAFETY: per GlobalAlloc's contract, `ptr` came from this heap.
            Some(c) => unsafe { c.free_sized::<false>(ptr, layout) },
            None => crate::slab::nothing_to_free(),
        }
    }

    /// Found as `alloc` finds it (the core first), so that it is served
    /// wherever `alloc` is.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match global_core() {
            Some(c) => raw(c.alloc_zeroed(layout)),
            None => raw(routed_heap().and_then(|h| h.alloc_zeroed_routed(layout))),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(p) = NonNull::new(ptr) else {
            return core::ptr::null_mut();
        };
        // The core, as `alloc` and `dealloc` find it: it is published
        // before the heap is `READY`, and `alloc` may have served `ptr` in
        // between.
        let Some(c) = global_core() else {
            return core::ptr::null_mut();
        };
        let usable = c.usable_size(p);
        // A huge block resized to another huge size of other pages moves
        // them (`mremap`, as C's `realloc` does): a growth does not hold
        // the old and the new block resident at once while it copies (a
        // `Vec` grown to 128 MiB peaked 64 MiB higher), a shrink gives its
        // tail back to the OS (kept in place, a 100 MiB block shrunk to
        // 51 MiB stayed resident whole). Normal route only (`remap_huge`
        // is a normal-path call), for alignments its page-aligned result
        // has.
        use crate::page::MAX_BLOCK;
        // Within the third of it that a growth adds (see `remap_huge`), a
        // huge block stays where it is: a block grown a little at a time
        // moves a logarithmic number of times.
        if usable > MAX_BLOCK && new_size <= usable && new_size > usable - usable / 3 {
            return ptr;
        }
        if usable > MAX_BLOCK
            && new_size > MAX_BLOCK
            && new_size.checked_next_multiple_of(crate::PAGE_SIZE) != Some(usable)
            && layout.align() <= crate::PAGE_SIZE
            && !context::nested()
        {
            if let Some(h) = global_heap() {
                // SAFETY: per GlobalAlloc's contract `ptr` is a live block
                // of this heap; after `Some` only the result is.
                if let Some(q) = unsafe { h.remap_huge(p, new_size) } {
                    return q.as_ptr();
                }
            }
        }
        if stays_in_place(new_size, usable) {
            return ptr;
        }
        // SAFETY: GlobalAlloc's contract: the new layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarding our own contract.
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks are live and distinct; copy the smaller size.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        } else if new_size <= usable {
            // No smaller block in this context (a nolock route): the block
            // fits, and keeping it is better than failing a shrink, which
            // `Vec::shrink_to_fit` turns into an abort (as `NoLock` does;
            // the later free's layout names another class: see
            // `Heap::free_sized`).
            return ptr;
        }
        q
    }
}

/// `Global::alloc` before the heap is ready: creates it (waiting for a
/// creation in progress elsewhere only when this thread may wait), then
/// allocates.
#[cold]
#[inline(never)]
fn alloc_creating(layout: Layout) -> *mut u8 {
    raw(routed_heap().and_then(|h| h.alloc_routed(layout)))
}

/// An allocation's result as `GlobalAlloc` returns it (null: none).
#[inline(always)]
fn raw(p: Option<NonNull<u8>>) -> *mut u8 {
    p.map_or(core::ptr::null_mut(), NonNull::as_ptr)
}

/// The heap for a `Global` allocation: created if needed, waiting for a
/// creation in progress elsewhere only when this thread may wait.
#[inline(always)]
fn routed_heap() -> Option<&'static Heap> {
    match global_heap() {
        Some(h) => Some(h),
        None => init_slow(context::nested(), true),
    }
}

#[inline]
fn nolock_alloc(layout: Layout) -> *mut u8 {
    raw(nolock_heap().and_then(|h| h.alloc_nolock(layout)))
}

/// An allocator that only ever takes the nolock paths of the process-wide
/// heap: for explicit allocation from any context.
///
/// It shares that heap with [`Global`] (and [`global_heap`]): a block of
/// either may be freed or resized through the other, with the layout it
/// has (`tests/crossing.rs` trades them under a signal storm). A block of
/// another heap (a [`Heap::new`](crate::Heap::new), or a second copy of
/// this crate such as `libanyalloc.so`'s) is a foreign pointer to it, and
/// its free aborts with a one-line report.
///
/// ```
/// use allocator_api2::boxed::Box;
/// use anyalloc::NoLock;
/// // Fallible: in a signal handler, `Err` means "no memory in this context".
/// let b = Box::try_new_in([7u8; 64], NoLock).expect("memory to spare");
/// assert_eq!(b[63], 7);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLock;

// SAFETY: as for Global; every call takes the nolock path.
unsafe impl GlobalAlloc for NoLock {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        nolock_alloc(layout)
    }

    /// Finds the heap as `Global::dealloc` does (its core), so that a
    /// block `Global` served before the heap was `READY` is freed too.
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(c) = global_core() {
            // SAFETY: per GlobalAlloc's contract, `ptr` came from this heap
            // with `layout` (and `free_sized` ignores a null one).
            unsafe { c.free_sized::<true>(ptr, layout) };
        }
    }

    /// In place when the block fits (as `Allocator::grow` and `shrink` do).
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc's contract: the new layout is valid.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match NonNull::new(ptr) {
            // SAFETY: per GlobalAlloc's contract, `ptr` is a live block of
            // this allocator allocated with `layout`.
            Some(p) => raw(unsafe { nolock_resize(p, layout, new, false) }),
            None => core::ptr::null_mut(),
        }
    }
}

/// Whether a resize to `size` keeps a block of `usable` bytes: it is big
/// enough, and not wastefully so (more than half used).
#[inline]
fn stays_in_place(size: usize, usable: usize) -> bool {
    size <= usable && size > usable / 2
}

/// Resizes a nolock block of `old` to `new` (both of non-zero size): in
/// place when the block is aligned for `new`, big enough for it and (a
/// shrink) not wastefully so, more than half used; otherwise a new nolock
/// block, the contents copied, the old one freed. A shrink that finds no
/// smaller block keeps the old one rather than fail, when its address is
/// aligned for `new` (the later free's layout then names another class:
/// slower, never unsafe, see `Heap::free_sized`); one that is not must
/// move. `None`, `ptr` untouched: no memory in this context (for a
/// shrink, only one to an alignment the address lacks).
/// With `zero`, the bytes from `old.size()` to `new.size()` are zeroed.
///
/// # Safety
/// `ptr` is a live block of the global heap allocated with `old`.
unsafe fn nolock_resize(
    ptr: NonNull<u8>,
    old: Layout,
    new: Layout,
    zero: bool,
) -> Option<NonNull<u8>> {
    // The core, as `Global` finds it: published before the heap is
    // `READY`, and `Global` may have served `ptr` in between.
    let h = global_core()?;
    let usable = h.usable_size(ptr);
    let aligned = (ptr.as_ptr() as usize).is_multiple_of(new.align());
    let fits = aligned && new.size() <= usable;
    let result = if aligned && stays_in_place(new.size(), usable) {
        ptr
    } else {
        match h.alloc_nolock(new) {
            Some(q) => {
                // SAFETY: both blocks are live and distinct; the copy is no
                // longer than either.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        ptr.as_ptr(),
                        q.as_ptr(),
                        old.size().min(new.size()),
                    );
                    h.free_sized::<true>(ptr.as_ptr(), old);
                }
                q
            }
            // A shrink keeps its block.
            None if fits => ptr,
            None => return None,
        }
    };
    if zero && new.size() > old.size() {
        // SAFETY: the result holds at least `new.size()` bytes.
        unsafe {
            core::ptr::write_bytes(result.as_ptr().add(old.size()), 0, new.size() - old.size())
        };
    }
    Some(result)
}

// SAFETY: allocate returns blocks valid for the layout until deallocated;
// zero-sized requests get a dangling aligned pointer that deallocate ignores;
// NoLock is a stateless handle to one process-wide heap, so clones and moves
// deallocate each other's blocks.
unsafe impl allocator_api2::alloc::Allocator for NoLock {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            // SAFETY: an aligned, non-null dangling pointer is a valid
            // zero-length block.
            let dangling = unsafe { NonNull::new_unchecked(layout.align() as *mut u8) };
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let p = NonNull::new(nolock_alloc(layout)).ok_or(allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: per Allocator's contract, `ptr` came from `allocate` with
        // `layout`.
        unsafe { GlobalAlloc::dealloc(self, ptr.as_ptr(), layout) };
    }

    /// In place when the block has room (a `Vec` that grows in a handler
    /// often does: blocks are rounded up to their size class).
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: per Allocator's contract, `ptr` is a live block of this
        // allocator allocated with `old`, and `new` is not smaller.
        unsafe { self.resize(ptr, old, new, false) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: as for `grow`.
        unsafe { self.resize(ptr, old, new, true) }
    }

    /// In place when the block stays more than half used; otherwise moved
    /// to a smaller block, or kept when there is none in this context: a
    /// shrink (`Vec::shrink_to_fit` in a handler) never fails for want of
    /// memory, with one exception. A shrink to a larger alignment than
    /// the block's address has (`new.align()` does not divide it) must
    /// move the block, and fails (`Err`, the block untouched) when this
    /// context has no free block for `new`. A larger alignment that the
    /// address already has is no exception: the block is kept as above.
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: per Allocator's contract, `ptr` is a live block of this
        // allocator allocated with `old`, and `new` is not larger.
        unsafe { self.resize(ptr, old, new, false) }
    }
}

impl NoLock {
    /// `grow`, `grow_zeroed` and `shrink`: zero-sized blocks (dangling
    /// pointers) are allocated or freed, anything else goes to
    /// [`nolock_resize`].
    ///
    /// # Safety
    /// `ptr` is a live block of this allocator allocated with `old`.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zero: bool,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        use allocator_api2::alloc::{AllocError, Allocator};
        if old.size() == 0 {
            return if zero {
                self.allocate_zeroed(new)
            } else {
                self.allocate(new)
            };
        }
        if new.size() == 0 {
            // SAFETY: forwarded contract.
            unsafe { self.deallocate(ptr, old) };
            return self.allocate(new);
        }
        // SAFETY: forwarded contract; both sizes are non-zero.
        let p = unsafe { nolock_resize(ptr, old, new, zero) }.ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}

/// While the returned guard lives, every allocation and free on this thread,
/// through [`Global`] too, takes the nolock path: it never waits and makes
/// no blocking system call (and may fail). For real-time code. By default
/// the nolock path may still make a non-blocking `FUTEX_WAKE` (waking the
/// maintenance thread or a waiter for a lock it held); with
/// `ANYALLOC_NOLOCK_SYSCALLS=0` ([`Config::nolock_syscalls`]) it makes none.
///
/// In debug builds (or with the `debug-checks` feature), calling a normal-path function of the allocator directly
/// (`Heap::alloc`, `PageAllocator::alloc_pages`, ...) inside the scope aborts
/// with a message naming it.
///
/// ```
/// let _rt = anyalloc::nolock_scope();
/// // ... real-time work: allocations here never block ...
/// ```
pub fn nolock_scope() -> NoLockScope {
    context::scope_enter();
    NoLockScope {
        _not_send: core::marker::PhantomData,
    }
}

/// The guard of [`nolock_scope`]; ends the scope when dropped. Not `Send`:
/// the scope belongs to the thread that opened it.
#[must_use = "the scope ends as soon as the guard is dropped"]
#[derive(Debug)]
pub struct NoLockScope {
    _not_send: core::marker::PhantomData<*const ()>,
}

impl Drop for NoLockScope {
    fn drop(&mut self) {
        context::scope_leave();
    }
}

/// Whether this thread is inside a [`nolock_scope`].
///
/// ```
/// assert!(!anyalloc::in_nolock_scope());
/// {
///     let _rt = anyalloc::nolock_scope();
///     assert!(anyalloc::in_nolock_scope());
/// }
/// assert!(!anyalloc::in_nolock_scope());
/// ```
pub fn in_nolock_scope() -> bool {
    context::in_scope()
}

#[cfg(test)]
mod tests {
    use super::{first_zone_size, parse_digits, parse_flag_bytes, parse_size_bytes as parse_size};
    use super::{stays_in_place, Global, NoLock, GLOBAL_HEAP, INITIALIZING, READY};
    use core::alloc::{GlobalAlloc, Layout};
    use core::ptr::NonNull;
    use core::sync::atomic::Ordering;

    /// Held by each test that opens the creation window (the state set
    /// back to `INITIALIZING` with the core published): two such windows
    /// at once would close each other.
    static WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Between publishing the global heap's core and storing `READY`, its
    /// creator's signal handler, or another thread, finds the core and
    /// `Global::alloc` serves it. `Global::realloc` of such a block used to
    /// look for the heap by its state instead, and returned null (the
    /// caller's `Vec` aborted) for a live block with memory to spare. (No
    /// other test of this binary uses the global heap.)
    #[test]
    fn realloc_of_a_block_served_before_ready_succeeds() {
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        crate::init().unwrap();
        let l = Layout::from_size_align(100, 8).unwrap();
        // The window: the core published, the state not yet `READY`.
        GLOBAL_HEAP.state.store(INITIALIZING, Ordering::Release);
        // SAFETY: a valid, non-zero layout; the blocks are freed below.
        let (p, q) = unsafe {
            let p = Global.alloc(l);
            if !p.is_null() {
                p.write_bytes(0x5a, 100);
            }
            (p, Global.realloc(p, l, 10_000))
        };
        GLOBAL_HEAP.state.store(READY, Ordering::Release);
        assert!(!p.is_null(), "the core serves the allocation");
        assert!(!q.is_null(), "realloc of a live block failed");
        // SAFETY: `q` is live with 10_000 bytes, its first 100 copied.
        unsafe {
            assert!((0..100).all(|i| *q.add(i) == 0x5a));
            Global.dealloc(q, Layout::from_size_align(10_000, 8).unwrap());
        }
    }

    /// The same window for `NoLock`: a block `Global` served there (to the
    /// creator's signal handler, or another thread) and handed to
    /// `NoLock` in the window is freed and resized like any other. Its
    /// free used to look for the heap by its state and silently did
    /// nothing (the block leaked: `large_in_use` stayed up), and its
    /// resizes failed for a live block with memory to spare.
    #[test]
    fn nolock_frees_and_resizes_a_block_served_before_ready() {
        use allocator_api2::alloc::Allocator;
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        let heap = crate::init().unwrap();
        // Large blocks: `large_in_use` counts them exactly.
        let l = Layout::from_size_align(100_000, 8).unwrap();
        let big = Layout::from_size_align(300_000, 8).unwrap();
        let base = heap.stats().large_in_use;
        GLOBAL_HEAP.state.store(INITIALIZING, Ordering::Release);
        // SAFETY: valid, non-zero layouts; each block is freed once, with
        // the layout it has at that point (a failed resize leaves it as it
        // was).
        let (served, freed, grown, reallocated) = unsafe {
            let a = Global.alloc(l);
            let b = Global.alloc(l);
            let c = Global.alloc(l);
            let served = !a.is_null() && !b.is_null() && !c.is_null();
            GlobalAlloc::dealloc(&NoLock, a, l);
            let freed = heap.stats().large_in_use == base + 2;
            let grown = NoLock.grow(NonNull::new(b).unwrap(), l, big);
            let b_layout = if grown.is_ok() { big } else { l };
            let b = grown.map_or(b, |q| q.cast::<u8>().as_ptr());
            let r = GlobalAlloc::realloc(&NoLock, c, l, big.size());
            let reallocated = !r.is_null();
            NoLock.deallocate(NonNull::new(b).unwrap(), b_layout);
            let (c, c_layout) = if reallocated { (r, big) } else { (c, l) };
            NoLock.deallocate(NonNull::new(c).unwrap(), c_layout);
            (served, freed, b_layout == big, reallocated)
        };
        GLOBAL_HEAP.state.store(READY, Ordering::Release);
        assert!(served, "the core serves the allocations");
        assert!(freed, "NoLock's dealloc of a live block did nothing");
        assert!(grown, "NoLock::grow of a live block failed");
        assert!(reallocated, "NoLock's realloc of a live block failed");
        assert_eq!(heap.stats().large_in_use, base, "blocks leaked");
    }

    /// And `Global::alloc_zeroed` there: `alloc` is served by the core, so
    /// `alloc_zeroed` must be too. It looked for the heap by its state, and
    /// a call that may not wait (a handler that interrupted the creation,
    /// here a nolock scope) got null: `vec![0; n]` aborted where
    /// `Vec::with_capacity(n)` was served.
    #[test]
    fn alloc_zeroed_is_served_before_ready_as_alloc_is() {
        let _window = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
        crate::init().unwrap();
        let l = Layout::from_size_align(3000, 8).unwrap();
        GLOBAL_HEAP.state.store(INITIALIZING, Ordering::Release);
        let scope = crate::nolock_scope();
        // SAFETY: a valid, non-zero layout; the blocks are freed below.
        let (p, z) = unsafe { (Global.alloc(l), Global.alloc_zeroed(l)) };
        drop(scope);
        GLOBAL_HEAP.state.store(READY, Ordering::Release);
        assert!(!p.is_null(), "the core serves alloc");
        assert!(!z.is_null(), "alloc_zeroed failed where alloc was served");
        // SAFETY: `z` is live with 3000 bytes; both blocks freed once.
        unsafe {
            assert!((0..3000).all(|i| *z.add(i) == 0));
            Global.dealloc(p, l);
            Global.dealloc(z, l);
        }
    }

    /// `realloc` (`Global`'s and `NoLock`'s) keeps a block only if it holds
    /// the new size: one byte more than its usable size must move it (kept,
    /// the caller would write past its end), and a block at most half used
    /// moves too.
    #[test]
    fn a_resize_stays_in_place_only_within_the_usable_size() {
        for usable in [8, 64, 4096, 1 << 20] {
            assert!(stays_in_place(usable, usable));
            assert!(!stays_in_place(usable + 1, usable), "grown past {usable}");
            assert!(stays_in_place(usable / 2 + 1, usable));
            assert!(!stays_in_place(usable / 2, usable), "half of {usable}");
        }
    }

    #[test]
    fn the_default_first_zone_leaves_room_under_a_limit() {
        const MIB: usize = 1 << 20;
        assert_eq!(first_zone_size(None), 256 * MIB);
        assert_eq!(first_zone_size(Some(64 << 30)), 256 * MIB);
        // A quarter of the room, in whole 4 MiB blocks.
        assert_eq!(first_zone_size(Some(300 * MIB)), 72 * MIB);
        assert_eq!(first_zone_size(Some(190 * MIB)), 44 * MIB);
        // At least 4 MiB (the fallback then halves no further).
        assert_eq!(first_zone_size(Some(MIB)), 4 * MIB);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"4096b"), Some(4096));
        assert_eq!(parse_size(b"64k"), Some(64 << 10));
        assert_eq!(parse_size(b"256M"), Some(256 << 20));
        assert_eq!(parse_size(b"256mb"), Some(256 << 20));
        assert_eq!(parse_size(b"256MiB"), Some(256 << 20));
        assert_eq!(parse_size(b"2g"), Some(2 << 30));
        assert_eq!(parse_size(b"1T"), Some(1 << 40));
        assert_eq!(parse_size(b""), None);
        assert_eq!(parse_size(b"x"), None);
        assert_eq!(parse_size(b"12q"), None);
        assert_eq!(parse_size(b"99999999999999999999999"), None);
        assert_eq!(parse_size(b"99999999999999G"), None);
    }

    /// Trailing text, signs, spaces and fractions are refused, not cut off.
    #[test]
    fn sizes_with_junk_are_refused() {
        for junk in [
            &b"64Mfoo"[..],
            b"64mm",
            b"64 M",
            b" 64M",
            b"64M ",
            b"+64M",
            b"-1",
            b"1.5G",
            b"64Mib ",
            b"64ib",
            b"64bb",
            b"0x100",
            b"M",
        ] {
            assert_eq!(parse_size(junk), None, "{:?}", core::str::from_utf8(junk));
        }
    }

    #[test]
    fn counts_and_switches() {
        assert_eq!(parse_digits(b"4"), Some(4));
        assert_eq!(parse_digits(b"4k"), None);
        assert_eq!(parse_digits(b""), None);
        assert_eq!(parse_flag_bytes(b"0"), Some(false));
        assert_eq!(parse_flag_bytes(b"1"), Some(true));
        assert_eq!(parse_flag_bytes(b"OFF"), Some(false));
        assert_eq!(parse_flag_bytes(b"yes"), Some(true));
        assert_eq!(parse_flag_bytes(b"0x"), None);
        assert_eq!(parse_flag_bytes(b"nope"), None);
    }
}
