//! Self-describing block contents: every block the storm allocates is filled
//! with a pattern derived from its address and size, and checked when freed.
//!
//! Word 0 is a header: the block's size in the low 24 bits and a hash of its
//! address above them, so a block handed to another thread (or parked in a
//! handler stash) carries its own size. The remaining bytes are a sequence
//! seeded by address and size. Filling and checking touch no lock and never
//! allocate: both run inside signal handlers.

/// Sizes must fit the header's low bits.
pub const MAX_SIZE: usize = (1 << 24) - 1;
const SIZE_MASK: u64 = (1 << 24) - 1;
const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit mixer (splitmix64's finaliser).
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[inline]
fn header(addr: usize, size: usize) -> u64 {
    (mix(addr as u64) & !SIZE_MASK) | size as u64
}

#[inline]
fn seed(addr: usize, size: usize) -> u64 {
    mix((addr as u64).rotate_left(17) ^ size as u64 ^ 0x5EED)
}

/// Where a check found the first wrong word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: usize,
    pub expected: u64,
    pub found: u64,
}

/// Fills `size` bytes at `p` (`size >= 8`, `p` 8-aligned).
///
/// # Safety
/// `p` must be valid for writes of `size` bytes and 8-aligned.
#[inline]
pub unsafe fn fill(p: *mut u8, size: usize) {
    debug_assert!((8..=MAX_SIZE).contains(&size) && p as usize % 8 == 0);
    let addr = p as usize;
    let words = p as *mut u64;
    let s = seed(addr, size);
    // SAFETY: per the caller, `size` bytes at `p`, 8-aligned: the header
    // word, `size / 8 - 1` further words and `size % 8` tail bytes.
    unsafe {
        words.write(header(addr, size));
        let mut v = s;
        for j in 1..size / 8 {
            v = v.wrapping_add(STEP);
            words.add(j).write(v);
        }
        for k in (size & !7)..size {
            p.add(k).write(tail_byte(s, k));
        }
    }
}

#[inline]
fn tail_byte(seed: u64, k: usize) -> u8 {
    (seed >> ((k & 7) * 8)) as u8 ^ 0xA5
}

/// The size recorded in the block's header, if the header matches the
/// block's address.
///
/// # Safety
/// `p` must be valid for reads of 8 bytes and 8-aligned.
#[inline]
pub unsafe fn size_of(p: *const u8) -> Result<usize, Mismatch> {
    // SAFETY: per the caller.
    let h = unsafe { (p as *const u64).read() };
    let size = (h & SIZE_MASK) as usize;
    if size < 8 || h != header(p as usize, size) {
        return Err(Mismatch {
            offset: 0,
            expected: mix(p as usize as u64) & !SIZE_MASK,
            found: h,
        });
    }
    Ok(size)
}

/// Checks a block filled by [`fill`] with `size` bytes.
///
/// # Safety
/// `p` must be valid for reads of `size` bytes and 8-aligned.
#[inline]
pub unsafe fn check(p: *const u8, size: usize) -> Result<(), Mismatch> {
    let addr = p as usize;
    let words = p as *const u64;
    let s = seed(addr, size);
    // SAFETY: per the caller, as in `fill`.
    unsafe {
        let h = words.read();
        if h != header(addr, size) {
            return Err(Mismatch {
                offset: 0,
                expected: header(addr, size),
                found: h,
            });
        }
        let mut v = s;
        for j in 1..size / 8 {
            v = v.wrapping_add(STEP);
            let w = words.add(j).read();
            if w != v {
                return Err(Mismatch {
                    offset: j * 8,
                    expected: v,
                    found: w,
                });
            }
        }
        for k in (size & !7)..size {
            let b = p.add(k).read();
            if b != tail_byte(s, k) {
                return Err(Mismatch {
                    offset: k,
                    expected: tail_byte(s, k) as u64,
                    found: b as u64,
                });
            }
        }
    }
    Ok(())
}

/// The workers' random numbers (shared with the benchmark suite).
pub use anyalloc_bench::sys::XorShift;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_detect_corruption() {
        let mut buf = vec![0u64; 1025];
        let p = buf.as_mut_ptr() as *mut u8;
        for size in [8, 9, 15, 16, 100, 4095, 8192] {
            // SAFETY: the buffer holds 8 KiB + 8 bytes, 8-aligned.
            unsafe {
                fill(p, size);
                assert_eq!(size_of(p), Ok(size));
                assert_eq!(check(p, size), Ok(()));
                let last = p.add(size - 1);
                *last ^= 1;
                assert_eq!(check(p, size).unwrap_err().offset & !7, (size - 1) & !7);
                *last ^= 1;
                // The same bytes at another address do not pass.
                let q = p.add(8);
                core::ptr::copy(p, q, size);
                assert!(size_of(q).is_err());
            }
        }
    }

    #[test]
    fn xorshift_below_stays_in_range() {
        let mut r = XorShift::new(7);
        for n in [1u64, 2, 3, 1000] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
    }
}
