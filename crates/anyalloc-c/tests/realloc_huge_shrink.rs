//! `realloc` of a huge block to a smaller huge size gives the tail back to
//! the OS (tests/c/realloc_huge_shrink.c): a resident 100 MiB block shrunk
//! to 51 MiB stayed resident whole, where glibc's `mremap` frees 49 MiB.
//! And a huge block grown by 4 KiB at a time moves a few times, not once
//! per call.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn realloc_shrinking_a_huge_block_returns_its_tail() {
    let preload_exe = compile::<&str>(&["realloc_huge_shrink.c"], "realloc_huge_shrink", &[]);
    let linked_exe = compile(
        &["realloc_huge_shrink.c"],
        "realloc_huge_shrink_linked",
        &link_args(),
    );
    for (how, cmd) in [
        ("preloaded", preloaded(&preload_exe)),
        ("linked", plain(&linked_exe)),
    ] {
        let o = run(cmd, Duration::from_secs(30));
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success() && o.stdout.contains("realloc_huge_shrink: ok"),
            "{how}: {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
    }
}
