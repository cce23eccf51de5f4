//! A CI-sized smoke test of `anyalloc bench`: one cheap workload with
//! `--quick --json`, and the shape of its JSON. (The full suite is not for
//! CI: see docs/BENCHMARKS.md for how to run it.)

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run the anyalloc binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{stderr}")
    });
    (out.status.code().unwrap_or(-1), v, stderr)
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("`{k}` missing or not a number in {v}"))
}

#[test]
fn quick_json_of_one_workload_has_the_documented_shape() {
    let (code, v, stderr) = bench(&["--quick", "--json", "--filter", "batch 1000"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v["bench"], "anyalloc bench");
    for k in ["nproc", "cpu_model", "kernel", "date"] {
        assert!(!v["machine"][k].is_null(), "machine.{k} missing: {v}");
    }
    // What was measured: the commit (this repository's HEAD), whether the
    // tree was dirty, the CPU.
    let head = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .expect("git");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(v["commit"], Value::String(head), "{v}");
    assert!(v["dirty"].is_boolean(), "{v}");
    assert_eq!(v["cpu"], v["machine"]["cpu_model"]);
    assert!(!v["cpu"].as_str().unwrap_or("").is_empty());
    assert_eq!(v["options"]["quick"], true);
    let workloads = v["workloads"].as_array().expect("workloads array");
    assert_eq!(workloads.len(), 1, "only the filtered workload: {v}");
    let w = &workloads[0];
    assert_eq!(w["number"], 2);
    assert_eq!(w["group"], "batch");
    assert_eq!(w["unit"], "ns/op");
    let peers = w["peers"].as_array().expect("peers array");
    let names: Vec<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in [
        "glibc",
        "mimalloc",
        "jemalloc",
        "anyalloc Global",
        "anyalloc normal",
        "anyalloc nolock",
        "anyalloc normal, maintainer off",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for p in peers {
        let (min, p25, med, p75, max) = (
            f(p, "min_ns"),
            f(p, "p25_ns"),
            f(p, "median_ns"),
            f(p, "p75_ns"),
            f(p, "max_ns"),
        );
        assert!(
            0.0 < min && min <= p25 && p25 <= med && med <= p75 && p75 <= max,
            "{p}"
        );
        assert!(f(p, "median_ops_per_s") > 0.0);
        assert_eq!(
            p["samples_ns"].as_array().map(Vec::len),
            v["options"]["rounds"].as_u64().map(|n| n as usize)
        );
    }
    // The maintainer threads' CPU time during the workload, per anyalloc
    // peer that has one.
    let m = w["maintainer_cpu_ms"]
        .as_object()
        .expect("maintainer_cpu_ms");
    for peer in ["anyalloc Global", "anyalloc normal", "anyalloc nolock"] {
        assert!(m[peer].as_f64().is_some_and(|x| x >= 0.0), "{peer}: {w}");
    }
    assert!(!m.contains_key("anyalloc normal, maintainer off"), "{w}");
    assert!(v["baseline_expectations"].is_array(), "{v}");
    assert_eq!(v["failures"], serde_json::json!([]), "{v}");
    let targets = v["targets"].as_array().expect("targets array");
    assert!(!targets.is_empty());
    for t in targets {
        assert!(t["what"].is_string() && t["goal"].is_string(), "{t}");
        assert!(t["met"].is_boolean() || t["met"].is_null(), "{t}");
    }
    assert!(
        targets.iter().any(|t| t["what"]
            .as_str()
            .unwrap()
            .starts_with("normal / best peer")),
        "{targets:?}"
    );
}

#[test]
fn help_lists_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_anyalloc"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--quick",
        "--json",
        "--filter",
        "--peer",
        "--plots",
        "--markdown",
    ] {
        assert!(help.contains(opt), "`{opt}` not in help:\n{help}");
    }
    assert!(!help.contains("--child"), "a hidden internal option");
}

#[test]
fn survival_checks_the_data_and_runs_the_careful_peers() {
    // The two careful peers (correct by construction) and one anyalloc row:
    // a few seconds.
    for (peer, careful) in [("careful", true), ("anyalloc NoLock", false)] {
        let (code, v, stderr) =
            bench(&["--quick", "--json", "--filter", "survival", "--peer", peer]);
        assert_eq!(code, 0, "{stderr}");
        let w = &v["workloads"][0];
        assert_eq!(w["group"], "survival", "{v}");
        let peers = w["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), if careful { 2 } else { 1 }, "{v}");
        for p in peers {
            assert_eq!(p["careful"], careful, "{p}");
            assert_eq!(p["survived"], p["runs"], "{p}");
            assert_eq!(p["corrupted"], 0, "{p}");
            let (allocs, nulls) = (
                p["handler_allocs"].as_u64().unwrap(),
                p["handler_nulls"].as_u64().unwrap(),
            );
            assert!(allocs > nulls, "{p}");
            assert!(f(p, "worker_ns_per_op") > 0.0 && f(p, "handler_ns_per_alloc") > 0.0);
            for r in p["reports"].as_array().unwrap() {
                assert!(r["signals"].as_u64().unwrap() > 0, "{r}");
            }
        }
        // Careful peers are baselines: expectations, never targets.
        let names = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|t| t["what"].as_str().unwrap().to_string())
                .collect()
        };
        let (targets, expect) = (names("targets"), names("baseline_expectations"));
        if careful {
            assert!(targets.is_empty(), "{targets:?}");
            assert_eq!(expect.len(), 2, "{expect:?}");
        } else {
            assert_eq!(targets.len(), 1, "{targets:?}");
            assert!(expect.is_empty(), "{expect:?}");
        }
    }
}
