//! Execution breakpoints and the binary's rseq descriptors, for the tests
//! that stop a thread at chosen instructions of the restartable sequences
//! (`heap_rseq_singlestep.rs`, `rseq_count_wrap.rs`).
//!
//! * [`arm`]: a hardware execution breakpoint on one address for the
//!   calling thread (perf, `sigtrap`): its hit raises `SIGTRAP`
//!   synchronously, before the instruction runs; [`disable`] stops it from
//!   a handler (async-signal-safe), [`close`] releases it.
//! * [`descriptors`]: every `struct rseq_cs` in this binary's `__rseq_cs`
//!   section, as the crate's assembly emits them.

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
