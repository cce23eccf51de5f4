//! Real programs' own test suites under LD_PRELOAD=libanyalloc.so against
//! plain glibc, on the same machine: Python's regression tests
//! (`python3 -m test`) for threads, signals, subprocess and fork, mmap, io
//! and the containers must pass and fail the same tests under both; the
//! sqlite3 shell on a generated workload must print the same results.
//! Both report their wall times.
//!
//! Long (about two minutes each way on 2 CPUs), so ignored by a plain
//! `cargo test`; `.ci/run` runs them:
//! `cargo test --release -p anyalloc-c --test program_suites -- --ignored --nocapture`.
//! A missing python3 or sqlite3 fails them unless ANYALLOC_ALLOW_SKIP=1.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The modules: threads, signals, subprocess and fork, mmap, io, the
/// containers, the garbage collector and weak references, the os module.
/// Each suite runs with `-j2`: every module in a fresh worker process (so
/// no state leaks from one module into the next), two at a time; the glibc
/// and the anyalloc suites run one after the other, never together.
const MODULES: &[&str] = &[
    "test_signal",
    "test_threading",
    "test_subprocess",
    "test_fork1",
    "test_mmap",
    "test_io",
    "test_os",
    "test_dict",
    "test_set",
    "test_list",
    "test_bytes",
    "test_gc",
    "test_weakref",
];

/// Each run may take this long before it counts as hung.
const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads regrtest's JUnit XML with Python's parser (plain glibc): one
/// "name<TAB>outcome" line per test case, outcome pass/fail/skip.
const JUNIT_TO_LINES: &str = r#"
import sys, xml.etree.ElementTree as ET
for tc in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    kids = {c.tag for c in tc}
    outcome = "fail" if kids & {"failure", "error"} else "skip" if "skipped" in kids else "pass"
    print(tc.get("name") + "\t" + outcome)
"#;

/// Test name -> outcome of one regrtest run.
type Outcomes = BTreeMap<String, String>;

fn outcomes(python: &Path, xml: &Path) -> Outcomes {
    let o = Command::new(python)
        .arg("-c")
        .arg(JUNIT_TO_LINES)
        .arg(xml)
        .env_remove("LD_PRELOAD")
        .output()
        .expect("python3 reads the JUnit XML");
    assert!(
        o.status.success(),
        "reading {}: {}",
        xml.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
}

/// Runs regrtest on `modules` (or on the tests matching `only`), with or
/// without the preload; returns the outcomes and the wall time.
fn regrtest(
    python: &Path,
    preload: bool,
    tag: &str,
    modules: &[&str],
    only: &[String],
) -> (Outcomes, f64, String) {
    let dir = out_dir().join(format!("regrtest-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let xml = dir.join("junit.xml");
    let mut cmd = if preload {
        preloaded(python)
    } else {
        plain(python)
    };
    cmd.current_dir(&dir)
        .args(["-m", "test", "-j2", "--timeout", "300", "--junit-xml"])
        .arg(&xml);
    for m in only {
        cmd.args(["-m", m]);
    }
    cmd.args(modules);
    let o = run(cmd, SUITE_TIMEOUT);
    assert!(
        !o.timed_out,
        "regrtest {tag} hung: {}\n{}",
        o.describe(),
        o.stdout
    );
    // Exit 0 (all passed) or 2 (some failed) are results; anything else
    // (a crash of the runner, a signal) is not.
    let code = o.status.and_then(|s| s.code());
    assert!(
        matches!(code, Some(0) | Some(2)),
        "regrtest {tag}: {}\n{}\n{}",
        o.describe(),
        o.stdout,
        o.stderr
    );
    let summary = o
        .stdout
        .lines()
        .filter(|l| l.starts_with("Total tests:") || l.starts_with("Result:"))
        .collect::<Vec<_>>()
        .join("; ");
    (outcomes(python, &xml), o.elapsed.as_secs_f64(), summary)
}

fn count(o: &Outcomes, what: &str) -> usize {
    o.values().filter(|v| *v == what).count()
}

#[test]
#[ignore = "long (minutes): run by .ci/run with --ignored"]
fn python_regression_tests_same_results_as_glibc() {
    if !require("python3") {
        return;
    }
    let python = python_exe();
    let suite = Command::new(&python)
        .args(["-c", "import test.test_signal, test.test_io"])
        .env_remove("LD_PRELOAD")
        .status()
        .is_ok_and(|s| s.success());
    if !suite {
        let allow = std::env::var("ANYALLOC_ALLOW_SKIP").is_ok_and(|v| v == "1");
        assert!(
            allow,
            "{} has no test suite (Debian: apt-get install libpython3.X-testsuite; .ci/run does); \
             ANYALLOC_ALLOW_SKIP=1 skips",
            python.display()
        );
        println!("skipped: no Python test suite (ANYALLOC_ALLOW_SKIP=1)");
        return;
    }
    let (glibc, t_glibc, s_glibc) = regrtest(&python, false, "glibc", MODULES, &[]);
    let (ours, t_ours, s_ours) = regrtest(&python, true, "anyalloc", MODULES, &[]);
    for (name, o, t, s) in [
        ("glibc   ", &glibc, t_glibc, &s_glibc),
        ("anyalloc", &ours, t_ours, &s_ours),
    ] {
        println!(
            "python3 -m test ({} modules) {name}: {:.1} s wall, {} tests: {} passed, {} failed, {} skipped [{s}]",
            MODULES.len(),
            t,
            o.len(),
            count(o, "pass"),
            count(o, "fail"),
            count(o, "skip"),
        );
    }
    println!(
        "wall time anyalloc / glibc: {:.2}",
        t_ours / t_glibc.max(1e-9)
    );
    assert!(
        glibc.len() > 1000,
        "only {} test cases ran under glibc",
        glibc.len()
    );
    // Tests whose outcome differs, or that ran under only one of the two.
    let mut differ: Vec<String> = glibc
        .keys()
        .chain(ours.keys())
        .filter(|n| glibc.get(*n) != ours.get(*n))
        .cloned()
        .collect();
    differ.sort();
    differ.dedup();
    for n in &glibc {
        if n.1 == "fail" {
            println!("fails under glibc too (this machine): {}", n.0);
        }
    }
    if differ.is_empty() {
        println!("same outcome for all {} tests", glibc.len());
        return;
    }
    // A timing-sensitive test may flip once on a loaded machine: run each
    // differing test again under both, twice; a difference that persists
    // fails the test.
    let mut persistent = Vec::new();
    for n in &differ {
        let method = n.rsplit('.').next().unwrap_or(n).to_string();
        let module = n.split('.').nth(1).unwrap_or("");
        let mut same = false;
        for attempt in 1..=2 {
            let (g, _, _) = regrtest(
                &python,
                false,
                "retry-glibc",
                &[module],
                std::slice::from_ref(&method),
            );
            let (a, _, _) = regrtest(
                &python,
                true,
                "retry-anyalloc",
                &[module],
                std::slice::from_ref(&method),
            );
            println!(
                "differed: {n} (glibc {:?}, anyalloc {:?}); rerun {attempt}: glibc {:?}, anyalloc {:?}",
                glibc.get(n),
                ours.get(n),
                g.get(n),
                a.get(n)
            );
            if g.get(n) == a.get(n) {
                same = true;
                break;
            }
        }
        if !same {
            persistent.push(n.clone());
        }
    }
    assert!(
        persistent.is_empty(),
        "outcomes differ between glibc and anyalloc: {persistent:?}"
    );
}

/// A deterministic SQL workload: a file database in WAL mode with a small
/// page cache (eviction), 30,000 rows inserted from explicit statements
/// with text of 1 byte to 6 KiB, 200,000 generated rows, indexes, joins,
/// grouping, window functions, JSON, large sorts, blobs, updates, deletes,
/// and VACUUM.
fn sqlite_workload() -> String {
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut sql = String::new();
    sql.push_str(
        "PRAGMA journal_mode=WAL;\nPRAGMA cache_size=-2000;\n\
         CREATE TABLE people(id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INT, score REAL, notes TEXT);\n",
    );
    let cities = [
        "Oslo", "Lyon", "Porto", "Graz", "Turku", "Cork", "Brno", "Lund",
    ];
    for batch in 0..60 {
        sql.push_str("INSERT INTO people VALUES\n");
        for i in 0..500 {
            let id = batch * 500 + i + 1;
            let r = next();
            let name: String = (0..(3 + r % 12))
                .map(|k| (b'a' + ((r >> (k * 5)) % 26) as u8) as char)
                .collect();
            let notes_len = match r % 10 {
                0 => 1 + (r >> 8) % 6000,
                1..=3 => 100 + (r >> 8) % 900,
                _ => (r >> 8) % 80,
            } as usize;
            let notes: String = name.repeat(notes_len / name.len() + 1)[..notes_len].to_string();
            sql.push_str(&format!(
                "({id}, '{name}', '{}', {}, {}.{}, '{notes}'){}\n",
                cities[(r % 8) as usize],
                18 + (r >> 20) % 70,
                (r >> 30) % 1000,
                (r >> 40) % 100,
                if i == 499 { ";" } else { "," }
            ));
        }
    }
    sql.push_str(
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, person INT, amount REAL, item TEXT);\n\
         WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 200000)\n\
         INSERT INTO orders SELECT i, 1 + (i * 7919) % 30000, ((i * 104729) % 100000) / 100.0,\n\
           printf('item-%05d-%s', (i * 31) % 99991, substr('abcdefghijklmnopqrstuvwxyz', 1 + i % 26, 1 + i % 13)) FROM r;\n\
         CREATE INDEX orders_person ON orders(person);\n\
         CREATE INDEX people_city_age ON people(city, age);\n\
         SELECT count(*), sum(length(notes)), sum(score) FROM people;\n\
         SELECT city, count(*), avg(age), max(length(notes)) FROM people GROUP BY city ORDER BY city;\n\
         SELECT p.city, count(o.id), round(sum(o.amount), 2) FROM people p JOIN orders o ON o.person = p.id\n\
           GROUP BY p.city ORDER BY 3 DESC;\n\
         SELECT id, name, rank FROM (SELECT id, name, row_number() OVER (PARTITION BY city ORDER BY score DESC, id) AS rank\n\
           FROM people) WHERE rank <= 3 ORDER BY id;\n\
         SELECT json_group_array(json_object('id', id, 'n', name)) FROM (SELECT id, name FROM people WHERE age = 42 ORDER BY id LIMIT 50);\n\
         SELECT item, count(*) FROM orders GROUP BY item ORDER BY count(*) DESC, item LIMIT 20;\n\
         SELECT group_concat(name, ',') FROM (SELECT name FROM people ORDER BY notes DESC, id LIMIT 200);\n\
         CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB);\n\
         WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 300)\n\
         INSERT INTO blobs SELECT i, zeroblob(1000 * (1 + i % 97)) FROM r;\n\
         SELECT count(*), sum(length(b)) FROM blobs;\n\
         UPDATE people SET notes = notes || upper(notes) WHERE id % 7 = 0;\n\
         UPDATE orders SET item = replace(item, 'item', 'ITEM') WHERE amount > 500;\n\
         DELETE FROM orders WHERE id % 3 = 0;\n\
         DELETE FROM blobs WHERE id % 2 = 0;\n\
         VACUUM;\n\
         SELECT count(*), sum(length(notes)) FROM people;\n\
         SELECT count(*), round(sum(amount), 2), count(DISTINCT item) FROM orders;\n\
         SELECT p.name, sum(o.amount) AS t FROM people p JOIN orders o ON o.person = p.id\n\
           GROUP BY p.id ORDER BY t DESC, p.id LIMIT 10;\n\
         PRAGMA integrity_check;\n",
    );
    sql
}

#[test]
#[ignore = "long: run by .ci/run with --ignored"]
fn sqlite3_generated_workload_same_results_as_glibc() {
    if !require("sqlite3") {
        return;
    }
    let sql = sqlite_workload();
    let mut results = Vec::new();
    for (tag, preload) in [("glibc", false), ("anyalloc", true)] {
        let dir = out_dir().join(format!("sqlite-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = if preload {
            preloaded("sqlite3")
        } else {
            plain("sqlite3")
        };
        cmd.arg(dir.join("work.db"));
        let o = run_with_input(cmd, Duration::from_secs(300), sql.clone().into_bytes());
        println!(
            "sqlite3 {tag}: {} in {:.2} s wall, {} lines of output",
            o.describe(),
            o.elapsed.as_secs_f64(),
            o.stdout.lines().count()
        );
        assert!(o.success(), "sqlite3 {tag}: {}\n{}", o.describe(), o.stderr);
        assert!(o.stderr.is_empty(), "sqlite3 {tag}: {}", o.stderr);
        assert!(
            o.stdout.trim_end().ends_with("ok"),
            "integrity_check under {tag}: {}",
            o.stdout.lines().last().unwrap_or("")
        );
        results.push(o);
    }
    println!(
        "wall time anyalloc / glibc: {:.2}",
        results[1].elapsed.as_secs_f64() / results[0].elapsed.as_secs_f64().max(1e-9)
    );
    assert!(results[0].stdout.lines().count() > 50);
    assert!(
        results[0].stdout == results[1].stdout,
        "sqlite3 results differ between glibc and anyalloc"
    );
}
