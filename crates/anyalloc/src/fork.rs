//! Fork: every heap's locks are held across `fork`.
//!
//! A forked child has only the thread that called `fork`. A lock that any
//! other thread held at that moment stays held in the child forever, so the
//! child's first allocation that needs it would wait for ever (glibc's
//! malloc takes all its arenas' locks around `fork` for the same reason).
//! The `pthread_atfork` handlers registered here (by `Global`'s start-up
//! constructor, or [`init`](crate::init)) prevent that:
//!
//! 1. **prepare** marks the forking thread inside the allocator, then takes
//!    every lock that can be waited on or spun on, in this order: the
//!    accounting groups' children registry, the heap registry below, then
//!    for the global heap and for every heap in the registry its caches'
//!    level-0 slots, maintenance and node locks, drain and growth locks,
//!    page lists' level-0 slots and zone locks. The level-0 slots are
//!    try-locks, but the normal path's holders may wait for a node or zone
//!    lock: cloned while held, a slot would stay held in the child (see
//!    `SlotLock::hold_all`);
//! 2. **parent** and **child** release them (in the child, on behalf of the
//!    same thread) and unmark the thread.
//!
//! A signal handler that runs on the forking thread while prepare takes the
//! locks, or that interrupted an allocation there, takes the nolock route
//! instead of waiting for the locks its own thread holds.
//!
//! # Forks that overlap
//!
//! The locks and what prepare records about them are process-wide, so at
//! most one fork holds them, and only its own handlers release them:
//!
//! - Two forks on different threads: the second prepare waits for the
//!   children registry, the first lock the first one took, until the first
//!   fork's parent handler releases it (`HOLDER` names the thread in
//!   between).
//! - A fork called by a signal handler that interrupted the allocator (on
//!   any thread, the holder's own fork window included): its prepare takes
//!   nothing, since the thread may hold the locks itself, and so its parent
//!   and child handlers release nothing either. On the holder's thread the
//!   count of such forks in progress (`SKIPPED`) tells the holder's release
//!   from theirs. Its child, like any fork's without these handlers, may
//!   inherit locks held at the clone.
//!
//! Other libraries' fork handlers registered before ours run inside that
//! window (prepare handlers in the reverse order of registration, the
//! others in order), and glibc's malloc lets them allocate. Here they can
//! too, on the normal path (huge blocks included): with every lock held and
//! nothing in progress, the forking thread *borrows* the locks it holds
//! (the `context` module's fork window).
//!
//! # The heap registry
//!
//! Every heap made by [`Heap::new`] is linked into a list (through its
//! core, which never moves) under a [`RegistryLock`], and unlinked when it
//! is dropped. The global heap is not in the list: prepare takes it
//! directly. Lock order: the registry, then each heap's locks; no path
//! holds a heap's lock while it waits for the registry (a heap is linked
//! after it is built and unlinked before it is torn down).
//!
//! Each heap's core records whether its locks are held across the fork
//! (`ForkLink::locked`), which release reads. What the window itself makes
//! is held too, before any other thread can see it: a heap made there (by a
//! fork handler registered before ours) is linked with the registry
//! borrowed and locked at once, before its maintenance thread starts; a
//! zone that the window's growth adds is locked before it is published
//! (`PageAllocator::grow`); the global heap, if the window makes it, before
//! it is published ([`adopt_global`]). Other threads keep running during
//! the window: without that, a nolock allocation of theirs could hold the
//! new zone's or heap's lock at the clone.
//!
//! A creation of the global heap in progress on another thread when
//! prepare looks for the heap is waited for (it takes no lock), and the heap
//! held: cloned half made, it would stay "being made" in the child for ever.
//! So are the moves of huge blocks in progress ([`Heap::remap_huge`]), before
//! each heap's locks are taken: cloned halfway, a block's entry in the
//! table of huge blocks would stay claimed in the child, and the block
//! could never be freed there. A move that starts once the fork is counted
//! moves nothing (the caller copies instead). A move blocks signals while
//! it is counted, so no signal handler that waits for this fork (one that
//! forks, in another library's prepare handler) holds it up; and the wait,
//! like the one for the level-0 slots, ends after [`SLOT_PATIENCE`]: a
//! child of a fork whose prepare took nothing keeps the counts of its
//! parent's other threads' moves. So are the drains of the caches'
//! deferred stacks in progress (a normal slow path, or a nolock
//! allocation, that took the whole stack and frees or stocks its objects),
//! of their parked double-free suspects, and the double-free checks that
//! take both stacks to search them:
//! cloned halfway, the rest of the chain would be lost to the child, its
//! objects counted in use there for good. A drain or check that starts
//! once the fork is counted leaves the stacks alone (the check is then
//! undecided, and its free parks the object as a suspect); the normal
//! path's drains block
//! signals while counted (a nolock one that a signal handler interrupts,
//! if the handler forks, holds that fork up to `SLOT_PATIENCE`, and is
//! then cloned on the forking thread, which finishes it in the child). A
//! huge allocation in progress
//! at the clone (it takes no lock either) costs the child one table entry
//! and leaves the block, which the child never got, mapped. The child's
//! counts that other threads' lock-free steps change one after another
//! (the zones' stock and deferred pages, the caches' deferred objects, the
//! heaps' huge blocks) are counted again, in its release handler, from
//! what they count; and every order of the zones' stocks is marked short,
//! so that a cell emptied by a take cloned before its mark is filled again.
//! (The forking thread's own step would be finished after that recount,
//! by the code a signal handler that forks interrupted: a huge block's
//! step from the table to its count is marked inside the allocator, so
//! that such a fork takes nothing and recounts nothing.)
//!
//! Not covered: a [`PageAllocator`](crate::page::PageAllocator) used on its
//! own (it is returned by value, so it has no fixed address to link), heaps
//! made by `Heap::from_region` (an embedder's), and a global heap whose
//! creation another thread starts after prepare looked for it (cloned
//! half made, its creation is taken over by the child's first normal
//! call: the creation records the process it runs in). Try-locks whose holders
//! never wait (the nolock levels' slots, a group's per-CPU charge stock)
//! are not held: one is left held in the child only if a thread was inside
//! it at the very instant of the clone (its contents are then out of reach
//! there, a sheaf or a stock's worth; a group charge cloned halfway along
//! its chain leaves the upper levels that charge's bytes, see the `account`
//! module's "Counters"). Dropping a heap inside the
//! window (in a fork handler registered before ours) waits for its
//! maintenance thread, which may be waiting for a lock the window holds: do
//! not.
//!
//! # Orphaned locks
//!
//! The child of a fork whose prepare took nothing (called by a signal
//! handler that interrupted the allocator) has only the forking thread, and
//! every lock another thread of the parent held at the clone stays held
//! there for good: the child is *orphaned* ([`orphaned`], inherited by its
//! own children). Once the handler returns, the child's thread goes on
//! with the allocator as usual, so a wait for such a lock would never end.
//! There, normal-path waits are bounded by [`ORPHAN_PATIENCE`]: a
//! `ZoneLock::lock_in` that waited that long *gives way*, as for a lock
//! held across a fork (and marks the lock so, so that the next ones give
//! way at once; a holder that is alive after all releases it as usual);
//! an allocation whose normal path then misses takes the nolock path, and
//! if that has nothing, its block is mapped beside the heap as during a
//! stalled fork (the lock may be the growth lock: the heap cannot grow); a
//! registry lock's wait returns `None`, as for a lock its own thread
//! holds; a wait that has no fallback (`ZoneLock::lock`: checks, a zone's
//! set-up) reports the lock and aborts. The data such a lock guards may
//! have been left half changed, so it is never taken again. A fork in an
//! orphaned process takes nothing either (its prepare would wait for those
//! locks), so its children are orphaned too. Nor does such a prepare wait
//! for a creation of the global heap in progress on another thread: in the
//! child, the first normal call takes that creation over. Nor is a fork that another
//! thread's prepare was taking or holding at the clone in progress there:
//! its count in `FORKING` is cleared in the child, where it would never
//! end (every miss would wait for it, and no slow path would grow). A
//! prepare of the forking thread's own that the handler interrupted goes
//! on in the child: a lock it has yet to take whose holder is gone is left
//! as it is after the same patience (`ZoneLock::lock_raw`; a registry's
//! `lock_raw` returns `false`), and its release leaves that lock alone
//! (`ZoneLock::force_unlock` releases only what this thread holds across
//! the fork).
//!
//! # Other threads give way
//!
//! glibc's `fork` takes its stdio list lock and its NSS database lock after
//! every prepare handler, so after this one. A signal handler on another
//! thread that interrupted their holder (inside `fopen`, `fflush(NULL)`,
//! `getpwuid`, ...) and allocates must therefore never wait for a lock held
//! here: the fork waits for that thread. (Taking the stdio lock first only
//! reverses the order: a handler that interrupted the allocator and calls
//! `fork` would wait for it; and the NSS lock is not exported.) So no
//! thread but the forking one waits for this fork:
//!
//! 1. prepare counts itself in `FORKING` before it takes its first lock,
//!    and each waitable lock it takes is marked held across the fork
//!    (`ZoneLock::lock_raw`: its waiters are woken);
//! 2. a normal-path `lock_in` on such a lock *gives way*: it returns `None`
//!    at once, as for a lock its own thread holds, and its caller takes
//!    its nolock fallback (a free defers its block, a refill or trim does
//!    nothing);
//! 3. an allocation that then misses waits for the fork to end, at most
//!    [`FORK_PATIENCE`] (not at all once a wait for the same fork ran
//!    out), and is served as usual. A fork still
//!    in progress after that may be waiting for this very thread: the
//!    block is mapped on its own instead, beside the heap, and registered
//!    like a huge block (`free`, `realloc` and `usable_size` handle it as
//!    one; `HeapStats::fork_mapped` counts them), while less than half
//!    the huge table is in use: a slow fork that waits for nobody, with
//!    threads allocating on, would fill it. Beyond that the miss waits for
//!    the fork longer, at most [`FORK_PATIENCE_LAST`] (not at all once
//!    such a wait for the same fork ran out: a handler that interrupted
//!    the thread the fork waits for would hold both a second per call);
//!    a fork still in progress after that gets the rest of the table, and
//!    only then does the allocation fail. A page allocation
//!    (`PageAllocator::alloc_pages`) has no mapping beside the allocator:
//!    after the first wait it takes the nolock path, then the longer wait,
//!    then fails.
//!
//! The frees and allocations that give way use a nolock level's slots only
//! once the fork is stalled (a wait for it ran out: [`fork_stalled`]),
//! where a storm of signal handlers' allocations and frees needs them to
//! recycle its objects: an operation in progress there at the clone would
//! leave the slot held in the child, and its sheaf or list out of reach
//! for good. Before that a free is parked on a deferred stack (one CAS),
//! and a wait or a mapping leaves nothing half done in the heap.
//!
//! The accounting groups' children registry, which prepare holds too, is
//! likewise given way to by an accounted allocation's retry (it flushes
//! only the stocks it can reach without it). A heap registry or accounting
//! registry wait outside allocations (making or dropping a `Heap`,
//! `Group::new`, `Group::usage`) in such a handler still waits for the fork.
//! An explicit drain (`Heap::drain`, `trim`) waits for it at most
//! [`DRAIN_PATIENCE`], then returns with that part of its work undone.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::context;
use crate::slab::{Heap, HeapCore};
use crate::sync::RegistryLock;

/// A heap core's place in the registry.
#[derive(Debug)]
pub(crate) struct ForkLink {
    /// The next registered core (null: the last), under `HEAPS`.
    next: AtomicPtr<HeapCore>,
    /// Linked into the registry (a heap made by `Heap::new`).
    linked: AtomicBool,
    /// Locked by the prepare handler, not yet released.
    locked: AtomicBool,
}

impl ForkLink {
    pub(crate) const fn new() -> Self {
        ForkLink {
            next: AtomicPtr::new(ptr::null_mut()),
            linked: AtomicBool::new(false),
            locked: AtomicBool::new(false),
        }
    }
}

/// Serialises the list, and is held across `fork` by the prepare handler.
static HEAPS: RegistryLock = RegistryLock::new();
/// The first registered core (null: none), under `HEAPS`.
static FIRST: AtomicPtr<HeapCore> = AtomicPtr::new(ptr::null_mut());

/// Whether prepare took the children registry and the heap registry.
static CHILDREN_TAKEN: AtomicBool = AtomicBool::new(false);
static HEAPS_TAKEN: AtomicBool = AtomicBool::new(false);
/// The global heap's core, if prepare locked it (null: not).
static GLOBAL_LOCKED: AtomicPtr<Heap> = AtomicPtr::new(ptr::null_mut());

/// The thread whose `prepare` holds the locks above (its
/// [`context::thread_id`]; 0: none). Set once that prepare holds the
/// children registry, the first lock it takes, so one real prepare at a
/// time sets it (another thread's prepare waits for the registry), and
/// cleared by its `release` before the registry is released.
static HOLDER: AtomicUsize = AtomicUsize::new(0);
/// Forks whose `prepare` is taking or holds the locks and whose parent's
/// `release` has not run yet: normal-path allocations that miss wait for it
/// to drop to 0, at most [`FORK_PATIENCE`] (the word is also their futex).
static FORKING: AtomicU32 = AtomicU32::new(0);

/// Incremented by each `prepare` that counts itself in `FORKING` (never 0).
static FORK_EPOCH: AtomicU32 = AtomicU32::new(0);
/// The last `FORK_EPOCH` for which a wait in [`wait_for_fork`] ran out of
/// patience (0: none): later misses during that fork do not wait for it.
static GAVE_UP: AtomicU32 = AtomicU32::new(0);

/// Set in the child of a fork whose `prepare` took nothing (called by a
/// signal handler that interrupted the allocator), and inherited by that
/// child's own children; never cleared. Such a child may have inherited
/// locks that other threads of its parent held at the clone, which no
/// thread there will ever release (see [Orphaned locks](self#orphaned-locks)).
static ORPHANED: AtomicBool = AtomicBool::new(false);

/// Whether this process may hold locks no thread will release: it is (a
/// descendant of) the child of a fork whose `prepare` took nothing. Its
/// normal-path waits are then bounded ([`ORPHAN_PATIENCE`]). Any context.
#[inline]
pub(crate) fn orphaned() -> bool {
    ORPHANED.load(Ordering::Relaxed)
}

/// How long a normal-path wait for a lock lasts in a process that may hold
/// orphaned locks ([`orphaned`]) before it gives way (or, for a wait that
/// cannot, reports the lock and aborts): far longer than any critical
/// section of a thread that is alive (they last microseconds), so only a
/// lock whose holder is gone, or a holder stopped by a debugger, reaches it.
pub(crate) const ORPHAN_PATIENCE: core::time::Duration = core::time::Duration::from_millis(200);

/// How long an allocation that missed while another thread's fork holds
/// the heap's locks waits for that fork to end before it maps its block
/// beside the heap instead (see [Other threads give way](self#other-threads-give-way)).
/// A fork usually ends within a millisecond; one that waits for this
/// thread ends only after it. Once one wait for a fork ran out, later
/// misses during the same fork do not wait at all: a signal handler that
/// interrupted the thread the fork waits for may run again and again.
pub(crate) const FORK_PATIENCE: core::time::Duration = core::time::Duration::from_millis(2);

/// How long an explicit drain (`Heap::drain`, `trim`, `malloc_trim`) waits
/// for a lock that another thread's fork holds before it gives way and
/// returns with that part of its work undone. A fork usually ends within a
/// millisecond; one that waits for this thread (a drain called from a
/// signal handler that interrupted the holder of one of the locks glibc's
/// `fork` takes after the prepare handlers: stdio's list lock, malloc's
/// arenas) ends only after it.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) const DRAIN_PATIENCE: core::time::Duration = FORK_PATIENCE_LAST;

/// How long an allocation that could not be served beside the heap either
/// (the heap's table of huge blocks is full, or no mapping) waits for the
/// fork before it fails: such a fork is most likely just slow (a large
/// process's page tables, other libraries' handlers), not waiting for this
/// thread, and its end serves the allocation as usual.
pub(crate) const FORK_PATIENCE_LAST: core::time::Duration = core::time::Duration::from_secs(1);

/// The forks in progress before a normal-path attempt ([`fork_mark`]), to
/// tell afterwards whether one may have made it give way
/// ([`forked_elsewhere_since`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForkMark {
    forking: bool,
    epoch: u32,
}

impl ForkMark {
    /// Whether a fork on another thread was taking or held the heap locks
    /// when the mark was taken.
    #[inline]
    pub(crate) fn forking_elsewhere(self) -> bool {
        self.forking && !context::owns_fork_window()
    }
}

/// Notes the forks in progress, before a normal-path attempt. Any context.
#[inline]
pub(crate) fn fork_mark() -> ForkMark {
    ForkMark {
        forking: FORKING.load(Ordering::SeqCst) != 0,
        epoch: FORK_EPOCH.load(Ordering::SeqCst),
    }
}

/// Whether a `fork` on another thread was taking or held the heap locks
/// at any time since `mark` (so a normal-path lock may have given way in
/// between), even if it has ended since: an attempt that failed then must
/// be retried, not reported as out of memory. Any context; read only by
/// attempts that missed.
#[inline]
pub(crate) fn forked_elsewhere_since(mark: ForkMark) -> bool {
    // The attempt read a lock held across the fork with a relaxed load:
    // this fence makes the count that `prepare` stored before it took the
    // lock visible below.
    core::sync::atomic::fence(Ordering::Acquire);
    (mark.forking
        || FORKING.load(Ordering::SeqCst) != 0
        || FORK_EPOCH.load(Ordering::SeqCst) != mark.epoch)
        && !context::owns_fork_window()
}

/// Whether a fork on another thread holds the heap locks and a wait for
/// it already ran out of patience ([`wait_for_fork`]): it may be waiting
/// for this very thread, as when this is a signal handler that interrupted
/// the holder of glibc's stdio lock. Calls that gave way to it then use the
/// nolock levels, where a storm of handlers' allocations and frees recycle
/// their objects (mapping each block beside the heap would take longer
/// than the handlers' period); during a fork that ends in time they do
/// not, so that none is inside a nolock level's slot at the clone (the
/// slot would stay held in the child). Any context.
#[inline]
pub(crate) fn fork_stalled() -> bool {
    FORKING.load(Ordering::SeqCst) != 0
        && GAVE_UP.load(Ordering::Relaxed) == FORK_EPOCH.load(Ordering::SeqCst)
        && !context::owns_fork_window()
}

/// Waits, at most [`FORK_PATIENCE`], until no fork holds the heap locks
/// (not at all if a wait for the same fork ran out before). `true`: none
/// does (any more). Normal context (a futex wait with a timeout).
pub(crate) fn wait_for_fork() -> bool {
    wait_once_per_fork(&GAVE_UP, FORK_PATIENCE)
}

/// The last `FORK_EPOCH` for which a wait in [`wait_for_fork_last`] ran
/// out of patience (0: none).
static GAVE_UP_LAST: AtomicU32 = AtomicU32::new(0);

/// Waits, at most [`FORK_PATIENCE_LAST`], until no fork holds the heap
/// locks; not at all if such a wait for the same fork ran out before. A
/// fork still in progress after a second may be waiting for the caller's
/// thread: a signal handler that interrupted the holder of one of glibc's
/// locks (which its fork takes after the prepare handlers) runs again and
/// again, and each of its calls that waited a second would hold that
/// thread, and so the fork, a second more. `true`: none does (any more).
/// Normal context (a futex wait with a timeout).
pub(crate) fn wait_for_fork_last() -> bool {
    wait_once_per_fork(&GAVE_UP_LAST, FORK_PATIENCE_LAST)
}

/// Waits, at most `patience`, until no fork holds the heap locks, unless
/// `gave_up` says a wait of this kind ran out during the same fork (then
/// only looks); a wait that runs out records the fork's epoch there.
fn wait_once_per_fork(gave_up: &AtomicU32, patience: core::time::Duration) -> bool {
    let epoch = FORK_EPOCH.load(Ordering::SeqCst);
    if gave_up.load(Ordering::Relaxed) == epoch {
        return FORKING.load(Ordering::SeqCst) == 0;
    }
    if wait_for_fork_at_most(patience) {
        return true;
    }
    gave_up.store(epoch, Ordering::Relaxed);
    false
}

/// Waits, at most `patience`, until no fork holds the heap locks (whether
/// or not a wait for the same fork ran out before). `true`: none does (any
/// more). Normal context.
pub(crate) fn wait_for_fork_at_most(patience: core::time::Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let forks = FORKING.load(Ordering::SeqCst);
        if forks == 0 {
            return true;
        }
        let left = patience.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        crate::platform::futex::wait(&FORKING, forks, Some(left));
    }
}

/// The holder thread's `prepare`s that took nothing (a `fork` called by a
/// signal handler that interrupted the holder's own fork) and whose
/// `release` has not run yet. Only the holder thread changes it, and each
/// such fork runs to its end inside the interruption: plain loads and
/// stores.
static SKIPPED: AtomicU32 = AtomicU32::new(0);

/// Links a new heap's core into the registry. Normal context (`Heap::new`).
/// Without the registry (this thread holds it: a heap made in a signal
/// handler that interrupted its own thread there), the heap is not linked
/// and `fork` leaves its locks alone.
pub(crate) fn register(core: &HeapCore) {
    // Marked before the registry is taken, and until it is released (as a
    // zone lock's holder is): a signal handler that forks here takes
    // nothing in its prepare instead of waiting for the children registry,
    // which another thread's prepare may hold while it waits for this one.
    let _inside = context::Inside::enter();
    let Some(g) = HEAPS.lock() else {
        return;
    };
    crate::interrupt_point!(HeapRegistry);
    let link = core.fork_link();
    if g.borrowed() {
        // Made inside the fork window (by a fork handler registered before
        // ours): held across this fork like the others, before anything
        // else (its maintenance thread) can take its locks.
        core.lock_all();
        link.locked.store(true, Ordering::Relaxed);
    }
    link.next
        .store(FIRST.load(Ordering::Relaxed), Ordering::Relaxed);
    FIRST.store(core as *const HeapCore as *mut HeapCore, Ordering::Relaxed);
    link.linked.store(true, Ordering::Relaxed);
}

/// The global heap `h`, just made and not yet published: if this thread
/// owns the fork window, its locks are held across this fork like the
/// others'. (A global heap whose creation another thread starts after
/// prepare looked for it is not: the global heap is made before `main` in
/// practice.)
pub(crate) fn adopt_global(h: &Heap) {
    if context::owns_fork_window() && GLOBAL_LOCKED.load(Ordering::Relaxed).is_null() {
        h.lock_all();
        GLOBAL_LOCKED.store(h as *const Heap as *mut Heap, Ordering::Relaxed);
    }
}

/// Unlinks a heap's core before the heap is torn down. Normal context
/// (dropping a `Heap`).
pub(crate) fn unregister(core: &HeapCore) {
    let link = core.fork_link();
    if !link.linked.load(Ordering::Relaxed) {
        return;
    }
    // Marked, as in `register`.
    let _inside = context::Inside::enter();
    let Some(_g) = HEAPS.lock() else {
        if orphaned() {
            // A thread of the parent held it at the clone (see "Orphaned
            // locks"): no fork here walks the list (their prepares take
            // nothing), so the core may stay on it.
            return;
        }
        // Its thread holds the registry (a heap dropped in a signal handler
        // that interrupted the registry's holder): the core cannot leave
        // the list, and the next fork would walk into freed memory.
        crate::platform::die(
            b"anyalloc: a Heap dropped while its own thread holds the heap registry (in a signal handler?)\n",
        )
    };
    crate::interrupt_point!(HeapRegistry);
    let me = core as *const HeapCore as *mut HeapCore;
    let mut at = &FIRST;
    loop {
        let cur = at.load(Ordering::Relaxed);
        crate::check!(!cur.is_null(), "a linked heap is not in the registry");
        if cur == me {
            at.store(link.next.load(Ordering::Relaxed), Ordering::Relaxed);
            link.linked.store(false, Ordering::Relaxed);
            return;
        }
        // SAFETY: linked cores stay valid until they unlink themselves,
        // which needs the registry this thread holds.
        at = unsafe { &(*cur).fork_link().next };
    }
}

/// Registers the fork handlers. Ordinary context only (`pthread_atfork`
/// takes libc's fork lock and allocates): `Global`'s start-up constructor
/// or `init`.
///
/// `pthread_atfork` registers them with the handle of the object that
/// contains this crate, and `__cxa_finalize` of that object unregisters
/// them: for the main program, that is one of `exit`'s last steps, while
/// the program's other threads still run. A fork on one of them after it
/// would clone the heap with locks other threads hold, and the child would
/// wait for ever for them. So in the main program (glibc) they are
/// registered with no handle, for the life of the process, as glibc's
/// malloc's own fork handling is. In a shared library they keep its
/// handle: once `dlclose` unmapped it, handlers left registered would be
/// called at the next fork.
pub(crate) fn register_atfork() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if in_main_program(prepare as extern "C" fn() as usize) {
        extern "C" {
            /// glibc's registration behind `pthread_atfork`, which passes
            /// the caller's `__dso_handle` (null: never unregistered).
            fn __register_atfork(
                prepare: Option<unsafe extern "C" fn()>,
                parent: Option<unsafe extern "C" fn()>,
                child: Option<unsafe extern "C" fn()>,
                dso_handle: *mut libc::c_void,
            ) -> libc::c_int;
        }
        // SAFETY: the handlers are `extern "C"` functions of the main
        // program, which is never unloaded.
        unsafe {
            __register_atfork(
                Some(prepare),
                Some(release_parent),
                Some(release_child),
                ptr::null_mut(),
            );
        }
        return;
    }
    // SAFETY: the handlers are `extern "C"` functions that live as long as
    // the object that contains them, whose handle `pthread_atfork` passes.
    unsafe {
        libc::pthread_atfork(Some(prepare), Some(release_parent), Some(release_child));
    }
}

/// Whether `addr` lies in the main program (the first object
/// `dl_iterate_phdr` reports) rather than in a shared library.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn in_main_program(addr: usize) -> bool {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `(usize, bool)` below, live for the call;
        // glibc passes a valid `info` whose `dlpi_phdr` holds
        // `dlpi_phnum` program headers.
        unsafe {
            let (addr, found) = &mut *(data as *mut (usize, bool));
            let info = &*info;
            let headers = core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            *found = headers.iter().any(|h| {
                let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
                h.p_type == libc::PT_LOAD && *addr >= start && *addr - start < h.p_memsz as usize
            });
        }
        1 // the first object only
    }
    let mut data = (addr, false);
    // SAFETY: `first` only reads what glibc passes and writes `data`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut data as *mut (usize, bool)).cast()) };
    data.1
}

/// How long `prepare` waits for the holders of the normal path's per-CPU
/// slots to finish before it leaves those slots alone
/// (`SlotLock::hold_all`): a holder waits
/// at most for another thread's short section under a node or zone lock,
/// so only a holder that cannot finish (the forking thread itself,
/// interrupted inside the allocator by the handler that forked) reaches it.
pub(crate) const SLOT_PATIENCE: core::time::Duration = core::time::Duration::from_secs(1);

extern "C" fn prepare() {
    // `fork` called by a signal handler that interrupted this thread inside
    // the allocator: its locks may be this thread's own, so none is taken
    // (as without these handlers) rather than waited for.
    // In a process that may hold orphaned locks, nothing is taken either:
    // a lock no thread releases would keep prepare waiting for ever (its
    // children are orphaned too, see `release`).
    let inside = context::inside() || orphaned();
    // Nothing of the allocator in progress on this thread, no nolock scope:
    // the window may be borrowed (below).
    let clear = context::clear();
    // Marked before the first lock: a signal handler on this thread from
    // here until the window opens takes the nolock route.
    context::enter();
    if inside {
        // Its `release` must leave alone what another fork's prepare took:
        // the locks and records above are process-wide, and may belong to
        // a fork in progress on another thread or, if this handler
        // interrupted the holder's own window, on this one.
        if HOLDER.load(Ordering::Relaxed) == context::thread_id() {
            SKIPPED.store(SKIPPED.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        return;
    }
    // Counted before the first lock: from here a normal-path allocation on
    // another thread that finds a lock given way waits only so long for
    // this fork (see "Other threads give way").
    FORKING.fetch_add(1, Ordering::SeqCst);
    // (0 is "no epoch" for `GAVE_UP`.)
    if FORK_EPOCH.fetch_add(1, Ordering::SeqCst) == u32::MAX {
        FORK_EPOCH.store(1, Ordering::SeqCst);
    }
    // Registries first: their holders may allocate, which needs the heaps'
    // locks. (`false`: this thread holds it already, having forked from a
    // handler that interrupted it there: left alone.) Another thread's
    // fork in progress holds the children registry until its `release`:
    // forks are serialised here.
    CHILDREN_TAKEN.store(crate::account::CHILDREN.lock_raw(), Ordering::Relaxed);
    HOLDER.store(context::thread_id(), Ordering::Relaxed);
    let heaps = HEAPS.lock_raw();
    HEAPS_TAKEN.store(heaps, Ordering::Relaxed);
    // A creation of the global heap in progress on another thread ends
    // before the clone, and its heap is held like the others.
    crate::global::wait_for_creation();
    if let Some(h) = crate::global_heap() {
        h.lock_all();
        GLOBAL_LOCKED.store(h as *const Heap as *mut Heap, Ordering::Relaxed);
    }
    if heaps {
        let mut cur = FIRST.load(Ordering::Relaxed);
        while !cur.is_null() {
            // SAFETY: a linked core, valid while this thread holds the
            // registry (a heap unlinks itself before it is torn down).
            let core = unsafe { &*cur };
            core.lock_all();
            core.fork_link().locked.store(true, Ordering::Relaxed);
            cur = core.fork_link().next.load(Ordering::Relaxed);
        }
    }
    // Every lock held, nothing in progress under them: other fork handlers
    // that run from here until `release` (those registered before ours),
    // and signal handlers that interrupt this thread between them, allocate
    // on the normal path with the locks borrowed.
    if clear {
        context::fork_window_open();
    }
}

extern "C" fn release_parent() {
    if release(false) {
        // Every lock released: threads waiting for this fork go on.
        if orphaned() {
            // This fork's prepare ran on (the clone of) its thread while a
            // signal handler there forked, and the count was cleared in
            // that child (`forks_gone`): it is the only one here.
            FORKING.store(0, Ordering::SeqCst);
        } else {
            FORKING.fetch_sub(1, Ordering::SeqCst);
        }
        crate::platform::futex::wake_many(&FORKING, u32::MAX);
    }
}

extern "C" fn release_child() {
    if release(true) {
        // The only thread: no fork of another thread is in progress here
        // (their prepares were counted in the parent).
        FORKING.store(0, Ordering::SeqCst);
    }
}

/// In the child of a fork whose prepare took nothing (see "Orphaned
/// locks"): the forks that other threads' prepares counted in `FORKING`
/// are not in progress here (their threads are not), and never end: left
/// counted, every miss of the normal path would wait for them (a second at
/// a time, then fail), no slow path would drain, grow or reclaim, and no
/// deferred stack would be taken again. A prepare of this thread's own
/// that the handler interrupted (counted, not yet the holder, or the
/// holder's: `SKIPPED`) goes on here and holds its locks as before; its
/// parent handler finds the process orphaned and clears the count rather
/// than decrementing it. (Their locks stay held, marked held across a
/// fork: the normal path gives way to them as to any orphaned lock.)
fn forks_gone() {
    FORKING.store(0, Ordering::SeqCst);
}

/// The parent's and the child's handler (`child`): releases what
/// `prepare` took. `true` when this fork's `prepare` took the locks (and counted itself
/// in `FORKING`).
fn release(child: bool) -> bool {
    // Only the prepare that took the locks releases them: a fork whose
    // prepare took nothing (called by a signal handler that interrupted
    // the allocator, on any thread) must not release the locks another
    // fork holds across its clone, nor close its window.
    if HOLDER.load(Ordering::Relaxed) != context::thread_id() {
        if child {
            // Other threads' locks were not taken: those held at the clone
            // are never released here.
            ORPHANED.store(true, Ordering::Relaxed);
            forks_gone();
        }
        context::leave();
        return false;
    }
    let skipped = SKIPPED.load(Ordering::Relaxed);
    if skipped > 0 {
        SKIPPED.store(skipped - 1, Ordering::Relaxed);
        if child {
            // As above (here the holder's own fork holds the heaps' locks,
            // but not the try-locks it may have left to other threads).
            ORPHANED.store(true, Ordering::Relaxed);
            forks_gone();
        }
        context::leave();
        return false;
    }
    // Closed before any lock is released: from here a signal handler on
    // this thread takes the nolock route again until `leave`.
    context::fork_window_close();
    let heaps = HEAPS_TAKEN.swap(false, Ordering::Relaxed);
    if heaps {
        let mut cur = FIRST.load(Ordering::Relaxed);
        while !cur.is_null() {
            // SAFETY: as in `prepare`: this thread still holds the registry
            // (the window's own changes to the list were made by it too).
            let core = unsafe { &*cur };
            if core.fork_link().locked.swap(false, Ordering::Relaxed) {
                // SAFETY: `prepare` took every lock of this heap, and this
                // runs once after it, in the parent or in the child.
                unsafe { core.unlock_all(child) };
            }
            cur = core.fork_link().next.load(Ordering::Relaxed);
        }
    }
    let h = GLOBAL_LOCKED.swap(ptr::null_mut(), Ordering::Relaxed);
    if !h.is_null() {
        // SAFETY: `prepare` took every lock of this heap (which lives
        // forever), as above.
        unsafe { (*h).unlock_all(child) };
    }
    if heaps {
        // SAFETY: taken by `prepare`, as above.
        unsafe { HEAPS.force_unlock() };
    }
    // Before the children registry, which the next fork's prepare waits
    // for, is released.
    HOLDER.store(0, Ordering::Relaxed);
    if CHILDREN_TAKEN.swap(false, Ordering::Relaxed) {
        // SAFETY: taken by `prepare`, as above.
        unsafe { crate::account::CHILDREN.force_unlock() };
    }
    // Every lock released: handlers may take the normal path again.
    context::leave();
    true
}
