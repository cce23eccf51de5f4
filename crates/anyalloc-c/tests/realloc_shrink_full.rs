//! `realloc` to a smaller size with no memory left (tests/c/realloc_shrink_full.c,
//! under a hard cap: `ANYALLOC_MEMORY=8m ANYALLOC_GROW=0`): glibc's realloc
//! fails only to make a block bigger, and programs shrink buffers without a
//! fallback. It returned `NULL` with `ENOMEM` when the smaller size class
//! had no room, for objects, page blocks and huge blocks alike; now the
//! block stays where it is.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn realloc_shrinks_in_place_when_the_heap_is_full() {
    let preload_exe = compile::<&str>(&["realloc_shrink_full.c"], "realloc_shrink_full", &[]);
    let linked_exe = compile(
        &["realloc_shrink_full.c"],
        "realloc_shrink_full_linked",
        &link_args(),
    );
    for (how, mut cmd) in [
        ("preloaded", preloaded(&preload_exe)),
        ("linked", plain(&linked_exe)),
    ] {
        cmd.env("ANYALLOC_MEMORY", "8m").env("ANYALLOC_GROW", "0");
        let o = run(cmd, Duration::from_secs(30));
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success() && o.stdout.contains("realloc_shrink_full: ok"),
            "{how}: {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
    }
}
