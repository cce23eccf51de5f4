//! The kernel's rseq ABI (`include/uapi/linux/rseq.h`), field by field.
//!
//! glibc (2.35 and later) registers one [`Rseq`] area per thread, at
//! `__rseq_offset` bytes from the thread pointer; `__rseq_size` is 0 when
//! registration failed or was switched off
//! (`GLIBC_TUNABLES=glibc.pthread.rseq=0`). glibc 2.36 reports 20 here, not
//! 32: test for non-zero, never for the struct's size.

/// One thread's rseq area, as the kernel reads and writes it.
#[allow(dead_code)] // read through offsets by the sequences' assembly
#[repr(C, align(32))]
pub(crate) struct Rseq {
    /// The CPU the thread last started running on (kept in range even while
    /// registration is incomplete). Read-only for user space.
    pub(crate) cpu_id_start: u32,
    /// The CPU the thread runs on; -1 before registration, -2 when it
    /// failed. Read-only for user space.
    pub(crate) cpu_id: u32,
    /// Address of the [`RseqCs`] of the sequence in progress, or 0. Written
    /// by user space; cleared by the kernel when it aborts a sequence.
    pub(crate) rseq_cs: u64,
    /// Restart-on flags (deprecated; must stay 0).
    pub(crate) flags: u32,
    /// NUMA node id (kernel 6.3 and later).
    pub(crate) node_id: u32,
    /// Concurrency id (kernel 6.3 and later).
    pub(crate) mm_cid: u32,
}

/// The descriptor of one critical section. Emitted by the sequences'
/// assembly into the `__rseq_cs` section; this type documents its layout.
#[allow(dead_code)] // emitted by the assembly, never built in Rust
#[repr(C, align(32))]
pub(crate) struct RseqCs {
    /// 0.
    pub(crate) version: u32,
    /// 0.
    pub(crate) flags: u32,
    /// First instruction of the section.
    pub(crate) start_ip: u64,
    /// Bytes from `start_ip` to just after the committing instruction.
    pub(crate) post_commit_offset: u64,
    /// Where the kernel moves the thread when it interrupts the section
    /// (preemption, migration, signal delivery). Preceded by [`RSEQ_SIG`].
    pub(crate) abort_ip: u64,
}

/// The signature glibc registered the areas with, which the kernel checks in
/// the four bytes before every `abort_ip` (x86-64).
#[allow(dead_code)] // used by the x86-64 sequences only
pub(crate) const RSEQ_SIG: u32 = 0x5305_3053;

/// Byte offset of [`Rseq::cpu_id`].
pub(crate) const CPU_ID: usize = core::mem::offset_of!(Rseq, cpu_id);
/// Byte offset of [`Rseq::rseq_cs`].
pub(crate) const RSEQ_CS: usize = core::mem::offset_of!(Rseq, rseq_cs);

const _: () = assert!(CPU_ID == 4 && RSEQ_CS == 8);
const _: () = assert!(core::mem::size_of::<RseqCs>() == 32);
const _: () = assert!(core::mem::size_of::<Rseq>() == 32);
