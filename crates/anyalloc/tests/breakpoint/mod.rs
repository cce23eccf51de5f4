//! Execution breakpoints and the binary's rseq descriptors, for the tests
//! that stop a thread at chosen instructions of the restartable sequences
//! (`heap_rseq_singlestep.rs`, `global_rseq_singlestep.rs`,
//! `rseq_count_wrap.rs`).
//!
//! * [`arm`]: a hardware execution breakpoint on one address for the
//!   calling thread (perf, `sigtrap`): its hit raises `SIGTRAP`
//!   synchronously, before the instruction runs; [`disable`] stops it from
//!   a handler (async-signal-safe), [`close`] releases it.
//! * [`descriptors`]: every `struct rseq_cs` in this binary's `__rseq_cs`
//!   section, as the crate's assembly emits them.
//! * [`walk`]: the addresses a walk over every byte of a sequence arms
//!   (restart point, section, just past its commit, the abort handler's
//!   first jump); [`section`] the sequence's section.
//! * For a `SIGTRAP` handler: [`disarm`] takes and disables the armed
//!   breakpoint, [`at_abort_address`] tells whether the kernel moved the
//!   thread to an abort handler.
//! * [`assert_walked`]: the verdict every walk shares.

#![allow(dead_code)] // each test binary uses its own part

/// `struct perf_event_attr` (`include/uapi/linux/perf_event.h`, version 8).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 136);

const PERF_TYPE_BREAKPOINT: u32 = 5;
const HW_BREAKPOINT_X: u32 = 4;
const EXCLUDE_KERNEL: u64 = 1 << 5;
const EXCLUDE_HV: u64 = 1 << 6;
const REMOVE_ON_EXEC: u64 = 1 << 36;
const SIGTRAP: u64 = 1 << 37;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;

/// Arms an execution breakpoint at `addr` for this thread (on any CPU);
/// its hit raises `SIGTRAP` synchronously. `None` if the kernel refused.
pub fn arm(addr: usize) -> Option<i32> {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_BREAKPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        sample_period: 1,
        flags: EXCLUDE_KERNEL | EXCLUDE_HV | REMOVE_ON_EXEC | SIGTRAP,
        bp_type: HW_BREAKPOINT_X,
        bp_addr: addr as u64,
        bp_len: 8,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it states;
    // pid 0 / cpu -1: this thread on any CPU; no group, no flags.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, 0, -1, -1, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// Stops breakpoint `fd` from firing (one `ioctl`: async-signal-safe, for
/// the `SIGTRAP` handler).
pub fn disable(fd: i32) {
    // SAFETY: `fd` is a perf event the caller opened with `arm` and has not
    // closed; DISABLE takes no argument.
    unsafe { libc::ioctl(fd, PERF_EVENT_IOC_DISABLE, 0) };
}

/// Releases breakpoint `fd` (once).
pub fn close(fd: i32) {
    // SAFETY: `fd` is a perf event the caller opened with `arm`, closed
    // once.
    unsafe { libc::close(fd) };
}

/// One `struct rseq_cs` as the assembly emits it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RseqCs {
    pub version: u32,
    pub flags: u32,
    pub start_ip: u64,
    pub post_commit_offset: u64,
    pub abort_ip: u64,
}

extern "C" {
    static __start___rseq_cs: RseqCs;
    static __stop___rseq_cs: RseqCs;
}

/// Every sequence descriptor in this binary.
pub fn descriptors() -> Vec<RseqCs> {
    // SAFETY: the linker defines the two symbols around the `__rseq_cs`
    // section, an array of 32-byte descriptors.
    unsafe {
        let start = std::ptr::addr_of!(__start___rseq_cs);
        let stop = std::ptr::addr_of!(__stop___rseq_cs);
        let n = stop.offset_from(start) as usize;
        std::slice::from_raw_parts(start, n).to_vec()
    }
}

/// The signature that precedes every rseq abort address (x86-64, glibc).
pub const RSEQ_SIG: u32 = 0x5305_3053;

/// In a `SIGTRAP` handler: takes the breakpoint `armed` holds (-1: none)
/// and disables it, so that the handler's own calls, which run the same
/// sequences, do not trap. `false`: none was armed (a trap after it was
/// taken). Async-signal-safe.
pub fn disarm(armed: &std::sync::atomic::AtomicI32) -> bool {
    let fd = armed.swap(-1, std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        disable(fd);
    }
    fd >= 0
}

/// In a `SIGTRAP` handler: whether the interrupted instruction is an abort
/// handler's first, as when the kernel moved the thread out of a section
/// before delivering the signal (the signature precedes it).
///
/// # Safety
/// `ctx` is the handler's `SA_SIGINFO` context argument, and the thread
/// was interrupted in this program's text, at least 4 bytes into it.
pub unsafe fn at_abort_address(ctx: *mut libc::c_void) -> bool {
    // SAFETY: the caller passes the ucontext_t the kernel gave.
    let rip =
        unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] }
            as usize;
    // SAFETY: `rip` is in this program's text, at least 4 bytes into it.
    unsafe { (rip as *const u32).sub(1).read_unaligned() == RSEQ_SIG }
}

/// The section of sequence `d`: the addresses the kernel restarts.
pub fn section(d: &RseqCs) -> std::ops::Range<usize> {
    d.start_ip as usize..(d.start_ip + d.post_commit_offset) as usize
}

/// Every address a walk over sequence `d` arms: from its restart point
/// (asserted to lie just before the section) to [`PAST_COMMIT`] bytes past
/// the section's end, then its abort handler's first jump (out of line).
pub fn walk(d: &RseqCs) -> impl Iterator<Item = usize> {
    let (first, last) = restart_and_end(d.abort_ip as usize);
    let s = section(d);
    assert!(
        first < s.start && s.start - first <= 32,
        "restart point {first:#x} not just before the section at {:#x}",
        s.start
    );
    (first..s.end + PAST_COMMIT).chain(d.abort_ip as usize..last)
}

/// Bytes after a section's end that a walk arms too: the first
/// instructions after the commit, which run once the sequence committed
/// and are never restarted. A descriptor whose section ended before its
/// committing instruction would leave the commit among them, where an
/// interruption is not restarted: the handler's pop then takes the object
/// the interrupted pop is about to hand out, which the walks catch.
pub const PAST_COMMIT: usize = 8;

/// A sequence's abort handler starts with a jump back to its restart point
/// (the store of the descriptor's address, and for page sequences the
/// reload of the rseq offset before it): a `jmp`, or for a counting pop a
/// `jnc` over the `jnz` to the restart point (its check of whether to take
/// its count back; every branch of it ends at the restart point). Returns
/// the restart point and the end of that jump: a walk covers every byte
/// from the restart to the end of the section, then the handler's jumps up
/// to that one (the handler is out of line).
fn restart_and_end(abort_ip: usize) -> (usize, usize) {
    let (op, target, end) = jump_at(abort_ip);
    match op {
        Jump::Jmp => (target, end),
        Jump::Jnc => match jump_at(end) {
            (Jump::Jnz, target, end) => (target, end),
            _ => panic!("the abort handler at {abort_ip:#x}: no jnz after its jnc"),
        },
        Jump::Jnz => panic!("the abort handler at {abort_ip:#x} starts with a jnz"),
    }
}

enum Jump {
    Jmp,
    Jnc,
    Jnz,
}

/// The jump at `at`: its kind, target and end.
fn jump_at(at: usize) -> (Jump, usize, usize) {
    // SAFETY: `at` is an address in this binary's text (an abort handler
    // from a descriptor, or the instruction after its first jump), and a
    // jump is at least two bytes long.
    let (op, op2) = unsafe { (*(at as *const u8), *((at + 1) as *const u8)) };
    let rel8 = |kind| {
        let rel = op2 as i8 as isize;
        (kind, (at + 2).wrapping_add_signed(rel), at + 2)
    };
    let rel32 = |kind, len: usize| {
        // SAFETY: as above; the rel32 ends the `len`-byte instruction.
        let rel = unsafe { ((at + len - 4) as *const i32).read_unaligned() } as isize;
        (kind, (at + len).wrapping_add_signed(rel), at + len)
    };
    match (op, op2) {
        (0xeb, _) => rel8(Jump::Jmp),
        (0x73, _) => rel8(Jump::Jnc),
        (0x75, _) => rel8(Jump::Jnz),
        (0xe9, _) => rel32(Jump::Jmp, 5),
        (0x0f, 0x83) => rel32(Jump::Jnc, 6),
        (0x0f, 0x85) => rel32(Jump::Jnz, 6),
        _ => panic!("no jmp, jnc or jnz at {at:#x} (opcode {op:#x})"),
    }
}

/// The verdict every walk shares: no pattern broke and no block was handed
/// out twice (`violations`), sequences of the kinds a round runs executed
/// (object pop, push and lock; the page lists' pop and push: each inlined
/// copy has its own descriptor), many instructions inside sections were
/// interrupted, and every such interruption restarted its sequence (the
/// handler saw the abort address at least as often).
pub fn assert_walked(violations: u64, fired_descs: usize, inside: u64, at_abort: u64) {
    assert_eq!(
        violations, 0,
        "a pattern broke or a block was handed out twice"
    );
    assert!(fired_descs >= 5, "only {fired_descs} sequences ran");
    assert!(
        inside >= 30,
        "only {inside} instructions inside sections were interrupted"
    );
    assert!(
        at_abort >= inside,
        "interruptions inside sections must restart them: {at_abort} of {inside}"
    );
}
