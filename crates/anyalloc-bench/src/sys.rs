//! Small OS helpers for the benchmarks: resident set size, CPU counts,
//! thread CPU times, and the machine description. Normal context only.
//! (The storm machinery, timers, signal handlers and masks, the current
//! CPU, xorshift and patterns, is the `anyalloc_storm` kit; futex wait and
//! wake come from the allocator: `anyalloc::platform::futex`.)

#[cfg(test)]
use std::time::Duration;

/// Bytes resident in memory now (`/proc/self/statm`, second field, in
/// pages). Normal context only (it opens a file). `0` if unreadable.
pub fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The thread ids of this process's threads whose name starts with
/// `prefix` (`/proc/self/task/*/comm`; names are cut to 15 bytes). Normal
/// context only.
pub fn threads_named(prefix: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .collect();
    tids.sort_unstable();
    tids
}

/// The name anyalloc gives its maintenance threads, as `comm` shows it.
pub const MAINTAINER: &str = "anyalloc-mainta";

/// CPU time used so far by the thread `tid` of this process, in ns (its
/// per-thread CPU clock, `MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`); 0 if
/// the thread is gone.
pub fn thread_cpu_ns(tid: i32) -> u64 {
    // The kernel's encoding of a thread's CPU clock: !tid << 3 | PERTHREAD
    // (4) | SCHED (2).
    let clock = ((!tid) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; an invalid clock id only
    // makes the call fail.
    if unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The summed CPU time of `tids`, in ns.
pub fn threads_cpu_ns(tids: &[i32]) -> u64 {
    tids.iter().map(|&t| thread_cpu_ns(t)).sum()
}

/// The machine a run came from, for reports.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs available to this process.
    pub nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// The running kernel's release.
    pub kernel: String,
    /// UTC date and time of the run, `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
    /// The commit of the source tree the program was built from
    /// (`git rev-parse HEAD` in this crate's directory), `"unknown"` without
    /// git.
    pub commit: String,
    /// Whether tracked files differed from that commit when the run began
    /// (`git status --porcelain --untracked-files=no`); `None` if unknown.
    pub dirty: Option<bool>,
}

impl Machine {
    /// Reads the machine description.
    pub fn detect() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let (commit, dirty) = source_commit();
        Machine {
            nproc: cpus(),
            cpu_model,
            kernel,
            date: utc_now(),
            commit,
            dirty,
        }
    }

    /// `abc1234…` or `abc1234… (dirty)`: the commit as the reports print it.
    pub fn commit_line(&self) -> String {
        match self.dirty {
            Some(true) => format!("{} (dirty: tracked files changed)", self.commit),
            Some(false) => self.commit.clone(),
            None => format!("{} (dirty: unknown)", self.commit),
        }
    }
}

/// The commit of the source tree this crate was built from, and whether its
/// tracked files have changed since: `git` run in the crate's directory.
pub fn source_commit() -> (String, Option<bool>) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    (commit, dirty)
}

/// `YYYY-MM-DD HH:MM UTC` of the current time.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        s / 3600,
        (s % 3600) / 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    #[test]
    fn a_thread_s_cpu_time_is_found_by_name() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::Builder::new()
            .name("cpu-clock-test".into())
            .spawn(move || {
                // Burn 20 ms of this thread's own CPU time (however long
                // that takes on a busy machine), then report it.
                let own = || {
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    // SAFETY: a valid timespec to write.
                    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
                };
                while own() < 20_000_000 {
                    std::hint::spin_loop();
                }
                tx.send(own()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
            })
            .unwrap();
        let own = rx.recv().unwrap();
        let tids = threads_named("cpu-clock-test");
        assert_eq!(tids.len(), 1);
        let ns = threads_cpu_ns(&tids);
        // Read after the thread's own reading, before it does more work
        // than sleeping: at least what it saw, and not much more.
        assert!(ns >= own && ns < own + 10_000_000, "{ns} vs {own}");
        t.join().unwrap();
    }

    #[test]
    fn the_commit_is_this_repository_s() {
        let (commit, dirty) = source_commit();
        // Built from a git checkout (the repository's own tests run there).
        assert_eq!(commit.len(), 40, "{commit}");
        assert!(commit.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");
        assert!(dirty.is_some());
    }

    #[test]
    fn rss_is_positive() {
        assert!(rss_bytes() > 0);
    }
}
