//! Re-entry at every instruction of every restartable sequence of
//! `libanyalloc.so` (tests/c/rseq_step.c): the C library's own copies of
//! the fast paths, which the Rust tests (`heap_rseq_singlestep.rs`,
//! `global_rseq_singlestep.rs` in the core crate) never run. An execution
//! breakpoint at each byte of each sequence, a round of `malloc`,
//! `calloc`, `realloc`, `free`, `free_sized` and the nolock pair, and a
//! handler that calls them itself on the same CPU: no block handed out
//! twice, every pattern intact, every interruption inside a section
//! restarted, the handler's calls served, nothing left in use.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn every_instruction_of_the_librarys_sequences_survives_reentry() {
    let mut args = vec!["-fno-builtin".to_string()];
    args.extend(link_args());
    let exe = compile(&["rseq_step.c"], "rseq_step", &args);
    let o = run(plain(&exe), Duration::from_secs(120));
    print!("{}", o.stdout);
    if o.success() && o.stdout.contains("rseq step: skipped:") {
        assert!(
            std::env::var("ANYALLOC_ALLOW_SKIP").is_ok_and(|v| v == "1"),
            "{}; set ANYALLOC_ALLOW_SKIP=1 to skip",
            o.stdout.trim()
        );
        return;
    }
    assert!(
        o.success() && o.stdout.contains("rseq step: ok"),
        "rseq_step: {}\nstdout: {}\nstderr: {}",
        o.describe(),
        o.stdout,
        o.stderr
    );
    assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
}
