//! Every exported function's edge cases, from C and C++; initialisation
//! from inside another library's constructor; fork; exiting threads; TLS
//! modules loaded with dlopen; the maintenance thread switch.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// `extra` followed by the arguments that link libanyalloc.
fn linked(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.extend(link_args());
    v
}

#[test]
fn c_semantics_of_every_exported_function() {
    let exe = compile(&["api.c"], "api", &linked(&["-fno-builtin"]));
    let o = run(std::process::Command::new(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "api: {}", o.describe());
    assert!(o.stdout.contains("checks passed"), "{}", o.stdout);
}

#[test]
fn cxx_new_delete_exceptions_and_threads() {
    if std::process::Command::new("c++")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: no c++ compiler");
        return;
    }
    let exe = compile_with("c++", &["cxx.cpp"], "cxx", &linked(&["-std=c++17"]));
    let o = run(std::process::Command::new(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "cxx: {}", o.describe());
    assert!(o.stdout.contains("cxx: ok"));
}

/// A library initialised before ours allocates in its constructor: the heap
/// is created from inside that `malloc` (the loader's situation too).
#[test]
fn heap_created_inside_another_constructors_malloc() {
    let out = out_dir();
    compile(
        &["early_lib.c"],
        "libanyalloc_c_early.so",
        &["-shared", "-fPIC"],
    );
    let mut args = link_args();
    // Listed after us: initialised before us, but binds malloc to us.
    args.push(format!("-L{}", out.display()));
    args.push("-lanyalloc_c_early".into());
    args.push(format!("-Wl,-rpath,{}", out.display()));
    let exe = compile(&["early_main.c"], "early_main", &args);
    let o = run(std::process::Command::new(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "early: {} {}", o.describe(), o.stdout);
}

#[test]
fn fork_while_threads_allocate() {
    let exe = compile::<&str>(&["fork.c"], "fork", &[]);
    let o = run(preloaded(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "fork: {}", o.describe());
    assert!(o.stdout.contains("fork: ok 60"));
}

/// Caches are per CPU, not per thread: threads that exit strand nothing.
#[test]
fn threads_that_exit_strand_nothing() {
    let exe = compile::<&str>(&["thread_exit.c"], "thread_exit", &[]);
    let o = run(preloaded(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "thread_exit: {}", o.describe());
    let kib: u64 = o
        .stdout
        .split("peak rss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("peak rss in the output");
    // 4000 threads x ~256 KiB each would be ~1 GiB if anything stayed behind
    // per thread; one wave of 8 threads needs a few MiB (4-5 MiB measured).
    assert!(kib < 256 << 10, "peak RSS {kib} KiB");
}

/// More dlopen'ed TLS modules than a thread's DTV holds: glibc grows the
/// DTV with malloc from inside __tls_get_addr (and frees closed modules'
/// blocks there). Our routing words are initial-exec TLS, so that malloc
/// does not enter __tls_get_addr again.
#[test]
fn dlopen_of_many_tls_modules() {
    let dir = out_dir().join("tls-modules");
    std::fs::create_dir_all(&dir).unwrap();
    let first = compile(
        &["tls_module.c"],
        "tls-modules/libtls0.so",
        &["-shared", "-fPIC"],
    );
    const N: usize = 40;
    for i in 1..N {
        std::fs::copy(&first, dir.join(format!("libtls{i}.so"))).unwrap();
    }
    let exe = compile(&["dlopen_tls.c"], "dlopen_tls", &["-ldl"]);
    let mut cmd = preloaded(&exe);
    cmd.arg(&dir).arg(N.to_string());
    let o = run(cmd, TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "dlopen_tls: {}", o.describe());
}

/// No maintenance thread unless ANYALLOC_MAINTENANCE=1 asks for one.
#[test]
fn maintenance_thread_only_on_request() {
    let exe = compile::<&str>(&["threads.c"], "threads", &[]);
    let off = run(preloaded(&exe), TIMEOUT);
    let mut cmd = preloaded(&exe);
    cmd.env("ANYALLOC_MAINTENANCE", "1");
    let on = run(cmd, TIMEOUT);
    println!(
        "default: {}ANYALLOC_MAINTENANCE=1: {}",
        off.stdout, on.stdout
    );
    assert!(off.success() && on.success());
    assert_eq!(off.stdout.trim(), "threads: 1");
    assert_eq!(on.stdout.trim(), "threads: 2");
}
