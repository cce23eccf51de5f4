//! glibc's malloc control and statistics interface: `malloc_trim`,
//! `mallinfo2`, `mallinfo`, `malloc_stats`, `malloc_info`, `mallopt`.
//!
//! Statistics are lock-free snapshots of the heap's counters
//! ([`Heap::stats`]); the text is assembled on the stack ([`Line`]) and
//! written line by line, so nothing here allocates while it reads the heap.

use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, Ordering};

use anyalloc::{Heap, HeapStats, PAGE_SIZE};

use crate::line::Line;
use crate::{inside, must_nolock, set_errno, tls, PERTURB, SLOW, SLOW_PERTURB};

/// `malloc_trim(3)`: drains the heap's caches and gives every free block
/// (of any size) back to the OS now; 1 if memory was released, else 0.
/// `pad` is ignored (there is no "top of the heap" to keep). Inside a
/// signal handler that interrupted the allocator, or a nolock scope, it does
/// nothing and returns 0.
#[no_mangle]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    let t = tls::state();
    if must_nolock(t) {
        return 0;
    }
    let Some(h) = anyalloc::global_heap() else {
        return 0;
    };
    let saved = crate::errno();
    let released = inside(t, || h.trim());
    set_errno(saved);
    c_int::from(released > 0)
}

/// glibc's `struct mallinfo2`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

/// glibc's `struct mallinfo` (the same fields as `int`).
#[repr(C)]
pub struct Mallinfo {
    arena: c_int,
    ordblks: c_int,
    smblks: c_int,
    hblks: c_int,
    hblkhd: c_int,
    usmblks: c_int,
    fsmblks: c_int,
    uordblks: c_int,
    fordblks: c_int,
    keepcost: c_int,
}

/// The heap's counters in glibc's terms (see the crate README for the
/// mapping); all zero before the heap exists.
fn info(h: Option<&Heap>) -> Mallinfo2 {
    let Some(h) = h else {
        return Mallinfo2::default();
    };
    let s = h.stats();
    let mut objects = 0;
    let mut cached = 0;
    let mut cached_bytes = 0;
    for c in &s.classes {
        objects += c.objects_in_use * c.size;
        let n = c.cached_in_sheaves + c.cached_in_barn + c.deferred;
        cached += n;
        cached_bytes += n * c.size;
    }
    let arena = (s.pages.total_pages - s.pages.free_pages.min(s.pages.total_pages)) * PAGE_SIZE;
    let uordblks = objects + s.large_bytes;
    Mallinfo2 {
        arena,
        ordblks: cached,
        smblks: 0,
        hblks: s.huge_in_use,
        hblkhd: s.huge_bytes,
        usmblks: 0,
        fsmblks: cached_bytes,
        uordblks,
        fordblks: arena.saturating_sub(uordblks),
        keepcost: s.pages.free_pages * PAGE_SIZE,
    }
}

/// `mallinfo2(3)`: the heap's statistics in glibc's fields (mapping in the
/// README). Any context: reads counters only.
#[no_mangle]
pub extern "C" fn mallinfo2() -> Mallinfo2 {
    info(anyalloc::global_heap())
}

/// `mallinfo(3)`: as [`mallinfo2`], each field saturated at `INT_MAX`
/// instead of wrapping.
#[no_mangle]
pub extern "C" fn mallinfo() -> Mallinfo {
    let i = info(anyalloc::global_heap());
    let sat = |v: usize| c_int::try_from(v).unwrap_or(c_int::MAX);
    Mallinfo {
        arena: sat(i.arena),
        ordblks: sat(i.ordblks),
        smblks: sat(i.smblks),
        hblks: sat(i.hblks),
        hblkhd: sat(i.hblkhd),
        usmblks: sat(i.usmblks),
        fsmblks: sat(i.fsmblks),
        uordblks: sat(i.uordblks),
        fordblks: sat(i.fordblks),
        keepcost: sat(i.keepcost),
    }
}

/// glibc's `__libc_mallinfo`: [`mallinfo`] (glibc exports it beside the
/// other `__libc_*` names of `lib.rs`; without it a caller reached glibc's
/// own, idle arena and read zeros).
#[no_mangle]
pub extern "C" fn __libc_mallinfo() -> Mallinfo {
    mallinfo()
}

/// `malloc_stats(3)`: a short summary on stderr, written with write(2).
#[no_mangle]
pub extern "C" fn malloc_stats() {
    let h = anyalloc::global_heap();
    let i = info(h);
    let s = h.map(Heap::stats);
    let u = |v: usize| v as u64;
    let mut l = Line::new();
    let zones = s.map_or(0, |s| s.pages.zones);
    let total = s.map_or(0, |s| s.pages.total_pages);
    l.text("anyalloc: ").dec(u(zones)).text(" zones of ");
    l.dec(u(total * PAGE_SIZE)).text(" bytes: ").dec(u(i.arena));
    l.text(" in use by slabs and page blocks, ")
        .dec(u(i.keepcost))
        .text(" free\n");
    l.write_fd(2);
    let mut l = Line::new();
    l.text("anyalloc: in use ")
        .dec(u(i.uordblks))
        .text(" bytes in objects and page blocks, ");
    l.dec(u(i.hblkhd))
        .text(" bytes in ")
        .dec(u(i.hblks))
        .text(" mmap'ed blocks (")
        .dec(u(s.as_ref().map_or(0, |s| s.huge_cached_bytes)))
        .text(" freed kept); ");
    l.dec(u(i.ordblks))
        .text(" free objects cached (")
        .dec(u(i.fsmblks))
        .text(" bytes)\n");
    l.write_fd(2);
    if let Some(s) = s {
        let mut l = Line::new();
        l.text("anyalloc: nolock allocations ")
            .dec(s.nolock_alloc_ok)
            .text(" ok, ");
        l.dec(s.nolock_alloc_fail_busy)
            .text(" busy, ")
            .dec(s.nolock_alloc_fail_empty);
        l.text(" empty; deferred frees ")
            .dec(s.nolock_free_deferred);
        l.text("; maintenance passes ").dec(s.maintenance_passes);
        l.text("; released to the OS ")
            .dec(s.released_to_os_bytes)
            .text(" bytes\n");
        l.write_fd(2);
    }
}

/// Writes one line to `fp`; false when stdio failed.
fn put(fp: *mut libc::FILE, l: &Line) -> bool {
    let b = l.bytes();
    // SAFETY: `fp` is the caller's open stream (checked not null); the
    // bytes are a live slice. stdio may allocate its buffer: no heap lock
    // is held here.
    unsafe { libc::fwrite(b.as_ptr().cast(), 1, b.len(), fp) == b.len() }
}

/// `malloc_info(3)`: the heap's state as XML on `fp`: one `<size>` element
/// per size class, one `<zone>` per zone, totals. `options` must be 0
/// (`EINVAL` otherwise, as glibc), and `fp` not null (`EINVAL`). Returns
/// 0, or -1 when writing failed.
///
/// # Safety
/// `fp` is null or an open `FILE`.
#[no_mangle]
pub unsafe extern "C" fn malloc_info(options: c_int, fp: *mut libc::FILE) -> c_int {
    // As glibc: options other than 0 are refused by the return value.
    if options != 0 {
        return libc::EINVAL;
    }
    if fp.is_null() {
        set_errno(libc::EINVAL);
        return -1;
    }
    let h = anyalloc::global_heap();
    let s: Option<HeapStats> = h.map(Heap::stats);
    let i = info(h);
    let u = |v: usize| v as u64;
    let mut ok = put(
        fp,
        Line::new().text("<malloc version=\"1\" allocator=\"anyalloc\">\n"),
    );
    ok &= put(fp, Line::new().text("<sizes>\n"));
    for (n, c) in s.iter().flat_map(|s| s.classes.iter()).enumerate() {
        let mut l = Line::new();
        l.text("  <size class=\"")
            .dec(u(n))
            .text("\" bytes=\"")
            .dec(u(c.size));
        l.text("\" in_use=\"")
            .dec(u(c.objects_in_use))
            .text("\" slabs=\"")
            .dec(u(c.slabs));
        l.text("\" cached_sheaves=\"").dec(u(c.cached_in_sheaves));
        l.text("\" cached_barn=\"").dec(u(c.cached_in_barn));
        l.text("\" deferred=\"").dec(u(c.deferred)).text("\"/>\n");
        ok &= put(fp, &l);
    }
    ok &= put(fp, Line::new().text("</sizes>\n"));
    let mut z = 0;
    while let Some(zs) = h.and_then(|h| h.pages().zone_stats(z)) {
        let mut l = Line::new();
        l.text("<zone nr=\"")
            .dec(u(z))
            .text("\" pages=\"")
            .dec(u(zs.total_pages));
        l.text("\" free=\"")
            .dec(u(zs.free_pages))
            .text("\" buddy=\"")
            .dec(u(zs.buddy_pages));
        l.text("\" percpu=\"").dec(u(zs.percpu_pages));
        l.text("\" deferred=\"")
            .dec(u(zs.deferred_pages))
            .text("\"/>\n");
        ok &= put(fp, &l);
        z += 1;
    }
    let mut l = Line::new();
    l.text("<total type=\"objects_and_pages\" size=\"")
        .dec(u(i.uordblks))
        .text("\"/>\n");
    ok &= put(fp, &l);
    let mut l = Line::new();
    l.text("<total type=\"mmap\" count=\"")
        .dec(u(i.hblks))
        .text("\" size=\"");
    l.dec(u(i.hblkhd)).text("\"/>\n");
    ok &= put(fp, &l);
    let mut l = Line::new();
    l.text("<total type=\"cached\" count=\"")
        .dec(u(i.ordblks))
        .text("\" size=\"");
    l.dec(u(i.fsmblks)).text("\"/>\n");
    ok &= put(fp, &l);
    let mut l = Line::new();
    l.text("<system type=\"current\" size=\"")
        .dec(u(i.arena))
        .text("\"/>\n");
    ok &= put(fp, &l);
    if let Some(s) = s {
        let mut l = Line::new();
        l.text("<nolock alloc_ok=\"")
            .dec(s.nolock_alloc_ok)
            .text("\" fail_busy=\"");
        l.dec(s.nolock_alloc_fail_busy)
            .text("\" fail_empty=\"")
            .dec(s.nolock_alloc_fail_empty);
        l.text("\" free_deferred=\"")
            .dec(s.nolock_free_deferred)
            .text("\"/>\n");
        ok &= put(fp, &l);
        let mut l = Line::new();
        l.text("<maintenance passes=\"")
            .dec(s.maintenance_passes)
            .text("\" released=\"");
        l.dec(s.released_to_os_bytes).text("\"/>\n");
        ok &= put(fp, &l);
    }
    ok &= put(fp, Line::new().text("</malloc>\n"));
    if ok {
        0
    } else {
        -1
    }
}

/// glibc's `__libc_mallopt`: [`mallopt`] (without it a caller's
/// `M_PERTURB` went to glibc's own, unused malloc).
#[no_mangle]
pub extern "C" fn __libc_mallopt(param: c_int, value: c_int) -> c_int {
    mallopt(param, value)
}

/// glibc's own switch for [`mallopt`]'s `M_PERTURB`, read once by the
/// library's constructor: `GLIBC_TUNABLES=glibc.malloc.perturb=N`, else
/// `MALLOC_PERTURB_=N` (Meson's test runner, for one, sets it for every
/// test, to catch reads of uninitialised and freed memory). As glibc 2.36:
/// `N` as C's `strtoul` with base 0 reads it (decimal, `0x` hex, `0` octal;
/// what follows the digits is ignored, no digits is 0), from 0 to 255, else
/// ignored (silently, as glibc: these are glibc's variables, not ours); and
/// both are ignored in a set-user-ID or set-group-ID program
/// (`AT_SECURE`), as glibc ignores them there.
pub(crate) fn perturb_from_environment() {
    // SAFETY: getauxval has no preconditions.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        return;
    }
    // The last valid one: glibc sets a tunable each time it is named.
    let tunable = env(c"GLIBC_TUNABLES").and_then(|list| {
        list.split(|&b| b == b':')
            .filter_map(|kv| kv.strip_prefix(b"glibc.malloc.perturb=".as_slice()))
            .filter_map(perturb_value)
            .next_back()
    });
    let value = tunable.or_else(|| env(c"MALLOC_PERTURB_").and_then(perturb_value));
    // glibc reads them before any constructor runs; this constructor may run
    // after another library's, whose own `mallopt(M_PERTURB, ..)` must win.
    if let Some(v) = value.filter(|_| !PERTURB_CHOSEN.load(Ordering::Relaxed)) {
        set_perturb(v);
    }
}

/// A program's `mallopt(M_PERTURB, ..)` has been made: the environment
/// (read later, by the constructor) no longer applies.
static PERTURB_CHOSEN: AtomicBool = AtomicBool::new(false);

/// `M_PERTURB`: any value other than 0 turns the fills on, one whose low
/// byte is 0 included (as glibc and its manual: allocations are then filled
/// with 0xff, freed blocks with 0).
fn set_perturb(value: c_int) {
    PERTURB.store(value as u8, Ordering::Relaxed);
    if value != 0 {
        SLOW.fetch_or(SLOW_PERTURB, Ordering::Relaxed);
    } else {
        SLOW.fetch_and(!SLOW_PERTURB, Ordering::Relaxed);
    }
}

/// The value of the environment variable `name`, if set. Normal context
/// (the constructor): nothing changes the environment meanwhile.
fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated; getenv returns null or a pointer to
    // a NUL-terminated string owned by the environment.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: a non-null result is a valid C string, read at once.
    (!p.is_null()).then(|| unsafe { core::ffi::CStr::from_ptr(p) }.to_bytes())
}

/// A `glibc.malloc.perturb` value as glibc's tunables read it (see
/// [`perturb_from_environment`]); `None` outside 0..=255.
fn perturb_value(text: &[u8]) -> Option<c_int> {
    let mut t = text;
    while let [b' ' | b'\t', rest @ ..] = t {
        t = rest;
    }
    let negative = match t {
        [b'-', rest @ ..] => {
            t = rest;
            true
        }
        [b'+', rest @ ..] => {
            t = rest;
            false
        }
        _ => false,
    };
    let (base, digits) = match t {
        [b'0', b'x' | b'X', rest @ ..] => (16, rest),
        [b'0', rest @ ..] => (8, rest),
        _ => (10, t),
    };
    let mut v: u64 = 0;
    for &b in digits {
        let Some(d) = (b as char).to_digit(base) else {
            break;
        };
        // Saturates: anything that large is out of range anyway.
        v = v
            .saturating_mul(u64::from(base))
            .saturating_add(u64::from(d));
    }
    if negative && v != 0 {
        return None;
    }
    c_int::try_from(v).ok().filter(|&v| v <= 0xff)
}

const M_MXFAST: c_int = 1;
const M_PERTURB: c_int = -6;
/// glibc's `MAX_FAST_SIZE` (`80 * sizeof(size_t) / 4`).
const MAX_FAST_SIZE: usize = 80 * core::mem::size_of::<usize>() / 4;

/// `mallopt(3)`: glibc's parameters and return values (as glibc 2.36: 0
/// only for an `M_MXFAST` above 160 bytes or negative, 1 for everything
/// else, unknown parameters included).
/// Honoured: `M_PERTURB` (on for any value but 0, filling with its low
/// byte; allocations other than `calloc`
/// are filled with the complement of the byte, freed blocks with the byte). Accepted and
/// checked like glibc but without effect, because anyalloc has no
/// equivalent knob: `M_MXFAST`, `M_TRIM_THRESHOLD`, `M_TOP_PAD`,
/// `M_MMAP_THRESHOLD` (blocks above 4 MiB are always `mmap`ed),
/// `M_MMAP_MAX`, `M_CHECK_ACTION` (corruption always aborts),
/// `M_ARENA_TEST`, `M_ARENA_MAX`.
#[no_mangle]
pub extern "C" fn mallopt(param: c_int, value: c_int) -> c_int {
    // As glibc, negative values become huge `size_t`s in the range checks.
    let v = value as isize as usize;
    match param {
        M_MXFAST => c_int::from(v <= MAX_FAST_SIZE),
        M_PERTURB => {
            PERTURB_CHOSEN.store(true, Ordering::Relaxed);
            set_perturb(value);
            1
        }
        // M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX,
        // M_CHECK_ACTION, M_ARENA_TEST, M_ARENA_MAX (any value), unknown.
        _ => 1,
    }
}
