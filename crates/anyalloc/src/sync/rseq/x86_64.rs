//! The x86-64 sequences. Each `asm!` block is one sequence:
//!
//! * its descriptor, emitted into `__rseq_cs` from the same block
//!   (numeric labels only: inlining duplicates the block, descriptor and
//!   all);
//! * a restart point that stores the descriptor's address into this
//!   thread's `rseq_cs` (`fs:[off + 8]`), then the section itself, which
//!   reads `cpu_id` (`fs:[off + 4]`), finds that CPU's level-0 slot, and
//!   ends with one committing instruction (marked `// commit`);
//! * after the section, the signature and the abort handler, which jumps
//!   back to the restart point;
//! * the failure exits, outside the section.
//!
//! Registers: `off` = `__rseq_offset`, `slots` = the slot array, `cpus` =
//! CPUs with a slot group; scratch registers are named for what they hold.

use super::abi::{CPU_ID, RSEQ_CS, RSEQ_SIG};
use super::layout::*;
use super::SeqFail;

/// Status codes the sequences leave in their status register.
const OK: usize = 0;
const BUSY: usize = 1;
const EXHAUSTED: usize = 2;
const DUPLICATE: usize = 3;

#[inline(always)]
fn status(st: usize) -> Result<(), SeqFail> {
    match st {
        OK => Ok(()),
        BUSY => Err(SeqFail::Busy),
        EXHAUSTED => Err(SeqFail::Exhausted),
        _ => Err(SeqFail::Duplicate),
    }
}

/// Pops an object from this CPU's level-0 main sheaf and adds `count` (0 or
/// 1) to the slot's nolock counter:
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu = rseq->cpu_id;            if cpu >= cpus: Busy
///          slot = slots + cpu * STRIDE;   if slot.lock != 0: Busy
///          sheaf = slot.main; n = sheaf.count; if n == 0: Exhausted
///          obj = sheaf.objs[n - 1]
///          slot.nolock_ok += count        (this CPU only; redone on restart:
///                                          may overcount, never undercount)
///          sheaf.count = n - 1            // commit
/// ```
///
/// # Safety
/// `off` is this thread's registered rseq offset ([`super::area_offset`]);
/// `slots` points to `cpus` slot groups laid out as [`super::layout`] says,
/// each main pointer a valid sheaf, live as long as the call; only
/// sequences and lock holders (see the module documentation) change them.
#[inline(always)]
pub(crate) unsafe fn sheaf_pop(
    off: isize,
    slots: *const u8,
    cpus: usize,
    count: u64,
) -> Result<usize, SeqFail> {
    let st: usize;
    let obj: usize;
    // SAFETY: per the contract; the block touches only this thread's rseq
    // area and the current CPU's slot and main sheaf, uses no stack, and
    // commits with its last store.
    unsafe {
        core::arch::asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "20:",
            ".long 0, 0",
            ".quad 21f, 22f - 21f, 24f",
            ".popsection",
            "xor {st:e}, {st:e}",
            "23:",
            "lea {t}, [rip + 20b]",
            "mov qword ptr fs:[{off} + {RSEQ_CS}], {t}",
            "21:",
            "mov {t:e}, dword ptr fs:[{off} + {CPU_ID}]",
            "cmp {t}, {cpus}",
            "jae 25f",
            "imul {t}, {t}, {STRIDE}",
            "add {t}, {slots}",
            "cmp byte ptr [{t} + {SLOT_LOCK}], 0",
            "jne 25f",
            "mov {sheaf}, qword ptr [{t} + {SLOT_MAIN}]",
            "mov {n}, qword ptr [{sheaf} + {SHEAF_COUNT}]",
            "test {n}, {n}",
            "jz 26f",
            "mov {obj}, qword ptr [{sheaf} + {n} * 8 + {SHEAF_OBJS} - 8]",
            "add qword ptr [{t} + {SLOT_NOLOCK_OK}], {count}",
            "dec {n}",
            "mov qword ptr [{sheaf} + {SHEAF_COUNT}], {n}", // commit
            "22:",
            "jmp 29f",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long {SIG}",
            "24:",
            "jmp 23b",
            "25:",
            "mov {st:e}, {BUSY}",
            "jmp 29f",
            "26:",
            "mov {st:e}, {EXHAUSTED}",
            "29:",
            off = in(reg) off,
            slots = in(reg) slots,
            cpus = in(reg) cpus,
            count = in(reg) count,
            st = out(reg) st,
            obj = out(reg) obj,
            t = out(reg) _,
            sheaf = out(reg) _,
            n = out(reg) _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            STRIDE = const STRIDE,
            SLOT_LOCK = const SLOT_LOCK,
            SLOT_MAIN = const SLOT_MAIN,
            SLOT_NOLOCK_OK = const SLOT_NOLOCK_OK,
            SHEAF_COUNT = const SHEAF_COUNT,
            SHEAF_OBJS = const SHEAF_OBJS,
            SIG = const RSEQ_SIG,
            BUSY = const BUSY,
            EXHAUSTED = const EXHAUSTED,
            options(nostack),
        );
    }
    status(st).map(|()| obj)
}

/// Pushes `obj` onto this CPU's level-0 main sheaf:
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu, slot as in sheaf_pop;      Busy if none or held
///          sheaf = slot.main; n = sheaf.count
///          if n == CAP: Exhausted
///          if n > 0 and sheaf.objs[n - 1] == obj: Duplicate
///          sheaf.objs[n] = obj            (above the count: invisible)
///          sheaf.count = n + 1            // commit
/// ```
///
/// # Safety
/// As for [`sheaf_pop`]; `obj` is a free object of the sheaf's cache.
#[inline(always)]
pub(crate) unsafe fn sheaf_push(
    off: isize,
    slots: *const u8,
    cpus: usize,
    obj: usize,
) -> Result<(), SeqFail> {
    let st: usize;
    // SAFETY: as in `sheaf_pop`; the store to `objs[n]` lies above the
    // count, where no other context looks until a commit covers it.
    unsafe {
        core::arch::asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "20:",
            ".long 0, 0",
            ".quad 21f, 22f - 21f, 24f",
            ".popsection",
            "xor {st:e}, {st:e}",
            "23:",
            "lea {t}, [rip + 20b]",
            "mov qword ptr fs:[{off} + {RSEQ_CS}], {t}",
            "21:",
            "mov {t:e}, dword ptr fs:[{off} + {CPU_ID}]",
            "cmp {t}, {cpus}",
            "jae 25f",
            "imul {t}, {t}, {STRIDE}",
            "add {t}, {slots}",
            "cmp byte ptr [{t} + {SLOT_LOCK}], 0",
            "jne 25f",
            "mov {sheaf}, qword ptr [{t} + {SLOT_MAIN}]",
            "mov {n}, qword ptr [{sheaf} + {SHEAF_COUNT}]",
            "cmp {n}, {CAP}",
            "jae 26f",
            "test {n}, {n}",
            "jz 27f",
            "cmp qword ptr [{sheaf} + {n} * 8 + {SHEAF_OBJS} - 8], {obj}",
            "je 28f",
            "27:",
            "mov qword ptr [{sheaf} + {n} * 8 + {SHEAF_OBJS}], {obj}",
            "inc {n}",
            "mov qword ptr [{sheaf} + {SHEAF_COUNT}], {n}", // commit
            "22:",
            "jmp 29f",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long {SIG}",
            "24:",
            "jmp 23b",
            "25:",
            "mov {st:e}, {BUSY}",
            "jmp 29f",
            "26:",
            "mov {st:e}, {EXHAUSTED}",
            "jmp 29f",
            "28:",
            "mov {st:e}, {DUPLICATE}",
            "29:",
            off = in(reg) off,
            slots = in(reg) slots,
            cpus = in(reg) cpus,
            obj = in(reg) obj,
            st = out(reg) st,
            t = out(reg) _,
            sheaf = out(reg) _,
            n = out(reg) _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            STRIDE = const STRIDE,
            SLOT_LOCK = const SLOT_LOCK,
            SLOT_MAIN = const SLOT_MAIN,
            SHEAF_COUNT = const SHEAF_COUNT,
            SHEAF_OBJS = const SHEAF_OBJS,
            CAP = const SHEAF_CAP,
            SIG = const RSEQ_SIG,
            BUSY = const BUSY,
            EXHAUSTED = const EXHAUSTED,
            DUPLICATE = const DUPLICATE,
            options(nostack),
        );
    }
    status(st)
}

/// Takes this CPU's level-0 slot lock, ordered with every sequence on that
/// CPU, and returns the CPU whose slot it took:
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu = rseq->cpu_id; if cpu >= cpus: None
///          slot = slots + cpu * STRIDE
///          lock cmpxchg slot.lock, 0 -> 1  // commit
/// after:   None unless it swapped
/// ```
///
/// Because the CAS commits inside a section on `cpu`, no sequence on `cpu`
/// can be between its read of the lock and its commit: one that was, was
/// aborted when this thread took the CPU (or interrupted it). The holder
/// may then migrate freely; sequences on `cpu` exit `Busy` until release.
///
/// # Safety
/// As for [`sheaf_pop`]. The caller releases the lock (a Release store of
/// 0) through the slot's guard.
#[inline(always)]
pub(crate) unsafe fn lock_slot(off: isize, slots: *const u8, cpus: usize) -> Option<usize> {
    let st: usize;
    let cpu: usize;
    // SAFETY: as in `sheaf_pop`; the committing instruction is the CAS.
    unsafe {
        core::arch::asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "20:",
            ".long 0, 0",
            ".quad 21f, 22f - 21f, 24f",
            ".popsection",
            "xor {st:e}, {st:e}",
            "23:",
            "lea {t}, [rip + 20b]",
            "mov qword ptr fs:[{off} + {RSEQ_CS}], {t}",
            "21:",
            "mov {cpu:e}, dword ptr fs:[{off} + {CPU_ID}]",
            "cmp {cpu}, {cpus}",
            "jae 25f",
            "imul {t}, {cpu}, {STRIDE}",
            "add {t}, {slots}",
            "xor eax, eax",
            "mov {one:e}, 1",
            "lock cmpxchg byte ptr [{t} + {SLOT_LOCK}], {one:l}", // commit
            "22:",
            "jne 25f",
            "jmp 29f",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long {SIG}",
            "24:",
            "jmp 23b",
            "25:",
            "mov {st:e}, {BUSY}",
            "29:",
            off = in(reg) off,
            slots = in(reg) slots,
            cpus = in(reg) cpus,
            st = out(reg) st,
            cpu = out(reg) cpu,
            t = out(reg) _,
            one = out(reg) _,
            out("eax") _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            STRIDE = const STRIDE,
            SLOT_LOCK = const SLOT_LOCK,
            SIG = const RSEQ_SIG,
            BUSY = const BUSY,
        );
    }
    (st == OK).then_some(cpu)
}
