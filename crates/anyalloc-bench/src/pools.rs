//! Two baselines for the any-context workloads: what the Linux kernel did
//! for BPF programs (which run in any context) before nolock allocation.
//! Written from the descriptions of those designs, not from their code.
//!
//! * [`PreallocPool`]: the early BPF maps' full preallocation. A fixed array
//!   of objects sized for the maximum, every byte committed up front, and a
//!   lock-free free list (Treiber stack of indices with an ABA tag in the
//!   head word). Allocation fails only when every object is in use.
//! * [`WatermarkPool`]: `bpf_mem_alloc`'s per-CPU caches. Each CPU has a
//!   free list guarded by a per-CPU try-flag (the kernel disables
//!   interrupts and counts `active`; a handler that finds the flag taken
//!   fails, as there). When a list falls below its low watermark, the
//!   allocating context raises an irq_work-like wake-up (a futex wake, which
//!   is async-signal-safe) and a worker thread refills that list to its high
//!   watermark from the system allocator. A free that finds the flag taken
//!   goes to a per-CPU lock-free side list; a list that grows above its high
//!   watermark wakes the worker, which gives the excess back to the system
//!   allocator (down to the midpoint of low and high). Watermarks: 32 / 96
//!   objects for objects up to 256 bytes, proportionally fewer for larger
//!   ones (at least 1 / 3). The handler path never calls the system
//!   allocator: an empty list means failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyalloc::platform::futex;

use crate::sys;

const NIL: u32 = u32::MAX;

/// A preallocated pool: `capacity` objects of `size` bytes, all committed
/// at creation; lock-free (and so signal-safe) alloc and free.
pub struct PreallocPool {
    base: *mut u8,
    size: usize,
    capacity: u32,
    next: Box<[AtomicU32]>,
    /// `tag << 32 | index of the first free object` (`NIL`: empty).
    head: AtomicU64,
    layout: Layout,
    in_use: AtomicUsize,
}

// SAFETY: the objects are handed out exclusively by the atomic free list;
// `base` is only read.
unsafe impl Send for PreallocPool {}
// SAFETY: as above.
unsafe impl Sync for PreallocPool {}

impl PreallocPool {
    /// A pool of `capacity` objects of `size` bytes (a multiple of 8),
    /// every page touched.
    pub fn new(size: usize, capacity: usize) -> PreallocPool {
        assert!(size >= 8 && size.is_multiple_of(8) && capacity > 0 && capacity < NIL as usize);
        let layout = Layout::from_size_align(size * capacity, 4096).expect("pool layout");
        // SAFETY: non-zero size.
        let base = unsafe { System.alloc(layout) };
        if base.is_null() {
            crate::out_of_memory("System", "the preallocated pool");
        }
        // SAFETY: `base` is `layout.size()` fresh writable bytes.
        unsafe { std::ptr::write_bytes(base, 0, layout.size()) };
        let next: Box<[AtomicU32]> = (0..capacity as u32)
            .map(|i| AtomicU32::new(if i + 1 < capacity as u32 { i + 1 } else { NIL }))
            .collect();
        PreallocPool {
            base,
            size,
            capacity: capacity as u32,
            next,
            head: AtomicU64::new(0),
            layout,
            in_use: AtomicUsize::new(0),
        }
    }

    /// Bytes committed (objects and free-list links).
    pub fn committed_bytes(&self) -> usize {
        self.layout.size() + self.next.len() * 4
    }

    /// Objects the pool holds.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Objects handed out now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Pops a free object; `None` when all are in use. Lock-free: a handler
    /// that interrupts another pop or push on its thread just wins the CAS
    /// and the interrupted one retries.
    #[inline]
    pub fn alloc(&self) -> Option<*mut u8> {
        let mut h = self.head.load(Ordering::Acquire);
        loop {
            let idx = h as u32;
            if idx == NIL {
                return None;
            }
            let next = self.next[idx as usize].load(Ordering::Relaxed);
            let new = ((h >> 32).wrapping_add(1) << 32) | next as u64;
            match self
                .head
                .compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.in_use.fetch_add(1, Ordering::Relaxed);
                    return Some(self.base.wrapping_add(idx as usize * self.size));
                }
                Err(cur) => h = cur,
            }
        }
    }

    /// Pushes `p` back.
    ///
    /// # Safety
    /// `p` came from [`alloc`](Self::alloc) on this pool and is not used
    /// afterwards.
    #[inline]
    pub unsafe fn free(&self, p: *mut u8) {
        let idx = ((p as usize - self.base as usize) / self.size) as u32;
        debug_assert!(idx < self.capacity);
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        let mut h = self.head.load(Ordering::Acquire);
        loop {
            self.next[idx as usize].store(h as u32, Ordering::Relaxed);
            let new = ((h >> 32).wrapping_add(1) << 32) | idx as u64;
            match self
                .head
                .compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(cur) => h = cur,
            }
        }
    }
}

impl Drop for PreallocPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the pool is gone.
        unsafe { System.dealloc(self.base, self.layout) };
    }
}

/// One CPU's cache of the watermark pool.
#[repr(align(128))]
struct CpuCache {
    /// The try-flag: whoever sets it owns `list` and `count`.
    active: AtomicBool,
    /// Intrusive free list (each free object's first word is the link).
    list: UnsafeCell<usize>,
    count: AtomicUsize,
    /// Frees that found `active` taken: a lock-free stack the worker drains.
    extra: AtomicUsize,
    /// A wake-up is pending for this CPU (don't raise another).
    raised: AtomicBool,
}

/// Counters of a [`WatermarkPool`].
#[derive(Debug, Default)]
pub struct WatermarkStats {
    /// Allocations that found the CPU's try-flag taken.
    pub fail_busy: AtomicU64,
    /// Allocations that found the CPU's list empty.
    pub fail_empty: AtomicU64,
    /// Objects the worker took from the system allocator.
    pub refilled: AtomicU64,
    /// Objects the worker gave back to the system allocator.
    pub trimmed: AtomicU64,
    /// Wake-ups raised.
    pub wakeups: AtomicU64,
}

struct Shared {
    cpus: Box<[CpuCache]>,
    size: usize,
    low: usize,
    high: usize,
    wake: AtomicU32,
    stop: AtomicBool,
    stats: WatermarkStats,
}

// SAFETY: each `list` is only accessed by the holder of its CPU's `active`
// flag; everything else is atomic.
unsafe impl Sync for Shared {}
// SAFETY: as above; the objects are plain memory from `System`.
unsafe impl Send for Shared {}

/// A `bpf_mem_alloc`-style pool: per-CPU free lists between watermarks,
/// refilled and trimmed asynchronously by a worker thread. See the module
/// documentation.
pub struct WatermarkPool {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl WatermarkPool {
    /// The watermarks for `size`-byte objects: (low, high).
    pub fn watermarks(size: usize) -> (usize, usize) {
        if size <= 256 {
            (32, 96)
        } else {
            ((32 * 256 / size).max(1), (96 * 256 / size).max(3))
        }
    }

    /// A pool of `size`-byte objects (a multiple of 8) with one list per
    /// CPU, each filled to its high watermark, and its worker thread.
    pub fn new(size: usize) -> WatermarkPool {
        assert!(size >= 8 && size.is_multiple_of(8));
        let (low, high) = Self::watermarks(size);
        let n = sys::cpus();
        let cpus: Box<[CpuCache]> = (0..n)
            .map(|_| CpuCache {
                active: AtomicBool::new(false),
                list: UnsafeCell::new(0),
                count: AtomicUsize::new(0),
                extra: AtomicUsize::new(0),
                raised: AtomicBool::new(false),
            })
            .collect();
        let shared = Arc::new(Shared {
            cpus,
            size,
            low,
            high,
            wake: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            stats: WatermarkStats::default(),
        });
        for c in shared.cpus.iter() {
            shared.refill(c);
        }
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("watermark-refill".into())
            .spawn(move || s.worker())
            .expect("spawn the refill worker");
        WatermarkPool {
            shared,
            worker: Some(worker),
        }
    }

    /// (low, high) of this pool.
    pub fn marks(&self) -> (usize, usize) {
        (self.shared.low, self.shared.high)
    }

    /// The pool's counters.
    pub fn stats(&self) -> &WatermarkStats {
        &self.shared.stats
    }

    /// Objects cached over all CPUs now.
    pub fn cached(&self) -> usize {
        self.shared
            .cpus
            .iter()
            .map(|c| c.count.load(Ordering::Relaxed))
            .sum()
    }

    #[inline]
    fn cache(&self) -> &CpuCache {
        let cpus = &self.shared.cpus;
        &cpus[anyalloc_storm::thread::current_cpu() % cpus.len()]
    }

    /// From any context: pops this CPU's list, or fails (`None`) when the
    /// list is empty or its try-flag is taken. Below the low watermark it
    /// wakes the worker.
    #[inline]
    pub fn alloc(&self) -> Option<*mut u8> {
        let s = &*self.shared;
        let c = self.cache();
        if c.active
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            s.stats.fail_busy.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // SAFETY: we hold the CPU's try-flag, which owns `list`.
        let head = unsafe { *c.list.get() };
        let r = if head == 0 {
            None
        } else {
            // SAFETY: `head` is a free object of ours; its first word is
            // the link; we own the list.
            unsafe { *c.list.get() = (head as *const usize).read() };
            Some(head as *mut u8)
        };
        let count = if r.is_some() {
            c.count.fetch_sub(1, Ordering::Relaxed) - 1
        } else {
            0
        };
        c.active.store(false, Ordering::Release);
        if count < s.low {
            s.raise(c);
        }
        if r.is_none() {
            s.stats.fail_empty.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// From any context: pushes `p` onto this CPU's list (or, if its
    /// try-flag is taken, onto the CPU's lock-free side list). Above the
    /// high watermark it wakes the worker.
    ///
    /// # Safety
    /// `p` came from [`alloc`](Self::alloc) on this pool and is dead.
    #[inline]
    pub unsafe fn free(&self, p: *mut u8) {
        let s = &*self.shared;
        let c = self.cache();
        if c.active
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: we hold the try-flag; `p` is ours to link.
            unsafe {
                (p as *mut usize).write(*c.list.get());
                *c.list.get() = p as usize;
            }
            let count = c.count.fetch_add(1, Ordering::Relaxed) + 1;
            c.active.store(false, Ordering::Release);
            if count > s.high {
                s.raise(c);
            }
        } else {
            let mut h = c.extra.load(Ordering::Relaxed);
            loop {
                // SAFETY: `p` is ours until the push succeeds.
                unsafe { (p as *mut usize).write(h) };
                match c.extra.compare_exchange_weak(
                    h,
                    p as usize,
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(cur) => h = cur,
                }
            }
            s.raise(c);
        }
    }
}

impl Shared {
    /// The irq_work-like wake-up: once per CPU until the worker ran.
    #[inline]
    fn raise(&self, c: &CpuCache) {
        if !c.raised.swap(true, Ordering::AcqRel) {
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            self.wake.store(1, Ordering::Release);
            futex::wake_one(&self.wake);
        }
    }

    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size, 8).expect("object layout")
    }

    /// Takes `c`'s try-flag from normal context (the worker): spins, since
    /// holders are handlers or threads that release it within a few
    /// instructions.
    fn lock<'a>(&self, c: &'a CpuCache) -> &'a CpuCache {
        while c
            .active
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        c
    }

    /// Worker: side list into the main list, then refill to `high` if below
    /// `low`, or trim to the midpoint if above `high`.
    fn refill(&self, c: &CpuCache) {
        c.raised.store(false, Ordering::Release);
        let extra = c.extra.swap(0, Ordering::Acquire);
        let count = c.count.load(Ordering::Relaxed);
        // Objects from the system allocator, outside the flag.
        let want = if count < self.low {
            self.high - count
        } else {
            0
        };
        let mut fresh = 0usize;
        let mut fresh_n = 0usize;
        for _ in 0..want {
            // SAFETY: non-zero layout; normal context.
            let p = unsafe { System.alloc(self.layout()) };
            if p.is_null() {
                break;
            }
            // SAFETY: a fresh block of at least 8 bytes.
            unsafe { (p as *mut usize).write(fresh) };
            fresh = p as usize;
            fresh_n += 1;
        }
        self.stats
            .refilled
            .fetch_add(fresh_n as u64, Ordering::Relaxed);
        let c = self.lock(c);
        let mut spill = 0usize;
        // SAFETY: we hold the try-flag; every linked object is free and ours.
        unsafe {
            let list = &mut *c.list.get();
            let mut added = 0;
            for mut chain in [extra, fresh] {
                while chain != 0 {
                    let next = (chain as *const usize).read();
                    (chain as *mut usize).write(*list);
                    *list = chain;
                    added += 1;
                    chain = next;
                }
            }
            let mut count = c.count.load(Ordering::Relaxed) + added;
            if count > self.high {
                let keep = (self.low + self.high) / 2;
                while count > keep && *list != 0 {
                    let p = *list;
                    *list = (p as *const usize).read();
                    (p as *mut usize).write(spill);
                    spill = p;
                    count -= 1;
                }
            }
            c.count.store(count, Ordering::Relaxed);
        }
        c.active.store(false, Ordering::Release);
        let mut trimmed = 0u64;
        while spill != 0 {
            // SAFETY: unlinked above; ours to free.
            let next = unsafe { (spill as *const usize).read() };
            // SAFETY: from System with this layout.
            unsafe { System.dealloc(spill as *mut u8, self.layout()) };
            spill = next;
            trimmed += 1;
        }
        self.stats.trimmed.fetch_add(trimmed, Ordering::Relaxed);
    }

    fn worker(&self) {
        while !self.stop.load(Ordering::Acquire) {
            futex::wait(&self.wake, 0, Some(Duration::from_millis(50)));
            self.wake.store(0, Ordering::Release);
            for c in self.cpus.iter() {
                let count = c.count.load(Ordering::Relaxed);
                if c.raised.load(Ordering::Acquire)
                    || count < self.low
                    || count > self.high
                    || c.extra.load(Ordering::Relaxed) != 0
                {
                    self.refill(c);
                }
            }
        }
    }

    /// Frees every cached object (the pool is going away).
    fn release_all(&self) {
        for c in self.cpus.iter() {
            let c = self.lock(c);
            // SAFETY: we hold the flag; the worker has stopped.
            let mut chain = unsafe { std::mem::replace(&mut *c.list.get(), 0) };
            let mut extra = c.extra.swap(0, Ordering::Acquire);
            c.count.store(0, Ordering::Relaxed);
            c.active.store(false, Ordering::Release);
            for head in [&mut chain, &mut extra] {
                while *head != 0 {
                    // SAFETY: a free object of the pool, unlinked now.
                    let next = unsafe { (*head as *const usize).read() };
                    // SAFETY: from System with this layout.
                    unsafe { System.dealloc(*head as *mut u8, self.layout()) };
                    *head = next;
                }
            }
        }
    }
}

impl Drop for WatermarkPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.store(1, Ordering::Release);
        futex::wake_one(&self.shared.wake);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        self.shared.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prealloc_pool_hands_out_each_object_once() {
        let pool = PreallocPool::new(64, 100);
        let mut got: Vec<*mut u8> = (0..100).map(|_| pool.alloc().unwrap()).collect();
        assert!(pool.alloc().is_none(), "exhausted at capacity");
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 100);
        for p in got {
            // SAFETY: from this pool, freed once.
            unsafe { pool.free(p) };
        }
        assert_eq!(pool.in_use(), 0);
        assert!(pool.alloc().is_some());
    }

    #[test]
    fn watermark_pool_fails_past_its_stock_and_refills() {
        let pool = WatermarkPool::new(64);
        let (low, high) = pool.marks();
        assert_eq!((low, high), (32, 96));
        assert_eq!(WatermarkPool::watermarks(4096), (2, 6));
        // Pin to one CPU so that every call sees the same list.
        anyalloc_storm::thread::pin_to_cpu(anyalloc_storm::thread::current_cpu());
        let mut got = Vec::new();
        while let Some(p) = pool.alloc() {
            got.push(p);
            if got.len() > 100_000 {
                break;
            }
        }
        assert!(got.len() >= high / 2, "served its stock: {}", got.len());
        // The worker refills after the wake-up.
        let mut refilled = false;
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(5));
            if let Some(p) = pool.alloc() {
                got.push(p);
                refilled = true;
                break;
            }
        }
        assert!(refilled);
        for p in got {
            // SAFETY: from this pool, freed once.
            unsafe { pool.free(p) };
        }
        // Above the high mark now: the worker gives the excess back.
        let mut trimmed = false;
        for _ in 0..400 {
            std::thread::sleep(Duration::from_millis(5));
            if pool.stats().trimmed.load(Ordering::Relaxed) > 0 {
                trimmed = true;
                break;
            }
        }
        assert!(trimmed);
    }
}
