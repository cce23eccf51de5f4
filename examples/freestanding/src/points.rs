//! Interrupts inside the heap's critical sections (feature
//! `interrupt-points`, which turns on anyalloc's test hook of that name).
//!
//! The timers land inside the heap's calls often, but almost never while
//! the main loop holds a zone or node lock: those sections are short and
//! rare. So without this a nolock path that ignored a lock held by the
//! context it interrupted went unnoticed. Here the hook, called at every
//! critical section, raises the high-priority IRQ right there (a signal
//! the process sends itself is delivered before the system call returns),
//! in every fourth call of each site: the handler's nolock calls then run
//! while the main loop holds that site's lock, as a real interrupt's would,
//! and the handler records the site. At the end, [`missing`] says which
//! kind of lock never had an interrupt land inside it.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use anyalloc::interrupt::{self, Site};

use crate::{irq, kalloc};

/// Calls of each site by the main loop, and interrupts delivered there
/// (indexed by the site, a `u8`).
static CALLS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static LANDED: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// The site (plus one) whose interrupt is being raised; 0: none.
static RAISING: AtomicUsize = AtomicUsize::new(0);

/// The kinds of lock a handler may find held by the context it interrupted
/// (named by the failure if no interrupt landed inside one), and the sites
/// where the main loop holds one.
const KINDS: [(&str, &[Site]); 3] = [
    (
        "no interrupt landed inside a zone lock",
        &[
            Site::PcpRefill,
            Site::PcpDrain,
            Site::ZoneAlloc,
            Site::ZoneFree,
            Site::BuddySplit,
            Site::BuddyMerge,
            Site::DeferredDrain,
        ],
    ),
    (
        "no interrupt landed inside a cache's node lock",
        &[Site::SheafRefill, Site::SheafFlush, Site::PartialLocked],
    ),
    (
        "no interrupt landed inside a per-CPU slot",
        &[
            Site::SheafAlloc,
            Site::SheafFree,
            Site::PcpAlloc,
            Site::PcpFree,
        ],
    ),
];

fn hook(site: Site) {
    // Only where the main loop (normal context) holds something: the
    // handlers' own critical sections are not interrupted by each other
    // here (the timers do that).
    if kalloc::in_interrupt() {
        return;
    }
    let i = site as usize;
    if !CALLS[i].fetch_add(1, Relaxed).is_multiple_of(4) {
        return;
    }
    RAISING.store(i + 1, Relaxed);
    irq::raise_high();
    RAISING.store(0, Relaxed);
}

/// Called by the high IRQ's handler: counts the site it interrupted, if it
/// was raised there, and says whether the main loop holds a zone or node
/// lock there (the handler then does work that needs those locks too).
pub fn landed() -> bool {
    let Some(i) = RAISING.swap(0, Relaxed).checked_sub(1) else {
        return false;
    };
    LANDED[i].fetch_add(1, Relaxed);
    KINDS[..2]
        .iter()
        .any(|(_, sites)| sites.iter().any(|&s| s as usize == i))
}

/// Installs the hook. Normal context, interrupts enabled.
pub fn enable() {
    interrupt::set_hook(Some(hook));
}

/// Removes the hook (before interrupts are disabled for good).
pub fn disable() {
    interrupt::set_hook(None);
}

/// Interrupts that landed inside each kind of lock: zone, node, slot.
pub fn landed_in_locks() -> [u64; 3] {
    KINDS.map(|(_, sites)| {
        sites
            .iter()
            .map(|&s| LANDED[s as usize].load(Relaxed))
            .sum()
    })
}

/// Why the run fails if some kind of lock never had an interrupt land
/// inside it.
pub fn missing() -> Option<&'static str> {
    let counts = landed_in_locks();
    KINDS
        .iter()
        .zip(counts)
        .find(|&(_, n)| n == 0)
        .map(|((kind, _), _)| *kind)
}
