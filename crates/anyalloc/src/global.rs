//! The process-wide heap: the drop-in [`Global`] allocator, the explicit
//! [`NoLock`] allocator, and [`nolock_scope`].
//!
//! # Routing
//!
//! Every thread has one const-initialised thread-local word without a
//! destructor (plain TLS: no lazy initialisation, nothing registered at
//! thread exit, safe in a signal handler), holding two counters:
//!
//! * `DEPTH`: how many `Global` calls of this thread are in progress. A call
//!   that finds it non-zero interrupted its own thread inside the allocator
//!   (a signal handler) and takes the nolock path.
//! * `SCOPE`: how many [`nolock_scope`] guards are alive on this thread;
//!   while non-zero every `Global` call takes the nolock path.
//!
//! # Initialisation
//!
//! The heap is created on first use by an atomic state machine
//! (`UNINIT -> INITIALIZING -> READY`, or `FAILED`). Whoever wins the CAS
//! creates it, reading its configuration with `getenv` (no allocation):
//!
//! | variable          | meaning                                     | default |
//! |-------------------|---------------------------------------------|---------|
//! | `ANYALLOC_MEMORY` | first zone size, bytes; suffixes k, m, g    | 256m    |
//! | `ANYALLOC_CPUS`   | CPU slot sets                               | all CPUs |
//! | `ANYALLOC_GROW`   | `0` makes `ANYALLOC_MEMORY` a hard cap      | 1       |
//! | `ANYALLOC_MAINTENANCE` | `0`: no maintenance thread             | 1       |
//!
//! A nolock caller that finds another context initialising gets null; a
//! normal caller waits. Creating the heap makes a few `mmap` calls: call
//! [`init`] early if even the first nolock allocation must not make them.
//!
//! # Fork
//!
//! `pthread_atfork` handlers take every lock that can be waited on before
//! `fork` and release them in parent and child, so the child never inherits
//! a lock held by a thread that does not exist there.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::{Cell, UnsafeCell};
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{compiler_fence, AtomicU8, Ordering};

use crate::config::{Config, Error};
use crate::slab::Heap;

std::thread_local! {
    /// `DEPTH` in the low 16 bits, `SCOPE` in the high 16: one load
    /// decides the route.
    static ROUTE: Cell<u32> = const { Cell::new(0) };
}

/// One level of `DEPTH` / of `SCOPE` in `ROUTE`. Depth is bounded by signal
/// nesting (a handful); scopes by program structure (nesting 65,535 deep
/// would overflow into nothing worse than a wrong route).
const DEPTH_ONE: u32 = 1;
const SCOPE_ONE: u32 = 1 << 16;

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

/// The process-wide heap, creating it if needed (normal context: waits for
/// a concurrent initialisation). Errors when the configuration from the
/// environment is invalid or the OS refuses memory.
pub fn init() -> Result<&'static Heap, Error> {
    heap(false).ok_or(Error::Reserve {
        bytes: env_config().memory_bytes(),
    })
}

/// The process-wide heap if it exists already (for its statistics, say).
#[inline(always)]
pub fn global_heap() -> Option<&'static Heap> {
    if GLOBAL_HEAP.state.load(Ordering::Acquire) == READY {
        // SAFETY: READY is stored (Release) after the heap was written.
        Some(unsafe { (*GLOBAL_HEAP.heap.get()).assume_init_ref() })
    } else {
        None
    }
}

/// Setup that only a normal context may do, owed since the heap was
/// created: registering the fork handlers (`pthread_atfork` allocates with
/// libc's `malloc`) and starting the maintenance thread (spawning allocates).
/// The creator sets these bits; if it was a nolock caller (a first
/// allocation from a signal handler, say), the next normal-path call does
/// the setup instead.
static PENDING: AtomicU8 = AtomicU8::new(0);
const PENDING_ATFORK: u8 = 1;
const PENDING_MAINTAINER: u8 = 2;

#[inline]
fn heap(nolock: bool) -> Option<&'static Heap> {
    match global_heap() {
        Some(h) => {
            if !nolock && PENDING.load(Ordering::Relaxed) != 0 {
                run_pending_setup(h, true);
            }
            Some(h)
        }
        None => init_slow(nolock, true),
    }
}

/// Normal context: does the owed setup (the maintainer only if `maintainer`).
#[cold]
fn run_pending_setup(h: &Heap, maintainer: bool) {
    let mask = if maintainer {
        PENDING_ATFORK | PENDING_MAINTAINER
    } else {
        PENDING_ATFORK
    };
    let owed = PENDING.fetch_and(!mask, Ordering::AcqRel) & mask;
    if owed & PENDING_ATFORK != 0 {
        register_atfork();
    }
    if owed & PENDING_MAINTAINER != 0 {
        h.start_maintenance();
    }
}

/// The process-wide heap, created if needed like [`init`] but without
/// starting the maintenance thread: for a C `malloc` built on this heap
/// (`crates/anyalloc-c`), whose first call runs inside the dynamic loader,
/// where spawning a thread (which calls `malloc`) is not safe. With
/// `nolock`, an initialisation in progress elsewhere gives `None` at once
/// instead of a wait. The caller may start the maintainer later with
/// [`Heap::start_maintenance`]. A normal call (`nolock` false) also does
/// the owed setup other than the maintainer (the fork handlers), if a nolock
/// caller created the heap.
#[doc(hidden)]
pub fn init_without_maintainer(nolock: bool) -> Option<&'static Heap> {
    match global_heap() {
        Some(h) => {
            if !nolock && PENDING.load(Ordering::Relaxed) != 0 {
                run_pending_setup(h, false);
            }
            Some(h)
        }
        None => init_slow(nolock, false),
    }
}

#[cold]
fn init_slow(nolock: bool, maintainer: bool) -> Option<&'static Heap> {
    loop {
        match GLOBAL_HEAP.state.compare_exchange(
            UNINIT,
            INITIALIZING,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // The maintainer starts only after READY: spawning a thread
                // allocates, and until READY such allocations would fail.
                // Both it and the fork handlers are normal-context setup,
                // left to a normal call if a nolock caller gets here.
                let built = Heap::new_without_maintainer(env_config());
                return match built {
                    Ok(h) => {
                        // SAFETY: we won the CAS: no other context reads or
                        // writes the cell until READY is published.
                        unsafe { (*GLOBAL_HEAP.heap.get()).write(h) };
                        let mut owed = PENDING_ATFORK;
                        if maintainer && env_size(c"ANYALLOC_MAINTENANCE") != Some(0) {
                            owed |= PENDING_MAINTAINER;
                        }
                        // Owed before READY, so no normal call can miss it.
                        PENDING.fetch_or(owed, Ordering::Release);
                        GLOBAL_HEAP.state.store(READY, Ordering::Release);
                        let heap = global_heap();
                        if let (false, Some(h)) = (nolock, heap) {
                            run_pending_setup(h, maintainer);
                        }
                        heap
                    }
                    Err(_) => {
                        GLOBAL_HEAP.state.store(FAILED, Ordering::Release);
                        crate::platform::write_stderr(
                            b"anyalloc: could not create the global heap (check ANYALLOC_MEMORY)\n",
                        );
                        None
                    }
                };
            }
            Err(READY) => return global_heap(),
            Err(FAILED) => return None,
            Err(_) if nolock => return None, // initialising elsewhere: never wait
            Err(_) => std::thread::yield_now(),
        }
    }
}

/// Reads the heap's configuration from the environment without allocating.
fn env_config() -> Config {
    let mut c = Config::default().memory(256 << 20);
    if let Some(v) = env_size(c"ANYALLOC_MEMORY") {
        c = c.memory(v);
    }
    if let Some(v) = env_size(c"ANYALLOC_CPUS") {
        c = c.cpus(v);
    }
    if let Some(v) = env_size(c"ANYALLOC_GROW") {
        c = c.grow(v != 0);
    }
    if c.validate().is_err() {
        crate::platform::write_stderr(
            b"anyalloc: ignoring invalid ANYALLOC_* settings, using defaults\n",
        );
        return Config::default().memory(256 << 20);
    }
    c
}

/// A number with an optional k/m/g suffix from the environment.
fn env_size(name: &core::ffi::CStr) -> Option<usize> {
    // SAFETY: `name` is NUL-terminated; getenv returns null or a pointer to
    // a NUL-terminated string owned by the environment.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null result of getenv: a valid C string.
    let bytes = unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes();
    parse_size(bytes)
}

fn parse_size(bytes: &[u8]) -> Option<usize> {
    let (digits, suffix) = match bytes.iter().position(|b| !b.is_ascii_digit()) {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &[][..]),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: usize = 0;
    for &d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as usize)?;
    }
    let shift = match suffix {
        [] | [b'b' | b'B'] => 0,
        [b'k' | b'K', ..] => 10,
        [b'm' | b'M', ..] => 20,
        [b'g' | b'G', ..] => 30,
        _ => return None,
    };
    n.checked_mul(1usize << shift)
}

fn register_atfork() {
    extern "C" fn prepare() {
        if let Some(h) = global_heap() {
            h.lock_all();
        }
    }
    extern "C" fn release() {
        if let Some(h) = global_heap() {
            // SAFETY: `prepare` took every lock before fork; this runs once
            // after it, in the parent or in the child.
            unsafe { h.unlock_all() };
        }
    }
    // SAFETY: the handlers are `extern "C"` functions that live forever.
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(release), Some(release));
    }
}

// ----- routing ---------------------------------------------------------------

/// Whether this call must take the nolock path: it interrupted its own
/// thread inside the allocator, or runs inside a nolock scope.
#[inline(always)]
fn must_nolock() -> bool {
    ROUTE.get() != 0
}

/// Runs `f` with this thread marked as inside the allocator.
#[inline(always)]
fn inside<R>(f: impl FnOnce() -> R) -> R {
    let d = ROUTE.get();
    ROUTE.set(d + DEPTH_ONE);
    // A handler that runs after this point must see the mark.
    compiler_fence(Ordering::SeqCst);
    let r = f();
    compiler_fence(Ordering::SeqCst);
    ROUTE.set(d);
    r
}

/// Debug builds (and `debug-checks`): a normal-path function called in a
/// nolock scope aborts.
#[cfg(any(debug_assertions, feature = "debug-checks"))]
pub(crate) fn check_might_wait(function: &'static str) {
    if ROUTE.get() >= SCOPE_ONE {
        crate::platform::write_stderr(b"anyalloc: ");
        crate::platform::write_stderr(function.as_bytes());
        crate::platform::write_stderr(
            b" may wait for a lock, but was called inside a nolock scope\n",
        );
        // SAFETY: abort has no preconditions.
        unsafe { libc::abort() }
    }
}

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
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if must_nolock() {
            return nolock_alloc(layout);
        }
        inside(|| match heap(false) {
            Some(h) => h
                .alloc(layout)
                .map_or(core::ptr::null_mut(), |p| p.as_ptr()),
            None => core::ptr::null_mut(),
        })
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let Some(p) = NonNull::new(ptr) else { return };
        // Only a ready heap can have handed out `ptr`.
        let Some(h) = global_heap() else { return };
        if must_nolock() {
            // SAFETY: per GlobalAlloc's contract, `ptr` came from this heap.
            return unsafe { h.free_nolock(p) };
        }
        // SAFETY: as above.
        inside(|| unsafe { h.free(p) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if must_nolock() {
            let p = nolock_alloc(layout);
            if !p.is_null() {
                // SAFETY: a fresh allocation of `layout.size()` bytes.
                unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
            }
            return p;
        }
        inside(|| match heap(false) {
            Some(h) => h
                .alloc_zeroed(layout)
                .map_or(core::ptr::null_mut(), |p| p.as_ptr()),
            None => core::ptr::null_mut(),
        })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(p) = NonNull::new(ptr) else {
            return core::ptr::null_mut();
        };
        let Some(h) = global_heap() else {
            return core::ptr::null_mut();
        };
        // In place when the block is big enough and not wastefully so.
        let usable = h.usable_size(p);
        if new_size <= usable && new_size > usable / 2 {
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
        }
        q
    }
}

#[inline]
fn nolock_alloc(layout: Layout) -> *mut u8 {
    match heap(true) {
        Some(h) => h
            .alloc_nolock(layout)
            .map_or(core::ptr::null_mut(), |p| p.as_ptr()),
        None => core::ptr::null_mut(),
    }
}

/// An allocator that only ever takes the nolock paths of the process-wide
/// heap: for explicit allocation from any context.
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

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        if let (Some(p), Some(h)) = (NonNull::new(ptr), global_heap()) {
            // SAFETY: per GlobalAlloc's contract, `ptr` came from this heap.
            unsafe { h.free_nolock(p) };
        }
    }
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
        if let Some(h) = global_heap() {
            // SAFETY: per Allocator's contract, `ptr` came from `allocate`.
            unsafe { h.free_nolock(ptr) };
        }
    }
}

/// While the returned guard lives, every allocation and free on this thread,
/// through [`Global`] too, takes the nolock path: it never waits and never
/// makes a syscall (and may fail). For real-time code.
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
    ROUTE.set(ROUTE.get() + SCOPE_ONE);
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
        ROUTE.set(ROUTE.get() - SCOPE_ONE);
    }
}

/// Whether this thread is inside a [`nolock_scope`].
pub fn in_nolock_scope() -> bool {
    ROUTE.get() >= SCOPE_ONE
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"64k"), Some(64 << 10));
        assert_eq!(parse_size(b"256M"), Some(256 << 20));
        assert_eq!(parse_size(b"2g"), Some(2 << 30));
        assert_eq!(parse_size(b""), None);
        assert_eq!(parse_size(b"x"), None);
        assert_eq!(parse_size(b"12q"), None);
        assert_eq!(parse_size(b"99999999999999999999999"), None);
    }
}
