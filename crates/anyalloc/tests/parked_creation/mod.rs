//! Parks a creation of the global heap halfway, for the tests of a `fork`
//! made meanwhile: the creation reads its settings with `getenv`, which a
//! binary that includes this module defines (a scan of `environ`, with no
//! allocation and no lock), and once [`arm`]ed, the read of
//! `ANYALLOC_MEMORY` parks the creating thread until [`release`], or until
//! the patience given to `arm` has passed.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// Set by [`arm`]: the next read of `ANYALLOC_MEMORY` parks.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The creation is parked in `getenv`.
static PARKED: AtomicBool = AtomicBool::new(false);
/// The parked creation may go on.
static RELEASED: AtomicBool = AtomicBool::new(false);
/// How long a parked creation waits for `release` (milliseconds).
static PATIENCE_MS: AtomicU64 = AtomicU64::new(0);

/// The next creation parks when it reads `ANYALLOC_MEMORY`, for at most
/// `patience` (a scenario in which the fork waits for the creation lets it
/// go on after that).
pub fn arm(patience: Duration) {
    PATIENCE_MS.store(patience.as_millis() as u64, SeqCst);
    ARMED.store(true, SeqCst);
}

/// No more parking (in a child that makes the heap itself).
pub fn disarm() {
    ARMED.store(false, SeqCst);
}

/// Whether the creation is parked (or was).
pub fn parked() -> bool {
    PARKED.load(SeqCst)
}

/// Lets the parked creation go on.
pub fn release() {
    RELEASED.store(true, SeqCst);
}

extern "C" {
    static environ: *const *const c_char;
}

/// `getenv` without libc's (no allocation, no lock): the heap's creation
/// calls this one.
///
/// # Safety
/// As libc's: `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn getenv(name: *const c_char) -> *mut c_char {
    // SAFETY: the caller passes a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    if ARMED.load(SeqCst) && name == b"ANYALLOC_MEMORY" {
        PARKED.store(true, SeqCst);
        let start = Instant::now();
        let patience = Duration::from_millis(PATIENCE_MS.load(SeqCst));
        while !RELEASED.load(SeqCst) && start.elapsed() < patience {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // SAFETY: `environ` is the process's NUL-terminated array of
    // NUL-terminated "NAME=value" strings.
    unsafe {
        let mut e = environ;
        while !e.is_null() && !(*e).is_null() {
            let entry = CStr::from_ptr(*e).to_bytes();
            if entry.len() > name.len() && entry.starts_with(name) && entry[name.len()] == b'=' {
                return (*e).add(name.len() + 1).cast_mut();
            }
            e = e.add(1);
        }
    }
    std::ptr::null_mut()
}

/// A forked child's check: `init` (which makes the heap, or finds it made),
/// an allocation and its free; whether all came back.
pub fn init_and_allocate() -> bool {
    let Ok(heap) = anyalloc::init() else {
        return false;
    };
    let layout = std::alloc::Layout::from_size_align(100, 8).unwrap();
    match heap.alloc(layout) {
        Some(p) => {
            // SAFETY: allocated just above, freed once.
            unsafe { heap.free(p) };
            true
        }
        None => false,
    }
}
