//! `drain` when membarrier stops working after the heap chose restartable
//! sequences (a sandbox that installs a seccomp filter after start-up, as
//! some do): it still empties every CPU's caches.
//!
//! Taking another CPU's level-0 slot needs every sequence in flight there
//! restarted, which membarrier's rseq fence does. When it failed, `drain`
//! (and the maintainer) left every level-0 slot alone, the calling CPU's
//! too: objects and pages stayed cached for good while nothing was in use.
//! Now the fence falls back to running the thread on that CPU once.
//!
//! The scenario runs in a child process under a watchdog (the filter cannot
//! be removed): objects and pages come and go on every allowed CPU, then a
//! filter makes membarrier fail with EPERM for this thread, then `drain`.
//!
//! The refused fences leave `errno` as it was (a drain runs inside an
//! allocation that misses, as its reclaim, and a `malloc` that succeeds
//! leaves `errno` alone): with the `KeepErrno` of `rseq::membarrier::call`
//! removed, the drain left EPERM there (1 of 1).
//!
//! A second test counts the fences: `drain` used to take, and so fence,
//! every level-0 slot of every cache and zone, used or not (about 160
//! membarrier calls, each an interrupt of a CPU, per drain of an idle heap
//! on two CPUs); it now skips the empty ones.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod cpus;
mod seccomp;
mod watchdog;

use std::alloc::Layout;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyalloc::{Config, FastPath, Heap};
use cpus::allowed_cpus;

/// From now on this thread's `membarrier` calls get the seccomp `action`
/// (every other call is allowed).
fn filter_membarrier(action: u32) {
    seccomp::filter_syscall(libc::SYS_membarrier, action, seccomp::ALLOW);
}

/// From now on `membarrier` fails with EPERM for this thread.
fn deny_membarrier() {
    filter_membarrier(seccomp::ERRNO | libc::EPERM as u32);
    // The filter works: the fence's own call now fails.
    // SAFETY: membarrier takes plain integers.
    assert_eq!(unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) }, -1);
}

/// 100 objects of 64 B and 20 pages come and go on this CPU: its sheaf
/// slot of that class and its page list hold some afterwards.
fn fill_this_cpus_caches(heap: &Heap) {
    let l = Layout::from_size_align(64, 8).unwrap();
    let objects: Vec<_> = (0..100).map(|_| heap.alloc(l).unwrap()).collect();
    let pages: Vec<_> = (0..20)
        .map(|_| heap.pages().alloc_pages(0).unwrap())
        .collect();
    for p in objects {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    for p in pages {
        // SAFETY: allocated above, freed once with its order.
        unsafe { heap.pages().free_pages(p, 0) };
    }
}

#[test]
fn drain_empties_every_cpus_caches_when_membarrier_fails() {
    if watchdog::ran_in_child(
        "drain_empties_every_cpus_caches_when_membarrier_fails",
        Duration::from_secs(60),
        "drain after membarrier started failing",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    let cpus = allowed_cpus();
    for &cpu in &cpus {
        assert!(anyalloc_storm::thread::pin_to_cpu(cpu));
        fill_this_cpus_caches(&heap);
    }
    let s = heap.stats();
    let cached =
        |s: &anyalloc::HeapStats| -> usize { s.classes.iter().map(|c| c.cached_in_sheaves).sum() };
    assert!(
        cached(&s) > 0 && s.pages.percpu_pages > 0,
        "nothing cached to drain"
    );
    deny_membarrier();
    // SAFETY: libc's accessor returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = 4242 };
    heap.drain();
    // SAFETY: as above.
    let errno = unsafe { *libc::__errno_location() };
    assert_eq!(errno, 4242, "the drain's refused fences changed errno");
    let s = heap.stats();
    println!(
        "fast path {:?}, {} CPUs: after drain {} objects cached, {} pages on per-CPU lists",
        s.fast_path,
        cpus.len(),
        cached(&s),
        s.pages.percpu_pages
    );
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(
        cached(&s),
        0,
        "objects left in per-CPU sheaves ({:?})",
        s.fast_path
    );
    assert_eq!(s.pages.percpu_pages, 0, "pages left on per-CPU lists");
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
    if s.fast_path == FastPath::Rseq {
        println!("(rseq: the fence fell back to visiting each CPU)");
    }
}

/// membarrier calls trapped (each reported as a success).
static FENCES: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    FENCES.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel's ucontext for this signal; the trapped call's
    // result register is set to 0 (success) for the interrupted code.
    unsafe {
        let uc = uc.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = 0;
    }
}

/// From now on this thread's `membarrier` calls are trapped, counted and
/// reported as successes (without fencing: the scenario has one thread).
fn count_membarrier() {
    // SAFETY: a SIGSYS handler that only counts and sets the result.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        assert_eq!(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()), 0);
    }
    filter_membarrier(seccomp::TRAP);
}

#[test]
fn drain_fences_only_the_slots_that_hold_something() {
    if watchdog::ran_in_child(
        "drain_fences_only_the_slots_that_hold_something",
        Duration::from_secs(60),
        "counting drain's fences",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap();
    if heap.stats().fast_path != FastPath::Rseq {
        println!("no rseq here: drain makes no fence");
        return;
    }
    let cpu = allowed_cpus()[0];
    assert!(anyalloc_storm::thread::pin_to_cpu(cpu));
    // One class's slot and the page list of this CPU hold something.
    fill_this_cpus_caches(&heap);
    count_membarrier();
    heap.drain();
    let busy = FENCES.swap(0, Ordering::Relaxed);
    heap.drain();
    let idle = FENCES.load(Ordering::Relaxed);
    let s = heap.stats();
    println!("membarrier calls: {busy} for a drain with two slots in use, {idle} for a drain of an idle heap");
    assert_eq!(
        s.classes.iter().map(|c| c.cached_in_sheaves).sum::<usize>(),
        0
    );
    assert_eq!(s.pages.percpu_pages, 0);
    assert!(
        (1..=4).contains(&busy),
        "{busy} fences for two slots in use"
    );
    assert_eq!(idle, 0, "fences for empty slots");
}
