//! `fork` against stdio's list lock (tests/c/fork_stdio.c): a thread holding
//! glibc's list of open `FILE`s (inside `fflush(NULL)`) is interrupted by a
//! signal handler that allocates and frees, while other threads fork. The
//! heap's prepare handler used to take every heap lock before glibc's
//! `fork` took the list lock: the handler waited for a heap lock held by
//! the forking thread, which waited for the list lock, for ever (every run
//! hung). Linked and preloaded, with and without rseq.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);

#[test]
fn fork_while_a_handler_interrupts_stdio_holding_its_list_lock() {
    let preload_exe = compile::<&str>(&["fork_stdio.c"], "fork_stdio", &["-lrt"]);
    let mut args = vec!["-lrt".to_string()];
    args.extend(link_args());
    let linked_exe = compile(&["fork_stdio.c"], "fork_stdio_linked", &args);
    for (how, rseq_off) in [
        ("preloaded", false),
        ("linked", false),
        ("preloaded", true),
        ("linked", true),
    ] {
        let mut cmd = if how == "preloaded" {
            preloaded(&preload_exe)
        } else {
            plain(&linked_exe)
        };
        if rseq_off {
            cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
        }
        let o = run(cmd, TIMEOUT);
        println!(
            "{how}{}: {} in {:.1} s: {}",
            if rseq_off { ", rseq off" } else { "" },
            o.describe(),
            o.elapsed.as_secs_f64(),
            o.stdout.trim()
        );
        assert!(
            o.success() && o.stdout.contains("fork_stdio: ok"),
            "fork_stdio {how} (rseq off: {rseq_off}): {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
        assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
    }
}
