//! Per-thread context: is this thread inside the allocator, or inside a
//! nolock scope? One word per thread, below every other layer (the locks in
//! [`crate::sync`] read and write it), so the page allocator, the heap and
//! [`Global`](crate::Global) all route by the same state.
//!
//! # The rule
//!
//! A thread is marked *inside the allocator* (`DEPTH` raised) **before** it
//! takes any lock that another context may wait on — a zone lock, a node
//! lock, the drain and growth locks, the heap registry —
//! whether it takes it with `lock()` or `try_lock()`, and stays marked until
//! it has released it. [`ZoneLock`](crate::sync::ZoneLock) does this itself;
//! the heap registry's users call [`Inside::enter`]. The accounting groups'
//! children registry is the exception: its holders allocate under it (a
//! `Vec` push), which must stay on the normal path, so it is not marked; its
//! owner word tells a handler that its own thread holds it (see
//! `sync::registry_lock`). (The shrinker list takes no lock.) The pure fast paths,
//! which hold only per-CPU slot try-locks (never waited on), are not marked:
//! a handler that interrupts them finds the slot busy and goes elsewhere.
//!
//! Every normal-path entry (`Heap::alloc`, `Heap::free`,
//! `PageAllocator::alloc_pages`, `drain`, ...) reads the word on its slow
//! path: a thread found inside (it interrupted itself inside the allocator:
//! a signal handler) or in a nolock scope takes the nolock route instead, so
//! it never waits for a lock its own thread holds.
//!
//! # The word
//!
//! A const-initialised thread-local `u32` without a destructor: no lazy
//! initialisation, nothing registered at thread exit, safe in a signal
//! handler. On x86-64 Linux it is an *initial-exec* TLS variable (one load
//! from the GOT, one `fs`-relative access; never a call into the dynamic
//! loader, which could allocate when this crate is part of a shared
//! library; the cost: a shared library containing this crate is marked
//! `DF_STATIC_TLS`, as `libanyalloc.so` is for its own word); elsewhere a
//! `thread_local!`. Its address is this thread's id (the zone lock's owner
//! word).
//!
//! | bits   | name    | meaning                                    | set by | read by |
//! |--------|---------|--------------------------------------------|--------|---------|
//! | 0..16  | `DEPTH` | allocator sections of this thread in progress: held or awaited waitable locks, the global heap's creation, shrinkers running, the fork window | [`Inside::enter`] / [`enter`] (the zone lock, the registries, `Global`'s creation and fork handlers) | [`nested`]: every normal-path entry's slow path |
//! | 16..32 | `SCOPE` | open [`nolock_scope`](crate::nolock_scope) guards | [`scope_enter`] / [`scope_leave`] | [`nested`], [`in_scope`], the debug checker |
//!
//! Every change is a plain load and store of this thread's own word (a
//! handler that interrupts between them restores the word before it
//! returns), fenced against compiler reordering so that a handler sees the
//! mark before the lock is touched and after it is released.
//!
//! # The fork window
//!
//! `Global`'s `pthread_atfork` prepare handler marks the forking thread and
//! takes every lock that can be waited on, and the parent and child
//! handlers release them. Other libraries' fork handlers registered before
//! ours run *inside* that window (prepare handlers run in the reverse order
//! of registration, parent and child handlers in order), and they may
//! allocate, as they may under glibc's malloc, whose locks are taken after
//! every prepare handler. On the nolock route they would find every lock
//! held by their own thread and fail (and nothing above 4 MiB can be
//! served there at all).
//!
//! So the window is *borrowable*: once prepare holds everything, and if
//! the thread's word was 0 before it marked itself (no section in progress,
//! no scope), it records the thread as the window's owner and its word at
//! that point as the word *at rest*. Then:
//!
//! 1. [`nested`] is false for the owner at exactly that word: a call
//!    starting there (another library's handler, or a signal handler that
//!    interrupted the thread between handlers) takes the normal route;
//! 2. a normal-path `lock` that finds a lock held across the fork by this
//!    thread (owner word: this thread's id with [`FORK_HELD`] set) borrows
//!    it: it marks the thread as for any lock, and its guard releases only
//!    the mark. Every such lock was taken with nothing in progress under it
//!    and is released only by the parent's or child's handler, so the
//!    borrower sees its data at rest;
//! 3. a call that starts anywhere else (a signal handler that interrupted a
//!    borrowed section: the word is above the rest word) is nested as
//!    always and takes the nolock route, whose `try_lock`s never borrow.
//!
//! The window closes (before any lock is released) in the parent's or the
//! child's handler. Another thread never matches the owner: ids are unique
//! among live threads, and the owner cannot exit inside `fork`.
//!
//! # The shrinker mark
//!
//! A second per-thread word, next to the route word (the same 16-byte
//! initial-exec variable on x86-64 Linux, whose third word counts the
//! thread's ticks for the inline decay, `decay_tick`; a second const `thread_local!`
//! without a destructor elsewhere): non-zero while this thread runs a
//! heap's shrinkers ([`Shrinking`]). A shrinker may allocate; an allocation
//! that reclaims again finds the mark and does not call the shrinkers a
//! second time on this thread, so reclaim recurses at most once per thread
//! (and a shrinker is never re-entered on its own thread, which could
//! deadlock on a lock it holds). Being per thread, it holds for any number
//! of threads reclaiming at once (a single "owner" word per heap recorded
//! only one of them: the others recursed without bound), and for reclaims
//! of another heap started inside a shrinker. It is not part of the route:
//! a thread running shrinkers is in normal context ([`nested`] ignores the
//! mark). A signal handler that interrupts the shrinkers sees the mark
//! and skips them; one that interrupts the mark's load and store restores
//! it before it returns, as for the route word.
//!
//! Without std there is no TLS: routing is the embedder's (call the nolock
//! functions from interrupt handlers); [`nested`] is `false`, marking
//! compiles to nothing and [`thread_id`] is unknown (0; the
//! [`Platform`](crate::Platform) may supply one).

#[cfg(all(feature = "std", not(loom)))]
use core::sync::atomic::{compiler_fence, Ordering};

/// One level of `DEPTH`. Depth is bounded by lock nesting plus signal
/// nesting (the fork handler marks its whole window once, whatever the
/// number of locks it holds across the fork).
#[cfg(feature = "std")]
const DEPTH_ONE: u32 = 1;
/// One level of `SCOPE`.
#[cfg(feature = "std")]
const SCOPE_ONE: u32 = 1 << 16;
/// The lowest word whose `SCOPE` is full (65,535 open scopes). `SCOPE`
/// saturates there and stays: a thread that opened that many (safe code
/// can, by forgetting guards) is pinned to the nolock route for good,
/// rather than wrapping round to "no scope" and taking the normal route,
/// which can wait, inside a scope.
#[cfg(feature = "std")]
const SCOPE_FULL: u32 = !(SCOPE_ONE - 1);

// ----- the word --------------------------------------------------------------

#[cfg(all(
    feature = "std",
    not(loom),
    target_arch = "x86_64",
    target_os = "linux"
))]
mod word {
    use core::sync::atomic::{AtomicU32, Ordering};

    // Sixteen zero bytes of thread-local storage (`.tbss`): the route word,
    // then the shrinker mark (see [the shrinker mark](super#the-shrinker-mark)),
    // then the decay ticks (see [`decay_tick`](super::decay_tick)), then
    // four bytes unused.
    // Global so that every codegen unit's object links to the same
    // variable, hidden so that a shared library does not export it.
    core::arch::global_asm!(
        ".pushsection .tbss,\"awT\",@nobits",
        ".p2align 3",
        ".globl anyalloc_route_word",
        ".hidden anyalloc_route_word",
        ".type anyalloc_route_word,@object",
        ".size anyalloc_route_word,16",
        "anyalloc_route_word:",
        ".zero 16",
        ".popsection",
    );

    /// This thread's word (initial-exec access: the GOT slot holds the
    /// variable's offset from the thread pointer, which `fs:0` holds).
    #[inline(always)]
    pub(super) fn get() -> &'static AtomicU32 {
        let addr: usize;
        // SAFETY: reads the GOT and the TCB's self pointer; no side effects.
        unsafe {
            core::arch::asm!(
                "mov {a}, qword ptr [rip + anyalloc_route_word@GOTTPOFF]",
                "add {a}, qword ptr fs:[0]",
                a = out(reg) addr,
                options(nostack, pure, readonly),
            );
        }
        // SAFETY: `addr` is this thread's copy of the 8-aligned, zero-filled
        // variable, live as long as the thread; the `'static` is only used
        // on this thread, at once.
        unsafe { &*(addr as *const AtomicU32) }
    }

    #[inline(always)]
    pub(super) fn load() -> u32 {
        get().load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn store(v: u32) {
        get().store(v, Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn id() -> usize {
        get() as *const AtomicU32 as usize
    }

    /// The variable's second word: this thread's shrinker mark.
    #[inline(always)]
    pub(super) fn shrinking() -> &'static AtomicU32 {
        // SAFETY: the variable is 16 bytes, 8-aligned: its second word is
        // this thread's, 4-aligned, live as long as the thread.
        unsafe { &*(get() as *const AtomicU32).add(1) }
    }

    #[inline(always)]
    pub(super) fn load_shrinking() -> u32 {
        shrinking().load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn store_shrinking(v: u32) {
        shrinking().store(v, Ordering::Relaxed)
    }

    /// The variable's third word: this thread's decay ticks.
    #[inline(always)]
    pub(super) fn ticks() -> &'static AtomicU32 {
        // SAFETY: the variable is 16 bytes, 8-aligned: its third word is
        // this thread's, 4-aligned, live as long as the thread.
        unsafe { &*(get() as *const AtomicU32).add(2) }
    }

    #[inline(always)]
    pub(super) fn load_ticks() -> u32 {
        ticks().load(Ordering::Relaxed)
    }

    #[inline(always)]
    pub(super) fn store_ticks(v: u32) {
        ticks().store(v, Ordering::Relaxed)
    }
}

#[cfg(all(
    feature = "std",
    not(loom),
    not(all(target_arch = "x86_64", target_os = "linux"))
))]
mod word {
    use core::cell::Cell;

    std::thread_local! {
        static ROUTE: Cell<u32> = const { Cell::new(0) };
        static SHRINKING: Cell<u32> = const { Cell::new(0) };
        static TICKS: Cell<u32> = const { Cell::new(0) };
    }

    #[inline(always)]
    pub(super) fn load() -> u32 {
        ROUTE.get()
    }

    #[inline(always)]
    pub(super) fn store(v: u32) {
        ROUTE.set(v)
    }

    #[inline(always)]
    pub(super) fn id() -> usize {
        ROUTE.with(|c| c as *const Cell<u32> as usize)
    }

    #[inline(always)]
    pub(super) fn load_shrinking() -> u32 {
        SHRINKING.get()
    }

    #[inline(always)]
    pub(super) fn store_shrinking(v: u32) {
        SHRINKING.set(v)
    }

    #[inline(always)]
    pub(super) fn load_ticks() -> u32 {
        TICKS.get()
    }

    #[inline(always)]
    pub(super) fn store_ticks(v: u32) {
        TICKS.set(v)
    }
}

/// Under loom, threads are loom's: per-loom-thread words and ids.
#[cfg(all(feature = "std", loom))]
mod word {
    use core::cell::Cell;

    // Even, as the real ids (addresses) are: the locks' owner words use
    // the low bit (`FORK_HELD`).
    static NEXT_ID: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(2);

    loom::thread_local! {
        static ROUTE: Cell<u32> = Cell::new(0);
        static SHRINKING: Cell<u32> = Cell::new(0);
        static TICKS: Cell<u32> = Cell::new(0);
        static ID: usize = NEXT_ID.fetch_add(2, core::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn load() -> u32 {
        ROUTE.with(|c| c.get())
    }

    pub(super) fn store(v: u32) {
        ROUTE.with(|c| c.set(v))
    }

    pub(super) fn id() -> usize {
        ID.with(|i| *i)
    }

    pub(super) fn load_shrinking() -> u32 {
        SHRINKING.with(|c| c.get())
    }

    pub(super) fn store_shrinking(v: u32) {
        SHRINKING.with(|c| c.set(v))
    }

    pub(super) fn load_ticks() -> u32 {
        TICKS.with(|c| c.get())
    }

    pub(super) fn store_ticks(v: u32) {
        TICKS.with(|c| c.set(v))
    }
}

#[cfg(all(feature = "std", not(loom)))]
#[inline(always)]
fn fence() {
    compiler_fence(Ordering::SeqCst);
}

#[cfg(all(feature = "std", loom))]
#[inline(always)]
fn fence() {}

// ----- DEPTH ---------------------------------------------------------------------

/// Whether this thread must take the nolock route: it is inside the
/// allocator (it interrupted itself there) or inside a nolock scope. A
/// thread at rest in its own fork window (see [the fork window](#the-fork-window))
/// is not: it holds every lock, with no section in progress.
#[inline(always)]
pub(crate) fn nested() -> bool {
    #[cfg(feature = "std")]
    {
        let w = word::load();
        w != 0 && !at_rest_in_fork_window(w)
    }
    #[cfg(not(feature = "std"))]
    false
}

/// Slow-path calls per thread between two looks at the clock for the
/// inline decay (`PageAllocator::decay_tick`).
#[cfg(feature = "std")]
pub(crate) const DECAY_TICKS: u32 = 64;

/// Counts one tick of this thread's inline decay (a normal-path call took
/// a slow path; see `Config::decay`): `true` every [`DECAY_TICKS`]-th
/// tick. A plain load and store of this thread's own word, like the route
/// word's (a handler that ticks between them loses its tick, nothing
/// more). Not part of the route.
#[cfg(feature = "std")]
#[inline(always)]
pub(crate) fn decay_tick() -> bool {
    let t = word::load_ticks().wrapping_add(1);
    word::store_ticks(t);
    t.is_multiple_of(DECAY_TICKS)
}

/// Whether this thread is inside the allocator (`DEPTH > 0`), whatever its
/// scope.
#[cfg(feature = "std")]
#[inline(always)]
pub(crate) fn inside() -> bool {
    word::load() & (SCOPE_ONE - 1) != 0
}

/// Marks this thread inside the allocator (`DEPTH + 1`). Pair with
/// [`leave`]; prefer the [`Inside`] guard.
#[inline(always)]
pub(crate) fn enter() {
    #[cfg(feature = "std")]
    {
        // A signal before this store sees DEPTH as it was: no lock held yet.
        word::store(word::load() + DEPTH_ONE);
        // A signal after it sees DEPTH > 0 and takes the nolock route; the
        // fence keeps the lock operation that follows after the store.
        fence();
    }
}

/// Undoes one [`enter`] (`DEPTH - 1`).
#[inline(always)]
pub(crate) fn leave() {
    #[cfg(feature = "std")]
    {
        // Everything before (the lock's release) stays before the store: a
        // signal until the store still sees DEPTH > 0, harmlessly.
        fence();
        word::store(word::load() - DEPTH_ONE);
    }
}

/// A marked section: [`enter`] on creation, [`leave`] on drop. Not `Send`:
/// the mark belongs to the thread.
#[must_use = "the section ends as soon as the guard is dropped"]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) struct Inside {
    _not_send: core::marker::PhantomData<*const ()>,
}

impl Inside {
    #[inline(always)]
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn enter() -> Inside {
        enter();
        Inside {
            _not_send: core::marker::PhantomData,
        }
    }
}

impl Drop for Inside {
    #[inline(always)]
    fn drop(&mut self) {
        leave();
    }
}

/// This thread's id for lock owner words: never 0 for a live thread, unique
/// among live threads, even (the owner words' low bit is [`FORK_HELD`]);
/// 0 when unknown (no std).
#[inline(always)]
pub(crate) fn thread_id() -> usize {
    #[cfg(feature = "std")]
    return word::id();
    #[cfg(not(feature = "std"))]
    0
}

// ----- the fork window -------------------------------------------------------------

/// The low bit of a lock's owner word: the lock is held across `fork` (by
/// the fork handler's `lock_raw`), by the thread the other bits name.
pub(crate) const FORK_HELD: usize = 1;

/// The thread that holds the global heap's locks across `fork` with no
/// section in progress (0: none); see the module documentation.
#[cfg(feature = "std")]
static FORK_OWNER: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
/// The owner's word while it is at rest in the window: its `DEPTH` is the
/// fork handler's mark plus one per lock held across the fork.
#[cfg(feature = "std")]
static FORK_REST: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Opens the fork window on this thread: call when it has taken every lock
/// it holds across `fork`, with nothing else of the allocator in progress
/// on it and no nolock scope open (the caller checked its word was 0 before
/// it marked itself).
#[cfg(feature = "std")]
pub(crate) fn fork_window_open() {
    use core::sync::atomic::Ordering::Relaxed;
    FORK_REST.store(word::load(), Relaxed);
    // The rest word before the owner: a handler that sees itself as the
    // owner compares with the right word.
    fence();
    FORK_OWNER.store(word::id(), Relaxed);
    fence();
}

/// Closes this thread's fork window: call before releasing the locks.
#[cfg(feature = "std")]
pub(crate) fn fork_window_close() {
    fence();
    FORK_OWNER.store(0, core::sync::atomic::Ordering::Relaxed);
    fence();
}

/// Whether this thread owns an open fork window: a normal-path lock that
/// finds a lock this thread holds across `fork` borrows it.
#[inline]
pub(crate) fn owns_fork_window() -> bool {
    #[cfg(feature = "std")]
    return FORK_OWNER.load(core::sync::atomic::Ordering::Relaxed) == word::id();
    #[cfg(not(feature = "std"))]
    false
}

/// Whether `w`, this thread's non-zero word, is its word at rest in its
/// own fork window.
#[cfg(feature = "std")]
#[cold]
#[inline(never)]
fn at_rest_in_fork_window(w: u32) -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    FORK_OWNER.load(Relaxed) == word::id() && FORK_REST.load(Relaxed) == w
}

/// Whether this thread's word is 0: not inside the allocator, no scope.
#[cfg(feature = "std")]
pub(crate) fn clear() -> bool {
    word::load() == 0
}

// ----- SCOPE ---------------------------------------------------------------------

/// Opens a nolock scope on this thread (a full `SCOPE` stays full: see
/// [`SCOPE_FULL`]).
#[cfg(feature = "std")]
pub(crate) fn scope_enter() {
    let w = word::load();
    if w < SCOPE_FULL {
        word::store(w + SCOPE_ONE);
    }
    fence();
}

/// Closes a nolock scope on this thread (a full `SCOPE` stays full: the
/// scopes it lost count of may still be open).
#[cfg(feature = "std")]
pub(crate) fn scope_leave() {
    fence();
    let w = word::load();
    if w < SCOPE_FULL {
        word::store(w - SCOPE_ONE);
    }
}

/// Whether this thread is inside a nolock scope.
#[cfg(feature = "std")]
pub(crate) fn in_scope() -> bool {
    word::load() >= SCOPE_ONE
}

// ----- the shrinker mark -------------------------------------------------------

/// This thread's shrinker mark, while it runs a heap's shrinkers: see
/// [the shrinker mark](self#the-shrinker-mark). Not `Send`.
#[cfg(feature = "std")]
#[must_use = "the mark is cleared as soon as the guard is dropped"]
pub(crate) struct Shrinking {
    _not_send: core::marker::PhantomData<*const ()>,
}

#[cfg(feature = "std")]
impl Shrinking {
    /// Marks this thread as running shrinkers, or `None` if it already is
    /// (a reclaim started inside one of its shrinkers, on any heap, or in a
    /// signal handler that interrupted them).
    #[inline]
    pub(crate) fn enter() -> Option<Shrinking> {
        if word::load_shrinking() != 0 {
            return None;
        }
        // A handler between the load and the store sees 0, runs its own
        // shrinkers and restores 0 before it returns.
        word::store_shrinking(1);
        fence();
        Some(Shrinking {
            _not_send: core::marker::PhantomData,
        })
    }
}

#[cfg(feature = "std")]
impl Drop for Shrinking {
    /// Clears the mark, also when a shrinker unwinds.
    #[inline]
    fn drop(&mut self) {
        fence();
        word::store_shrinking(0);
    }
}

// ----- the debug checker -----------------------------------------------------------

/// Called on entry of every public normal-path function with its name: in
/// debug builds (or with `debug-checks`), inside a nolock scope, aborts with
/// a message naming it, like the kernel's `might_sleep`. Otherwise nothing.
#[inline(always)]
pub(crate) fn might_wait(function: &'static str) {
    #[cfg(all(feature = "std", any(debug_assertions, feature = "debug-checks")))]
    if in_scope() {
        scope_violation(function);
    }
    #[cfg(not(all(feature = "std", any(debug_assertions, feature = "debug-checks"))))]
    let _ = function;
}

#[cfg(all(feature = "std", any(debug_assertions, feature = "debug-checks")))]
#[cold]
fn scope_violation(function: &'static str) -> ! {
    crate::platform::write_stderr(b"anyalloc: ");
    crate::platform::write_stderr(function.as_bytes());
    crate::platform::write_stderr(b" may wait for a lock, but was called inside a nolock scope\n");
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}
