//! The maintenance thread is born with every signal blocked.
//!
//! It blocks them itself when it starts, but a thread inherits its
//! creator's mask, and until that first `pthread_sigmask` it ran with the
//! mask of whoever started it (the start-up constructor, `init`, or
//! `Heap::new`: usually nothing blocked). A process-directed signal in that
//! window could be handled on the maintainer: a handler the program meant
//! for its own threads, or the default action of a signal (`SIGTERM`,
//! `SIGINT`) that the program blocks in every thread of its own and takes
//! with `sigwait`: the process died of a signal it had blocked everywhere.
//! So the creator blocks every signal around the spawn.
//!
//! Seen deterministically with ptrace: a grandchild traced with
//! `PTRACE_O_TRACECLONE` makes a heap with maintenance; its new thread
//! stops before it runs a single instruction of its own, and its mask is
//! read from `/proc` there. Before the fix it was the creator's (nothing
//! blocked); now every signal a program can block is.

mod watchdog;

use std::time::Duration;

use anyalloc::{Config, Heap};

/// The signals whose blocking the test checks: those a program commonly
/// handles, or takes with `sigwait`.
const CHECKED: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCHLD,
];

/// `SigBlk` of thread `tid` of process `pid`.
fn blocked_mask(pid: libc::pid_t, tid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .expect("a SigBlk line");
    u64::from_str_radix(line.trim(), 16).unwrap()
}

fn wait(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: waits for a child (or traced thread) of ours.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    assert_eq!(r, pid, "waitpid({pid})");
    status
}

/// The traced grandchild: stops for its tracer, then makes a heap whose
/// maintenance thread starts at once, with nothing blocked on this thread.
fn traced() -> ! {
    // SAFETY: plain system calls of the forked child's only thread.
    unsafe {
        let none = core::mem::zeroed::<libc::sigset_t>();
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, core::ptr::null_mut());
        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            libc::_exit(3);
        }
        libc::raise(libc::SIGSTOP);
    }
    let heap = Heap::new(Config::default().memory(4 << 20).maintenance(true)).unwrap();
    core::mem::forget(heap);
    loop {
        // SAFETY: waits for the tracer's SIGKILL.
        unsafe { libc::pause() };
    }
}

#[test]
fn maintainer_starts_with_signals_blocked() {
    if !watchdog::in_child() {
        let out = watchdog::run_ok(
            "maintainer_starts_with_signals_blocked",
            &[],
            Duration::from_secs(60),
            "the traced heap's creation did not finish",
        );
        assert!(out.stdout.contains("mask checked"), "{}", out.stdout);
        return;
    }
    // SAFETY: the child calls only `traced`, which makes system calls and
    // one heap (the test harness's other thread waits for this one).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        traced();
    }
    let status = wait(pid);
    assert!(
        libc::WIFSTOPPED(status),
        "the child stops for its tracer (status {status:#x}; exit status 3: ptrace refused)"
    );
    // SAFETY: ptrace requests on our stopped, traced child.
    unsafe {
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_SETOPTIONS,
                pid,
                0,
                libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL
            ),
            0
        );
        assert_eq!(libc::ptrace(libc::PTRACE_CONT, pid, 0, 0), 0);
    }
    // The clone event of the heap's maintenance thread.
    let status = wait(pid);
    assert!(
        libc::WIFSTOPPED(status)
            && status >> 8 == (libc::SIGTRAP | (libc::PTRACE_EVENT_CLONE << 8)),
        "expected the maintainer's clone, got status {status:#x}"
    );
    let mut tid: libc::c_ulong = 0;
    // SAFETY: the child is in a ptrace-stop; the kernel writes one word.
    unsafe {
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_GETEVENTMSG,
                pid,
                0,
                &mut tid as *mut libc::c_ulong
            ),
            0
        );
    }
    let tid = tid as libc::pid_t;
    // The new thread's first stop, before it runs anything of its own.
    let status = wait(tid);
    assert!(libc::WIFSTOPPED(status), "the new thread starts stopped");
    // Its mask changes only by `rt_sigprocmask`: follow it from system call
    // to system call through glibc's thread start (which restores the mask
    // the thread inherited: `pthread_create` runs the clone with every
    // signal blocked) to the maintainer's own block, and record the mask
    // at each stop.
    let mut unblocked = None;
    let mut sigprocmask_exits = 0;
    let mut entry = true;
    for _ in 0..2000 {
        // SAFETY: resumes our stopped tracee to its next system call stop.
        unsafe { assert_eq!(libc::ptrace(libc::PTRACE_SYSCALL, tid, 0, 0), 0) };
        let status = wait(tid);
        assert!(
            libc::WIFSTOPPED(status),
            "the maintainer stops, status {status:#x}"
        );
        if libc::WSTOPSIG(status) != (libc::SIGTRAP | 0x80) {
            continue; // a signal stop (none is expected); the signal is dropped
        }
        let mask = blocked_mask(pid, tid);
        if unblocked.is_none() && CHECKED.iter().any(|&sig| mask & (1u64 << (sig - 1)) == 0) {
            unblocked = Some(mask);
        }
        // SAFETY: reads the stopped tracee's registers into a plain struct.
        let regs = unsafe {
            let mut regs = core::mem::zeroed::<libc::user_regs_struct>();
            assert_eq!(libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs), 0);
            regs
        };
        if !entry && regs.orig_rax == libc::SYS_rt_sigprocmask as u64 {
            sigprocmask_exits += 1;
            if sigprocmask_exits == 2 {
                break;
            }
        }
        entry = !entry;
    }
    assert_eq!(
        sigprocmask_exits, 2,
        "glibc's restore and the maintainer's block"
    );
    // SAFETY: ends the traced child (and its threads); we reap it below.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Reap every traced thread (the tracer must, before the process's own
    // exit is reported), then the process.
    loop {
        let mut st = 0;
        // SAFETY: reaps children and traced threads of ours.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::__WALL) };
        if r == pid || r < 0 {
            break;
        }
    }
    if let Some(mask) = unblocked {
        panic!(
            "the maintenance thread ran with signals unblocked (SigBlk {mask:016x}) before it \
             blocked them: a process-directed signal could be handled there"
        );
    }
    println!("mask checked");
}
