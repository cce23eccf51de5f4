//! `libanyalloc.so`: a signal-safe `malloc` for C and C++ programs.
//!
//! Exports the C allocation functions (`malloc`, `free`, `calloc`,
//! `realloc`, `reallocarray`, `posix_memalign`, `aligned_alloc`, `memalign`,
//! `valloc`, `pvalloc`, `malloc_usable_size`, C23's `free_sized` and
//! `free_aligned_sized`, glibc's `__libc_*` names, the compat `cfree`) and
//! glibc's malloc control and statistics interface (`malloc_trim`,
//! `mallinfo2`, `mallinfo`, `malloc_stats`, `malloc_info`, `mallopt`) over
//! the process-wide [`anyalloc`] heap, plus the explicit any-context calls of
//! `include/anyalloc.h`. Link it, or load it with `LD_PRELOAD`; see the
//! crate's README for semantics and limits.
//!
//! # Routing
//!
//! As in `anyalloc::Global`: a call inside an `anyalloc_nolock_enter` scope,
//! or one that finds its own thread inside a section this library marks
//! (the heap's creation, `malloc_trim`, `realloc`'s `mremap`), takes the
//! nolock path, which never waits and may fail (`NULL`,
//! `errno = ENOMEM`). Every other call takes the heap's normal path,
//! unmarked: the heap marks the thread itself before it takes any lock
//! another context may wait for, and its slow paths route a thread so
//! marked (a signal handler that interrupted it there) to the nolock path;
//! its restartable fast path is safe in any context. The two per-thread
//! words live in initial-exec TLS (see [`tls`]): reading them never calls
//! into the dynamic loader.
//!
//! # Initialisation
//!
//! The heap is created by the first call, usually from inside the dynamic
//! loader or libc's start-up: a few `mmap`s, `getenv` and
//! `sched_getaffinity`, nothing that allocates. The call that creates it is
//! marked as inside the allocator, so anything underneath that called
//! `malloc` again would take the nolock path and get `NULL` (the heap is not
//! ready yet) instead of recursing or waiting for itself.
//!
//! The maintenance thread is **not** started at initialisation (spawning a
//! thread from inside the loader's first `malloc` calls `malloc` and
//! `pthread_create` before libc is initialised). It is off by default; with
//! `ANYALLOC_MAINTENANCE=1` the library's constructor starts it: a normal
//! context, after libc's own initialisation, before `main`. Without it, the
//! program's own `malloc`/`free` calls give idle memory back to the OS (the
//! core's inline decay, `Config::decay`; `ANYALLOC_DECAY=0` turns it off).

#![deny(unsafe_op_in_unsafe_fn)]

mod info;
mod line;
mod tls;

use core::alloc::Layout;
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
#[cfg(feature = "debug-checks")]
use core::sync::atomic::AtomicBool;
use core::sync::atomic::{compiler_fence, AtomicPtr, AtomicU8, Ordering};

use anyalloc::Heap;
use line::Line;
use tls::ThreadState;

/// The alignment C gives every `malloc` result: `alignof(max_align_t)`.
const MAX_ALIGN: usize = 16;
/// The page size `valloc` and `pvalloc` align to.
const PAGE: usize = 4096;
/// Blocks above this many bytes are `mmap`ed (huge): `realloc` moves them
/// with `mremap`.
const HUGE_ABOVE: usize = anyalloc::PAGE_SIZE << anyalloc::MAX_ORDER;

/// Work the normal path owes, checked with one load per call: bits below.
static SLOW: AtomicU8 = AtomicU8::new(0);
/// `mallopt(M_PERTURB, v)` with `v != 0`: allocations (but not
/// `calloc`) are filled with `!PERTURB`, freed blocks with `PERTURB`.
const SLOW_PERTURB: u8 = 1;
/// A forked child whose parent ran the maintenance thread: the first
/// normal-path call starts a new one.
const SLOW_RESTART: u8 = 2;
/// The `M_PERTURB` byte.
static PERTURB: AtomicU8 = AtomicU8::new(0);
/// A shrinking `realloc` found no smaller block and kept one in place, so
/// a block's usable size may now exceed twice its size: `check_size` no
/// longer bounds it from above.
#[cfg(feature = "debug-checks")]
static KEPT_IN_PLACE: AtomicBool = AtomicBool::new(false);

// ----- plumbing ----------------------------------------------------------------

#[inline(always)]
fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = e };
}

#[inline(always)]
fn errno() -> c_int {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

/// The alignment a `malloc(size)` result needs: every object of at most
/// `size` bytes fits. A type aligned to 16 is at least 16 bytes long, so
/// requests below 16 bytes need 8.
#[inline(always)]
fn malloc_align(size: usize) -> usize {
    if size < MAX_ALIGN {
        8
    } else {
        MAX_ALIGN
    }
}

/// The layout a sized free names for a block of `size` bytes asked with
/// alignment `align` (1 for `malloc`), as the allocation computed it, when
/// the size alone names the block's size class: a size that is a multiple
/// of the alignment, as every Rust layout's is (`Heap::free_sized`). `None`:
/// the layout-blind free, which is faster for the other sizes.
#[inline(always)]
fn sized_layout(size: usize, align: usize) -> Option<Layout> {
    let l = layout(size, align.max(malloc_align(size)))?;
    l.size().is_multiple_of(l.align()).then_some(l)
}

/// The layout of a C request: at least one byte (so `malloc(0)` returns a
/// unique pointer), `None` when no block that large can exist.
#[inline(always)]
fn layout(size: usize, align: usize) -> Option<Layout> {
    Layout::from_size_align(size.max(1), align).ok()
}

#[inline(always)]
fn must_nolock(t: &ThreadState) -> bool {
    t.depth.load(Ordering::Relaxed) != 0 || t.scope.load(Ordering::Relaxed) != 0
}

/// Runs `f` with this thread marked as inside the allocator.
#[inline(always)]
fn inside<R>(t: &ThreadState, f: impl FnOnce() -> R) -> R {
    let d = t.depth.load(Ordering::Relaxed);
    t.depth.store(d + 1, Ordering::Relaxed);
    // A signal handler that runs after this point must see the mark.
    compiler_fence(Ordering::SeqCst);
    let r = f();
    compiler_fence(Ordering::SeqCst);
    t.depth.store(d, Ordering::Relaxed);
    r
}

/// The heap for a nolock call: never waits for an initialisation elsewhere.
#[inline(always)]
fn nolock_heap() -> Option<&'static Heap> {
    match anyalloc::global_heap() {
        Some(h) => Some(h),
        None => anyalloc::init_without_maintainer(true),
    }
}

#[inline(always)]
fn out(p: Option<NonNull<u8>>) -> *mut c_void {
    p.map_or(ptr::null_mut(), |p| p.as_ptr().cast())
}

/// Allocates through the routing; null on failure (errno untouched).
#[inline(always)]
fn alloc_routed(layout: Layout, zeroed: bool) -> *mut c_void {
    let t = tls::state();
    if must_nolock(t) || SLOW.load(Ordering::Relaxed) != 0 {
        return alloc_slow(t, layout, zeroed);
    }
    alloc_normal(t, layout, zeroed)
}

#[inline(always)]
fn alloc_normal(t: &ThreadState, layout: Layout, zeroed: bool) -> *mut c_void {
    // Not marked: the heap marks the thread itself before it takes a lock
    // another context may wait for, so a handler that interrupts this call
    // elsewhere (its restartable fast path, or between locks) may take the
    // normal path too (see "Routing" in the README).
    match anyalloc::global_heap() {
        Some(h) => alloc_in(h, layout, zeroed),
        None => alloc_creating(t, layout, zeroed),
    }
}

#[inline(always)]
fn alloc_in(h: &Heap, layout: Layout, zeroed: bool) -> *mut c_void {
    if zeroed {
        out(h.alloc_zeroed(layout))
    } else {
        out(h.alloc(layout))
    }
}

/// `alloc_normal` before the heap exists: creates it (waiting for a
/// creation in progress on another thread), marked as inside the
/// allocator, so that anything underneath that called `malloc` would take
/// the nolock path (and get `NULL`) instead of recursing or waiting for
/// itself.
#[cold]
#[inline(never)]
fn alloc_creating(t: &ThreadState, layout: Layout, zeroed: bool) -> *mut c_void {
    inside(t, || match anyalloc::init_without_maintainer(false) {
        Some(h) => alloc_in(h, layout, zeroed),
        None => ptr::null_mut(),
    })
}

/// The nolock route, and the normal route with owed work (a maintainer to
/// restart, `M_PERTURB` filling).
#[cold]
fn alloc_slow(t: &ThreadState, layout: Layout, zeroed: bool) -> *mut c_void {
    let p = if must_nolock(t) {
        alloc_nolock(layout, zeroed)
    } else {
        restart_maintainer_if_owed();
        alloc_normal(t, layout, zeroed)
    };
    if !zeroed && !p.is_null() && SLOW.load(Ordering::Relaxed) & SLOW_PERTURB != 0 {
        // SAFETY: a fresh block of at least `layout.size()` bytes.
        unsafe {
            ptr::write_bytes(
                p.cast::<u8>(),
                !PERTURB.load(Ordering::Relaxed),
                layout.size(),
            )
        };
    }
    p
}

/// In a forked child whose parent ran the maintenance thread: starts a new
/// one (normal context, outside the allocator: spawning allocates).
fn restart_maintainer_if_owed() {
    if SLOW.load(Ordering::Relaxed) & SLOW_RESTART != 0
        && SLOW.fetch_and(!SLOW_RESTART, Ordering::AcqRel) & SLOW_RESTART != 0
    {
        if let Some(h) = anyalloc::global_heap() {
            h.start_maintenance();
        }
    }
}

#[inline]
fn alloc_nolock(layout: Layout, zeroed: bool) -> *mut c_void {
    let Some(p) = nolock_heap().and_then(|h| h.alloc_nolock(layout)) else {
        return ptr::null_mut();
    };
    if zeroed {
        // SAFETY: a fresh block of at least `layout.size()` bytes.
        unsafe { ptr::write_bytes(p.as_ptr(), 0, layout.size()) };
    }
    p.as_ptr().cast()
}

/// `alloc_routed` with C's error reporting.
#[inline(always)]
fn alloc_or_enomem(layout: Option<Layout>, zeroed: bool) -> *mut c_void {
    let p = match layout {
        Some(l) => alloc_routed(l, zeroed),
        None => ptr::null_mut(),
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// The heap that handed out `p`; aborts when no heap exists yet (then
/// nobody did).
#[inline(always)]
fn owner(p: NonNull<u8>, what: &str) -> &'static Heap {
    match anyalloc::global_heap() {
        Some(h) => h,
        None => not_ours(p.as_ptr() as usize, what),
    }
}

/// Frees through the routing; errno is preserved (POSIX.1-2024: a
/// handler's `free` must not clobber the interrupted code's errno, and
/// futex waits or `munmap` may set it).
///
/// # Safety
/// `p` came from this library's allocation functions and is not used again.
#[inline(always)]
unsafe fn free_routed(p: NonNull<u8>, what: &str) {
    // SAFETY: forwarded contract.
    unsafe { free_routed_sized(p, None, what) }
}

/// `free_routed`, told the layout the block was allocated with when the
/// caller knows it (`free_sized`): the heap's sized free, which needs no
/// page lookup to name the class (the page's owner still decides, so a
/// wrong size costs speed, never a check).
///
/// # Safety
/// As for `free_routed`.
#[inline(always)]
unsafe fn free_routed_sized(p: NonNull<u8>, sized: Option<Layout>, what: &str) {
    let h = owner(p, what);
    let t = tls::state();
    // Read and written through the raw pointer: the system calls under
    // `free` write the same word.
    let errno = t.errno_location();
    // SAFETY: this thread's errno, always valid.
    let saved = unsafe { errno.read() };
    if must_nolock(t) || SLOW.load(Ordering::Relaxed) != 0 {
        // SAFETY: forwarded contract.
        unsafe { free_slow(t, h, p, what) };
    } else {
        // Not marked, as in `alloc_normal`.
        // SAFETY: forwarded contract (the heap aborts on foreign pointers).
        unsafe {
            match sized {
                Some(l) => h.free_sized(p, l),
                None => h.free(p),
            }
        }
    }
    // SAFETY: as above.
    unsafe { errno.write(saved) };
}

/// `free_routed`'s nolock route, and its normal route with owed work.
///
/// # Safety
/// As for `free_routed`.
#[cold]
unsafe fn free_slow(t: &ThreadState, h: &Heap, p: NonNull<u8>, what: &str) {
    if SLOW.load(Ordering::Relaxed) & SLOW_PERTURB != 0 {
        let n = h.usable_size_for(p, what);
        // SAFETY: a live block of `n` usable bytes, no longer used.
        unsafe { ptr::write_bytes(p.as_ptr(), PERTURB.load(Ordering::Relaxed), n) };
    }
    if must_nolock(t) {
        // SAFETY: forwarded contract.
        unsafe { h.free_nolock(p) };
        return;
    }
    restart_maintainer_if_owed();
    // SAFETY: forwarded contract.
    inside(t, || unsafe { h.free(p) });
}

/// One line on stderr, then abort: for pointers passed to us before we
/// handed out anything.
#[cold]
fn not_ours(addr: usize, what: &str) -> ! {
    let mut l = Line::new();
    l.text("anyalloc: ").text(what).text(" of ").hex(addr);
    l.text(", which anyalloc did not hand out (no heap yet)\n");
    fatal(l.bytes())
}

#[cold]
fn fatal(msg: &[u8]) -> ! {
    // Not libc's `write`: a cancellation point (see `line::write_raw`).
    line::write_raw(2, msg);
    // SAFETY: abort has no preconditions and is async-signal-safe.
    unsafe { libc::abort() }
}

fn is_power_of_two(x: usize) -> bool {
    x.is_power_of_two()
}

/// Aligned allocation shared by the memalign family; `align` is a power of
/// two. Sets errno on failure.
fn aligned(align: usize, size: usize) -> *mut c_void {
    alloc_or_enomem(layout(size, align.max(malloc_align(size))), false)
}

// ----- the C allocation functions ----------------------------------------------

/// `malloc(3)`: `size` bytes aligned to 16 (8 below 16 bytes); `malloc(0)`
/// returns a unique pointer. `NULL` and `errno = ENOMEM` on failure.
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc_or_enomem(layout(size, malloc_align(size)), false)
}

/// `free(3)`: `free(NULL)` does nothing; a pointer this library did not
/// hand out aborts with a one-line message.
///
/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if let Some(p) = NonNull::new(p.cast::<u8>()) {
        // SAFETY: forwarded contract.
        unsafe { free_routed(p, "free") };
    }
}

/// `calloc(3)`: zeroed memory for `n` elements of `size` bytes; `ENOMEM`
/// when `n * size` overflows.
#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let l = n
        .checked_mul(size)
        .and_then(|bytes| layout(bytes, malloc_align(bytes)));
    alloc_or_enomem(l, true)
}

/// `realloc(3)`. `realloc(NULL, n)` is `malloc(n)`; `realloc(p, 0)` frees
/// `p` and returns `NULL` (glibc's behaviour; errno untouched). A block above
/// 4 MiB resized to another page count above 4 MiB moves with `mremap` when
/// it can (a shrink gives its tail back to the OS; a growth takes at least
/// half the old size more, and a size within a third of the block keeps it
/// in place). Otherwise in place when
/// the block's usable size fits `size` and is less than twice it; otherwise
/// a new block, the contents copied, the old block freed. A shrink never
/// fails: when no smaller block can be had, `p` stays as it is. On failure
/// (to grow) `NULL`, `errno = ENOMEM`, and `p` is untouched.
///
/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    let Some(old) = NonNull::new(p.cast::<u8>()) else {
        return malloc(size);
    };
    if size == 0 {
        // SAFETY: forwarded contract.
        unsafe { free_routed(old, "realloc") };
        return ptr::null_mut();
    }
    let heap = owner(old, "realloc");
    let usable = heap.usable_size_for(old, "realloc");
    // Within the third of it that a growth adds (`remap_huge` grows a
    // block by at least half), a huge block stays where it is: a block
    // grown a little at a time (`realloc(p, n + 4096)` in a loop) moves a
    // logarithmic number of times instead of once per call.
    if usable > HUGE_ABOVE && size <= usable && size > usable - usable / 3 {
        return p;
    }
    // A huge block resized to another huge size of other pages moves them
    // with `mremap`: a growth copies nothing, a shrink gives its tail back
    // to the OS (kept in place, a 100 MiB block shrunk to 51 MiB stayed
    // resident whole; glibc's shrinks too).
    // (`None` for a size that no page count holds: `remap_huge` refuses it.)
    let pages = size.checked_next_multiple_of(anyalloc::PAGE_SIZE);
    if usable > HUGE_ABOVE && size > HUGE_ABOVE && pages != Some(usable) {
        let t = tls::state();
        if !must_nolock(t) {
            // SAFETY: forwarded contract; on success only the result lives.
            if let Some(q) = inside(t, || unsafe { heap.remap_huge(old, size) }) {
                return q.as_ptr().cast();
            }
        }
    }
    if size <= usable && size > usable / 2 {
        return p;
    }
    let saved = errno();
    let q = malloc(size);
    if q.is_null() {
        if size <= usable {
            // No smaller block to be had (the heap is full, or this is the
            // nolock path): the block holds `size` as it is. glibc's
            // realloc never fails to shrink, and programs rely on that.
            #[cfg(feature = "debug-checks")]
            KEPT_IN_PLACE.store(true, Ordering::Relaxed);
            set_errno(saved);
            return p;
        }
        return q;
    }
    // SAFETY: both blocks are live and distinct; `old` has `usable`
    // bytes, `q` at least `size`.
    unsafe {
        ptr::copy_nonoverlapping(old.as_ptr(), q.cast::<u8>(), usable.min(size));
        free_routed(old, "realloc");
    }
    q
}

/// `reallocarray(3)`: `realloc(p, n * size)`, but `ENOMEM` (and `p`
/// untouched) when the product overflows.
///
/// # Safety
/// As for [`realloc`].
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded contract.
        Some(bytes) => unsafe { realloc(p, bytes) },
        None => {
            set_errno(libc::ENOMEM);
            ptr::null_mut()
        }
    }
}

/// `posix_memalign(3)`: `EINVAL` unless `align` is a power of two and a
/// multiple of `sizeof(void *)`, `ENOMEM` when out of memory; `*out` is
/// written only on success. errno is not changed.
///
/// # Safety
/// `out` is valid for a pointer-sized write.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !is_power_of_two(align) || !align.is_multiple_of(core::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let saved = {
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() }
    };
    let p = aligned(align, size);
    set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's contract.
    unsafe { out.write(p) };
    0
}

/// `aligned_alloc(3)` (C11): `EINVAL` and `NULL` unless `align` is a power of
/// two; any size (C17 dropped the multiple-of-alignment rule).
#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !is_power_of_two(align) {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    aligned(align, size)
}

/// `memalign(3)` with glibc's rules: an alignment that is not a power of two
/// is rounded up to one; above `SIZE_MAX / 2 + 1` it is `EINVAL`.
#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if align > usize::MAX / 2 + 1 {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    aligned(align.max(1).next_power_of_two(), size)
}

/// `valloc(3)`: page-aligned memory.
#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(PAGE, size)
}

/// `pvalloc(3)`: page-aligned memory, the size rounded up to whole pages
/// (`pvalloc(0)` gives one page); `ENOMEM` when the rounding overflows.
#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    match size.max(1).checked_next_multiple_of(PAGE) {
        Some(bytes) => aligned(PAGE, bytes),
        None => {
            set_errno(libc::ENOMEM);
            ptr::null_mut()
        }
    }
}

/// `malloc_usable_size(3)`: how many bytes the block can hold (at least
/// what was asked for); 0 for `NULL`. Aborts for a pointer this library did
/// not hand out.
///
/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    match NonNull::new(p.cast::<u8>()) {
        Some(p) => owner(p, "malloc_usable_size").usable_size_for(p, "malloc_usable_size"),
        None => 0,
    }
}

/// C23 `free_sized(3)`: `free(p)` for a block from `malloc`, `calloc` or
/// `realloc` of `size` bytes. The size names the block's size class without
/// a page lookup (`Heap::free_sized`); a wrong one is only slower. With the
/// `debug-checks` feature a size the block cannot have been allocated with
/// aborts with a one-line message.
///
/// # Safety
/// As for [`free`].
#[no_mangle]
pub unsafe extern "C" fn free_sized(p: *mut c_void, size: usize) {
    if let Some(p) = NonNull::new(p.cast::<u8>()) {
        #[cfg(feature = "debug-checks")]
        check_size(p, 1, size, "free_sized");
        // SAFETY: forwarded contract.
        unsafe { free_routed_sized(p, sized_layout(size, 1), "free_sized") };
    }
}

/// C23 `free_aligned_sized(3)`: `free(p)` for a block from
/// `aligned_alloc(align, size)`. Checked like [`free_sized`].
///
/// # Safety
/// As for [`free`].
#[no_mangle]
pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, align: usize, size: usize) {
    if let Some(p) = NonNull::new(p.cast::<u8>()) {
        #[cfg(feature = "debug-checks")]
        check_size(p, align, size, "free_aligned_sized");
        // SAFETY: forwarded contract.
        unsafe { free_routed_sized(p, sized_layout(size, align), "free_aligned_sized") };
    }
}

/// A block allocated for `size` bytes aligned to `align` has at least
/// `size` and at most `max(2 * size, align, 16)` usable bytes (size classes
/// waste at most 20%, page blocks less than half, `realloc` keeps a block
/// in place only while it is less than twice the new size), or the largest
/// object its size class can give (`Heap::largest_object_for`: the nolock
/// route takes the next class up when the request's own is re-entered,
/// so `posix_memalign(4096, 462)` in a handler may get 8 KiB); a block of
/// whole pages (`Heap::is_paged`) may also have `size` rounded up to pages:
/// a small request served by a page block (the nolock route, when its size
/// classes are busy) or mapped on its own beside the heap (a miss while
/// another thread's `fork` held the heap's locks: see the heap's `fork`
/// module, "Other threads give way"). Anything else was allocated with
/// another size; but once a shrinking `realloc` has kept a block in place
/// for want of a smaller one (`KEPT_IN_PLACE`), only the lower bound holds.
#[cfg(feature = "debug-checks")]
fn check_size(p: NonNull<u8>, align: usize, size: usize, what: &str) {
    let heap = owner(p, what);
    let usable = heap.usable_size_for(p, what);
    let pages = if heap.is_paged(p) {
        size.max(1)
            .checked_next_multiple_of(PAGE)
            .unwrap_or(usize::MAX)
    } else {
        0
    };
    let objects = layout(size, align.max(malloc_align(size)))
        .and_then(Heap::largest_object_for)
        .unwrap_or(0);
    let most = size
        .saturating_mul(2)
        .max(align)
        .max(MAX_ALIGN)
        .max(pages)
        .max(objects);
    if size > usable || (usable > most && !KEPT_IN_PLACE.load(Ordering::Relaxed)) {
        let mut l = Line::new();
        l.text("anyalloc: ")
            .text(what)
            .text(" of ")
            .hex(p.as_ptr() as usize);
        l.text(" with size ")
            .dec(size as u64)
            .text(", but the block has ");
        l.dec(usable as u64)
            .text(" usable bytes (allocated with another size)\n");
        fatal(l.bytes());
    }
}

// ----- glibc's names for "the real malloc" ----------------------------------------

/// glibc's `__libc_malloc`: [`malloc`] (programs and preloaded tools call
/// the `__libc_*` names to reach "the real malloc"; here that is this one).
#[no_mangle]
pub extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    malloc(size)
}

/// glibc's `__libc_free`: [`free`].
///
/// # Safety
/// As for [`free`].
#[no_mangle]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { free(p) }
}

/// glibc's `__libc_calloc`: [`calloc`].
#[no_mangle]
pub extern "C" fn __libc_calloc(n: usize, size: usize) -> *mut c_void {
    calloc(n, size)
}

/// glibc's `__libc_realloc`: [`realloc`].
///
/// # Safety
/// As for [`realloc`].
#[no_mangle]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { realloc(p, size) }
}

/// glibc's `__libc_memalign`: [`memalign`].
#[no_mangle]
pub extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
    memalign(align, size)
}

/// glibc's `__libc_valloc`: [`valloc`].
#[no_mangle]
pub extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
    valloc(size)
}

/// glibc's `__libc_pvalloc`: [`pvalloc`].
#[no_mangle]
pub extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
    pvalloc(size)
}

/// The old `cfree(3)`: [`free`]. glibc keeps it as a compat symbol
/// (`cfree@GLIBC_2.2.5`, an alias of its own free) for programs linked
/// before 2.26; without this definition their `cfree` reached glibc's
/// free with a block of this library and aborted ("free(): invalid
/// pointer"). The unversioned definition binds their versioned reference.
///
/// # Safety
/// As for [`free`].
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { free(p) }
}

// ----- the explicit any-context calls (include/anyalloc.h) ----------------------

/// Allocates `size` bytes (aligned like `malloc`) with the nolock path, from
/// any context. Never waits, never makes a syscall once the heap exists;
/// `NULL` means "no memory for you in this context now". errno is not
/// touched (a signal handler's caller keeps its errno).
#[no_mangle]
pub extern "C" fn anyalloc_malloc_nolock(size: usize) -> *mut c_void {
    match layout(size, malloc_align(size)) {
        Some(l) => alloc_nolock(l, false),
        None => ptr::null_mut(),
    }
}

/// Frees any block of this library with the nolock path, from any context.
/// Never waits, never fails. `NULL` does nothing.
///
/// # Safety
/// As for [`free`].
#[no_mangle]
pub unsafe extern "C" fn anyalloc_free_nolock(p: *mut c_void) {
    if let Some(p) = NonNull::new(p.cast::<u8>()) {
        let saved = errno();
        // SAFETY: forwarded contract.
        unsafe { owner(p, "anyalloc_free_nolock").free_nolock(p) };
        set_errno(saved);
    }
}

/// Opens a nolock scope on this thread: until the matching
/// [`anyalloc_nolock_exit`], every allocation function of this thread
/// (`malloc`, `free`, ... included) takes the nolock path. Scopes nest.
#[no_mangle]
pub extern "C" fn anyalloc_nolock_enter() {
    let t = tls::state();
    t.scope
        .store(t.scope.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
}

/// Closes the innermost nolock scope of this thread. Without an open scope
/// it aborts with a one-line message.
#[no_mangle]
pub extern "C" fn anyalloc_nolock_exit() {
    let t = tls::state();
    let s = t.scope.load(Ordering::Relaxed);
    if s == 0 {
        fatal(b"anyalloc: anyalloc_nolock_exit without a matching anyalloc_nolock_enter\n");
    }
    compiler_fence(Ordering::SeqCst);
    t.scope.store(s - 1, Ordering::Relaxed);
}

// ----- start-up ------------------------------------------------------------------

/// Runs from `.init_array` after libc's own initialisation (libc is a
/// dependency of this library), before `main`: normal context.
extern "C" fn constructor() {
    let t = tls::state();
    // Called even when the heap exists: this call must also do the setup
    // owed since a nolock caller created the heap (the heap's own fork
    // handlers, registered before ours below).
    let Some(heap) = inside(t, || anyalloc::init_without_maintainer(false)) else {
        return;
    };
    // Only a child handler: the heap's own handlers hold its locks across
    // `fork` and route the forking thread's calls in that window (a call
    // that interrupted an allocation takes the nolock path; one at rest,
    // such as another library's fork handler, the normal path with the
    // locks borrowed). Raising this library's depth there too would send
    // other libraries' fork handlers to the nolock path, where nothing
    // above 4 MiB is served and every lock is found held.
    // SAFETY: the handler is an `extern "C"` function that lives forever.
    unsafe {
        libc::pthread_atfork(None, None, Some(fork_child));
    }
    info::perturb_from_environment();
    if maintenance_wanted() {
        heap.start_maintenance();
    }
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

// ----- fork handler order ------------------------------------------------------

/// A fork handler.
type ForkHandler = Option<unsafe extern "C" fn()>;
/// libc's `__register_atfork(prepare, parent, child, dso_handle)`.
type RegisterAtfork =
    unsafe extern "C" fn(ForkHandler, ForkHandler, ForkHandler, *mut c_void) -> c_int;

/// libc's `__register_atfork`, looked up on first use (null: not yet).
static REAL_REGISTER_ATFORK: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// Registers fork handlers: the entry point behind `pthread_atfork`
/// (glibc's `libc_nonshared.a` links a `pthread_atfork` into every program
/// and library that calls it, which calls this with its `__dso_handle`).
///
/// Interposed so that the heap's own handlers are registered *first*,
/// before any other library's: prepare handlers run in the reverse order of
/// registration, so the heap's prepare, which takes every heap lock, runs
/// after all the others, and its parent and child handlers, which release
/// them, run before the others. glibc's malloc takes its locks at the same
/// point. A library whose constructor ran before this one's and registered
/// a prepare handler that takes its own mutex would otherwise deadlock the
/// fork: a thread holding that mutex could be waiting in `malloc` for a
/// heap lock held by the forking thread, which waits for the mutex in that
/// prepare handler.
///
/// # Safety
/// As `pthread_atfork`'s: the handlers are valid for as long as they stay
/// registered (until `dso_handle`'s object is unloaded).
#[no_mangle]
pub unsafe extern "C" fn __register_atfork(
    prepare: ForkHandler,
    parent: ForkHandler,
    child: ForkHandler,
    dso_handle: *mut c_void,
) -> c_int {
    // The heap's handlers first (that registration comes back here, and
    // goes straight through: it is marked done before it starts).
    anyalloc::register_fork_handlers();
    let Some(real) = real_register_atfork() else {
        return libc::ENOMEM;
    };
    // This library's own registrations (the heap's handlers, `fork_child`)
    // come with its own handle, by which glibc unregisters them when this
    // library's finalisers run at exit, before those of the libraries
    // initialised before it and while other threads may still fork: a
    // fork from there would clone locks held by other threads. Registered
    // with no handle, they stay for the life of the process, as glibc's
    // malloc's fork handling does.
    let own = ptr::addr_of!(__dso_handle).cast_mut().cast::<c_void>();
    let dso_handle = if dso_handle == own {
        ptr::null_mut()
    } else {
        dso_handle
    };
    // SAFETY: libc's own function, with the caller's arguments.
    unsafe { real(prepare, parent, child, dso_handle) }
}

extern "C" {
    /// This library's handle for `__cxa_finalize` and `__unregister_atfork`
    /// (crtbeginS.o's hidden symbol, unique to each loaded object).
    static __dso_handle: u8;
}

// `pthread_atfork` itself is deliberately not defined here. Every program
// and library linked since glibc 2.28 gets its own hidden copy from
// `libc_nonshared.a` (libc's exported one is a compat symbol), which calls
// `__register_atfork` above with the caller's `__dso_handle`: so `dlclose`
// unregisters the handlers of the object it unloads. A `pthread_atfork`
// exported here would be bound instead by every object linked against this
// library, and could only pass no handle: a plugin's handlers would outlive
// its `dlclose`, and the next `fork` would call into unmapped memory
// (`fork_after_dlclose_of_a_plugin_that_registered_fork_handlers`).

/// libc's `__register_atfork` (the next definition after this library's).
fn real_register_atfork() -> Option<RegisterAtfork> {
    let mut f = REAL_REGISTER_ATFORK.load(Ordering::Acquire);
    if f.is_null() {
        // SAFETY: a NUL-terminated name; RTLD_NEXT looks past this object.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"__register_atfork".as_ptr()) };
        if f.is_null() {
            return None;
        }
        REAL_REGISTER_ATFORK.store(f, Ordering::Release);
    }
    // SAFETY: glibc's `__register_atfork` has this signature.
    Some(unsafe { core::mem::transmute::<*mut c_void, RegisterAtfork>(f) })
}

/// In the child the maintenance thread did not survive the fork: the first
/// normal-path call starts a new one (not this handler: the child may be
/// about to `exec`, and spawning here would run inside `fork`).
extern "C" fn fork_child() {
    if anyalloc::global_heap().is_some_and(|h| h.forget_maintainer_after_fork()) {
        SLOW.fetch_or(SLOW_RESTART, Ordering::Relaxed);
    }
}

/// `ANYALLOC_MAINTENANCE` switched on (`1`; default: off). A value that is
/// not a switch is reported on stderr and leaves it off.
fn maintenance_wanted() -> bool {
    anyalloc::env_flag(c"ANYALLOC_MAINTENANCE").unwrap_or(false)
}
