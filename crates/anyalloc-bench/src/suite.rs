//! `anyalloc bench`: every workload, every peer, one report.
//!
//! | # | id | workload | peers |
//! |---|----|----------|-------|
//! | 1 | `pairs` | alloc+free pair by size, 16 B to 64 KiB | glibc, mimalloc, jemalloc, anyalloc Global, Heap normal, Heap nolock (+ calls-only reference) |
//! | 2 | `batch` | 1000 allocations then 1000 frees | same (+ calls-only reference) |
//! | 2 | `phases` | the batch's alloc phase and free phase, each timed alone (informational) | same |
//! | 2 | `working-sets` | the batch's loop with 200 to 40,000 objects, 64 B to 1 KiB (informational) | same |
//! | 3 | `producer-consumer` | one thread allocates, another frees | same (+ ring-only reference) |
//! | 4 | `larson` | server churn, slot arrays handed to new threads | same |
//! | 5 | `cache-scratch` | passive false sharing | same (+ two references) |
//! | 6 | `pages` | page blocks of orders 0 to 3, 6 and 10 | PageAllocator normal, nolock, buddy_system_allocator (+ the bare rseq floor for pairs) |
//! | 7 | `bursts` | bursts of 1 to 10,000 objects from signal handlers | anyalloc nolock (maintainer on/off), watermark pool, preallocated pool, careful glibc |
//! | 8 | `survival` | naive malloc/free in signal handlers | glibc, mimalloc, jemalloc, anyalloc Global, NoLock, Heap nolock; careful glibc, preallocated pool |
//!
//! Workloads 1 to 6 run in this process, interleaved over rounds (see the
//! crate documentation); 7 and 8 run each allocator in a child process
//! (this executable re-run with the caller's child arguments).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::plot::{self, Bar, Series};
use crate::survival::Outcome;
use crate::sys::Machine;
use crate::{bursts, heap, larson, pages, peers, progress, scratch, survival};
use crate::{Options, Target, WorkloadResult};

/// How `anyalloc bench` was invoked.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// Rounds, sample length, filters, `--json`, `--quick`.
    pub opts: Options,
    /// Where to write the SVG plots (none: no plots).
    pub plots: Option<PathBuf>,
    /// Where to write the Markdown report (none: no file).
    pub markdown: Option<PathBuf>,
    /// Arguments that make this executable run a child (`bursts ...` or
    /// `survival ...` follow them), e.g. `["bench", "--child"]`.
    pub child: Vec<String>,
    /// The command line, for the report.
    pub command: String,
}

/// The optional checks compiled into anyalloc, as the reports print them:
/// a checked build's figures are not the release fast paths'.
fn build_checks_line() -> String {
    if anyalloc::BUILD_CHECKS.is_empty() {
        "release, no optional checks".to_string()
    } else {
        format!(
            "WITH {} (not the release fast paths: rebuild with `cargo build --release -p anyalloc-cli --features bench`)",
            anyalloc::BUILD_CHECKS.join(", ")
        )
    }
}

/// The workload groups: number, id, title.
pub const GROUPS: [(u8, &str, &str); 8] = [
    (1, "pairs", "alloc+free pair latency by size"),
    (2, "batch", "batch: 1000 allocations, then 1000 frees"),
    (
        3,
        "producer-consumer",
        "producer/consumer across two threads",
    ),
    (
        4,
        "larson",
        "larson-like server churn with cross-thread frees",
    ),
    (5, "cache-scratch", "cache-scratch: passive false sharing"),
    (6, "pages", "page allocation, orders 0 to 3, 6 and 10"),
    (7, "bursts", "any-context bursts from signal handlers"),
    (8, "survival", "survival: malloc/free in signal handlers"),
];

fn title(number: u8) -> &'static str {
    GROUPS.iter().find(|g| g.0 == number).map_or("", |g| g.2)
}

/// A timed workload with its group.
#[derive(Debug, Clone)]
pub struct Timed {
    /// 1 to 6.
    pub number: u8,
    /// The group id.
    pub group: &'static str,
    /// The measurements.
    pub result: WorkloadResult,
    /// CPU time of each anyalloc peer's maintenance thread while the
    /// workload ran (all rounds, calibration included), in ms: work done
    /// off the timed thread. Empty for workloads without maintainers.
    pub maintainer_cpu_ms: Vec<(String, f64)>,
    /// Wall time of the whole workload (all rounds, calibration included).
    pub wall_s: f64,
}

impl Timed {
    /// A workload without maintainer figures (pages).
    fn plain(number: u8, group: &'static str, result: WorkloadResult) -> Timed {
        Timed {
            number,
            group,
            result,
            maintainer_cpu_ms: Vec::new(),
            wall_s: 0.0,
        }
    }

    /// The maintainer line printed under the workload's table.
    pub fn maintainer_line(&self) -> Option<String> {
        if self.maintainer_cpu_ms.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .maintainer_cpu_ms
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.1} ms"))
            .collect();
        Some(format!(
            "  maintainer thread CPU during this workload ({:.2} s wall, all peers and rounds): {}",
            self.wall_s,
            parts.join(", ")
        ))
    }
}

/// Runs one workload of the object allocators, noting the CPU time each
/// anyalloc peer's maintenance thread used meanwhile.
fn with_maintainers(
    number: u8,
    group: &'static str,
    hp: &peers::HeapPeers,
    list: &[peers::Named<peers::Alloc>],
    f: impl FnOnce() -> WorkloadResult,
) -> Timed {
    let watched: Vec<&peers::Named<Vec<i32>>> = hp
        .maintainers
        .iter()
        .filter(|(n, _)| list.iter().any(|(l, _)| l == n))
        .collect();
    let before: Vec<u64> = watched
        .iter()
        .map(|(_, t)| crate::sys::threads_cpu_ns(t))
        .collect();
    let t0 = Instant::now();
    let result = f();
    let wall_s = t0.elapsed().as_secs_f64();
    let maintainer_cpu_ms = watched
        .iter()
        .zip(before)
        .map(|((n, t), b)| {
            (
                n.to_string(),
                crate::sys::threads_cpu_ns(t).saturating_sub(b) as f64 / 1e6,
            )
        })
        .collect();
    Timed {
        number,
        group,
        result,
        maintainer_cpu_ms,
        wall_s,
    }
}

/// One allocator's bursts run.
#[derive(Debug, Clone)]
pub struct BurstRow {
    /// Printed name.
    pub name: &'static str,
    /// The child's report, or why there is none.
    pub result: Result<Value, String>,
}

/// One allocator's survival runs.
#[derive(Debug, Clone)]
pub struct SurvivalRow {
    /// Printed name.
    pub name: &'static str,
    /// How each run ended.
    pub runs: Vec<Outcome>,
}

impl SurvivalRow {
    /// (survived, failed: crashed, exited with an error or lost data, hung).
    pub fn counts(&self) -> (usize, usize, usize) {
        let s = self
            .runs
            .iter()
            .filter(|o| matches!(o, Outcome::Survived(_)))
            .count();
        let h = self.runs.iter().filter(|o| **o == Outcome::Hung).count();
        (s, self.runs.len() - s - h, h)
    }

    /// The reports of the runs that exited cleanly (survived or not).
    pub fn reports(&self) -> Vec<&Value> {
        self.runs
            .iter()
            .filter_map(|o| match o {
                Outcome::Survived(v) | Outcome::Failed(_, v) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// The sum of an integer field over the reports.
    pub fn sum(&self, key: &str) -> u64 {
        self.reports()
            .iter()
            .map(|v| v[key].as_u64().unwrap_or(0))
            .sum()
    }

    /// The median of a number field over the reports.
    pub fn median(&self, key: &str) -> Option<f64> {
        let xs: Vec<f64> = self
            .reports()
            .iter()
            .filter_map(|v| v[key].as_f64())
            .collect();
        (!xs.is_empty()).then(|| crate::summarize(&xs).median)
    }
}

/// Everything one `anyalloc bench` run measured.
#[derive(Debug, Clone)]
pub struct SuiteReport {
    /// Where it ran.
    pub machine: Machine,
    /// The options.
    pub opts: Options,
    /// The command line.
    pub command: String,
    /// Workloads 1 to 6.
    pub timed: Vec<Timed>,
    /// Workload 7 (empty when filtered out).
    pub bursts: Vec<BurstRow>,
    /// Workload 7's parameters: storm seconds, signal rate.
    pub bursts_params: (f64, u64),
    /// Workload 8 (empty when filtered out).
    pub survival: Vec<SurvivalRow>,
    /// Workload 8's parameters: storm seconds, watchdog seconds, runs.
    pub survival_params: (f64, f64, usize),
    /// Set-up notes.
    pub setup: Vec<String>,
    /// Goals, met or missed.
    pub targets: Vec<Target>,
    /// What the baselines are expected to show (a baseline failing as
    /// expected is not a target met): reported apart from the targets.
    pub expectations: Vec<Target>,
    /// Problems that make the run itself fail (exit code 1): an anyalloc
    /// child that crashed or hung, a benchmark heap that leaked.
    pub failures: Vec<String>,
    /// Wall time of the whole run.
    pub elapsed_s: f64,
}

/// Pair sizes: every power of two from 16 B to 64 KiB (fewer with
/// `--quick`).
pub fn pair_sizes(quick: bool) -> Vec<usize> {
    if quick {
        vec![16, 64, 256, 1024, 4096, 16384, 65536]
    } else {
        (4..=16).map(|s| 1usize << s).collect()
    }
}

/// Runs the suite; prints the report (text or `--json`), writes plots and
/// Markdown if asked. Returns the process exit code: 0 when the run
/// completed (misses are reported, not failures); 1 when an anyalloc child
/// crashed or hung, a benchmark heap leaked, or a file could not be
/// written.
pub fn run(cfg: &SuiteConfig) -> i32 {
    let report = measure_all(cfg);
    if cfg.opts.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    let mut code = 0;
    for f in &report.failures {
        eprintln!("anyalloc bench: FAIL: {f}");
        code = 1;
    }
    if let Some(dir) = &cfg.plots {
        match write_plots(&report, dir) {
            Ok(files) => progress(&format!("wrote {} plots to {}", files.len(), dir.display())),
            Err(e) => {
                eprintln!("anyalloc bench: plots: {e}");
                code = 1;
            }
        }
    }
    if let Some(md) = &cfg.markdown {
        let plots_rel = cfg.plots.as_ref().map(|p| relative_to(p, md));
        if let Err(e) = std::fs::write(md, report.to_markdown(plots_rel.as_deref())) {
            eprintln!("anyalloc bench: {}: {e}", md.display());
            code = 1;
        } else {
            progress(&format!("wrote {}", md.display()));
        }
    }
    code
}

/// `dir` relative to the directory of `file` (both relative to the same
/// working directory), for links from the Markdown file.
fn relative_to(dir: &Path, file: &Path) -> String {
    let base = file.parent().unwrap_or(Path::new(""));
    match dir.strip_prefix(base) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => dir.display().to_string(),
    }
}

/// Runs every selected workload.
pub fn measure_all(cfg: &SuiteConfig) -> SuiteReport {
    let t0 = Instant::now();
    let opts = &cfg.opts;
    let sel = |group: &str, name: &str| opts.selected(&format!("{group}: {name}"));
    let mut timed = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut setup = vec![
        "workloads 1-5: every peer called through &dyn GlobalAlloc (Layout align 8), one dynamic call per alloc and per free".to_string(),
        heap::CALLS_ONLY_SETUP.to_string(),
        heap::PHASES_SETUP.to_string(),
        heap::WORKING_SETS_SETUP.to_string(),
        format!(
            "{}: std::alloc::System; {}: mimalloc::MiMalloc; {}: tikv_jemallocator::Jemalloc; {}: anyalloc::Global (the process-wide heap, with its re-entry routing)",
            peers::GLIBC, peers::MIMALLOC, peers::JEMALLOC, peers::GLOBAL
        ),
        format!(
            "{}: Heap::alloc / free_sized; {}: Heap::alloc_nolock / free_nolock_sized (serves at most 4 MiB); one Heap each, Config::default()",
            peers::NORMAL, peers::NOLOCK
        ),
        "a null from any peer in a multi-threaded workload is retried (and counted); in a single-threaded one it aborts the run".to_string(),
    ];

    // 1-5: the object allocators.
    let mut candidates: Vec<String> = pair_sizes(opts.quick)
        .into_iter()
        .map(|s| format!("pairs: {}", heap::pair_workload(s).0))
        .collect();
    candidates.push(format!("batch: {}", heap::batch_workload(64).0));
    candidates.extend(
        heap::batch_phase_workloads(64)
            .iter()
            .map(|w| format!("phases: {}", w.0)),
    );
    candidates.extend(
        heap::working_set_workloads()
            .iter()
            .map(|w| format!("working-sets: {}", w.0)),
    );
    candidates.push("producer-consumer: producer/consumer 64 B".into());
    candidates.push("larson: larson server churn".into());
    candidates.push("cache-scratch: cache-scratch 8 B".into());
    let any_heap_work = candidates.iter().any(|c| opts.selected(c));
    let hp = any_heap_work.then(|| peers::heap_peers(true));
    if let Some(hp) = &hp {
        let mut list = hp.peers.clone();
        list.retain(|&(n, _)| opts.peer_selected(n));
        if !list.is_empty() {
            if candidates[..pair_sizes(opts.quick).len()]
                .iter()
                .any(|c| opts.selected(c))
            {
                // First contact with every peer (thread caches, the
                // maintainer threads starting) off the record.
                progress("warm-up (discarded)");
                let _ = heap::run_single(opts, &heap::pair_workload(64), &list);
            }
            for size in pair_sizes(opts.quick) {
                let w = heap::pair_workload(size);
                if sel("pairs", &w.0) {
                    timed.push(with_maintainers(1, "pairs", hp, &list, || {
                        heap::run_single(opts, &w, &list)
                    }));
                }
            }
            let w = heap::batch_workload(64);
            if sel("batch", &w.0) {
                timed.push(with_maintainers(2, "batch", hp, &list, || {
                    heap::run_single(opts, &w, &list)
                }));
            }
            for w in heap::batch_phase_workloads(64) {
                if sel("phases", &w.0) {
                    timed.push(with_maintainers(2, "phases", hp, &list, || {
                        heap::run_single(opts, &w, &list)
                    }));
                }
            }
            for w in heap::working_set_workloads() {
                if sel("working-sets", &w.0) {
                    timed.push(with_maintainers(2, "working-sets", hp, &list, || {
                        heap::run_single(opts, &w, &list)
                    }));
                }
            }
            if sel("producer-consumer", "producer/consumer 64 B") {
                timed.push(with_maintainers(3, "producer-consumer", hp, &list, || {
                    heap::run_producer_consumer(opts, &list)
                }));
            }
            if sel("larson", "larson server churn") {
                timed.push(with_maintainers(4, "larson", hp, &list, || {
                    larson::run(opts, &list)
                }));
            }
            if sel("cache-scratch", "cache-scratch 8 B") {
                timed.push(with_maintainers(5, "cache-scratch", hp, &list, || {
                    scratch::run(opts, &list)
                }));
            }
        }
        setup.push(heap::producer_consumer_setup_line());
        setup.push(larson::setup_line());
        setup.push(scratch::setup_line());
        let retries = peers::RETRIES.load(std::sync::atomic::Ordering::Relaxed);
        setup.push(format!(
            "nulls retried in multi-threaded workloads: {retries}"
        ));
        for &(name, h) in &hp.heaps {
            let (line, leaked) = peers::check_heap(name, h);
            if leaked {
                failures.push(format!("benchmark heap leaked: {line}"));
            }
            setup.push(line);
        }
    }

    // 6: pages.
    if opts.filter.as_deref().is_none_or(|f| {
        pages::workloads()
            .iter()
            .any(|w| format!("pages: {}", w.0).contains(f))
    }) {
        let pp = pages::PagePeers::new();
        for r in pages::run(opts, &pp, "pages: ") {
            timed.push(Timed::plain(6, "pages", r));
        }
        setup.extend(pages::setup_lines());
        let (notes, leaks) = pp.check();
        setup.extend(notes);
        failures.extend(
            leaks
                .into_iter()
                .map(|l| format!("page benchmark leaked: {l}")),
        );
    }

    // 7: bursts.
    let bursts_params = if opts.quick { (1.0, 1000) } else { (4.0, 1000) };
    let mut burst_rows = Vec::new();
    if sel("bursts", "signal handler bursts") {
        for (key, name) in bursts::PEERS {
            if !opts.peer_selected(name) {
                continue;
            }
            progress(&format!("bursts: {name} (child process)"));
            let mut cmd = child_command(cfg);
            cmd.arg("bursts")
                .arg(key)
                .arg(bursts_params.0.to_string())
                .arg(bursts_params.1.to_string());
            let deadline = Duration::from_secs_f64(
                bursts_params.0
                    + bursts::SETTLE_S as f64
                    + bursts::DRAIN_SETTLE_MS as f64 / 1e3
                    + 30.0,
            );
            let (outcome, _) = survival::run_child(cmd, deadline);
            let result = match outcome {
                Outcome::Survived(v) if v["corrupted"].as_u64().unwrap_or(0) > 0 => Err(format!(
                    "{} objects corrupted (their bytes changed while allocated)",
                    v["corrupted"]
                )),
                Outcome::Survived(v) => Ok(v),
                o => Err(format!("child failed: {}", o.describe())),
            };
            if let (true, Err(e)) = (name.starts_with("anyalloc"), &result) {
                failures.push(format!("bursts, {name}: {e}"));
            }
            burst_rows.push(BurstRow { name, result });
        }
    }

    // 8: survival.
    let survival_params = if opts.quick {
        (1.0, 4.0, 2)
    } else {
        (3.0, 10.0, 5)
    };
    let mut survival_rows = Vec::new();
    if sel("survival", "signal handler survival") {
        for (key, name) in survival::PEERS {
            if !opts.peer_selected(name) {
                continue;
            }
            let mut runs = Vec::new();
            for run in 0..survival_params.2 {
                progress(&format!(
                    "survival: {name}, run {} of {} (child process)",
                    run + 1,
                    survival_params.2
                ));
                let mut cmd = child_command(cfg);
                cmd.arg("survival")
                    .arg(key)
                    .arg(survival_params.0.to_string());
                let (o, _) = survival::run_child(cmd, Duration::from_secs_f64(survival_params.1));
                let o = survival::judge(o);
                if survival::is_anyalloc(name) && !matches!(o, Outcome::Survived(_)) {
                    failures.push(format!(
                        "survival, {name}, run {}: {}",
                        run + 1,
                        o.describe()
                    ));
                }
                runs.push(o);
            }
            survival_rows.push(SurvivalRow { name, runs });
        }
    }

    let mut report = SuiteReport {
        machine: Machine::detect(),
        opts: opts.clone(),
        command: cfg.command.clone(),
        timed,
        bursts: burst_rows,
        bursts_params,
        survival: survival_rows,
        survival_params,
        setup,
        targets: Vec::new(),
        expectations: Vec::new(),
        failures,
        elapsed_s: 0.0,
    };
    (report.targets, report.expectations) = report.compute_targets();
    report.elapsed_s = t0.elapsed().as_secs_f64();
    report
}

fn child_command(cfg: &SuiteConfig) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut cmd = Command::new(exe);
    cmd.args(&cfg.child);
    cmd
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn mib(bytes: f64) -> String {
    format!("{:.2}", bytes / (1u64 << 20) as f64)
}

/// Peak RSS above the process's RSS before the allocator existed, divided
/// by the peak of live data.
pub fn rss_over_live(v: &Value) -> Option<f64> {
    let live = num(v, "live_peak_bytes");
    (live > 0.0).then(|| (num(v, "rss_peak") - num(v, "rss_base")) / live)
}

impl SuiteReport {
    fn timed_in(&self, numbers: &[u8]) -> Vec<WorkloadResult> {
        self.timed
            .iter()
            .filter(|t| numbers.contains(&t.number))
            .map(|t| t.result.clone())
            .collect()
    }

    /// (targets, baseline expectations).
    fn compute_targets(&self) -> (Vec<Target>, Vec<Target>) {
        let mut t = heap::targets(&self.timed_in(&[1, 2, 3, 4]));
        let mut expect = Vec::new();
        t.extend(pages::targets(&self.timed_in(&[6])));
        for row in &self.bursts {
            let list = if row.name.starts_with("anyalloc") {
                &mut t
            } else {
                &mut expect
            };
            let Ok(v) = &row.result else {
                list.push(Target::at_least(
                    format!("bursts, {}: ran", row.name),
                    None,
                    1.0,
                    "x",
                    row.result.clone().err().unwrap_or_default(),
                ));
                continue;
            };
            let success = num(v, "success_rate") * 100.0;
            if row.name.starts_with("anyalloc") {
                t.push(Target::at_least(
                    format!("bursts success, {}", row.name),
                    Some(success),
                    99.9,
                    "%",
                    format!(
                        "{} of {} allocations; heap had memory to spare: {}",
                        v["ok"],
                        v["attempts"],
                        memory_note(v)
                    ),
                ));
                t.push(Target::new(
                    format!("bursts peak RSS / live data, {}", row.name),
                    rss_over_live(v),
                    1.5,
                    "x",
                    format!(
                        "(peak RSS - RSS before the heap) {} MiB / live peak {} MiB",
                        mib(num(v, "rss_peak") - num(v, "rss_base")),
                        mib(num(v, "live_peak_bytes"))
                    ),
                ));
            } else if row.name.contains("preallocated") {
                let committed = v["detail"]["capacity"]["committed_bytes"]
                    .as_f64()
                    .unwrap_or(0.0);
                let held = num(v, "rss_after") - num(v, "rss_base");
                expect.push(Target::at_least(
                    format!("{} holds its maximum after the run", row.name),
                    (committed > 0.0).then(|| held / committed),
                    0.95,
                    "x",
                    format!(
                        "RSS above base 2 s after every free {} MiB / pool {} MiB (expected: it never shrinks)",
                        mib(held),
                        mib(committed)
                    ),
                ));
            } else if row.name.starts_with("careful") {
                expect.push(Target::at_least(
                    format!("bursts success, {}", row.name),
                    Some(success),
                    99.9,
                    "%",
                    format!(
                        "correct by construction (no handler runs inside malloc); {} of {} allocations, {} ns per handler allocation",
                        v["ok"],
                        v["attempts"],
                        v["handler_ns_per_alloc"].as_f64().map_or("-".into(), |x| format!("{x:.0}"))
                    ),
                ));
            } else if row.name.contains("watermark") {
                let big = &v["by_burst_size"][3];
                let (b, full) = (num(big, "bursts"), num(big, "bursts_full"));
                expect.push(Target::new(
                    format!("{}: allocations in bursts of 1000+", row.name),
                    Some(100.0 * num(big, "success_rate")),
                    99.9,
                    "%",
                    format!(
                        "expected to fail where anyalloc succeeds: high mark {} objects per CPU; {full} of {b} such bursts fully served \
                         (objects freed by the previous burst stay cached until the worker trims them)",
                        v["detail"]["watermarks"][1]
                    ),
                ));
            }
        }
        for row in &self.survival {
            let (s, f, h) = row.counts();
            let n = row.runs.len();
            let nulls = format!(
                "{}; handler nulls {} of {}",
                outcomes(&row.runs),
                row.sum("handler_nulls"),
                row.sum("handler_allocs")
            );
            if survival::is_anyalloc(row.name) {
                t.push(Target::at_least(
                    format!("survival, {}: runs survived of {n}", row.name),
                    Some(s as f64),
                    n as f64,
                    "runs",
                    nulls,
                ));
            } else if survival::is_careful(row.name) {
                expect.push(Target::at_least(
                    format!("{}: runs survived of {n}", row.name),
                    Some(s as f64),
                    n as f64,
                    "runs",
                    format!("correct by construction; {nulls}"),
                ));
            } else {
                expect.push(Target::at_least(
                    format!("survival, {} (used wrongly): runs lost of {n}", row.name),
                    Some((f + h) as f64),
                    1.0,
                    "runs",
                    format!("expected to crash, hang or lose data; {nulls}"),
                ));
            }
        }
        (t, expect)
    }

    /// The report as text tables.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let o = &self.opts;
        let _ = writeln!(
            out,
            "anyalloc bench: {} rounds per workload, interleaved (start peer rotates), samples of ~{} ms{}",
            o.rounds,
            o.sample_ms,
            if o.quick { " (--quick)" } else { "" }
        );
        let _ = writeln!(
            out,
            "machine: {} CPUs, {}, kernel {}, {}",
            m.nproc, m.cpu_model, m.kernel, m.date
        );
        let _ = writeln!(out, "commit: {}", m.commit_line());
        let _ = writeln!(out, "anyalloc build: {}", build_checks_line());
        let _ = writeln!(
            out,
            "ns per op: median [min p25 p75 max] across rounds; spread = p25..p75"
        );
        for line in &self.setup {
            let _ = writeln!(out, "  {line}");
        }
        for number in 1..=6u8 {
            let ws: Vec<&Timed> = self.timed.iter().filter(|t| t.number == number).collect();
            if ws.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n== {number}. {} ==", title(number));
            if number == 1 && ws.len() > 1 {
                out.push_str(&pairs_matrix(&ws));
            } else {
                for t in ws {
                    out.push_str(&t.result.to_text());
                    if let Some(l) = t.maintainer_line() {
                        let _ = writeln!(out, "{l}");
                    }
                }
            }
        }
        if !self.bursts.is_empty() {
            let _ = writeln!(out, "\n== 7. {} ==", title(7));
            out.push_str(&self.bursts_text());
        }
        if !self.survival.is_empty() {
            let _ = writeln!(out, "\n== 8. {} ==", title(8));
            out.push_str(&self.survival_text());
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            for t in &self.targets {
                let _ = writeln!(out, "  {}", t.line());
            }
            let missed = self
                .targets
                .iter()
                .filter(|t| t.met() == Some(false))
                .count();
            let _ = writeln!(
                out,
                "  {} of {} targets met, {} missed, {} not measured",
                self.targets
                    .iter()
                    .filter(|t| t.met() == Some(true))
                    .count(),
                self.targets.len(),
                missed,
                self.targets.iter().filter(|t| t.met().is_none()).count()
            );
        }
        if !self.expectations.is_empty() {
            let _ = writeln!(
                out,
                "\nbaseline expectations (what the baselines should show; not targets, not counted above):"
            );
            for t in &self.expectations {
                let _ = writeln!(out, "  {}", t.expectation_line());
            }
        }
        for f in &self.failures {
            let _ = writeln!(out, "\nFAIL: {f}");
        }
        let _ = writeln!(out, "\nwhole run: {:.1} s", self.elapsed_s);
        out
    }

    fn bursts_text(&self) -> String {
        let mut out = String::new();
        let (secs, hz) = self.bursts_params;
        let _ = writeln!(
            out,
            "each allocator in its own child process: {} worker threads churn; each has a {hz} Hz timer whose handler frees the previous burst, \
             then allocates a burst of 1-10,000 objects of {} B (log-uniform) and keeps it; storm {secs} s",
            crate::sys::cpus().min(8),
            bursts::OBJECT
        );
        let w = self
            .bursts
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(9)
            .max(9);
        let _ = writeln!(
            out,
            "  every byte of every object is filled and read back before it is freed; ns/alloc = handler time per allocation \
             (free the previous burst with its checks, allocate and fill); maint = the heap's maintainer thread CPU during the storm"
        );
        let _ = writeln!(
            out,
            "\n  {:<w$} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>10} {:>9} {:>9} {:>9}",
            "allocator",
            "success",
            "1-9",
            "10-99",
            "100-999",
            "1000-10000",
            "full bursts",
            "signals",
            "corrupted",
            "ns/alloc",
            "maint ms"
        );
        for r in &self.bursts {
            match &r.result {
                Ok(v) => {
                    let pct = |x: f64| format!("{:.3}%", 100.0 * x);
                    let b = |i: usize| pct(num(&v["by_burst_size"][i], "success_rate"));
                    let opt = |k: &str, prec: usize| {
                        v[k].as_f64()
                            .map_or("-".to_string(), |x| format!("{x:.prec$}"))
                    };
                    let _ = writeln!(
                        out,
                        "  {:<w$} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>10} {:>9} {:>9} {:>9}",
                        r.name,
                        pct(num(v, "success_rate")),
                        b(0),
                        b(1),
                        b(2),
                        b(3),
                        format!("{}/{}", v["bursts_full"], v["bursts"]),
                        v["signals"].to_string(),
                        v["corrupted"].to_string(),
                        opt("handler_ns_per_alloc", 0),
                        opt("maintainer_cpu_ms", 1)
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "  {:<w$} {e}", r.name);
                }
            }
        }
        let _ = writeln!(
            out,
            "\n  memory, MiB above the RSS before the allocator existed (base); live = bursts + churn objects held;\n  drained = after Heap::drain() and 1.5 s more (anyalloc only)\n  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
            "allocator", "before", "peak", "freed", "after 2s", "drained", "live peak", "base RSS", "peak/live"
        );
        for r in &self.bursts {
            if let Ok(v) = &r.result {
                let base = num(v, "rss_base");
                let d = |k: &str| mib(num(v, k) - base);
                let drained = if v["rss_drained"].is_null() {
                    "-".to_string()
                } else {
                    d("rss_drained")
                };
                let _ = writeln!(
                    out,
                    "  {:<w$} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
                    r.name,
                    d("rss_before"),
                    d("rss_peak"),
                    d("rss_freed"),
                    d("rss_after"),
                    drained,
                    mib(num(v, "live_peak_bytes")),
                    mib(base),
                    rss_over_live(v).map_or("-".into(), |x| format!("{x:.2}x"))
                );
            }
        }
        for r in &self.bursts {
            if let Ok(v) = &r.result {
                let _ = writeln!(out, "  {}: {}", r.name, v["detail"]);
            }
        }
        out
    }

    fn survival_text(&self) -> String {
        let mut out = String::new();
        let (secs, kill, runs) = self.survival_params;
        let _ = writeln!(
            out,
            "each run a child process: {} threads churn (8 B-4 KiB) through the allocator's normal API; timers at {} Hz and {:.0} Hz per thread \
             run handlers (nesting) that alloc/free 16 B-2 KiB through the same API; storm {secs} s, killed as hung after {kill} s; {runs} runs",
            crate::sys::cpus().min(8),
            survival::SIGNAL_HZ,
            survival::SIGNAL_HZ as f64 / 3.3
        );
        let w = self
            .survival
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(9)
            .max(9);
        let _ = writeln!(
            out,
            "  survived = exited cleanly, no byte of any block changed (all read back), and some handler allocation returned memory;\n  \
             ns per thread op = free + alloc + fill + check of 8 B-4 KiB (handler time taken out); ns per handler alloc = alloc + fill + check + free \
             of 16 B-2 KiB (medians over the runs that exited)"
        );
        let _ = writeln!(
            out,
            "\n  {:<w$} {:>8} {:>7} {:>5} {:>9} {:>13} {:>10} {:>12} {:>14}  outcomes",
            "allocator",
            "survived",
            "failed",
            "hung",
            "corrupted",
            "handler nulls",
            "of allocs",
            "ns/thread op",
            "ns/handler op"
        );
        for r in &self.survival {
            let (s, f, h) = r.counts();
            let ns = |k: &str| r.median(k).map_or("-".into(), |x| format!("{x:.0}"));
            let _ = writeln!(
                out,
                "  {:<w$} {:>8} {:>7} {:>5} {:>9} {:>13} {:>10} {:>12} {:>14}  {}",
                r.name,
                format!("{s}/{}", r.runs.len()),
                f,
                h,
                r.sum("corrupted"),
                r.sum("handler_nulls"),
                r.sum("handler_allocs"),
                ns("worker_ns_per_op"),
                ns("handler_ns_per_alloc"),
                outcomes(&r.runs)
            );
        }
        out
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut workloads: Vec<Value> = self
            .timed
            .iter()
            .map(|t| {
                let mut v = t.result.to_json();
                v["number"] = json!(t.number);
                v["group"] = json!(t.group);
                if !t.maintainer_cpu_ms.is_empty() {
                    let m: serde_json::Map<String, Value> = t
                        .maintainer_cpu_ms
                        .iter()
                        .map(|(n, ms)| (n.clone(), json!(ms)))
                        .collect();
                    v["maintainer_cpu_ms"] = Value::Object(m);
                    v["wall_s"] = json!(t.wall_s);
                }
                v
            })
            .collect();
        if !self.bursts.is_empty() {
            let peers: Vec<Value> = self
                .bursts
                .iter()
                .map(|r| match &r.result {
                    Ok(v) => {
                        let mut v = v.clone();
                        v["name"] = json!(r.name);
                        v["rss_peak_over_live"] = json!(rss_over_live(&v));
                        v
                    }
                    Err(e) => json!({ "name": r.name, "error": e }),
                })
                .collect();
            workloads.push(json!({
                "number": 7,
                "group": "bursts",
                "name": title(7),
                "unit": "success rate, bytes",
                "storm_s": self.bursts_params.0,
                "signal_hz": self.bursts_params.1,
                "peers": peers,
            }));
        }
        if !self.survival.is_empty() {
            let peers: Vec<Value> = self
                .survival
                .iter()
                .map(|r| {
                    let (s, f, h) = r.counts();
                    json!({
                        "name": r.name,
                        "careful": survival::is_careful(r.name),
                        "runs": r.runs.len(),
                        "survived": s,
                        "failed": f,
                        "hung": h,
                        "corrupted": r.sum("corrupted"),
                        "handler_allocs": r.sum("handler_allocs"),
                        "handler_nulls": r.sum("handler_nulls"),
                        "worker_ns_per_op": r.median("worker_ns_per_op"),
                        "handler_ns_per_alloc": r.median("handler_ns_per_alloc"),
                        "outcomes": r.runs.iter().map(|o| o.describe()).collect::<Vec<_>>(),
                        "reports": r.reports(),
                    })
                })
                .collect();
            workloads.push(json!({
                "number": 8,
                "group": "survival",
                "name": title(8),
                "unit": "runs",
                "storm_s": self.survival_params.0,
                "watchdog_s": self.survival_params.1,
                "peers": peers,
            }));
        }
        let m = &self.machine;
        json!({
            "bench": "anyalloc bench",
            "command": self.command,
            "commit": m.commit,
            "dirty": m.dirty,
            "anyalloc_checks": anyalloc::BUILD_CHECKS,
            "cpu": m.cpu_model,
            "kernel": m.kernel,
            "date": m.date,
            "machine": {
                "nproc": m.nproc,
                "cpu_model": m.cpu_model,
                "kernel": m.kernel,
                "date": m.date,
            },
            "options": self.opts.to_json(),
            "setup": self.setup,
            "workloads": workloads,
            "targets": self.targets.iter().map(|t| t.to_json()).collect::<Vec<_>>(),
            "baseline_expectations": self.expectations.iter().map(|t| t.to_json()).collect::<Vec<_>>(),
            "failures": self.failures,
            "elapsed_s": self.elapsed_s,
        })
    }

    /// The report as Markdown (for `docs/BENCHMARKS.md`), embedding the
    /// plots from `plots` (a path relative to the Markdown file).
    pub fn to_markdown(&self, plots: Option<&str>) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(
            out,
            "The latest full run of `anyalloc bench` (generated by it: do not edit by hand).\n"
        );
        let _ = writeln!(out, "| | |\n|---|---|");
        let _ = writeln!(out, "| command | `{}` |", self.command);
        let _ = writeln!(out, "| commit | `{}` |", m.commit_line());
        let _ = writeln!(out, "| anyalloc build | {} |", build_checks_line());
        let _ = writeln!(out, "| date | {} |", m.date);
        let _ = writeln!(out, "| CPUs (nproc) | {} |", m.nproc);
        let _ = writeln!(out, "| CPU model | {} |", m.cpu_model);
        let _ = writeln!(out, "| kernel | {} |", m.kernel);
        let _ = writeln!(
            out,
            "| rounds | {} per workload, samples of ~{} ms, interleaved (the starting peer rotates) |",
            self.opts.rounds, self.opts.sample_ms
        );
        let _ = writeln!(out, "| whole run | {:.0} s |", self.elapsed_s);
        let _ = writeln!(
            out,
            "\nTo reproduce, from the repository root: `{}`",
            self.command.replacen(
                "anyalloc bench",
                "cargo run --release -p anyalloc-cli --features bench -- bench",
                1
            )
        );
        let _ = writeln!(
            out,
            "\nThis machine is shared and noisy (2x swings between runs are normal): compare peers \
             within one run only. Timed figures are medians across rounds; the spread is p25..p75 \
             (error bars in the plots), with min and max in the tables. How each workload works is \
             documented in `crates/anyalloc-bench` (`cargo doc -p anyalloc-bench`) and its README.\n"
        );
        let _ = writeln!(out, "## Targets\n");
        let _ = writeln!(
            out,
            "| result | target | value | goal | note |\n|---|---|---|---|---|"
        );
        for t in &self.targets {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} {} | {} |",
                t.mark().trim(),
                t.what,
                t.value.map_or("-".into(), |v| t.fmt_value(v)),
                if t.at_least { "≥" } else { "≤" },
                t.fmt_value(t.limit),
                t.note.replace('|', "/")
            );
        }
        if !self.expectations.is_empty() {
            let _ = writeln!(
                out,
                "\n## Baseline expectations\n\nWhat the baselines (peers used wrongly, kernel-style pools, careful users' \
                 workarounds) are expected to show. They are not targets and are not counted above.\n"
            );
            let _ = writeln!(
                out,
                "| as expected | expectation | value | expected | note |\n|---|---|---|---|---|"
            );
            for t in &self.expectations {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} {} | {} |",
                    match t.met() {
                        Some(true) => "yes",
                        Some(false) => "NO",
                        None => "n/a",
                    },
                    t.what,
                    t.value.map_or("-".into(), |v| t.fmt_value(v)),
                    if t.at_least { "≥" } else { "≤" },
                    t.fmt_value(t.limit),
                    t.note.replace('|', "/")
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\n## Failures\n");
            for f in &self.failures {
                let _ = writeln!(out, "- {}", f.replace('|', "/"));
            }
        }
        let _ = writeln!(out, "\n## Set-up\n\n```text");
        for l in &self.setup {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "```");
        for (number, id, name) in GROUPS {
            let body = match number {
                1..=6 => {
                    let ws: Vec<&Timed> =
                        self.timed.iter().filter(|t| t.number == number).collect();
                    if ws.is_empty() {
                        continue;
                    }
                    if number == 1 && ws.len() > 1 {
                        pairs_matrix(&ws)
                    } else {
                        ws.iter()
                            .map(|t| {
                                let mut s = t.result.to_text();
                                if let Some(l) = t.maintainer_line() {
                                    s.push_str(&l);
                                    s.push('\n');
                                }
                                s
                            })
                            .collect()
                    }
                }
                7 if !self.bursts.is_empty() => self.bursts_text(),
                8 if !self.survival.is_empty() => self.survival_text(),
                _ => continue,
            };
            let _ = writeln!(out, "\n## {number}. {name}\n");
            if let Some(dir) = plots {
                for f in plot_files(id) {
                    let _ = writeln!(out, "![{name}]({dir}/{f})\n");
                }
            }
            let _ = writeln!(out, "```text\n{}\n```", body.trim_matches('\n'));
        }
        out
    }
}

fn memory_note(v: &Value) -> String {
    let d = &v["detail"];
    format!(
        "fail busy {}, empty {}",
        d["nolock_alloc_fail_busy"], d["nolock_alloc_fail_empty"]
    )
}

fn outcomes(runs: &[Outcome]) -> String {
    runs.iter()
        .map(|o| o.describe())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The maintainer CPU time over several workloads (the pair sizes), summed
/// per peer.
fn maintainer_sum(ws: &[&Timed]) -> Option<String> {
    let mut sum: Vec<(String, f64)> = Vec::new();
    for t in ws {
        for (n, ms) in &t.maintainer_cpu_ms {
            match sum.iter_mut().find(|(m, _)| m == n) {
                Some((_, x)) => *x += ms,
                None => sum.push((n.clone(), *ms)),
            }
        }
    }
    let wall: f64 = ws.iter().map(|t| t.wall_s).sum();
    (!sum.is_empty()).then(|| {
        let parts: Vec<String> = sum.iter().map(|(n, ms)| format!("{n} {ms:.1} ms")).collect();
        format!(
            "  maintainer thread CPU during these workloads ({wall:.2} s wall, all peers and rounds): {}\n",
            parts.join(", ")
        )
    })
}

/// Workload 1 as one matrix: sizes down, peers across, median [p25-p75].
fn pairs_matrix(ws: &[&Timed]) -> String {
    let mut names: Vec<String> = Vec::new();
    for t in ws {
        for p in &t.result.peers {
            if !names.contains(&p.name) {
                names.push(p.name.clone());
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ns per alloc+free pair: median (p25-p75); best of each row marked *"
    );
    let _ = write!(out, "  {:>9}", "size");
    for n in &names {
        let _ = write!(out, " {:>22}", n);
    }
    out.push('\n');
    for t in ws {
        let r = &t.result;
        let _ = write!(out, "  {:>9}", r.name.trim_start_matches("pair "));
        for n in &names {
            match r.peers.iter().find(|p| &p.name == n) {
                Some(p) => {
                    let s = p.summary;
                    let best = if !p.reference && p.vs_best <= 1.0 + 1e-12 {
                        "*"
                    } else {
                        " "
                    };
                    let _ = write!(
                        out,
                        " {:>22}",
                        format!("{best}{:.1} ({:.1}-{:.1})", s.median, s.p25, s.p75)
                    );
                }
                None => {
                    let _ = write!(out, " {:>22}", "n/a");
                }
            }
        }
        out.push('\n');
    }
    if let Some(l) = maintainer_sum(ws) {
        out.push_str(&l);
    }
    out
}

/// The plot files of a group.
pub fn plot_files(group: &str) -> Vec<String> {
    match group {
        "bursts" => vec!["bursts-success.svg".into(), "bursts-memory.svg".into()],
        g => vec![format!("{g}.svg")],
    }
}

/// One series per peer (in order of first appearance) over `workloads`:
/// each peer's median and spread in each workload, `None` where it did not
/// run.
fn series_by_peer(workloads: &[&Timed]) -> Vec<Series> {
    let mut peer_names: Vec<String> = Vec::new();
    for t in workloads {
        for p in &t.result.peers {
            if !peer_names.contains(&p.name) {
                peer_names.push(p.name.clone());
            }
        }
    }
    peer_names
        .iter()
        .map(|n| {
            let bars = workloads
                .iter()
                .map(|t| {
                    t.result
                        .peers
                        .iter()
                        .find(|p| &p.name == n)
                        .map(|p| bar_of(p, false))
                })
                .collect();
            (n.clone(), bars)
        })
        .collect()
}

fn bar_of(p: &crate::PeerResult, throughput: bool) -> Bar {
    let s = p.summary;
    if throughput {
        // Mops/s: higher is better; p25 of time is p75 of throughput.
        Bar {
            value: 1e3 / s.median,
            lo: 1e3 / s.p75,
            hi: 1e3 / s.p25,
        }
    } else {
        Bar {
            value: s.median,
            lo: s.p25,
            hi: s.p75,
        }
    }
}

/// Writes one SVG per workload group into `dir`; returns the files.
pub fn write_plots(r: &SuiteReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    let stamp = format!(" ({} CPUs, {})", r.machine.nproc, r.machine.date);
    // 1: lines over the sizes.
    let pairs: Vec<&Timed> = r.timed.iter().filter(|t| t.number == 1).collect();
    if !pairs.is_empty() {
        let sizes: Vec<f64> = pairs
            .iter()
            .map(|t| size_of_name(&t.result.name) as f64)
            .collect();
        let names: Vec<String> = pairs
            .iter()
            .map(|t| t.result.name.trim_start_matches("pair ").to_string())
            .collect();
        let series = series_by_peer(&pairs);
        let f = dir.join("pairs.svg");
        plot::lines(
            &f,
            &format!("1. alloc+free pair by size: median ns, p25-p75{stamp}"),
            "ns per alloc+free (log)",
            &sizes,
            &names,
            &series,
        )?;
        files.push(f);
    }
    // 2-5: bars, one per peer.
    for number in 2..=5u8 {
        let Some(t) = r.timed.iter().find(|t| t.number == number) else {
            continue;
        };
        let w = &t.result;
        let groups: Vec<String> = w.peers.iter().map(|p| p.name.clone()).collect();
        let series: Vec<Series> = vec![(
            if w.throughput {
                "Mops/s (all threads)".to_string()
            } else {
                format!("ns per {}", short_op(&w.op))
            },
            w.peers
                .iter()
                .map(|p| Some(bar_of(p, w.throughput)))
                .collect(),
        )];
        let f = dir.join(format!("{}.svg", t.group));
        let unit = if w.throughput {
            "Mops/s (higher is better)"
        } else {
            "ns (lower is better)"
        };
        plot::grouped_bars(
            &f,
            &format!("{number}. {}: median, p25-p75{stamp}", w.name),
            unit,
            &groups,
            &series,
            false,
        )?;
        files.push(f);
    }
    // 6: pages, grouped by workload.
    let pw: Vec<&Timed> = r.timed.iter().filter(|t| t.number == 6).collect();
    if !pw.is_empty() {
        let groups: Vec<String> = pw
            .iter()
            .map(|t| t.result.name.trim_start_matches("page ").to_string())
            .collect();
        let series = series_by_peer(&pw);
        let f = dir.join("pages.svg");
        plot::grouped_bars(
            &f,
            &format!("6. page blocks: median ns per alloc+free, p25-p75{stamp}"),
            "ns (log, lower is better)",
            &groups,
            &series,
            true,
        )?;
        files.push(f);
    }
    // 7: bursts.
    let ok: Vec<(&str, &Value)> = r
        .bursts
        .iter()
        .filter_map(|b| b.result.as_ref().ok().map(|v| (b.name, v)))
        .collect();
    if !ok.is_empty() {
        let mut groups: Vec<String> = bursts::BUCKETS
            .iter()
            .map(|b| format!("bursts of {b}"))
            .collect();
        groups.push("all".into());
        let series: Vec<Series> = ok
            .iter()
            .map(|(name, v)| {
                let mut vals: Vec<Option<Bar>> = (0..4)
                    .map(|i| {
                        Some(Bar::exact(
                            100.0 * num(&v["by_burst_size"][i], "success_rate"),
                        ))
                    })
                    .collect();
                vals.push(Some(Bar::exact(100.0 * num(v, "success_rate"))));
                (name.to_string(), vals)
            })
            .collect();
        let f = dir.join("bursts-success.svg");
        plot::grouped_bars(
            &f,
            &format!("7. allocations from signal handlers that succeeded, by burst size{stamp}"),
            "% of allocations",
            &groups,
            &series,
            false,
        )?;
        files.push(f);
        let groups: Vec<String> = ok.iter().map(|(n, _)| n.to_string()).collect();
        let keys = [
            ("rss_before", "RSS before bursts"),
            ("rss_peak", "peak RSS"),
            ("rss_freed", "RSS just after all freed"),
            ("rss_after", "RSS 2 s later"),
            ("live_peak_bytes", "live data peak"),
        ];
        let series: Vec<Series> = keys
            .iter()
            .map(|(k, label)| {
                (
                    label.to_string(),
                    ok.iter()
                        .map(|(_, v)| {
                            let x = if *k == "live_peak_bytes" {
                                num(v, k)
                            } else {
                                num(v, k) - num(v, "rss_base")
                            };
                            Some(Bar::exact(x / (1u64 << 20) as f64))
                        })
                        .collect(),
                )
            })
            .collect();
        let f = dir.join("bursts-memory.svg");
        plot::grouped_bars(
            &f,
            &format!("7. memory: MiB above the RSS before the allocator existed{stamp}"),
            "MiB",
            &groups,
            &series,
            false,
        )?;
        files.push(f);
    }
    // 8: survival.
    if !r.survival.is_empty() {
        let groups: Vec<String> = r.survival.iter().map(|s| s.name.to_string()).collect();
        let counts: Vec<(usize, usize, usize)> = r.survival.iter().map(|s| s.counts()).collect();
        let series: Vec<Series> = ["survived", "failed", "hung"]
            .iter()
            .enumerate()
            .map(|(i, label)| {
                (
                    label.to_string(),
                    counts
                        .iter()
                        .map(|c| Some(Bar::exact([c.0, c.1, c.2][i] as f64)))
                        .collect(),
                )
            })
            .collect();
        let f = dir.join("survival.svg");
        plot::grouped_bars(
            &f,
            &format!(
                "8. malloc/free from signal handlers: runs of {} s{stamp}",
                r.survival_params.0
            ),
            "runs",
            &groups,
            &series,
            false,
        )?;
        files.push(f);
    }
    Ok(files)
}

fn short_op(op: &str) -> String {
    op.split(" (").next().unwrap_or(op).to_string()
}

fn size_of_name(name: &str) -> usize {
    let s = name.trim_start_matches("pair ");
    let (n, unit) = s.split_once(' ').unwrap_or((s, "B"));
    let n: usize = n.parse().unwrap_or(0);
    match unit {
        "KiB" => n << 10,
        "MiB" => n << 20,
        _ => n,
    }
}

/// Runs a child invocation (`bursts ...` or `survival ...`); returns its
/// exit code.
pub fn child_main(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("bursts") => bursts::child(&args[1..]),
        Some("survival") => survival::child(&args[1..]),
        _ => {
            eprintln!("anyalloc bench --child: expected `bursts ...` or `survival ...`");
            64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_through_names() {
        for s in pair_sizes(false) {
            assert_eq!(size_of_name(&heap::pair_workload(s).0), s);
        }
        assert_eq!(crate::fmt_bytes(65536), "64 KiB");
        assert_eq!(
            relative_to(Path::new("docs/bench"), Path::new("docs/B.md")),
            "bench"
        );
    }
}
