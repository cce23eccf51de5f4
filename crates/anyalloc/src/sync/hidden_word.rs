//! Words the fast paths read with one RIP-relative load (x86-64 Linux).
//!
//! `Global`'s fast paths and the sheaf sequences are inlined into the
//! user's crate. There rustc reaches a static of this crate (and glibc's
//! `__rseq_offset`) through a GOT slot with a plain `R_X86_64_GOTPCREL`
//! relocation, which the linker does not relax into a direct access: one
//! more dependent load at the head of every allocation's and free's chain
//! of loads. A word defined in assembly as a *hidden* global symbol is
//! reached with one RIP-relative instruction from any object of the final
//! link, in an executable and in a shared library alike, and a shared
//! library does not export it (as the context module's route word, which is
//! thread-local).
//!
//! [`hidden_word!`] defines such a word (8 bytes, 8-aligned, zero at
//! start, in `.bss`) and a module of accessors around it.

/// Defines module `$m` holding a hidden 8-byte word named `$sym` (see the
/// module documentation) and its accessors:
///
/// * `addr()`: the word's address, for atomic stores through a reference;
/// * `load_acquire()`: one load with Acquire ordering (a plain load is one
///   on x86-64, and the block is a compiler barrier: no later access moves
///   above it);
/// * `load_settled()`: one load the compiler may merge or move, for a word
///   whose value no longer changes once a reader may see it.
///
/// The symbol name must be unique in the final link.
macro_rules! hidden_word {
    ($(#[$attr:meta])* mod $m:ident = $sym:literal) => {
        $(#[$attr])*
        #[allow(dead_code)]
        mod $m {
            core::arch::global_asm!(
                concat!(".pushsection .bss.", $sym, ",\"aw\",@nobits"),
                ".p2align 3",
                concat!(".globl ", $sym),
                concat!(".hidden ", $sym),
                concat!(".type ", $sym, ",@object"),
                concat!(".size ", $sym, ",8"),
                concat!($sym, ":"),
                ".zero 8",
                ".popsection",
            );

            /// The word's address: 8-aligned, 8 bytes, zero until written,
            /// live for the whole process.
            #[inline(always)]
            pub(crate) fn addr() -> usize {
                let a: usize;
                // SAFETY: computes the symbol's address; no memory access.
                unsafe {
                    core::arch::asm!(
                        concat!("lea {a}, [rip + ", $sym, "]"),
                        a = out(reg) a,
                        options(nostack, pure, nomem, preserves_flags),
                    );
                }
                a
            }

            /// The word, with Acquire ordering: on x86-64 a plain load is
            /// one (loads are not reordered with later loads or stores),
            /// and without `pure`/`readonly` the compiler treats the block
            /// as touching any memory, so it moves no later access above it.
            #[inline(always)]
            pub(crate) fn load_acquire() -> usize {
                let v: usize;
                // SAFETY: an aligned 8-byte load of the word (an atomic
                // load on x86-64); no other effect.
                unsafe {
                    core::arch::asm!(
                        concat!("mov {v}, qword ptr [rip + ", $sym, "]"),
                        v = out(reg) v,
                        options(nostack, preserves_flags),
                    );
                }
                v
            }

            /// The word, for a value that no longer changes once a reader
            /// may see it: the compiler may merge or move the load.
            #[inline(always)]
            pub(crate) fn load_settled() -> usize {
                let v: usize;
                // SAFETY: an aligned 8-byte load of the word (a relaxed
                // atomic load on x86-64); no other effect.
                unsafe {
                    core::arch::asm!(
                        concat!("mov {v}, qword ptr [rip + ", $sym, "]"),
                        v = out(reg) v,
                        options(nostack, pure, readonly, preserves_flags),
                    );
                }
                v
            }
        }
    };
}
pub(crate) use hidden_word;
