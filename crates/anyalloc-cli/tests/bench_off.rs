//! Without the `bench` feature the binary still has the `bench` subcommand:
//! it exits 2 with one line that gives the exact command to run it.
#![cfg(not(feature = "bench"))]

use std::process::Command;

#[test]
fn bench_without_the_feature_says_how_to_run_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(["bench", "--quick", "--filter", "pairs"])
        .output()
        .expect("run the anyalloc binary");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(
            "run: cargo run --release -p anyalloc-cli --features bench -- bench --quick --filter pairs"
        ),
        "{err}"
    );
    // The options are still parsed: a typo is a usage error, not exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(["bench", "--bogus"])
        .output()
        .expect("run the anyalloc binary");
    assert_eq!(out.status.code(), Some(64));
}
