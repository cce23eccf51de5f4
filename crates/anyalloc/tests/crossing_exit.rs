//! Blocks freed where a thread or the process is going away: by thread-local
//! destructors at thread exit (blocks the thread allocated, and blocks of
//! threads that exited before it), and by an `atexit` handler after every
//! thread that allocated them has exited. Through `Global` (this binary's
//! global allocator), `NoLock` and a `Heap` (every way out, a group's
//! blocks included); the destructors allocate too. At exit the heap counts
//! no live block and the group no charge.

mod nolock_retry;
mod watchdog;

use std::alloc::Layout;
use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyalloc::{Config, Group, Heap, NoLock};
use nolock_retry::first;

#[global_allocator]
static A: anyalloc::Global = anyalloc::Global;

static HEAP: OnceLock<Heap> = OnceLock::new();
static GROUP: OnceLock<Arc<Group>> = OnceLock::new();
/// Heap blocks (address, size) left for later: the next thread's
/// destructors take some, the `atexit` handler the rest.
static LEFT: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Heap blocks of a few classes and page orders, a third charged to the
/// group; each filled with its size's low byte.
fn heap_blocks(n: usize, seed: usize) -> Vec<(usize, usize)> {
    let (h, g) = (HEAP.get().unwrap(), GROUP.get().unwrap());
    (0..n)
        .map(|i| {
            let size = [24, 100, 3000, 8192, 20_000, 300_000][(i + seed) % 6];
            let p = match i % 3 {
                0 => h.alloc(layout(size)),
                // Four threads share the heap: a nolock call may meet a lock
                // another holds (`nolock_retry`).
                1 => Some(first(|| h.alloc_nolock(layout(size)).ok_or("busy"))),
                _ => h.alloc_in(layout(size), g),
            }
            .expect("memory to spare");
            // SAFETY: a fresh block of `size` bytes.
            unsafe { p.as_ptr().write_bytes(size as u8, size) };
            (p.as_ptr() as usize, size)
        })
        .collect()
}

/// Checks a heap block's contents and frees it through a way out chosen
/// by `how`.
///
/// # Safety
/// `(addr, size)` is a live block of `heap_blocks`, freed once.
unsafe fn free_heap_block((addr, size): (usize, usize), how: usize) {
    let h = HEAP.get().unwrap();
    let p = NonNull::new(addr as *mut u8).unwrap();
    // SAFETY: per the caller.
    let intact = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) }
        .iter()
        .all(|&b| b == size as u8);
    if !intact {
        die(b"crossing_exit: a heap block was damaged\n");
    }
    // SAFETY: per the caller.
    unsafe {
        match how % 4 {
            0 => h.free(p),
            1 => h.free_nolock(p),
            2 => h.free_sized(p, layout(size)),
            _ => h.free_nolock_sized(p, layout(size)),
        }
    }
}

fn die(msg: &[u8]) -> ! {
    // SAFETY: writes the bytes of `msg`; _exit has no preconditions.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(3)
    }
}

/// What a thread leaves to its thread-local destructor.
struct Holder {
    boxes: Vec<Box<[u8]>>,
    nolock: Vec<allocator_api2::boxed::Box<[u8; 300], NoLock>>,
    heap: Vec<(usize, usize)>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Allocates while the thread goes away...
        let more: Vec<Vec<u8>> = (0..100).map(|i| vec![i as u8; i * 37 + 1]).collect();
        assert!(more.iter().enumerate().all(|(i, v)| v[i * 37] == i as u8));
        // ...frees what the thread allocated, through every way...
        self.boxes.clear();
        self.nolock.clear();
        for (i, b) in self.heap.drain(..).enumerate() {
            // SAFETY: this thread's live blocks, freed once.
            unsafe { free_heap_block(b, i) };
        }
        // ...and some blocks of threads that exited before this one.
        let theirs: Vec<(usize, usize)> = {
            let mut left = LEFT.lock().unwrap();
            let keep = left.len() / 2;
            left.split_off(keep)
        };
        for (i, b) in theirs.into_iter().enumerate() {
            // SAFETY: taken out of `LEFT`: ours, live, freed once.
            unsafe { free_heap_block(b, i + 1) };
        }
        // It leaves some of its own for the next ones and for `atexit`.
        let mine = heap_blocks(30, 3);
        LEFT.lock().unwrap().extend(mine);
    }
}

std::thread_local! {
    static HELD: RefCell<Option<Holder>> = const { RefCell::new(None) };
}

extern "C" fn at_exit() {
    // Every thread that allocated these has exited.
    let left = std::mem::take(&mut *LEFT.lock().unwrap());
    for (i, b) in left.into_iter().enumerate() {
        // SAFETY: taken out of `LEFT`: ours, live, freed once.
        unsafe { free_heap_block(b, i) };
    }
    let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![1u8; i * 13 + 1]).collect();
    drop(v);
    // (The global heap's maintainer may hold a lock the call tries.)
    let b = first(|| allocator_api2::boxed::Box::try_new_in([7u8; 100], NoLock));
    drop(b);
    let h = HEAP.get().unwrap();
    h.drain();
    let s = h.stats();
    if (s.objects_in_use, s.large_in_use, s.huge_in_use) != (0, 0, 0) {
        die(b"crossing_exit: the heap counts live blocks at exit\n");
    }
    if s.pages.free_pages != s.pages.total_pages {
        die(b"crossing_exit: pages still in use at exit\n");
    }
    if GROUP.get().unwrap().usage() != 0 {
        die(b"crossing_exit: the group is still charged at exit\n");
    }
    let done = b"crossing_exit: every block freed at exit\n";
    // SAFETY: writes the bytes of `done`.
    unsafe { libc::write(2, done.as_ptr().cast(), done.len()) };
}

#[test]
fn blocks_freed_by_thread_local_destructors_and_at_exit() {
    const NAME: &str = "blocks_freed_by_thread_local_destructors_and_at_exit";
    if !watchdog::in_child() {
        for env in [&[][..], &[watchdog::RSEQ_OFF][..]] {
            let out = watchdog::run_ok(NAME, env, Duration::from_secs(60), NAME);
            assert!(
                out.stderr.contains("every block freed at exit"),
                "{env:?}: the atexit handler did not finish.\nstderr:\n{}",
                out.stderr
            );
        }
        return;
    }
    HEAP.get_or_init(|| Heap::new(Config::default().memory(64 << 20).maintenance(false)).unwrap());
    GROUP.get_or_init(|| Group::new("exit", None, None));
    // SAFETY: registers a handler that lives for the whole process.
    assert_eq!(unsafe { libc::atexit(at_exit) }, 0);
    for round in 0..4 {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let holder = Holder {
                        boxes: (0..200)
                            .map(|i| vec![t as u8; i * 41 + 1].into_boxed_slice())
                            .collect(),
                        nolock: (0..50)
                            .map(|_| {
                                first(|| allocator_api2::boxed::Box::try_new_in([2u8; 300], NoLock))
                            })
                            .collect(),
                        heap: heap_blocks(60, round + t),
                    };
                    HELD.with(|h| *h.borrow_mut() = Some(holder));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
