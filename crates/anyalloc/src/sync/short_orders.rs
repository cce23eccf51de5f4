//! Which orders of a zone's nolock stock may have an empty cell.
//!
//! The stock keeps a few free blocks of each large order a nolock
//! allocation asked for, one per lock-free cell, for when the zone lock is
//! busy. Zone-lock holders keep the cells filled (`Zone::stock_refill`);
//! anyone, in any context and without the lock, may empty one (a swap) or
//! fill one (a CAS from empty). Walking every wanted order's cells on each
//! holder would cost every large nolock pair two walks, so the holders look
//! only at the orders marked here:
//!
//! | bit `order` | meaning                                             |
//! |-------------|-----------------------------------------------------|
//! | 0           | every cell of `order` was full when last looked at   |
//! | 1           | a cell of `order` may be empty: the next holder looks |
//!
//! Transitions:
//!
//! * **mark** ([`mark`](ShortOrders::mark)), `Release`: after a cell is
//!   emptied (a take's swap), when an order starts being wanted (its cells
//!   are empty), and by a holder that could not fill a cell.
//! * **take** ([`take`](ShortOrders::take)), zone lock held: the marked
//!   orders among the wanted ones; when there are any, they are cleared
//!   with an `Acquire` RMW *before* the holder reads their cells.
//!
//! Why no emptied cell is left unmarked: take a take (swap `S` of the
//! cell, then mark `M`) and a holder's take (clear `C`, then read `R` of
//! the cell). `M` and `C` are RMWs of one word, so one precedes the other
//! in its modification order. If `M` comes first, `C` reads `M` (or a
//! later RMW in its release sequence) and synchronises with it, so `S`
//! happens before `R`: the holder sees the empty cell and fills it (or
//! marks the order again if it has no memory). If `C` comes first, `M`
//! sets the bit after it and leaves it set for the next holder. A mark
//! may be left over an order whose cells are full: then a holder looks at
//! them once for nothing. The loom tests below explore the race.

use super::atomic::{AtomicU32, Ordering};

/// See the module documentation.
pub(crate) struct ShortOrders(AtomicU32);

impl ShortOrders {
    /// No order marked.
    pub(crate) fn new() -> Self {
        ShortOrders(AtomicU32::new(0))
    }

    /// Any context: a cell of `order` may be empty from now on.
    #[inline]
    pub(crate) fn mark(&self, order: u32) {
        self.0.fetch_or(1 << order, Ordering::Release);
    }

    /// Zone lock held: the marked orders among `want`, now cleared; the
    /// caller reads their cells next and marks again the orders whose
    /// cells it could not fill. 0 (one load, nothing written) when none.
    #[inline]
    pub(crate) fn take(&self, want: u32) -> u32 {
        let todo = self.0.load(Ordering::Relaxed) & want;
        if todo != 0 {
            self.0.fetch_and(!todo, Ordering::Acquire);
        }
        todo
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    extern crate std;
    use super::*;
    use loom::sync::Arc;

    const ORDER: u32 = 6;
    const EMPTY: u32 = u32::MAX;
    /// The block a cell holds at the start, and the one a refill puts in.
    const FIRST: u32 = 1;
    const REFILLED: u32 = 2;

    /// One cell of one wanted order, and its mark.
    struct Shared {
        short: ShortOrders,
        cell: AtomicU32,
    }

    /// A lock-free take: empty the cell, then mark the order.
    fn take_block(s: &Shared) -> bool {
        let got = s.cell.swap(EMPTY, Ordering::Acquire) != EMPTY;
        if got {
            s.short.mark(ORDER);
        }
        got
    }

    /// A zone-lock holder's refill (as `Zone::stock_fill`): the marked
    /// orders, then their empty cells filled from the buddy lists (here
    /// `memory` says whether there is a block to fill one with).
    fn refill(s: &Shared, memory: bool) {
        let todo = s.short.take(1 << ORDER);
        if todo & (1 << ORDER) != 0 && s.cell.load(Ordering::Relaxed) == EMPTY {
            if !memory {
                s.short.mark(ORDER);
            } else if s
                .cell
                .compare_exchange(EMPTY, REFILLED, Ordering::Release, Ordering::Relaxed)
                .is_err()
            {
                unreachable!("only holders fill a cell in this model");
            }
        }
    }

    fn full_cell() -> Arc<Shared> {
        Arc::new(Shared {
            short: ShortOrders::new(),
            cell: AtomicU32::new(FIRST),
        })
    }

    /// The invariant: a cell left empty has its order marked, so the next
    /// holder fills it.
    fn assert_filled_or_marked(s: &Shared) {
        let empty = s.cell.load(Ordering::Relaxed) == EMPTY;
        let marked = s.short.take(1 << ORDER) != 0;
        assert!(!empty || marked, "an empty cell with its order unmarked");
    }

    /// Every interleaving of a zone-lock holder (`holder`, on this thread)
    /// with another thread's lock-free take of the full cell; `after` runs
    /// once both are done.
    fn race_a_take(holder: fn(&Shared), after: fn(&Shared)) {
        loom::model(move || {
            let s = full_cell();
            let t = {
                let s = s.clone();
                loom::thread::spawn(move || take_block(&s))
            };
            holder(&s);
            t.join().unwrap();
            after(&s);
        });
    }

    #[test]
    fn a_take_racing_a_refill_leaves_the_cell_filled_or_marked() {
        race_a_take(|s| refill(s, true), assert_filled_or_marked);
    }

    #[test]
    fn a_refill_without_memory_leaves_the_order_marked() {
        race_a_take(
            |s| refill(s, false),
            |s| {
                // A second holder, with memory now: the cell is full again.
                refill(s, true);
                assert_eq!(s.cell.load(Ordering::Relaxed), REFILLED);
            },
        );
    }
}
