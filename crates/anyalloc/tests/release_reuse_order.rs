//! Memory given back to the OS is reused last, and memory never touched
//! does not count as given back.
//!
//! The buddy lists are LIFO: the block freed last is handed out first, so
//! a steady workload keeps reusing the same few resident blocks while the
//! ones deeper in the list stay idle, and maintenance gives those back.
//! A block given back used to be put back at the *head* of its list: the
//! next allocation of its order took it (a page fault per page, memory
//! zeroed again) while resident free blocks stayed behind it, became idle
//! in turn and were given back next: the same RSS, more page faults, each
//! pass. Given-back blocks now go to the tail and stay there.
//!
//! The halves split off a block whose memory is not with the process (given
//! back, or never touched: the zone's untouched part) were put on the lists
//! as blocks still to give back: `trim` and maintenance then called
//! `madvise` on memory the process never had, and counted it in
//! `released_to_os_bytes`.
//!
//! Residency is read with `mincore`, whatever the timing.

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use anyalloc::{Config, Heap, PAGE_SIZE};

/// One test at a time: one installs a process-wide interrupt hook, which
/// the others' releases would run.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Below 256 KiB (the maintainer's small blocks) and above the per-CPU
/// orders: `alloc_pages` takes these from the buddy lists directly.
const ORDER: u32 = 5;
const BLOCK: usize = PAGE_SIZE << ORDER;

/// Whether the page at `page` (page-aligned) is resident.
fn resident(page: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: `page` is page-aligned and inside a mapping of the heap's;
    // mincore writes one byte for one page.
    let r = unsafe { libc::mincore(page as *mut libc::c_void, PAGE_SIZE, &mut v) };
    assert_eq!(r, 0, "mincore");
    v & 1 != 0
}

fn block_resident(p: NonNull<u8>) -> bool {
    let a = p.as_ptr() as usize;
    (0..BLOCK / PAGE_SIZE).all(|i| resident(a + i * PAGE_SIZE))
}

fn heap() -> Heap {
    Heap::new(
        Config::default()
            .memory(32 << 20)
            .cpus(1)
            .grow(false)
            .maintenance(false),
    )
    .unwrap()
}

#[test]
fn blocks_given_back_are_reused_after_resident_ones() {
    let _serial = serial();
    let heap = heap();
    let pages = heap.pages();
    // Blocks of ORDER, touched; of each pair of buddies, the lower one stays
    // allocated, so the upper ones, once freed, stay blocks of ORDER.
    let all: Vec<NonNull<u8>> = (0..64)
        .map(|_| {
            let p = pages.alloc_pages(ORDER).unwrap();
            // SAFETY: `p` is valid for BLOCK bytes.
            unsafe { p.as_ptr().write_bytes(0x5a, BLOCK) };
            p
        })
        .collect();
    let addrs: Vec<usize> = all.iter().map(|p| p.as_ptr() as usize).collect();
    let (mut upper, mut lower) = (Vec::new(), Vec::new());
    for &p in &all {
        let a = p.as_ptr() as usize;
        if a & BLOCK != 0 && addrs.contains(&(a ^ BLOCK)) {
            upper.push(p);
        } else {
            lower.push(p);
        }
    }
    assert!(upper.len() >= 16, "{} buddy pairs", upper.len());
    let (old, young) = upper.split_at(upper.len() / 2);
    // SAFETY (both loops): allocated above with ORDER, freed once.
    for &p in old {
        unsafe { pages.free_pages(p, ORDER) };
    }
    // Blocks below 256 KiB go back after eight idle passes: not yet.
    for _ in 0..7 {
        heap.maintain();
    }
    assert!(
        old.iter().all(|&p| block_resident(p)),
        "idle small blocks were given back after seven passes"
    );
    for &p in young {
        // SAFETY: allocated above with this order, freed once.
        unsafe { pages.free_pages(p, ORDER) };
    }
    heap.maintain();
    assert!(
        old.iter().all(|&p| !block_resident(p)),
        "the idle blocks were not given back after eight passes"
    );
    assert!(young.iter().all(|&p| block_resident(p)));

    // As many blocks as are free and resident: all of them resident ones.
    let again: Vec<NonNull<u8>> = (0..young.len())
        .map(|_| pages.alloc_pages(ORDER).unwrap())
        .collect();
    let cold = again.iter().filter(|&&p| !block_resident(p)).count();
    assert_eq!(
        cold,
        0,
        "{cold} of {} allocations were served from memory given back to the OS \
         while {} resident free blocks were left",
        again.len(),
        young.len()
    );
    for p in again.into_iter().chain(lower) {
        // SAFETY: allocated above with ORDER, freed once.
        unsafe { pages.free_pages(p, ORDER) };
    }
    assert_eq!(pages.check_invariants(), Ok(()));
}

#[test]
fn untouched_memory_does_not_count_as_given_back() {
    let _serial = serial();
    let heap = heap();
    let pages = heap.pages();
    // Split off the zone's untouched part; the rest of that block (and
    // everything else free) was never touched.
    let p = pages.alloc_pages(ORDER).unwrap();
    // SAFETY: `p` is valid for BLOCK bytes.
    unsafe { p.as_ptr().write_bytes(0x5a, BLOCK) };
    let given_back = heap.trim();
    assert_eq!(
        given_back, 0,
        "trim gave back {given_back} bytes of memory never touched"
    );
    // Touched and freed: that block, and no more, goes back.
    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(p, ORDER) };
    let q = pages.alloc_pages(ORDER).unwrap();
    // SAFETY: `q` is valid for BLOCK bytes; then freed once.
    unsafe {
        q.as_ptr().write_bytes(0x5a, BLOCK);
        pages.free_pages(q, ORDER);
    }
    // It merged with the untouched rest of its largest block: that block
    // goes back whole, but only the touched block counts.
    let given_back = heap.trim();
    assert_eq!(
        given_back, BLOCK,
        "trim gave back {given_back} bytes after a block of {BLOCK} was touched and freed"
    );
    assert!(!block_resident(q));
    assert_eq!(heap.trim(), 0, "a second trim gave back memory again");
    // Split off memory given back: the rest is not given back again.
    let r = pages.alloc_pages(ORDER).unwrap();
    assert_eq!(
        heap.trim(),
        0,
        "trim gave back the rest of a block split off memory given back"
    );
    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(r, ORDER) };
    assert_eq!(pages.check_invariants(), Ok(()));
}

/// Resident pages of `[from, from + len)` (page-aligned, inside a mapping
/// of the heap's).
fn resident_pages(from: usize, len: usize) -> usize {
    let mut v = vec![0u8; len / PAGE_SIZE];
    // SAFETY: as in `resident`, one byte per page of the range.
    let r = unsafe { libc::mincore(from as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore");
    v.iter().filter(|&&b| b & 1 != 0).count()
}

/// Eight blocks of `ORDER`, and two of them that are buddies (`x`, `y`),
/// both touched (resident).
fn touched_buddies(
    pages: &anyalloc::PageAllocator,
) -> (Vec<NonNull<u8>>, NonNull<u8>, NonNull<u8>) {
    let all: Vec<NonNull<u8>> = (0..8).map(|_| pages.alloc_pages(ORDER).unwrap()).collect();
    let addrs: Vec<usize> = all.iter().map(|p| p.as_ptr() as usize).collect();
    let x = *all
        .iter()
        .find(|p| addrs.contains(&(p.as_ptr() as usize ^ BLOCK)))
        .unwrap();
    let y = NonNull::new((x.as_ptr() as usize ^ BLOCK) as *mut u8).unwrap();
    // SAFETY: both are live blocks of BLOCK bytes.
    unsafe {
        x.as_ptr().write_bytes(0x5a, BLOCK);
        y.as_ptr().write_bytes(0x5a, BLOCK);
    }
    (all, x, y)
}

/// A touched block freed next to its buddy given back merges with it into
/// a block not given back (part of it is resident), which the next trim
/// gives back whole: only the part that was resident counts in
/// `released_to_os_bytes`. It used to count whole, more than the process's
/// memory went down by (twice here, and up to 4 MiB for a block that merged
/// with given-back or untouched buddies up to the largest order).
#[test]
fn a_block_merged_with_given_back_buddies_counts_only_its_own_pages() {
    let _serial = serial();
    let heap = heap();
    let pages = heap.pages();
    let (all, x, y) = touched_buddies(pages);
    // Nothing else free is resident after this one.
    heap.trim();
    let released = || heap.stats().released_to_os_bytes as usize;
    // The largest block holding both (every page the trims below may give
    // back lies in the free block x and y merge into, inside it).
    let region = x.as_ptr() as usize & !((4 << 20) - 1);
    let resident = || resident_pages(region, 4 << 20) * PAGE_SIZE;

    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(x, ORDER) };
    let (before, counted) = (resident(), released());
    let first = heap.trim();
    let dropped = before - resident();
    assert_eq!(
        (first, dropped),
        (BLOCK, BLOCK),
        "x alone: given back, RSS drop"
    );
    assert_eq!(released() - counted, dropped);

    // SAFETY: allocated above with ORDER, freed once.
    unsafe { pages.free_pages(y, ORDER) };
    assert!(block_resident(y) && !block_resident(x));
    let (before, counted) = (resident(), released());
    let second = heap.trim();
    let dropped = before - resident();
    assert!(!block_resident(y), "y was not given back");
    assert_eq!(dropped, BLOCK, "the trim's RSS drop in the region");
    assert_eq!(
        released() - counted,
        dropped,
        "released_to_os_bytes went up by more than the memory given back (trim returned {second})"
    );
    assert_eq!(second, dropped);
    for p in all.into_iter().filter(|&p| p != x && p != y) {
        // SAFETY: allocated above with ORDER, freed once.
        unsafe { pages.free_pages(p, ORDER) };
    }
    assert_eq!(pages.check_invariants(), Ok(()));
}

#[cfg(feature = "interrupt-points")]
mod window {
    //! A free of the buddy of a block being given back, inside the release
    //! window (feature `interrupt-points`): no merge with the `RELEASING`
    //! block; the two merge when it comes back, into a block not given
    //! back (half of it is resident), which the next trim gives back.

    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

    use anyalloc::interrupt::{set_hook, Site};

    use super::*;

    static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
    static BUDDY: AtomicUsize = AtomicUsize::new(0);

    fn hook(site: Site) {
        if site != Site::ReleaseWindow {
            return;
        }
        let p = BUDDY.swap(0, Ordering::Relaxed);
        if p != 0 {
            // SAFETY: set below to a live heap and a block of ORDER it
            // handed out, freed once (here: the nolock path, as from a
            // signal handler, since the thread is inside `trim`).
            unsafe {
                let heap = &*HEAP.load(Ordering::Acquire);
                heap.pages()
                    .free_pages(NonNull::new(p as *mut u8).unwrap(), ORDER);
            }
        }
    }

    #[test]
    fn buddy_freed_inside_the_release_window() {
        let _serial = serial();
        let heap: &'static Heap = Box::leak(Box::new(heap()));
        let pages = heap.pages();
        let (all, x, y) = touched_buddies(pages);
        // SAFETY: allocated with ORDER, freed once.
        unsafe { pages.free_pages(x, ORDER) };
        HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
        BUDDY.store(y.as_ptr() as usize, Ordering::Relaxed);
        set_hook(Some(hook));
        let first = heap.trim();
        set_hook(None);
        assert_eq!(BUDDY.load(Ordering::Relaxed), 0, "the hook did not run");
        assert_eq!(first, BLOCK, "the first trim gave back {first} bytes");
        assert_eq!(pages.check_invariants(), Ok(()));
        assert!(!block_resident(x) && block_resident(y));
        // The merged block is not marked given back: it goes now, and
        // only y's half of it counts (x went back already).
        let second = heap.trim();
        assert_eq!(second, BLOCK, "the second trim gave back {second} bytes");
        assert!(!block_resident(y));
        assert_eq!(heap.trim(), 0);
        for p in all.into_iter().filter(|&p| p != x && p != y) {
            // SAFETY: allocated above with ORDER, freed once.
            unsafe { pages.free_pages(p, ORDER) };
        }
        heap.drain();
        let s = heap.stats();
        assert_eq!(s.pages.free_pages, s.pages.total_pages);
        assert_eq!(pages.check_invariants(), Ok(()));
    }
}

/// The oldest free blocks of a list are the ones just before those given
/// back (a free pushes at the head, stamped with the epoch, which only
/// grows): a pass finds the idle ones there at once, with no walk over the
/// younger ones in front of them. The walk it replaces looked at most 1024
/// entries per order per pass from a cursor: idle blocks behind 2048 young
/// ones of their order went back only two passes late.
#[test]
fn idle_blocks_behind_young_ones_go_back_in_the_first_idle_pass() {
    const SMALL: u32 = 0; // 4 KiB: of the per-CPU orders; freed through a drain
    let _serial = serial();
    let heap = heap();
    let pages = heap.pages();
    let n = 2 * 2048 + 2 * 16;
    let mut all: Vec<NonNull<u8>> = (0..n)
        .map(|_| {
            let p = pages.alloc_pages(SMALL).unwrap();
            // SAFETY: valid for a page.
            unsafe { p.as_ptr().write_bytes(0x5a, PAGE_SIZE) };
            p
        })
        .collect();
    all.sort_by_key(|p| p.as_ptr() as usize);
    let addrs: Vec<usize> = all.iter().map(|p| p.as_ptr() as usize).collect();
    // Upper halves of buddy pairs both allocated: freed, they stay 4 KiB
    // blocks while the lower halves stay allocated.
    let upper: Vec<NonNull<u8>> = all
        .iter()
        .copied()
        .filter(|p| {
            let a = p.as_ptr() as usize;
            a & PAGE_SIZE != 0 && addrs.binary_search(&(a ^ PAGE_SIZE)).is_ok()
        })
        .collect();
    assert!(upper.len() >= 2048 + 16, "{} pairs", upper.len());
    let (old, young) = upper.split_at(16);
    // SAFETY (both loops): allocated above with SMALL, freed once.
    for &p in old {
        unsafe { pages.free_pages(p, SMALL) };
    }
    heap.drain(); // the per-CPU lists' blocks to the buddy lists
    for _ in 0..7 {
        heap.maintain();
    }
    for &p in young {
        // SAFETY: allocated above with this order, freed once.
        unsafe { pages.free_pages(p, SMALL) };
    }
    heap.drain();
    assert!(old.iter().all(|p| resident(p.as_ptr() as usize)));
    // The eighth pass since the old ones were freed: they are idle.
    heap.maintain();
    let still = old.iter().filter(|p| resident(p.as_ptr() as usize)).count();
    assert_eq!(
        still,
        0,
        "{still} of {} idle blocks still resident after the first pass they were idle in",
        old.len()
    );
    assert!(young.iter().all(|p| resident(p.as_ptr() as usize)));
    for p in all.into_iter().filter(|p| !upper.contains(p)) {
        // SAFETY: allocated above with SMALL, freed once.
        unsafe { pages.free_pages(p, SMALL) };
    }
    assert_eq!(pages.check_invariants(), Ok(()));
}
