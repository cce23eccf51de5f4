//! `fork` while another thread starts the heap's maintenance thread: the
//! thread is spawned, its start not yet published. The forked child has no
//! such thread; once it forgets the parent's
//! (`Heap::forget_maintainer_after_fork`), its heap must give idle memory
//! back from its own calls again (the inline decay, `Config::decay`).
//!
//! The start switches the inline decay off for the thread. It did so
//! before it published the start (`RUNNING`): a fork in between left the
//! child a start in progress (`STARTING`), which `forget` drops without
//! counting it as a thread of the parent, so it left the decay off too:
//! the child had neither, and no pass ever ran (unless it started a thread
//! of its own).
//!
//! Deterministic, with an interrupt point: the start pauses at
//! `Site::MaintainerSpawned` (spawned, not published) while the main thread
//! forks. The child forgets the parent's thread and makes slow-path calls
//! until a decay pass runs (`maintenance_passes` goes up), for at most
//! 5 s (the parent waits 10 s for the child).

mod script;
mod watchdog;

use std::alloc::Layout;
use std::time::{Duration, Instant};

use anyalloc::interrupt::Site;
use anyalloc::{Config, Heap};

use script::Pause;

/// Role 1's start pauses spawned, not published (step 1), until the fork
/// (step 2).
static SCRIPT: [Pause; 1] = [Pause::new(1, Site::MaintainerSpawned, 0, 2)];

#[test]
fn fork_while_the_maintainer_start_is_unpublished() {
    if watchdog::ran_in_child(
        "fork_while_the_maintainer_start_is_unpublished",
        Duration::from_secs(90),
        "fork between a maintainer's spawn and its published start",
    ) {
        return;
    }
    let heap = Heap::new(Config::default().memory(64 << 20).maintenance(false)).expect("heap");
    let l = Layout::from_size_align(300_000, 8).unwrap();
    script::play(&SCRIPT);
    let (status, started) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            script::act(1);
            heap.start_maintenance()
        });
        script::reached(1, "the start paused after the spawn");
        let status = script::fork_child(2, || {
            // No thread of the parent runs here (none was published).
            heap.forget_maintainer_after_fork();
            // (The parent's thread may have run passes before the fork.)
            let before = heap.stats().maintenance_passes;
            let start = Instant::now();
            while heap.stats().maintenance_passes == before
                && start.elapsed() < Duration::from_secs(5)
            {
                let Some(p) = heap.alloc(l) else {
                    return 4;
                };
                // SAFETY: a live block of 300,000 bytes, ours, freed once.
                unsafe {
                    std::ptr::write_bytes(p.as_ptr(), 7, 4096);
                    heap.free(p);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if heap.stats().maintenance_passes == before {
                3
            } else {
                0
            }
        });
        (status, t.join().unwrap())
    });
    script::end();
    assert!(started, "the parent's start went on");
    script::assert_child_ok(
        status,
        "the child had neither a maintenance thread nor the inline decay: no pass in 5 s (3), or no memory (4)",
    );
}
