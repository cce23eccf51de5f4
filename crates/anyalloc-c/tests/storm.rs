//! The signal storm (tests/c/storm.c) under LD_PRELOAD=libanyalloc.so: two
//! signals whose handlers call malloc/calloc/free interrupt threads that
//! churn on malloc/realloc/free, while short-lived threads come and go. It
//! must finish clean, run after run. The same program under glibc's malloc
//! is run once as a demonstration (expected to deadlock or crash; not
//! asserted).

mod common;

use common::*;
use std::time::Duration;

const RUNS: usize = 3;
const SECONDS: &str = "2";

#[test]
fn signal_storm_finishes_clean_under_anyalloc_and_not_under_glibc() {
    let exe = compile::<&str>(&["storm.c"], "storm", &["-lrt"]);
    for run_no in 1..=RUNS {
        let mut cmd = preloaded(&exe);
        cmd.arg(SECONDS);
        let o = run(cmd, Duration::from_secs(20));
        println!(
            "anyalloc run {run_no}: {} in {:.1} s: {}",
            o.describe(),
            o.elapsed.as_secs_f64(),
            o.stdout.trim()
        );
        assert!(
            o.success() && o.stdout.contains("storm: ok"),
            "storm under anyalloc, run {run_no}: {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
        assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
    }

    // The demonstration: glibc's malloc is not async-signal-safe.
    let mut cmd = plain(&exe);
    cmd.arg(SECONDS);
    let o = run(cmd, Duration::from_secs(5));
    let first_err = o.stderr.lines().next().unwrap_or("");
    println!(
        "glibc (demonstration, not asserted): {}{}{}",
        o.describe(),
        if o.stdout.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", o.stdout.trim())
        },
        if first_err.is_empty() {
            String::new()
        } else {
            format!(" [stderr: {first_err}]")
        },
    );
}
