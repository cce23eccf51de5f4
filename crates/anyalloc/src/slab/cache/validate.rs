//! Checks of a pointer before a cache takes it back: the O(1) key test of
//! a double free and its exact check (the slab's free list, the sheaves,
//! the deferred and suspects stacks), parked suspects, checked links,
//! object starts, the owner words of accounted slabs and, with
//! `debug-checks`, the allocation bitmap. See "Double-free detection" in
//! the module documentation.

use super::*;

impl Cache {
    /// Both free paths, before the object goes anywhere: the O(1) key test
    /// (see "Double-free detection"), then the key is written. `false`:
    /// the object was parked as a suspect (`suspects`) and the free is
    /// done; the caller must not free it anywhere else.
    #[inline(always)]
    #[must_use]
    pub(crate) fn check_free(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> bool {
        if self.key_suspect(pages, obj) && !self.suspect_double_free(pages, obj, mode) {
            return false;
        }
        let kw = (obj + key_off(self.class)) as *mut usize;
        // SAFETY: `obj` is a validated object of this cache (at least 8
        // bytes, 16 when the key is at 8), owned by this free.
        unsafe { kw.write_unaligned(self.key) };
        true
    }

    /// The key test alone, which changes nothing: whether the key
    /// word of the validated object `obj` says it may be free (it holds the
    /// key, or, in the tiny classes, something that looks like a free-list
    /// link). Only the exact search (`is_free`) decides.
    pub(super) fn key_suspect(&self, pages: &PageAllocator, obj: usize) -> bool {
        let off = key_off(self.class);
        // SAFETY: `obj` is a validated object of this cache (at least
        // `off + 8` bytes); reading its key word changes nothing.
        let w = unsafe { ((obj + off) as *const usize).read_unaligned() } ^ self.key;
        w == 0 || (off == 0 && Self::tiny_suspect(pages, w))
    }

    /// The key test's common case, for the fast paths: the key word does
    /// not match, and (tiny classes, whose key word is the free-list link)
    /// it does not look like a link either: not NIL, not an address in any
    /// zone (the first zone's window, then the zone map: a few loads each,
    /// see `page::zone_map`). Then it writes the key
    /// and says `true`; otherwise it changes nothing and the caller takes
    /// [`free_checked`](Self::free_checked), which decides exactly as
    /// [`check_free`](Self::check_free) does.
    ///
    /// `tag` is this cache's owner tag (the caller has it in hand: the key
    /// word's place follows from it, without a load, and a caller that
    /// tested it against `FIRST_KEYED_TAG` makes the place a constant).
    #[inline(always)]
    pub(crate) fn check_free_quick(&self, pages: &PageAllocator, obj: usize, tag: usize) -> bool {
        crate::check!(
            class::index_of_tag(tag) == self.class,
            "a quick key test of another class"
        );
        let off = key_off_of_tag(tag);
        let kw = (obj + off) as *mut usize;
        // SAFETY: as in `check_free`: a validated object of this class, at
        // least `off + 8` bytes.
        let w = unsafe { kw.read_unaligned() } ^ self.key;
        if w == 0 || (off == 0 && Self::tiny_suspect(pages, w)) {
            return false;
        }
        // SAFETY: as in `check_free`.
        unsafe { kw.write_unaligned(self.key) };
        true
    }

    /// A free whose quick key test could not decide: the full test
    /// ([`check_free`](Self::check_free)), then the free of `mode`.
    #[cold]
    #[inline(never)]
    pub(crate) fn free_checked(&self, pages: &PageAllocator, obj: usize, mode: Mode) {
        if self.check_free(pages, obj, mode) {
            self.free_miss(pages, obj, mode);
        }
    }

    /// Tiny classes: whether a first word XOR the key looks like a free
    /// object's link: the end of the deferred stack, or an address in any
    /// zone (the first zone's window, then the zone map: a few loads, no
    /// walk over the zones). The quick test and the full one share it.
    #[inline(always)]
    fn tiny_suspect(pages: &PageAllocator, w: usize) -> bool {
        w == crate::sync::NIL || pages.in_first_zone(w) || pages.in_grown_zone(w)
    }

    /// Writes the key into a free object's key word (as a free's key test
    /// leaves it).
    pub(super) fn set_free_mark(&self, obj: usize) {
        // SAFETY: `obj` is a free object of this cache owned by the caller
        // (taken off the deferred stack and held in a locked slot, or just
        // carved under the node lock), at least `key_off + 8` bytes.
        unsafe { ((obj + key_off(self.class)) as *mut usize).write_unaligned(self.key) };
    }

    /// `clear_free_mark` for a caller that has the cache's owner tag in
    /// hand (see `check_free_quick`).
    #[inline(always)]
    pub(crate) fn clear_free_mark_of(&self, obj: usize, tag: usize) {
        crate::check!(
            class::index_of_tag(tag) == self.class,
            "a key word of another class"
        );
        // SAFETY: `obj` is an object of this cache being handed out, at
        // least `key_off_of_tag(tag) + 8` bytes, owned by the allocating
        // context.
        unsafe { ((obj + key_off_of_tag(tag)) as *mut usize).write_unaligned(0) };
    }

    /// Allocation: the object is live, its key word no longer says "free".
    #[inline(always)]
    pub(crate) fn clear_free_mark(&self, obj: usize) {
        self.clear_free_mark_of(obj, class::tag_of(self.class));
    }

    /// The key matched: abort if the object really is free. A normal free
    /// of a thread inside the allocator or in a nolock scope searches as
    /// the nolock route it takes does (`routed`): it only tries the node
    /// lock, whose holder may be waiting for a lock its interrupted context
    /// holds.
    ///
    /// `true`: not free, the free goes on. When the search cannot decide
    /// (the node lock is busy), the object is parked on `suspects` instead
    /// and `false` returned: going on would put a double-freed object in a
    /// sheaf while it is still on its slab's free list or in the barn, and
    /// it would be handed out twice.
    #[cold]
    #[inline(never)]
    pub(super) fn suspect_double_free(
        &self,
        pages: &PageAllocator,
        obj: usize,
        mode: Mode,
    ) -> bool {
        match self.is_free(pages, obj, crate::slab::routed(mode)) {
            Some(true) => double_free(pages.platform(), obj),
            Some(false) => true,
            None => {
                self.park_suspect(obj);
                pages.wake_maintainer();
                false
            }
        }
    }

    /// Parks `obj` on `suspects` (linked as the deferred stack is). Any
    /// context.
    pub(super) fn park_suspect(&self, obj: usize) {
        self.suspects
            .push(obj, |o, next| self.set_deferred_link(o, next));
    }

    /// Normal context: checks every parked suspect again, now able to wait
    /// for the node lock: one still free elsewhere, or handed out since
    /// (its key word cleared by the allocation), was freed twice;
    /// the others are freed (user data that equalled the key).
    ///
    /// A taker (`deferred_taker`), as the deferred stack's drain: the
    /// whole stack is taken, then each object checked and freed without a
    /// lock a fork holds; cloned halfway, the rest of the chain would be
    /// lost to the child, its objects counted in use there for good. While
    /// a fork is in progress the stack is left alone; signals are blocked
    /// while counted (a handler of this thread that forks would wait for
    /// its own thread's count).
    pub(super) fn drain_suspects(&self, pages: &PageAllocator) {
        #[cfg(feature = "std")]
        let _quiet = crate::platform::SignalsBlocked::new();
        let Some(_taker) = self.deferred_taker() else {
            return;
        };
        let mut o = self.suspects.take_all();
        while o != crate::sync::NIL {
            let off = key_off(self.class);
            // SAFETY: a parked object of this cache (at least `off + 8`
            // bytes), ours; reading its key word changes nothing.
            let kw = unsafe { ((o + off) as *const usize).read_unaligned() };
            // Tiny classes: the key word is the link. A parked object is
            // never handed out from here; one handed out from where it was
            // still free (freed twice) lost its link to the allocation,
            // which cleared the word (or to its new owner's writes): it no
            // longer decodes to the end or an object of this cache. That
            // is the double free (the rest of the chain is lost with the
            // link, and the process ends here), not the use after free that
            // `deferred_link` would report.
            if off == 0
                && kw ^ self.key != crate::sync::NIL
                && !self.is_object_of(pages, kw ^ self.key)
            {
                double_free(pages.platform(), o);
            }
            // The chain is ours (take_all).
            let next = self.deferred_link(pages, o);
            crate::interrupt_point!(ObjectDeferredDrain);
            match self.is_free(pages, o, crate::slab::routed(Mode::Normal)) {
                Some(true) => double_free(pages.platform(), o),
                _ if off != 0 && kw != self.key => double_free(pages.platform(), o),
                Some(false) => {
                    if off == 0 {
                        self.set_free_mark(o);
                    }
                    self.free_normal(pages, pages.cpu(), o);
                }
                // Still undecided (this drain runs nested): back it goes.
                None => self.park_suspect(o),
            }
            o = next;
        }
    }

    /// The exact check: whether `obj` is free in this cache right now: in
    /// a sheaf of some slot, on the deferred stack, in a barn sheaf or on
    /// its slab's free list. The sheaves are read without their slot locks
    /// (a concurrent move may hide the object: then it is not reported);
    /// the barn and the free list need the node and barn locks, held
    /// together (an object moving between them is seen in one place),
    /// which the nolock path only tries (busy: not reported).
    /// `None`: the node or the barn lock was busy (nolock), so the barn and
    /// the free list were not searched; or a fork on another thread is in progress,
    /// so the deferred stack and the suspects were not taken to be searched
    /// (see `deferred_taker`).
    pub(super) fn is_free(&self, pages: &PageAllocator, obj: usize, mode: Mode) -> Option<bool> {
        let in_first = |sh: &Sheaf, n: usize| {
            sh.objs[..n.min(SHEAF_CAP)]
                .iter()
                .any(|o| o.load(Ordering::Relaxed) == obj)
        };
        let in_sheaf = |sh: &Sheaf| in_first(sh, sh.len());
        if self.slots().any(|s| {
            s.main_view().is_some_and(|(sh, n)| in_first(sh, n))
                || s.spare_if_any().is_some_and(in_sheaf)
        }) {
            return Some(true);
        }
        // The deferred stack and the suspects are taken whole below: a
        // taker, as their drains (a fork waits for it; while one is in
        // progress nothing is taken, and the search is undecided), until
        // both are put back (dropped before the node lock, which a fork
        // takes once the takers are done).
        let taker = self.deferred_taker()?;
        // The deferred stack: take it (we own the chain), look, put it back
        // whole (behind whatever was pushed meanwhile).
        let first = self.deferred.take_all();
        // Re-entered here, a normal operation finds no deferred object.
        crate::interrupt_point!(DoubleFreeCheck);
        let found = self.chain_holds(pages, first, obj);
        if first != crate::sync::NIL {
            self.put_back_deferred(pages, first);
        }
        if found {
            return Some(true);
        }
        // The parked suspects, the same way (no gate to close: nothing is
        // handed out from there).
        let first = self.suspects.take_all();
        let found = self.chain_holds(pages, first, obj);
        if first != crate::sync::NIL {
            self.suspects.put_back(
                first,
                |o| self.deferred_link(pages, o),
                |o, next| self.set_deferred_link(o, next),
            );
        }
        if found {
            return Some(true);
        }
        drop(taker);
        // Busy (nolock): undecided.
        let _locks = self.lock_node_and_barn(mode, pages)?;
        let mut s = self.barn.full.load(Ordering::Relaxed);
        while !s.is_null() {
            // SAFETY: barn sheaves are cache sheaves; the barn lock is held.
            let sh = unsafe { &*s };
            if in_sheaf(sh) {
                return Some(true);
            }
            s = sh.next.load(Ordering::Relaxed);
        }
        let (_, zone, idx) = pages.locate_known(obj);
        let d = zone.desc(idx & !((1u32 << self.order) - 1));
        let mut f = d.freelist.load(Ordering::Relaxed);
        for _ in 0..self.objs {
            if f == 0 {
                break;
            }
            if f == obj {
                return Some(true);
            }
            // `f` is on this slab's free list (node lock held).
            f = self.slab_link(f, d.carved.load(Ordering::Relaxed), pages.platform());
        }
        Some(false)
    }

    /// Whether the chain from `first` (taken off the deferred stack or the
    /// suspects with `take_all`, so ours until put back) holds `obj`.
    pub(super) fn chain_holds(&self, pages: &PageAllocator, first: usize, obj: usize) -> bool {
        // The whole chain: each link is checked as it is followed.
        let mut found = false;
        let mut o = first;
        while o != crate::sync::NIL {
            found |= o == obj;
            o = self.deferred_link(pages, o);
        }
        found
    }

    /// The link of `obj`, a free object on its slab's free list (node lock
    /// held), decoded: 0 (the end) or another object of the same slab,
    /// already carved (`carved` objects were). Anything else means the
    /// object was written after its free (a use after free overwrote its
    /// first word): abort instead of handing out memory at whatever address
    /// the write made of the link. A canonical value written there decodes
    /// to a non-canonical address (the key is non-canonical), so any such
    /// write is caught; only data that matches the key's pattern could
    /// decode to another object of the slab.
    pub(super) fn slab_link(&self, obj: usize, carved: usize, platform: &dyn Platform) -> usize {
        // Its first word is the list link XOR the key (unaligned in 12-byte classes).
        // SAFETY: `obj` is a free object of this slab (pushed by
        // `return_to_slab`; node lock held), at least 8 bytes long.
        let next = unsafe { (obj as *const usize).read_unaligned() } ^ self.key;
        if next == crate::sync::NIL {
            // The end of the deferred stack or of the suspects, which no
            // slab list holds: a free pushed the object there (parking it
            // as a suspect, say, when its exact check could not take the
            // node lock) while it was free on this list. A double free.
            double_free(platform, obj);
        }
        if next != 0 {
            let mask = self.slab_mask as usize;
            let same_slab = next & !mask == obj & !mask;
            if !same_slab
                || !self.is_object_start(next)
                || self.index_in_slab(next & mask) >= carved
            {
                corrupt_link(platform, obj);
            }
        }
        next
    }

    /// Checks that `addr` (in a page this cache owns) is the start of an
    /// object slot; aborts otherwise, naming the call `what` ("free").
    #[inline(always)]
    pub(crate) fn validate(&self, pages: &PageAllocator, addr: usize, what: &str) {
        if !self.is_object_start(addr) {
            self.interior_pointer(pages, addr, what);
        }
    }

    /// Whether the validated object `obj` is free right now, for a check
    /// that must not change it (`usable_size`): the key test of a free,
    /// without writing the key, then (a suspect) the exact search, which
    /// only tries the node lock. Any context.
    pub(crate) fn is_freed(&self, pages: &PageAllocator, obj: usize) -> bool {
        self.key_suspect(pages, obj) && self.is_free(pages, obj, Mode::NoLock) == Some(true)
    }

    /// Whether `addr` (in a page this cache owns) is the start of an object
    /// slot.
    #[inline(always)]
    pub(crate) fn is_object_start(&self, addr: usize) -> bool {
        // The shortcut first (see `start_mask`): all of the check for the
        // power-of-two classes, then the exact test. Slabs are naturally
        // aligned and at most 2^32 bytes, so an address's low 32 bits hold
        // its offset in its slab, and a multiple of a power-of-two size
        // there is the same in the slab.
        addr as u32 & self.start_mask == 0
            || is_start(
                addr as u32 & self.slab_mask,
                self.start_magic,
                self.start_bound,
            )
    }

    #[cold]
    #[inline(never)]
    pub(super) fn interior_pointer(&self, pages: &PageAllocator, addr: usize, what: &str) -> ! {
        pages.fatal(
            crate::platform::FatalMessage::new()
                .text("anyalloc: ")
                .text(what)
                .text(" of ")
                .hex(addr)
                .text(", which is not the start of an object (interior pointer into a ")
                .dec(self.size)
                .text("-byte object)"),
        )
    }

    /// `off / size` for an offset inside a slab, by multiplication (exact
    /// for multiples of `size`; see `recip`).
    #[inline(always)]
    pub(super) fn index_in_slab(&self, off: usize) -> usize {
        index_by_recip(off as u32, self.recip)
    }

    /// Accounted caches: the owner word of object `n` of the slab at `slab`.
    pub(super) fn owner_word(&self, slab: usize, n: usize) -> &AtomicUsize {
        crate::check!(
            self.accounted && n < self.objs,
            "an owner word out of range"
        );
        let bytes = PAGE_SIZE << self.order;
        let array = slab + bytes - bitmap_bytes(self.class) - self.objs * 8;
        // SAFETY: the owner array is the 8-aligned tail of a live slab of
        // this cache reserved by `objects_per_slab`; n < objs.
        unsafe { &*((array + n * 8) as *const AtomicUsize) }
    }

    /// Accounted caches: takes every group reference out of the owner array
    /// of the slab whose head page is `head` (the heap is going away: no
    /// other context uses it), calling `f` with each (those of live
    /// objects: a free object's word is 0).
    pub(crate) fn take_owners(&self, zone: &Zone, head: u32, mut f: impl FnMut(usize)) {
        let slab = zone.addr_of(head);
        for n in 0..self.objs {
            let g = self.owner_word(slab, n).swap(0, Ordering::AcqRel);
            if g != 0 {
                f(g);
            }
        }
    }

    /// Accounted caches: the owner word of the (validated) object `addr` in
    /// page `idx` of `zone`.
    pub(crate) fn owner_of(&self, zone: &Zone, idx: u32, addr: usize) -> &AtomicUsize {
        let head = idx & !((1u32 << self.order) - 1);
        let slab = zone.addr_of(head);
        self.owner_word(slab, self.index_in_slab(addr - slab))
    }

    /// The per-object state bitmap of the slab starting at `slab` and the bit
    /// of an object offset: `(words, bits per word)`.
    #[cfg(feature = "debug-checks")]
    pub(super) fn bitmap(&self, slab: usize) -> (&[core::sync::atomic::AtomicU64], usize) {
        let bytes = PAGE_SIZE << self.order;
        let words = self.objs.div_ceil(64);
        let start = slab + bytes - (bytes / self.size).div_ceil(64) * 8;
        // SAFETY: the bitmap area is the slab's 8-aligned tail, reserved by
        // `objects_per_slab`, part of a live slab of this cache.
        (
            unsafe {
                core::slice::from_raw_parts(start as *const core::sync::atomic::AtomicU64, words)
            },
            64,
        )
    }

    /// debug-checks: flips an object's state bit; aborts on a double free.
    #[cfg(feature = "debug-checks")]
    pub(crate) fn mark(
        &self,
        pages: &PageAllocator,
        zone: &Zone,
        idx: u32,
        addr: usize,
        allocated: bool,
    ) {
        let head = idx & !((1u32 << self.order) - 1);
        let slab = zone.addr_of(head);
        let n = self.index_in_slab(addr - slab);
        let (words, bits) = self.bitmap(slab);
        let bit = 1u64 << (n % bits);
        let w = &words[n / bits];
        if allocated {
            let old = w.fetch_or(bit, Ordering::AcqRel);
            crate::check!(old & bit == 0, "an object was handed out twice");
        } else {
            let old = w.fetch_and(!bit, Ordering::AcqRel);
            if old & bit == 0 {
                pages.fatal_at("anyalloc: double free of object ", addr, "");
            }
        }
    }
}
