//! A time-bounded storm against glibc's own locks that its `fork` takes
//! after every prepare handler (tests/c/storm_glibc_fork.c): threads loop
//! on fopen/fprintf/fclose, fflush(NULL), getpwuid and getaddrinfo under
//! two per-thread timers (so handlers nest) whose handlers malloc, calloc,
//! realloc across 4 MiB, posix_memalign and free, while other threads fork
//! and posix_spawn under the same timers. Unlike `fork_glibc_locks`, every
//! thread is interrupted, every lock kind is mixed in one run, and the
//! heap's counters must come back after the storm. Without normal-path
//! waiters giving way to a fork's hold (before f4cc659) every run hung.
//!
//! Run four ways (`common::run_four_ways`), then once more preloaded with
//! polling locks (`ANYALLOC_NOLOCK_SYSCALLS=0`) and the maintenance thread
//! (`ANYALLOC_MAINTENANCE=1`).

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);
/// Milliseconds of storm per run.
const STORM_MS: &str = "1200";
const OK: &str = "storm_glibc_fork: ok";

#[test]
fn fork_storm_against_stdio_and_nss_locks() {
    run_four_ways(
        "storm_glibc_fork.c",
        "storm_glibc_fork",
        &[STORM_MS],
        OK,
        TIMEOUT,
    );
    let mut cmd = preloaded(out_dir().join("storm_glibc_fork"));
    cmd.arg(STORM_MS)
        .env("ANYALLOC_NOLOCK_SYSCALLS", "0")
        .env("ANYALLOC_MAINTENANCE", "1");
    let o = run(cmd, TIMEOUT);
    println!(
        "storm_glibc_fork preloaded, polling locks, maintenance: {} in {:.1} s: {}",
        o.describe(),
        o.elapsed.as_secs_f64(),
        o.stdout.trim()
    );
    assert!(
        o.success() && o.stdout.contains(OK),
        "storm_glibc_fork (polling locks, maintenance): {}\nstdout: {}\nstderr: {}",
        o.describe(),
        o.stdout,
        o.stderr
    );
    assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
}
