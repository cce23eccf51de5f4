//! Restartable sequences: the per-CPU fast path with no atomic instruction.
//!
//! # Why
//!
//! A per-CPU sheaf guarded by a try-lock costs two locked instructions per
//! alloc+free pair, most of the pair's time. The kernel's sheaves avoid
//! atomics with `preempt_disable`; user space has the restartable sequence
//! (rseq): a short piece of code described to the kernel by an
//! [`abi::RseqCs`] descriptor. If the thread is preempted, migrated, **or a
//! signal is delivered** while its instruction pointer is inside the
//! section, the kernel moves it to the section's abort address before
//! anything else runs on it. So a signal handler that pops from the same
//! per-CPU sheaf never sees a half-done pop: the interrupted pop starts
//! over after the handler returns. Every context (normal path, nolock path,
//! nested handlers) shares one fast path per CPU.
//!
//! # Rules every sequence follows
//!
//! 1. Everything before the last instruction can be abandoned and redone:
//!    only the final, *committing* store changes what other contexts see.
//! 2. The abort handler jumps back to the store of the descriptor's address
//!    (the kernel clears `rseq_cs` when it aborts), never to `start_ip`,
//!    or the restarted sequence would run unprotected.
//! 3. Sequences only touch the data of the CPU they read from `cpu_id`
//!    inside the section, so two sequences on one CPU are serialised by the
//!    kernel and never run at the same time.
//! 4. No interrupt point, call, or stack use inside a section.
//!
//! # The per-CPU sheaf slot and its lock
//!
//! The sequences work on the level-0 sheaf slot of each CPU (the layout is
//! the contract in [`layout`]; `slab::cache` asserts it):
//!
//! | slot lock | meaning | changed by | a sequence |
//! |---|---|---|---|
//! | free (0) | sequences on this CPU own the main sheaf | the holder's release (Release store) | may commit |
//! | held (0x80), taken locally | a slow path on this CPU holds both sheaves | [`lock_slot`]'s committing `lock cmpxchg`, run on that CPU | exits `Busy` |
//! | held (0x80), taken remotely | another CPU's maintainer or drain holds them | a plain CAS, then [`fence_cpu`] | exits `Busy` |
//!
//! The sheaf push does not test the lock byte itself: it is the top byte
//! of the word the push compares `top` with (the gate,
//! [`layout::SLOT_LIMIT`], whose other bytes are the main sheaf's limit),
//! and every held state has its top bit set, so a held slot's gate reads
//! as negative and the push's signed comparison (`top >= gate`: a full
//! main, or held) fails. Taking the lock closes the push in the same
//! instruction, and the push runs a test fewer (measured: 16-64 B pairs
//! went from 1.01-1.04x jemalloc's time to 0.98-1.03x, in alternating
//! runs; the batch moved within the noise). It reads the gate before `top`, as
//! every sequence reads the lock before what it guards (see
//! `sheaf_push`). The pop and the page sequences test the lock byte (the
//! pop's test of the gate would cost as much: it must read the gate
//! first too, then compare two registers).
//!
//! A remote CAS can land while a sequence on the target CPU has already
//! read "free" and not yet committed. So a remote holder must not touch the
//! sheaves until [`fence_cpu`] has returned: the fence restarts every
//! sequence running on that CPU, and a restarted sequence reads "held".
//! That fence is a syscall, so remote access to level-0 slots belongs to
//! the normal path only; the nolock path never reaches another CPU's
//! level-0 slot while rseq is in use.
//!
//! # Choosing the mechanism
//!
//! Once, when a heap is created ([`available`]): rseq needs x86-64 Linux,
//! glibc's registration (`__rseq_size != 0`), a slot set for every possible
//! CPU, and membarrier's `PRIVATE_EXPEDITED_RSEQ` registration. Otherwise
//! every context uses the try-locked slots (the fallback, the only path in
//! `no_std`). The heap's statistics say which one is in use.

pub(crate) mod abi;

#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
))]
mod x86_64;
#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
))]
pub(crate) use x86_64::{lock_slot, opaque_index, pcp_pop, pcp_push, sheaf_pop, sheaf_push};

#[cfg(not(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
)))]
mod fallback;
#[cfg(not(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
)))]
pub(crate) use fallback::{lock_slot, opaque_index, pcp_pop, pcp_push, sheaf_pop, sheaf_push};

/// What a page sequence needs to find this CPU's level-0 slot, in one
/// place: the caller hands the sequence a single pointer, and the sequence
/// reads the fields itself (they never change once their zone is
/// published), which leaves the caller's fast path more registers.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct SeqTarget {
    /// glibc's rseq area offset ([`glibc_offset`]), which every sequence
    /// uses, registered or not.
    pub(crate) off: isize,
    /// The level-0 slots, laid out as [`layout`] says.
    pub(crate) slots: *const u8,
    /// How many CPUs have a slot; 0 while there is no rseq fast path (the
    /// sequences then fail at their CPU test, having touched only this
    /// thread's rseq area).
    pub(crate) cpus: usize,
    /// The page descriptors whose indices the lists hold.
    pub(crate) descs: *const u8,
}

const _: () = {
    assert!(core::mem::offset_of!(SeqTarget, off) == layout::TARGET_OFF);
    assert!(core::mem::offset_of!(SeqTarget, slots) == layout::TARGET_SLOTS);
    assert!(core::mem::offset_of!(SeqTarget, cpus) == layout::TARGET_CPUS);
    assert!(core::mem::offset_of!(SeqTarget, descs) == layout::TARGET_DESCS);
};

/// The memory layout the sequences work on: one level-0 slot per CPU, at
/// a stride the caller gives (sheaf slots: the heap's per-CPU region, see
/// `slab::cache::LEVEL0_STRIDE`) or `STRIDE` (page slots: all CPUs' level-0
/// slots side by side, the other levels after them, see
/// `page::slot_index`). The sequences use only level 0.
pub(crate) mod layout {
    /// Bytes from one CPU's level-0 page slot to the next: one page slot.
    pub(crate) const STRIDE: usize = 1 << STRIDE_SHIFT;
    /// `log2(STRIDE)`: the page sequences find a CPU's slot with a shift.
    pub(crate) const STRIDE_SHIFT: usize = 7;
    /// A page slot's lock byte (0: free).
    pub(crate) const SLOT_LOCK: usize = 0;
    /// A sheaf slot's lock byte (0: free; every held state has its top
    /// bit set, see `sync::SlotLock`): the most significant byte of the
    /// word at `SLOT_LIMIT`.
    pub(crate) const SHEAF_SLOT_LOCK: usize = SLOT_LIMIT + 7;
    /// The sheaf slot's `top`: the address of the next free entry of its
    /// main sheaf (the sheaf's object array starts the sheaf, which is
    /// `SHEAF_ALIGN`-aligned, so the address's low bits are 8 times the
    /// count: 0 when the sheaf is empty). 0 until the slot is prepared.
    pub(crate) const SLOT_TOP: usize = 8;
    /// The sheaf slot's push gate, a u64: the main sheaf's entry at its
    /// class's capacity (`limit`, in the low seven bytes) under the slot's
    /// lock byte (`SHEAF_SLOT_LOCK`, the top byte). The push sequence
    /// fails at `top >= gate` compared as signed numbers: when the main
    /// sheaf is full, and whenever the slot is held (the lock's top bit
    /// makes the gate negative). 0 until the slot is prepared.
    pub(crate) const SLOT_LIMIT: usize = 16;
    /// The sheaf slot's count of nolock allocations served (u64).
    pub(crate) const SLOT_NOLOCK_OK: usize = 32;
    /// A sheaf sequence's target (the head of a cache,
    /// `slab::cache::Cache`): the CPU count of the normal fast paths
    /// (their gate: 0 while closed) and of the nolock ones (both u64).
    /// The sequences read them themselves, each folded into the
    /// comparison that uses it; they find the slots from the heap's
    /// layout (see `sheaf_pop`).
    pub(crate) const SHEAF_NORMAL_CPUS: usize = 0;
    pub(crate) const SHEAF_NOLOCK_CPUS: usize = 8;
    /// The alignment of a sheaf, whose object array comes first.
    pub(crate) const SHEAF_ALIGN: usize = 2048;
    /// A page slot's list words, one per order (u64: head index in the low
    /// half, block count in the high half). Page slots have the sheaf
    /// slots' lock byte.
    pub(crate) const PCP_LISTS: usize = 8;
    /// A page slot's count of nolock allocations served (u64).
    pub(crate) const PCP_NOLOCK_OK: usize = 48;
    /// A page slot's count of a heap's nolock large blocks served (u64).
    pub(crate) const PCP_HEAP_NOLOCK_OK: usize = 72;
    /// Bytes of a page descriptor.
    pub(crate) const DESC_SIZE: usize = 32;
    /// [`super::SeqTarget`]'s fields.
    pub(crate) const TARGET_OFF: usize = 0;
    pub(crate) const TARGET_SLOTS: usize = 8;
    pub(crate) const TARGET_CPUS: usize = 16;
    pub(crate) const TARGET_DESCS: usize = 24;
    /// A page descriptor's list link (u32 page index).
    pub(crate) const DESC_NEXT: usize = 4;
}

/// This thread's rseq area offset from the thread pointer, if glibc
/// registered one.
#[cfg(all(feature = "std", target_os = "linux", target_env = "gnu"))]
#[inline(always)]
pub(crate) fn area_offset() -> Option<isize> {
    extern "C" {
        static __rseq_size: u32;
    }
    // SAFETY: a plain read of a glibc global set before any thread runs
    // user code and never changed afterwards.
    let size = unsafe { __rseq_size };
    (size != 0).then(glibc_offset)
}

/// A copy of glibc's `__rseq_offset` in a symbol of this crate's own,
/// written by [`prepare_offset`] (and [`available`]) before any sequence
/// runs, for the fast paths.
///
/// Why a copy: code that uses the offset is inlined into the user's crate,
/// where rustc reaches glibc's variable through a GOT slot, so the CPU id,
/// the deepest link of every fast path's chain of loads, waited for two
/// loads before its own. The copy is a hidden word (`sync::hidden_word`),
/// read with one RIP-relative load. Like glibc's, its value never changes
/// once set (every thread of the process has its area at the same offset),
/// and a forked child inherits it.
#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
))]
mod offset_copy {
    use core::sync::atomic::{AtomicIsize, Ordering};

    crate::sync::hidden_word!(mod word = "anyalloc_rseq_offset");

    /// Stores `off` (glibc's offset).
    pub(super) fn set(off: isize) {
        // SAFETY: the hidden word: 8-aligned, 8 bytes, zero at start, live
        // for the whole process; only this function writes it, atomically,
        // always with the same value.
        let cell = unsafe { &*(word::addr() as *const AtomicIsize) };
        if cell.load(Ordering::Relaxed) != off {
            cell.store(off, Ordering::Relaxed);
        }
    }

    /// The copy, with one load. Meaningful once `set` ran: a sequence runs
    /// only on a heap that was built (`prepare_offset`), on this thread or
    /// on one that published the heap to this one; the value never changes
    /// after.
    #[inline(always)]
    pub(super) fn get() -> isize {
        word::load_settled() as isize
    }
}

/// glibc's `__rseq_offset`, for the fast paths: meaningful once
/// [`prepare_offset`] ran (every heap runs it before any of its sequences
/// can). On x86-64, the crate's own copy (`offset_copy`), one load that
/// depends on nothing the caller computes.
#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    target_arch = "x86_64"
))]
#[inline(always)]
pub(crate) fn raw_offset() -> isize {
    offset_copy::get()
}

/// Sets what [`raw_offset`] returns to glibc's `__rseq_offset`, whether
/// or not glibc registered the area: the sheaf sequences run on every fast
/// path, given 0 CPUs when the heap does not use rseq, and then they still
/// store their descriptor's address into this thread's area and read its
/// CPU id (see `sheaf_pop`). glibc (2.35 and later) keeps the area in
/// every thread's descriptor and sets the offset either way; when it did
/// not register the area, the area's CPU id reads -2
/// (`RSEQ_CPU_ID_REGISTRATION_FAILED`). Called when a heap is built,
/// before any of its sequences can run; the value never changes.
#[inline]
pub(crate) fn prepare_offset() {
    #[cfg(all(
        feature = "std",
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    ))]
    offset_copy::set(glibc_offset());
}

/// glibc's `__rseq_offset`, registered or not (see [`prepare_offset`]);
/// 0 where glibc is not the platform, where no sequence runs. The page
/// sequences read it from their zone's [`SeqTarget`].
#[inline]
pub(crate) fn glibc_offset() -> isize {
    #[cfg(all(feature = "std", target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            static __rseq_offset: isize;
        }
        // SAFETY: a plain read of a glibc global set before any thread runs
        // user code and never changed afterwards.
        unsafe { __rseq_offset }
    }
    #[cfg(not(all(feature = "std", target_os = "linux", target_env = "gnu")))]
    0
}

/// glibc's `__rseq_offset` as it is (no sequences run on this
/// architecture; kept for `cpu_hint`'s callers).
#[cfg(all(
    feature = "std",
    target_os = "linux",
    target_env = "gnu",
    not(target_arch = "x86_64")
))]
#[inline(always)]
pub(crate) fn raw_offset() -> isize {
    glibc_offset()
}

/// Elsewhere there is no rseq area: the sequences never run.
#[cfg(not(all(feature = "std", target_os = "linux", target_env = "gnu")))]
#[inline(always)]
pub(crate) fn raw_offset() -> isize {
    0
}

/// The CPU id the kernel last wrote into this thread's rseq area at `off`
/// (outside a sequence: a hint, the thread may migrate right after). A
/// thread whose registration failed reads a negative id: a huge `usize`,
/// which the slot lookups reduce modulo their CPU count.
#[inline(always)]
pub(crate) fn cpu_hint(off: isize) -> usize {
    #[cfg(all(
        feature = "std",
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    ))]
    {
        let cpu: u32;
        // SAFETY: `off` is glibc's `__rseq_offset`: `fs:[off]` is this
        // thread's live `struct rseq`, whose `cpu_id` the kernel maintains.
        unsafe {
            core::arch::asm!(
                "mov {cpu:e}, dword ptr fs:[{off} + {CPU_ID}]",
                off = in(reg) off,
                cpu = out(reg) cpu,
                CPU_ID = const abi::CPU_ID,
                options(nostack, readonly, preserves_flags),
            );
        }
        cpu as usize
    }
    #[cfg(not(all(
        feature = "std",
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )))]
    {
        let _ = off;
        0
    }
}

/// Elsewhere there is no rseq area (`no_std` never asks).
#[cfg(not(all(feature = "std", target_os = "linux", target_env = "gnu")))]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
#[inline(always)]
pub(crate) fn area_offset() -> Option<isize> {
    None
}

#[cfg(all(feature = "std", target_os = "linux"))]
mod membarrier {
    pub(super) const PRIVATE_EXPEDITED_RSEQ: libc::c_long = 1 << 7;
    pub(super) const REGISTER_PRIVATE_EXPEDITED_RSEQ: libc::c_long = 1 << 8;
    pub(super) const FLAG_CPU: libc::c_long = 1;

    /// Whether the call succeeded; `errno` is left as it was either way
    /// (a refusal is answered by a fallback, inside a call that succeeds).
    pub(super) fn call(cmd: libc::c_long, flags: libc::c_long, cpu: libc::c_long) -> bool {
        let _errno = crate::platform::KeepErrno::new();
        // SAFETY: membarrier takes plain integers and touches no user memory.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, flags, cpu) == 0 }
    }
}

/// Runs the calling thread on `cpu` once, then restores its affinity (see
/// `fence_cpu`). `false` when the thread may not run there.
#[cfg(all(feature = "std", target_os = "linux"))]
#[cold]
fn visit_cpu(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    let size = core::mem::size_of::<libc::cpu_set_t>();
    // A CPU this thread may not run on is no error of the caller's.
    let _errno = crate::platform::KeepErrno::new();
    // SAFETY: zeroed cpu_set_t values are valid empty sets; the calls get
    // valid pointers to them and their size, and change only this thread's
    // affinity (restored before returning).
    unsafe {
        let mut old: libc::cpu_set_t = core::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut old) != 0 {
            return false;
        }
        let mut only: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        if libc::sched_setaffinity(0, size, &only) != 0 {
            return false;
        }
        // The call returns on an allowed CPU: `cpu`, the only one.
        let visited = libc::sched_getcpu() == cpu as libc::c_int;
        libc::sched_setaffinity(0, size, &old);
        visited
    }
}

/// Whether a heap with slot sets for `cpus` CPUs can use the rseq fast path
/// (see the module documentation). Normal context: registers this process
/// for membarrier's rseq fence (a syscall).
#[cfg(feature = "std")]
pub(crate) fn available(cpus: usize) -> bool {
    #[cfg(all(
        feature = "std",
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    ))]
    {
        if area_offset().is_none() {
            return false;
        }
        if crate::platform::StdPlatform::rseq_cpu().is_none() {
            return false;
        }
        match crate::platform::StdPlatform::possible_cpus() {
            Some(possible) if cpus >= possible => {}
            _ => return false,
        }
        if !membarrier::call(membarrier::REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) {
            return false;
        }
        // Before the caller enables any sequence (see `raw_offset`).
        prepare_offset();
        true
    }
    #[cfg(not(all(
        feature = "std",
        target_os = "linux",
        target_env = "gnu",
        target_arch = "x86_64"
    )))]
    {
        let _ = cpus;
        false
    }
}

/// Restarts every sequence running on `cpu` now; afterwards no sequence on
/// `cpu` that read a slot before this call can commit. Normal context only
/// (system calls). `false` when it could not (then nothing may be touched).
///
/// With membarrier's rseq fence; if that fails (a seccomp filter installed
/// after the heap chose rseq, say), by running this thread on `cpu` once:
/// a sequence never survives its thread being switched out, so once this
/// thread has run there, every sequence that was in flight on `cpu` has
/// committed or will restart. The thread's affinity is restored after.
pub(crate) fn fence_cpu(cpu: usize) -> bool {
    #[cfg(all(feature = "std", target_os = "linux"))]
    {
        use membarrier::*;
        if call(PRIVATE_EXPEDITED_RSEQ, FLAG_CPU, cpu as libc::c_long) {
            return true;
        }
        // A forked child may not inherit the registration: register again.
        if call(REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0)
            && call(PRIVATE_EXPEDITED_RSEQ, FLAG_CPU, cpu as libc::c_long)
        {
            return true;
        }
        visit_cpu(cpu)
    }
    #[cfg(not(all(feature = "std", target_os = "linux")))]
    {
        let _ = cpu;
        false
    }
}
