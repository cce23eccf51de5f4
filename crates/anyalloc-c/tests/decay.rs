//! Without the maintenance thread (the library's default), the program's
//! own `malloc`/`free` calls give idle memory back to the OS (the core's
//! inline decay, `Config::decay`); `ANYALLOC_DECAY=0` keeps it resident.
//! Before the inline decay, a C program that freed 200 MB of 300 KB blocks
//! kept them resident for good. (`c/decay.c`: no duration is asserted.)

mod common;
use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Preloaded and linked, with and without rseq: the freed burst leaves
/// the resident set while the program goes on calling `malloc`/`free`.
#[test]
fn freed_memory_goes_back_without_the_maintenance_thread() {
    run_four_ways("decay.c", "decay", &["back"], "ok:", TIMEOUT);
}

/// `ANYALLOC_DECAY=0`: the same calls give nothing back.
#[test]
fn decay_off_keeps_the_memory() {
    let exe = compile::<&str>(&["decay.c"], "decay", &["-lrt"]);
    let mut cmd = preloaded(&exe);
    cmd.arg("kept").env("ANYALLOC_DECAY", "0");
    let o = run(cmd, TIMEOUT);
    println!("ANYALLOC_DECAY=0: {} {}", o.describe(), o.stdout.trim());
    assert!(
        o.success() && o.stdout.starts_with("ok:"),
        "{}\nstdout: {}\nstderr: {}",
        o.describe(),
        o.stdout,
        o.stderr
    );
    assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
}
