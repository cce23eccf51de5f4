//! Real programs under LD_PRELOAD=libanyalloc.so produce the same output
//! as with glibc's malloc: python3 (threads and a subprocess), sort on a
//! large generated file, sqlite3. A missing program fails the test unless
//! ANYALLOC_ALLOW_SKIP=1.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn workload(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workloads")
        .join(name)
}

/// Runs the same command with glibc's malloc and with ours; the exit status
/// and stdout must match.
fn same_output(
    what: &str,
    make: impl Fn(Command) -> Command,
    program: &Path,
    input: Option<&[u8]>,
) {
    let go = |cmd: Command| match input {
        Some(i) => run_with_input(cmd, TIMEOUT, i.to_vec()),
        None => run(cmd, TIMEOUT),
    };
    let glibc = go(make(plain(program)));
    let ours = go(make(preloaded(program)));
    println!(
        "{what}: glibc {} in {:.2} s, anyalloc {} in {:.2} s, {} bytes of output",
        glibc.describe(),
        glibc.elapsed.as_secs_f64(),
        ours.describe(),
        ours.elapsed.as_secs_f64(),
        ours.stdout.len()
    );
    assert!(
        glibc.success(),
        "{what} under glibc: {}\n{}",
        glibc.describe(),
        glibc.stderr
    );
    assert!(
        ours.success(),
        "{what} under anyalloc: {}\n{}",
        ours.describe(),
        ours.stderr
    );
    assert!(!ours.stdout.is_empty());
    assert!(ours.stdout == glibc.stdout, "{what}: outputs differ");
    assert_eq!(ours.stderr, glibc.stderr, "{what}: stderr differs");
}

#[test]
fn python3_threads_and_subprocess() {
    if !require("python3") {
        return;
    }
    let exe = python_exe();
    let script = workload("threads_subprocess.py");
    same_output(
        "python3",
        |mut c| {
            c.arg(&script);
            c
        },
        &exe,
        None,
    );
}

/// A deterministic file of `lines` lines: words and numbers.
fn generate_lines(lines: usize) -> Vec<u8> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(lines * 40);
    for _ in 0..lines {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 4 + (s >> 60) as usize;
        for k in 0..len {
            out.push(b'a' + ((s >> (k * 4 % 56)) % 26) as u8);
        }
        out.extend_from_slice(format!(" {} {}\n", s >> 40, (s >> 20) % 1000).as_bytes());
    }
    out
}

#[test]
fn sort_of_a_large_file() {
    if !require("sort") {
        return;
    }
    let file = out_dir().join("sort-input.txt");
    std::fs::write(&file, generate_lines(600_000)).unwrap();
    let sort = PathBuf::from("sort");
    same_output(
        "sort",
        |mut c| {
            c.env("LC_ALL", "C").arg(&file);
            c
        },
        &sort,
        None,
    );
    // Numeric keys, a small buffer (temporary files and merges), 2 threads.
    same_output(
        "sort -k2,2n -S 4M --parallel=2",
        |mut c| {
            c.env("LC_ALL", "C")
                .env("TMPDIR", out_dir())
                .args(["-k2,2n", "-k1,1", "-S", "4M", "--parallel=2"])
                .arg(&file);
            c
        },
        &sort,
        None,
    );
}

#[test]
fn sqlite3_build_query_update_vacuum() {
    if !require("sqlite3") {
        return;
    }
    let sql = std::fs::read(workload("sqlite.sql")).unwrap();
    same_output(
        "sqlite3",
        |mut c| {
            c.arg(":memory:");
            c
        },
        &PathBuf::from("sqlite3"),
        Some(&sql),
    );
}
