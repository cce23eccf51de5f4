//! A free's claim of its block: the inline claim of the fast path (the
//! descriptor's state moves from allocated to freeing in one atomic step,
//! which catches two racing frees of one block), the full claim that tells
//! a bad free apart, and the one-line reports of bad frees and corruption.

use super::*;

impl PageAllocator {
    /// The inline half of a free's claim: the block at `ptr`, aligned for
    /// `order`, whose page index and descriptor `locate` gives (the first
    /// zone's window, looked up here, after the alignment check; or what
    /// the caller already found in the zone map), claimed (`ALLOCATED ->
    /// kind`: `FREEING`, or `PCP` for a block about to be pushed onto this
    /// CPU's list). `None`: ask [`claim_slow`](Self::claim_slow), which
    /// decides and reports.
    ///
    /// `PUBLIC` (a free through the public API): a block whose descriptor
    /// names an owner is not claimed either. The owner is the object
    /// allocator's word (`desc`): set on every page of a slab and on the
    /// head page of a large allocation by a heap built on this allocator,
    /// for as long as the heap holds the block, and cleared by the heap
    /// before its own free of the block (which skips this check), so it is
    /// 0 on every block a caller of `alloc_pages` got. A block it names is
    /// the heap's, handed to `heap.pages().free_pages` by mistake: claimed,
    /// it would go onto a free list while the heap still uses it (a slab's
    /// objects handed out again, a page given out twice). The check is one
    /// load and compare of the descriptor the claim's CAS has just written
    /// (same 32 bytes, same cache line), after the CAS: that way it costs
    /// the order-0 page pair nothing measurable (before the CAS, the load
    /// sat on the way to the locked instruction: about 0.8 ns of 9.5 in
    /// `anyalloc bench --filter pages`). A block it names is put back
    /// (`ALLOCATED` again, nothing else was touched) and `claim_slow`
    /// reports it. Between the claim and the put-back a racing free of the
    /// heap's would report a double free instead: either way the program
    /// freed a block of the heap's through the page allocator, and dies.
    #[inline(always)]
    pub(super) fn claim_fast<'a, const PUBLIC: bool>(
        &self,
        ptr: NonNull<u8>,
        order: u32,
        kind: u32,
        locate: impl FnOnce(usize) -> Option<(u32, &'a PageDesc)>,
    ) -> Option<(u32, &'a PageDesc)> {
        // The common case inline: a well-aligned block whose claim
        // succeeds. Anything else (every report) is `claim_slow`, which
        // starts over: a failed CAS changed nothing.
        let addr = ptr.as_ptr() as usize;
        if order > MAX_ORDER || addr & ((PAGE_SIZE << order) - 1) != 0 {
            return None;
        }
        let (idx, d) = locate(addr)?;
        d.state
            .compare_exchange(
                desc::state(desc::ALLOCATED, order),
                desc::state(kind, order),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        if PUBLIC && d.owner.load(Ordering::Relaxed) != 0 {
            // A heap's block: put back as it was, for `claim_slow`'s report.
            put_back(d, order);
            return None;
        }
        crate::interrupt_point!(PageClaimed);
        Some((idx, d))
    }

    /// Validates a free and claims the block (`ALLOCATED -> FREEING`), or
    /// reports the corruption and aborts. `public`: a free through the
    /// public API, which must not name a block a heap owns (see
    /// `claim_fast`).
    #[inline(never)]
    pub(super) fn claim_slow(&self, ptr: NonNull<u8>, order: u32, public: bool) -> (&Zone, u32) {
        let addr = ptr.as_ptr() as usize;
        if order > MAX_ORDER {
            self.corrupt(
                "free of page ",
                addr,
                " with an order above MAX_ORDER (order ",
                order,
            );
        }
        let Some((zone, idx)) = self.locate(addr) else {
            self.corrupt(
                "free of ",
                addr,
                ", which is outside managed memory (order ",
                order,
            );
        };
        if public && zone.desc(idx).owner.load(Ordering::Relaxed) != 0 {
            // Any address in a page the heap owns: a slab's every page, a
            // large block's head (its other pages report as interior).
            self.corrupt(
                "page free of ",
                addr,
                ", which a heap owns (a slab or a large allocation: free it with the heap) (order ",
                order,
            );
        }
        if addr & ((PAGE_SIZE << order) - 1) != 0 {
            self.corrupt(
                "free of ",
                addr,
                ", which is misaligned for its order (order ",
                order,
            );
        }
        let d = zone.desc(idx);
        let want = desc::state(desc::ALLOCATED, order);
        match d.state.compare_exchange(
            want,
            desc::state(desc::FREEING, order),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                // FREEING: a racing (wrong) free of the block fails its claim.
                crate::interrupt_point!(PageClaimed);
                (zone, idx)
            }
            Err(actual) => self.bad_claim(addr, order, actual),
        }
    }

    #[cold]
    pub(super) fn bad_claim(&self, addr: usize, order: u32, actual: u32) -> ! {
        match desc::kind_of(actual) {
            desc::ALLOCATED => {
                let msg = FatalMessage::new()
                    .text("anyalloc: free of page ")
                    .hex(addr)
                    .text(" with order ")
                    .dec(order as usize)
                    .text(", but it was allocated with order ")
                    .dec(desc::order_of(actual) as usize);
                self.fatal(msg)
            }
            desc::TAIL => self.corrupt(
                "free of ",
                addr,
                ", which is not the start of an allocated block: double free or interior pointer (order ",
                order,
            ),
            desc::RELEASING => self.corrupt(
                "double free of page ",
                addr,
                ", a free block being returned to the OS (order ",
                order,
            ),
            _ => self.corrupt("double free of page ", addr, " (order ", order),
        }
    }

    #[cold]
    pub(super) fn corrupt(&self, what: &str, addr: usize, middle: &str, order: u32) -> ! {
        let msg = FatalMessage::new()
            .text("anyalloc: ")
            .text(what)
            .hex(addr)
            .text(middle)
            .dec(order as usize)
            .text(")");
        self.fatal(msg)
    }

    #[cold]
    pub(crate) fn fatal(&self, mut msg: FatalMessage) -> ! {
        self.platform.fatal(msg.line())
    }

    /// `fatal` with the line `before`, `addr` in hexadecimal, `after`,
    /// built in this function's own frame. For the checks of the nolock
    /// paths' hot functions: a message built in place is a 512-byte buffer
    /// (copied once per builder call) in *their* frames, reserved on every
    /// call, fatal or not, which nested handlers on a small alternate
    /// signal stack pay for.
    #[cold]
    #[inline(never)]
    pub(crate) fn fatal_at(&self, before: &str, addr: usize, after: &str) -> ! {
        self.fatal(FatalMessage::new().text(before).hex(addr).text(after))
    }
}

/// A public free's claim of a block a heap owns, undone (`ALLOCATED` again)
/// for `claim_slow`'s report. Out of line and cold, so that the claim's
/// common case falls through to the push.
#[cold]
#[inline(never)]
fn put_back(d: &PageDesc, order: u32) {
    d.set(desc::state(desc::ALLOCATED, order));
}
