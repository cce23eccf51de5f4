//! A page storm you can watch: every core churns on the normal path while
//! two per-thread timer signals (which can interrupt each other's handlers)
//! allocate and free with the nolock path; every block is pattern-checked.
//! Prints what it saw; exits with 1 on a pattern violation, a leaked page or
//! a broken invariant.
//!
//! ```text
//! cargo run --release -p anyalloc --example page_storm [seconds]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

fn main() {
    let secs: f64 = match std::env::args().nth(1) {
        None => 5.0,
        Some(s) => match s.parse() {
            Ok(v) if v > 0.0 => v,
            _ => {
                eprintln!("usage: page_storm [seconds]   (a positive number; default 5)");
                std::process::exit(2);
            }
        },
    };
    let cfg = common::StormConfig {
        duration: Duration::from_secs_f64(secs),
        ..common::StormConfig::default()
    };
    println!(
        "page storm: {} MiB, {} threads, timers every {:?} and {:?} per thread, {} s",
        cfg.memory >> 20,
        cfg.threads,
        cfg.period_a,
        cfg.period_b,
        secs
    );
    let r = common::run_page_storm(&cfg);
    println!("{}", r.summary());
    let bad = r.violations > 0 || r.leaked_pages > 0 || r.invariants.is_err();
    if bad {
        eprintln!("page storm: FAILED");
        std::process::exit(1);
    }
    println!("page storm: ok");
}
