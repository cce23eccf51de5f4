//! Targets without the rseq fast path: the same signatures, always failing,
//! so the compiler catches drift. Never called: [`super::available`] is
//! false here, and the heap uses its try-locked slots.

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn sheaf_pop<
    const COUNT: bool,
    const SHIFT: u32,
    const CPUS: usize,
    const DISP: usize,
    const SLOTS0: usize,
>(
    _off: isize,
    _base: *const u8,
    _idx: usize,
) -> Option<usize> {
    None
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn sheaf_push<
    const SHIFT: u32,
    const CPUS: usize,
    const DISP: usize,
    const SLOTS0: usize,
>(
    _off: isize,
    _base: *const u8,
    _idx: usize,
    _obj: usize,
) -> bool {
    false
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn lock_slot<const STRIDE: usize, const LOCK: usize>(
    _off: isize,
    _slots: *const u8,
    _cpus: usize,
) -> Option<usize> {
    None
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn pcp_pop<const COUNT: bool, const COUNTER: usize>(
    _target: *const super::SeqTarget,
    _order: u32,
) -> u32 {
    u32::MAX
}

/// See the x86-64 version.
///
/// # Safety
/// As there.
#[inline(always)]
pub(crate) unsafe fn pcp_push(_target: *const super::SeqTarget, _order: u32, _idx: u32) -> bool {
    false
}

/// The x86-64 version hides `idx` from the optimiser, which there addresses
/// the cache's fields better without knowing it; here the value as it is.
#[inline(always)]
pub(crate) fn opaque_index(idx: usize) -> usize {
    idx
}
