//! A zone: one contiguous run of page frames managed by a buddy allocator,
//! with its per-CPU page lists and its deferred-free stack.
//!
//! # Memory layout
//!
//! A zone manages pages `[start, end)`. Page indices count from `base`, the
//! largest-block (4 MiB) aligned address at or below `start`, so a block of
//! order `k` at index `i` is naturally aligned exactly when `i` is a multiple
//! of `2^k`, and its buddy is `i ^ 2^k`. The zone's own metadata (this struct,
//! the slots, the descriptor array) sits in a separate area: on std, right
//! after the pages in the same reservation; in `no_std`, at the end of the
//! embedder's region. The descriptor array starts in a page of its own, at
//! an offset within that page chosen when the zone is built, so that the
//! most reused descriptors share no cache line's page offset with the fast
//! paths' other hot words ([`descs_offset`]).
//!
//! # Locks and what they protect
//!
//! * `lock` (a [`ZoneLock`]): the buddy free lists, their counts, and the
//!   state of every block on them.
//! * each slot's [`SlotLock`]: that slot's lists.
//! * `deferred`: lock-free, one [`TaggedStack`] per order; pages pushed
//!   there are owned by the stack until a zone-lock holder takes them (all,
//!   on the normal path; at most [`NOLOCK_DRAIN_BUDGET`] on the nolock
//!   path) or a nolock allocation pops one block of its order.
//! * `stock`: lock-free cells, one block each (orders above
//!   `PCP_MAX_ORDER`): filled with a CAS from `NIL` by a zone-lock holder or
//!   a nolock free, emptied with a swap to `NIL` by whoever takes the block.
//!
//! Lock order: slot, then zone. A zone-lock holder may only `try_lock` a slot
//! (drain does this), so the order can never invert into a deadlock.
//!
//! # Watermarks
//!
//! `min`, in pages of the buddy free lists (about 1/256 of the zone). The
//! nolock path never takes the zone below `min`; the normal path does only
//! as a last resort, after reclaim has failed (the reserve a reclaiming
//! caller may use, as the kernel's `ALLOC_NO_WATERMARKS`). Twice `min` is
//! the "low" mark: below it a maintenance pass runs the heap's shrinkers.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::desc::{self, PageDesc};
use crate::idle::IdleWatch;
use crate::platform::Platform;
use crate::sync::rseq::SeqTarget;
use crate::sync::{
    Mode, ShortOrders, SlotGuard, SlotLock, TaggedStack, ZoneGuard, ZoneLock, TAGGED_NIL,
};
pub(crate) use crate::PCP_MAX_ORDER;
/// One order above [`PCP_MAX_ORDER`] (64 KiB) has a per-CPU list too, used
/// by a heap's large blocks only: pushed by the rseq fast path of a heap's
/// large free, popped by the rseq fast path of a heap's large allocation
/// (the first zone's list, then each grown zone's), in every context
/// (normal, nolock, nested: the sequences restart rather than wait), and
/// drained like the others (by any slot holder: trims,
/// drains, maintenance). The page allocator's own calls of this order
/// never push or pop it (for them it is a large order: buddy lists, stock,
/// large nolock counters), and neither does anything once the list is
/// empty or the slot has no room: beyond the fast path, 64 KiB is a large
/// order for the heap too.
pub(crate) const HEAP_PCP_ORDER: u32 = PCP_MAX_ORDER + 1;
use crate::{MAX_ORDER, PAGE_SHIFT, PAGE_SIZE};

/// Slots per CPU: normal context, first handler, nested handler.
pub(crate) const LEVELS: usize = 3;
/// Bytes of the largest block; zones are indexed from such a boundary.
pub(crate) const MAX_BLOCK: usize = PAGE_SIZE << MAX_ORDER;

/// Flag in a free block's stamp (`carved`): its memory is not with the
/// process (given back to the OS, or never touched). Such blocks sit at the
/// tail of their buddy list, after every block without the flag (see
/// `Zone::tails`).
const RELEASED: usize = 1 << (usize::BITS - 1);

/// The lowest order whose free blocks the maintainer returns to the OS when
/// they stay idle (256 KiB): a burst's memory rarely re-forms whole 4 MiB
/// blocks. Smaller free blocks go back too, but only after staying idle
/// [`SMALL_AGE_FACTOR`] times as long, a bounded number per pass
/// (`Zone::release_idle_blocks`).
#[cfg(feature = "std")]
pub(crate) const RELEASE_MIN_ORDER: u32 = 6;

/// Free blocks below `RELEASE_MIN_ORDER` go back to the OS after staying
/// idle this many times as long as the larger ones: they are the pages
/// between live slabs, the likeliest to be allocated again soon, and each
/// costs a system call of its own.
#[cfg(feature = "std")]
pub(crate) const SMALL_AGE_FACTOR: usize = 4;

/// The "no page" index of the zone's lists.
pub(crate) const NIL: u32 = u32::MAX;

/// The most page indices a zone may span (its `limit`, counted from the
/// 4 MiB boundary at or below its start): 2^32 - 2^10. Every index stays
/// below [`NIL`], and a naturally aligned block below the limit ends at or
/// below it, so `index + (1 << order)` never wraps a `u32`. `Config::memory`
/// (`MAX_MEMORY`) and `from_region` keep zones within it.
pub(crate) const MAX_ZONE_PAGES: usize = u32::MAX as usize - ((1 << MAX_ORDER) - 1);

/// Deferred blocks one nolock call merges into the buddy lists at most
/// after it took the zone lock (the rest waits for a normal-path holder or
/// the maintainer): a nolock call's work must not grow with the backlog.
pub(crate) const NOLOCK_DRAIN_BUDGET: usize = 8;

/// Orders with a nolock stock: those above the per-CPU lists.
const STOCK_ORDERS: usize = (MAX_ORDER - PCP_MAX_ORDER) as usize;
/// Stock cells of each of those orders, from `PCP_MAX_ORDER + 1` up (at
/// most: a zone keeps one cell at least, and no more than 1/16 of its pages
/// in any one order, [`Zone::stock_cells`]).
///
/// The two largest orders get four: when the zone is busy, a smaller block
/// can also be split from any larger stocked one, but a 2 or 4 MiB block
/// comes only from its own cells (or a 4 MiB one's halves). Measured with
/// `anyalloc stress --threads 8` on two cores (8 threads, so zone-lock
/// holders are preempted inside their sections for whole time slices), with
/// two cells for every order 0.9% of the 4 MiB and 0.2% of the 2 MiB nolock
/// allocations failed busy, and 0.16-0.21% of all large ones; with these,
/// about 0.03% of all large ones.
const STOCK_CELLS: [usize; STOCK_ORDERS] = [2, 2, 2, 2, 2, 4, 4];
/// Where each order's cells start in [`Zone::stock`] (prefix sums of
/// [`STOCK_CELLS`]), and how many cells there are in all.
const STOCK_FIRST: [usize; STOCK_ORDERS + 1] = {
    let mut first = [0; STOCK_ORDERS + 1];
    let mut k = 0;
    while k < STOCK_ORDERS {
        first[k + 1] = first[k] + STOCK_CELLS[k];
        k += 1;
    }
    first
};
const STOCK_TOTAL: usize = STOCK_FIRST[STOCK_ORDERS];

/// The index of `order` (above `PCP_MAX_ORDER`) in the stock's per-order
/// tables.
#[inline]
fn stock_index(order: u32) -> usize {
    debug_assert!(order > PCP_MAX_ORDER && order <= MAX_ORDER);
    (order - PCP_MAX_ORDER - 1) as usize
}

/// Where the slot of `cpu` at context `level` sits in a per-CPU slot array
/// of `cpus * LEVELS` entries, level by level: first every CPU's level-0
/// slot (what the rseq sequences use, one slot apart, so they find theirs
/// with a shift), then level 1, then level 2. CPU ids at or above `cpus`
/// share slots (modulo), so the index is always in bounds.
#[inline(always)]
pub(crate) fn slot_index(cpu: usize, cpus: usize, level: usize) -> usize {
    crate::check!(level < LEVELS, "a slot level out of range");
    let cpu = if cpu < cpus { cpu } else { cpu % cpus };
    level * cpus + cpu
}

/// Why a nolock attempt on one zone failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A lock it needed was held by another context.
    Busy,
    /// The zone (or list) had nothing to give above the watermark.
    Empty,
}

/// One per-CPU, per-context-level set of page lists (orders 0..=3, and
/// [`HEAP_PCP_ORDER`] for a heap's large blocks).
#[repr(C, align(64))]
pub(crate) struct PcpSlot {
    pub(crate) lock: SlotLock,
    /// Set when a nolock allocation found this slot's lists empty; the
    /// maintainer keeps such slots stocked. A normal allocation does not set
    /// it: its refill can wait for the zone lock, so a stock kept for it
    /// would only hold memory. Cleared by drain.
    pub(crate) demand: AtomicU32,
    /// Per order, one word: the list's head (low 32 bits, `NIL` when empty)
    /// and its block count (high 32 bits), so that a restartable sequence
    /// changes both with one committing store (`sync::rseq`).
    lists: [AtomicU64; HEAP_PCP_ORDER as usize + 1],
    /// Nolock allocations served from this slot (updated under its lock,
    /// or by a sequence on this slot's CPU), less the counts that aborted
    /// pops took back here: only the sum over the slots is meaningful
    /// (`page::slot_count_total`).
    pub(crate) nolock_ok: AtomicU64,
    /// Maintenance: for how many passes the slot's lists have not changed.
    idle: IdleWatch,
    /// Nolock large blocks of a heap built on this allocator served by the
    /// fast path from this slot (by a sequence on this slot's CPU): the
    /// heap's share of the slot's nolock successes, which it counts as its
    /// own without a locked instruction (`PageAllocator::seq_alloc_heap_large`).
    /// Summed like `nolock_ok`.
    pub(crate) heap_nolock_ok: AtomicU64,
}

/// A per-CPU list word: `head` in the low half, `count` in the high half.
#[inline(always)]
const fn list_word(head: u32, count: u32) -> u64 {
    (count as u64) << 32 | head as u64
}

impl PcpSlot {
    /// The head and block count of the list of `order` (racy unless the
    /// slot is held).
    #[inline(always)]
    fn list(&self, order: u32) -> (u32, u32) {
        let w = self.lists[order as usize].load(Ordering::Relaxed);
        (w as u32, (w >> 32) as u32)
    }

    /// Pages on this slot's lists (racy unless the slot is held).
    #[inline]
    pub(crate) fn pages(&self) -> usize {
        (0..=HEAP_PCP_ORDER)
            .map(|o| (self.list(o).1 as usize) << o)
            .sum()
    }
}

// The rseq sequences' view of a slot and a descriptor (`sync::rseq::layout`).
#[cfg(not(loom))]
const _: () = {
    use crate::sync::rseq::layout as l;
    assert!(core::mem::offset_of!(PcpSlot, lock) == l::SLOT_LOCK);
    assert!(core::mem::offset_of!(PcpSlot, lists) == l::PCP_LISTS);
    assert!(core::mem::offset_of!(PcpSlot, nolock_ok) == l::PCP_NOLOCK_OK);
    assert!(core::mem::offset_of!(PcpSlot, heap_nolock_ok) == l::PCP_HEAP_NOLOCK_OK);
    assert!(core::mem::size_of::<PcpSlot>() == l::STRIDE);
    assert!(core::mem::size_of::<PageDesc>() == l::DESC_SIZE);
    assert!(core::mem::offset_of!(PageDesc, next) == l::DESC_NEXT);
    assert!(NIL == u32::MAX);
};

/// See the module documentation.
///
/// `repr(C)` with `seq` first, so the zone's address is its sequences'
/// target: a fast path holding the zone needs no second register for it.
#[repr(C)]
pub(crate) struct Zone {
    /// What the page sequences read to find this CPU's level-0 slot
    /// (`cpus` is 0 until rseq is chosen, `set_rseq`).
    seq: SeqTarget,
    pub(crate) start: usize,
    pub(crate) end: usize,
    base: usize,
    first: u32,
    limit: u32,
    descs: *const PageDesc,
    slots: *const PcpSlot,
    cpus: usize,
    platform: &'static dyn Platform,
    pub(crate) lock: ZoneLock,
    heads: [AtomicU32; MAX_ORDER as usize + 1],
    /// The last block of each buddy list (`NIL` when empty). Each list holds
    /// its blocks whose memory is with the process first, then those whose
    /// memory is not (stamped `RELEASED`): a free pushes at the head, a
    /// block given back (or split off one) goes to the tail. So allocations,
    /// which take the head, reuse resident memory before memory that would
    /// fault again, and the walks for blocks to give back stop at the first
    /// `RELEASED` block instead of stepping over them all. The blocks before
    /// that one are in the order they were freed, the latest first (a push
    /// at the head is stamped with the epoch, which never goes back): the
    /// oldest, the ones to give back first, are just before it.
    tails: [AtomicU32; MAX_ORDER as usize + 1],
    /// The first block stamped `RELEASED` of each buddy list (`NIL`: none).
    released_first: [AtomicU32; MAX_ORDER as usize + 1],
    counts: [AtomicU32; MAX_ORDER as usize + 1],
    /// Pages on the buddy free lists (written under `lock`).
    free_buddy: AtomicUsize,
    /// Nolock allocations served from the buddy lists under a tried
    /// `lock` (written under it, so counted with no locked instruction).
    pub(crate) nolock_ok_locked: AtomicUsize,
    /// How many of those were above the per-CPU orders (written under
    /// `lock`).
    pub(crate) nolock_large_ok_locked: AtomicUsize,
    /// Deferred frees, one stack per order.
    deferred: [TaggedStack; MAX_ORDER as usize + 1],
    deferred_pages: AtomicUsize,
    pub(crate) total: usize,
    pub(crate) min: usize,
    pcp_high: u32,
    pcp_batch: u32,
    /// With the rseq fast path (chosen by the page allocator before the
    /// zone is published): glibc's rseq area offset. The level-0 slots are
    /// then changed only by sequences on their CPU and by holders of their
    /// lock taken as `lock_own` / `lock_remote` say.
    rseq_off: Option<isize>,
    /// Free blocks of orders above `PCP_MAX_ORDER` kept for the nolock path,
    /// for when the zone lock is busy (a handler that interrupted its own
    /// thread inside a zone section finds its large block here): one block
    /// per cell, `NIL` when empty, the cells of each order side by side
    /// ([`STOCK_FIRST`]). Counted in `stock_pages`; the blocks are marked
    /// `PCP` (free, off the buddy lists).
    stock: [AtomicU32; STOCK_TOTAL],
    stock_pages: AtomicUsize,
    /// Bit `order`: a nolock allocation asked for that order, so zone-lock
    /// holders keep its cells filled (cleared by a drain).
    stock_want: AtomicU32,
    /// The orders whose cells may be empty (see [`ShortOrders`]): a refill
    /// with every wanted cell full, the usual case, is one load, not a
    /// walk of the cells.
    stock_short: ShortOrders,
    /// Set by every nolock allocation above `PCP_MAX_ORDER`; maintenance
    /// counts the passes without one (`stock_idle`) and gives an idle stock
    /// back to the buddy lists.
    stock_used: AtomicU32,
    stock_idle: AtomicU32,
    /// Pages of a free block taken off its list while its memory goes back
    /// to the OS (still counted in `free_buddy`).
    releasing: AtomicUsize,
    /// The maintenance epoch (advanced by the maintainer), stamped on
    /// max-order blocks as they become free.
    pub(crate) epoch: AtomicUsize,
    /// Where the zone's reservation starts and how long it is (std), for
    /// returning it to the OS.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) mapping: (usize, usize),
    /// The zone's place in its allocator's zone array (0: the first), set
    /// before it is published (`set_position`).
    position: usize,
    /// The zone's untouched part: the whole largest blocks from page index
    /// `fresh` (advanced under `lock`) up to `fresh_end`, free but on no
    /// list, never handed out, their descriptors never written (they read
    /// as `TAIL`). Counted in `free_buddy`; [`buddy_alloc`](Self::buddy_alloc)
    /// carves the next one when the lists have no block big enough. So a
    /// zone's creation writes no descriptor of them: a zone of 64 GiB used
    /// to commit 64 MiB of descriptors (one page in eight) at creation,
    /// and take tens of milliseconds doing it.
    fresh: AtomicU32,
    fresh_end: u32,
}

/// The metadata area a zone needs, in bytes, for `cpus` CPUs and the pages
/// `[start, end)`: the zone, its slots, a page of room for the descriptor
/// array's offset within its page (see [`descs_offset`]) and the array.
pub(crate) fn meta_size(start: usize, end: usize, cpus: usize) -> usize {
    let base = start & !(MAX_BLOCK - 1);
    let limit = (end - base) >> PAGE_SHIFT;
    head_and_slots(cpus).next_multiple_of(PAGE_SIZE)
        + PAGE_SIZE
        + limit * core::mem::size_of::<PageDesc>()
}

/// Bytes of a zone's metadata before its slots: the zone, to a whole line.
const HEAD: usize = core::mem::size_of::<Zone>().next_multiple_of(LINE);

/// Bytes of a zone's metadata before its descriptor array's page: the zone
/// and the slots of `cpus` CPUs (every level).
const fn head_and_slots(cpus: usize) -> usize {
    HEAD + cpus * LEVELS * core::mem::size_of::<PcpSlot>()
}

/// Bytes of a cache line, the unit in which [`descs_offset`] compares page
/// offsets.
const LINE: usize = 64;
/// Cache lines in a page: one bit each in a [`descs_offset`] line set.
const LINES: usize = PAGE_SIZE / LINE;
const _: () = assert!(LINES == 64);

/// Where a zone's descriptor array starts, in bytes from `meta` (the
/// zone's metadata area, 64-byte aligned): in the page after the zone and
/// its `cpus` CPUs' slots ([`head_and_slots`]), at the first line from 128
/// bytes into that page whose page offset no hot word of the fast paths
/// shares. `area`: the rseq area of the thread building the zone, if glibc
/// registered one.
///
/// Why. The descriptor the fast paths touch most is that of the block a
/// program reuses, which tends to be the most aligned one (the first page
/// of a fresh zone, 4 MiB-aligned: page index a multiple of 128), and every
/// such descriptor has the same page offset, the array's. Its stores (a
/// free's claim and list link, an allocation's mark) and the other hot
/// words' loads then alias by page offset, which Intel cores resolve
/// slowly: measured on an Intel Xeon VM (Sapphire Rapids), cycling one
/// order-0 page through `alloc_pages`/`free_pages` on the main thread took
/// 7.7 ns for most descriptor positions, but 10.1 where the descriptor's
/// line had the page offset of the main thread's rseq area, 8.6-9.0 at the
/// zone's first two lines (its sequences' target) and 9.2-9.4 at the
/// running CPU's level-0 slot. The aliasing goes by 64-byte line: the
/// descriptor on the line of the rseq area, but not overlapping it, was as
/// slow. With the array page-aligned (an earlier layout), some allocator
/// instances on an Intel Rocket Lake VM ran their page pairs at about
/// twice the usual time for their whole life; 128 bytes into its page (the
/// next layout), the array put those descriptors on the line of the main
/// thread's rseq area in a small test program, whose fresh allocator then
/// cycled its first block at 10.2-10.3 ns a pair instead of 7.9 (this
/// choice). No constant offset avoids every hot line (the rseq area's
/// offset depends on the thread, and the main thread's on the program's
/// static TLS), so the zone chooses it when it is built.
///
/// The lines avoided, most important first (a set that leaves no line
/// free, as many CPUs' slots can, is dropped from the end):
/// 1. the rseq areas: the building thread's, and the last line of a page,
///    where glibc puts the area of every thread it creates (the area ends
///    its thread descriptor, at the top of the thread's page-aligned
///    block: offset 0xfe0 with glibc 2.36 on x86-64, whatever the
///    program's TLS);
/// 2. the zone's own lines (its sequences' target and the fields the fast
///    paths read);
/// 3. the level-0 slots (the lists the sequences pop and push).
///
/// Every other hot word (the caller's handle, its stack) is placed by the
/// program; some descriptors share those lines, as some share the ones
/// avoided here.
pub(crate) fn descs_offset(meta: usize, cpus: usize, area: Option<usize>) -> usize {
    let page_start = head_and_slots(cpus).next_multiple_of(PAGE_SIZE);
    let line_of = |addr: usize| (addr & (PAGE_SIZE - 1)) / LINE;
    let lines = |from: usize, bytes: usize| {
        (0..bytes.div_ceil(LINE).min(LINES))
            .fold(0u64, |set, i| set | 1 << line_of(from + i * LINE))
    };
    let rseq = area.map_or(0, |a| 1 << line_of(a)) | 1 << (LINES - 1);
    let zone = lines(meta, HEAD);
    let slots = lines(meta + HEAD, cpus * core::mem::size_of::<PcpSlot>());
    let first_line = 128 / LINE;
    let line = [rseq | zone | slots, rseq | zone, rseq]
        .into_iter()
        .find_map(|avoid| {
            (0..LINES)
                .map(|i| (first_line + i) % LINES)
                .find(|&l| avoid & (1 << line_of(meta + page_start + l * LINE)) == 0)
        })
        .unwrap_or(first_line);
    page_start + line * LINE
}

impl Zone {
    /// Builds a zone in `meta` for the pages `[start, end)` and frees every
    /// page into the buddy lists.
    ///
    /// # Safety
    /// 1. `meta` is valid for writes of `meta_size(start, end, cpus)` bytes,
    ///    64-byte aligned, and stays valid and unused by anything else for
    ///    the zone's life;
    /// 2. `[start, end)` is page-aligned memory that stays valid and is used
    ///    only through this zone;
    /// 3. if `zeroed`, the descriptor part of `meta` reads as zeros.
    ///
    /// `min_reserve`: the min watermark in pages (`None`: about 1/256 of
    /// the zone).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn init(
        meta: *mut u8,
        start: usize,
        end: usize,
        cpus: usize,
        platform: &'static dyn Platform,
        zeroed: bool,
        mapping: (usize, usize),
        min_reserve: Option<usize>,
    ) -> *const Zone {
        let base = start & !(MAX_BLOCK - 1);
        crate::check!(
            always: (end - base) >> PAGE_SHIFT <= MAX_ZONE_PAGES,
            "a zone beyond 32-bit page indices"
        );
        let first = ((start - base) >> PAGE_SHIFT) as u32;
        let limit = ((end - base) >> PAGE_SHIFT) as u32;
        let slots = meta.wrapping_add(HEAD) as *mut PcpSlot;
        let descs = meta.wrapping_add(descs_offset(
            meta as usize,
            cpus,
            crate::platform::rseq_area(),
        )) as *mut PageDesc;
        let total = (limit - first) as usize;
        // The largest-block-aligned middle stays untouched (`fresh`); only
        // the partial blocks before and after it are freed below.
        let fresh_start = first.next_multiple_of(1 << MAX_ORDER).min(limit);
        let fresh_end = (limit & !((1 << MAX_ORDER) - 1)).max(fresh_start);
        // Kernel-like min watermark: about 1/256 of the zone, unless set.
        let min = min_reserve.unwrap_or((total / 256).clamp(4, 4096));
        let pcp_batch = (total / (cpus * LEVELS * 64)).clamp(1, 16) as u32;
        let pcp_high = (pcp_batch * 6).max(8);
        let zone = Zone {
            seq: SeqTarget {
                off: crate::sync::rseq::glibc_offset(),
                slots: slots.cast(),
                cpus: 0,
                descs: descs.cast(),
            },
            start,
            end,
            base,
            first,
            limit,
            descs,
            slots,
            cpus,
            platform,
            lock: ZoneLock::new(),
            heads: [const { AtomicU32::new(NIL) }; MAX_ORDER as usize + 1],
            tails: [const { AtomicU32::new(NIL) }; MAX_ORDER as usize + 1],
            released_first: [const { AtomicU32::new(NIL) }; MAX_ORDER as usize + 1],
            counts: [const { AtomicU32::new(0) }; MAX_ORDER as usize + 1],
            free_buddy: AtomicUsize::new(0),
            nolock_ok_locked: AtomicUsize::new(0),
            nolock_large_ok_locked: AtomicUsize::new(0),
            deferred: core::array::from_fn(|_| TaggedStack::new()),
            deferred_pages: AtomicUsize::new(0),
            total,
            min,
            pcp_high,
            pcp_batch,
            rseq_off: None,
            stock: [const { AtomicU32::new(NIL) }; STOCK_TOTAL],
            stock_pages: AtomicUsize::new(0),
            stock_want: AtomicU32::new(0),
            stock_short: ShortOrders::new(),
            stock_used: AtomicU32::new(0),
            stock_idle: AtomicU32::new(0),
            releasing: AtomicUsize::new(0),
            position: 0,
            epoch: AtomicUsize::new(0),
            mapping,
            fresh: AtomicU32::new(fresh_start),
            fresh_end,
        };
        let zp = meta as *mut Zone;
        // SAFETY: (1) `meta` is valid, aligned and exclusively ours; the Zone
        // fits in `head` bytes; the slots and the descriptor array follow it
        // within `meta_size` bytes.
        unsafe {
            zp.write(zone);
            for i in 0..cpus * LEVELS {
                let s = slots.add(i);
                s.write(PcpSlot {
                    lock: SlotLock::new(),
                    demand: AtomicU32::new(0),
                    lists: [const { AtomicU64::new(list_word(NIL, 0)) };
                        HEAP_PCP_ORDER as usize + 1],
                    nolock_ok: AtomicU64::new(0),
                    idle: IdleWatch::new(),
                    heap_nolock_ok: AtomicU64::new(0),
                });
            }
            if !zeroed {
                // (3) does not hold: every descriptor must read as TAIL.
                core::ptr::write_bytes(descs, 0, limit as usize);
            }
        }
        // SAFETY: initialised just above and never moved.
        let z = unsafe { &*zp };
        // Free the pages outside the untouched middle as the largest
        // naturally aligned blocks that fit (none lies in the middle's
        // largest blocks, so none ever merges with a block carved from
        // it). They were never touched: as good as back with the OS.
        let g = z.lock.lock(platform);
        for (from, to) in [(first, fresh_start), (fresh_end, limit)] {
            let mut i = from;
            while i < to {
                let mut order = MAX_ORDER;
                while order > 0 && (!i.is_multiple_of(1 << order) || i + (1 << order) > to) {
                    order -= 1;
                }
                z.desc(i).set(desc::state(desc::ALLOCATED, order));
                z.buddy_free_as(i, order, true, &g);
                i += 1 << order;
            }
        }
        g.add(&z.free_buddy, (fresh_end - fresh_start) as usize);
        drop(g);
        zp
    }

    #[inline]
    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr < self.end
    }

    /// The index of the page holding `addr` (which must be inside the zone).
    #[inline]
    pub(crate) fn index_of(&self, addr: usize) -> u32 {
        ((addr - self.base) >> PAGE_SHIFT) as u32
    }

    #[inline]
    pub(crate) fn addr_of(&self, idx: u32) -> usize {
        self.base + ((idx as usize) << PAGE_SHIFT)
    }

    /// The descriptor array biased by the zone's base page number:
    /// `desc_bias().wrapping_add(addr >> PAGE_SHIFT)` is the descriptor of
    /// the page holding `addr`, for an `addr` inside the zone (the zone
    /// map's entries: one addition instead of a bounds check and an index).
    #[cfg(feature = "std")]
    pub(crate) fn desc_bias(&self) -> *const PageDesc {
        // `base` is page-aligned: (addr - base) >> PAGE_SHIFT, the index,
        // is (addr >> PAGE_SHIFT) - (base >> PAGE_SHIFT).
        self.descs.wrapping_sub(self.base >> PAGE_SHIFT)
    }

    /// The lookup window of this zone, for [`super::FirstZone`]: its first
    /// page's address and index, its length in bytes, and the descriptor of
    /// its first page.
    pub(crate) fn window(&self) -> (usize, u32, usize, *const PageDesc) {
        // `first` is below `limit`, the length of `descs`.
        let d = self.descs.wrapping_add(self.first as usize);
        (self.start, self.first, self.end - self.start, d)
    }

    /// Every page's descriptor, in order (for counts that are cheaper to
    /// take by a scan, once in a while, than to keep on the fast paths),
    /// but those of the untouched part (`fresh`), which are all `TAIL`
    /// with no owner: a zone of 64 GiB that used little would otherwise be
    /// a scan of 512 MiB of zeros. Racy: a block carved meanwhile may be
    /// missed.
    pub(crate) fn descs(&self) -> impl Iterator<Item = &PageDesc> {
        let fresh = self.fresh.load(Ordering::Relaxed).min(self.fresh_end);
        (self.first..fresh)
            .chain(self.fresh_end..self.limit)
            .map(move |i| self.desc(i))
    }

    /// Every block of the zone, first to last: the index and descriptor of
    /// its head page, whose state holds its kind and order (the walk steps
    /// by it, so it reads one descriptor per block). A `TAIL` where a head
    /// belongs, which a consistent zone never has, steps one page. The
    /// caller makes sure nothing changes the zone meanwhile. The untouched
    /// part (`fresh`) holds no block and is skipped, as in
    /// [`descs`](Self::descs): read a page at a time, a zone of 64 GiB
    /// that used little would be a walk of 512 MiB of zeros.
    pub(crate) fn block_heads(&self) -> impl Iterator<Item = (u32, &PageDesc)> {
        let fresh = self.fresh.load(Ordering::Relaxed).min(self.fresh_end);
        let mut i = self.first;
        core::iter::from_fn(move || {
            if i >= fresh && i < self.fresh_end {
                i = self.fresh_end;
            }
            if i >= self.limit {
                return None;
            }
            let (here, d) = (i, self.desc(i));
            let s = d.load();
            // No wrap: `limit` is at most MAX_ZONE_PAGES, and a block
            // below it ends at or below it.
            i += match desc::kind_of(s) {
                desc::TAIL => 1,
                _ => 1 << desc::order_of(s),
            };
            Some((here, d))
        })
    }

    /// The descriptor of page `idx`.
    #[inline]
    pub(crate) fn desc(&self, idx: u32) -> &PageDesc {
        crate::check!(
            idx >= self.first && idx < self.limit,
            "a page index outside its zone"
        );
        // SAFETY: `descs` has `limit` entries (init), idx < limit, and the
        // array lives as long as the zone.
        unsafe { &*self.descs.add(idx as usize) }
    }

    /// The slot of `cpu` (reduced modulo the CPU count) at `level`.
    #[inline]
    pub(crate) fn slot(&self, cpu: usize, level: usize) -> &PcpSlot {
        // SAFETY: `slots` has cpus * LEVELS initialised entries (init), and
        // `slot_index` is below that.
        unsafe { &*self.slots.add(slot_index(cpu, self.cpus, level)) }
    }

    /// Records the zone's place in the zone array: before it is shared.
    pub(crate) fn set_position(&mut self, position: usize) {
        self.position = position;
    }

    /// The zone's place in its allocator's zone array.
    #[inline]
    pub(crate) fn position(&self) -> usize {
        self.position
    }

    /// Before the zone is published: use the rseq fast path (see
    /// `rseq_off`).
    pub(crate) fn set_rseq(&mut self, off: Option<isize>) {
        // The target holds glibc's offset from the start (`init`), which
        // is the registered area's when there is one.
        crate::check!(
            off.is_none_or(|o| o == self.seq.off),
            "an rseq offset that is not glibc's"
        );
        self.rseq_off = off;
        self.seq.cpus = if off.is_some() { self.cpus } else { 0 };
    }

    /// Whether the level-0 lists have the rseq fast path.
    #[inline(always)]
    pub(crate) fn uses_rseq(&self) -> bool {
        self.rseq_off.is_some()
    }

    /// Takes this CPU's slot at `level` for a slow path of this context.
    /// With rseq, the level-0 slot is taken by the lock sequence (ordered
    /// with every fast-path sequence on the CPU it runs on, whose slot it
    /// returns); every other slot by its try-lock.
    #[inline]
    pub(crate) fn lock_own(&self, cpu: usize, level: usize) -> Option<(&PcpSlot, SlotGuard<'_>)> {
        if let (Some(off), 0) = (self.rseq_off, level) {
            // SAFETY: `rseq_off` is set only when rseq was chosen (glibc's
            // offset; a level-0 slot per possible CPU laid out as
            // `sync::rseq::layout` says, asserted above; as long as the zone).
            let Some(cpu) = (unsafe {
                crate::sync::rseq::lock_slot::<
                    { crate::sync::rseq::layout::STRIDE },
                    { crate::sync::rseq::layout::SLOT_LOCK },
                >(off, self.slots.cast(), self.cpus)
            }) else {
                // Busy: on the fork window's owner thread, a slot held
                // across the fork is borrowed (`cpu` was read after the
                // fork handler took it: see `SlotLock::hold_all`).
                if !crate::context::owns_fork_window() {
                    return None;
                }
                let slot = self.slot(cpu, 0);
                return slot.lock.borrow().map(|g| (slot, g));
            };
            let slot = self.slot(cpu, 0);
            // SAFETY: the lock sequence just set this slot's flag for us.
            return Some((slot, unsafe { slot.lock.adopt() }));
        }
        let slot = self.slot(cpu, level);
        slot.lock.try_lock().map(|g| (slot, g))
    }

    /// Takes slot `i` (of `cpus * LEVELS`) from a context that may run on
    /// any CPU (drain, maintenance, invariant checks). With rseq, a level-0
    /// slot is then fenced (every sequence on its CPU restarted) before it
    /// is returned: a syscall, so normal context only.
    pub(crate) fn lock_remote(&self, i: usize) -> Option<(&PcpSlot, SlotGuard<'_>)> {
        crate::check!(i < self.cpus * LEVELS, "a slot index out of range");
        // SAFETY: as in `slot`; i < cpus * LEVELS.
        let slot = unsafe { &*self.slots.add(i) };
        let g = slot.lock.try_lock()?;
        // Level-0 slots come first (`slot_index`): slot `i < cpus` is CPU `i`'s.
        if self.rseq_off.is_some() && i < self.cpus && !crate::sync::rseq::fence_cpu(i) {
            return None; // cannot stop that CPU's sequences: leave the slot
        }
        Some((slot, g))
    }

    /// Whether the nolock path may take another CPU's slot at `level`: not
    /// a level-0 slot under rseq (that would need a fence, a syscall).
    #[inline]
    pub(crate) fn remote_nolock_ok(&self, level: usize) -> bool {
        !(self.rseq_off.is_some() && level == 0)
    }

    /// The rseq fast path of an allocation of `order` (at most
    /// `PCP_MAX_ORDER`, or `HEAP_PCP_ORDER` for a heap's large block): a
    /// block from this CPU's level-0 list, marked
    /// allocated. `None` without rseq, or when the list is empty or the
    /// slot is held (then the slow path decides). A `COUNT` pop adds 1 to
    /// the slot's counter at offset `COUNTER` (`layout::PCP_NOLOCK_OK`, or
    /// `PCP_HEAP_NOLOCK_OK` for a heap's nolock large block).
    #[inline(always)]
    pub(crate) fn seq_alloc<const COUNT: bool, const COUNTER: usize>(
        &self,
        order: u32,
    ) -> Option<u32> {
        // `seq` holds glibc's offset (registered or not), and 0 CPUs without
        // rseq, else (`set_rseq`) a registered area, a level-0 slot per
        // possible CPU laid out as `sync::rseq::layout` says (asserted
        // above) and the descriptors.
        // SAFETY: as just said; the descriptors hold every index on a list,
        // and all of it lives as long as the zone.
        let idx = unsafe { crate::sync::rseq::pcp_pop::<COUNT, COUNTER>(&self.seq, order) };
        if idx == NIL {
            return None;
        }
        // The block left the list with the commit: it is ours.
        self.desc(idx).set(desc::state(desc::ALLOCATED, order));
        Some(idx)
    }

    /// The rseq fast path of a free: the claimed block `idx` (descriptor
    /// `d`) of `order` (at most `PCP_MAX_ORDER`, or `HEAP_PCP_ORDER` for a
    /// heap's large free), which its claim marked PCP, onto this CPU's
    /// level-0 list. `false` (the block still claimed, now FREEING) without
    /// rseq or when the slot is held.
    #[inline(always)]
    pub(crate) fn seq_free(&self, idx: u32, d: &PageDesc, order: u32) -> bool {
        // Marked PCP by the claim, before the commit: once on the list, a
        // handler on this CPU may pop it at once. Until then it is still
        // only ours.
        crate::check!(
            d.load() == desc::state(desc::PCP, order),
            "a block pushed onto a per-CPU list is not marked PCP"
        );
        // SAFETY: as in `seq_alloc`; the block is ours (claimed), of
        // `order`, marked PCP, inside `descs`.
        let pushed = unsafe { crate::sync::rseq::pcp_push(&self.seq, order, idx) };
        if !pushed {
            d.set(desc::state(desc::FREEING, order));
        }
        pushed
    }

    /// Normal context, after a fast free put this CPU's level-0 slot over
    /// `high`: drains a batch to the buddy lists, as `pcp_free` does.
    #[cold]
    #[inline(never)]
    pub(crate) fn trim_own(&self, cpu: usize) {
        if let Some((slot, s)) = self.lock_own(cpu, 0) {
            if self.over_high(slot.pages()) {
                self.pcp_drain_to(slot, &s, self.pcp_high.saturating_sub(self.pcp_batch));
            }
        }
    }

    /// With rseq: this CPU's level-0 slot (racy hint: the thread may
    /// migrate right after).
    #[inline(always)]
    fn own_slot_hint(&self) -> &PcpSlot {
        let off = self.rseq_off.unwrap_or(0);
        self.slot(crate::sync::rseq::cpu_hint(off), 0)
    }

    /// With rseq: the pages on this CPU's level-0 slot (a racy hint).
    #[inline(always)]
    pub(crate) fn pages_here(&self) -> usize {
        self.own_slot_hint().pages()
    }

    /// Whether a slot holding `pages` may take one more block from a
    /// nolock free (`pcp_has_room`).
    #[inline(always)]
    pub(crate) fn room_for(&self, pages: usize) -> bool {
        pages < (self.pcp_high + self.pcp_batch) as usize
    }

    /// Whether a slot holding `pages` is over `high` (a normal free then
    /// drains a batch).
    #[inline(always)]
    pub(crate) fn over_high(&self, pages: usize) -> bool {
        pages > self.pcp_high as usize
    }

    pub(crate) fn slots(&self) -> impl Iterator<Item = &PcpSlot> {
        // SAFETY: as in `slot`.
        (0..self.cpus * LEVELS).map(move |i| unsafe { &*self.slots.add(i) })
    }

    /// Every CPU's level-0 slot lock (the normal path's, whose holders may
    /// wait for the zone lock), for fork (`SlotLock::hold_all`).
    #[cfg(feature = "std")]
    pub(crate) fn level0_locks(&self) -> impl Iterator<Item = &SlotLock> + Clone {
        (0..self.cpus).map(move |c| &self.slot(c, 0).lock)
    }

    pub(crate) fn platform(&self) -> &'static dyn Platform {
        self.platform
    }

    pub(crate) fn free_buddy(&self) -> usize {
        self.free_buddy.load(Ordering::Relaxed)
    }

    pub(crate) fn deferred_pages(&self) -> usize {
        self.deferred_pages.load(Ordering::Relaxed)
    }

    // ----- buddy free lists (zone lock held) ---------------------------

    /// Puts free block `idx` at the head of its list: its memory is with
    /// the process (it was touched since it last went back to the OS), all
    /// but at most `gone` of its pages (see [`gone_pages`](Self::gone_pages)).
    fn list_push(&self, idx: u32, order: u32, gone: usize, g: &ZoneGuard<'_>) {
        let head = &self.heads[order as usize];
        let old = head.load(Ordering::Relaxed);
        let d = self.desc(idx);
        d.next.store(old, Ordering::Relaxed);
        d.prev.store(NIL, Ordering::Relaxed);
        if old != NIL {
            self.desc(old).prev.store(idx, Ordering::Relaxed);
        } else {
            self.tails[order as usize].store(idx, Ordering::Relaxed);
        }
        head.store(idx, Ordering::Relaxed);
        d.set(desc::state(desc::BUDDY, order));
        // When it became free (maintenance epoch), for returning idle
        // blocks to the OS, and (no `RELEASED` flag) not returned yet, for
        // `trim`, which returns blocks of every order; `carved` is unused
        // while a block is free.
        d.carved
            .store(self.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
        crate::check!(
            gone <= 1 << order,
            "a free block with more pages gone than it has"
        );
        d.inuse.store(gone as u16, Ordering::Relaxed);
        g.add_u32(&self.counts[order as usize], 1);
    }

    /// Puts free block `idx`, whose memory is not with the process (given
    /// back to the OS, or never touched), at the tail of its list, stamped
    /// `RELEASED`: allocated last, and never given back again.
    fn list_push_released(&self, idx: u32, order: u32, g: &ZoneGuard<'_>) {
        let tail = &self.tails[order as usize];
        let old = tail.load(Ordering::Relaxed);
        let d = self.desc(idx);
        d.next.store(NIL, Ordering::Relaxed);
        d.prev.store(old, Ordering::Relaxed);
        if old != NIL {
            self.desc(old).next.store(idx, Ordering::Relaxed);
        } else {
            self.heads[order as usize].store(idx, Ordering::Relaxed);
        }
        tail.store(idx, Ordering::Relaxed);
        let first = &self.released_first[order as usize];
        if first.load(Ordering::Relaxed) == NIL {
            first.store(idx, Ordering::Relaxed);
        }
        d.set(desc::state(desc::BUDDY, order));
        d.carved.store(
            self.epoch.load(Ordering::Relaxed) | RELEASED,
            Ordering::Relaxed,
        );
        g.add_u32(&self.counts[order as usize], 1);
    }

    /// The last block of the list of `order` not stamped `RELEASED`: the
    /// one freed the longest ago of those (`NIL`: none). Zone lock held.
    #[cfg(feature = "std")]
    fn oldest_unreleased(&self, order: u32) -> u32 {
        let first = self.released_first[order as usize].load(Ordering::Relaxed);
        if first == NIL {
            self.tails[order as usize].load(Ordering::Relaxed)
        } else {
            self.desc(first).prev.load(Ordering::Relaxed)
        }
    }

    /// Whether free block `idx` (on a buddy list) is stamped `RELEASED`.
    #[inline]
    fn is_released(&self, idx: u32) -> bool {
        self.desc(idx).carved.load(Ordering::Relaxed) & RELEASED != 0
    }

    /// At most how many pages of free block `idx` of `order` (on a buddy
    /// list; zone lock held) are not with the process (given back to the
    /// OS, or never touched, and not handed out since): all of a block
    /// stamped `RELEASED`; of any other, the count its head descriptor's
    /// `inuse` keeps while the block is free (the slab layer's word, unused
    /// then). Without it, a touched block that merged with buddies given
    /// back was given back whole and counted whole in the bytes released
    /// (`released_to_os_bytes`), memory the process no longer had. Kept so
    /// that it never falls below the truth (the bytes a release counts,
    /// the block's size less this, never exceed what went back):
    /// * a block freed (touched) has none, one given back or split off
    ///   such a block all (`RELEASED`);
    /// * a block merged from two has the sum of theirs;
    /// * each half split off a block has the whole's count, at most its
    ///   own size (which half holds the pages is not known);
    /// * a block handed out and freed again counts as touched, all of it,
    ///   as before (so does one a per-CPU list or the stock held and that
    ///   comes back unused: a count too high, as before, never too low).
    #[inline]
    fn gone_pages(&self, idx: u32, order: u32) -> usize {
        if self.is_released(idx) {
            1 << order
        } else {
            self.desc(idx).inuse.load(Ordering::Relaxed) as usize
        }
    }

    fn list_remove(&self, idx: u32, order: u32, g: &ZoneGuard<'_>) {
        let d = self.desc(idx);
        let next = d.next.load(Ordering::Relaxed);
        let prev = d.prev.load(Ordering::Relaxed);
        let first = &self.released_first[order as usize];
        if first.load(Ordering::Relaxed) == idx {
            // The next one, if any, is stamped `RELEASED` too.
            first.store(next, Ordering::Relaxed);
        }
        if prev == NIL {
            self.heads[order as usize].store(next, Ordering::Relaxed);
        } else {
            self.desc(prev).next.store(next, Ordering::Relaxed);
        }
        if next != NIL {
            self.desc(next).prev.store(prev, Ordering::Relaxed);
        } else {
            self.tails[order as usize].store(prev, Ordering::Relaxed);
        }
        g.add_u32(&self.counts[order as usize], 1u32.wrapping_neg());
    }

    /// Takes a block of `order` from the buddy lists, leaving at least
    /// `reserve` free pages; marks it `ALLOCATED`. A `reserve` of
    /// `usize::MAX` (the nolock path's "stock only") takes nothing.
    pub(crate) fn buddy_alloc(&self, order: u32, reserve: usize, g: &ZoneGuard<'_>) -> Option<u32> {
        let need = 1usize << order;
        if self.free_buddy.load(Ordering::Relaxed) < reserve.saturating_add(need) {
            return None;
        }
        let mut o = order;
        // Whether the block's memory is not with the process: its halves,
        // untouched, are not either. Otherwise, at most how many of its
        // pages are not (`gone_pages`).
        let (idx, released, mut gone) = loop {
            if o > MAX_ORDER {
                // Nothing on the lists: the next untouched largest block.
                o = MAX_ORDER;
                break (self.take_fresh(g)?, true, 1 << MAX_ORDER);
            }
            let h = self.heads[o as usize].load(Ordering::Relaxed);
            if h != NIL {
                self.list_remove(h, o, g);
                break (h, self.is_released(h), self.gone_pages(h, o));
            }
            o += 1;
        };
        while o > order {
            o -= 1;
            crate::interrupt_point!(BuddySplit);
            if released {
                self.list_push_released(idx + (1 << o), o, g);
            } else {
                // Either half may hold the pages gone.
                gone = gone.min(1 << o);
                self.list_push(idx + (1 << o), o, gone, g);
            }
        }
        self.desc(idx).set(desc::state(desc::ALLOCATED, order));
        g.add(&self.free_buddy, need.wrapping_neg());
        Some(idx)
    }

    /// Takes the next largest block of the untouched part (`fresh`), if
    /// any is left: free and on no list, so the caller treats it as taken
    /// off the list of `MAX_ORDER` (it is still counted in `free_buddy`).
    fn take_fresh(&self, g: &ZoneGuard<'_>) -> Option<u32> {
        let f = self.fresh.load(Ordering::Relaxed);
        if f >= self.fresh_end {
            return None;
        }
        g.add_u32(&self.fresh, 1 << MAX_ORDER);
        Some(f)
    }

    /// Pages of the untouched part not yet carved (racy unless the zone
    /// lock is held).
    pub(crate) fn fresh_pages(&self) -> usize {
        (self.fresh_end - self.fresh.load(Ordering::Relaxed).min(self.fresh_end)) as usize
    }

    /// Returns the claimed block `idx` of `order` to the buddy lists,
    /// merging it with free buddies.
    pub(crate) fn buddy_free(&self, idx: u32, order: u32, g: &ZoneGuard<'_>) {
        self.buddy_free_as(idx, order, false, g);
    }

    /// [`buddy_free`](Self::buddy_free) of a block whose memory is not
    /// with the process (`released`) or is: the block it ends up in (after
    /// merging) is stamped `RELEASED` only if all of it is not, and
    /// otherwise counts the pages of its buddies that are not
    /// (`gone_pages`).
    fn buddy_free_as(&self, mut idx: u32, mut order: u32, released: bool, g: &ZoneGuard<'_>) {
        let mut released = released;
        let mut gone = if released { 1 << order } else { 0 };
        g.add(&self.free_buddy, 1 << order);
        while order < MAX_ORDER {
            let buddy = idx ^ (1 << order);
            if buddy < self.first || buddy + (1 << order) > self.limit {
                break;
            }
            if self.desc(buddy).load() != desc::state(desc::BUDDY, order) {
                break;
            }
            released &= self.is_released(buddy);
            gone += self.gone_pages(buddy, order);
            self.list_remove(buddy, order, g);
            crate::interrupt_point!(BuddyMerge);
            // The higher half stops being a block head.
            let (lo, hi) = if buddy < idx {
                (buddy, idx)
            } else {
                (idx, buddy)
            };
            self.desc(hi).set(desc::TAIL);
            idx = lo;
            order += 1;
        }
        if released {
            self.list_push_released(idx, order, g);
        } else {
            self.list_push(idx, order, gone, g);
        }
    }

    // ----- deferred frees ------------------------------------------------

    /// Parks a claimed block whose free could not take a lock.
    pub(crate) fn defer_free(&self, idx: u32, order: u32) {
        self.desc(idx).set(desc::state(desc::DEFERRED, order));
        // Counted before the push: a non-zero count covers every block on
        // the stacks (the drains check it first).
        self.deferred_pages.fetch_add(1 << order, Ordering::Relaxed);
        self.deferred[order as usize].push(idx, |i, next| {
            self.desc(i).next.store(next, Ordering::Relaxed);
            crate::interrupt_point!(DeferredPush);
        });
    }

    /// The deferred link of block `i`.
    #[inline]
    fn deferred_link(&self, i: u32) -> u32 {
        self.desc(i).next.load(Ordering::Relaxed)
    }

    /// Moves every deferred block into the buddy lists (normal path).
    pub(crate) fn drain_deferred(&self, g: &ZoneGuard<'_>) {
        if self.deferred_pages.load(Ordering::Relaxed) == 0 {
            return;
        }
        for (order, stack) in self.deferred.iter().enumerate() {
            let mut i = stack.take_all();
            while i != TAGGED_NIL {
                let next = self.deferred_link(i);
                crate::interrupt_point!(DeferredDrain);
                self.deferred_pages.fetch_sub(1 << order, Ordering::Relaxed);
                self.buddy_free(i, order as u32, g);
                i = next;
            }
        }
    }

    /// The nolock path's share of the deferred blocks after it took the
    /// zone lock: at most [`NOLOCK_DRAIN_BUDGET`] of them, popped one by one
    /// (O(1) each), so the call's work does not grow with the backlog.
    pub(crate) fn drain_deferred_bounded(&self, g: &ZoneGuard<'_>) {
        if self.deferred_pages.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut budget = NOLOCK_DRAIN_BUDGET;
        for (order, stack) in self.deferred.iter().enumerate() {
            while budget > 0 {
                let Some(i) = stack.pop(|i| self.deferred_link(i)) else {
                    break;
                };
                crate::interrupt_point!(DeferredDrain);
                self.deferred_pages.fetch_sub(1 << order, Ordering::Relaxed);
                self.buddy_free(i, order as u32, g);
                budget -= 1;
            }
        }
    }

    /// `drain_deferred` or `drain_deferred_bounded`, as `mode` says.
    #[inline]
    pub(crate) fn drain_deferred_in(&self, mode: Mode, g: &ZoneGuard<'_>) {
        match mode {
            Mode::Normal => self.drain_deferred(g),
            Mode::NoLock => self.drain_deferred_bounded(g),
        }
    }

    /// Nolock last resort while the zone lock is busy: one parked block of
    /// exactly `order`, popped from that order's stack (O(1)).
    pub(crate) fn steal_deferred(&self, order: u32) -> Option<u32> {
        let i = self.deferred[order as usize].pop(|i| self.deferred_link(i))?;
        // The block is ours: a nested stealer pops another one.
        crate::interrupt_point!(StealDeferred);
        self.deferred_pages.fetch_sub(1 << order, Ordering::Relaxed);
        self.desc(i).set(desc::state(desc::ALLOCATED, order));
        Some(i)
    }

    // ----- per-CPU lists (slot held) --------------------------------------

    #[inline]
    fn pcp_pop(&self, slot: &PcpSlot, order: u32, _s: &SlotGuard<'_>) -> Option<u32> {
        let (idx, count) = slot.list(order);
        if idx == NIL {
            return None;
        }
        let d = self.desc(idx);
        let next = d.next.load(Ordering::Relaxed);
        slot.lists[order as usize].store(list_word(next, count - 1), Ordering::Relaxed);
        d.set(desc::state(desc::ALLOCATED, order));
        Some(idx)
    }

    #[inline]
    fn pcp_push(&self, slot: &PcpSlot, idx: u32, order: u32, _s: &SlotGuard<'_>) {
        let (head, count) = slot.list(order);
        let d = self.desc(idx);
        d.next.store(head, Ordering::Relaxed);
        d.set(desc::state(desc::PCP, order));
        slot.lists[order as usize].store(list_word(idx, count + 1), Ordering::Relaxed);
    }

    #[inline]
    fn batch_blocks(&self, order: u32) -> u32 {
        (self.pcp_batch >> order).max(1)
    }

    /// Takes a block of `order` from a held slot's list, never refilling
    /// it: another CPU's slot, which a nolock allocation may only take
    /// from (a refill there could take nothing, its reserve being
    /// everything, and would still take the zone lock, merge deferred
    /// blocks, refill the stock and mark the slot wanted: work for every
    /// slot a nolock miss looks at, which grew with the CPU count).
    #[inline]
    pub(crate) fn pcp_take(&self, slot: &PcpSlot, s: &SlotGuard<'_>, order: u32) -> Option<u32> {
        crate::interrupt_point!(PcpAlloc);
        self.pcp_pop(slot, order, s)
    }

    /// Allocates from a held slot: its list, else a refill from the buddy
    /// lists (the zone lock taken in `mode`).
    #[inline]
    pub(crate) fn pcp_alloc(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        order: u32,
        mode: Mode,
        reserve: usize,
        stock_cpu: Option<usize>,
    ) -> Result<u32, Fail> {
        if let Some(idx) = self.pcp_take(slot, s, order) {
            return Ok(idx);
        }
        self.pcp_refill(slot, s, order, mode, reserve, stock_cpu)
    }

    #[cold]
    fn pcp_refill(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        order: u32,
        mode: Mode,
        reserve: usize,
        stock_cpu: Option<usize>,
    ) -> Result<u32, Fail> {
        if mode == Mode::NoLock {
            slot.demand.store(1, Ordering::Relaxed);
        }
        let g = self.lock.lock_in(mode, self.platform).ok_or(Fail::Busy)?;
        self.drain_deferred_in(mode, &g);
        self.stock_refill(&g);
        crate::interrupt_point!(PcpRefill);
        let first = self.buddy_alloc(order, reserve, &g).ok_or(Fail::Empty)?;
        self.fill_slot(slot, s, order, self.batch_blocks(order) - 1, reserve, &g);
        if let Some(cpu) = stock_cpu {
            self.stock_handler_levels(cpu, order, reserve, &g);
        }
        Ok(first)
    }

    /// Moves up to `blocks` blocks of `order` from the buddy lists (keeping
    /// `reserve` pages) onto a held slot; returns how many it moved.
    fn fill_slot(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        order: u32,
        blocks: u32,
        reserve: usize,
        g: &ZoneGuard<'_>,
    ) -> u32 {
        for n in 0..blocks {
            match self.buddy_alloc(order, reserve, g) {
                Some(idx) => self.pcp_push(slot, idx, order, s),
                None => return n,
            }
        }
        blocks
    }

    /// Normal refill, zone lock held: while we have it, give this CPU's
    /// handler-level slots a batch of `order` if they have none, so a
    /// handler that interrupts this thread inside its next refill (slot and
    /// zone both held) finds pages at its own level. Slots busy right now
    /// are skipped.
    #[cold]
    fn stock_handler_levels(&self, cpu: usize, order: u32, reserve: usize, g: &ZoneGuard<'_>) {
        for level in 1..LEVELS {
            let sib = self.slot(cpu, level);
            if sib.list(order).1 != 0 {
                continue;
            }
            let Some(ss) = sib.lock.try_lock() else {
                continue;
            };
            crate::interrupt_point!(StockHandlerLevels);
            let want = self.batch_blocks(order);
            if self.fill_slot(sib, &ss, order, want, reserve, g) < want {
                return; // the buddy lists ran dry
            }
        }
    }

    /// Frees a claimed block onto a held slot. In normal mode a slot over
    /// `high` drains a batch to the buddy lists; nolock does not drain here
    /// (it may overshoot `high` up to `high + batch`, then
    /// [`pcp_trim_nolock`](Self::pcp_trim_nolock) drains under a tried zone
    /// lock).
    #[inline]
    pub(crate) fn pcp_free(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        idx: u32,
        order: u32,
        mode: Mode,
    ) {
        self.pcp_push(slot, idx, order, s);
        crate::interrupt_point!(PcpFree);
        if mode == Mode::Normal && self.over_high(slot.pages()) {
            self.pcp_drain_to(slot, s, self.pcp_high.saturating_sub(self.pcp_batch));
        }
    }

    /// A nolock free that found its own level-0 slot held and full: under a
    /// *tried* zone lock, the block goes to the buddy lists and the slot
    /// drains to `high - batch`, as a normal free's trim does, so frees
    /// beyond the slot's room take the zone lock once per batch rather than
    /// once per block. Bounded: the slot holds less than `high + batch`
    /// pages plus one block (`room_for`), so at most `2 * batch` pages and
    /// one block move. `false`: the zone lock is busy, nothing was done.
    pub(crate) fn pcp_trim_nolock(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        idx: u32,
        order: u32,
    ) -> bool {
        let Some(g) = self.lock.try_lock(self.platform) else {
            return false;
        };
        self.pcp_drain_locked(slot, s, self.pcp_high.saturating_sub(self.pcp_batch), &g);
        self.buddy_free_nolock(idx, order, &g);
        true
    }

    /// A nolock free holding the zone lock it tried: the block goes to the
    /// buddy lists, then the call does its bounded share of the zone's
    /// upkeep (deferred blocks, the stock), as every nolock lock holder.
    pub(crate) fn buddy_free_nolock(&self, idx: u32, order: u32, g: &ZoneGuard<'_>) {
        crate::interrupt_point!(NolockZoneFree);
        self.buddy_free(idx, order, g);
        self.drain_deferred_bounded(g);
        self.stock_refill(g);
    }

    /// Whether a nolock free may still add to this slot.
    #[inline]
    pub(crate) fn pcp_has_room(&self, slot: &PcpSlot) -> bool {
        self.room_for(slot.pages())
    }

    /// Normal context: moves blocks from a held slot to the buddy lists until
    /// it holds at most `target` pages.
    #[cold]
    pub(crate) fn pcp_drain_to(&self, slot: &PcpSlot, s: &SlotGuard<'_>, target: u32) {
        // `None`: this thread holds the zone lock (it interrupted itself);
        // the slot stays above `high` until a later drain.
        let Some(g) = self.lock.lock_in(Mode::Normal, self.platform) else {
            return;
        };
        self.pcp_drain_locked(slot, s, target, &g);
        self.drain_deferred(&g);
        self.stock_refill(&g);
    }

    pub(crate) fn pcp_drain_locked(
        &self,
        slot: &PcpSlot,
        s: &SlotGuard<'_>,
        target: u32,
        g: &ZoneGuard<'_>,
    ) {
        for order in (0..=HEAP_PCP_ORDER).rev() {
            while slot.pages() > target as usize {
                let Some(idx) = self.pcp_pop(slot, order, s) else {
                    break;
                };
                crate::interrupt_point!(PcpDrain);
                self.buddy_free(idx, order, g);
            }
        }
    }

    // ----- the nolock stock of large blocks (any context) ------------------

    /// Pages held in the nolock stock.
    pub(crate) fn stock_pages(&self) -> usize {
        self.stock_pages.load(Ordering::Relaxed)
    }

    /// Whether the zone keeps a nolock stock (an order is wanted, or blocks
    /// are stocked): a racy hint, for skipping `stock_maintain`'s lock.
    #[cfg(feature = "std")]
    pub(crate) fn stock_kept(&self) -> bool {
        self.stock_want.load(Ordering::Relaxed) != 0
            || self.stock_pages.load(Ordering::Relaxed) != 0
    }

    /// Stock cells kept filled for `order`: its [`STOCK_CELLS`], as long as
    /// they hold no more than 1/16 of the zone's pages (a zone of 256 MiB
    /// keeps all of them), and one at least.
    #[inline]
    fn stock_cells(&self, order: u32) -> usize {
        (self.total >> (order + 4)).clamp(1, STOCK_CELLS[stock_index(order)])
    }

    /// Every cell of `order` (the ones beyond `stock_cells` stay empty).
    #[inline]
    fn stock_of(&self, order: u32) -> &[AtomicU32] {
        let k = stock_index(order);
        &self.stock[STOCK_FIRST[k]..STOCK_FIRST[k + 1]]
    }

    /// A nolock allocation of `order` (above `PCP_MAX_ORDER`) is under way:
    /// from now on zone-lock holders keep that order stocked.
    #[inline]
    pub(crate) fn stock_wanted(&self, order: u32) {
        if self.stock_used.load(Ordering::Relaxed) == 0 {
            self.stock_used.store(1, Ordering::Relaxed);
        }
        let bit = 1 << order;
        if self.stock_want.load(Ordering::Relaxed) & bit == 0 {
            // Its cells are empty (a drain emptied them, or none was ever
            // filled): marked short before it is wanted. The mark stays
            // until a holder takes it, so a refill from then on (this
            // call's own, under the zone lock it tries next, or a later
            // one) fills them.
            self.stock_short.mark(order);
            self.stock_want.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// In a forked child (its only thread, before anything else uses the
    /// zone): counts `stock_pages` again from the cells. A nolock call of
    /// another thread of the parent may have been cloned between a cell's
    /// change and the count's (`stock_put`, `stock_pop`); the child has no
    /// thread to finish it. (A block such a call had taken out of a cell is
    /// that thread's, and lost to the child.) Every order is marked short
    /// too: such a call may have been cloned between a cell's emptying and
    /// its order's mark (`stock_pop`), and a cell left empty under no mark
    /// is never filled again by the zone-lock holders, which look only at
    /// the marked orders (a mark over full cells costs one look).
    #[cfg(feature = "std")]
    pub(crate) fn recount_stock_after_fork(&self) {
        let pages = self.stocked().map(|(_, order)| 1usize << order).sum();
        self.stock_pages.store(pages, Ordering::Relaxed);
        for order in PCP_MAX_ORDER + 1..=MAX_ORDER {
            self.stock_short.mark(order);
        }
    }

    /// In a forked child (its only thread, before anything else uses the
    /// zone): counts `deferred_pages` again from the deferred stacks. A
    /// nolock call of another thread of the parent may have been cloned
    /// between a stack's change and the count's (`defer_free` counts, then
    /// pushes; `steal_deferred` pops, then uncounts): the child's count
    /// would cover a block on no stack (lost to the child, as the thread
    /// that held it), which no drain ever takes off the count.
    #[cfg(feature = "std")]
    pub(crate) fn recount_deferred_after_fork(&self) {
        let mut pages = 0;
        for (order, stack) in self.deferred.iter().enumerate() {
            let mut i = stack.top();
            while i != TAGGED_NIL {
                pages += 1usize << order;
                i = self.deferred_link(i);
            }
        }
        self.deferred_pages.store(pages, Ordering::Relaxed);
    }

    /// The blocks in the stock cells now, as (index, order): a racy walk
    /// unless nothing else uses the stock (checks, a forked child).
    fn stocked(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (PCP_MAX_ORDER + 1..=MAX_ORDER).flat_map(move |order| {
            self.stock_of(order)
                .iter()
                .map(move |cell| (cell.load(Ordering::Relaxed), order))
                .filter(|&(idx, _)| idx != NIL)
        })
    }

    /// Any context, no lock: takes a stocked block of exactly `order`
    /// (marked `ALLOCATED`), if there is one.
    pub(crate) fn stock_take(&self, order: u32) -> Option<u32> {
        let idx = self.stock_pop(order)?;
        self.desc(idx).set(desc::state(desc::ALLOCATED, order));
        Some(idx)
    }

    /// Empties one filled cell of `order`; the block is the caller's (still
    /// marked `PCP`).
    fn stock_pop(&self, order: u32) -> Option<u32> {
        for cell in self.stock_of(order) {
            if cell.load(Ordering::Relaxed) == NIL {
                continue;
            }
            // Acquire: the stocker's writes (state, count) happened before.
            let idx = cell.swap(NIL, Ordering::Acquire);
            if idx != NIL {
                self.stock_pages.fetch_sub(1 << order, Ordering::Relaxed);
                crate::interrupt_point!(StockTaken);
                self.stock_short.mark(order);
                return Some(idx);
            }
        }
        None
    }

    /// Any context, no lock, when the exact order is out: takes the smallest
    /// stocked block of a larger order and splits it without the zone lock,
    /// keeping the first `2^order` pages (marked `ALLOCATED`). Each upper
    /// half goes to an empty stock cell of its order if one is wanted, else
    /// onto the deferred stack (merged by the next zone-lock holder).
    /// Returns the block and whether something was deferred.
    pub(crate) fn stock_take_split(&self, order: u32) -> Option<(u32, bool)> {
        let (idx, mut o) = (order + 1..=MAX_ORDER).find_map(|k| Some((self.stock_pop(k)?, k)))?;
        let mut deferred = false;
        while o > order {
            o -= 1;
            let half = idx + (1 << o);
            self.desc(half).set(desc::state(desc::FREEING, o));
            if !self.stock_put(half, o) {
                self.defer_free(half, o);
                deferred = true;
            }
        }
        self.desc(idx).set(desc::state(desc::ALLOCATED, order));
        Some((idx, deferred))
    }

    /// Any context, no lock: parks the claimed block `idx` of `order` in an
    /// empty stock cell of a wanted order; `false` if none takes it.
    pub(crate) fn stock_put(&self, idx: u32, order: u32) -> bool {
        if self.stock_want.load(Ordering::Relaxed) & (1 << order) == 0 {
            return false;
        }
        crate::interrupt_point!(StockPut);
        let cells = &self.stock_of(order)[..self.stock_cells(order)];
        for cell in cells {
            if cell.load(Ordering::Relaxed) != NIL {
                continue;
            }
            self.desc(idx).set(desc::state(desc::PCP, order));
            self.stock_pages.fetch_add(1 << order, Ordering::Relaxed);
            crate::interrupt_point!(StockCounted);
            // Release: state and count before the block is visible.
            if cell
                .compare_exchange(NIL, idx, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            self.stock_pages.fetch_sub(1 << order, Ordering::Relaxed);
        }
        self.desc(idx).set(desc::state(desc::FREEING, order));
        false
    }

    /// Zone lock held (either path): fills the empty cells of the wanted
    /// orders marked short (`stock_short`) from the buddy lists, above the
    /// min watermark. Bounded: at most `STOCK_TOTAL` blocks.
    #[inline]
    pub(crate) fn stock_refill(&self, g: &ZoneGuard<'_>) {
        // Only the wanted orders (above `PCP_MAX_ORDER`, by `stock_wanted`)
        // that may have an empty cell: usually none.
        let todo = self
            .stock_short
            .take(self.stock_want.load(Ordering::Relaxed));
        if todo != 0 {
            self.stock_fill(todo, g);
        }
    }

    /// `stock_refill`'s work: fills the empty cells of the orders in `todo`
    /// (taken off `stock_short`, so a take that empties one from now on
    /// marks its order again).
    #[inline(never)]
    fn stock_fill(&self, mut todo: u32, g: &ZoneGuard<'_>) {
        while todo != 0 {
            let order = todo.trailing_zeros();
            todo &= todo - 1;
            let cells = &self.stock_of(order)[..self.stock_cells(order)];
            for cell in cells {
                if cell.load(Ordering::Relaxed) != NIL {
                    continue;
                }
                let Some(idx) = self.buddy_alloc(order, self.min, g) else {
                    // Still short: a later holder tries again.
                    self.stock_short.mark(order);
                    break;
                };
                self.desc(idx).set(desc::state(desc::PCP, order));
                self.stock_pages.fetch_add(1 << order, Ordering::Relaxed);
                if cell
                    .compare_exchange(NIL, idx, Ordering::Release, Ordering::Relaxed)
                    .is_err()
                {
                    // A nolock free filled it meanwhile: back to the lists.
                    self.stock_pages.fetch_sub(1 << order, Ordering::Relaxed);
                    self.buddy_free(idx, order, g);
                }
            }
        }
    }

    /// Maintenance (zone lock held, normal context): a stock for which no
    /// nolock allocation of a large order asked during `idle_passes` passes
    /// goes back to the buddy lists (from there idle memory goes back to
    /// the OS); otherwise it is refilled. A stock that holds blocks with no
    /// order wanted goes back too: a nolock free that saw its order wanted
    /// may fill a cell just after a drain cleared the wants and emptied
    /// the cells (`stock_put` takes no lock).
    ///
    /// Without `upkeep` (the inline decay, `Config::decay`), only the
    /// first: an idle stock goes back, none is refilled.
    pub(crate) fn stock_maintain(&self, idle_passes: u32, upkeep: bool, g: &ZoneGuard<'_>) {
        let idle = if self.stock_used.swap(0, Ordering::Relaxed) != 0 {
            0
        } else {
            self.stock_idle.load(Ordering::Relaxed) + 1
        };
        let stocked = self.stock_want.load(Ordering::Relaxed) != 0
            || self.stock_pages.load(Ordering::Relaxed) != 0;
        if idle >= idle_passes && stocked {
            self.stock_drain(g);
            self.stock_idle.store(0, Ordering::Relaxed);
        } else {
            self.stock_idle
                .store(idle.min(idle_passes), Ordering::Relaxed);
            if upkeep {
                self.stock_refill(g);
            }
        }
    }

    /// Zone lock held, normal context: every stocked block back to the buddy
    /// lists; the stock is refilled again once a nolock allocation asks.
    fn stock_drain(&self, g: &ZoneGuard<'_>) {
        self.stock_want.store(0, Ordering::Relaxed);
        for order in PCP_MAX_ORDER + 1..=MAX_ORDER {
            for cell in self.stock_of(order) {
                let idx = cell.swap(NIL, Ordering::Acquire);
                if idx != NIL {
                    self.stock_pages.fetch_sub(1 << order, Ordering::Relaxed);
                    self.buddy_free(idx, order, g);
                }
            }
        }
    }

    /// Normal context: every slot that can be taken, the deferred stack and
    /// the nolock stock back to the buddy lists. Slots held by other
    /// contexts are skipped.
    pub(crate) fn drain_all(&self) {
        let Some(g) = self.lock.lock_in(Mode::Normal, self.platform) else {
            return; // held by this very thread: nothing to do now
        };
        for i in 0..self.cpus * LEVELS {
            // An empty slot is left alone: taking a level-0 slot under rseq
            // costs a fence, an interrupt of its CPU (a hint, as in
            // `maintain_slots`).
            // SAFETY: as in `slot`; i < cpus * LEVELS.
            let hint = unsafe { &*self.slots.add(i) };
            if hint.pages() == 0 {
                hint.demand.store(0, Ordering::Relaxed);
                continue;
            }
            if let Some((slot, s)) = self.lock_remote(i) {
                self.pcp_drain_locked(slot, &s, 0, &g);
                slot.demand.store(0, Ordering::Relaxed);
            }
        }
        self.drain_deferred(&g);
        self.stock_drain(&g);
    }

    /// Maintenance (normal context), for every slot not held right now:
    /// - a slot whose lists have not changed for `idle_passes` passes goes
    ///   back to the buddy lists, and forgets its demand (it is stocked
    ///   again once a nolock allocation finds it empty);
    /// - a slot holding more than half its `high` plus a batch is trimmed to
    ///   half its `high` (nolock frees may overshoot `high`);
    /// - a slot that a nolock allocation found empty (`demand`) and that
    ///   holds less than a batch is topped up to half its `high`, so a burst
    ///   of nolock allocations finds pages.
    ///
    /// Without `upkeep` (the inline decay, `Config::decay`), only the
    /// first: idle slots go back, nothing is trimmed or stocked.
    pub(crate) fn maintain_slots(&self, idle_passes: u32, upkeep: bool) {
        let target = self.pcp_high / 2;
        for i in 0..self.cpus * LEVELS {
            // SAFETY: as in `slot`; i < cpus * LEVELS.
            let slot = unsafe { &*self.slots.add(i) };
            let pages = slot.pages() as u32;
            let idle = slot
                .idle
                .observe((pages as usize) << 32 ^ slot.list(0).0 as usize);
            let demand = slot.demand.load(Ordering::Relaxed) != 0;
            let decay = idle >= idle_passes && pages > 0;
            let trim = upkeep && pages > target + self.pcp_batch;
            let stock = upkeep && demand && pages < self.pcp_batch;
            if !(decay || trim || stock) {
                continue;
            }
            let Some((slot, s)) = self.lock_remote(i) else {
                continue;
            };
            let Some(g) = self.lock.lock_in(Mode::Normal, self.platform) else {
                return;
            };
            self.drain_deferred(&g);
            if decay {
                self.pcp_drain_locked(slot, &s, 0, &g);
                slot.demand.store(0, Ordering::Relaxed);
            } else if trim {
                self.pcp_drain_locked(slot, &s, target, &g);
            } else {
                let want = target.saturating_sub(slot.pages() as u32);
                self.fill_slot(slot, &s, 0, want, self.min, &g);
            }
        }
    }

    /// Maintenance (normal context): returns to the OS the memory of free
    /// blocks of the `orders` given that have been free since before
    /// `epoch - age` (MADV_DONTNEED), largest first, at most `budget`
    /// blocks per call. Each list's oldest block not yet given back is found
    /// at once (`oldest_unreleased`; the ones before it are younger), so each
    /// step is O(1) per order under the zone lock, which is let go for each
    /// block's system call: the block is taken off its free list meanwhile
    /// (still counted as free, in `releasing`), so nobody can be handed
    /// memory that is being discarded. Returns the bytes released.
    ///
    /// The maintainer calls it twice: for `RELEASE_MIN_ORDER` and up, and,
    /// with a longer `age`, for the blocks below. After a burst of small
    /// objects of which a few stay live, the free memory is in those small
    /// blocks, between the survivors' slabs: without the second call it
    /// stayed resident for good (unless the program called `trim`).
    #[cfg(feature = "std")]
    pub(crate) fn release_idle_blocks(
        &self,
        orders: core::ops::RangeInclusive<u32>,
        epoch: usize,
        age: usize,
        budget: usize,
    ) -> usize {
        let mut bytes = 0;
        for _ in 0..budget {
            let Some(g) = self.lock.lock_in(Mode::Normal, self.platform) else {
                return bytes;
            };
            let Some((pick, order)) = self.idle_block(orders.clone(), epoch, age) else {
                return bytes;
            };
            bytes += self.release_block(pick, order, g);
        }
        bytes
    }

    /// Whether free block `idx` has been free since before `epoch - age`.
    #[cfg(feature = "std")]
    fn idle_since(&self, idx: u32, epoch: usize, age: usize) -> bool {
        let stamp = self.desc(idx).carved.load(Ordering::Relaxed);
        stamp.saturating_add(age) <= epoch
    }

    /// `Heap::trim` (normal context): returns to the OS the memory of every
    /// free block on the buddy lists that has not gone back yet, of every
    /// order, as glibc's `malloc_trim` returns every free page: after a
    /// burst of small objects of which a few stay live, the free memory
    /// lies in blocks below `RELEASE_MIN_ORDER` between the survivors'
    /// slabs, and only this gives it back. Each list's blocks not yet given
    /// back come first (see `tails`), and a block given back goes to the
    /// tail: so each step takes the list's head, until the head is a block
    /// given back (O(1) per hold of the zone lock). At most twice as many
    /// blocks per order as the list held when the walk began, so that frees
    /// on other threads cannot keep it going. Returns the bytes released.
    #[cfg(feature = "std")]
    pub(crate) fn release_all_free_blocks(&self) -> usize {
        let mut bytes = 0;
        for order in (0..=MAX_ORDER).rev() {
            let mut left = 2 * self.counts[order as usize].load(Ordering::Relaxed) as usize + 2;
            while left > 0 {
                left -= 1;
                let Some(g) = self.lock.lock_in(Mode::Normal, self.platform) else {
                    return bytes;
                };
                let pick = self.heads[order as usize].load(Ordering::Relaxed);
                if pick == NIL || self.is_released(pick) {
                    break;
                }
                bytes += self.release_block(pick, order, g);
            }
        }
        bytes
    }

    /// Returns free block `pick` of `order` (on its buddy list; the zone
    /// lock `g` held) to the OS: off its list while the syscall runs
    /// without the lock, then freed again, to the tail of its list, stamped
    /// `RELEASED` (unless it merged with a buddy that freed meanwhile,
    /// whose memory is with the process: the merged block goes to the head,
    /// not given back, and a later release gives all of it back). Returns
    /// the bytes that went back: the block's, less its pages that were not
    /// with the process already (`gone_pages`: a block that merged with
    /// buddies given back goes back whole, but only its own memory leaves
    /// the process). None when the kernel refused it (pages locked in
    /// memory): the block is stamped `RELEASED` all the same, so that it
    /// is not tried again and again (its memory stays, as a locked
    /// program asked), and counted as not with the process: a later
    /// release of a block it merges into counts too little, never too
    /// much.
    #[cfg(feature = "std")]
    fn release_block(&self, pick: u32, order: u32, g: ZoneGuard<'_>) -> usize {
        let gone = self.gone_pages(pick, order);
        self.list_remove(pick, order, &g);
        // Not ALLOCATED: a (wrong) free of this block must fail its
        // claim while the lock is dropped, not insert it a second time.
        self.desc(pick).set(desc::state(desc::RELEASING, order));
        g.add(&self.releasing, 1 << order);
        crate::interrupt_point!(ReleaseIdle);
        drop(g);
        crate::interrupt_point!(ReleaseWindow);
        let went = crate::platform::os_discard(self.addr_of(pick), PAGE_SIZE << order);
        let bytes = if went {
            ((1usize << order) - gone) * PAGE_SIZE
        } else {
            0
        };
        // Waiting here through a fork cannot wait for a fork that waits for
        // this thread: every release holds the page allocator's drain lock
        // (`maintain`, `decay`, `release_free_blocks`), which a fork's
        // prepare takes before any zone lock (`lock_all`), so no fork holds
        // this zone's lock until the release is over (the fork window's own
        // calls borrow both).
        //
        // `None` only in a process that may hold orphaned locks (the
        // `fork` module's "Orphaned locks"): this thread's signal handler
        // forked in the window above while another thread of the parent
        // held the lock, which no thread here releases. The block stays
        // `RELEASING`, off every list, in this process (what such a lock
        // guards is never touched again), and its memory is with the OS.
        // Elsewhere this thread holding the lock is a routing error.
        let Some(g) = self.lock.lock_through_fork(self.platform) else {
            crate::check!(always: crate::fork::orphaned(), "a trim's thread holds the zone lock it dropped");
            return bytes;
        };
        crate::check!(
            self.desc(pick).load() == desc::state(desc::RELEASING, order),
            "a releasing block changed state"
        );
        g.add(&self.releasing, (1usize << order).wrapping_neg());
        g.add(&self.free_buddy, (1usize << order).wrapping_neg());
        self.buddy_free_as(pick, order, true, &g);
        bytes
    }

    /// A free block of one of `orders` (the largest first), idle since
    /// before `epoch - age` and not yet returned to the OS (zone lock held):
    /// the oldest of its list, so O(1) per order.
    #[cfg(feature = "std")]
    fn idle_block(
        &self,
        orders: core::ops::RangeInclusive<u32>,
        epoch: usize,
        age: usize,
    ) -> Option<(u32, u32)> {
        orders.rev().find_map(|order| {
            let i = self.oldest_unreleased(order);
            (i != NIL && self.idle_since(i, epoch, age)).then_some((i, order))
        })
    }

    /// Checks the zone's invariants; the caller makes sure nothing else uses
    /// the zone. Returns the number of free pages found.
    pub(crate) fn check(&self) -> Result<usize, &'static str> {
        let g = self.lock.lock(self.platform);
        let mut buddy = 0usize;
        for order in 0..=MAX_ORDER {
            let mut i = self.heads[order as usize].load(Ordering::Relaxed);
            let mut prev = NIL;
            let mut n = 0;
            let mut released = false;
            let mut first_released = NIL;
            while i != NIL {
                let d = self.desc(i);
                if d.load() != desc::state(desc::BUDDY, order) {
                    return Err("a block on a buddy list is not marked BUDDY of its order");
                }
                if released && !self.is_released(i) {
                    return Err("a buddy block not given back follows one given back");
                }
                if !released && self.is_released(i) {
                    first_released = i;
                }
                // The epoch never goes back: the later a block is freed,
                // the nearer the head.
                if !self.is_released(i) && prev != NIL && !self.is_released(prev) {
                    let p = self.desc(prev).carved.load(Ordering::Relaxed);
                    if d.carved.load(Ordering::Relaxed) > p {
                        return Err("a buddy list's free blocks are not latest first");
                    }
                }
                released = self.is_released(i);
                if !i.is_multiple_of(1 << order) || i < self.first || i + (1 << order) > self.limit
                {
                    return Err("a buddy block is misaligned or outside its zone");
                }
                if d.prev.load(Ordering::Relaxed) != prev {
                    return Err("a buddy list back link is wrong");
                }
                if self.gone_pages(i, order) > 1 << order {
                    return Err("a buddy block counts more pages given back than it has");
                }
                if order < MAX_ORDER {
                    let b = i ^ (1 << order);
                    if b >= self.first
                        && b + (1 << order) <= self.limit
                        && self.desc(b).load() == desc::state(desc::BUDDY, order)
                    {
                        return Err("two free buddies were not merged");
                    }
                }
                buddy += 1 << order;
                n += 1;
                prev = i;
                i = d.next.load(Ordering::Relaxed);
            }
            if n != self.counts[order as usize].load(Ordering::Relaxed) {
                return Err("a buddy list count is wrong");
            }
            if prev != self.tails[order as usize].load(Ordering::Relaxed) {
                return Err("a buddy list tail is wrong");
            }
            if first_released != self.released_first[order as usize].load(Ordering::Relaxed) {
                return Err("a buddy list's first block given back is wrong");
            }
        }
        // Off a largest-block boundary only when nothing is left: a zone
        // with no whole largest block (inside one 4 MiB block) has its
        // empty untouched part at `limit`.
        let fresh = self.fresh.load(Ordering::Relaxed);
        if fresh > self.fresh_end
            || (fresh != self.fresh_end && !fresh.is_multiple_of(1 << MAX_ORDER))
        {
            return Err("the untouched part's bound is wrong");
        }
        if buddy + self.releasing.load(Ordering::Relaxed) + self.fresh_pages() != self.free_buddy()
        {
            return Err("free_buddy does not match the buddy lists");
        }
        let mut stock = 0usize;
        for (i, order) in self.stocked() {
            if self.desc(i).load() != desc::state(desc::PCP, order) {
                return Err("a stocked block is not marked PCP of its order");
            }
            stock += 1 << order;
        }
        if stock != self.stock_pages() {
            return Err("the stock page count is wrong");
        }
        let mut pcp = 0usize;
        for i in 0..self.cpus * LEVELS {
            let Some((slot, _s)) = self.lock_remote(i) else {
                return Err("a slot is held during an invariant check");
            };
            let mut pages = 0;
            for order in 0..=HEAP_PCP_ORDER {
                let (mut i, count) = slot.list(order);
                let mut n = 0;
                while i != NIL {
                    if self.desc(i).load() != desc::state(desc::PCP, order) {
                        return Err("a block on a per-CPU list is not marked PCP of its order");
                    }
                    n += 1;
                    pages += 1 << order;
                    i = self.desc(i).next.load(Ordering::Relaxed);
                }
                if n != count {
                    return Err("a per-CPU list count is wrong");
                }
            }
            pcp += pages;
        }
        drop(g);
        Ok(buddy + self.fresh_pages() + pcp + stock + self.deferred_pages())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The page offset of `addr`'s 64-byte line, as a line number.
    fn line(addr: usize) -> usize {
        (addr & (PAGE_SIZE - 1)) / LINE
    }

    /// The lines of `bytes` bytes from `from`, one bit each.
    fn lines(from: usize, bytes: usize) -> u64 {
        (from..from + bytes)
            .step_by(LINE)
            .fold(0, |set, a| set | 1 << line(a))
    }

    /// Whether `set` holds line `l`.
    fn holds(set: u64, l: usize) -> bool {
        set & 1 << l != 0
    }

    /// The offset is in the page after the zone and its slots, on a line of
    /// its own, and meta_size leaves room for it.
    fn check_bounds(meta: usize, cpus: usize, off: usize) {
        let page_start = head_and_slots(cpus).next_multiple_of(PAGE_SIZE);
        assert!(
            (page_start..page_start + PAGE_SIZE).contains(&off),
            "offset {off:#x} outside the page at {page_start:#x}"
        );
        assert_eq!((meta + off) % LINE, 0, "offset {off:#x} not on a line");
        let descs_end = off + 16 * core::mem::size_of::<PageDesc>();
        assert!(descs_end <= meta_size(0, 16 * PAGE_SIZE, cpus));
    }

    /// With few CPUs every hot line is avoided: the rseq areas (the
    /// building thread's, and the last line, where glibc puts those of the
    /// threads it creates), the zone's lines and the level-0 slots.
    #[test]
    fn descriptors_avoid_every_hot_line() {
        for cpus in [1, 2, 4] {
            for meta in [0x7f00_0000_0000usize, 0x7f00_0000_0a40] {
                for area in [None, Some(0x7f00_1234_50a0), Some(0x7f00_1234_5fe0)] {
                    let off = descs_offset(meta, cpus, area);
                    check_bounds(meta, cpus, off);
                    let at = line(meta + off);
                    let hot = lines(meta, HEAD)
                        | lines(meta + HEAD, cpus * core::mem::size_of::<PcpSlot>())
                        | 1 << (PAGE_SIZE / LINE - 1)
                        | area.map_or(0, |a| 1 << line(a));
                    assert!(
                        !holds(hot, at),
                        "line {at} is hot ({cpus} CPUs, meta {meta:#x}, area {area:?})"
                    );
                }
            }
        }
    }

    /// The building thread's area moves the array: whatever line it took
    /// without one, an area on that line makes it take another.
    #[test]
    fn descriptors_leave_the_building_threads_area() {
        let meta = 0x7f00_0000_0000usize;
        for cpus in [1, 2, 64] {
            let off = descs_offset(meta, cpus, None);
            let moved = descs_offset(meta, cpus, Some(meta + off + 8));
            check_bounds(meta, cpus, moved);
            assert_ne!(line(meta + moved), line(meta + off), "{cpus} CPUs");
        }
    }

    /// With so many CPUs that their level-0 slots cover every line of a
    /// page, the slots are given up, the zone's lines and the areas are not.
    #[test]
    fn many_cpus_still_keep_off_the_zone_and_the_areas() {
        let meta = 0x7f00_0000_0000usize;
        let cpus = 64;
        let area = Some(0x7f00_1234_5320);
        let off = descs_offset(meta, cpus, area);
        check_bounds(meta, cpus, off);
        let at = line(meta + off);
        assert!(!holds(lines(meta, HEAD), at), "line {at} is the zone's");
        assert_ne!(at, line(0x320));
        assert_ne!(at, PAGE_SIZE / LINE - 1);
    }

    /// A built allocator's descriptor array: its first line is none of its
    /// zone's own, its level-0 slots' or this thread's rseq area's.
    #[cfg(feature = "std")]
    #[test]
    fn built_zone_descriptors_avoid_its_hot_lines() {
        let pa = crate::PageAllocator::new(crate::Config::default().memory(8 << 20)).unwrap();
        let zone = pa.first_zone();
        let meta = zone as *const Zone as usize;
        let at = line(zone.descs as usize);
        assert!(!holds(lines(meta, HEAD), at));
        let slots = zone.cpus * core::mem::size_of::<PcpSlot>();
        if zone.cpus <= 8 {
            assert!(!holds(lines(zone.slots as usize, slots), at));
        }
        if let Some(area) = crate::platform::rseq_area() {
            assert_ne!(at, line(area));
        }
    }
}
