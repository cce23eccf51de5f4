//! Targets without the rseq fast path: the same signatures, always `Busy`,
//! so the compiler catches drift. Never called: [`super::available`] is
//! false here, and the heap uses its try-locked slots.

use super::SeqFail;

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn sheaf_pop(
    _off: isize,
    _slots: *const u8,
    _cpus: usize,
    _count: u64,
) -> Result<usize, SeqFail> {
    Err(SeqFail::Busy)
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn sheaf_push(
    _off: isize,
    _slots: *const u8,
    _cpus: usize,
    _obj: usize,
) -> Result<(), SeqFail> {
    Err(SeqFail::Busy)
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn lock_slot(_off: isize, _slots: *const u8, _cpus: usize) -> Option<usize> {
    None
}
