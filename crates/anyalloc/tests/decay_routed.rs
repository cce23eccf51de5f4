//! The inline decay (`Config::decay`) never runs on a call that the heap
//! routed to the nolock path: a signal handler that interrupted its own
//! thread inside the allocator (played by an interrupt point, here inside
//! the zone lock of a page-block free) makes normal-path calls, which take
//! the nolock route and never tick, however many it makes.

use anyalloc::interrupt::{self, Site};
use anyalloc::{Config, Heap};
use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BLOCK: usize = 300_000;
/// The "handler"'s normal-path calls per interrupt point: each, had it
/// ticked, two ticks (an allocation and a free beyond the per-CPU lists).
const CALLS_PER_POINT: u64 = 100;

static HEAP: OnceLock<Heap> = OnceLock::new();
static ROUTED_CALLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the test's thread while the "handler" may run (the hook is
    /// process-wide).
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn layout() -> Layout {
    Layout::from_size_align(BLOCK, 8).unwrap()
}

fn hook(site: Site) {
    if site != Site::ZoneFree || !ARMED.get() {
        return;
    }
    ARMED.set(false);
    let heap = HEAP.get().unwrap();
    for _ in 0..CALLS_PER_POINT {
        // Normal-path calls, made inside the zone lock: routed to nolock.
        if let Some(p) = heap.alloc(layout()) {
            // SAFETY: allocated just above, freed once.
            unsafe { heap.free(p) };
            ROUTED_CALLS.fetch_add(1, Ordering::Relaxed);
        }
    }
    ARMED.set(true);
}

#[test]
fn calls_routed_to_the_nolock_path_never_give_back() {
    let heap = HEAP
        .get_or_init(|| Heap::new(Config::default().memory(128 << 20).maintenance(false)).unwrap());
    // Idle memory to give back, allocated and freed on the nolock path
    // (which never ticks either): 32 MiB of blocks resident and free.
    let blocks: Vec<NonNull<u8>> = (0..(32 << 20) / BLOCK)
        .map(|_| {
            let p = heap.alloc_nolock(layout()).expect("memory to spare");
            // SAFETY: a live block of BLOCK bytes, ours.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 1, BLOCK) };
            p
        })
        .collect();
    for p in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free_nolock(p) };
    }
    // Twenty normal frees of page blocks (twenty ticks of this thread, too
    // few for a look at the clock), each interrupted inside its zone lock
    // by a "handler" that makes a hundred normal-path calls, over two
    // seconds: four times the idle age of a large free block.
    let keep: Vec<NonNull<u8>> = (0..20)
        .map(|_| heap.alloc_nolock(layout()).expect("memory to spare"))
        .collect();
    interrupt::set_hook(Some(hook));
    ARMED.set(true);
    let start = Instant::now();
    for p in keep {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
        std::thread::sleep(Duration::from_millis(100));
    }
    ARMED.set(false);
    interrupt::set_hook(None);
    let s = heap.stats();
    let routed = ROUTED_CALLS.load(Ordering::Relaxed);
    println!(
        "{routed} routed calls in {:?}: {} passes, {} bytes released",
        start.elapsed(),
        s.maintenance_passes,
        s.released_to_os_bytes
    );
    assert!(
        routed >= 10 * CALLS_PER_POINT,
        "the handler ran at the interrupt points ({routed} calls)"
    );
    assert_eq!(
        (s.maintenance_passes, s.released_to_os_bytes),
        (0, 0),
        "{routed} calls routed to the nolock path ran no pass"
    );
}
