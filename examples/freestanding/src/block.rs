//! Pattern-checked blocks from the global allocator, and the ring that hands
//! them between contexts.
//!
//! A block starts with its length and a tag (owner and serial number); every
//! further word is a function of the tag and its index, so an overlap with
//! another block, a stray write or a block handed out twice shows up as a
//! mismatch when the block is checked.

use alloc::alloc::{alloc, dealloc};
use core::alloc::Layout;
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::*};

/// Who allocated a block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Owner {
    Main = 1,
    LowIrq = 2,
    HighIrq = 3,
}

const HEADER: usize = 16;

/// One allocation, owned; freed by [`Block::free`] in whatever context that
/// runs (the global allocator picks the path).
pub struct Block(NonNull<u64>);

fn layout(len: usize) -> Layout {
    // Lengths are whole words, at least the header.
    Layout::from_size_align(len.max(HEADER).next_multiple_of(8), 16).unwrap()
}

fn word(tag: u64, i: usize) -> u64 {
    tag ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Block {
    /// Allocates `len` bytes and fills them with `owner`'s pattern; `None`
    /// when the allocator has no memory for this context.
    pub fn new(len: usize, owner: Owner, serial: u64) -> Option<Block> {
        let layout = layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { alloc(layout) } as *mut u64)?;
        let tag = (owner as u64) << 56 | serial & ((1 << 56) - 1);
        let words = layout.size() / 8;
        // SAFETY: the allocation holds `words` aligned words, all ours.
        unsafe {
            p.write(layout.size() as u64);
            p.add(1).write(tag);
            for i in 2..words {
                p.add(i).write(word(tag, i));
            }
        }
        Some(Block(p))
    }

    /// Whether the block is intact and belongs to `owner`.
    pub fn check(&self, owner: Owner) -> bool {
        let p = self.0;
        // SAFETY: the header was written by `new`; the length it records is
        // the allocation's (if intact, checked before it is used).
        unsafe {
            let (len, tag) = (p.read() as usize, p.add(1).read());
            if tag >> 56 != owner as u64 || len < HEADER || len % 8 != 0 || len > 64 << 20 {
                return false;
            }
            (2..len / 8).all(|i| p.add(i).read() == word(tag, i))
        }
    }

    /// Flips one bit of the tag (the owner): a stray write, for the checker's test.
    pub fn corrupt(&mut self) {
        // SAFETY: every block has at least the header; the tag word is ours.
        unsafe { *self.0.as_ptr().add(1) ^= 1 << 60 };
    }

    /// Frees the block; call [`check`](Self::check) first.
    pub fn free(self) {
        // SAFETY: the block came from `alloc` with this layout (its length
        // is in the header, which `check` vouched for).
        unsafe {
            let len = self.0.read() as usize;
            dealloc(self.0.as_ptr() as *mut u8, layout(len));
        }
    }
}

/// A single-producer, single-consumer ring of blocks between two contexts
/// (one may interrupt the other): a driver's receive or completion queue.
pub struct Ring<const N: usize> {
    slots: [AtomicPtr<u64>; N],
    head: AtomicUsize,
    tail: AtomicUsize,
}

impl<const N: usize> Ring<N> {
    pub const fn new() -> Self {
        Ring {
            slots: [const { AtomicPtr::new(null_mut()) }; N],
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    /// Producer side: hands `block` over, or gives it back if the ring is full.
    pub fn push(&self, block: Block) -> Result<(), Block> {
        let head = self.head.load(Relaxed);
        if head - self.tail.load(Acquire) == N {
            return Err(block);
        }
        self.slots[head % N].store(block.0.as_ptr(), Relaxed);
        self.head.store(head + 1, Release);
        Ok(())
    }

    /// Consumer side: takes the oldest block.
    pub fn pop(&self) -> Option<Block> {
        let tail = self.tail.load(Relaxed);
        if tail == self.head.load(Acquire) {
            return None;
        }
        let p = self.slots[tail % N].load(Relaxed);
        self.tail.store(tail + 1, Release);
        NonNull::new(p).map(Block)
    }
}
