//! The x86-64 sequences. Each `asm!` block is one sequence:
//!
//! * its descriptor, emitted into `__rseq_cs` from the same block
//!   (numeric labels only: inlining duplicates the block, descriptor and
//!   all);
//! * a restart point that stores the descriptor's address into this
//!   thread's `rseq_cs` (`fs:[off + 8]`), then the section itself, which
//!   reads `cpu_id` (`fs:[off + 4]`), finds that CPU's level-0 slot, and
//!   ends with one committing instruction (marked `// commit`);
//! * the signature and the abort handler, which jumps back to the restart
//!   point, out of line in the `__rseq_failure` section (so the success
//!   path falls through the end of the section, with no jump over them);
//! * the failure exits, outside the section (out of line too, or straight
//!   to the caller's failure code: `sheaf_push`).
//!
//! The parts every sequence shares are template macros below
//! (`seq_start!`, `seq_cpu_slot!` or `seq_find_slot!`, `seq_abort!`), so
//! the protocol is written once.
//!
//! Registers: `off` = `__rseq_offset`; the sheaf sequences' `base` (the
//! heap's core) and `idx` (the cache's index, scaled), from which they
//! address the cache's CPU count (`layout::SHEAF_*`) and compute the slot;
//! the page sequences' `tg`, their [`SeqTarget`]; scratch registers are
//! named for what they hold.

/// Opens a sequence (the first template piece of every `asm!` block): its
/// descriptor, emitted into `__rseq_cs` (label 20; the section runs from
/// label 21 to label 22, the abort handler is label 24), then the restart
/// point (label 23), which runs the instructions given (a page sequence
/// reloads `off` there: it reuses that register inside the section), and
/// stores the descriptor's address into this thread's `rseq_cs`, then the
/// section's first instruction (label 21). Operands it uses: `t`
/// (scratch), `off`; constant `RSEQ_CS`.
macro_rules! seq_start {
    ($($at_restart:literal),*) => {
        concat!(
            ".pushsection __rseq_cs, \"aw\"\n",
            ".balign 32\n",
            "20:\n",
            ".long 0, 0\n",
            ".quad 21f, 22f - 21f, 24f\n",
            ".popsection\n",
            "23:\n",
            $($at_restart, "\n",)*
            "lea {t}, [rip + 20b]\n",
            "mov qword ptr fs:[{off} + {RSEQ_CS}], {t}\n",
            "21:\n",
        )
    };
}

/// Inside a section: this CPU's level-0 slot into `t`, or a jump to
/// `$fail` when this CPU has no slot (`cpu_id >= cpus`, which also catches
/// a failed registration's negative id). The slot is
/// `slots + (cpu << shift)`: sheaf sequences take the shift as the const
/// operand `SHIFT` (their caller's stride, a power of two), page sequences
/// (whose slots are `layout::STRIDE` apart) use `STRIDE_SHIFT` (the
/// `$scale` given). Operands: `t`, `off`, and the CPU count and slot array
/// given (memory operands: the sheaf sequences' target fields, the page
/// sequences' `SeqTarget` fields); constants `CPU_ID`, and `SHIFT` or
/// `STRIDE_SHIFT`. The sheaf push needs no more: its gate holds the lock
/// (see "The per-CPU sheaf slot and its lock" in the module
/// documentation).
macro_rules! seq_cpu_slot {
    ($fail:literal, $cpus:literal, $slots:literal, $scale:literal) => {
        concat!(
            "mov {t:e}, dword ptr fs:[{off} + {CPU_ID}]\n",
            "cmp {t}, ",
            $cpus,
            "\n",
            "jae ",
            $fail,
            "\n",
            $scale,
            "\n",
            "add {t}, ",
            $slots,
            "\n",
        )
    };
}

/// [`seq_cpu_slot!`], then a jump to `$fail` when the slot is held (its
/// lock byte, at constant `SLOT_LOCK`, is not 0): the page sequences' and
/// the sheaf pop's way.
macro_rules! seq_find_slot {
    ($fail:literal, $cpus:literal, $slots:literal, $scale:literal) => {
        concat!(
            seq_cpu_slot!($fail, $cpus, $slots, $scale),
            "cmp byte ptr [{t} + {SLOT_LOCK}], 0\n",
            "jne ",
            $fail,
            "\n",
        )
    };
}

/// After the section, out of line (section `__rseq_failure`, so the code
/// after the section follows it directly): the signature the kernel
/// checks before an abort address, and the abort handler (label 24), which
/// runs the instructions given (a counting pop takes back a count whose
/// commit did not happen) and restarts at the restart point, never at
/// label 21 (the kernel cleared `rseq_cs`). Constant: `SIG`.
macro_rules! seq_abort {
    ($($before_restart:literal),*) => {
        concat!(
            ".pushsection __rseq_failure, \"ax\"\n",
            ".byte 0x0f, 0xb9, 0x3d\n",
            ".long {SIG}\n",
            "24:\n",
            $($before_restart, "\n",)*
            "jmp 23b\n",
            ".popsection\n",
        )
    };
}

/// A counting pop's take-back (out of line, section `__rseq_failure`; the
/// pop's abort handler jumps to its label 33 when the pop was aborted
/// after its count): a sequence of its own, with its descriptor (label 30;
/// section from label 31 to 32, abort handler 34), that subtracts 1 from
/// the counter at offset `$counter` of the level-0 slot of the CPU the
/// thread runs on *now*, then restarts the pop (label 23). The count the
/// aborted pop added may be on another CPU's slot (the thread migrated):
/// the counters are only ever summed, and a slot's counter is changed with
/// plain instructions only by sequences on its own CPU, which the
/// take-back, running there, never overlaps (a locked subtraction from
/// another CPU could: a plain add overlapping it loses it). Its committing
/// instruction is a locked subtraction, as a holder of the slot may be
/// bumping the counter from another CPU (`page::bump`, locked). A CPU
/// without a slot (which cannot happen while the pop could count: every
/// possible CPU has one) takes the count back from the pop's slot (label
/// 35, which the caller supplies). Operands: the register named `$r`
/// (scratch), `off` (after the instructions given, if any, at the restart
/// point); constants `RSEQ_CS`, `CPU_ID`, `SIG`.
macro_rules! take_back {
    (
        $r:literal,
        $cpus:literal,
        $slots:literal,
        $scale:literal,
        $counter:literal
        $(, $at_restart:literal)*
    ) => {
        concat!(
            ".pushsection __rseq_cs, \"aw\"\n",
            ".balign 32\n",
            "30:\n",
            ".long 0, 0\n",
            ".quad 31f, 32f - 31f, 34f\n",
            ".popsection\n",
            ".pushsection __rseq_failure, \"ax\"\n",
            "33:\n",
            $($at_restart, "\n",)*
            "lea {", $r, "}, [rip + 30b]\n",
            "mov qword ptr fs:[{off} + {RSEQ_CS}], {", $r, "}\n",
            "31:\n",
            "mov {", $r, ":e}, dword ptr fs:[{off} + {CPU_ID}]\n",
            "cmp {", $r, "}, ", $cpus, "\n",
            "jae 35f\n",
            $scale, "\n",
            "add {", $r, "}, ", $slots, "\n",
            "lock sub qword ptr [{", $r, "} + ", $counter, "], 1\n", // commit
            "32:\n",
            "jmp 23b\n",
            ".byte 0x0f, 0xb9, 0x3d\n",
            ".long {SIG}\n",
            "34:\n",
            "jmp 33b\n",
            ".popsection\n",
        )
    };
}

use super::abi::{CPU_ID, RSEQ_CS, RSEQ_SIG};
use super::layout::*;
use super::SeqTarget;

/// Status codes `lock_slot` leaves in its status register.
const OK: usize = 0;
const BUSY: usize = 1;

/// Pops an object from this CPU's level-0 main sheaf and, when `COUNT` (a
/// nolock allocation), adds 1 to the slot's nolock counter. `None` when
/// this CPU has no slot, its slot is held, or its main sheaf is
/// empty (objects are never at address 0, so 0 means "none"):
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu = rseq->cpu_id;            if cpu >= target.cpus: None
///                                         (target: the cache, at
///                                          base + 8 * idx + DISP)
///          slot = base + idx + (cpu << SHIFT) + SLOTS0
///                                         if slot.lock != 0: None
///          top = slot.top                 (the main sheaf's next free entry)
///          if top % SHEAF_ALIGN == 0: None  (main empty, or no main yet)
///          obj = *(top - 8)
///          prefetch for writing: *(top - 16) + 8  (the next pop's key word)
///          if COUNT: slot.nolock_ok += 1  (this CPU only)
///          slot.top = top - 8             // commit
/// abort:   if COUNT and the add ran: take_back (below), then restart
/// take_back, a sequence of its own:
///          cpu = rseq->cpu_id (where the thread runs now)
///          slots[cpu].nolock_ok -= 1 (locked) // commit
/// ```
///
/// The slot holds a pointer into its main sheaf rather than the sheaf
/// itself: a sheaf's objects start it and sheaves are `SHEAF_ALIGN`-aligned,
/// so the pointer's low bits are the count, and the slow paths trade the
/// main sheaf with the spare or the barn by changing `top` (no copy). The
/// fast path runs as many instructions and loads as with a count.
///
/// The count is exact. A restart redoes the add, so an abort that lands
/// between the add and the commit takes the first one back. The abort
/// handler knows that case without a register of its own: `obj` is 0 from
/// the restart point until the object load gives it an address, and from
/// `stc` (before the object load) to the add the flags say CF set, ZF
/// clear (the `test` before `stc` found the sheaf not empty), which the
/// add never leaves: it sets CF only when it wraps the counter to 0, and
/// then sets ZF too (the `lea` after it leaves the flags alone). So `obj`
/// not 0 with the flags not "CF set, ZF clear" means the add ran. (CF
/// alone is not enough: a take-back on another CPU's slot can leave its
/// counter at `u64::MAX`, and the next add there wraps and sets CF; test
/// `rseq_count_wrap`.) The thread may
/// have migrated since the add, and the slot's CPU may be running pops
/// that add to the counter with a plain `add`, which a locked subtraction
/// from here would not be atomic with (measured: a few counts lost in
/// seconds of pops on threads moved between two CPUs). So the take-back is
/// a sequence of its own (`take_back!`) on the CPU the thread runs on, from
/// that CPU's slot: no pop there can overlap it, and the slots' counters
/// are only summed (`page::slot_count_total`). Both variants commit the
/// same way, with a store of the lowered `top` (an earlier form committed
/// with a `dec` on memory, and took 0.1-0.3 ns more per nolock pair).
///
/// # Prefetch
///
/// The pop asks for the line of the next object's key word, which the
/// next allocation writes (it clears the key), in exclusive state: the
/// object below in the main sheaf, `*(top - 16)` (as tcmalloc's per-CPU
/// pop prefetches its next object). Where objects come back from another
/// core's frees, as in a producer/consumer hand-off, that line is dirty in
/// the other core's cache, and the allocation's store otherwise waits for
/// it in the store buffer, with every store after it. Measured on the
/// Intel Xeon (Sapphire Rapids) VM, 3 alternating runs each:
/// producer/consumer 12.1-12.6 -> 11.6-11.8 ns an object on the normal
/// path, 14.7-15.0 -> 11.6-11.7 on the nolock one (whose count is one
/// store more, which is why it gained more); the 64 B pair took 0.1 ns
/// more on the normal path, 0.15 on the nolock one, and the 1000-object
/// batch and larson did not move beyond their spread. A prefetch is a hint: it never faults, whatever
/// the address. With one object left, `top - 16` is the word below the
/// sheaf, which is heap metadata (sheaves sit in the heap's metadata after
/// its slots; see the contract), not an object: a wasted hint, once per
/// sheaf drained.
///
/// A closed fast path is a CPU count of 0 (a heap without rseq, or a
/// cache whose normal path is closed): the section fails at its CPU test,
/// having stored only the descriptor's address into this thread's own
/// rseq area. So an open fast path pays no test for the closed case.
///
/// # Safety
/// `off` is glibc's `__rseq_offset` ([`super::raw_offset`], set by
/// [`super::prepare_offset`]): this thread's rseq area, registered or not
/// (glibc keeps the area in every thread's descriptor either way; an
/// unregistered area's `cpu_id` reads -2, above any CPU count, and the
/// kernel never reads its `rseq_cs`). `base` and `idx` name a live sheaf
/// target ([`super::layout`]`::SHEAF_*`, the head of a cache) at
/// `base + 8 * idx + DISP`, whose u64 at offset `CPUS` (`SHEAF_NORMAL_CPUS`
/// or `SHEAF_NOLOCK_CPUS`: its CPU count, which may change, read inside
/// the section) is 0, or: the area is registered, and CPU `c`'s level-0
/// slot of that cache, for each of that many CPUs, is at
/// `base + idx + (c << SHIFT) + SLOTS0`, laid out as [`super::layout`]
/// says, its `top` 0 or a pointer into a live sheaf (as long as the call)
/// whose 8 bytes before it are readable too (the pop reads them when the
/// sheaf holds one object: see "Prefetch");
/// only sequences and lock holders (see the module documentation) change
/// them.
///
/// Those are the heap's metadata layout (`slab::HeapCore::cache_at`):
/// `base` is its core, the caches and the per-CPU region of level-0 slots
/// lie at fixed offsets from it, and `idx` (the cache's owner tag,
/// `(index + 1) * 64`) steps
/// through both, a cache being 8 slots long. So the sequence computes the
/// slot's address from registers it has, where it used to load the
/// cache's `level0`: the fast paths are bound by their loads (measured,
/// one load fewer: 0.14 ns of the batch's allocation phase, 0.1 ns of a
/// 64-byte pair), and the caller forms no cache pointer either. The CPU
/// count is read inside the section, folded into its comparison.
#[inline(always)]
pub(crate) unsafe fn sheaf_pop<
    const COUNT: bool,
    const SHIFT: u32,
    const CPUS: usize,
    const DISP: usize,
    const SLOTS0: usize,
>(
    off: isize,
    base: *const u8,
    idx: usize,
) -> Option<usize> {
    let obj: usize;
    // Registers: `t` is the slot, `n` its `top`, `obj` the object (0 from
    // the restart point in the COUNT variant, for the abort handler),
    // `next` the object below it (for the prefetch).
    // SAFETY: per the contract; the block touches only this thread's rseq
    // area, the current CPU's slot and main sheaf, and the word below the
    // sheaf (readable per the contract); uses no stack; commits last.
    unsafe {
        core::arch::asm!(
            seq_start!(".if {COUNT}", "xor {obj:e}, {obj:e}", ".endif"),
            seq_find_slot!(
                "25f",
                "qword ptr [{base} + {idx} * 8 + {CPUS}]",
                "{base}",
                "shl {t}, {SHIFT}\nlea {t}, [{t} + {idx} + {SLOTS0}]"
            ),
            "mov {n}, qword ptr [{t} + {SLOT_TOP}]",
            "test {n:e}, {ALIGN_MASK}",
            "jz 25f",
            ".if {COUNT}",
            "stc", // CF = 1, ZF = 0 (the `test` above) until the add
            ".endif",
            "mov {obj}, qword ptr [{n} - 8]",
            // The next pop's object: its key word's line, for writing
            // (see "Prefetch" in the function's documentation).
            "mov {next}, qword ptr [{n} - 16]",
            "prefetchw byte ptr [{next} + 8]",
            ".if {COUNT}",
            "add qword ptr [{t} + {SLOT_NOLOCK_OK}], 1",
            ".endif",
            "lea {n}, [{n} - 8]",
            "mov qword ptr [{t} + {SLOT_TOP}], {n}", // commit
            "22:",
            "29:",
            // Aborted between the counter's add and the commit (the flags
            // not "CF set, ZF clear", `obj` an object rather than the
            // restart point's 0): take the count back.
            seq_abort!(
                ".if {COUNT}",
                "jnc 26f",
                "jnz 23b", // CF set, ZF clear: `stc` ran, the add did not
                "26:",
                "test {obj}, {obj}",
                "jz 23b",
                "jmp 33f",
                ".endif"
            ),
            // The take-back, a sequence of its own on the CPU the thread
            // runs on now (see the function's documentation); `n` is
            // scratch until the pop restarts.
            ".if {COUNT}",
            take_back!(
                "n",
                "qword ptr [{base} + {idx} * 8 + {CPUS}]",
                "{base}",
                "shl {n}, {SHIFT}\nlea {n}, [{n} + {idx} + {SLOTS0}]",
                "{SLOT_NOLOCK_OK}"
            ),
            ".pushsection __rseq_failure, \"ax\"",
            "35:",
            "lock sub qword ptr [{t} + {SLOT_NOLOCK_OK}], 1",
            "jmp 23b",
            ".popsection",
            ".endif",
            ".pushsection __rseq_failure, \"ax\"",
            "25:",
            "xor {obj:e}, {obj:e}",
            "jmp 29b",
            ".popsection",
            off = in(reg) off,
            base = in(reg) base,
            idx = in(reg) idx,
            t = out(reg) _,
            obj = out(reg) obj,
            n = out(reg) _,
            next = out(reg) _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            CPUS = const CPUS + DISP,
            SHIFT = const SHIFT,
            SLOTS0 = const SLOTS0,
            SLOT_LOCK = const SHEAF_SLOT_LOCK,
            SLOT_NOLOCK_OK = const SLOT_NOLOCK_OK,
            COUNT = const COUNT as u8,
            SLOT_TOP = const SLOT_TOP,
            ALIGN_MASK = const SHEAF_ALIGN - 1,
            SIG = const RSEQ_SIG,
            options(nostack),
        );
    }
    (obj != 0).then_some(obj)
}

/// Pushes `obj` onto this CPU's level-0 main sheaf; `false` (nothing
/// changed) when this CPU has no slot, its slot is held, or its main
/// sheaf is full:
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu = rseq->cpu_id;            if cpu >= target.cpus: false
///                                         (target: the cache, at
///                                          base + 8 * idx + DISP)
///          slot = base + idx + (cpu << SHIFT) + SLOTS0
///          gate = slot.gate
///          top = slot.top
///          if top >= gate (signed): false
///                                         (the gate: the lock byte over
///                                          `limit`, the class's sheaf
///                                          capacity; negative while the
///                                          slot is held, 0 before it is
///                                          prepared)
///          *top = obj                     (above the count: invisible)
///          slot.top = top + 8             // commit
/// ```
///
/// So a held slot fails the push at the comparison with its limit, with
/// no test of its own (see "The per-CPU sheaf slot and its lock" in the
/// module documentation): `top` and `limit` are user-space addresses,
/// below 2^56, and every held state of the lock byte has its top bit set.
///
/// The gate is read before `top`, as the lock byte was before the gate
/// held it. A holder stores the slot's last `top` before its release (the
/// lock byte's store), and x86-64 keeps loads in order, so a push that
/// finds the gate open finds that `top`. Read the other way round, a push
/// could take a `top` from before a migrated holder's change, find the
/// gate opened by its release, and commit the old `top` plus 8 over the
/// holder's (`rseq_migration_storm` caught it: objects in two sheaves).
///
/// The failure exits jump straight to the caller's code (`asm goto`), so
/// the fast path carries no status register.
///
/// The object is taken in `rsi`, where the sized frees (`Global::dealloc`,
/// `Heap::free_sized` and their nolock twins) receive it: left to choose,
/// the compiler loaded the size table's entry into `rsi` and moved the
/// pointer to another register first, one instruction more in each.
///
/// # Safety
/// As for [`sheaf_pop`]; `obj` is a free object of the sheaf's cache.
#[inline(always)]
pub(crate) unsafe fn sheaf_push<
    const SHIFT: u32,
    const CPUS: usize,
    const DISP: usize,
    const SLOTS0: usize,
>(
    off: isize,
    base: *const u8,
    idx: usize,
    obj: usize,
) -> bool {
    // SAFETY: as in `sheaf_pop`; the store at `top` lies above the count (unseen
    // until a commit covers it) and below the limit, inside the main sheaf; the
    // failure label, outside the section, is reached before any store.
    unsafe {
        core::arch::asm!(
            seq_start!(),
            seq_cpu_slot!(
                "{fail}",
                "qword ptr [{base} + {idx} * 8 + {CPUS}]",
                "{base}",
                "shl {t}, {SHIFT}\nlea {t}, [{t} + {idx} + {SLOTS0}]"
            ),
            "mov {g}, qword ptr [{t} + {SLOT_LIMIT}]", // the gate before `top` (see above)
            "mov {n}, qword ptr [{t} + {SLOT_TOP}]",
            "cmp {n}, {g}",
            "jge {fail}", // signed: a held slot's gate is negative
            "mov qword ptr [{n}], rsi",
            "lea {n}, [{n} + 8]",
            "mov qword ptr [{t} + {SLOT_TOP}], {n}", // commit
            "22:",
            seq_abort!(),
            off = in(reg) off,
            base = in(reg) base,
            idx = in(reg) idx,
            in("rsi") obj,
            t = out(reg) _,
            g = out(reg) _,
            n = out(reg) _,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            CPUS = const CPUS + DISP,
            SHIFT = const SHIFT,
            SLOTS0 = const SLOTS0,
            SLOT_TOP = const SLOT_TOP,
            SLOT_LIMIT = const SLOT_LIMIT,
            SIG = const RSEQ_SIG,
            fail = label {
                return false;
            },
            options(nostack),
        );
    }
    true
}

/// `idx` (an owner tag: a cache's index for the sheaf sequences) as the
/// optimiser cannot see through: an empty template between the value and
/// its uses. The layout-blind free loads the tag from the page's
/// descriptor, 16 bits; told so, the compiler makes its range test a
/// 16-bit one (an immediate that stalls the decoder, or one more zero
/// extension). (Until the owner tags, every fast path formed `idx` by
/// shifting an owner id, and the compiler, told that, formed the id
/// shifted by 9 in a second register for the cache's fields instead of
/// scaling `idx` in the address: two instructions more in a sized free,
/// 0.09-0.16 ns of the batch per object. A tag comes from a table or a
/// descriptor as it is, so that case is gone.)
#[inline(always)]
pub(crate) fn opaque_index(mut idx: usize) -> usize {
    // SAFETY: the template is a comment naming the register: it reads and
    // writes no memory, keeps the flags and the stack, and leaves `idx` as
    // it was.
    unsafe {
        core::arch::asm!(
            "/* {idx} */",
            idx = inout(reg) idx,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    idx
}

const _: () = assert!(
    DESC_SIZE == 32,
    "pcp_pop and pcp_push scale a page index by `shl 5`"
);

/// Pops a block from this CPU's level-0 page list of `order` (and, when
/// `COUNT`, adds 1 to the slot's nolock counter). Returns its page index,
/// or `u32::MAX` (the lists' `NIL`) when the target has no slots, this
/// CPU has none, its slot is held, or the list is empty:
///
/// ```text
/// restart: off = target.off; rseq->rseq_cs = &cs
/// start:   cpu, slot as in sheaf_pop (the target's slots and CPU count);
///                                         NIL if none or held
///          w = slot.lists[order]; head = low half of w; if head == NIL: NIL
///          next = descs[head].next        (stable: the block is on this
///                                          CPU's list, which only this
///                                          CPU's sequences or a holder of
///                                          the slot change)
///          if COUNT: slot.counter += 1    (the u64 at offset COUNTER:
///                                          `PCP_NOLOCK_OK`, or
///                                          `PCP_HEAP_NOLOCK_OK` for a
///                                          heap's large block)
///          slot.lists[order] = (count - 1) << 32 | next   // commit
/// abort:   if COUNT and the add ran: take the count back from the
///          counter of the slot of the CPU the thread runs on now (a
///          sequence of its own, as in sheaf_pop), then restart
/// ```
///
/// The count is exact, as in [`sheaf_pop`]. Here the marker is `off`:
/// set to -1 by the `neg` right before the add, which leaves the flags at
/// CF set, ZF clear, as `stc` does in [`sheaf_pop`]. No other value of
/// `off` is -1 (the rseq offset is 32-byte aligned, and indices are
/// zero-extended 32-bit values).
///
/// The target's fields are read inside the sequence, and `off`'s register
/// is reused once the CPU id is read (the restart point reloads it), so the
/// sequence takes six registers.
///
/// A target with 0 CPUs (no rseq fast path) fails at the CPU test, as in
/// [`sheaf_pop`], having stored only the descriptor's address into this
/// thread's rseq area.
///
/// # Safety
/// `target` points to a live [`SeqTarget`] whose `off` is glibc's
/// `__rseq_offset` ([`super::glibc_offset`]: this thread's rseq area,
/// registered or not, as for [`sheaf_pop`]), and whose `cpus` is 0, or:
/// the area is registered, `slots` the level-0 page slots of `cpus` CPUs
/// laid out as [`super::layout`] says (see `page::zone`), and `descs` the
/// zone's descriptor array, holding every index on a list; only sequences
/// and lock holders (see the module documentation) change the slots.
#[inline(always)]
pub(crate) unsafe fn pcp_pop<const COUNT: bool, const COUNTER: usize>(
    target: *const SeqTarget,
    order: u32,
) -> u32 {
    let idx: usize;
    // SAFETY: per the contract; the block touches only this thread's rseq
    // area, the target, this CPU's level-0 page slot and the head's
    // descriptor, uses no stack, and commits with its last store.
    unsafe {
        core::arch::asm!(
            seq_start!("mov {off}, qword ptr [{tg} + {T_OFF}]"),
            seq_find_slot!(
                "25f",
                "qword ptr [{tg} + {T_CPUS}]",
                "qword ptr [{tg} + {T_SLOTS}]",
                "shl {t}, {STRIDE_SHIFT}"
            ),
            "mov {w}, qword ptr [{t} + {order} * 8 + {PCP_LISTS}]",
            "mov {idx:e}, {w:e}",
            "cmp {idx:e}, -1",
            "je 25f",
            "mov {off}, {idx}", // off: the head's descriptor, then its link
            "shl {off}, 5",
            "add {off}, qword ptr [{tg} + {T_DESCS}]",
            "mov {off:e}, dword ptr [{off} + {DESC_NEXT}]",
            "shr {w}, 32",
            "dec {w}",
            "shl {w}, 32",
            "or {w}, {off}",
            ".if {COUNT}",
            "mov {off}, 1",
            "neg {off}", // the marker (no other value of `off` is -1); CF = 1, ZF = 0
            "add qword ptr [{t} + {COUNTER}], 1",
            ".endif",
            "mov qword ptr [{t} + {order} * 8 + {PCP_LISTS}], {w}", // commit
            "22:",
            "29:",
            // Aborted between the counter's add and the commit (the flags
            // not "CF set, ZF clear", the marker set): take the count back.
            seq_abort!(
                ".if {COUNT}",
                "jnc 26f",
                "jnz 23b", // CF set, ZF clear: `neg` ran, the add did not
                "26:",
                "cmp {off}, -1",
                "jne 23b",
                "jmp 33f",
                ".endif"
            ),
            // The take-back, as in `sheaf_pop` (`w` is scratch until the
            // pop restarts; `off` is reloaded first, the pop reused it).
            ".if {COUNT}",
            take_back!(
                "w",
                "qword ptr [{tg} + {T_CPUS}]",
                "qword ptr [{tg} + {T_SLOTS}]",
                "shl {w}, {STRIDE_SHIFT}",
                "{COUNTER}",
                "mov {off}, qword ptr [{tg} + {T_OFF}]"
            ),
            ".pushsection __rseq_failure, \"ax\"",
            "35:",
            "lock sub qword ptr [{t} + {COUNTER}], 1",
            "jmp 23b",
            ".popsection",
            ".endif",
            ".pushsection __rseq_failure, \"ax\"",
            "25:",
            "mov {idx:e}, -1",
            "jmp 29b",
            ".popsection",
            tg = in(reg) target,
            order = in(reg) order as usize,
            idx = out(reg) idx,
            off = out(reg) _,
            t = out(reg) _,
            w = out(reg) _,
            T_OFF = const TARGET_OFF,
            T_SLOTS = const TARGET_SLOTS,
            T_CPUS = const TARGET_CPUS,
            T_DESCS = const TARGET_DESCS,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            STRIDE_SHIFT = const STRIDE_SHIFT,
            SLOT_LOCK = const SLOT_LOCK,
            PCP_LISTS = const PCP_LISTS,
            COUNTER = const COUNTER,
            DESC_NEXT = const DESC_NEXT,
            COUNT = const COUNT as u8,
            SIG = const RSEQ_SIG,
            options(nostack),
        );
    }
    idx as u32
}

/// Pushes the block at page index `idx` onto this CPU's level-0 page list
/// of `order`; `false` (the list unchanged) when the target has no slot
/// groups, this CPU has none, or its slot is held:
///
/// ```text
/// restart: off = target.off; rseq->rseq_cs = &cs
/// start:   cpu, slot as in pcp_pop;       false if none or held
///          w = slot.lists[order]
///          descs[idx].next = low half of w   (the caller's block: invisible
///                                             until the commit)
///          slot.lists[order] = (count + 1) << 32 | idx   // commit
/// ```
///
/// # Safety
/// As for [`pcp_pop`]; the block `idx` (of `order`) belongs to the caller,
/// already marked as on a per-CPU list of `order`, and `idx < u32::MAX`.
#[inline(always)]
pub(crate) unsafe fn pcp_push(target: *const SeqTarget, order: u32, idx: u32) -> bool {
    // SAFETY: as in `pcp_pop`; the store to the block's link touches only
    // the caller's own block, which no list holds until the commit.
    unsafe {
        core::arch::asm!(
            seq_start!("mov {off}, qword ptr [{tg} + {T_OFF}]"),
            seq_find_slot!(
                "{fail}",
                "qword ptr [{tg} + {T_CPUS}]",
                "qword ptr [{tg} + {T_SLOTS}]",
                "shl {t}, {STRIDE_SHIFT}"
            ),
            "mov {w}, qword ptr [{t} + {order} * 8 + {PCP_LISTS}]",
            "mov {off}, {idx}", // off: the block's descriptor
            "shl {off}, 5",
            "add {off}, qword ptr [{tg} + {T_DESCS}]",
            "mov dword ptr [{off} + {DESC_NEXT}], {w:e}",
            "shr {w}, 32",
            "inc {w}",
            "shl {w}, 32",
            "or {w}, {idx}",
            "mov qword ptr [{t} + {order} * 8 + {PCP_LISTS}], {w}", // commit
            "22:",
            seq_abort!(),
            tg = in(reg) target,
            order = in(reg) order as usize,
            idx = in(reg) idx as usize,
            off = out(reg) _,
            t = out(reg) _,
            w = out(reg) _,
            T_OFF = const TARGET_OFF,
            T_SLOTS = const TARGET_SLOTS,
            T_CPUS = const TARGET_CPUS,
            T_DESCS = const TARGET_DESCS,
            RSEQ_CS = const RSEQ_CS,
            CPU_ID = const CPU_ID,
            STRIDE_SHIFT = const STRIDE_SHIFT,
            SLOT_LOCK = const SLOT_LOCK,
            PCP_LISTS = const PCP_LISTS,
            DESC_NEXT = const DESC_NEXT,
            SIG = const RSEQ_SIG,
            fail = label {
                return false;
            },
            options(nostack),
        );
    }
    true
}

/// Takes this CPU's level-0 slot lock (the byte at offset `LOCK` of the
/// slot: `layout::SLOT_LOCK` in a page slot, `layout::SHEAF_SLOT_LOCK` in
/// a sheaf slot), ordered with every sequence on that CPU, and returns
/// the CPU whose slot it took:
///
/// ```text
/// restart: rseq->rseq_cs = &cs
/// start:   cpu = rseq->cpu_id; if cpu >= cpus: None
///          slot = slots + cpu * STRIDE
///          lock cmpxchg slot.lock, 0 -> HELD  // commit
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
pub(crate) unsafe fn lock_slot<const STRIDE: usize, const LOCK: usize>(
    off: isize,
    slots: *const u8,
    cpus: usize,
) -> Option<usize> {
    let st: usize;
    let cpu: usize;
    // SAFETY: as in `sheaf_pop`; the committing instruction is the CAS.
    unsafe {
        core::arch::asm!(
            "xor {st:e}, {st:e}",
            seq_start!(),
            "mov {cpu:e}, dword ptr fs:[{off} + {CPU_ID}]",
            "cmp {cpu}, {cpus}",
            "jae 25f",
            "imul {t}, {cpu}, {STRIDE}",
            "add {t}, {slots}",
            "xor eax, eax",
            "mov {one:e}, {HELD}",
            "lock cmpxchg byte ptr [{t} + {SLOT_LOCK}], {one:l}", // commit
            "22:",
            "je 29f",
            "25:",
            "mov {st:e}, {BUSY}",
            "29:",
            seq_abort!(),
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
            SLOT_LOCK = const LOCK,
            HELD = const crate::sync::SLOT_HELD,
            SIG = const RSEQ_SIG,
            BUSY = const BUSY,
        );
    }
    (st == OK).then_some(cpu)
}
