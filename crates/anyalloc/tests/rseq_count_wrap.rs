//! A counting pop aborted after its counter's add, on a slot whose
//! counter has wrapped: the count stays exact.
//!
//! A counting pop (`sheaf_pop::<true>`, `pcp_pop::<true>`) that is aborted
//! after its add and before its commit takes the count back from the slot
//! of the CPU it runs on *then*. After a migration that is another CPU's
//! slot, whose counter may have been 0: it wraps to `u64::MAX`. The next
//! counting pop on that CPU adds 1 to `u64::MAX`, and that add sets the
//! carry flag, the very flag the abort handler reads as "the add has not
//! run yet". If that pop is aborted before its commit, the handler must
//! still take its count back.
//!
//! Made deterministic with an execution breakpoint (perf, `sigtrap`, as in
//! `heap_rseq_singlestep.rs`) on the instruction right after the add, on
//! two CPUs `a` and `b` whose slots' counters start at 0:
//!
//! 1. pinned to `a`, a nolock allocation: the add on `a`'s slot (0 -> 1),
//!    the breakpoint fires, the handler moves the thread to `b` (the
//!    breakpoint stays armed); the abort handler, on `b`, takes the count
//!    back from `b`'s slot (0 -> `u64::MAX`) and restarts the pop on `b`;
//! 2. the add on `b`'s slot wraps (`u64::MAX` -> 0, carry set), the
//!    breakpoint fires again, the handler disarms it; the abort handler
//!    must take that count back (-> `u64::MAX`) before the restart, whose
//!    add and commit then leave `b`'s counter at 0.
//!
//! The counters sum to 1, one allocation: the heap's count must say 1 more
//! than before. Before the fix, the second abort restarted without the
//! take-back and the count said 2. Done for object sheaves and for page
//! lists.

#![cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]

mod breakpoint;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use anyalloc::{Config, FastPath, Heap, PageAllocator};
use anyalloc_storm::thread::{current_cpu, pin_to_cpu};

/// The addresses right after every `add qword ptr [reg + disp], 1` with
/// the 8-bit displacement `disp` inside a section: a counting pop's add
/// (`disp` is the counter's offset in the slot).
fn after_counter_adds(disp: u8) -> Vec<usize> {
    let mut found = Vec::new();
    for d in breakpoint::descriptors() {
        let start = d.start_ip as usize;
        let len = d.post_commit_offset as usize;
        // SAFETY: the section lies in this binary's text, readable.
        let code = unsafe { std::slice::from_raw_parts(start as *const u8, len) };
        for i in 0..len {
            // REX.W, opcode 0x83 /0 (add r/m64, imm8), mod 01 (disp8).
            let Some(&[rex, op, modrm]) =
                code.get(i..i + 3).map(|s| <&[u8; 3]>::try_from(s).unwrap())
            else {
                continue;
            };
            if rex & 0xf8 != 0x48 || op != 0x83 || modrm & 0xf8 != 0x40 {
                continue;
            }
            let at = i + 3 + usize::from(modrm & 7 == 4); // a SIB byte
            if code.get(at) == Some(&disp) && code.get(at + 1) == Some(&1) {
                found.push(start + at + 2);
            }
        }
    }
    found
}

/// The armed breakpoint (-1: none).
static BP_FD: AtomicI32 = AtomicI32::new(-1);
/// Where the first hit moves the thread (it leaves the breakpoint armed);
/// the second hit disarms it.
static MOVE_TO: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);
static MOVED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = anyalloc_storm::ErrnoGuard::save();
    let hits = HITS.fetch_add(1, Ordering::Relaxed);
    if hits == 0 {
        // Keep the breakpoint: the pop restarts on the other CPU and runs
        // its add there too.
        if pin_to_cpu(MOVE_TO.load(Ordering::Relaxed)) {
            MOVED.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let fd = BP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // The armed perf event (closed by `disarm` only).
        breakpoint::disable(fd);
    }
}

fn disarm() {
    let fd = BP_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        breakpoint::close(fd);
    }
}

fn skip(why: &str) {
    assert!(
        std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
        "{why}; set ANYALLOC_ALLOW_SKIP=1 to skip"
    );
    eprintln!("skipped: {why}");
}

/// Two CPUs of this thread's affinity mask (before the test pins it).
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET reads inside the set.
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

/// A heap (for object sheaves) and a page allocator of its own (for page
/// lists: a heap's own page lists also serve its slabs).
struct Both {
    heap: Heap,
    pages: PageAllocator,
}

/// What one kind of counting pop needs: fill a CPU's fast path, take one
/// (nolock) and give it back, and read the count.
struct Kind {
    name: &'static str,
    /// The counter's offset in the slot (the add's displacement).
    disp: u8,
    fill: fn(&Both),
    take: fn(&Both) -> Option<usize>,
    give: fn(&Both, usize),
    count: fn(&Both) -> u64,
}

fn layout() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

const OBJECTS: Kind = Kind {
    name: "object sheaves",
    disp: 32, // layout::SLOT_NOLOCK_OK
    fill: |b| {
        let v: Vec<_> = (0..8).map(|_| b.heap.alloc(layout()).unwrap()).collect();
        for p in v {
            // SAFETY: allocated just above on the heap, freed once.
            unsafe { b.heap.free(p) };
        }
    },
    take: |b| b.heap.alloc_nolock(layout()).map(|p| p.as_ptr() as usize),
    // SAFETY: `p` came from `take`, given back once.
    give: |b, p| unsafe { b.heap.free_nolock(NonNull::new_unchecked(p as *mut u8)) },
    count: |b| b.heap.stats().nolock_alloc_ok,
};

const PAGES: Kind = Kind {
    name: "page lists",
    disp: 48, // layout::PCP_NOLOCK_OK
    fill: |b| {
        let v: Vec<_> = (0..4).map(|_| b.pages.alloc_pages(0).unwrap()).collect();
        for p in v {
            // SAFETY: allocated just above with order 0, freed once.
            unsafe { b.pages.free_pages(p, 0) };
        }
    },
    take: |b| b.pages.alloc_pages_nolock(0).map(|p| p.as_ptr() as usize),
    // SAFETY: `p` came from `take` (order 0), given back once.
    give: |b, p| unsafe {
        b.pages
            .free_pages_nolock(NonNull::new_unchecked(p as *mut u8), 0)
    },
    count: |b| b.pages.stats().nolock_alloc_ok,
};

/// Runs the scenario of the module documentation for `kind` on a heap of
/// its own; `false` if it was skipped.
fn wrapped_counter_abort(kind: &Kind, (a, b): (usize, usize)) -> bool {
    let config = Config::default().memory(16 << 20).maintenance(false);
    let both = Both {
        heap: Heap::new(config).unwrap(),
        pages: PageAllocator::new(config.grow(false)).unwrap(),
    };
    let heap = &both;
    if both.heap.stats().fast_path != FastPath::Rseq {
        skip("the rseq fast path is not in use here");
        return false;
    }
    // Each CPU's fast path gets blocks (normal path: no count).
    for cpu in [b, a] {
        assert!(
            pin_to_cpu(cpu) && current_cpu() == cpu,
            "could not pin to {cpu}"
        );
        (kind.fill)(heap);
    }
    // The scenario, at the add of each counting pop in turn (inlined
    // copies) until the nolock allocation runs one: a take that ran none
    // changed only `a`'s counter, and is given back.
    assert!(pin_to_cpu(a) && current_cpu() == a, "could not pin to {a}");
    MOVE_TO.store(b, Ordering::Relaxed);
    let mut taken = 0u64;
    let mut p = None;
    'find: for addr in after_counter_adds(kind.disp) {
        for _ in 0..4 {
            HITS.store(0, Ordering::Relaxed);
            MOVED.store(0, Ordering::Relaxed);
            BP_FD.store(
                breakpoint::arm(addr).expect("perf_event_open"),
                Ordering::Relaxed,
            );
            let got = (kind.take)(heap).expect("a nolock allocation");
            taken += 1;
            disarm();
            if HITS.load(Ordering::Relaxed) > 0 {
                p = Some(got);
                break 'find;
            }
            (kind.give)(heap, got);
            (kind.fill)(heap);
        }
    }
    let p = p.unwrap_or_else(|| panic!("{}: no counting pop ran", kind.name));
    let on = current_cpu();
    (kind.give)(heap, p);
    assert_eq!(
        MOVED.load(Ordering::Relaxed),
        1,
        "{}: the handler did not move the thread",
        kind.name
    );
    assert_eq!(
        on, b,
        "{}: the pop did not finish on the other CPU",
        kind.name
    );
    assert_eq!(
        HITS.load(Ordering::Relaxed),
        2,
        "{}: the pop's add must have run on both CPUs, each time interrupted",
        kind.name
    );
    assert_eq!(
        (kind.count)(heap),
        taken,
        "{}: an abort after an add that wrapped its counter lost the take-back",
        kind.name
    );
    true
}

#[test]
fn an_abort_after_a_wrapping_add_takes_its_count_back() {
    anyalloc_storm::install_handler(libc::SIGTRAP, on_trap, &[]).expect("sigaction");
    let Some(cpus) = two_cpus() else {
        return skip("fewer than two CPUs");
    };
    match breakpoint::arm(two_cpus as fn() -> Option<(usize, usize)> as usize) {
        Some(fd) => breakpoint::close(fd),
        None => return skip("perf_event_open refused an execution breakpoint"),
    }
    for kind in [&OBJECTS, &PAGES] {
        if !wrapped_counter_abort(kind, cpus) {
            return;
        }
    }
}
