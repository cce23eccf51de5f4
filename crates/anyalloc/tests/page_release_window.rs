//! A wrong free of a block the maintainer is returning to the OS aborts.
//!
//! While the maintainer `madvise`s an idle free block it holds no zone
//! lock, and the block is off every free list. It used to be marked
//! `ALLOCATED` meanwhile, so a (wrong) `free_pages` of it passed
//! validation and put it on a free list, and the maintainer then inserted
//! it a second time: the block could be handed out twice. It is now
//! `RELEASING`, which the free's claim rejects with a one-line message.
//!
//! Deterministic with an interrupt point (feature `interrupt-points`): the
//! hook at `ReleaseWindow` frees the block being released. The scenario runs
//! in a child process (this binary re-executed with `ANYALLOC_BAD_INPUT`
//! set); the parent requires `SIGABRT` and exactly the announced line.

mod release_window;
mod watchdog;

use std::os::unix::process::ExitStatusExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::interrupt::{set_hook, Site};
use anyalloc::{Heap, MAX_ORDER};

static HEAP: AtomicPtr<Heap> = AtomicPtr::new(std::ptr::null_mut());
/// The block to free (wrongly) inside the release window.
static VICTIM: AtomicUsize = AtomicUsize::new(0);

fn hook(site: Site) {
    if site != Site::ReleaseWindow {
        return;
    }
    let p = VICTIM.swap(0, Ordering::Relaxed);
    if p != 0 {
        // SAFETY: deliberately wrong: the block was freed already and is
        // being released by the maintenance pass this hook interrupted; the
        // allocator must detect it and abort.
        let heap = unsafe { &*HEAP.load(Ordering::Acquire) };
        // SAFETY: as above.
        unsafe {
            heap.pages()
                .free_pages(NonNull::new(p as *mut u8).unwrap(), MAX_ORDER)
        };
    }
}

fn child() {
    let (heap, p) = release_window::heap_with_a_block_to_release();
    HEAP.store(heap as *const Heap as *mut Heap, Ordering::Release);
    VICTIM.store(p.as_ptr() as usize, Ordering::Relaxed);
    println!(
        "\nEXPECT anyalloc: double free of page {:#x}, a free block being returned to the OS (order {MAX_ORDER})",
        p.as_ptr() as usize
    );
    set_hook(Some(hook));
    // Idle for two epochs: the second pass releases it, and the hook frees
    // it inside the madvise window.
    for _ in 0..3 {
        heap.maintain();
    }
    set_hook(None);
    let released = heap.stats().released_to_os_bytes;
    println!(
        "SURVIVED (released {released} bytes, victim left {:#x})",
        VICTIM.load(Ordering::Relaxed)
    );
    std::process::exit(0);
}

#[test]
fn wrong_free_inside_the_release_window_aborts() {
    if watchdog::in_child() {
        child();
    }
    // A watchdog, not a timing assertion: the child needs milliseconds; a
    // block inserted twice can make a free-list walk loop forever.
    let watchdog::Outcome {
        status,
        stdout,
        stderr,
    } = watchdog::run(
        "wrong_free_inside_the_release_window_aborts",
        &[],
        Duration::from_secs(60),
        "the wrong free (a corrupted free list?)",
    );
    assert!(
        !stdout.contains("SURVIVED"),
        "the wrong free was accepted:\n{stdout}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "the child was not killed by SIGABRT: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        status
    );
    let expected = stdout
        .lines()
        .find_map(|l| l.split_once("EXPECT ").map(|(_, m)| m))
        .expect("the child announced its message");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("anyalloc:"))
        .collect();
    assert_eq!(lines, [expected], "stderr:\n{stderr}");
    println!("aborted with: {}", lines[0]);
}
