//! Helpers for the C tests: find the built `libanyalloc.so`, compile C
//! programs with the system `cc`, run programs with a timeout.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory cargo built this test into: `target/<profile>/deps`.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .expect("test binary has a directory")
        .to_path_buf()
}

/// `libanyalloc.so` of this build, built first if needed.
///
/// Cargo does not build a `cdylib`-only library for the package's
/// integration tests (they cannot link it), so the first call runs
/// `cargo build --lib` for this package with the test's own profile and
/// target directory (quick when it is up to date; cargo holds no lock while
/// tests run). `ANYALLOC_C_LIB=/path/to/libanyalloc.so` tests another build.
pub fn lib_path() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(build_lib).clone()
}

fn build_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("ANYALLOC_C_LIB") {
        return PathBuf::from(p);
    }
    let deps = deps_dir();
    let profile_dir = deps.parent().expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => "dev",
    };
    // The library gets this test's features (`--all-features`: the size
    // checks of free_sized).
    let features: &[&str] = if cfg!(feature = "debug-checks") {
        &["--features", "debug-checks"]
    } else {
        &[]
    };
    let o = Command::new(env!("CARGO"))
        .args(["build", "--lib", "-p", "anyalloc-c", "--profile", profile])
        .args(features)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo to build libanyalloc.so");
    assert!(
        o.status.success(),
        "cargo build --lib -p anyalloc-c failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for dir in [profile_dir, deps.as_path()] {
        let p = dir.join("libanyalloc.so");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "libanyalloc.so not found in {} after building it",
        profile_dir.display()
    );
}

/// Where the compiled C programs go: `target/<profile>/anyalloc-c-tests`.
pub fn out_dir() -> PathBuf {
    let d = deps_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
        .join("anyalloc-c-tests");
    std::fs::create_dir_all(&d).expect("create the C output directory");
    d
}

pub fn c_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name)
}

pub fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// Compiles `sources` (files of tests/c, or absolute paths) into
/// `out_dir()/output` with `compiler` (`cc` or `c++`) and `args`; panics
/// with the compiler's output on failure.
pub fn compile_with<S: AsRef<std::ffi::OsStr>>(
    compiler: &str,
    sources: &[&str],
    output: &str,
    args: &[S],
) -> PathBuf {
    let out = out_dir().join(output);
    let mut cmd = Command::new(compiler);
    cmd.arg("-O1")
        .arg("-w")
        .arg("-pthread")
        .arg("-I")
        .arg(include_dir());
    for s in sources {
        let p = Path::new(s);
        cmd.arg(if p.is_absolute() {
            p.to_path_buf()
        } else {
            c_source(s)
        });
    }
    // Built under a name of its own, then renamed into place: two tests
    // build some outputs (a shared library) under one name, and one of
    // them may be loading it while the other's linker writes it.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = out.file_name().unwrap().to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.{}.{n}", std::process::id()));
    cmd.args(args).arg("-o").arg(&tmp);
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        o.status.success(),
        "{compiler} failed for {output}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("renaming {output} into place: {e}"));
    out
}

pub fn compile<S: AsRef<std::ffi::OsStr>>(sources: &[&str], output: &str, args: &[S]) -> PathBuf {
    compile_with("cc", sources, output, args)
}

/// Linker arguments that link a program against `libanyalloc.so` (found
/// at run time through an rpath).
pub fn link_args() -> Vec<String> {
    let dir = lib_path().parent().unwrap().display().to_string();
    vec![
        format!("-L{dir}"),
        // Debian's gcc links --as-needed: a program that calls no function
        // only we define would drop the library.
        "-Wl,--no-as-needed".into(),
        "-lanyalloc".into(),
        format!("-Wl,-rpath,{dir}"),
    ]
}

/// What a program did.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    /// One line for reports: "exit 0", "killed by signal 6", "hung (killed
    /// after 5 s)".
    pub fn describe(&self) -> String {
        if self.timed_out {
            return format!("hung (killed after {:.1} s)", self.elapsed.as_secs_f64());
        }
        match self.status {
            Some(s) if s.code().is_some() => format!("exit {}", s.code().unwrap()),
            Some(s) => format!("killed by signal {}", s.signal().unwrap_or(0)),
            None => "did not run".into(),
        }
    }
}

/// Runs `cmd` (in its own process group) with a deadline; on timeout the
/// whole group is killed. Output is captured.
pub fn run(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    run_spawned(cmd, timeout, None)
}

/// As [`run`], writing `input` to the program's stdin.
pub fn run_with_input(mut cmd: Command, timeout: Duration, input: Vec<u8>) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    run_spawned(cmd, timeout, Some(input))
}

fn run_spawned(mut cmd: Command, timeout: Duration, input: Option<Vec<u8>>) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let pgid = child.id() as i32;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break Some(s),
            None if start.elapsed() >= timeout => {
                timed_out = true;
                // The whole group, so that no descendant keeps the pipes open.
                // SAFETY: kill(2) on the process group this test created.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                break child.wait().ok();
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let elapsed = start.elapsed();
    Outcome {
        status,
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
        timed_out,
        elapsed,
    }
}

/// A command that runs `program` with `libanyalloc.so` preloaded.
pub fn preloaded(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("LD_PRELOAD", lib_path());
    c
}

/// A command that runs `program` with the system allocator (no preload
/// inherited from the environment).
pub fn plain(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env_remove("LD_PRELOAD");
    c
}

/// Compiles `source` (with `-lrt`) once plain, for the preload, and once
/// linked against the library, then runs each with and without rseq
/// (`GLIBC_TUNABLES=glibc.pthread.rseq=0`), passing `args`: every run must
/// finish within `timeout`, exit 0, print `ok` and write nothing on stderr.
/// `name` names the executables and the failures.
pub fn run_four_ways(source: &str, name: &str, args: &[&str], ok: &str, timeout: Duration) {
    let preload_exe = compile::<&str>(&[source], name, &["-lrt"]);
    let mut link = vec!["-lrt".to_string()];
    link.extend(link_args());
    let linked_exe = compile(&[source], &format!("{name}_linked"), &link);
    for (how, rseq_off) in [
        ("preloaded", false),
        ("linked", false),
        ("preloaded", true),
        ("linked", true),
    ] {
        let mut cmd = if how == "preloaded" {
            preloaded(&preload_exe)
        } else {
            plain(&linked_exe)
        };
        cmd.args(args);
        if rseq_off {
            cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
        }
        let o = run(cmd, timeout);
        println!(
            "{name} {how}{}: {} in {:.1} s: {}",
            if rseq_off { ", rseq off" } else { "" },
            o.describe(),
            o.elapsed.as_secs_f64(),
            o.stdout.trim()
        );
        assert!(
            o.success() && o.stdout.contains(ok),
            "{name} {how} (rseq off: {rseq_off}): {}\nstdout: {}\nstderr: {}",
            o.describe(),
            o.stdout,
            o.stderr
        );
        assert!(o.stderr.is_empty(), "stderr: {}", o.stderr);
    }
}

/// Whether `program` runs at all (`--version`, without the preload).
pub fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .env_remove("LD_PRELOAD")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the test may run: `program` is installed. A missing program
/// fails the test, unless `ANYALLOC_ALLOW_SKIP=1` turns that into a skip
/// (printed). `.ci/run` installs what the tests need.
pub fn require(program: &str) -> bool {
    if available(program) {
        return true;
    }
    let allow = std::env::var("ANYALLOC_ALLOW_SKIP").is_ok_and(|v| v == "1");
    assert!(
        allow,
        "{program} is not installed; install it (.ci/run does) or set ANYALLOC_ALLOW_SKIP=1 to skip"
    );
    println!("skipped: {program} not installed (ANYALLOC_ALLOW_SKIP=1)");
    false
}

/// The Python interpreter itself (not a wrapper script: pyenv's shims are
/// bash), from `python3` on the PATH.
pub fn python_exe() -> PathBuf {
    let o = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .env_remove("LD_PRELOAD")
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}
