//! A pointer libanyalloc did not hand out, passed to `free` (or `realloc`,
//! `malloc_usable_size`, `anyalloc_free_nolock`), aborts the process with a
//! one-line message.

mod common;

use common::*;
use std::time::Duration;

/// The linked program, compiled once for all the tests of this binary
/// (they run in parallel).
fn foreign_exe() -> &'static std::path::Path {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| compile(&["foreign.c"], "foreign", &link_args()))
}

fn expect_one_line_abort(mode: &str) -> String {
    let mut cmd = std::process::Command::new(foreign_exe());
    cmd.arg(mode);
    let o = run(cmd, Duration::from_secs(20));
    assert_eq!(
        o.signal(),
        Some(libc::SIGABRT),
        "{mode}: expected SIGABRT, got {} (stdout {:?}, stderr {:?})",
        o.describe(),
        o.stdout,
        o.stderr
    );
    assert!(!o.stdout.contains("survived"), "{mode}: {}", o.stdout);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{mode}: stderr {:?}", o.stderr);
    assert!(lines[0].starts_with("anyalloc: "), "{mode}: {:?}", lines[0]);
    println!("{mode:>10}: {}", lines[0]);
    lines[0].to_string()
}

#[test]
fn free_of_a_stack_address_aborts_with_one_line() {
    let line = expect_one_line_abort("stack");
    assert!(line.starts_with("anyalloc: free of 0x"), "{line}");
}

#[test]
fn free_of_a_static_address_aborts_with_one_line() {
    expect_one_line_abort("static");
}

#[test]
fn free_of_an_interior_pointer_aborts_with_one_line() {
    let line = expect_one_line_abort("interior");
    assert!(line.contains("not the start of an object"), "{line}");
}

/// Each message names the function the program called: `realloc` and
/// `malloc_usable_size` (and `free` with `M_PERTURB` on, which reads the
/// block's size to fill it) named the heap's internal `usable_size`.
#[test]
fn realloc_usable_size_and_free_nolock_of_foreign_pointers_abort() {
    for (mode, call) in [
        ("realloc", "realloc"),
        ("usable", "malloc_usable_size"),
        ("perturb", "free"),
        ("nolock", "free"),
    ] {
        let line = expect_one_line_abort(mode);
        assert!(
            line.starts_with(&format!("anyalloc: {call} of 0x")),
            "{mode}: {line}"
        );
    }
}

#[test]
fn unbalanced_nolock_exit_aborts_with_one_line() {
    let line = expect_one_line_abort("scope-exit");
    assert!(line.contains("anyalloc_nolock_exit"), "{line}");
}

/// The same under LD_PRELOAD (the program is not linked against us).
#[test]
fn preloaded_free_of_a_stack_address_aborts() {
    let exe = compile(&["foreign.c"], "foreign_plain", &["-DPLAIN"]);
    let mut cmd = preloaded(&exe);
    cmd.arg("stack");
    let o = run(cmd, Duration::from_secs(20));
    assert_eq!(o.signal(), Some(libc::SIGABRT), "{}", o.describe());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", o.stderr);
    assert!(
        lines[0].starts_with("anyalloc: free of 0x"),
        "{:?}",
        lines[0]
    );
    println!("preloaded: {}", lines[0]);
}
