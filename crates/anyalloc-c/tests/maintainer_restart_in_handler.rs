//! With `ANYALLOC_MAINTENANCE=1`, a forked child's first normal-path
//! `malloc`/`free` restarts the maintenance thread with `pthread_create`.
//! When that call is a signal handler's that interrupted the child's own
//! `pthread_create` inside glibc's stack cache lock, the handler's
//! `pthread_create` waits for that lock for ever (seen in gdb:
//! `handler -> malloc -> alloc_slow -> restart_maintainer_if_owed ->
//! Heap::start_maintenance -> pthread_create -> get_cached_stack ->
//! __lll_lock_wait_private`, over the interrupted `get_cached_stack`).
//! Deterministic under gdb (tests/c/maintainer_restart_in_handler.c).
//! Not fixed (a handler cannot be told from ordinary code on that path),
//! so ignored: run it with `--ignored`. With the maintenance thread off (the
//! default) the same scenario completes: checked by the second run.

mod common;

use common::*;
use std::time::Duration;

fn run_under_gdb(maintenance: &str) -> Outcome {
    let exe = compile::<&str>(
        &["maintainer_restart_in_handler.c"],
        "maintainer_restart_in_handler",
        &[],
    );
    let preload = format!("set environment LD_PRELOAD {}", lib_path().display());
    let mut cmd = std::process::Command::new("gdb");
    cmd.args(["-nx", "-batch", "-iex", "set debuginfod enabled off"]);
    for c in [
        preload.as_str(),
        "set pagination off",
        "set follow-fork-mode child",
        "set detach-on-fork on",
        "handle SIGUSR1 nostop noprint pass",
        "catch fork",
        "run",
        "break __nptl_stack_list_del",
        "continue",
        "delete 2",
        "signal SIGUSR1",
    ] {
        cmd.args(["-ex", c]);
    }
    cmd.arg(&exe).env("ANYALLOC_MAINTENANCE", maintenance);
    run(cmd, Duration::from_secs(30))
}

#[test]
#[ignore = "known deadlock: the maintainer is restarted from a signal handler in a forked child"]
fn maintainer_restart_from_a_handler_that_interrupted_pthread_create() {
    if !require("gdb") {
        return;
    }
    let o = run_under_gdb("0");
    assert!(
        o.stdout.contains("handler done") && o.stdout.contains("child done"),
        "without the maintainer: {}\n{}",
        o.describe(),
        o.stdout
    );
    let o = run_under_gdb("1");
    assert!(
        o.stdout.contains("handler done") && o.stdout.contains("child done"),
        "with the maintainer: {}\n{}",
        o.describe(),
        o.stdout
    );
}
