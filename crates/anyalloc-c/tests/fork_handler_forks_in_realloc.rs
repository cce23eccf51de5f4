//! A fork while a signal handler that interrupted a huge `realloc` (a move
//! with `mremap`, counted in the heap's `remaps`) forks too, with a
//! `pthread_atfork` handler that holds a mutex across each fork
//! (tests/c/fork_handler_forks_in_realloc.c). The heap's prepare handler
//! waits for moves in progress; the mover's handler waits for the mutex,
//! which the first fork holds. Before that wait was bounded, every run hung
//! at the first round; with the wait bounded, each round stalled 1 s. Now a
//! move blocks signals while it is counted, so the handler runs before or
//! after it, and no round waits.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn fork_while_a_handler_that_interrupted_a_huge_realloc_forks() {
    run_four_ways(
        "fork_handler_forks_in_realloc.c",
        "fork_handler_forks_in_realloc",
        &["3"],
        "fork_handler_forks_in_realloc: ok",
        Duration::from_secs(20),
    );
}
