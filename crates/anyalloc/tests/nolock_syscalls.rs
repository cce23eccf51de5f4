//! System calls on the nolock path (feature
//! `interrupt-points`, x86-64 Linux).
//!
//! A thread installs a seccomp filter that traps every system call it makes
//! (except `rt_sigreturn`, to return from the trap's handler); the `SIGSYS`
//! handler counts them. While its own normal-path allocation holds the zone
//! lock (the `ZoneAlloc` site), the hook frees 200 large blocks with
//! `free_nolock`: the zone is busy, so each is parked on the deferred stack
//! and the maintainer (sleeping, with nothing to do) is told.
//!
//! * Default configuration: before the fix every parked free issued a
//!   `FUTEX_WAKE` (200 system calls); now only the first, which finds the
//!   maintainer asleep, does: at most one per maintainer sleep, and the
//!   maintainer cannot go back to sleep while the zone lock is held.
//! * `Config::nolock_syscalls(false)`: not a single system call.
//!
//! Each scenario runs in a child process under a watchdog; the child exits
//! with `_exit` while the filtered thread spins (it could not even exit).

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod seccomp;
mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, Heap};

static HEAP: OnceLock<Heap> = OnceLock::new();
static BLOCKS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNTING: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
static SYSCALLS: AtomicU64 = AtomicU64::new(0);
static FUTEX: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);

const BLOCKS_FREED: usize = 200;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if !COUNTING.load(Ordering::Relaxed) {
        return;
    }
    SYSCALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel's siginfo for SIGSYS: `si_syscall` is the int at
    // byte 24 (after signo, errno, code and the 8-byte call address).
    let nr = unsafe { (info as *const u8).add(24).cast::<libc::c_int>().read() };
    if nr as libc::c_long == libc::SYS_futex {
        FUTEX.fetch_add(1, Ordering::Relaxed);
    }
}

/// Traps every system call of the calling thread but `rt_sigreturn`.
fn trap_all_syscalls() {
    seccomp::filter_syscall(libc::SYS_rt_sigreturn, seccomp::ALLOW, seccomp::TRAP);
}

fn hook(site: Site) {
    if site != Site::ZoneAlloc || !ARMED.swap(false, Ordering::SeqCst) {
        return;
    }
    let heap = HEAP.get().unwrap();
    let blocks = std::mem::take(&mut *BLOCKS.lock().unwrap());
    COUNTING.store(true, Ordering::SeqCst);
    for &b in &blocks {
        // SAFETY: allocated by this heap (64 KiB), freed once.
        unsafe { heap.free_nolock(NonNull::new(b as *mut u8).unwrap()) };
    }
    COUNTING.store(false, Ordering::SeqCst);
    FREED.store(blocks.len() as u64, Ordering::SeqCst);
}

/// The scenario, in the child: prints the counts and `_exit`s.
fn scenario(config: Config) -> ! {
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()), 0);
    }
    let heap = HEAP.get_or_init(|| Heap::new(config.memory(64 << 20).cpus(1)).unwrap());
    let layout = Layout::from_size_align(64 << 10, 8).unwrap();
    *BLOCKS.lock().unwrap() = (0..BLOCKS_FREED)
        .map(|_| heap.alloc(layout).unwrap().as_ptr() as usize)
        .collect();
    // Let the idle maintainer reach its sleep (if it has not, it is only
    // less likely to be woken: the bound below holds either way).
    std::thread::sleep(Duration::from_millis(200));
    interrupt::set_hook(Some(hook));
    std::thread::spawn(|| {
        trap_all_syscalls();
        ARMED.store(true, Ordering::SeqCst);
        // Normal path, above the per-CPU orders: the zone lock, directly.
        let big = HEAP
            .get()
            .unwrap()
            .alloc(Layout::from_size_align(128 << 10, 8).unwrap());
        assert!(big.is_some());
        DONE.store(true, Ordering::SeqCst);
        // No system call is possible any more, not even exit: spin.
        loop {
            std::hint::spin_loop();
        }
    });
    while !DONE.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (n, futex) = (
        SYSCALLS.load(Ordering::SeqCst),
        FUTEX.load(Ordering::SeqCst),
    );
    println!(
        "freed {} blocks with free_nolock: {n} system calls, {futex} of them futex",
        FREED.load(Ordering::SeqCst)
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let ok = FREED.load(Ordering::SeqCst) == BLOCKS_FREED as u64
        && if config == Config::default() {
            n <= 1 && n == futex
        } else {
            n == 0
        };
    // SAFETY: _exit has no preconditions; the filtered thread never ends.
    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
}

#[test]
fn parked_frees_wake_the_maintainer_at_most_once_per_sleep() {
    if watchdog::in_child() {
        scenario(Config::default());
    }
    let out = watchdog::run_ok(
        "parked_frees_wake_the_maintainer_at_most_once_per_sleep",
        &[],
        Duration::from_secs(60),
        "nolock frees with the default configuration",
    );
    assert!(out.stdout.contains("freed 200 blocks"), "{}", out.stdout);
    println!("{}", out.stdout.trim());
}

#[test]
fn without_nolock_syscalls_the_nolock_path_makes_none() {
    if watchdog::in_child() {
        scenario(Config::default().nolock_syscalls(false));
    }
    let out = watchdog::run_ok(
        "without_nolock_syscalls_the_nolock_path_makes_none",
        &[],
        Duration::from_secs(60),
        "nolock frees with nolock_syscalls(false)",
    );
    assert!(out.stdout.contains("freed 200 blocks"), "{}", out.stdout);
    println!("{}", out.stdout.trim());
}
