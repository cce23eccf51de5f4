//! Self-describing, owner-tagged block contents: every block the storm
//! allocates is filled with a pattern derived from its address, its size and
//! a per-allocation *nonce*, and checked when freed.
//!
//! The nonce is kept next to the block's address in the entry that owns it
//! (see [`Entry`]): the stash slot, the hand-off slot or the worker's live
//! array. Two owners of the same memory (an allocator handing one block out
//! twice) hold different nonces, so whichever checks second finds the other
//! owner's bytes, even when both asked for the same size.
//!
//! Word 0 is a header: the block's size in the low 24 bits, the nonce in the
//! next 16 and a hash of the address above them, so a block handed to
//! another thread (or parked in a handler stash) carries its own size. The
//! remaining bytes are a sequence seeded by address, size and nonce.
//! Filling and checking touch no lock and never allocate: both run inside
//! signal handlers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Sizes must fit the header's low bits.
pub const MAX_SIZE: usize = (1 << 24) - 1;
/// Blocks larger than this (64 KiB to 4 MiB, filled and checked inside
/// signal handlers) get every 32nd word of the sequence (one per 256
/// bytes, at offsets that depend only on the block's address), the last
/// word and the tail: writing 4 MiB would dominate a handler, and a second
/// owner of any part of the block still overwrites sampled words.
pub const SAMPLED_ABOVE: usize = 64 << 10;
const SAMPLE_STRIDE: usize = 32;

/// The word indices a block of `size` bytes carries (besides its header).
#[inline]
fn word_indices(size: usize) -> impl Iterator<Item = usize> {
    let words = size / 8;
    let stride = if size > SAMPLED_ABOVE {
        SAMPLE_STRIDE
    } else {
        1
    };
    let last = (size > SAMPLED_ABOVE && !(words - 1).is_multiple_of(stride)).then_some(words - 1);
    (1..words).step_by(stride).chain(last)
}

/// The sequence word at index `j` (the sequence adds `STEP` per word).
#[inline]
fn word(seed: u64, j: usize) -> u64 {
    seed.wrapping_add(STEP.wrapping_mul(j as u64))
}
const SIZE_MASK: u64 = (1 << 24) - 1;
const NONCE_SHIFT: u32 = 24;
const NONCE_MASK: u64 = 0xFFFF;
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

/// The nonce source: every allocation takes the next value (any context:
/// one atomic add).
static NONCES: AtomicU64 = AtomicU64::new(0x1234);

/// A fresh per-allocation nonce (16 bits, never 0).
#[inline]
pub fn next_nonce() -> u16 {
    let n = mix(NONCES.fetch_add(1, Relaxed)) as u16;
    n.max(1)
}

/// Bits of a 64-bit block address that are always 0 in user space on the
/// targets this program runs on (47-bit, or 48-bit with 5-level paging only
/// on request): the nonce lives there.
const ADDR_BITS: u32 = 48;

/// A block address with its kind tag (low 3 bits, blocks are 8-aligned) and
/// its owner's nonce (top 16 bits) in one word, so a single atomic swap
/// moves the block and its owner tag together. 0 is never an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry(pub usize);

impl Entry {
    /// Packs an 8-aligned address below 2^48, a kind (`1..=7`) and a nonce.
    #[inline]
    pub fn new(addr: usize, kind: usize, nonce: u16) -> Entry {
        debug_assert!(addr.is_multiple_of(8) && packable(addr) && (1..8).contains(&kind));
        Entry(addr | kind | (nonce as usize) << ADDR_BITS)
    }
    #[inline]
    pub fn addr(self) -> usize {
        self.0 & ((1usize << ADDR_BITS) - 1) & !7
    }
    #[inline]
    pub fn kind(self) -> usize {
        self.0 & 7
    }
    #[inline]
    pub fn nonce(self) -> u16 {
        (self.0 >> ADDR_BITS) as u16
    }
}

/// Whether `addr` can be packed in an [`Entry`].
#[inline]
pub fn packable(addr: usize) -> bool {
    (addr as u64) >> ADDR_BITS == 0
}

#[inline]
fn header(addr: usize, size: usize, nonce: u16) -> u64 {
    (mix(addr as u64) & !(SIZE_MASK | NONCE_MASK << NONCE_SHIFT))
        | (nonce as u64) << NONCE_SHIFT
        | size as u64
}

#[inline]
fn seed(addr: usize, size: usize, nonce: u16) -> u64 {
    mix((addr as u64).rotate_left(17) ^ size as u64 ^ (nonce as u64) << 40 ^ 0x5EED)
}

/// Where a check found the first wrong word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: usize,
    pub expected: u64,
    pub found: u64,
}

/// Fills `size` bytes at `p` (`size >= 8`, `p` 8-aligned) for the owner
/// holding `nonce`.
///
/// # Safety
/// `p` must be valid for writes of `size` bytes and 8-aligned.
#[inline]
pub unsafe fn fill(p: *mut u8, size: usize, nonce: u16) {
    debug_assert!((8..=MAX_SIZE).contains(&size) && (p as usize).is_multiple_of(8));
    let addr = p as usize;
    let words = p as *mut u64;
    let s = seed(addr, size, nonce);
    // SAFETY: per the caller, `size` bytes at `p`, 8-aligned: the header
    // word, `size / 8 - 1` further words and `size % 8` tail bytes.
    unsafe {
        words.write(header(addr, size, nonce));
        for j in word_indices(size) {
            words.add(j).write(word(s, j));
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
/// block's address and the owner's `nonce`.
///
/// # Safety
/// `p` must be valid for reads of 8 bytes and 8-aligned.
#[inline]
pub unsafe fn size_of(p: *const u8, nonce: u16) -> Result<usize, Mismatch> {
    // SAFETY: per the caller.
    let h = unsafe { (p as *const u64).read() };
    let size = (h & SIZE_MASK) as usize;
    if size < 8 || h != header(p as usize, size, nonce) {
        return Err(Mismatch {
            offset: 0,
            expected: header(p as usize, 0, nonce),
            found: h,
        });
    }
    Ok(size)
}

/// Checks a block filled by [`fill`] with `size` bytes for the owner
/// holding `nonce`.
///
/// # Safety
/// `p` must be valid for reads of `size` bytes and 8-aligned.
#[inline]
pub unsafe fn check(p: *const u8, size: usize, nonce: u16) -> Result<(), Mismatch> {
    let addr = p as usize;
    let words = p as *const u64;
    let s = seed(addr, size, nonce);
    // SAFETY: per the caller, as in `fill`.
    unsafe {
        let h = words.read();
        if h != header(addr, size, nonce) {
            return Err(Mismatch {
                offset: 0,
                expected: header(addr, size, nonce),
                found: h,
            });
        }
        for j in word_indices(size) {
            let v = word(s, j);
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
        let mut buf = vec![0u64; (128 << 10) / 8 + 1];
        let p = buf.as_mut_ptr() as *mut u8;
        // Above SAMPLED_ABOVE only sampled words are written and checked
        // (the last word and the tail always).
        for size in [
            8,
            9,
            15,
            16,
            100,
            4095,
            8192,
            65536,
            70_000,
            100_003,
            128 << 10,
        ] {
            // SAFETY: the buffer holds 128 KiB + 8 bytes, 8-aligned.
            unsafe {
                fill(p, size, 7);
                assert_eq!(size_of(p, 7), Ok(size));
                assert_eq!(check(p, size, 7), Ok(()));
                let last = p.add(size - 1);
                *last ^= 1;
                assert_eq!(check(p, size, 7).unwrap_err().offset & !7, (size - 1) & !7);
                *last ^= 1;
                // The same bytes at another address do not pass.
                let q = p.add(8);
                core::ptr::copy(p, q, size);
                assert!(size_of(q, 7).is_err());
            }
        }
    }

    #[test]
    fn a_second_owner_of_the_same_size_is_detected() {
        let mut buf = vec![0u64; 64];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer holds 512 bytes, 8-aligned.
        unsafe {
            // Owner A fills, then owner B (same block, same size) overwrites.
            fill(p, 200, 1);
            fill(p, 200, 2);
            assert!(size_of(p, 1).is_err(), "A sees B's header");
            assert!(check(p, 200, 1).is_err());
            assert_eq!(check(p, 200, 2), Ok(()));
            // B's header restored over A's body: the body still differs.
            fill(p, 200, 1);
            (p as *mut u64).write(header(p as usize, 200, 2));
            assert_eq!(check(p, 200, 2).unwrap_err().offset, 8);
        }
    }

    #[test]
    fn entries_pack_and_nonces_vary() {
        let e = Entry::new(0x7fff_1234_5678, 3, 0xBEEF);
        assert_eq!(
            (e.addr(), e.kind(), e.nonce()),
            (0x7fff_1234_5678, 3, 0xBEEF)
        );
        assert!(packable(0x7fff_ffff_f000) && !packable(1 << 48));
        let a: Vec<u16> = (0..100).map(|_| next_nonce()).collect();
        assert!(a.iter().all(|&n| n != 0));
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert!(d.len() > 90, "nonces repeat too often: {a:?}");
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
