//! The anyalloc benchmarks, as a library: the `pages` and `heap` binaries
//! and `anyalloc bench` (the whole suite, `suite`) are thin wrappers.
//!
//! The workloads, the peers (mimalloc, jemalloc, buddy_system_allocator) and
//! the plots need the default `peers` feature; without it the crate is the
//! measurement core, the baseline pools and [`sys`]. The signal storms of
//! the burst and survival workloads are built from the storm kit shared
//! with the allocator's tests, `anyalloc stress` and the examples
//! (`anyalloc_storm`: timers, handlers, stashes, owner-tagged patterns).
//!
//! This module holds the shared machinery: command-line options,
//! calibration, interleaved multi-round measurement, statistics, the text
//! table and the `--json` report. The workloads live in [`heap`] (pairs,
//! batch, producer/consumer), [`larson`], [`scratch`], [`pages`], [`bursts`]
//! and [`survival`]; the kernel-style baseline pools in [`pools`]; plots in
//! [`plot`].
//!
//! # Method
//!
//! This machine is shared and noisy (2 vCPUs; 2x swings between runs are
//! normal), so peers are only ever compared within one run, interleaved:
//!
//! 1. **Calibrate and warm up.** Every peer runs the workload twice briefly
//!    (discarded), then with a growing
//!    iteration count until the slowest one takes about a tenth of a sample;
//!    the count is then scaled so that the slowest peer's sample lasts
//!    `sample_ms`. Every peer then runs one full, discarded sample (warm
//!    caches, pre-faulted memory, allocator thread caches populated).
//! 2. **Rounds.** In each round every peer runs one sample of the *same*
//!    iteration count, one after another; the starting peer rotates from
//!    round to round so that no peer always runs first or last.
//! 3. **Statistics.** Per peer: the median ns/op across rounds, min, p25,
//!    p75, max, and the ratio of its median to the best median.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[cfg(feature = "peers")]
pub mod bursts;
#[cfg(feature = "peers")]
pub mod heap;
#[cfg(feature = "peers")]
pub mod larson;
#[cfg(feature = "peers")]
pub mod pages;
#[cfg(feature = "peers")]
pub mod peers;
#[cfg(feature = "peers")]
pub mod plot;
#[cfg(feature = "peers")]
pub mod pools;
pub mod ring;
#[cfg(all(
    feature = "peers",
    target_arch = "x86_64",
    target_os = "linux",
    target_env = "gnu"
))]
pub mod rseq_floor;
#[cfg(feature = "peers")]
pub mod scratch;
#[cfg(feature = "peers")]
pub mod suite;
#[cfg(feature = "peers")]
pub mod survival;
pub mod sys;

pub use ring::Ring;

/// `16 B`, `4 KiB`, `64 KiB`, `1.5 MiB`: a byte count for names and tables.
pub fn fmt_bytes(n: usize) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1 << 20 {
        if n.is_multiple_of(1024) {
            format!("{} KiB", n >> 10)
        } else {
            format!("{:.1} KiB", n as f64 / 1024.0)
        }
    } else if n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}

/// Command-line options shared by the benchmark binaries.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Print one JSON object instead of the tables.
    pub json: bool,
    /// Fewer rounds and shorter samples (the whole run in well under 15 s).
    pub quick: bool,
    /// Measured rounds per workload (after warm-up).
    pub rounds: usize,
    /// Target duration of one sample of the slowest peer, in milliseconds.
    pub sample_ms: f64,
    /// Only workloads whose name contains this string.
    pub filter: Option<String>,
    /// Only peers whose name contains this string (for profiling one peer,
    /// e.g. under callgrind).
    pub peer: Option<String>,
}

impl Options {
    /// Full run: 11 rounds of 20 ms samples.
    pub const FULL_ROUNDS: usize = 11;
    /// Full run sample length.
    pub const FULL_SAMPLE_MS: f64 = 20.0;
    /// Quick run: 7 rounds of 3 ms samples.
    pub const QUICK_ROUNDS: usize = 7;
    /// Quick run sample length.
    pub const QUICK_SAMPLE_MS: f64 = 3.0;

    /// Parses `std::env::args`; prints usage and exits on `--help` or an
    /// unknown argument. `bench` and `about` go into the usage text.
    pub fn from_args(bench: &str, about: &str) -> Options {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match Self::parse(&args) {
            Ok(Some(o)) => o,
            Ok(None) => {
                println!("{}", usage(bench, about));
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("{bench}: {e}\n\n{}", usage(bench, about));
                std::process::exit(2);
            }
        }
    }

    /// Parses arguments; `Ok(None)` for `--help`.
    pub fn parse(args: &[String]) -> Result<Option<Options>, String> {
        let mut o = Options {
            json: false,
            quick: false,
            rounds: 0,
            sample_ms: 0.0,
            filter: None,
            peer: None,
        };
        let mut rounds = None;
        let mut sample_ms = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--json" => o.json = true,
                "--quick" => o.quick = true,
                "--rounds" => {
                    let v = value("--rounds")?;
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("--rounds {v}: not a number"))?;
                    if n == 0 {
                        return Err("--rounds must be at least 1".into());
                    }
                    rounds = Some(n);
                }
                "--sample-ms" => {
                    let v = value("--sample-ms")?;
                    let ms: f64 = v
                        .parse()
                        .map_err(|_| format!("--sample-ms {v}: not a number"))?;
                    if !(ms > 0.0 && ms.is_finite()) {
                        return Err("--sample-ms must be positive".into());
                    }
                    sample_ms = Some(ms);
                }
                "--filter" => o.filter = Some(value("--filter")?),
                "--peer" => o.peer = Some(value("--peer")?),
                "-h" | "--help" => return Ok(None),
                // `cargo bench` passes this to harness = false targets.
                "--bench" => {}
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        o.rounds = rounds.unwrap_or(if o.quick {
            Self::QUICK_ROUNDS
        } else {
            Self::FULL_ROUNDS
        });
        o.sample_ms = sample_ms.unwrap_or(if o.quick {
            Self::QUICK_SAMPLE_MS
        } else {
            Self::FULL_SAMPLE_MS
        });
        Ok(Some(o))
    }

    /// Whether the workload `name` passes `--filter`.
    pub fn selected(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// Whether the peer `name` passes `--peer`.
    pub fn peer_selected(&self, name: &str) -> bool {
        self.peer.as_deref().is_none_or(|f| name.contains(f))
    }

    /// The options as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "sample_ms": self.sample_ms,
            "filter": self.filter,
            "peer": self.peer,
        })
    }
}

fn usage(bench: &str, about: &str) -> String {
    format!(
        "{about}\n\n\
         usage: cargo run --release -p anyalloc-bench --bin {bench} -- [options]\n\n\
         options:\n  \
           --quick          {qr} rounds of {qs} ms samples instead of {fr} of {fs} ms\n  \
           --json           print one JSON object instead of tables\n  \
           --rounds N       measured rounds per workload\n  \
           --sample-ms MS   length of one sample of the slowest peer\n  \
           --filter TEXT    only workloads whose name contains TEXT\n  \
           --peer TEXT      only peers whose name contains TEXT (profiling)\n  \
           -h, --help       this text",
        qr = Options::QUICK_ROUNDS,
        qs = Options::QUICK_SAMPLE_MS,
        fr = Options::FULL_ROUNDS,
        fs = Options::FULL_SAMPLE_MS,
    )
}

/// Order statistics of one peer's per-round samples (ns per op).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// 25th percentile (linear interpolation).
    pub p25: f64,
    /// 75th percentile (linear interpolation).
    pub p75: f64,
    /// Largest sample.
    pub max: f64,
}

/// The `q`-quantile (0..=1) of sorted samples, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Median, quartiles and extremes of `samples`.
///
/// # Panics
/// If `samples` is empty.
pub fn summarize(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "no samples to summarize");
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    Summary {
        median: quantile(&s, 0.5),
        min: s[0],
        p25: quantile(&s, 0.25),
        p75: quantile(&s, 0.75),
        max: s[s.len() - 1],
    }
}

/// One competitor in a workload: a name and a closure that runs `iters`
/// iterations and returns the time they took (the closure does its own
/// untimed set-up and tear-down around the timed part).
pub struct Peer<'a> {
    /// Printed name, e.g. `"anyalloc normal"`.
    pub name: &'a str,
    /// Runs `iters` iterations; returns the timed duration.
    pub run: Box<dyn FnMut(u64) -> Duration + 'a>,
    /// A reference row (e.g. the harness alone, without an allocator): it
    /// runs in every round like the others but is never the "best" peer.
    pub reference: bool,
}

impl<'a> Peer<'a> {
    /// A peer named `name` running `run`.
    pub fn new(name: &'a str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Peer {
            name,
            run: Box::new(run),
            reference: false,
        }
    }

    /// A reference row named `name` (see [`Peer::reference`]).
    pub fn reference(name: &'a str, run: impl FnMut(u64) -> Duration + 'a) -> Self {
        Peer {
            reference: true,
            ..Peer::new(name, run)
        }
    }
}

/// The measured result of one peer in one workload.
#[derive(Debug, Clone)]
pub struct PeerResult {
    /// The peer's name.
    pub name: String,
    /// ns per op, one per round, in round order.
    pub samples: Vec<f64>,
    /// Statistics of `samples`.
    pub summary: Summary,
    /// This peer's median divided by the best median of the workload's
    /// non-reference peers.
    pub vs_best: f64,
    /// A reference row, not a competitor.
    pub reference: bool,
}

/// The measured result of one workload.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// Short name, e.g. `"pair order 0"`.
    pub name: String,
    /// What one op is, e.g. `"alloc+free pair"`.
    pub op: String,
    /// Iterations per sample (the same for every peer).
    pub iters: u64,
    /// Ops per iteration (e.g. 64 for a batch of 64).
    pub ops_per_iter: u64,
    /// One entry per peer, in the order given.
    pub peers: Vec<PeerResult>,
    /// A throughput workload: tables also show ops per second (from the
    /// ns/op figures: an op is one operation of any thread, so ops/s is
    /// `1e9 / ns`).
    pub throughput: bool,
}

impl WorkloadResult {
    /// The median ns/op of the peer called `name`, if it took part.
    pub fn median_of(&self, name: &str) -> Option<f64> {
        self.peers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.summary.median)
    }

    /// The best (smallest) median among peers whose names are in `names`,
    /// with that peer's name.
    pub fn best_of(&self, names: &[&str]) -> Option<(String, f64)> {
        self.peers
            .iter()
            .filter(|p| !p.reference && names.contains(&p.name.as_str()))
            .min_by(|a, b| a.summary.median.total_cmp(&b.summary.median))
            .map(|p| (p.name.clone(), p.summary.median))
    }
}

impl WorkloadResult {
    /// The workload as a text table.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = self;
        let _ = writeln!(
            out,
            "\n{} — ns per {} ({} iters x {} ops per sample)",
            w.name, w.op, w.iters, w.ops_per_iter
        );
        let width = w
            .peers
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = write!(
            out,
            "  {:<width$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "peer", "median", "min", "p25", "p75", "max", "vs best"
        );
        if w.throughput {
            let _ = write!(out, " {:>8}", "Mops/s");
        }
        out.push('\n');
        for p in &w.peers {
            let s = p.summary;
            let vs = if p.reference {
                "(ref)".to_string()
            } else {
                format!("{:.2}x", p.vs_best)
            };
            let _ = write!(
                out,
                "  {:<width$} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
                p.name, s.median, s.min, s.p25, s.p75, s.max, vs
            );
            if w.throughput {
                let _ = write!(out, " {:>8.2}", 1e3 / s.median);
            }
            out.push('\n');
        }
        out
    }

    /// The workload as JSON: per peer the median ns/op (and ops/s), the
    /// spread (min, p25, p75, max) and every sample.
    pub fn to_json(&self) -> Value {
        let peers: Vec<Value> = self
            .peers
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "median_ns": p.summary.median,
                    "min_ns": p.summary.min,
                    "p25_ns": p.summary.p25,
                    "p75_ns": p.summary.p75,
                    "max_ns": p.summary.max,
                    "median_ops_per_s": 1e9 / p.summary.median,
                    "vs_best": p.vs_best,
                    "reference": p.reference,
                    "samples_ns": p.samples,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "op": self.op,
            "unit": if self.throughput { "ops/s" } else { "ns/op" },
            "iters_per_sample": self.iters,
            "ops_per_iter": self.ops_per_iter,
            "peers": peers,
        })
    }
}

fn ns_per_op(d: Duration, iters: u64, ops_per_iter: u64) -> f64 {
    d.as_nanos() as f64 / (iters * ops_per_iter) as f64
}

/// Calibrates, warms up and measures one workload; see the crate docs.
/// `ops_per_iter` converts iterations to ops (ns/op is reported).
pub fn measure(
    opts: &Options,
    name: &str,
    op: &str,
    ops_per_iter: u64,
    peers: &mut [Peer<'_>],
) -> WorkloadResult {
    assert!(!peers.is_empty());
    let target = Duration::from_secs_f64(opts.sample_ms / 1e3);
    // First contact (allocator and thread-cache initialisation, page
    // faults) is slow and must not drive the calibration: two short
    // discarded runs first.
    for _ in 0..2 {
        for p in peers.iter_mut() {
            (p.run)(64);
        }
    }
    // Grow the count until the slowest peer needs a tenth of a sample, then
    // measure that count once more and keep the smaller slowest time (a
    // one-off hiccup must not shrink every sample).
    let slowest_at = |peers: &mut [Peer<'_>], n: u64| {
        peers
            .iter_mut()
            .map(|p| (p.run)(n))
            .max()
            .unwrap_or_default()
    };
    let mut n: u64 = 16;
    let slowest = loop {
        let slowest = slowest_at(peers, n);
        if slowest >= target / 10 || n >= 1 << 40 {
            break slowest.min(slowest_at(peers, n));
        }
        n *= 4;
    };
    let scale = target.as_secs_f64() / slowest.as_secs_f64().max(1e-9);
    let iters = ((n as f64 * scale) as u64).max(1);
    // A full discarded sample per peer.
    for p in peers.iter_mut() {
        (p.run)(iters);
    }
    let k = peers.len();
    let mut samples = vec![Vec::with_capacity(opts.rounds); k];
    for round in 0..opts.rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let d = (peers[i].run)(iters);
            samples[i].push(ns_per_op(d, iters, ops_per_iter));
        }
    }
    let summaries: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect();
    let all_reference = peers.iter().all(|p| p.reference);
    let best = summaries
        .iter()
        .zip(peers.iter())
        .filter(|(_, p)| all_reference || !p.reference)
        .map(|(s, _)| s.median)
        .fold(f64::INFINITY, f64::min);
    let peers = peers
        .iter()
        .zip(samples)
        .zip(summaries)
        .map(|((p, samples), summary)| PeerResult {
            name: p.name.to_string(),
            samples,
            summary,
            vs_best: summary.median / best,
            reference: p.reference,
        })
        .collect();
    WorkloadResult {
        name: name.to_string(),
        op: op.to_string(),
        iters,
        ops_per_iter,
        peers,
        throughput: false,
    }
}

/// A goal printed next to the numbers: `value <= limit`.
#[derive(Debug, Clone)]
pub struct Target {
    /// What is compared, e.g. `"order-0 pair, anyalloc normal"`.
    pub what: String,
    /// The measured value (`None`: could not be measured, with the reason in
    /// `note`).
    pub value: Option<f64>,
    /// The goal: `value <= limit`.
    pub limit: f64,
    /// `"ns"`, `"x"` (a ratio), `"%"` or `"runs"`.
    pub unit: &'static str,
    /// The goal is `value >= limit` instead of `value <= limit`.
    pub at_least: bool,
    /// Where the numbers come from, or why there is no value.
    pub note: String,
}

impl Target {
    /// A target `value <= limit`.
    pub fn new(
        what: impl Into<String>,
        value: Option<f64>,
        limit: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) -> Self {
        Target {
            what: what.into(),
            value,
            limit,
            unit,
            at_least: false,
            note: note.into(),
        }
    }

    /// A target `value >= limit`.
    pub fn at_least(
        what: impl Into<String>,
        value: Option<f64>,
        limit: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) -> Self {
        Target {
            at_least: true,
            ..Target::new(what, value, limit, unit, note)
        }
    }

    /// `Some(true)` when met, `None` when unmeasured.
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v <= self.limit
            }
        })
    }

    /// The value in the target's unit.
    pub fn fmt_value(&self, v: f64) -> String {
        match self.unit {
            "x" => format!("{v:.2}x"),
            "%" => format!("{v:.3}%"),
            "runs" => format!("{v:.0}"),
            u => format!("{v:.1} {u}"),
        }
    }

    /// `PASS`, `MISS` or `n/a`.
    pub fn mark(&self) -> &'static str {
        match self.met() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        }
    }

    /// One line of the targets table: mark, what, value, goal, note.
    pub fn line(&self) -> String {
        let val = self
            .value
            .map_or_else(|| "-".to_string(), |v| self.fmt_value(v));
        let cmp = if self.at_least { ">=" } else { "<=" };
        format!(
            "[{}] {:<58} {:>10}  (goal {cmp} {})  {}",
            self.mark(),
            self.what,
            val,
            self.fmt_value(self.limit),
            self.note
        )
    }

    /// One line of the baseline-expectations list: like [`Target::line`],
    /// marked `as expected` or `UNEXPECTED` instead of PASS or MISS.
    pub fn expectation_line(&self) -> String {
        let mark = match self.met() {
            Some(true) => "as expected",
            Some(false) => "UNEXPECTED ",
            None => "n/a        ",
        };
        format!("[{mark}]{}", &self.line()[6..])
    }

    /// The target as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "what": self.what,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "goal": if self.at_least { ">=" } else { "<=" },
            "met": self.met(),
            "note": self.note,
        })
    }
}

/// Everything one benchmark binary measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// `"pages"` or `"heap"`.
    pub bench: String,
    /// Free-form lines describing the set-up (printed above the tables).
    pub setup: Vec<String>,
    /// The options of the run.
    pub options: Options,
    /// The workloads, in run order.
    pub workloads: Vec<WorkloadResult>,
    /// The goals and whether they were met.
    pub targets: Vec<Target>,
}

impl Report {
    /// The report as text tables.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let o = &self.options;
        let _ = writeln!(
            out,
            "anyalloc-bench {}: {} rounds per workload, interleaved (start peer rotates), \
             samples of ~{} ms; ns per op: median [min p25 p75 max] across rounds",
            self.bench, o.rounds, o.sample_ms
        );
        for line in &self.setup {
            let _ = writeln!(out, "  {line}");
        }
        for w in &self.workloads {
            out.push_str(&w.to_text());
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            for t in &self.targets {
                let _ = writeln!(out, "  {}", t.line());
            }
        }
        out
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let workloads: Vec<Value> = self.workloads.iter().map(|w| w.to_json()).collect();
        let targets: Vec<Value> = self.targets.iter().map(|t| t.to_json()).collect();
        json!({
            "bench": self.bench,
            "setup": self.setup,
            "options": self.options.to_json(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "workloads": workloads,
            "targets": targets,
        })
    }

    /// Prints the report to stdout in the format `--json` selects.
    pub fn print(&self) {
        if self.options.json {
            println!("{}", self.to_json());
        } else {
            print!("{}", self.to_text());
        }
    }
}

/// Progress to stderr (kept off stdout so `--json` output stays one object).
pub fn progress(msg: &str) {
    eprintln!("[anyalloc-bench] {msg}");
}

/// Touches every page of `[ptr, ptr + len)` so that no first-touch fault
/// lands inside a timed loop.
///
/// # Safety
/// The range must be valid for writes and hold nothing the caller still
/// needs (one byte per page is overwritten).
pub unsafe fn prefault(ptr: *mut u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `off < len`, and the caller guarantees the range is
        // writable and disposable.
        unsafe { ptr.add(off).write_volatile(0) };
        off += 4096;
    }
}

/// Spins until `f()` holds; yields the CPU now and then so that a
/// descheduled partner thread can run on this 2-core machine.
pub fn spin_until(mut f: impl FnMut() -> bool) {
    let mut spins = 0u32;
    while !f() {
        spins += 1;
        if spins.is_multiple_of(128) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Fails loudly when an allocator returned null (out of memory): a
/// benchmark must not go on with a missing block.
#[cold]
#[inline(never)]
pub fn out_of_memory(peer: &str, what: &str) -> ! {
    eprintln!("anyalloc-bench: {peer} returned no memory for {what}");
    std::process::abort()
}

/// Elapsed time of `f`.
#[inline]
pub fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quantiles_interpolate() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.p25, 2.0);
        assert_eq!(s.p75, 4.0);
        let s = summarize(&[1.0, 2.0]);
        assert_eq!(s.median, 1.5);
        let s = summarize(&[7.0]);
        assert_eq!((s.min, s.median, s.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn options_parse() {
        let o = Options::parse(&args(&[])).unwrap().unwrap();
        assert_eq!(o.rounds, Options::FULL_ROUNDS);
        assert!(!o.json && !o.quick);
        let o = Options::parse(&args(&["--quick", "--json", "--filter", "pair"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.rounds, Options::QUICK_ROUNDS);
        assert!(o.json && o.selected("pair 64") && !o.selected("batch"));
        let o = Options::parse(&args(&["--quick", "--rounds", "3"]))
            .unwrap()
            .unwrap();
        assert_eq!(o.rounds, 3);
        assert!(Options::parse(&args(&["--help"])).unwrap().is_none());
        assert!(Options::parse(&args(&["--bogus"])).is_err());
        assert!(Options::parse(&args(&["--rounds", "0"])).is_err());
        assert!(Options::parse(&args(&["--rounds"])).is_err());
    }

    #[test]
    fn measure_interleaves_and_rates() {
        let opts = Options::parse(&args(&["--rounds", "3", "--sample-ms", "0.2"]))
            .unwrap()
            .unwrap();
        let order = std::cell::RefCell::new(Vec::new());
        let mut peers = vec![
            Peer::new("a", |n| {
                order.borrow_mut().push('a');
                timed(|| {
                    for i in 0..n {
                        std::hint::black_box(i);
                    }
                })
            }),
            Peer::new("b", |n| {
                order.borrow_mut().push('b');
                timed(|| {
                    for i in 0..2 * n {
                        std::hint::black_box(i);
                    }
                })
            }),
        ];
        let r = measure(&opts, "w", "op", 2, &mut peers);
        drop(peers);
        assert_eq!(r.peers.len(), 2);
        assert!(r.peers.iter().all(|p| p.samples.len() == 3));
        assert!(r.peers.iter().any(|p| p.vs_best == 1.0));
        // The last six runs are the three measured rounds, start rotating.
        let order = order.into_inner();
        let tail: String = order[order.len() - 6..].iter().collect();
        assert_eq!(tail, "abbaab");
        let text = Report {
            bench: "t".into(),
            setup: vec![],
            options: opts.clone(),
            workloads: vec![r],
            targets: vec![Target::new("x", Some(1.0), 2.0, "ns", "")],
        };
        assert!(text.to_text().contains("[PASS]"));
        let j = text.to_json();
        assert_eq!(
            j["workloads"][0]["peers"][0]["samples_ns"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}
