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
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(45);

/// Runs the storm `source` four ways (`common::run_four_ways`): each run
/// must print `"<name>: ok"`.
fn storm(source: &str, name: &str) {
    run_four_ways(source, name, &[], &format!("{name}: ok"), TIMEOUT);
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
