//! Conformance of the C allocation functions under odd but legal requests
//! (tests/c/conform.c): alignment to 1 GiB, calloc after every kind of
//! reuse, realloc across every class boundary and move, usable sizes really
//! usable; on the normal path and inside a nolock scope, with glibc's rseq
//! registration on and off.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn c_functions_conform_on_both_paths_with_and_without_rseq() {
    let mut args: Vec<String> = vec!["-fno-builtin".into()];
    args.extend(link_args());
    let exe = compile(&["conform.c"], "conform", &args);
    for route in ["normal", "nolock"] {
        for rseq_off in [false, true] {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg(route);
            if rseq_off {
                cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
            }
            let o = run(cmd, TIMEOUT);
            print!("{}", o.stdout);
            eprint!("{}", o.stderr);
            assert!(
                o.success() && o.stdout.contains("checks passed"),
                "conform {route} (rseq off: {rseq_off}): {}\n{}",
                o.describe(),
                o.stdout
            );
        }
    }
}
