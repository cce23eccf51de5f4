//! Owner-tagged block contents: every block a storm allocates is filled
//! with a pattern derived from its address, its size and its owner's tag,
//! and checked when freed.
//!
//! The tag is kept next to the block's address in the one word that owns
//! the block, an [`Entry`]: the slot of a [`Stash`](crate::Stash), a
//! hand-off slot or a worker's list. It holds a *kind* (3 bits of the
//! user's choosing: which path or which signal allocated the block, how to
//! free it) and a per-allocation *nonce* (13 bits, [`next_nonce`]). Two
//! owners of the same memory (an allocator handing one block out twice)
//! hold different tags, so whichever checks second finds the other owner's
//! bytes, even when both asked for the same size. A single atomic swap moves
//! a block and its tag together.
//!
//! Layout of a block of `size` bytes (at least 8; any alignment: every
//! access is unaligned-safe):
//!
//! * word 0, the header: the size in the low 24 bits, the tag in the next
//!   16 and a hash of the address above them, so a block parked in a stash
//!   or handed to another thread carries its own size ([`size_of`]) and a
//!   block copied elsewhere does not pass;
//! * then a sequence seeded by address, size and tag: every word up to
//!   [`SAMPLED_ABOVE`] bytes; above (blocks filled inside signal handlers,
//!   up to 4 MiB) every 32nd word, at offsets that depend only on the block
//!   start (so two overlapping page-aligned blocks share sampled words),
//!   and the last word;
//! * the tail bytes after the last whole word.
//!
//! Filling and checking touch no lock and never allocate: handler-safe.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::rng::mix64;

/// The largest block size the header can hold.
pub const MAX_SIZE: usize = (1 << 24) - 1;
/// Blocks larger than this get a sampled sequence (see the module
/// documentation): writing 4 MiB would dominate a handler.
pub const SAMPLED_ABOVE: usize = 64 << 10;
const SAMPLE_STRIDE: usize = 32;

/// Bits of a user-space address on the targets the storms run on (47-bit,
/// or 48-bit with 5-level paging only on request): the tag lives above.
const ADDR_BITS: u32 = 48;
const ADDR_MASK: usize = (1 << ADDR_BITS) - 1;
/// Bits of the kind, just above the address.
const KIND_BITS: u32 = 3;
/// Bits of the nonce, above the kind.
pub const NONCE_BITS: u32 = 64 - ADDR_BITS - KIND_BITS;

const SIZE_MASK: u64 = (1 << 24) - 1;
const TAG_SHIFT: u32 = 24;
const TAG_MASK: u64 = 0xFFFF;
const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// A block's address with its owner's tag (a kind and a nonce) in one word.
/// Never 0 (a block's address is not). Handler-safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry(pub usize);

impl Entry {
    /// Packs `addr` (non-zero, below 2^48), a `kind` (`0..8`) and the low
    /// [`NONCE_BITS`] bits of `nonce`. An address that does not fit ends the
    /// process with a message ([`crate::signal::die`]): losing its bits
    /// would hide the very faults a storm looks for.
    #[inline]
    pub fn new(addr: usize, kind: usize, nonce: u16) -> Entry {
        debug_assert!(kind < 1 << KIND_BITS);
        if addr == 0 || !packable(addr) {
            crate::signal::die("anyalloc-storm: a block address beyond 48 bits (or 0) cannot be packed in an Entry");
        }
        let nonce = nonce as usize & ((1 << NONCE_BITS) - 1);
        Entry(addr | (kind & 7) << ADDR_BITS | nonce << (ADDR_BITS + KIND_BITS))
    }

    /// [`Entry::new`] with a fresh nonce ([`next_nonce`]).
    #[inline]
    pub fn fresh(addr: usize, kind: usize) -> Entry {
        Entry::new(addr, kind, next_nonce())
    }

    /// The block's address.
    #[inline]
    pub fn addr(self) -> usize {
        self.0 & ADDR_MASK
    }

    /// The block's address as a pointer.
    #[inline]
    pub fn ptr(self) -> *mut u8 {
        self.addr() as *mut u8
    }

    /// The kind given to [`Entry::new`].
    #[inline]
    pub fn kind(self) -> usize {
        (self.0 >> ADDR_BITS) & 7
    }

    /// The nonce (its low [`NONCE_BITS`] bits).
    #[inline]
    pub fn nonce(self) -> u16 {
        (self.0 >> (ADDR_BITS + KIND_BITS)) as u16
    }

    /// The owner tag the pattern is derived from: kind and nonce.
    #[inline]
    fn tag(self) -> u64 {
        (self.0 >> ADDR_BITS) as u64
    }
}

/// Whether `addr` fits in an [`Entry`].
#[inline]
pub fn packable(addr: usize) -> bool {
    addr & !ADDR_MASK == 0
}

/// The nonce source: every allocation takes the next value (one atomic add).
static NONCES: AtomicU64 = AtomicU64::new(0x1234);

/// A fresh per-allocation nonce ([`NONCE_BITS`] bits, never 0).
/// Handler-safe.
#[inline]
pub fn next_nonce() -> u16 {
    let n = mix64(NONCES.fetch_add(1, Relaxed)) as u16 & ((1 << NONCE_BITS) - 1);
    n.max(1)
}

/// Where a check found the first wrong word (offset in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset of the first wrong word (or tail byte) in the block.
    pub offset: usize,
    /// What the owner wrote there.
    pub expected: u64,
    /// What is there now.
    pub found: u64,
}

#[inline]
fn header(addr: usize, size: usize, tag: u64) -> u64 {
    (mix64(addr as u64) & !(SIZE_MASK | TAG_MASK << TAG_SHIFT)) | tag << TAG_SHIFT | size as u64
}

#[inline]
fn seed(addr: usize, size: usize, tag: u64) -> u64 {
    mix64((addr as u64).rotate_left(17) ^ size as u64 ^ tag << 40 ^ 0x5EED)
}

/// The word indices a block of `size` bytes carries besides its header.
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

/// The sequence word at index `j`.
#[inline]
fn word(seed: u64, j: usize) -> u64 {
    seed.wrapping_add(STEP.wrapping_mul(j as u64))
}

#[inline]
fn tail_byte(seed: u64, k: usize) -> u8 {
    (seed >> ((k & 7) * 8)) as u8 ^ 0xA5
}

/// Fills the `size` bytes (`8..=MAX_SIZE`) of the block behind `e` for the
/// owner `e` names. Handler-safe.
///
/// # Safety
/// `e.addr()` is valid for writes of `size` bytes.
#[inline]
pub unsafe fn fill(e: Entry, size: usize) {
    debug_assert!((8..=MAX_SIZE).contains(&size));
    let (p, addr, tag) = (e.ptr(), e.addr(), e.tag());
    let words = p as *mut u64;
    let s = seed(addr, size, tag);
    // SAFETY: per the caller, `size` bytes at `p`: the header word, the
    // words of `word_indices` (all below `size / 8`) and the tail bytes.
    unsafe {
        words.write_unaligned(header(addr, size, tag));
        for j in word_indices(size) {
            words.add(j).write_unaligned(word(s, j));
        }
        for k in (size & !7)..size {
            p.add(k).write(tail_byte(s, k));
        }
    }
}

/// The size recorded in the header of the block behind `e`, if the header
/// matches the block's address and `e`'s tag. Handler-safe.
///
/// # Safety
/// `e.addr()` is valid for reads of 8 bytes.
#[inline]
pub unsafe fn size_of(e: Entry) -> Result<usize, Mismatch> {
    let (addr, tag) = (e.addr(), e.tag());
    // SAFETY: per the caller.
    let h = unsafe { (e.ptr() as *const u64).read_unaligned() };
    let size = (h & SIZE_MASK) as usize;
    if size < 8 || h != header(addr, size, tag) {
        return Err(Mismatch {
            offset: 0,
            expected: header(addr, 0, tag),
            found: h,
        });
    }
    Ok(size)
}

/// Checks the block behind `e`, filled by [`fill`] with `size` bytes for the
/// owner `e` names: `Ok` if every word and byte of the pattern is intact.
/// Handler-safe.
///
/// # Safety
/// `e.addr()` is valid for reads of `size` bytes.
#[inline]
pub unsafe fn check(e: Entry, size: usize) -> Result<(), Mismatch> {
    let (p, addr, tag) = (e.ptr() as *const u8, e.addr(), e.tag());
    let words = p as *const u64;
    let s = seed(addr, size, tag);
    // SAFETY: per the caller, as in `fill` (reads; volatile-free reads are
    // fine: the storm's handlers and threads synchronise through the atomic
    // that handed the block over).
    unsafe {
        let h = words.read_unaligned();
        if h != header(addr, size, tag) {
            return Err(Mismatch {
                offset: 0,
                expected: header(addr, size, tag),
                found: h,
            });
        }
        for j in word_indices(size) {
            let v = word(s, j);
            let w = words.add(j).read_unaligned();
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

/// [`size_of`], then [`check`] with that size: the block's size if its
/// whole pattern is intact. Handler-safe.
///
/// # Safety
/// `e` names a live block filled by [`fill`] (at least 8 bytes, and as
/// many as its header says when the header is intact).
#[inline]
pub unsafe fn verify(e: Entry) -> Result<usize, Mismatch> {
    // SAFETY: per the caller: at least 8 bytes.
    let size = unsafe { size_of(e) }?;
    // SAFETY: per the caller: the intact header gives the block's size.
    unsafe { check(e, size) }?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_detect_corruption() {
        let mut buf = vec![0u64; (128 << 10) / 8 + 2];
        // Both an aligned and a 4-aligned block.
        for shift in [0, 4] {
            // SAFETY: inside the buffer.
            let p = unsafe { (buf.as_mut_ptr() as *mut u8).add(shift) };
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
                let e = Entry::new(p as usize, 5, 7);
                // SAFETY: the buffer holds 128 KiB + 16 bytes.
                unsafe {
                    fill(e, size);
                    assert_eq!(verify(e), Ok(size));
                    let last = p.add(size - 1);
                    *last ^= 1;
                    assert_eq!(check(e, size).unwrap_err().offset & !7, (size - 1) & !7);
                    *last ^= 1;
                    // The same bytes at another address do not pass.
                    let q = p.add(8);
                    core::ptr::copy(p, q, size);
                    assert!(size_of(Entry::new(q as usize, 5, 7)).is_err());
                }
            }
        }
    }

    #[test]
    fn a_second_owner_of_the_same_size_is_detected() {
        let mut buf = vec![0u64; 64];
        let p = buf.as_mut_ptr() as usize;
        let (a, b) = (Entry::new(p, 1, 1), Entry::new(p, 1, 2));
        // SAFETY: the buffer holds 512 bytes.
        unsafe {
            // Owner A fills, then owner B (same block, same size) overwrites.
            fill(a, 200);
            fill(b, 200);
            assert!(size_of(a).is_err(), "A sees B's header");
            assert!(check(a, 200).is_err());
            assert_eq!(check(b, 200), Ok(()));
            // B's header restored over A's body: the body still differs.
            fill(a, 200);
            (p as *mut u64).write(header(p, 200, b.tag()));
            assert_eq!(check(b, 200).unwrap_err().offset, 8);
            // The same nonce with another kind is another owner too.
            fill(a, 200);
            assert!(verify(Entry::new(p, 2, 1)).is_err());
        }
    }

    #[test]
    fn entries_pack_and_nonces_vary() {
        let e = Entry::new(0x7fff_1234_5679, 3, 0x1EEF);
        assert_eq!(
            (e.addr(), e.kind(), e.nonce()),
            (0x7fff_1234_5679, 3, 0x1EEF)
        );
        assert_eq!(e.ptr() as usize, 0x7fff_1234_5679);
        assert!(packable(0x7fff_ffff_f000) && !packable(1 << 48));
        let a: Vec<u16> = (0..100).map(|_| next_nonce()).collect();
        assert!(a.iter().all(|&n| n != 0 && n < 1 << NONCE_BITS));
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert!(d.len() > 90, "nonces repeat too often: {a:?}");
    }
}
