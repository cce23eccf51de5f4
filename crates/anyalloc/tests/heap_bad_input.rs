//! Bad frees abort with a one-line message from anyalloc.
//!
//! Each scenario runs in a child process under a watchdog (`tests/watchdog`):
//! the test re-executes this test binary with `ANYALLOC_BAD_INPUT=<scenario>`
//! and `--exact <test name>`;
//! in the child the same test function sees the variable and commits the
//! bad free. The parent requires the child to die of `SIGABRT` and its stderr
//! to hold exactly one line from anyalloc, containing the expected words.

mod watchdog;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

use anyalloc::{Config, Heap, PAGE_SIZE};

const VAR: &str = "ANYALLOC_BAD_INPUT";
/// Exit code of a child whose bad free returned instead of aborting.
const SURVIVED: i32 = 42;

/// Runs `bad` in a child process (this test binary, filtered to `test`) and
/// checks that it aborts with one anyalloc line containing `expect`.
fn expect_abort(test: &str, expect: &str, bad: fn()) {
    if std::env::var(VAR).as_deref() == Ok(test) {
        bad();
        // The bad free returned: report it in a way the parent recognises.
        eprintln!("survived: the bad free of {test} returned");
        std::process::exit(SURVIVED);
    }
    // A watchdog, not a timing assertion: a bad free that corrupts a list
    // could make the child loop forever instead of aborting.
    let out = watchdog::run(test, &[(VAR, test)], Duration::from_secs(60), test);
    let line = watchdog::assert_aborted_with(&out, test, expect);
    println!("{test}: aborted with: {line}");
}

/// A fresh heap with one CPU slot set (every free goes to the same sheaf,
/// whatever CPU the thread runs on), leaked: the child dies anyway.
fn heap() -> &'static Heap {
    Box::leak(Box::new(
        Heap::new(Config::default().memory(16 << 20).cpus(1)).unwrap(),
    ))
}

fn alloc(h: &Heap, size: usize) -> NonNull<u8> {
    h.alloc(Layout::from_size_align(size, 8).unwrap()).unwrap()
}

/// Frees `p` on `h` (the bad free under test).
fn free(h: &Heap, p: NonNull<u8>) {
    // SAFETY: deliberately violated by the scenarios: the heap must detect
    // the violation and abort before touching anything.
    unsafe { h.free(p) }
}

fn free_nolock(h: &Heap, p: NonNull<u8>) {
    // SAFETY: as in `free`.
    unsafe { h.free_nolock(p) }
}

fn offset(p: NonNull<u8>, by: usize) -> NonNull<u8> {
    NonNull::new(p.as_ptr().wrapping_add(by)).unwrap()
}

/// Allocates `size` bytes from a fresh heap and frees the block twice (the
/// bad input).
fn free_twice(size: usize) {
    let h = heap();
    let p = alloc(h, size);
    free(h, p);
    free(h, p);
}

#[test]
fn free_of_a_stack_address_aborts() {
    expect_abort("free_of_a_stack_address_aborts", "outside the heap", || {
        let h = heap();
        let _warm = alloc(h, 64);
        let mut local = [0u64; 4];
        free(h, NonNull::from(&mut local).cast());
    });
}

#[test]
fn nolock_free_of_a_stack_address_aborts() {
    expect_abort(
        "nolock_free_of_a_stack_address_aborts",
        "outside the heap",
        || {
            let h = heap();
            let mut local = [0u64; 4];
            free_nolock(h, NonNull::from(&mut local).cast());
        },
    );
}

#[test]
fn interior_pointer_into_a_small_object_aborts() {
    expect_abort(
        "interior_pointer_into_a_small_object_aborts",
        "not the start of an object (interior pointer into a 64-byte object)",
        || {
            let h = heap();
            let p = alloc(h, 64);
            free(h, offset(p, 1));
        },
    );
}

#[test]
fn word_aligned_interior_pointer_into_a_small_object_aborts() {
    expect_abort(
        "word_aligned_interior_pointer_into_a_small_object_aborts",
        "interior pointer into a 64-byte object",
        || {
            let h = heap();
            let p = alloc(h, 64);
            free_nolock(h, offset(p, 8));
        },
    );
}

/// The object-start test has two forms: a power-of-two class's mask alone,
/// and the other classes' multiplication. A pointer at a multiple of a
/// smaller power of two inside the object passes neither.
#[test]
fn aligned_interior_pointer_into_a_power_of_two_object_aborts() {
    expect_abort(
        "aligned_interior_pointer_into_a_power_of_two_object_aborts",
        "interior pointer into a 128-byte object",
        || {
            let h = heap();
            let l = Layout::from_size_align(128, 8).unwrap();
            let p = h.alloc(l).expect("memory");
            // SAFETY: the bad input: not a pointer the heap handed out.
            unsafe { h.free_sized(offset(p, 64), l) };
        },
    );
}

/// See `aligned_interior_pointer_into_a_power_of_two_object_aborts`: a
/// 48-byte object at 16 bytes in (a multiple of its alignment).
#[test]
fn aligned_interior_pointer_into_an_object_of_another_size_aborts() {
    expect_abort(
        "aligned_interior_pointer_into_an_object_of_another_size_aborts",
        "interior pointer into a 48-byte object",
        || {
            let h = heap();
            let p = alloc(h, 48);
            free(h, offset(p, 16));
        },
    );
}

#[test]
fn interior_pointer_into_a_large_allocation_aborts() {
    expect_abort(
        "interior_pointer_into_a_large_allocation_aborts",
        "not a live object",
        || {
            let h = heap();
            let p = alloc(h, 16 << 10);
            assert_eq!(h.usable_size(p), 16 << 10);
            free(h, offset(p, PAGE_SIZE));
        },
    );
}

#[test]
fn unaligned_pointer_into_a_large_allocation_aborts() {
    expect_abort(
        "unaligned_pointer_into_a_large_allocation_aborts",
        "not a live object",
        || {
            let h = heap();
            let p = alloc(h, 16 << 10);
            free(h, offset(p, 8));
        },
    );
}

/// A block of the heap's page allocator handed to the heap's free: the
/// report names it as such (it said "double free or interior pointer?").
#[test]
fn free_of_a_page_no_cache_owns_aborts() {
    expect_abort(
        "free_of_a_page_no_cache_owns_aborts",
        "which is a block of the heap's page allocator that no cache owns",
        || {
            let h = heap();
            let page = h.pages().alloc_pages(0).unwrap();
            free(h, page);
        },
    );
}

/// The same through the nolock sized free, for a block of several pages.
#[test]
fn sized_nolock_free_of_a_page_block_aborts() {
    expect_abort(
        "sized_nolock_free_of_a_page_block_aborts",
        "which is a block of the heap's page allocator that no cache owns",
        || {
            let h = heap();
            let block = h.pages().alloc_pages_nolock(2).unwrap();
            // SAFETY: deliberately violated: the block is the page
            // allocator's, not the heap's.
            unsafe { h.free_nolock_sized(block, Layout::from_size_align(16 << 10, 8).unwrap()) };
        },
    );
}

/// An interior page of such a block is an interior pointer, not named as
/// a page block.
#[test]
fn free_of_an_interior_page_of_a_page_block_aborts() {
    expect_abort(
        "free_of_an_interior_page_of_a_page_block_aborts",
        "its page is not owned by a cache",
        || {
            let h = heap();
            let block = h.pages().alloc_pages(1).unwrap();
            free(h, offset(block, PAGE_SIZE));
        },
    );
}

/// The other way round: a page of the heap's own (here a one-page slab of
/// 64-byte objects, allocated with the right order) handed to its page
/// allocator's public free. Accepted, the page would go onto a free list
/// while the heap still hands out its objects.
#[test]
fn page_free_of_a_slab_page_aborts() {
    expect_abort("page_free_of_a_slab_page_aborts", "page free of 0x", || {
        let h = heap();
        let p = alloc(h, 64);
        let page = (p.as_ptr() as usize) & !(PAGE_SIZE - 1);
        // SAFETY: deliberately violated: the page is the heap's slab.
        unsafe {
            h.pages()
                .free_pages(NonNull::new(page as *mut u8).unwrap(), 0)
        };
    });
}

/// The same for a large block (16 KiB, order 2: its exact order and
/// address) and the nolock page free.
#[test]
fn nolock_page_free_of_a_large_block_aborts() {
    expect_abort(
        "nolock_page_free_of_a_large_block_aborts",
        "which a heap owns (a slab or a large allocation",
        || {
            let h = heap();
            let p = alloc(h, 16 << 10);
            // SAFETY: deliberately violated: the block is the heap's.
            unsafe { h.pages().free_pages_nolock(p, 2) };
        },
    );
}

#[test]
fn immediate_double_free_of_a_small_object_aborts() {
    expect_abort(
        "immediate_double_free_of_a_small_object_aborts",
        "double free of object",
        || free_twice(64),
    );
}

#[test]
fn immediate_nolock_double_free_of_a_small_object_aborts() {
    expect_abort(
        "immediate_nolock_double_free_of_a_small_object_aborts",
        "double free of object",
        || {
            let h = heap();
            let p = alloc(h, 24);
            free_nolock(h, p);
            free_nolock(h, p);
        },
    );
}

#[test]
fn double_free_of_a_large_allocation_aborts() {
    expect_abort(
        "double_free_of_a_large_allocation_aborts",
        "a block of pages freed already (double free?)",
        || free_twice(16 << 10),
    );
}

/// A 64 KiB block waits on a per-CPU list after its first free (with
/// rseq): the second free finds it free, and says so.
#[test]
fn double_free_of_a_64_kib_block_aborts() {
    expect_abort(
        "double_free_of_a_64_kib_block_aborts",
        "a block of pages freed already (double free?)",
        || free_twice(64 << 10),
    );
}

#[test]
fn double_free_of_a_huge_allocation_aborts() {
    expect_abort(
        "double_free_of_a_huge_allocation_aborts",
        "outside the heap's memory (a foreign pointer, or a block above 4 MiB freed already?)",
        || {
            let h = heap();
            let p = alloc(h, 5 << 20);
            assert!(h.stats().huge_in_use == 1);
            free(h, p);
            free(h, p);
        },
    );
}

/// A heap grown past its first zone (1 MiB, used up by pages held through
/// its page allocator), and a block of `size` bytes allocated after the
/// growth, checked to lie outside the first zone's 4 MiB granule (a grown
/// zone is a reservation of its own, 4 MiB-aligned): the bad frees of a
/// grown zone's memory, which a lookup through the zone map finds. A CPU
/// slot set per possible CPU: the restartable fast paths, where the
/// platform offers them (the grown zones' own per-CPU lists).
fn alloc_in_grown_zone(size: usize) -> (&'static Heap, NonNull<u8>) {
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(Config::default().memory(1 << 20)).unwrap(),
    ));
    let first = h.pages().alloc_pages(0).unwrap().as_ptr() as usize >> 22;
    while h.stats().pages.zones < 2 {
        h.pages().alloc_pages(0).expect("the heap grows");
    }
    let p = alloc(h, size);
    assert_ne!(
        p.as_ptr() as usize >> 22,
        first,
        "the block is in the first zone"
    );
    (h, p)
}

#[test]
fn double_free_of_an_object_in_a_grown_zone_aborts() {
    expect_abort(
        "double_free_of_an_object_in_a_grown_zone_aborts",
        "double free of object",
        || {
            let (h, p) = alloc_in_grown_zone(64);
            let layout = Layout::from_size_align(64, 8).unwrap();
            // SAFETY: the second free is the bad input under test.
            unsafe {
                h.free_sized(p, layout);
                h.free_sized(p, layout);
            }
        },
    );
}

#[test]
fn double_free_of_a_tiny_object_in_a_grown_zone_aborts() {
    expect_abort(
        "double_free_of_a_tiny_object_in_a_grown_zone_aborts",
        "double free of object",
        || {
            let (h, p) = alloc_in_grown_zone(8);
            free(h, p);
            free(h, p);
        },
    );
}

#[test]
fn interior_pointer_into_an_object_in_a_grown_zone_aborts() {
    expect_abort(
        "interior_pointer_into_an_object_in_a_grown_zone_aborts",
        "interior pointer into a 64-byte object",
        || {
            let (h, p) = alloc_in_grown_zone(64);
            let layout = Layout::from_size_align(64, 8).unwrap();
            // SAFETY: deliberately not the start of the object.
            unsafe { h.free_sized(offset(p, 16), layout) };
        },
    );
}

#[test]
fn double_free_of_a_page_block_in_a_grown_zone_aborts() {
    expect_abort(
        "double_free_of_a_page_block_in_a_grown_zone_aborts",
        "a block of pages freed already (double free?)",
        || {
            let (h, p) = alloc_in_grown_zone(16 << 10);
            free_nolock(h, p);
            free_nolock(h, p);
        },
    );
}

/// The heap's 64 KiB blocks of a grown zone go onto that zone's per-CPU
/// list (`free_large_grown`, rseq): the second free still fails its claim.
#[test]
fn double_free_of_a_64_kib_block_in_a_grown_zone_aborts() {
    expect_abort(
        "double_free_of_a_64_kib_block_in_a_grown_zone_aborts",
        "a block of pages freed already (double free?)",
        || {
            let (h, p) = alloc_in_grown_zone(64 << 10);
            let layout = Layout::from_size_align(64 << 10, 8).unwrap();
            // SAFETY: the second free is the bad input under test.
            unsafe {
                h.free_sized(p, layout);
                h.free_sized(p, layout);
            }
        },
    );
}

/// A heap whose huge table has every entry removed (`TOMB`): huge blocks
/// until the table is full (reserved, never touched), all freed again.
fn heap_with_a_table_of_tombs() -> &'static Heap {
    let h = heap();
    let filler = Layout::from_size_align((4 << 20) + PAGE_SIZE, 8).unwrap();
    let mut blocks = Vec::new();
    while let Some(p) = h.alloc(filler) {
        blocks.push(p);
        assert!(blocks.len() <= 100_000, "the huge table never filled");
    }
    for p in blocks {
        // SAFETY: live allocations of this heap, freed once.
        unsafe { h.free(p) };
    }
    assert_eq!(h.stats().huge_in_use, 0);
    h
}

/// `NonNull::dangling()` (address 1, an empty `Vec<u8>`'s pointer) is no
/// block of the heap, though 1 is the huge table's mark of a removed entry:
/// a free of it must not take such an entry for a huge block (it did: the
/// free returned, having unmapped nothing and uncounted a huge block).
#[test]
fn free_of_a_dangling_pointer_aborts() {
    expect_abort(
        "free_of_a_dangling_pointer_aborts",
        "free of 0x1, which is outside the heap's memory",
        || {
            let h = heap_with_a_table_of_tombs();
            free(h, NonNull::dangling());
        },
    );
}

/// As above, for `usable_size` (it returned a removed block's size).
#[test]
fn usable_size_of_a_dangling_pointer_aborts() {
    expect_abort(
        "usable_size_of_a_dangling_pointer_aborts",
        "usable_size of 0x1, which is outside the heap's memory",
        || {
            let h = heap_with_a_table_of_tombs();
            usable(h, NonNull::dangling());
        },
    );
}

// ----- slots of a slab never handed out ---------------------------------------

/// A slot carved from its slab into a sheaf (the refill after the first
/// allocation takes the slab's next objects) but never handed out: free,
/// so a free of it is a double free (it used to be taken, and the slot
/// was then handed out twice).
#[test]
fn free_of_a_slot_waiting_in_a_sheaf_aborts() {
    expect_abort(
        "free_of_a_slot_waiting_in_a_sheaf_aborts",
        "double free of object",
        || {
            let h = heap();
            let p = alloc(h, 64);
            free(h, offset(p, 64 * 5));
        },
    );
}

#[test]
fn sized_nolock_free_of_a_slot_waiting_in_a_sheaf_aborts() {
    expect_abort(
        "sized_nolock_free_of_a_slot_waiting_in_a_sheaf_aborts",
        "double free of object",
        || {
            let h = heap();
            let p = alloc(h, 64);
            // SAFETY: deliberately violated, as in `free`.
            unsafe {
                h.free_nolock_sized(offset(p, 64 * 5), Layout::from_size_align(64, 8).unwrap())
            };
        },
    );
}

// ----- usable_size of a block that is not live --------------------------------

/// Returns the usable size of `p` (the bad input under test).
fn usable(h: &Heap, p: NonNull<u8>) {
    println!("usable_size = {}", h.usable_size(p));
}

/// A freed small object is caught as a double free of it would be (its key
/// word says "free"), and the message names `usable_size`.
#[test]
fn usable_size_of_a_freed_small_object_aborts() {
    expect_abort(
        "usable_size_of_a_freed_small_object_aborts",
        "usable_size of 0x",
        || {
            let h = heap();
            let (a, _b) = (alloc(h, 64), alloc(h, 64));
            free(h, a);
            usable(h, a);
        },
    );
}

/// The same for a tiny object (its key word is its first word, the link)
/// back on its slab's free list.
#[test]
fn usable_size_of_a_freed_8_byte_object_on_its_slab_aborts() {
    expect_abort(
        "usable_size_of_a_freed_8_byte_object_on_its_slab_aborts",
        "which is a freed object",
        || {
            let h = heap();
            let objs = allocs(h, 8, 3);
            free(h, objs[0]);
            free(h, objs[1]);
            h.drain();
            usable(h, objs[1]);
        },
    );
}

#[test]
fn usable_size_of_a_freed_large_block_aborts() {
    expect_abort(
        "usable_size_of_a_freed_large_block_aborts",
        "usable_size of 0x",
        || {
            let h = heap();
            let p = alloc(h, 64 << 10);
            free(h, p);
            usable(h, p);
        },
    );
}

#[test]
fn usable_size_of_an_interior_pointer_aborts() {
    expect_abort(
        "usable_size_of_an_interior_pointer_aborts",
        "usable_size of 0x",
        || {
            let h = heap();
            let p = alloc(h, 64);
            usable(h, offset(p, 8));
        },
    );
}

/// A live object whose key word happens to hold the key (user data) is not
/// reported: the exact search finds it nowhere free.
#[test]
fn usable_size_of_a_live_object_holding_the_key_is_its_size() {
    let h = Heap::new(Config::default().memory(16 << 20).cpus(1)).unwrap();
    for size in [8, 12, 64, 1000] {
        let probe = alloc(&h, size);
        free(&h, probe);
        let off = if size >= 16 { 8 } else { 0 };
        // SAFETY: reading a freed object of our own heap: mapped memory.
        let key = unsafe { probe.as_ptr().add(off).cast::<usize>().read_unaligned() };
        let p = alloc(&h, size);
        // SAFETY: `p` is live and at least off + 8 bytes long.
        unsafe { p.as_ptr().add(off).cast::<usize>().write_unaligned(key) };
        assert!(h.usable_size(p) >= size);
        free(&h, p);
    }
}

/// With `debug-checks`, every object has an allocation bit: a double free
/// is caught even when the object is no longer on top of a sheaf.
#[cfg(feature = "debug-checks")]
#[test]
fn non_immediate_double_free_aborts_with_debug_checks() {
    expect_abort(
        "non_immediate_double_free_aborts_with_debug_checks",
        "double free of object",
        || {
            let h = heap();
            let a = alloc(h, 64);
            let b = alloc(h, 64);
            free(h, a);
            free(h, b);
            free(h, a);
        },
    );
}

// ----- double frees of objects, wherever the freed object sits (every build) --

/// `n` objects of `size` bytes.
fn allocs(h: &Heap, size: usize, n: usize) -> Vec<NonNull<u8>> {
    (0..n).map(|_| alloc(h, size)).collect()
}

#[test]
fn double_free_of_an_object_in_the_main_sheaf_aborts() {
    expect_abort(
        "double_free_of_an_object_in_the_main_sheaf_aborts",
        "double free of object",
        || {
            let h = heap();
            let (a, b) = (alloc(h, 64), alloc(h, 64));
            free(h, a);
            free(h, b);
            free(h, a); // a is in the main sheaf, below b
        },
    );
}

#[test]
fn nolock_double_free_of_an_object_in_the_main_sheaf_aborts() {
    expect_abort(
        "nolock_double_free_of_an_object_in_the_main_sheaf_aborts",
        "double free of object",
        || {
            let h = heap();
            let (a, b) = (alloc(h, 100), alloc(h, 100));
            free_nolock(h, a);
            free_nolock(h, b);
            free_nolock(h, a);
        },
    );
}

#[test]
fn double_free_of_an_8_byte_object_aborts() {
    expect_abort(
        "double_free_of_an_8_byte_object_aborts",
        "double free of object",
        || {
            let h = heap();
            let (a, b) = (alloc(h, 8), alloc(h, 8));
            free(h, a);
            free(h, b);
            free_nolock(h, a);
        },
    );
}

#[test]
fn double_free_of_an_object_in_the_spare_sheaf_aborts() {
    expect_abort(
        "double_free_of_an_object_in_the_spare_sheaf_aborts",
        "double free of object",
        || {
            let h = heap();
            let class = |h: &Heap| h.stats().classes[10];
            let cap = class(h).sheaf_capacity;
            let objs = allocs(h, 64, cap + 40);
            // What the allocations left in main (a fresh heap's spare holds
            // none): a and `cap - left - 1` more fill main, and the next
            // free swaps main to spare.
            let left = class(h).cached_in_sheaves;
            assert!(left < cap, "main is not full after allocating");
            for &p in &objs[..cap - left + 1] {
                free(h, p);
            }
            let now = class(h);
            assert_eq!(
                (now.cached_in_sheaves, now.cached_in_barn),
                (cap + 1, 0),
                "a's sheaf full in the spare, one object in main"
            );
            free(h, objs[0]);
        },
    );
}

#[test]
fn double_free_of_an_object_in_the_barn_aborts() {
    expect_abort(
        "double_free_of_an_object_in_the_barn_aborts",
        "double free of object",
        || {
            let h = heap();
            let cap = h.stats().classes[10].sheaf_capacity;
            let objs = allocs(h, 64, 2 * cap + 40);
            let a = objs[2 * cap + 39];
            // The first of these frees fill main (which kept fewer than
            // `cap` objects from the allocations), the next one swaps it to
            // spare; then a and the frees after it fill main again, and a
            // free trades that full main (with a in it), and the full spare,
            // for empty barn sheaves.
            for &p in &objs[..cap + 1] {
                free(h, p);
            }
            free(h, a);
            for &p in &objs[cap + 1..2 * cap + 1] {
                free(h, p);
            }
            assert_eq!(
                h.stats().classes[10].cached_in_barn,
                2 * cap,
                "a's sheaf (and the spare) in the barn"
            );
            free(h, a);
        },
    );
}

#[test]
fn double_free_of_an_object_on_its_slab_free_list_aborts() {
    expect_abort(
        "double_free_of_an_object_on_its_slab_free_list_aborts",
        "double free of object",
        || {
            let h = heap();
            let (a, _keeps_the_slab) = (alloc(h, 64), alloc(h, 64));
            free(h, a);
            h.drain(); // a goes back to its slab's free list
            assert_eq!(h.stats().classes[10].cached_in_sheaves, 0);
            free_nolock(h, a);
        },
    );
}

#[test]
fn double_free_of_an_8_byte_object_on_its_slab_free_list_aborts() {
    expect_abort(
        "double_free_of_an_8_byte_object_on_its_slab_free_list_aborts",
        "double free of object",
        || {
            let h = heap();
            let objs = allocs(h, 8, 3);
            free(h, objs[0]);
            free(h, objs[1]);
            h.drain(); // both on the free list: objs[1] links to objs[0]
            free(h, objs[1]);
        },
    );
}

/// A tiny object in the middle of its slab's free list: its first word is
/// the link to another free object (XOR the key), not the key, so only the
/// tiny classes' link test (the quick one, then the full one) makes the free
/// search for it. (The test above may free the list's tail, whose link is 0
/// and so reads as the key itself, whichever order the drain returns its
/// objects in.)
#[test]
fn double_free_of_a_linked_8_byte_object_on_its_slab_free_list_aborts() {
    expect_abort(
        "double_free_of_a_linked_8_byte_object_on_its_slab_free_list_aborts",
        "double free of object",
        || {
            let h = heap();
            let objs = allocs(h, 8, 4);
            for &p in &objs[..3] {
                free(h, p);
            }
            h.drain(); // all three on the free list (objs[3] keeps the slab)
            assert_eq!(h.stats().classes[0].cached_in_sheaves, 0);
            // objs[1] is neither the head nor the tail: it links to another.
            free(h, objs[1]);
        },
    );
}

/// User data equal to the key is not a double free: the exact check finds
/// the object nowhere free, and the free goes through.
///
/// In a child of its own: the other tests of this binary fork (their
/// children), and a nolock free during another thread's fork parks its
/// object, which a drain during the fork leaves parked, so the final count
/// would see it (CI saw `objects_in_use` 4).
#[test]
fn user_data_equal_to_the_key_is_not_a_double_free() {
    const NAME: &str = "user_data_equal_to_the_key_is_not_a_double_free";
    if !watchdog::in_child() {
        watchdog::run_ok(NAME, &[], Duration::from_secs(60), NAME);
        return;
    }
    let h = Heap::new(Config::default().memory(16 << 20).cpus(1)).unwrap();
    for size in [8, 12, 64, 1000] {
        // Read the key word of a freed object (its memory stays mapped).
        let probe = alloc(&h, size);
        free(&h, probe);
        let off = if size >= 16 { 8 } else { 0 };
        // SAFETY: reading a freed object of our own heap: mapped memory.
        let key = unsafe { probe.as_ptr().add(off).cast::<usize>().read_unaligned() };
        let p = alloc(&h, size);
        // SAFETY: `p` is live and at least off + 8 bytes long.
        unsafe { p.as_ptr().add(off).cast::<usize>().write_unaligned(key) };
        free(&h, p); // must not abort
        let q = alloc(&h, size);
        // SAFETY: as above; a tiny object's first word as a heap address.
        unsafe {
            q.as_ptr()
                .cast::<usize>()
                .write_unaligned(key ^ (probe.as_ptr() as usize))
        };
        free_nolock(&h, q);
    }
    h.drain();
    let s = h.stats();
    assert_eq!(s.objects_in_use, 0);
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
}

/// A nolock free parked on the deferred stack (every level slot and the
/// node lock held by the contexts below it, reached with interrupt points),
/// then freed again by the normal path once the handlers have returned. The
/// nested allocations, finding the node lock held, take objects off the
/// deferred stack when they return (a sheaf's worth at most, plus one
/// each), so the victim is freed first and enough decoys after it that it
/// stays below what they take.
#[cfg(feature = "interrupt-points")]
#[test]
fn double_free_of_an_object_on_the_deferred_stack_aborts() {
    expect_abort(
        "double_free_of_an_object_on_the_deferred_stack_aborts",
        "double free of object",
        || deferred_victim_then(Then::FreeAfter),
    );
}

/// A nolock free parked on the deferred stack (as above), its object then
/// written over (a use after free by the code the handler interrupted):
/// the drain that follows the stack's links reports it instead of
/// following a link to wherever the write pointed.
#[cfg(feature = "interrupt-points")]
#[test]
fn write_over_a_deferred_object_aborts_at_the_drain() {
    expect_abort(
        "write_over_a_deferred_object_aborts_at_the_drain",
        "was written to",
        || deferred_victim_then(Then::Scribble),
    );
}

/// The same victim freed again by the innermost handler itself, while every
/// lock is still held: the second free cannot drain the deferred stack or
/// take the node lock, so only the exact check's walk of the deferred stack
/// can find the victim (the test above is also caught once the normal free
/// has drained the stack into a sheaf).
#[cfg(feature = "interrupt-points")]
#[test]
fn double_free_in_a_handler_of_an_object_on_the_deferred_stack_aborts() {
    expect_abort(
        "double_free_in_a_handler_of_an_object_on_the_deferred_stack_aborts",
        "double free of object",
        || deferred_victim_then(Then::FreeInHandler),
    );
}

/// What `deferred_victim_then` does with the victim.
#[cfg(feature = "interrupt-points")]
#[derive(PartialEq)]
enum Then {
    /// Frees it again from the innermost handler.
    FreeInHandler,
    /// Frees it again from the driver, once the handlers have returned.
    FreeAfter,
    /// Writes over the first word of the victim and every decoy (some are
    /// still deferred), then drains.
    Scribble,
}

/// The scenario of the tests above: parks a victim and decoys on the
/// deferred stack from a handler nested three deep, then does `then`.
#[cfg(feature = "interrupt-points")]
fn deferred_victim_then(then: Then) {
    let in_handler = then == Then::FreeInHandler;
    use anyalloc::interrupt::{set_hook, Site};
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
    static H: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
    static VICTIM: AtomicUsize = AtomicUsize::new(0);
    static STAGE: AtomicUsize = AtomicUsize::new(0);
    static IN_HANDLER: AtomicBool = AtomicBool::new(false);
    /// Objects freed after the victim, in the same handler.
    static DECOYS: [AtomicUsize; 512] = [const { AtomicUsize::new(0) }; 512];
    fn hook(site: Site) {
        // SAFETY: set before the hook is installed, leaked.
        let h = unsafe { &*H.load(Ordering::Relaxed) };
        let l = Layout::from_size_align(64, 8).unwrap();
        match (STAGE.load(Ordering::Relaxed), site) {
            // The driver refills from the slabs (level-0 slot and node lock
            // held); a handler allocates (level 1), a nested one allocates
            // (level 2) ...
            (0, Site::SheafRefill) | (1, Site::SheafAlloc) => {
                STAGE.fetch_add(1, Ordering::Relaxed);
                let _ = h.alloc_nolock(l);
            }
            // ... and a third frees the victim: every lock is held.
            (2, Site::SheafAlloc) => {
                STAGE.store(3, Ordering::Relaxed);
                let v = NonNull::new(VICTIM.swap(0, Ordering::Relaxed) as *mut u8).unwrap();
                let before = h.stats().nolock_free_deferred;
                free_nolock(h, v);
                assert_eq!(h.stats().nolock_free_deferred, before + 1, "deferred");
                let mut decoys = 0;
                for d in &DECOYS {
                    let d = d.swap(0, Ordering::Relaxed) as *mut u8;
                    if let Some(d) = NonNull::new(d) {
                        free_nolock(h, d);
                        decoys += 1;
                    }
                }
                assert_eq!(
                    h.stats().nolock_free_deferred,
                    before + 1 + decoys,
                    "decoys deferred"
                );
                if IN_HANDLER.load(Ordering::Relaxed) {
                    assert!(
                        h.stats().classes[10].deferred as u64 > decoys,
                        "victim deferred"
                    );
                    free_nolock(h, v);
                    // It returned: what the driver does next could catch
                    // the victim some other way, so stop here.
                    eprintln!("survived: the second free in the handler returned");
                    std::process::exit(SURVIVED);
                }
            }
            _ => {}
        }
    }
    // No maintainer: it would drain the deferred victim before the check
    // below (a wake is owed after every deferred free).
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(16 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .unwrap(),
    ));
    H.store(h as *const Heap as *mut Heap, Ordering::Relaxed);
    IN_HANDLER.store(in_handler, Ordering::Relaxed);
    let cap = h.stats().classes[10].sheaf_capacity;
    let victim = allocs(h, 64, 1)[0];
    VICTIM.store(victim.as_ptr() as usize, Ordering::Relaxed);
    // Two nested allocations each take one object and may fill a main
    // sheaf (`cap`): more than that above the victim.
    let decoys = allocs(h, 64, 2 * cap + 4);
    assert!(decoys.len() <= DECOYS.len());
    for (d, p) in DECOYS.iter().zip(&decoys) {
        d.store(p.as_ptr() as usize, Ordering::Relaxed);
    }
    // The class's sheaves and barn back to the slabs: the next allocation
    // refills from them, and the hook's chain runs inside.
    h.drain();
    set_hook(Some(hook));
    // (Kept: its normal free would drain the deferred stack.)
    let _refilled = allocs(h, 64, 1);
    set_hook(None);
    assert_eq!(STAGE.load(Ordering::Relaxed), 3, "the chain ran");
    // The victim and the decoys the nested allocations left there.
    assert!(h.stats().classes[10].deferred >= 1, "nothing deferred");
    if then == Then::Scribble {
        scribble(victim, 0);
        for d in &decoys {
            scribble(*d, 0);
        }
        h.drain();
    } else {
        free(h, victim);
    }
}

/// Allocates through `Global` with `size` bytes aligned to `align` and
/// frees the block twice with that layout (the bad input).
fn double_free_through_global(size: usize, align: usize) {
    use std::alloc::GlobalAlloc;
    let l = Layout::from_size_align(size, align).unwrap();
    // SAFETY: a non-zero size; the second free is the bad input.
    unsafe {
        let p = anyalloc::Global.alloc(l);
        assert!(!p.is_null());
        anyalloc::Global.dealloc(p, l);
        anyalloc::Global.dealloc(p, l);
    }
}

/// `Global::dealloc` with the layout that allocated, twice: the fast path
/// the layout names catches it.
#[test]
fn double_free_through_global_aborts() {
    expect_abort(
        "double_free_through_global_aborts",
        "double free of object",
        || double_free_through_global(64, 8),
    );
}

/// The same with a layout whose size names another class than the one that
/// serves it (12 bytes aligned to 8: the 16-byte class): the layout-blind
/// path catches it.
#[test]
fn double_free_through_global_with_a_layout_of_another_class_aborts() {
    expect_abort(
        "double_free_through_global_with_a_layout_of_another_class_aborts",
        "double free of object",
        || double_free_through_global(12, 8),
    );
}

/// Allocates `size` bytes aligned to `align` from a fresh heap and frees
/// the block twice with `free_sized` (or `free_nolock_sized`), the second
/// time with `second` bytes as the layout's size (the bad input).
fn free_sized_twice(size: usize, align: usize, second: usize, nolock: bool) {
    let h = heap();
    let l = Layout::from_size_align(size, align).unwrap();
    let l2 = Layout::from_size_align(second, align).unwrap();
    let p = h.alloc(l).expect("memory");
    // SAFETY: the first free is valid; the second is the bad input.
    unsafe {
        if nolock {
            h.free_nolock_sized(p, l);
            h.free_nolock_sized(p, l2);
        } else {
            h.free_sized(p, l);
            h.free_sized(p, l2);
        }
    }
}

/// A double free told the right layout: the fast arm's key test catches it.
#[test]
fn double_free_sized_aborts() {
    expect_abort("double_free_sized_aborts", "double free of object", || {
        free_sized_twice(64, 8, 64, false)
    });
}

/// The same for a tiny class (8 bytes, whose key word is the first one):
/// the sized free reaches it through its own arm.
#[test]
fn double_free_sized_of_a_tiny_object_aborts() {
    expect_abort(
        "double_free_sized_of_a_tiny_object_aborts",
        "double free of object",
        || free_sized_twice(8, 8, 8, false),
    );
}

/// The other tiny class (12 bytes, 4-aligned), freed twice by the nolock
/// sized free.
#[test]
fn nolock_double_free_sized_of_a_12_byte_object_aborts() {
    expect_abort(
        "nolock_double_free_sized_of_a_12_byte_object_aborts",
        "double free of object",
        || free_sized_twice(12, 4, 12, true),
    );
}

/// A nolock double free told a layout of another class (the layout-blind
/// path catches it).
#[test]
fn nolock_double_free_sized_with_a_layout_of_another_class_aborts() {
    expect_abort(
        "nolock_double_free_sized_with_a_layout_of_another_class_aborts",
        "double free of object",
        || free_sized_twice(64, 8, 256, true),
    );
}

/// A sized free of a pointer into the middle of an object aborts, whatever
/// the layout says.
#[test]
fn sized_free_of_an_interior_pointer_aborts() {
    expect_abort(
        "sized_free_of_an_interior_pointer_aborts",
        "not the start of an object",
        || {
            let h = heap();
            let l = Layout::from_size_align(64, 8).unwrap();
            let p = h.alloc(l).expect("memory");
            // SAFETY: the bad input: not a pointer the heap handed out.
            unsafe { h.free_sized(offset(p, 8), l) };
        },
    );
}

// ----- writes after free, other heaps, huge blocks --------------------------------

/// Overwrites the first word of freed object `p` (a use after free).
fn scribble(p: NonNull<u8>, value: usize) {
    // SAFETY: the bad input: a write into a freed object of our own heap
    // (its slab stays mapped while another object keeps it).
    unsafe { p.as_ptr().cast::<usize>().write_unaligned(value) };
}

/// Frees two objects of `size` bytes back to their slab's free list,
/// writes `value` over the first word (the list link) of both, then
/// allocates from the slab: the corrupt link must be reported, not followed
/// to wherever it points.
fn uaf_link_then_alloc(size: usize, value: usize) {
    let h = heap();
    let objs = allocs(h, size, 3);
    free(h, objs[0]);
    free(h, objs[1]);
    h.drain(); // both on their slab's free list (objs[2] keeps the slab)
    scribble(objs[0], value);
    scribble(objs[1], value);
    for _ in 0..64 {
        let p = alloc(h, size);
        // Writing the block is what a caller does with it.
        // SAFETY: `p` is `size` bytes, or the corruption went unnoticed.
        unsafe { p.as_ptr().write_bytes(0x5a, size) };
    }
}

#[test]
fn zero_written_over_a_free_list_link_aborts_at_the_next_alloc() {
    expect_abort(
        "zero_written_over_a_free_list_link_aborts_at_the_next_alloc",
        "was written to",
        || uaf_link_then_alloc(64, 0),
    );
}

#[test]
fn data_written_over_a_free_list_link_aborts_at_the_next_alloc() {
    expect_abort(
        "data_written_over_a_free_list_link_aborts_at_the_next_alloc",
        "was written to",
        || uaf_link_then_alloc(64, 0x4141_4141_4141_4141),
    );
}

#[test]
fn zero_written_over_a_free_list_link_of_8_byte_objects_aborts() {
    expect_abort(
        "zero_written_over_a_free_list_link_of_8_byte_objects_aborts",
        "was written to",
        || uaf_link_then_alloc(8, 0),
    );
}

/// `usable_size` of a freed object, whose exact check walks a slab free
/// list through an object whose link a write after free corrupted: the
/// walk reports the corruption instead of following the link.
#[test]
fn freed_check_walking_a_corrupt_free_list_aborts() {
    expect_abort(
        "freed_check_walking_a_corrupt_free_list_aborts",
        "was written to",
        || {
            let h = heap();
            let objs = allocs(h, 64, 8);
            // Two objects of one page (so of one slab), a third keeps it.
            let page = |p: &NonNull<u8>| p.as_ptr() as usize / PAGE_SIZE;
            let (a, rest) = objs.split_first().unwrap();
            let mut same = rest.iter().filter(|p| page(p) == page(a));
            let (b, _keeps_the_slab) = (*same.next().unwrap(), same.next().unwrap());
            free(h, *a);
            h.drain();
            free(h, b);
            h.drain(); // the slab's free list: b first, a further down
            assert_eq!(h.stats().classes[10].cached_in_sheaves, 0);
            scribble(b, 0);
            // Its key says free: the exact check walks the list (as a
            // double free's does, where `debug-checks` has no bit to test).
            usable(h, *a);
        },
    );
}
/// An object freed on another heap than its own, both alive.
#[test]
fn free_of_an_object_of_another_live_heap_aborts() {
    expect_abort(
        "free_of_an_object_of_another_live_heap_aborts",
        "outside the heap",
        || {
            let (a, b) = (heap(), heap());
            let p = alloc(a, 64);
            free(b, p);
        },
    );
}

/// The same for a large block and the nolock free.
#[test]
fn nolock_free_of_a_large_block_of_another_live_heap_aborts() {
    expect_abort(
        "nolock_free_of_a_large_block_of_another_live_heap_aborts",
        "outside the heap",
        || {
            let (a, b) = (heap(), heap());
            let p = alloc(a, 64 << 10);
            free_nolock(b, p);
        },
    );
}

/// The old address of a huge block that `remap_huge` moved is no block.
#[test]
fn free_of_a_huge_block_that_remap_huge_moved_aborts() {
    expect_abort(
        "free_of_a_huge_block_that_remap_huge_moved_aborts",
        "outside the heap",
        || {
            let h = heap();
            let p = alloc(h, 8 << 20);
            // SAFETY: live huge block.
            let q = unsafe { h.remap_huge(p, 64 << 20) }.expect("moved");
            assert_ne!(p, q, "not moved");
            free(h, p);
        },
    );
}

/// `remap_huge` of a freed huge block aborts (it used to return `None`,
/// and the caller copied from the unmapped block).
#[test]
fn remap_huge_of_a_freed_huge_block_aborts() {
    expect_abort(
        "remap_huge_of_a_freed_huge_block_aborts",
        "remap_huge of",
        || {
            let h = heap();
            let p = alloc(h, 8 << 20);
            free(h, p);
            // SAFETY: the bad input.
            let r = unsafe { h.remap_huge(p, 64 << 20) };
            eprintln!("remap_huge of a freed block returned {r:?}");
        },
    );
}

/// `remap_huge` of a foreign pointer aborts as its free would.
#[test]
fn remap_huge_of_a_stack_address_aborts() {
    expect_abort(
        "remap_huge_of_a_stack_address_aborts",
        "remap_huge of",
        || {
            let h = heap();
            let mut x = [0u64; 4];
            // SAFETY: the bad input.
            let r = unsafe { h.remap_huge(NonNull::from(&mut x).cast(), 64 << 20) };
            eprintln!("remap_huge of a stack address returned {r:?}");
        },
    );
}

/// The address just past a huge block.
#[test]
fn free_past_the_end_of_a_huge_block_aborts() {
    expect_abort(
        "free_past_the_end_of_a_huge_block_aborts",
        "outside the heap",
        || {
            let h = heap();
            let p = alloc(h, 8 << 20);
            free(h, offset(p, 8 << 20));
        },
    );
}

/// A page-aligned pointer inside a huge block.
#[test]
fn free_of_an_interior_page_of_a_huge_block_aborts() {
    expect_abort(
        "free_of_an_interior_page_of_a_huge_block_aborts",
        "not the start of a block above 4 MiB (interior pointer)",
        || {
            let h = heap();
            let p = alloc(h, 8 << 20);
            free(h, offset(p, PAGE_SIZE));
        },
    );
}

/// A large block freed again once the drain merged it with its buddy.
#[test]
fn double_free_of_a_large_block_merged_with_its_buddy_aborts() {
    expect_abort(
        "double_free_of_a_large_block_merged_with_its_buddy_aborts",
        "double free",
        || {
            let h = heap();
            let a = alloc(h, 16 << 10);
            let b = alloc(h, 16 << 10);
            free(h, a);
            free(h, b);
            h.drain();
            free(h, a);
        },
    );
}

/// A large block freed again while it waits on a per-CPU page list.
#[test]
fn double_free_of_a_large_block_on_a_per_cpu_list_aborts() {
    expect_abort(
        "double_free_of_a_large_block_on_a_per_cpu_list_aborts",
        "freed already (double free?)",
        || {
            let h = heap();
            let a = alloc(h, 16 << 10);
            free(h, a);
            free_nolock(h, a);
        },
    );
}

/// `remap_huge` of a freed small object aborts (a live one gets `None`).
#[test]
fn remap_huge_of_a_freed_small_object_aborts() {
    expect_abort(
        "remap_huge_of_a_freed_small_object_aborts",
        "remap_huge of",
        || {
            let h = heap();
            let (p, _keeps_the_slab) = (alloc(h, 64), alloc(h, 64));
            // SAFETY: a live object: not huge, so `None`, and still live.
            assert!(unsafe { h.remap_huge(p, 64 << 20) }.is_none());
            free(h, p);
            // SAFETY: the bad input.
            let r = unsafe { h.remap_huge(p, 64 << 20) };
            eprintln!("remap_huge of a freed object returned {r:?}");
        },
    );
}

/// An unaligned pointer into a huge block, to `usable_size`.
#[test]
fn usable_size_of_an_interior_pointer_of_a_huge_block_aborts() {
    expect_abort(
        "usable_size_of_an_interior_pointer_of_a_huge_block_aborts",
        "4 MiB (interior pointer)",
        || {
            let h = heap();
            let p = alloc(h, 8 << 20);
            usable(h, offset(p, (4 << 20) + 24));
        },
    );
}

/// A nolock double free (a handler's) of an object that sits on its slab's
/// free list, made while the interrupted context holds that cache's node
/// lock (here at `PartialLocked`, returning other objects to their slabs):
/// the exact check cannot search the free list, so the object is parked
/// and checked again by the next normal operation. (It went to a sheaf,
/// and was later handed out twice.)
#[cfg(feature = "interrupt-points")]
#[test]
fn nolock_double_free_under_a_held_node_lock_aborts() {
    expect_abort(
        "nolock_double_free_under_a_held_node_lock_aborts",
        "double free of object",
        || nolock_free_under_a_held_node_lock(true),
    );
}

/// The same free of a live object whose key word holds the key (user
/// data): parked, then freed by the next normal operation; nothing is
/// lost, nothing handed out twice. In a child: the scenario installs an
/// interrupt hook.
#[cfg(feature = "interrupt-points")]
#[test]
fn nolock_free_of_a_key_holder_under_a_held_node_lock_is_freed_later() {
    let test = "nolock_free_of_a_key_holder_under_a_held_node_lock_is_freed_later";
    if std::env::var(VAR).as_deref() == Ok(test) {
        nolock_free_under_a_held_node_lock(false);
        return;
    }
    for env in [vec![(VAR, test)], vec![(VAR, test), watchdog::RSEQ_OFF]] {
        watchdog::run_ok(test, &env, Duration::from_secs(60), test);
    }
}

/// A live object holding the key, parked by a nolock free under a held
/// node lock (as above), then freed again by the normal path before any
/// drain looked at it: the exact check finds it parked.
#[cfg(feature = "interrupt-points")]
#[test]
fn free_of_a_parked_suspect_aborts() {
    expect_abort(
        "free_of_a_parked_suspect_aborts",
        "double free of object",
        || {
            let (h, victim) = park_a_key_holder();
            free(h, victim);
        },
    );
}

/// Frees a victim with the nolock free from inside a drain holding the
/// 64-byte class's node lock: a `double` free of an object on its slab's
/// free list, or the only free of a live object holding the key. Then
/// allocates and frees everything, checking that nothing is handed out
/// twice and nothing is lost.
#[cfg(feature = "interrupt-points")]
fn nolock_free_under_a_held_node_lock(double: bool) {
    let (h, _, objs) = nolock_free_in_a_drain(double);
    let again = allocs(h, 64, 200);
    let mut seen = std::collections::HashSet::new();
    for p in &again {
        assert!(seen.insert(p.as_ptr() as usize), "{p:?} handed out twice");
    }
    for p in again.into_iter().chain(objs[3..].iter().copied()) {
        free(h, p);
    }
    // (objs[0] to objs[2] were freed above; `again` may hold them.)
    h.drain();
    let s = h.stats();
    assert_eq!(s.objects_in_use, 0, "every object came back");
    assert_eq!(s.pages.free_pages, s.pages.total_pages);
}

/// A live object holding the key, freed by the nolock free under a held
/// node lock (so parked), and its heap.
#[cfg(feature = "interrupt-points")]
fn park_a_key_holder() -> (&'static Heap, NonNull<u8>) {
    let (h, victim, _) = nolock_free_in_a_drain(false);
    (h, victim)
}

/// The setup of the tests above: returns the heap, the victim and the 8
/// objects allocated (0 to 2 freed, the victim among them).
#[cfg(feature = "interrupt-points")]
fn nolock_free_in_a_drain(double: bool) -> (&'static Heap, NonNull<u8>, Vec<NonNull<u8>>) {
    use anyalloc::interrupt::{set_hook, Site};
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
    static H: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
    static VICTIM: AtomicUsize = AtomicUsize::new(0);
    fn hook(site: Site) {
        if site != Site::PartialLocked {
            return;
        }
        if let Some(v) = NonNull::new(VICTIM.swap(0, Ordering::Relaxed) as *mut u8) {
            // SAFETY: set before the hook is installed, leaked.
            let h = unsafe { &*H.load(Ordering::Relaxed) };
            free_nolock(h, v);
        }
    }
    let h: &'static Heap = Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(16 << 20)
                .cpus(1)
                .maintenance(false),
        )
        .unwrap(),
    ));
    H.store(h as *const Heap as *mut Heap, Ordering::Relaxed);
    let objs = allocs(h, 64, 8);
    free(h, objs[0]);
    h.drain(); // objs[0] on its slab's free list, its key word the key
    assert_eq!(h.stats().classes[10].cached_in_sheaves, 0);
    let victim = if double {
        objs[0]
    } else {
        // SAFETY: reading a freed object of our own heap (mapped memory).
        let key = unsafe { objs[0].as_ptr().add(8).cast::<usize>().read() };
        // SAFETY: a live 64-byte object.
        unsafe { objs[2].as_ptr().add(8).cast::<usize>().write(key) };
        objs[2]
    };
    VICTIM.store(victim.as_ptr() as usize, Ordering::Relaxed);
    free(h, objs[1]);
    set_hook(Some(hook));
    h.drain(); // returns objs[1] with the node lock held: the hook runs
    set_hook(None);
    assert_eq!(VICTIM.load(Ordering::Relaxed), 0, "the hook ran");
    (h, victim, objs)
}

/// A heap for the tiny-class suspect scenarios below: one CPU slot set
/// and no restartable sequences (every free goes to the same sheaves, in
/// the order made), no maintenance thread (it would drain the suspects),
/// leaked.
#[cfg(feature = "interrupt-points")]
fn quiet_heap() -> &'static Heap {
    Box::leak(Box::new(
        Heap::new(
            Config::default()
                .memory(16 << 20)
                .cpus(1)
                .rseq(false)
                .maintenance(false),
        )
        .unwrap(),
    ))
}

/// The victim of the tiny-class scenarios, freed with the nolock free by
/// the hook (as a signal handler would) at the first `site` once armed.
#[cfg(feature = "interrupt-points")]
mod tiny_victim {
    use super::*;
    use anyalloc::interrupt::{set_hook, Site};
    use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

    static H: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
    static VICTIM: AtomicUsize = AtomicUsize::new(0);
    /// 0: disarmed; 1: at `PartialLocked`; 2: at `BarnTrade`.
    static AT: AtomicU8 = AtomicU8::new(0);

    fn hook(site: Site) {
        let at = match AT.load(Ordering::Relaxed) {
            1 => Site::PartialLocked,
            2 => Site::BarnTrade,
            _ => return,
        };
        if site != at {
            return;
        }
        if let Some(v) = NonNull::new(VICTIM.swap(0, Ordering::Relaxed) as *mut u8) {
            AT.store(0, Ordering::Relaxed);
            // SAFETY: set before the hook is installed, leaked.
            let h = unsafe { &*H.load(Ordering::Relaxed) };
            free_nolock(h, v);
        }
    }

    /// Runs `op` with the hook armed to free `victim` (nolock) at `site`
    /// (`PartialLocked` or `BarnTrade`: the node lock or the barn lock
    /// held, so the exact check cannot search), and checks that it ran.
    pub fn free_inside(h: &'static Heap, victim: NonNull<u8>, site: Site, op: impl FnOnce()) {
        H.store(h as *const Heap as *mut Heap, Ordering::Relaxed);
        VICTIM.store(victim.as_ptr() as usize, Ordering::Relaxed);
        AT.store(
            if site == Site::PartialLocked { 1 } else { 2 },
            Ordering::Relaxed,
        );
        set_hook(Some(hook));
        op();
        set_hook(None);
        assert_eq!(VICTIM.load(Ordering::Relaxed), 0, "the hook ran");
    }
}

/// An 8-byte object on its slab's free list, freed again by the nolock
/// free while the node lock is held (so parked as a suspect: parking
/// writes the suspects' link over its first word, which was its free-list
/// link), then reached by a nolock allocation's refill from the slab
/// before any drain checked it. The link it finds is the end of the
/// suspects stack, which no slab list holds: a double free (it was
/// reported as a use after free). With `debug-checks` the bitmap reports
/// the second free itself, with the same words; the key's path is tested
/// without it (`.ci/run`'s `--features interrupt-points` run).
#[cfg(feature = "interrupt-points")]
#[test]
fn parked_tiny_double_free_reached_on_its_slab_aborts_as_a_double_free() {
    expect_abort(
        "parked_tiny_double_free_reached_on_its_slab_aborts_as_a_double_free",
        "double free of object",
        || {
            let h = quiet_heap();
            let objs = allocs(h, 8, 8);
            free(h, objs[0]);
            h.drain(); // objs[0] on its slab's free list
            free(h, objs[1]);
            // The drain returns objs[1] with the node lock held: the hook
            // frees objs[0] there, and it is parked.
            tiny_victim::free_inside(h, objs[0], anyalloc::interrupt::Site::PartialLocked, || {
                h.drain()
            });
            let l = Layout::from_size_align(8, 8).unwrap();
            // The refills walk the slab's free list down to objs[0].
            for _ in 0..4096 {
                if h.alloc_nolock(l).is_none() {
                    break;
                }
            }
        },
    );
}

/// An 8-byte object waiting in a full barn sheaf, freed again by the
/// nolock free while the barn lock is held (the barn is searched under it:
/// parked as a suspect), then handed out from that sheaf by nolock
/// allocations before any drain checked it. The allocation clears its
/// first word, which for the tiny classes is the suspects' link too: the
/// drain that finds it so reports a double free (it was reported as a use
/// after free of a corrupt link). As above, without `debug-checks`.
#[cfg(feature = "interrupt-points")]
#[test]
fn parked_tiny_double_free_handed_out_aborts_as_a_double_free_at_the_drain() {
    expect_abort(
        "parked_tiny_double_free_handed_out_aborts_as_a_double_free_at_the_drain",
        "double free of object",
        || {
            let h = quiet_heap();
            let cap = h.stats().classes[0].sheaf_capacity;
            assert_eq!(h.stats().classes[0].size, 8);
            let objs = allocs(h, 8, 4 * cap + 1);
            h.drain(); // the slot's sheaves empty
                       // Main, then (swapped) spare fill with objs[..2 * cap]; the
                       // next free flushes both to the barn.
            for &p in &objs[..4 * cap] {
                free(h, p);
            }
            assert!(
                h.stats().classes[0].cached_in_barn >= 2 * cap,
                "{:?}",
                h.stats().classes[0]
            );
            // The next flush (main and spare full again) holds the barn
            // lock: the hook frees objs[0], in a barn sheaf, there.
            tiny_victim::free_inside(h, objs[0], anyalloc::interrupt::Site::BarnTrade, || {
                free(h, objs[4 * cap])
            });
            // Nolock allocations (no drain) until objs[0] is handed out.
            let l = Layout::from_size_align(8, 8).unwrap();
            let mut found = false;
            for _ in 0..8 * cap {
                match h.alloc_nolock(l) {
                    Some(p) if p == objs[0] => {
                        found = true;
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            assert!(found, "objs[0] was not handed out");
            h.drain(); // the suspects' drain
        },
    );
}
