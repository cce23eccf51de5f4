//! A time-bounded storm against the moves of huge blocks (C `realloc` above
//! 4 MiB to above 4 MiB: `Heap::remap_huge`, `mremap`) and the forks that
//! wait for them (tests/c/storm_realloc_huge_fork.c): threads realloc their
//! huge blocks between sizes above and below 4 MiB, small sizes and back,
//! checking a pattern at each block's start and end after every realloc,
//! under two per-thread timers whose handlers malloc, realloc (huge too)
//! and free, one of them forking now and then; other threads do the same
//! and fork (the child checks, reallocs and frees its thread's blocks) and
//! posix_spawn `true`. Every child must exit 0 within 10 s, and the heap's
//! counters must come back after the storm.
//!
//! Run four ways (`common::run_four_ways`).

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);
/// Milliseconds of storm per run.
const STORM_MS: &str = "1500";

#[test]
fn huge_reallocs_against_forks_and_handlers() {
    run_four_ways(
        "storm_realloc_huge_fork.c",
        "storm_realloc_huge_fork",
        &[STORM_MS],
        "storm_realloc_huge_fork: ok",
        TIMEOUT,
    );
}
