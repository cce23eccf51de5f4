//! Runs the built `anyalloc` binary and checks its JSON contract.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One storm at a time: they compete for the same cores, and contention
/// from a concurrent storm is not what the success-rate check measures.
static SERIAL: Mutex<()> = Mutex::new(());

fn run(args: &[&str]) -> (i32, Value, String) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(args)
        .output()
        .expect("run the anyalloc binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().expect("exited, not killed by a signal");
    // Exactly one JSON object on stdout.
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{stderr}")
    });
    assert!(v.is_object(), "{stdout}");
    (code, v, stderr)
}

fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` missing or not an unsigned integer in {v}"))
}

const FIELDS: [&str; 15] = [
    "seconds",
    "threads",
    "signals",
    "nolock_attempts",
    "nolock_ok",
    "nolock_fail_busy",
    "nolock_fail_empty",
    "normal_ops",
    "violations",
    "leaked_pages",
    "deadlock",
    "p50_ns",
    "p99_ns",
    "p999_ns",
    "max_ns",
];

fn check_common(v: &Value, stderr: &str) {
    for f in FIELDS {
        assert!(v.get(f).is_some(), "`{f}` missing from {v}");
    }
    assert_eq!(u(v, "violations"), 0, "{v}\n{stderr}");
    assert_eq!(u(v, "leaked_pages"), 0, "{v}\n{stderr}");
    assert_eq!(v["deadlock"], Value::Bool(false), "{v}");
    assert!(u(v, "threads") >= 1);
    assert!(u(v, "normal_ops") > 0, "{v}");
    assert!(u(v, "signals") > 0, "the storm happened: {v}");
    let attempts = u(v, "nolock_attempts");
    let ok = u(v, "nolock_ok");
    assert!(attempts > 0 && ok <= attempts, "{v}");
    assert_eq!(
        u(v, "nolock_fail_busy") + u(v, "nolock_fail_empty"),
        attempts - ok,
        "every failure has a reason: {v}"
    );
    let (p50, p99, p999, max) = (
        u(v, "p50_ns"),
        u(v, "p99_ns"),
        u(v, "p999_ns"),
        u(v, "max_ns"),
    );
    assert!(p50 <= p99 && p99 <= p999 && p999 <= max && max > 0, "{v}");
}

#[test]
fn default_storm_is_clean_and_nolock_succeeds() {
    let (code, v, stderr) = run(&["stress", "--seconds", "2", "--json"]);
    check_common(&v, &stderr);
    assert_eq!(u(&v, "seconds"), 2);
    let attempts = u(&v, "nolock_attempts");
    let ok = u(&v, "nolock_ok");
    assert!(
        ok as f64 / attempts as f64 >= 0.999,
        "nolock success {ok}/{attempts} below 99.9%: {v}\n{stderr}"
    );
    assert_eq!(code, 0, "stderr:\n{stderr}");
}

#[test]
fn small_memory_drives_failures_without_violations() {
    let (code, v, stderr) = run(&["stress", "--memory", "1m", "--seconds", "1", "--json"]);
    check_common(&v, &stderr);
    assert_eq!(u(&v, "memory"), 1 << 20);
    // The success rate is not required with --memory: exit 0 unless
    // something real went wrong, which check_common would have caught.
    assert_eq!(code, 0, "{v}\nstderr:\n{stderr}");
}

#[test]
fn watchdog_reports_a_stall_with_exit_code_2() {
    let (code, v, stderr) = run(&[
        "stress",
        "--seconds",
        "30",
        "--simulate-hang",
        "1",
        "--json",
    ]);
    assert_eq!(code, 2, "{v}\nstderr:\n{stderr}");
    assert_eq!(v["deadlock"], Value::Bool(true));
    assert!(v["leaked_pages"].is_null(), "{v}");
    assert!(stderr.contains("DEADLOCK SUSPECTED"), "{stderr}");
    assert!(stderr.contains("thread   0: worker"), "{stderr}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(["stress", "--memory", "4k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("minimum"));
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(["stress", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--seconds",
        "--threads",
        "--signal-hz",
        "--memory",
        "--json",
        "--no-nested",
        "Exit codes",
    ] {
        assert!(help.contains(opt), "`{opt}` not in help:\n{help}");
    }
    assert!(!help.contains("simulate-hang"), "a hidden testing option");
}
