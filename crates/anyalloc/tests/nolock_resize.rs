//! `NoLock` resizes blocks in place when they have room (as `Global`'s
//! `realloc` does), and a shrink never fails for want of memory (unless it
//! asks for an alignment the block's address lacks): a `Vec` grown or
//! shrunk inside a signal handler used to take a new block every time (and
//! `shrink_to_fit` aborted the process when none was there).

mod nolock_retry;

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec;
use anyalloc::{Global, NoLock};
use nolock_retry::first;
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn grow_and_shrink_stay_in_place_when_the_block_has_room() {
    anyalloc::init().unwrap();
    // 20 bytes live in a 24- or 32-byte object: 30 fits.
    let a = first(|| NoLock.allocate(l(20, 8))).cast::<u8>();
    let usable = anyalloc::global_heap().unwrap().usable_size(a);
    assert!(usable >= 24, "{usable}");
    // SAFETY: `a` is live with the layout each call names.
    unsafe {
        a.as_ptr().write_bytes(0x5a, 20);
        let b = NoLock.grow(a, l(20, 8), l(usable, 8)).unwrap().cast::<u8>();
        assert_eq!(b, a, "grown within its block: in place");
        assert!((0..20).all(|i| *b.as_ptr().add(i) == 0x5a));
        // Dirty the whole block, shrink, then grow zeroed: the new tail is 0.
        b.as_ptr().write_bytes(0xff, usable);
        let c = NoLock
            .shrink(b, l(usable, 8), l(usable - 4, 8))
            .unwrap()
            .cast::<u8>();
        assert_eq!(c, b, "more than half used: in place");
        let d = NoLock
            .grow_zeroed(c, l(usable - 4, 8), l(usable, 8))
            .unwrap()
            .cast::<u8>();
        assert_eq!(d, c);
        assert!((usable - 4..usable).all(|i| *d.as_ptr().add(i) == 0));
        assert!((0..usable - 4).all(|i| *d.as_ptr().add(i) == 0xff));
        // Past the block: moved, contents kept.
        let e = NoLock
            .grow(d, l(usable, 8), l(5000, 8))
            .unwrap()
            .cast::<u8>();
        assert_ne!(e, d);
        assert!((0..usable - 4).all(|i| *e.as_ptr().add(i) == 0xff));
        e.as_ptr().write_bytes(0xff, 5000);
        // Shrunk to less than half: moved to a smaller block.
        let f = NoLock
            .shrink(e, l(5000, 8), l(100, 8))
            .unwrap()
            .cast::<u8>();
        assert_ne!(f, e);
        assert!(anyalloc::global_heap().unwrap().usable_size(f) < 5000 / 2);
        assert!((0..100).all(|i| *f.as_ptr().add(i) == 0xff));
        // A larger alignment than the block has: moved to an aligned block.
        let g = NoLock
            .grow(f, l(100, 8), l(200, 4096))
            .unwrap()
            .cast::<u8>();
        assert_eq!(g.as_ptr() as usize % 4096, 0);
        assert!((0..100).all(|i| *g.as_ptr().add(i) == 0xff));
        // To and from zero bytes.
        let h = NoLock
            .shrink(g, l(200, 4096), l(0, 4096))
            .unwrap()
            .cast::<u8>();
        let i = NoLock
            .grow_zeroed(h, l(0, 4096), l(64, 4096))
            .unwrap()
            .cast::<u8>();
        assert!((0..64).all(|k| *i.as_ptr().add(k) == 0));
        NoLock.deallocate(i, l(64, 4096));
    }
}

#[test]
fn a_vec_grows_in_place_within_its_size_class() {
    anyalloc::init().unwrap();
    let usable_of = |v: &Vec<u8, NoLock>| {
        anyalloc::global_heap()
            .unwrap()
            .usable_size(NonNull::new(v.as_ptr() as *mut u8).unwrap())
    };
    // A block of the 1000-byte class or the next one up, in which 900
    // bytes are more than half: while another test holds both classes'
    // slots, the nolock path falls back to a page block (4 KiB), from
    // which the shrink below rightly moves. Such a block is given back and
    // the allocation tried again.
    let mut v: Vec<u8, NoLock> = first(|| {
        let mut v = Vec::new_in(NoLock);
        v.try_reserve_exact(1000).map_err(|e| format!("{e:?}"))?;
        match usable_of(&v) {
            u if u < 1800 => Ok(v),
            u => Err(format!("a block of {u} bytes")),
        }
    });
    let first = v.as_ptr();
    let usable = usable_of(&v);
    v.extend(std::iter::repeat_n(7u8, 1000));
    v.try_reserve_exact(usable - 1000).unwrap();
    assert_eq!(v.as_ptr(), first, "reserved within the block: no move");
    v.truncate(900);
    v.shrink_to_fit();
    assert_eq!(v.as_ptr(), first, "shrunk within the block: no move");
    assert!(v.iter().all(|&b| b == 7));
}

#[test]
fn global_alloc_realloc_of_nolock_is_in_place_when_it_fits() {
    anyalloc::init().unwrap();
    // SAFETY: each block is used with the layout it has.
    unsafe {
        let p =
            first(|| NonNull::new(GlobalAlloc::alloc(&NoLock, l(40, 8))).ok_or("null")).as_ptr();
        p.write_bytes(3, 40);
        let usable = anyalloc::global_heap()
            .unwrap()
            .usable_size(NonNull::new(p).unwrap());
        let q = GlobalAlloc::realloc(&NoLock, p, l(40, 8), usable);
        assert_eq!(q, p, "grown within its block: in place");
        let r = GlobalAlloc::realloc(&NoLock, q, l(usable, 8), 3000);
        assert!(!r.is_null());
        assert!((0..40).all(|i| *r.add(i) == 3));
        GlobalAlloc::dealloc(&NoLock, r, l(3000, 8));
    }
}

/// `Global::realloc` on the nolock route (a nolock scope, a signal handler)
/// keeps a block that fits when no smaller one is there, as `NoLock`'s
/// shrink does: it returned null, and `Vec::shrink_to_fit` (or
/// `into_boxed_slice`) aborted the process. A huge block shrunk below half
/// its size needs a new mapping, which the nolock path never makes.
#[test]
fn global_realloc_shrink_on_the_nolock_route_keeps_a_block_that_fits() {
    anyalloc::init().unwrap();
    let old = l(16 << 20, 8);
    let new = 5 << 20;
    // SAFETY: each block is used with the layout it has.
    unsafe {
        let p = Global.alloc(old);
        assert!(!p.is_null());
        p.write_bytes(0x77, new);
        let q = {
            let _rt = anyalloc::nolock_scope();
            Global.realloc(p, old, new)
        };
        assert_eq!(q, p, "kept: the nolock route has no 5 MiB block");
        assert!((0..new).step_by(4093).all(|i| *q.add(i) == 0x77));
        // Grown again within it on the nolock route: kept too.
        let r = {
            let _rt = anyalloc::nolock_scope();
            Global.realloc(q, l(new, 8), 6 << 20)
        };
        assert_eq!(r, q, "fits: kept");
        Global.dealloc(r, l(6 << 20, 8));
    }
}
