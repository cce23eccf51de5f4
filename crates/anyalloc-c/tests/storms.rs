//! Signal storms in C, each run preloaded and linked, with and without
//! rseq (`GLIBC_TUNABLES=glibc.pthread.rseq=0`). Bounded by counts (each
//! program stops after a fixed amount of work) with a watchdog inside
//! (`alarm`) and a timeout here, so a hang fails.
//!
//! * `storm_api.c`: handlers and worker threads call the whole interface
//!   (malloc, calloc, realloc growing, shrinking and crossing 4 MiB,
//!   reallocarray, posix_memalign, aligned_alloc and memalign up to 64 KiB,
//!   malloc_usable_size, free, free_sized, free_aligned_sized); every block
//!   carries a pattern checked at every step; a handler's NULLs are counted.
//! * `storm_threads.c`: threads created and exiting all the time (joinable,
//!   `pthread_exit`, detached) while signals land on them, their key and
//!   thread_local destructors free and allocate, and their blocks are freed
//!   by other threads (and handlers) after they exited.
//! * `storm_fork.c`: fork, posix_spawn and system from several threads under
//!   signals whose handlers allocate and fork; children allocate and free;
//!   the main thread calls getaddrinfo, strdup, qsort and open_memstream.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);

/// Compiles `source` once plain (for the preload) and once linked, then
/// runs both with and without rseq; each run must print `"<name>: ok"`,
/// exit 0 and write nothing on stderr.
fn storm(source: &str, name: &str) {
    let preload_exe: PathBuf = compile::<&str>(&[source], name, &["-lrt"]);
    let mut args = vec!["-lrt".to_string()];
    args.extend(link_args());
    let linked_exe = compile(&[source], &format!("{name}_linked"), &args);
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
            o.success() && o.stdout.contains(&format!("{name}: ok")),
            "{name} {how} (rseq off: {rseq_off}): {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
        assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
    }
}

#[test]
fn handlers_and_threads_call_the_whole_interface() {
    storm("storm_api.c", "storm_api");
}

#[test]
fn threads_start_and_exit_under_signals() {
    storm("storm_threads.c", "storm_threads");
}

#[test]
fn fork_spawn_and_system_under_signals_whose_handlers_allocate_and_fork() {
    storm("storm_fork.c", "storm_fork");
}
