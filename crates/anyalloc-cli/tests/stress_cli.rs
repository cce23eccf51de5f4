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

const FIELDS: [&str; 19] = [
    "seconds",
    "threads",
    "signals",
    "nested_signals",
    "max_nesting",
    "interrupted_inside_allocator",
    "allocations_not_freed",
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

/// Successful allocations of one kind, and its frees.
fn kind(v: &Value, k: &str) -> (u64, u64, u64) {
    (
        u(&v[k], "ok"),
        u(&v[k], "frees"),
        u(&v[k], "leaked_after_violation"),
    )
}

/// What every clean storm must show, checked against counters kept by
/// different parties (the storm's own, the allocator's statistics) so that
/// no check holds by construction.
fn check_common(v: &Value, stderr: &str) {
    for f in FIELDS {
        assert!(v.get(f).is_some(), "`{f}` missing from {v}");
    }
    assert_eq!(u(v, "violations"), 0, "{v}\n{stderr}");
    assert_eq!(u(v, "leaked_pages"), 0, "{v}\n{stderr}");
    assert_eq!(v["deadlock"], Value::Bool(false), "{v}");
    assert!(u(v, "threads") >= 1);
    assert!(u(v, "normal_ops") > 0, "{v}");
    let signals = u(v, "signals");
    assert!(signals > 0, "the storm happened: {v}");
    // Every block that was handed out came back, kind by kind.
    assert_eq!(u(v, "allocations_not_freed"), 0, "{v}\n{stderr}");
    for k in ["pages", "objects", "boxes", "large", "worker_blocks"] {
        let (ok, frees, leaked) = kind(v, k);
        // (A 1 MiB heap, `--memory 1m`, may have no room for 64 KiB and up.)
        let spare = v["memory"].is_null() || k != "large";
        assert!(ok > 0 || !spare, "no {k} allocation succeeded: {v}");
        assert_eq!((ok, leaked), (frees, 0), "{k}: successes == frees: {v}");
    }
    // Large objects (64 KiB to 4 MiB) every fourth handler invocation.
    let large = u(&v["large"], "attempts");
    assert!(large > 0 && large < signals, "{v}");
    // One attempt of each nolock kind per handler invocation.
    for k in ["pages", "objects", "boxes"] {
        assert_eq!(u(&v[k], "attempts"), signals, "{k}: {v}");
    }
    let attempts = u(v, "nolock_attempts");
    let ok = u(v, "nolock_ok");
    assert!(attempts > 0 && ok <= attempts, "{v}");
    // The allocator's own failure counters agree with the storm's: only the
    // handlers allocate nolock from the stress heap's objects (small and
    // large), and only the large ones take page blocks above 32 KiB.
    let (objects_ok, _, _) = kind(v, "objects");
    let (large_ok, _, _) = kind(v, "large");
    let heap = &v["stress_heap"];
    let large_failed = u(&v["large"], "attempts") - large_ok;
    assert_eq!(
        u(heap, "nolock_alloc_fail_busy") + u(heap, "nolock_alloc_fail_empty"),
        u(&v["objects"], "attempts") - objects_ok + large_failed,
        "stress heap's nolock failures vs the storm's: {v}"
    );
    // The page allocator's large nolock path served every large block but
    // the 64 KiB ones the heap's per-CPU list had (its rseq fast path).
    assert!(u(heap, "pages_nolock_large_alloc_ok") <= large_ok, "{v}");
    // Every large failure has its reason in the stats.
    assert_eq!(
        u(heap, "pages_nolock_large_alloc_fail_busy")
            + u(heap, "pages_nolock_large_alloc_fail_empty"),
        large_failed,
        "{v}"
    );
    assert_eq!(
        u(&v["large"], "fail_busy") + u(&v["large"], "fail_empty"),
        large_failed,
        "{v}"
    );
    assert_eq!(u(heap, "nolock_alloc_fail_too_large"), 0, "{v}");
    // Re-entry happened: handlers interrupted allocator calls, and nested.
    assert!(
        u(v, "interrupted_inside_allocator") > 0,
        "no signal landed inside an allocator call: {v}"
    );
    assert!(u(v, "interrupted_inside_allocator") <= signals, "{v}");
    let (p50, p99, p999, max) = (
        u(v, "p50_ns"),
        u(v, "p99_ns"),
        u(v, "p999_ns"),
        u(v, "max_ns"),
    );
    assert!(p50 <= p99 && p99 <= p999 && p999 <= max && max > 0, "{v}");
}

/// The nesting a storm that says it nests must show.
fn check_nested(v: &Value) {
    assert_eq!(v["nested"], Value::Bool(true), "{v}");
    assert!(u(v, "nested_signals") > 0, "no signal nested: {v}");
    assert_eq!(u(v, "max_nesting"), 2, "{v}");
}

#[test]
fn default_storm_is_clean_and_nolock_succeeds() {
    let (code, v, stderr) = run(&["stress", "--seconds", "2", "--json"]);
    check_common(&v, &stderr);
    check_nested(&v);
    assert_eq!(u(&v, "seconds"), 2);
    let attempts = u(&v, "nolock_attempts");
    let ok = u(&v, "nolock_ok");
    assert!(
        ok as f64 / attempts as f64 >= 0.999,
        "nolock success {ok}/{attempts} below 99.9%: {v}\n{stderr}"
    );
    // The 64 KiB to 4 MiB objects on their own.
    let (large, large_ok) = (u(&v["large"], "attempts"), u(&v["large"], "ok"));
    assert!(
        large_ok as f64 / large as f64 >= 0.999,
        "large nolock success {large_ok}/{large} below 99.9%: {v}\n{stderr}"
    );
    assert_eq!(code, 0, "stderr:\n{stderr}");
}

#[test]
fn small_memory_drives_failures_without_violations() {
    let (code, v, stderr) = run(&["stress", "--memory", "1m", "--seconds", "1", "--json"]);
    check_common(&v, &stderr);
    check_nested(&v);
    assert_eq!(u(&v, "memory"), 1 << 20);
    // 1 MiB cannot serve the storm: failures happened, for lack of memory,
    // on both paths; and allocations still succeeded.
    let (attempts, ok) = (u(&v, "nolock_attempts"), u(&v, "nolock_ok"));
    assert!(ok > 0 && ok < attempts, "no nolock failure with 1 MiB: {v}");
    assert!(u(&v, "nolock_fail_empty") > 0, "{v}");
    assert!(
        u(&v["stress_heap"], "pages_nolock_alloc_fail_empty") > 0,
        "the page allocator never ran empty: {v}"
    );
    assert!(u(&v, "normal_alloc_fail") > 0, "{v}");
    // The large objects failed too, and the stats say why: no memory.
    assert!(u(&v["large"], "fail_empty") > 0, "{v}");
    assert!(
        u(&v["stress_heap"], "pages_nolock_large_alloc_fail_empty") > 0,
        "{v}"
    );
    // The success rate is not required with --memory: exit 0 unless
    // something real went wrong, which check_common would have caught.
    assert_eq!(code, 0, "{v}\nstderr:\n{stderr}");
}

#[test]
fn a_small_first_zone_grows_and_the_storm_runs_in_grown_zones() {
    let (code, v, stderr) = run(&["stress", "--first-zone", "2m", "--seconds", "2", "--json"]);
    check_common(&v, &stderr);
    check_nested(&v);
    assert_eq!(u(&v, "first_zone"), 2 << 20, "{v}");
    assert_eq!(u(&v, "heap_memory"), 2 << 20, "{v}");
    assert_eq!(v["heap_grow"], Value::Bool(true), "{v}");
    assert!(v["memory"].is_null(), "{v}");
    // The storm outgrew 2 MiB: its blocks went into grown zones, and every
    // page of every zone is free again (check_common: no leaked page).
    assert!(
        u(&v["stress_heap"], "zones") > 1,
        "the heap never grew: {v}"
    );
    assert!(u(&v, "nolock_ok") > 0, "{v}");
    // Nolock calls never grow the heap, so the rate is not required here:
    // exit 0 unless something real went wrong.
    assert_eq!(code, 0, "{v}\nstderr:\n{stderr}");
}

#[test]
fn migrating_threads_and_a_remote_drainer_keep_every_block_intact() {
    let (code, v, stderr) = run(&["stress", "--migrate", "--seconds", "2", "--json"]);
    check_common(&v, &stderr);
    check_nested(&v);
    assert_eq!(v["migrate"], Value::Bool(true), "{v}");
    // The workers moved, and the drainer took every CPU's slots meanwhile.
    assert!(u(&v, "migrations") > 0, "{v}");
    assert!(u(&v, "drains") > 0, "{v}");
    assert!(u(&v, "nolock_ok") > 0, "{v}");
    // The drainer holds slots on purpose, so the rate is not required:
    // exit 0 unless something real went wrong.
    assert_eq!(code, 0, "{v}\nstderr:\n{stderr}");
    // Without --migrate, nothing moves and nothing is drained.
    let (_, v, _) = run(&["stress", "--seconds", "1", "--json"]);
    assert_eq!(v["migrate"], Value::Bool(false), "{v}");
    assert_eq!((u(&v, "migrations"), u(&v, "drains")), (0, 0), "{v}");
}

#[test]
fn first_zone_and_memory_conflict() {
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args([
            "stress",
            "--first-zone",
            "2m",
            "--memory",
            "2m",
            "--seconds",
            "1",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--memory"), "{stderr}");
}

#[test]
fn without_nesting_no_signal_nests() {
    let (code, v, stderr) = run(&["stress", "--seconds", "1", "--no-nested", "--json"]);
    check_common(&v, &stderr);
    assert_eq!(v["nested"], Value::Bool(false), "{v}");
    assert_eq!(u(&v, "nested_signals"), 0, "{v}");
    assert_eq!(u(&v, "max_nesting"), 1, "{v}");
    assert_eq!(code, 0, "{v}\nstderr:\n{stderr}");
}

#[test]
fn a_run_without_signals_fails() {
    let (code, v, stderr) = run(&["stress", "--seconds", "1", "--signal-hz", "0", "--json"]);
    assert_eq!(u(&v, "signals"), 0, "{v}");
    assert_eq!(code, 1, "{v}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("FAIL: no signal was handled"),
        "the reason is given: {stderr}"
    );
}

#[test]
fn a_changed_byte_is_a_violation_and_fails_the_run() {
    let (code, v, stderr) = run(&[
        "stress",
        "--seconds",
        "1",
        "--simulate-corruption",
        "--json",
    ]);
    assert_eq!(u(&v, "violations"), 1, "{v}\nstderr:\n{stderr}");
    assert_eq!(v["first_violation"]["kind"], "worker block", "{v}");
    // The damaged block stays allocated, excepted from "every allocation
    // freed"; its pages are reported.
    let (ok, frees, leaked) = kind(&v, "worker_blocks");
    assert_eq!((leaked, ok - frees), (1, 1), "{v}");
    assert_eq!(u(&v, "allocations_not_freed"), 0, "{v}");
    assert!(u(&v, "leaked_pages") > 0, "{v}");
    assert_eq!(code, 1, "{v}\nstderr:\n{stderr}");
    assert!(stderr.contains("FAIL: 1 pattern violation"), "{stderr}");
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
    assert!(!help.contains("simulate-"), "hidden testing options");
}
