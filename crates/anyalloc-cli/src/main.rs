//! `anyalloc`: the command-line companion of the anyalloc allocator.
//!
//! `anyalloc stress` runs a signal storm: worker threads churn on the
//! normal path of a dedicated stress heap (and on `Global`, which this
//! binary installs as its global allocator) while per-thread POSIX timers
//! fire two signals whose handlers, possibly nested, allocate and free with
//! the nolock paths. Every block is pattern-checked when freed; at the end
//! every page of the stress heap must be free again. See `README.md`.
//!
//! `anyalloc bench` runs the benchmark suite of the `anyalloc-bench` crate:
//! every peer side by side, tables (or `--json`), SVG plots and the
//! Markdown report. It needs the `bench` feature
//! (`cargo run --release -p anyalloc-cli --features bench -- bench`), so
//! that building the stress command builds none of the peers.

mod hist;
mod report;
mod storm;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyalloc::{Config, Heap};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use report::{Report, Settings};
use storm::{Op, SLOTS};

#[global_allocator]
static A: anyalloc::Global = anyalloc::Global;

const EXIT_FAIL: i32 = 1;
/// `anyalloc stress`: deadlock suspected; `anyalloc bench`: built without
/// the `bench` feature.
const EXIT_DEADLOCK: i32 = 2;
const EXIT_USAGE: i32 = 64;
/// The watchdog's limit: this long without progress is a suspected deadlock.
const STALL: Duration = Duration::from_secs(5);
/// Without --memory: the stress heap's first zone (it may grow).
const DEFAULT_HEAP: usize = 256 << 20;

#[derive(Parser)]
#[command(
    name = "anyalloc",
    version,
    about = "Tools for anyalloc, the memory allocator that can be called from any context",
    long_about = "Tools for anyalloc, the memory allocator that can be called from any \
                  context: signal handlers, real-time threads, interrupt handlers.\n\n\
                  This binary itself runs on anyalloc (its #[global_allocator] is anyalloc::Global).",
    after_help = "Run `anyalloc stress --help` for the signal storm, `anyalloc bench --help` for the benchmarks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signal storm: threads churn on the normal path while timer signals
    /// (nested) allocate and free with the nolock paths in their handlers
    #[command(
        long_about = "Signal storm against anyalloc's nolock paths.\n\n\
        Worker threads (one per core by default) allocate and free blocks of 8 B to 64 KiB \
        (skewed to small, random lifetimes, some freed by another thread through a lock-free \
        hand-off array) on the normal path of a dedicated stress heap, and Vecs through Global. \
        Each worker has two POSIX timers (timer_create, SIGEV_THREAD_ID): signal A at --signal-hz \
        and signal B 3.3 times slower. Each handler masks only its own signal, so the two nest. \
        Handlers allocate with the nolock paths only: pages (alloc_pages_nolock, orders 0-3), \
        objects (Heap::alloc_nolock) of the stress heap, and boxes with anyalloc::NoLock (the \
        process-wide heap), and every fourth time a large object of 64 KiB to 4 MiB \
        (Heap::alloc_nolock: page orders 4-10, the zone try-lock path); then free them at once, park them for a later handler invocation, \
        or hand them to another thread's handler. Every block is filled with a pattern derived \
        from its address, its size and a per-allocation nonce kept by its owner, and checked when \
        freed. Each nolock allocation is timed, and signals that land while their thread is inside \
        an allocator call are counted (interrupted_inside_allocator).\n\n\
        At the end the timers stop, every block still held is freed, the stress heap is drained, \
        every one of its pages must be free again (leaked_pages = 0), and every successful \
        allocation must have been freed.\n\n\
        A watchdog reports each thread's last operation and exits with code 2 if nothing \
        progresses for 5 s.",
        after_help = "Exit codes:\n  \
        0   no violation, no leaked page or block, and (without --memory, --first-zone or \
        --migrate) nolock success >= 99.9%\n  \
        1   pattern violations, leaked pages, an allocation never freed, nolock success below \
        99.9% with memory to spare, a setup error, or a run that proves nothing: no signal \
        handled, no signal nested (without --no-nested), no nolock allocation succeeded \
        with --memory, --first-zone or --migrate, or with --migrate no thread moved or nothing \
        was drained\n  \
        2   deadlock suspected (the watchdog saw no progress for 5 s)\n  \
        64  invalid command line"
    )]
    Stress(StressArgs),
    /// Benchmarks side by side with every peer (glibc, mimalloc, jemalloc,
    /// buddy_system_allocator, kernel-style pools), with plots
    #[command(
        long_about = "Benchmarks of anyalloc side by side with its peers.\n\n\
        Workloads: 1 pairs (alloc+free by size, 16 B-64 KiB), 2 batch (1000 allocs then 1000 frees; and its two phases, each timed alone, as the informational group phases; and the same loop with 200 to 40,000 objects of 64 B to 1 KiB, as the informational group working-sets), \
        3 producer-consumer (across threads), 4 larson (server churn, cross-thread frees), \
        5 cache-scratch (false sharing), 6 pages (orders 0-3, 6 and 10), 7 bursts (1-10,000 objects \
        from signal handlers: success rate and RSS, each allocator in a child process), \
        8 survival (malloc/free in signal handlers during a storm, each run a child under a \
        watchdog).\n\n\
        Peers: glibc, mimalloc, jemalloc, anyalloc Global, anyalloc Heap normal and nolock \
        (and normal with the maintainer off); for pages buddy_system_allocator and the bare \
        rseq floor (reference); for bursts a per-CPU watermark pool and a preallocated pool \
        (baselines of what the kernel did before nolock allocation); for bursts and survival \
        the careful peers: glibc with every signal blocked around each call, a preallocated \
        pool in the handlers.\n\n\
        Workloads 1-6 run in one process, interleaved over several rounds; the median and the \
        spread (min, p25, p75, max) are reported, and the targets are printed as PASS/MISS; \
        what the baselines should show is a separate list of baseline expectations. Reports \
        record the commit (and whether the tree was dirty), the CPU, the kernel and the date.\n\n\
        Exit code 1 when an anyalloc child crashed, hung or lost data, or a benchmark heap \
        leaked. Needs the `bench` feature: \
        cargo run --release -p anyalloc-cli --features bench -- bench",
        after_help = "Examples:\n  \
        anyalloc bench --quick                      all workloads in about a minute\n  \
        anyalloc bench --filter pairs --json        one workload group as JSON\n  \
        anyalloc bench --plots docs/bench --markdown docs/BENCHMARKS.md   the full documented run"
    )]
    Bench(BenchArgs),
}

/// Options of `anyalloc bench` (parsed with or without the `bench` feature,
/// so `--help` is the same and a mistyped option is still a usage error).
#[derive(Args, Debug)]
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
struct BenchArgs {
    /// Fewer rounds, shorter samples and storms: every workload in well under 90 s
    #[arg(long)]
    quick: bool,

    /// Print exactly one JSON object on stdout instead of the tables
    #[arg(long)]
    json: bool,

    /// Only workloads whose "group: name" contains TEXT (groups: pairs, batch,
    /// phases, working-sets, producer-consumer, larson, cache-scratch, pages, bursts, survival)
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,

    /// Only peers whose name contains TEXT
    #[arg(long, value_name = "TEXT")]
    peer: Option<String>,

    /// Measured rounds per timed workload [default: 11, or 7 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    rounds: Option<u64>,

    /// Length of one sample of the slowest peer, in ms [default: 20, or 3 with --quick]
    #[arg(long, value_name = "MS")]
    sample_ms: Option<f64>,

    /// Write one SVG plot per workload into DIR (e.g. docs/bench)
    #[arg(long, value_name = "DIR")]
    plots: Option<std::path::PathBuf>,

    /// Write the report as Markdown to FILE (e.g. docs/BENCHMARKS.md), embedding the plots
    #[arg(long, value_name = "FILE")]
    markdown: Option<std::path::PathBuf>,

    /// Internal: run one child of the bursts or survival workloads
    #[arg(long, hide = true, num_args = 1.., allow_hyphen_values = true, value_name = "ARGS")]
    child: Option<Vec<String>>,
}

/// Options of `anyalloc stress`.
#[derive(Args, Debug)]
struct StressArgs {
    /// How long the storm runs, in seconds
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,

    /// Worker threads [default: one per core (available_parallelism)]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=storm::MAX_THREADS as u64))]
    threads: Option<u64>,

    /// Rate of each thread's signal A, in Hz (signal B fires 3.3x slower); 0 turns signals off
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    signal_hz: u64,

    /// Hard cap on the stress heap, bytes with optional k/m/g suffix (e.g. 2m): no growth, so
    /// small values drive the failure paths; the nolock success rate is then reported but not
    /// required. [default: 256 MiB first zone that may grow]
    #[arg(long, value_name = "BYTES", value_parser = parse_memory)]
    memory: Option<usize>,

    /// Size of the stress heap's first zone, bytes with optional k/m/g suffix (e.g. 4m); the heap
    /// grows beyond it, so a small value runs the storm in grown zones too (their own lookup and
    /// per-CPU lists). Nolock calls never grow the heap, so they fail while it is small: the
    /// nolock success rate is then reported but not required, as with --memory. [default: 256 MiB]
    #[arg(long, value_name = "BYTES", value_parser = parse_memory, conflicts_with = "memory")]
    first_zone: Option<usize>,

    /// Print exactly one JSON object on stdout instead of the table (and no progress bar)
    #[arg(long)]
    json: bool,

    /// Keep the threads moving between CPUs: every fourth operation a worker pins itself to a
    /// random allowed CPU or lets go again, and one more thread, moving too, drains the stress heap
    /// in a loop (taking every CPU's slots from wherever it runs: with rseq, each behind a
    /// membarrier fence of that CPU) with a maintenance pass every fourth time. The fast path's
    /// sequences, the slots' locks and their remote takes then meet at every turn
    #[arg(long)]
    migrate: bool,

    /// Don't let the two signals nest: each handler masks both
    #[arg(long)]
    no_nested: bool,

    /// Testing the watchdog: all workers stop making progress after this many seconds
    #[arg(long, value_name = "SECONDS", hide = true)]
    simulate_hang: Option<u64>,

    /// Testing the pattern check: half-way through, a worker changes one byte of a live block
    #[arg(long, hide = true)]
    simulate_corruption: bool,
}

/// A byte count with an optional k/m/g suffix (binary units), at least
/// anyalloc's minimum.
fn parse_memory(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (examples: 1048576, 512k, 2m, 1g)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("unknown suffix `{suffix}` (use k, m or g)")),
    };
    let bytes = n
        .checked_mul(1usize << shift)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < anyalloc::MIN_MEMORY {
        return Err(format!(
            "{bytes} bytes is below anyalloc's minimum of {} bytes (16 pages)",
            anyalloc::MIN_MEMORY
        ));
    }
    Ok(bytes)
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let code = match cli.command {
        Command::Stress(args) => stress(&args),
        Command::Bench(args) => bench(args),
    };
    std::process::exit(code);
}

/// The exact command that runs `anyalloc bench` with the arguments given
/// here, for a binary built without the `bench` feature.
#[cfg(not(feature = "bench"))]
fn bench_command_hint() -> String {
    let mut command = String::from("cargo run --release -p anyalloc-cli --features bench -- bench");
    for a in std::env::args().skip(2) {
        command.push(' ');
        command.push_str(&a);
    }
    command
}

/// `anyalloc bench` in a binary built without the `bench` feature: one line
/// that says how to run it, exit code 2.
#[cfg(not(feature = "bench"))]
fn bench(_args: BenchArgs) -> i32 {
    eprintln!(
        "anyalloc bench: this binary was built without the benchmarks (feature `bench`); run: {}",
        bench_command_hint()
    );
    EXIT_DEADLOCK
}

/// `anyalloc bench`: the suite of `anyalloc-bench`, or one of its children.
#[cfg(feature = "bench")]
fn bench(args: BenchArgs) -> i32 {
    if let Some(child) = &args.child {
        return anyalloc_bench::suite::child_main(child);
    }
    let mut argv: Vec<String> = Vec::new();
    if args.quick {
        argv.push("--quick".into());
    }
    if let Some(n) = args.rounds {
        argv.extend(["--rounds".into(), n.to_string()]);
    }
    if let Some(ms) = args.sample_ms {
        argv.extend(["--sample-ms".into(), ms.to_string()]);
    }
    if let Some(f) = &args.filter {
        argv.extend(["--filter".into(), f.clone()]);
    }
    if let Some(p) = &args.peer {
        argv.extend(["--peer".into(), p.clone()]);
    }
    if args.json {
        argv.push("--json".into());
    }
    let opts = match anyalloc_bench::Options::parse(&argv) {
        Ok(Some(o)) => o,
        Ok(None) => return 0,
        Err(e) => {
            eprintln!("anyalloc bench: {e}");
            return EXIT_USAGE;
        }
    };
    let mut command = String::from("anyalloc bench");
    for a in std::env::args().skip(2) {
        command.push(' ');
        command.push_str(&a);
    }
    let cfg = anyalloc_bench::suite::SuiteConfig {
        opts,
        plots: args.plots,
        markdown: args.markdown,
        child: vec!["bench".into(), "--child".into()],
        command,
    };
    anyalloc_bench::suite::run(&cfg)
}

/// Set by the main thread when the run is over: the watchdog stops.
static DONE: AtomicBool = AtomicBool::new(false);
/// The main thread's own operation, for the watchdog's report.
static MAIN_OP: AtomicU8 = AtomicU8::new(0);
/// Main-thread milestones (watchdog progress while tearing down).
static MAIN_PROGRESS: AtomicU64 = AtomicU64::new(0);

fn stress(args: &StressArgs) -> i32 {
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let threads = threads.min(storm::MAX_THREADS);
    let config = match args.memory {
        Some(m) => Config::default().memory(m).grow(false),
        None => Config::default().memory(args.first_zone.unwrap_or(DEFAULT_HEAP)),
    };
    let heap: &'static Heap = match Heap::new(config) {
        Ok(h) => Box::leak(Box::new(h)),
        Err(e) => {
            eprintln!("anyalloc stress: cannot create the stress heap: {e}");
            return EXIT_FAIL;
        }
    };
    let settings = Settings {
        seconds: args.seconds,
        threads,
        signal_hz: args.signal_hz,
        nested: !args.no_nested,
        memory: args.memory.map(|m| m as u64),
        first_zone: args.first_zone.map(|m| m as u64),
        heap_memory: config.memory_bytes() as u64,
        heap_grow: args.memory.is_none(),
        migrate: args.migrate,
    };
    // Make sure the process-wide heap exists before any handler can use
    // NoLock, and note its counters: only our handlers allocate nolock there.
    let global = match anyalloc::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("anyalloc stress: cannot create the process-wide heap: {e}");
            return EXIT_FAIL;
        }
    };
    let global_busy_before = global.stats().nolock_alloc_fail_busy;

    storm::set_heap(heap);
    // Only workers take the timer signals: every other thread (this one,
    // the watchdog) keeps them blocked; spawned threads inherit the mask.
    storm::mask_signals(true);
    if let Err(e) = storm::install_handlers(settings.nested) {
        eprintln!("anyalloc stress: sigaction failed: {e}");
        return EXIT_FAIL;
    }

    // Period of signal A; 0: no timers.
    let interval_ns = 1_000_000_000u64
        .checked_div(args.signal_hz)
        .map_or(0, |i| i.max(1));
    let ready = Arc::new(Barrier::new(threads + 1));
    let seed = storm::now_ns();
    // `--migrate`: the CPUs this process may use (at least this one).
    let migrate = args.migrate.then(|| {
        let mut cpus = anyalloc_storm::thread::allowed_cpus();
        if cpus.is_empty() {
            cpus.push(anyalloc_storm::thread::current_cpu());
        }
        Arc::new(cpus)
    });
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let ready = ready.clone();
            let cfg = storm::WorkerConfig {
                index: i,
                interval_ns,
                seed: seed ^ ((i as u64) << 48),
                migrate: migrate.clone(),
            };
            std::thread::Builder::new()
                .name(format!("storm-{i}"))
                .spawn(move || storm::worker(cfg, heap, &ready))
                .expect("spawn a worker thread")
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    // Spawned with the storm's signals blocked, as this thread has them.
    let drainer = migrate.map(|cpus| {
        std::thread::Builder::new()
            .name("drainer".into())
            .spawn(move || storm::drainer(heap, &cpus, seed ^ 0xd7a1))
            .expect("spawn the drainer thread")
    });

    {
        let json = args.json;
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog(settings, start, heap, global_busy_before, json))
            .expect("spawn the watchdog thread");
    }

    // The storm: progress bar from this thread, ~4 updates a second.
    let show_bar = !args.json && std::io::stderr().is_terminal();
    let bar = if show_bar {
        ProgressBar::with_draw_target(
            Some(args.seconds * 1000),
            ProgressDrawTarget::stderr_with_hz(8),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>3} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let end = start + Duration::from_secs(args.seconds);
    let hang_at = args.simulate_hang.map(|s| start + Duration::from_secs(s));
    let mut corrupt_at = args
        .simulate_corruption
        .then(|| start + Duration::from_secs(args.seconds) / 2);
    MAIN_OP.store(Op::Running as u8, Relaxed);
    let mut last = (Instant::now(), totals());
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if hang_at.is_some_and(|h| now >= h) {
            storm::HANG.store(true, Relaxed);
        }
        if corrupt_at.is_some_and(|c| now >= c) {
            corrupt_at = None;
            storm::CORRUPT.store(true, Relaxed);
        }
        let tick = if args.simulate_corruption { 50 } else { 250 };
        std::thread::sleep((end - now).min(Duration::from_millis(tick)));
        let now = Instant::now();
        let t = totals();
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let (ops, sigs, att, ok) = (
            t.0 - last.1 .0,
            t.1 - last.1 .1,
            t.2 - last.1 .2,
            t.3 - last.1 .3,
        );
        bar.set_position(now.duration_since(start).as_millis() as u64);
        bar.set_message(format!(
            "{:>6.2} M ops/s  {:>6.1} k signals/s  nolock ok {:>7.3}%",
            ops as f64 / dt / 1e6,
            sigs as f64 / dt / 1e3,
            if att == 0 {
                100.0
            } else {
                100.0 * ok as f64 / att as f64
            },
        ));
        last = (now, t);
    }
    bar.finish_and_clear();

    // Stop: workers delete their timers, block the signals and free what
    // they and their handlers hold; then the shared arrays; then drain.
    storm::STOP.store(true, Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    MAIN_OP.store(Op::Teardown as u8, Relaxed);
    let mut setup_errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => setup_errors.push(e),
            Err(_) => setup_errors.push("a worker panicked".to_string()),
        }
        MAIN_PROGRESS.fetch_add(1, Relaxed);
    }
    if let Some(d) = drainer {
        if d.join().is_err() {
            setup_errors.push("the drainer panicked".to_string());
        }
    }
    storm::free_shared(heap, &MAIN_OP);
    MAIN_OP.store(Op::HeapFree as u8, Relaxed);
    let leaked = leaked_pages(heap);
    let r = report::collect(
        &settings,
        elapsed,
        heap,
        global_busy_before,
        Some(leaked),
        false,
    );
    DONE.store(true, Relaxed);
    MAIN_OP.store(Op::Done as u8, Relaxed);

    if args.json {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &r);
        let _ = writeln!(out);
        let _ = out.flush();
    } else {
        report::print_table(&r);
    }
    verdict(&r, &settings, &setup_errors)
}

/// Pages of the stress heap not free after `drain()`, with everything freed.
///
/// The heap's maintenance thread may be returning an idle block to the OS
/// right then (off the free list for the duration of an madvise), so a
/// non-zero count is re-measured a few times: a real leak stays.
fn leaked_pages(heap: &Heap) -> u64 {
    let mut leaked = 0;
    for attempt in 0..20 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        heap.drain();
        MAIN_PROGRESS.fetch_add(1, Relaxed);
        let pages = heap.pages().stats();
        leaked = pages.total_pages.saturating_sub(pages.free_pages) as u64;
        if leaked == 0 {
            break;
        }
    }
    leaked
}

/// (worker ops, signals, nolock attempts, nolock ok) summed over threads.
fn totals() -> (u64, u64, u64, u64) {
    let ops = SLOTS.iter().map(|t| t.ops.load(Relaxed)).sum();
    let sigs = SLOTS.iter().map(|t| t.signals.load(Relaxed)).sum();
    let k = &storm::KINDS;
    let kinds = [
        storm::KIND_PAGE,
        storm::KIND_OBJECT,
        storm::KIND_BOX,
        storm::KIND_LARGE,
    ];
    let att = kinds.iter().map(|&i| k[i].attempts.load(Relaxed)).sum();
    let ok = kinds.iter().map(|&i| k[i].ok.load(Relaxed)).sum();
    (ops, sigs, att, ok)
}

/// The exit code, with a line on stderr for every failure.
fn verdict(r: &Report, settings: &Settings, setup_errors: &[String]) -> i32 {
    let mut code = 0;
    for e in setup_errors {
        eprintln!("anyalloc stress: FAIL: {e}");
        code = EXIT_FAIL;
    }
    if r.violations > 0 {
        eprintln!(
            "anyalloc stress: FAIL: {} pattern violation(s): a block's contents changed while it was allocated",
            r.violations
        );
        code = EXIT_FAIL;
    }
    if r.leaked_pages != Some(0) {
        eprintln!(
            "anyalloc stress: FAIL: {} page(s) of the stress heap not free after freeing everything and drain()",
            r.leaked_pages.unwrap_or(0)
        );
        code = EXIT_FAIL;
    }
    // The rate is required only with memory to spare, neither --memory
    // nor --first-zone (nolock calls never grow the heap), and without
    // --migrate (its drainer holds every CPU's slots in turn, and a nolock
    // call that finds its CPU's slot held cannot wait for it).
    let spare = settings.memory.is_none() && settings.first_zone.is_none() && !settings.migrate;
    if spare && r.success_rate < 0.999 {
        eprintln!(
            "anyalloc stress: FAIL: nolock success {:.4}% is below 99.9% with memory to spare \
             ({} of {} attempts failed: {} busy, {} empty)",
            100.0 * r.success_rate,
            r.nolock_attempts - r.nolock_ok,
            r.nolock_attempts,
            r.nolock_fail_busy,
            r.nolock_fail_empty
        );
        code = EXIT_FAIL;
    }
    let large_rate = r.large.ok as f64 / r.large.attempts.max(1) as f64;
    if spare && r.large.attempts > 0 && large_rate < 0.999 {
        eprintln!(
            "anyalloc stress: FAIL: nolock success for 64 KiB to 4 MiB objects {:.4}% is below 99.9% \
             with memory to spare ({} of {} attempts failed: {} busy, {} empty)",
            100.0 * large_rate,
            r.large.attempts - r.large.ok,
            r.large.attempts,
            r.large.fail_busy,
            r.large.fail_empty
        );
        code = EXIT_FAIL;
    }
    if let Some(n) = r.allocations_not_freed.filter(|&n| n > 0) {
        let k = |k: &report::KindReport| k.ok.saturating_sub(k.frees + k.leaked_after_violation);
        eprintln!(
            "anyalloc stress: FAIL: {n} successful allocation(s) never freed (pages {}, objects {}, NoLock boxes {}, \
             64K-4M objects {}, worker blocks {}): a block was lost between its owners",
            k(&r.pages),
            k(&r.objects),
            k(&r.boxes),
            k(&r.large),
            k(&r.worker_blocks)
        );
        code = EXIT_FAIL;
    }
    // A run that proves nothing fails.
    if r.signals == 0 {
        eprintln!(
            "anyalloc stress: FAIL: no signal was handled, so no nolock path ran in a handler{}",
            if settings.signal_hz == 0 {
                " (--signal-hz 0 turns the timers off)"
            } else {
                ""
            }
        );
        code = EXIT_FAIL;
    } else if settings.nested && r.nested_signals == 0 {
        eprintln!(
            "anyalloc stress: FAIL: no signal nested inside another handler ({} handled): \
             nested re-entry was not exercised (--no-nested runs without nesting)",
            r.signals
        );
        code = EXIT_FAIL;
    }
    if !settings.nested && r.nested_signals > 0 {
        eprintln!(
            "anyalloc stress: FAIL: {} signal(s) nested although --no-nested masks both signals in each handler",
            r.nested_signals
        );
        code = EXIT_FAIL;
    }
    if !spare && r.nolock_ok == 0 {
        eprintln!(
            "anyalloc stress: FAIL: {} was given and no nolock allocation succeeded ({} attempts): \
             the run exercised only the failure paths",
            if settings.memory.is_some() {
                "--memory"
            } else if settings.first_zone.is_some() {
                "--first-zone"
            } else {
                "--migrate"
            },
            r.nolock_attempts
        );
        code = EXIT_FAIL;
    }
    if settings.migrate && (r.migrations == 0 || r.drains == 0) {
        eprintln!(
            "anyalloc stress: FAIL: --migrate was given but no thread moved ({} affinity changes) \
             or nothing was drained ({} drains)",
            r.migrations, r.drains
        );
        code = EXIT_FAIL;
    }
    if r.signals > 0 && r.interrupted_inside_allocator == 0 {
        eprintln!(
            "anyalloc stress: warning: no signal landed while its thread was inside an allocator call"
        );
    }
    code
}

/// Exits with code 2 (after a report on stderr, and the JSON if asked) when
/// nothing progresses for [`STALL`]: no worker op, no signal, no teardown
/// step anywhere, or one running worker stuck while others go on.
fn watchdog(
    settings: Settings,
    start: Instant,
    heap: &'static Heap,
    global_busy_before: u64,
    json: bool,
) {
    let n = settings.threads;
    let progress = || -> u64 {
        SLOTS[..n]
            .iter()
            .map(|t| t.ops.load(Relaxed) + t.signals.load(Relaxed))
            .sum::<u64>()
            + storm::TEARDOWN_OPS.load(Relaxed)
            + MAIN_PROGRESS.load(Relaxed)
    };
    let mut last_total = progress();
    let mut last_change = Instant::now();
    let mut per: Vec<(u64, Instant)> = SLOTS[..n]
        .iter()
        .map(|t| (t.ops.load(Relaxed), Instant::now()))
        .collect();
    while !DONE.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        let total = progress();
        if total != last_total {
            last_total = total;
            last_change = now;
        }
        let mut stalled = now.duration_since(last_change);
        for (t, (ops, at)) in SLOTS[..n].iter().zip(per.iter_mut()) {
            let o = t.ops.load(Relaxed);
            if o != *ops || !t.running.load(Relaxed) {
                *ops = o;
                *at = now;
            }
            stalled = stalled.max(now.duration_since(*at));
        }
        if stalled >= STALL && !DONE.load(Relaxed) {
            report::write_thread_report(n, stalled.as_secs());
            {
                let mut w = report::FdWriter::new(2);
                let _ = writeln!(
                    w,
                    "  main thread: {}",
                    Op::from_code(MAIN_OP.load(Relaxed)).name()
                );
            }
            if json {
                let r = report::collect(
                    &settings,
                    start.elapsed().as_secs_f64(),
                    heap,
                    global_busy_before,
                    None,
                    true,
                );
                let mut w = report::FdWriter::new(1);
                let _ = serde_json::to_writer(&mut w, &r);
                report::FdWriter::push(&mut w, b"\n");
            }
            // SAFETY: _exit has no preconditions; threads may be stuck
            // holding locks, so no exit handlers run.
            unsafe { libc::_exit(EXIT_DEADLOCK) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory("1m"), Ok(1 << 20));
        assert_eq!(parse_memory("2M"), Ok(2 << 20));
        assert_eq!(parse_memory("512k"), Ok(512 << 10));
        assert_eq!(parse_memory("1g"), Ok(1 << 30));
        assert_eq!(parse_memory("65536"), Ok(65536));
        assert_eq!(parse_memory("2MiB"), Ok(2 << 20));
        assert!(parse_memory("4k").is_err(), "below the minimum");
        assert!(parse_memory("x").is_err());
        assert!(parse_memory("12q").is_err());
        assert!(parse_memory("99999999999999999999g").is_err());
    }
}
