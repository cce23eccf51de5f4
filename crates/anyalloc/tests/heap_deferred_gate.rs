//! The normal fast path's gate and the deferred stack, made deterministic
//! with interrupt points (feature `interrupt-points`).
//!
//! With restartable sequences a cache closes its normal fast path while
//! objects are parked on its deferred stack (a nolock free that found every
//! slot and the node lock held), so that the next normal operation takes
//! the slow path and drains them; the drain reopens it. A context that takes
//! the stack for a while hides it from a drain: the exact double-free check
//! (a free that found the key in the object) takes it to walk it. A normal
//! operation that runs meanwhile (here at the check's interrupt point, as
//! another thread could) finds nothing to drain and reopens the fast path.
//! So the check, putting the stack back, must close the fast path again, as
//! a deferred push does: otherwise the parked objects stay parked behind an
//! open fast path until some slow path happens to run.
//!
//! The first test checks the gate itself: a deferred free closes it, and
//! the next normal operation drains. The third checks the other context
//! that takes the stack and puts part of it back: a nolock allocation that
//! found the barn empty and the node lock held takes parked objects
//! (`alloc_deferred`), while
//! a normal operation on another CPU reopens the gate.
//!
//! Without restartable sequences (`GLIBC_TUNABLES=glibc.pthread.rseq=0`)
//! there is no gate; the first two tests then check the rest (the stack is
//! put back whole and the next normal operation drains it), and the third
//! has nothing to check.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Config, FastPath, Heap};

const SIZE: usize = 64;
static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// What the hook does: nothing, park objects, or run normal operations.
static MODE: AtomicUsize = AtomicUsize::new(OFF);
const OFF: usize = 0;
/// At a flush to the slabs (the barn full; level-0 slot and node lock
/// held): nolock-free every object in `TO_PARK`; what the other level
/// slots cannot take is deferred.
const PARK: usize = 1;
/// At the exact double-free check: a normal allocation and free.
const REOPEN: usize = 2;
/// Where a nolock allocation has taken the deferred stack: a normal
/// allocation and free by a thread on `OTHER_CPU`.
const REOPEN_REMOTE: usize = 3;
/// After parking (`PARK`), nolock allocations until one takes parked
/// objects (into `TAKEN`), with `REOPEN_REMOTE` armed.
static TAKE_AFTER_PARK: AtomicBool = AtomicBool::new(false);
/// (More than the barn's full sheaves hold, 3840 objects of 64 B in the
/// 16 MiB heap of `setup`, which the nolock allocations take first.)
static TAKEN: [AtomicUsize; 8192] = [const { AtomicUsize::new(0) }; 8192];
static OTHER_CPU: AtomicUsize = AtomicUsize::new(0);
static REMOTE_DONE: AtomicBool = AtomicBool::new(false);
/// (More than this CPU's other levels' sheaves hold, 960 of 64 B: two
/// levels, a main and a spare each; the nolock frees try only this CPU's
/// levels, then park.)
static TO_PARK: [AtomicUsize; 4096] = [const { AtomicUsize::new(0) }; 4096];
/// How many times the hook acted (it acts once per mode).
static ACTED: AtomicUsize = AtomicUsize::new(0);
/// The tests share the statics above and the hook: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

fn heap() -> &'static Heap {
    // SAFETY: set before the hook is installed, leaked.
    unsafe { &*HEAP.load(Ordering::Acquire) }
}

fn deferred() -> usize {
    let s = heap().stats();
    s.classes.iter().find(|c| c.size >= SIZE).unwrap().deferred
}

fn hook(site: Site) {
    let h = heap();
    match (MODE.load(Ordering::Relaxed), site) {
        (PARK, Site::SheafFlush) => {
            // Once: the frees below reach sites of their own.
            MODE.store(OFF, Ordering::Relaxed);
            for p in &TO_PARK {
                if let Some(p) = NonNull::new(p.swap(0, Ordering::Relaxed) as *mut u8) {
                    // SAFETY: a live object of this heap, handed to the hook.
                    unsafe { h.free_nolock(p) };
                }
            }
            if TAKE_AFTER_PARK.load(Ordering::Relaxed) {
                // Empty this CPU's other levels and the barn: the
                // allocation after them finds the node lock held and takes
                // parked objects.
                MODE.store(REOPEN_REMOTE, Ordering::Relaxed);
                for t in &TAKEN {
                    let p = h.alloc_nolock(layout()).expect("a nolock allocation");
                    t.store(p.as_ptr() as usize, Ordering::Relaxed);
                    if REMOTE_DONE.load(Ordering::Relaxed) {
                        break;
                    }
                }
                MODE.store(OFF, Ordering::Relaxed);
            }
            ACTED.fetch_add(1, Ordering::Relaxed);
        }
        (REOPEN_REMOTE, Site::ObjectDeferredDrain) => {
            MODE.store(OFF, Ordering::Relaxed);
            // This thread holds its CPU's level-0 slot and the node lock:
            // the normal operation runs where another CPU would run it,
            // from the objects its level-0 slot holds (no node lock).
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                assert!(anyalloc_storm::thread::pin_to_cpu(
                    OTHER_CPU.load(Ordering::Relaxed)
                ));
                let h = heap();
                let p = h.alloc(layout()).expect("a normal allocation");
                // SAFETY: just allocated.
                unsafe { h.free(p) };
                tx.send(()).unwrap();
            });
            // A watchdog, not a timing assertion: a refill there would wait
            // for the node lock this thread holds.
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("the other CPU's normal operation did not finish");
            REMOTE_DONE.store(true, Ordering::Relaxed);
        }
        (REOPEN, Site::DoubleFreeCheck) => {
            MODE.store(OFF, Ordering::Relaxed);
            let p = h.alloc(layout()).expect("a normal allocation");
            // SAFETY: just allocated.
            unsafe { h.free(p) };
            ACTED.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// A heap (no maintainer: it would drain; 16 MiB, whose barns are the
/// smallest, so that the frees of `park` overflow one with few objects)
/// with the calling thread pinned,
/// whether it uses restartable sequences, and the tests' lock. Without
/// restartable sequences there is no gate (every normal operation looks at
/// the deferred stack), and the rest of the tests still holds.
fn setup() -> (&'static Heap, bool, MutexGuard<'static, ()>) {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let heap: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap(),
    ));
    // One CPU's slots for every operation below (the heap has slots for
    // every CPU; the fast paths use the one the thread runs on).
    assert!(
        anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu()),
        "could not pin the thread"
    );
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    (heap, heap.stats().fast_path == FastPath::Rseq, serial)
}

/// Parks objects on the deferred stack: normal frees until one flushes,
/// and nolock frees inside the flush, more than the other level slots'
/// sheaves hold. Returns how many are parked and the objects not freed.
fn park(heap: &Heap) -> (usize, Vec<NonNull<u8>>) {
    for p in &TO_PARK {
        p.store(
            heap.alloc(layout()).unwrap().as_ptr() as usize,
            Ordering::Relaxed,
        );
    }
    // More than the slot's sheaves and the barn's hold (4320 of 64 B).
    let class = *heap
        .stats()
        .classes
        .iter()
        .find(|c| c.size == SIZE)
        .unwrap();
    assert!(
        class.barn_capacity < TAKEN.len(),
        "TAKEN must outnumber the barn's objects: {class:?}"
    );
    let n = class.barn_capacity + 2 * class.sheaf_capacity + 3600;
    let mut objs: Vec<NonNull<u8>> = (0..n).map(|_| heap.alloc(layout()).unwrap()).collect();
    let acted = ACTED.load(Ordering::Relaxed);
    set_hook(Some(hook));
    MODE.store(PARK, Ordering::Relaxed);
    while ACTED.load(Ordering::Relaxed) == acted {
        let p = objs.pop().expect("no free flushed a sheaf");
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    set_hook(None);
    let parked = deferred();
    assert!(parked > 0, "no free was deferred");
    (parked, objs)
}

/// The next normal operation drains the deferred stack; then everything
/// goes back.
fn next_normal_operation_drains(heap: &Heap, rseq: bool, objs: Vec<NonNull<u8>>) {
    let p = heap.alloc(layout()).unwrap();
    assert_eq!(
        deferred(),
        0,
        "the normal fast path was open over parked objects (rseq: {rseq})"
    );
    // SAFETY: allocated just above.
    unsafe { heap.free(p) };
    for p in objs {
        // SAFETY: allocated by `park`, not freed yet.
        unsafe { heap.free(p) };
    }
    heap.drain();
    let s = heap.stats();
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.pages.free_pages, s.pages.total_pages, "pages leaked");
}

#[test]
fn a_deferred_free_closes_the_normal_fast_path() {
    let (heap, rseq, _serial) = setup();
    let (parked, objs) = park(heap);
    println!("parked {parked} objects (rseq: {rseq})");
    next_normal_operation_drains(heap, rseq, objs);
}

/// As above, with a free as the next normal operation: the gate closes
/// the free's fast path too (`seq_push` of `Mode::Normal` reads the
/// normal gate; reading the nolock one, which never closes, the free went
/// into the sheaf and left the objects parked, 1 of 1).
#[test]
fn a_deferred_free_closes_the_normal_free_fast_path() {
    let (heap, rseq, _serial) = setup();
    let (parked, mut objs) = park(heap);
    println!("parked {parked} objects (rseq: {rseq})");
    let p = objs.pop().unwrap();
    // SAFETY: allocated by `park`, not freed yet.
    unsafe { heap.free(p) };
    assert_eq!(
        deferred(),
        0,
        "the normal free's fast path was open over parked objects (rseq: {rseq})"
    );
    next_normal_operation_drains(heap, rseq, objs);
}

#[test]
fn a_double_free_check_leaves_the_normal_fast_path_closed_over_parked_objects() {
    let (heap, rseq, _serial) = setup();
    // The class's double-free key (a freed object's key word, its second)
    // and a live object to write it into, taken before anything is parked
    // (a normal operation afterwards would drain).
    let probe = heap.alloc(layout()).unwrap();
    // SAFETY: just allocated here.
    unsafe { heap.free(probe) };
    // SAFETY: the freed object's memory stays mapped: read its key word.
    let key = unsafe { probe.as_ptr().add(8).cast::<usize>().read() };
    let forged = heap.alloc(layout()).unwrap();
    let (parked, objs) = park(heap);
    println!("parked {parked} objects (rseq: {rseq})");

    // The exact check walks the stack (a nolock free, whose slow path does
    // not drain), and a normal operation runs meanwhile.
    let acted = ACTED.load(Ordering::Relaxed);
    set_hook(Some(hook));
    MODE.store(REOPEN, Ordering::Relaxed);
    // SAFETY: `forged` is live, SIZE bytes, owned here; its key word holds
    // the key, so the free runs the exact check, which finds it live.
    unsafe {
        forged.as_ptr().add(8).cast::<usize>().write(key);
        heap.free_nolock(forged);
    }
    set_hook(None);
    assert_eq!(
        ACTED.load(Ordering::Relaxed),
        acted + 1,
        "the exact check did not run"
    );
    assert_eq!(deferred(), parked, "the stack was not put back whole");
    next_normal_operation_drains(heap, rseq, objs);
}

#[test]
fn taking_parked_objects_leaves_the_normal_fast_path_closed() {
    // This thread's affinity mask, before `setup` pins it.
    // SAFETY: a zeroed cpu_set_t is the empty set, filled by the kernel.
    let mask = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        set
    };
    let (heap, rseq, _serial) = setup();
    if !rseq {
        // Without rseq there is no gate, and the other CPU's level-0 slot
        // is open to this CPU's nolock allocations, which would take its
        // objects before the parked ones: nothing here applies.
        return;
    }
    // Another CPU of the mask than the one `setup` pinned this thread to.
    let here = anyalloc_storm::thread::current_cpu();
    // SAFETY: CPU_ISSET reads inside the set, for c < CPU_SETSIZE.
    let other = (0..libc::CPU_SETSIZE as usize)
        .find(|&c| c != here && unsafe { libc::CPU_ISSET(c, &mask) });
    let Some(other) = other else {
        assert!(
            std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
            "this test needs two CPUs; set ANYALLOC_ALLOW_SKIP=1 to skip"
        );
        eprintln!("skipped: this test needs two CPUs");
        return;
    };
    OTHER_CPU.store(other, Ordering::Relaxed);
    // Stock the other CPU's level-0 slot (its main sheaf neither empty nor
    // full), so its normal operation needs no node lock.
    let kept = std::thread::spawn(move || {
        assert!(anyalloc_storm::thread::pin_to_cpu(other));
        let h = self::heap();
        let a = h.alloc(layout()).unwrap();
        let b = h.alloc(layout()).unwrap();
        // SAFETY: allocated just above.
        unsafe { h.free(a) };
        b.as_ptr() as usize
    })
    .join()
    .unwrap();

    TAKE_AFTER_PARK.store(true, Ordering::Relaxed);
    let (_, mut objs) = park(heap);
    TAKE_AFTER_PARK.store(false, Ordering::Relaxed);
    assert!(
        REMOTE_DONE.load(Ordering::Relaxed),
        "no nolock allocation took parked objects"
    );
    assert!(deferred() > 0, "nothing was put back");
    println!("{} objects still parked (rseq: {rseq})", deferred());
    objs.extend(
        TAKEN
            .iter()
            .filter_map(|t| NonNull::new(t.swap(0, Ordering::Relaxed) as *mut u8)),
    );
    objs.push(NonNull::new(kept as *mut u8).unwrap());
    next_normal_operation_drains(heap, rseq, objs);
}
