//! A zone added by growth keeps at most half of its pages as its reserve
//! (`Config::min_reserve`, "at most half the zone").
//!
//! Under a limit on address space the heap grows by smaller zones (at most
//! half of the room the limit leaves, down to one 4 MiB block), and the
//! reserve is set per zone in bytes: a zone smaller than twice the reserve
//! had a min watermark above its own size. Nothing above the watermark
//! could ever be taken from it: the nolock path never served a page from
//! it, and the normal path took the page that made the heap grow out of
//! the *first* zone's reserve (its last resort) while the new zone sat
//! free.
//!
//! Deterministic: in a child process (the watchdog's), a 16 MiB allocator
//! with an 8 MiB reserve, and `RLIMIT_AS` leaving about 13 MiB of room, so
//! the growth is one 4 MiB zone.

mod proc_self;
mod watchdog;

use std::time::Duration;

use anyalloc::{Config, PageAllocator, PAGE_SIZE};

#[test]
fn a_grown_zone_smaller_than_twice_the_reserve_is_usable() {
    if watchdog::ran_in_child(
        "a_grown_zone_smaller_than_twice_the_reserve_is_usable",
        Duration::from_secs(60),
        "a grown zone smaller than twice the reserve",
    ) {
        return;
    }
    const MIB: usize = 1 << 20;
    let pa = PageAllocator::new(
        Config::default()
            .memory(16 * MIB)
            .min_reserve(8 * MIB)
            .cpus(1),
    )
    .expect("allocator");
    let total0 = pa.stats().total_pages;
    let mut held = Vec::with_capacity(2 * total0);
    let limit = libc::rlimit {
        rlim_cur: (proc_self::mapped_bytes() + 13 * MIB) as libc::rlim_t,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit; it changes only this (child) process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
    // The first zone down to its reserve, then one page more: the heap
    // grows (under the limit, by one 4 MiB zone).
    while pa.stats().zones == 1 {
        held.push(pa.alloc_pages(0).expect("a page"));
    }
    let grown = pa.zone_stats(1).expect("a second zone");
    assert!(
        grown.total_pages < 8 * MIB / PAGE_SIZE * 2,
        "the limit did not make the grown zone small: {grown:?}"
    );
    // The page that made the heap grow came from the new zone: the first
    // one still holds its whole reserve.
    pa.drain();
    let first = pa.zone_stats(0).unwrap();
    assert!(
        first.free_pages >= 8 * MIB / PAGE_SIZE,
        "the first zone's reserve was used while the new zone had room: {first:?}, {grown:?}"
    );
    // And the nolock path finds pages in the new zone.
    let p = pa.alloc_pages_nolock(0);
    assert!(
        p.is_some(),
        "no nolock page from a grown zone of {} free pages",
        pa.zone_stats(1).unwrap().free_pages
    );
    // SAFETY: allocated above with order 0, freed once each.
    unsafe {
        pa.free_pages_nolock(p.unwrap(), 0);
        for q in held {
            pa.free_pages(q, 0);
        }
    }
    pa.drain();
    assert_eq!(pa.check_invariants(), Ok(()));
}
