//! Blocks that a thread the fork waits for allocates while the fork holds
//! every heap lock (mapped beside the heap), freed with `free_sized` and
//! `free_aligned_sized` (tests/c/fork_free_sized.c). With the
//! `debug-checks` feature the size check took their page of usable size
//! for another allocation size and aborted.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn sized_frees_of_blocks_served_during_a_fork() {
    run_four_ways(
        "fork_free_sized.c",
        "fork_free_sized",
        &[],
        "fork_free_sized: ok",
        Duration::from_secs(45),
    );
}
