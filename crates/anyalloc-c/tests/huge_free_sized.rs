//! A huge block served whole from a freed mapping kept for reuse, freed
//! with `free_sized` / `free_aligned_sized` and the size it was asked for
//! (tests/c/huge_free_sized.c). A kept mapping of up to twice the block's
//! page-rounded size came whole: up to two pages more than twice the
//! request, and with the `debug-checks` feature the size check took it for
//! another allocation size and aborted.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn sized_frees_of_huge_blocks_from_kept_mappings() {
    run_four_ways(
        "huge_free_sized.c",
        "huge_free_sized",
        &[],
        "huge_free_sized: ok",
        Duration::from_secs(60),
    );
}
