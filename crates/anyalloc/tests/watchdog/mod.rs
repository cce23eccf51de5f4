//! Runs one test of the current test binary in a child process, under a
//! watchdog: a deadlock in the child fails the test (the child is killed)
//! instead of hanging CI.
//!
//! The child is this executable re-run with `--exact NAME` and the
//! environment variable [`CHILD`] set; the test body checks
//! [`in_child`] and runs the scenario there.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child's environment.
pub const CHILD: &str = "ANYALLOC_WATCHDOG_CHILD";

/// Whether this process is the child running the scenario.
pub fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// What the child did.
pub struct Outcome {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs test `name` in a child with `env` set, and kills it (failing the
/// test with `what` and its output so far) if it has not finished after
/// `limit`: a scenario that completes takes a small fraction of that, a
/// deadlocked one never completes.
pub fn run(name: &str, env: &[(&str, &str)], limit: Duration, what: &str) -> Outcome {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: the watchdog kills grandchildren (forks) too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // No core files from children that are meant to abort.
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the child");
    // Readers drain the pipes while the child runs (a full pipe would stall it).
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out_reader = read(Box::new(child.stdout.take().unwrap()));
    let err_reader = read(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the child") {
            // Forked grandchildren still running would hold the pipes open.
            // SAFETY: as below.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            break Some(s);
        }
        if start.elapsed() > limit {
            // SAFETY: kill has no memory preconditions; the group is the
            // child's own (process_group(0) above).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Outcome {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{what}: the child did not finish within {limit:?} (deadlock); killed.\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ),
    }
}

/// Runs `name` in a child and asserts it exited with status 0.
pub fn run_ok(name: &str, env: &[(&str, &str)], limit: Duration, what: &str) -> Outcome {
    let out = run(name, env, limit, what);
    assert!(
        out.status.success(),
        "{what}: the child failed ({:?}).\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// glibc's switch that turns its rseq registration off, for the
/// single-step tests: the trap flag cannot step through a restartable
/// sequence (every step aborts it), and the fast paths start one even
/// where they do not use rseq.
pub const RSEQ_OFF: (&str, &str) = ("GLIBC_TUNABLES", "glibc.pthread.rseq=0");

/// The prologue of a test that runs its scenario in a child: in the
/// parent, runs test `name` in a child under the watchdog (which fails the
/// test if the child fails, or kills it after `limit`), prints its output
/// and returns `true` (the parent is finished); in the child, returns
/// `false` (run the scenario).
///
/// ```ignore
/// if watchdog::ran_in_child("my_test", Duration::from_secs(60), "what it does") {
///     return;
/// }
/// ```
pub fn ran_in_child(name: &str, limit: Duration, what: &str) -> bool {
    if in_child() {
        return false;
    }
    let out = run_ok(name, &[], limit, what);
    print!("{}", out.stdout);
    true
}

/// For a single-step test: in the parent, runs test `name` in a child with
/// glibc's rseq off ([`RSEQ_OFF`]) under the watchdog, prints its output,
/// asserts it printed `done` and returns `true` (the parent is finished);
/// in the child, returns `false` (run the scenario).
pub fn stepped_in_child(name: &str, limit: Duration, what: &str, done: &str) -> bool {
    if in_child() {
        return false;
    }
    let out = run_ok(name, &[RSEQ_OFF], limit, what);
    print!("{}", out.stdout);
    assert!(
        out.stdout.contains(done),
        "{what}: no \"{done}\" line.\n{}",
        out.stdout
    );
    true
}

/// Waits for forked child `pid`: its exit status, or `None` if it had not
/// exited after `limit` (it is then killed with SIGKILL and reaped): a
/// child hung on a lock fails its test instead of hanging it.
pub fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<libc::c_int> {
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return Some(status);
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a forked child exited with status 0.
pub fn exited_ok(status: libc::c_int) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Asserts that the child of `test` died of `SIGABRT` with exactly one line
/// from anyalloc on its stderr, containing `expect`; returns that line.
pub fn assert_aborted_with<'a>(out: &'a Outcome, test: &str, expect: &str) -> &'a str {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{test}: the child did not abort ({:?}); stderr:\n{}",
        out.status,
        out.stderr
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("anyalloc:"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{test}: expected one line from anyalloc; stderr:\n{}",
        out.stderr
    );
    assert!(
        lines[0].contains(expect),
        "{test}: the message does not say {expect:?}: {}",
        lines[0]
    );
    lines[0]
}

/// In a scenario paused at interrupt points: waits (yielding) until `done`
/// holds, at most 5 s. A wait that runs out only means the scenario did not
/// happen as planned, which the test then asserts; the watchdog ends a run
/// that hangs anyway.
pub fn wait_for(done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !done() && Instant::now() < until {
        std::thread::yield_now();
    }
}
