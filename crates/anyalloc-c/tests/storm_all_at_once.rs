//! Every kind of caller at once under `libanyalloc.so`
//! (tests/c/storm_all_at_once.c): threads churning on the whole interface
//! under per-thread timers whose SA_NODEFER handlers nest in themselves,
//! allocate, realloc, free, call malloc_trim and fork; a process-wide
//! SIGALRM (setitimer) that lands on any thread, the forkers inside their
//! fork and the trimmer inside malloc_trim included; threads that fork
//! without a pause (children free their parent's blocks, allocate, trim and
//! fork a grandchild); short-lived threads, some ending in pthread_exit,
//! whose key destructors free and allocate; a thread that calls
//! malloc_trim, mallinfo2 and malloc_info without a pause. Every block is
//! checked, every child must exit 0 in time, and the heap's counters must
//! be back afterwards. Under glibc's malloc the program deadlocks.
//!
//! Run four ways (`common::run_four_ways`).

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(90);
/// Milliseconds of storm per run.
const STORM_MS: &str = "1000";

#[test]
fn every_kind_of_caller_at_once() {
    run_four_ways(
        "storm_all_at_once.c",
        "storm_all_at_once",
        &[STORM_MS],
        "storm_all_at_once: ok",
        TIMEOUT,
    );
}
