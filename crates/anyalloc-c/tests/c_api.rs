//! Every exported function's edge cases, from C and C++; initialisation
//! from inside another library's constructor; fork; exiting threads; TLS
//! modules loaded with dlopen; the maintenance thread switch.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// `extra` followed by the arguments that link libanyalloc.
fn linked(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.extend(link_args());
    v
}

/// api.c, compiled once for the tests of this binary.
fn api_exe() -> &'static std::path::Path {
    static EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| compile(&["api.c"], "api", &linked(&["-fno-builtin"])))
}

#[test]
fn c_semantics_of_every_exported_function() {
    let exe = api_exe();
    let o = run(std::process::Command::new(exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "api: {}", o.describe());
    assert!(o.stdout.contains("checks passed"), "{}", o.stdout);
}

#[test]
fn cxx_new_delete_exceptions_and_threads() {
    if !require("c++") {
        return;
    }
    let exe = compile_with("c++", &["cxx.cpp"], "cxx", &linked(&["-std=c++17"]));
    let o = run(std::process::Command::new(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "cxx: {}", o.describe());
    assert!(o.stdout.contains("cxx: ok"));
}

/// A library initialised before ours allocates in its constructor: the heap
/// is created from inside that `malloc` (the loader's situation too).
#[test]
fn heap_created_inside_another_constructors_malloc() {
    let out = out_dir();
    compile(
        &["early_lib.c"],
        "libanyalloc_c_early.so",
        &["-shared", "-fPIC"],
    );
    let mut args = link_args();
    // Listed after us: initialised before us, but binds malloc to us.
    args.push(format!("-L{}", out.display()));
    args.push("-lanyalloc_c_early".into());
    args.push(format!("-Wl,-rpath,{}", out.display()));
    let exe = compile(&["early_main.c"], "early_main", &args);
    let o = run(std::process::Command::new(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "early: {} {}", o.describe(), o.stdout);
}

/// Another library's fork handlers, registered by a constructor that ran
/// before ours, allocate around `fork` (the heap's handlers are registered
/// first all the same, see `__register_atfork`; without that, these would
/// run inside the heap's fork window, which allows it too): small,
/// 64 KiB and huge blocks, in prepare, parent and child, while other
/// threads allocate and a timer's handler allocates on the forking thread.
/// Linked (listed after us, so initialised first) and preloaded.
#[test]
fn fork_handlers_registered_earlier_allocate() {
    let out = out_dir();
    compile(
        &["atfork_lib.c"],
        "libanyalloc_c_atfork.so",
        &["-shared", "-fPIC"],
    );
    let lib_args = [
        format!("-L{}", out.display()),
        "-lanyalloc_c_atfork".to_string(),
        format!("-Wl,-rpath,{}", out.display()),
        "-pthread".to_string(),
    ];
    let mut args = link_args();
    args.extend(lib_args.iter().cloned());
    let linked_exe = compile(&["atfork_main.c"], "atfork_main_linked", &args);
    let plain_exe = compile(&["atfork_main.c"], "atfork_main", &lib_args);
    for (how, cmd) in [
        ("linked", std::process::Command::new(&linked_exe)),
        ("preloaded", preloaded(&plain_exe)),
    ] {
        let o = run(cmd, TIMEOUT);
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(o.success(), "atfork ({how}): {} {}", o.describe(), o.stdout);
        assert!(o.stdout.contains("atfork: ok 20"), "{}", o.stdout);
    }
}

/// A library whose fork handlers take its mutex (registered by its
/// constructor, which runs before ours), while another thread allocates
/// under that mutex: the heap's prepare handler must run after the
/// library's (as glibc's malloc locks are taken after every prepare
/// handler), or a fork can deadlock against a thread that waits in
/// `malloc` for a heap lock while holding the mutex. Linked and preloaded.
#[test]
fn fork_handlers_that_take_a_mutex_held_around_malloc() {
    let out = out_dir();
    compile(
        &["atfork_mutex_lib.c"],
        "libanyalloc_c_atfork_mutex.so",
        &["-shared", "-fPIC", "-pthread"],
    );
    let lib_args = [
        format!("-L{}", out.display()),
        "-lanyalloc_c_atfork_mutex".to_string(),
        format!("-Wl,-rpath,{}", out.display()),
        "-pthread".to_string(),
    ];
    let mut args = link_args();
    args.extend(lib_args.iter().cloned());
    let linked_exe = compile(&["atfork_mutex_main.c"], "atfork_mutex_main_linked", &args);
    let plain_exe = compile(&["atfork_mutex_main.c"], "atfork_mutex_main", &lib_args);
    for (how, cmd) in [
        ("linked", std::process::Command::new(&linked_exe)),
        ("preloaded", preloaded(&plain_exe)),
    ] {
        let o = run(cmd, Duration::from_secs(60));
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success(),
            "atfork_mutex ({how}): {} {}",
            o.describe(),
            o.stdout
        );
        assert!(o.stdout.contains("atfork_mutex: ok 2000"), "{}", o.stdout);
    }
}

/// A plugin linked against libanyalloc registers fork handlers with
/// `pthread_atfork`, and is unloaded with `dlclose`: its handlers must go
/// with it (glibc unregisters them by the object's `__dso_handle`, which
/// only the `pthread_atfork` of `libc_nonshared.a` passes on). A fork after
/// the `dlclose` used to call them in unmapped memory. The program linked
/// and preloaded.
#[test]
fn fork_after_dlclose_of_a_plugin_that_registered_fork_handlers() {
    let plugin = compile(
        &["atfork_dlclose_lib.c"],
        "libanyalloc_c_atfork_dlclose.so",
        &linked(&["-shared", "-fPIC"]),
    );
    let linked_exe = compile(
        &["atfork_dlclose_main.c"],
        "atfork_dlclose_main_linked",
        &linked(&["-ldl"]),
    );
    let plain_exe = compile(&["atfork_dlclose_main.c"], "atfork_dlclose_main", &["-ldl"]);
    for (how, mut cmd) in [
        ("linked", std::process::Command::new(&linked_exe)),
        ("preloaded", preloaded(&plain_exe)),
    ] {
        cmd.arg(&plugin);
        let o = run(cmd, TIMEOUT);
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success(),
            "atfork_dlclose ({how}): {} {}",
            o.describe(),
            o.stdout
        );
        assert!(o.stdout.contains("atfork_dlclose: ok"), "{}", o.stdout);
    }
}

/// The heap's fork handlers stay registered for the life of the process: a
/// fork after this library's finalisers have run (here from the destructor
/// of a library initialised before it; as well another thread of an exiting
/// process) runs them too. Registered with this library's `__dso_handle`,
/// they were unregistered by its finalisers, and such a fork cloned locks
/// held by other threads. Counted in gdb: a breakpoint on the prepare
/// handler, hit by the fork in `main` and by the one at exit.
#[test]
fn fork_handlers_outlive_the_librarys_finalisers() {
    if !require("gdb") {
        return;
    }
    let out = out_dir();
    compile(
        &["atfork_exit_lib.c"],
        "libanyalloc_c_atfork_exit.so",
        &["-shared", "-fPIC"],
    );
    let mut args = link_args();
    // Listed after us: initialised before us, finalised after us.
    args.push(format!("-L{}", out.display()));
    args.push("-lanyalloc_c_atfork_exit".into());
    args.push(format!("-Wl,-rpath,{}", out.display()));
    let exe = compile(&["atfork_exit_main.c"], "atfork_exit_main", &args);
    let mut cmd = std::process::Command::new("gdb");
    cmd.args(["-nx", "-batch", "-iex", "set debuginfod enabled off"]);
    for c in [
        "set breakpoint pending on",
        "break anyalloc::fork::prepare",
        "run",
        "continue",
        "continue",
        "continue",
    ] {
        cmd.args(["-ex", c]);
    }
    cmd.arg(&exe);
    let o = run(cmd, Duration::from_secs(120));
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(
        o.stdout.contains("atfork_exit: fork in main ok")
            && o.stdout.contains("atfork_exit: fork at exit ok"),
        "atfork_exit: {} {}",
        o.describe(),
        o.stdout
    );
    let hits = o.stdout.matches("Breakpoint 1, ").count();
    assert_eq!(
        hits, 2,
        "the heap's prepare handler ran for {hits} of the 2 forks"
    );
}

#[test]
fn fork_while_threads_allocate() {
    let exe = compile::<&str>(&["fork.c"], "fork", &[]);
    let o = run(preloaded(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "fork: {}", o.describe());
    assert!(o.stdout.contains("fork: ok 60"));
}

/// A process whose main thread ends with `pthread_exit` exits when its
/// last thread returns, with the maintenance thread on too: that thread
/// used to keep the process alive for ever (and blocks every signal, so
/// only SIGKILL ended it). It now ends the process, as the last thread's
/// exit would have, within about a second.
#[test]
fn a_process_whose_main_thread_exits_first_ends_with_its_last_thread() {
    let exe = compile::<&str>(&["main_exits_first.c"], "main_exits_first", &["-pthread"]);
    for maintenance in ["1", "0"] {
        let mut cmd = preloaded(&exe);
        cmd.env("ANYALLOC_MAINTENANCE", maintenance);
        let o = run(cmd, TIMEOUT);
        print!("maintenance {maintenance}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success(),
            "maintenance {maintenance}: {} {}",
            o.describe(),
            o.stdout
        );
        assert!(
            o.stdout.contains("main_exits_first: worker done"),
            "{}",
            o.stdout
        );
    }
}

/// Under a limit on address space the heap starts smaller: under 200 MiB
/// (too little for the default 256 MiB first zone) instead of failing
/// every malloc, and under 320 MiB (which the default would just fit
/// under) leaving room for a 64 MiB block and four threads' stacks.
#[test]
fn a_limit_on_address_space_gets_a_smaller_first_zone() {
    let exe = compile::<&str>(&["rlimit.c"], "rlimit", &["-pthread"]);
    for mib in [200, 320] {
        let mut cmd = preloaded(&exe);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setrlimit, which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let limit = libc::rlimit {
                    rlim_cur: mib << 20,
                    rlim_max: mib << 20,
                };
                libc::setrlimit(libc::RLIMIT_AS, &limit);
                Ok(())
            });
        }
        let o = run(cmd, TIMEOUT);
        print!("{mib} MiB: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success(),
            "rlimit {mib} MiB: {} {}",
            o.describe(),
            o.stdout
        );
        assert!(o.stdout.contains("rlimit: ok"), "{}", o.stdout);
        assert!(!o.stderr.contains("could not create"), "{}", o.stderr);
    }
}

/// Under a limit on address space the heap grows into nearly all of it:
/// growth that doubles each zone used to stop when the next doubling did
/// not fit (with a 16 MiB first zone and 900 MiB of room, at 496 MiB);
/// now a refused zone is retried at half the size, down to 4 MiB, and
/// each growth takes at most half of the room left. Every `malloc` that
/// succeeds leaves `errno` alone, as glibc's does (a refused zone mapping,
/// retried smaller, left `ENOMEM` there), also when growth cannot read
/// `/proc/self/statm` (no file descriptor left: `EMFILE` was left there
/// with `read_small_file`'s `KeepErrno` removed, 1 of 1).
#[test]
fn growth_under_a_limit_on_address_space_uses_most_of_it() {
    let exe = compile::<&str>(&["rlimit_fill.c"], "rlimit_fill", &[]);
    const HEADROOM_MIB: usize = 900;
    for (block, nofds) in [
        (256 << 10, false),
        (1 << 20, false),
        (4 << 20, false),
        (1 << 20, true),
    ] {
        let mut cmd = preloaded(&exe);
        cmd.env("ANYALLOC_MEMORY", "16m")
            .arg(HEADROOM_MIB.to_string())
            .arg(block.to_string());
        if nofds {
            cmd.arg("nofds");
        }
        let o = run(cmd, TIMEOUT);
        print!("{block}-byte blocks: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(
            o.success(),
            "rlimit_fill {block}: {} {}",
            o.describe(),
            o.stdout
        );
        let got: usize = o
            .stdout
            .split("rlimit_fill: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .expect("the MiB allocated in the output");
        assert!(
            got >= HEADROOM_MIB * 8 / 10,
            "{block}-byte blocks: only {got} of {HEADROOM_MIB} MiB of room used"
        );
    }
}

/// glibc's own switch for `M_PERTURB` in the environment, read as glibc
/// 2.36 reads it (`strtoul` with base 0, trailing text ignored, 0 to 255,
/// `GLIBC_TUNABLES` before `MALLOC_PERTURB_`): before, the library ignored
/// both, and a test runner that sets `MALLOC_PERTURB_` (Meson's does, for
/// every test) caught no read of uninitialised memory under it.
#[test]
fn malloc_perturb_from_the_environment_as_glibc() {
    let exe = compile::<&str>(&["perturb_env.c"], "perturb_env", &[]);
    let bytes = |env: &[(&str, &str)]| -> Vec<String> {
        let mut cmd = preloaded(&exe);
        cmd.env_remove("MALLOC_PERTURB_")
            .env_remove("GLIBC_TUNABLES");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = run(cmd, TIMEOUT);
        assert!(o.success(), "{env:?}: {} {}", o.describe(), o.stderr);
        let line = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("perturb_env: "))
            .unwrap_or_else(|| panic!("{env:?}: {}", o.stdout))
            .to_string();
        line.split(' ').map(str::to_string).collect()
    };
    // On: allocations filled with the complement of the byte, calloc zeroed.
    for (env, fill) in [
        (vec![("MALLOC_PERTURB_", "165")], "5a"),
        (vec![("MALLOC_PERTURB_", "0xa5")], "5a"),
        (vec![("MALLOC_PERTURB_", "0245")], "5a"),
        (vec![("MALLOC_PERTURB_", "12abc")], "f3"),
        // Leading blanks skipped, as glibc's strtoul.
        (vec![("MALLOC_PERTURB_", " 165")], "5a"),
        (vec![("GLIBC_TUNABLES", "glibc.malloc.perturb=90")], "a5"),
        (
            vec![
                ("MALLOC_PERTURB_", "165"),
                (
                    "GLIBC_TUNABLES",
                    "glibc.malloc.check=1:glibc.malloc.perturb=90",
                ),
            ],
            "a5",
        ),
        // Named twice: the last valid value (glibc sets it each time).
        (
            vec![(
                "GLIBC_TUNABLES",
                "glibc.malloc.perturb=90:glibc.malloc.perturb=165",
            )],
            "5a",
        ),
        (
            vec![(
                "GLIBC_TUNABLES",
                "glibc.malloc.perturb=165:glibc.malloc.perturb=300",
            )],
            "5a",
        ),
    ] {
        assert_eq!(bytes(&env), [fill, fill, "00"], "{env:?}");
    }
    // A library initialised before this one's constructor chose its own
    // byte in its constructor: that choice stands, as under glibc (which
    // reads the environment before any constructor runs).
    let out = out_dir();
    compile(
        &["perturb_lib.c"],
        "libanyalloc_c_perturb.so",
        &["-shared", "-fPIC"],
    );
    let mut args = link_args();
    // Listed after us: initialised before us.
    args.push(format!("-L{}", out.display()));
    args.push("-lanyalloc_c_perturb".into());
    args.push(format!("-Wl,-rpath,{}", out.display()));
    let chooser = compile(&["perturb_env.c"], "perturb_env_chosen", &args);
    let mut cmd = std::process::Command::new(&chooser);
    cmd.env("MALLOC_PERTURB_", "165");
    let o = run(cmd, TIMEOUT);
    assert!(
        o.success() && o.stdout.contains("perturb_env: ee ee 00"),
        "a constructor's mallopt, then MALLOC_PERTURB_: {} {}",
        o.describe(),
        o.stdout
    );
    // Off: out of range (glibc ignores it), or not set; or set to 0 by
    // the tunable, which MALLOC_PERTURB_ does not override ("-0" is 0 to
    // strtoul, not a negative number out of range).
    for env in [
        vec![("MALLOC_PERTURB_", "256")],
        vec![("MALLOC_PERTURB_", "300")],
        vec![],
        vec![
            ("GLIBC_TUNABLES", "glibc.malloc.perturb=-0"),
            ("MALLOC_PERTURB_", "165"),
        ],
    ] {
        let b = bytes(&env);
        assert!(
            (b[0] == "33" || b[0] == "00") && b[1] == "00" && b[2] == "00",
            "{env:?}: {b:?}"
        );
    }
}

/// The heap's settings from the environment, each checked on its own: one
/// that is invalid is named in one line on stderr and keeps its default,
/// and the others still apply.
#[test]
fn an_invalid_setting_is_reported_and_the_others_still_apply() {
    let exe = compile::<&str>(&["settings.c"], "settings", &[]);
    /// The environment, the one complaint expected if any, the only
    /// zone's bytes when ANYALLOC_GROW=0 caps the heap.
    type Case = (
        &'static [(&'static str, &'static str)],
        Option<&'static str>,
        Option<usize>,
    );
    let cases: &[Case] = &[
        (
            &[("ANYALLOC_MEMORY", "64Mfoo"), ("ANYALLOC_GROW", "0")],
            Some(
                "anyalloc: ANYALLOC_MEMORY=\"64Mfoo\" is not a size (expected e.g. 256M, 4G); \
                 using the default",
            ),
            Some(256 << 20),
        ),
        (
            &[("ANYALLOC_MEMORY", "64 M"), ("ANYALLOC_GROW", "0")],
            Some(
                "anyalloc: ANYALLOC_MEMORY=\"64 M\" is not a size (expected e.g. 256M, 4G); \
                 using the default",
            ),
            Some(256 << 20),
        ),
        (
            &[("ANYALLOC_MEMORY", "1k"), ("ANYALLOC_GROW", "0")],
            Some(
                "anyalloc: ANYALLOC_MEMORY=\"1k\" is out of range (too little memory: at least \
                 65536 bytes (16 pages) are needed); using the default",
            ),
            Some(256 << 20),
        ),
        (
            &[
                ("ANYALLOC_MEMORY", "16m"),
                ("ANYALLOC_CPUS", "lots"),
                ("ANYALLOC_GROW", "0"),
            ],
            Some(
                "anyalloc: ANYALLOC_CPUS=\"lots\" is not a number (expected e.g. 4); using the \
                 default",
            ),
            Some(16 << 20),
        ),
        (
            &[("ANYALLOC_MEMORY", "16m"), ("ANYALLOC_GROW", "nope")],
            Some(
                "anyalloc: ANYALLOC_GROW=\"nope\" is not a switch (expected 0 or 1); using the \
                 default",
            ),
            None,
        ),
        (
            &[
                ("ANYALLOC_MEMORY", "16m"),
                ("ANYALLOC_GROW", "0"),
                ("ANYALLOC_MAINTENANCE", "sometimes"),
            ],
            Some(
                "anyalloc: ANYALLOC_MAINTENANCE=\"sometimes\" is not a switch (expected 0 or 1); \
                 using the default",
            ),
            Some(16 << 20),
        ),
        (
            &[("ANYALLOC_MEMORY", "16MiB"), ("ANYALLOC_GROW", "off")],
            None,
            Some(16 << 20),
        ),
    ];
    for &(env, complaint, capped) in cases {
        let mut cmd = preloaded(&exe);
        for var in [
            "ANYALLOC_MEMORY",
            "ANYALLOC_CPUS",
            "ANYALLOC_GROW",
            "ANYALLOC_MAINTENANCE",
            "ANYALLOC_NOLOCK_SYSCALLS",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        let o = run(cmd, TIMEOUT);
        print!("{env:?}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(o.success(), "{env:?}: {}", o.describe());
        let complaints: Vec<&str> = o
            .stderr
            .lines()
            .filter(|l| l.starts_with("anyalloc: ANYALLOC_"))
            .collect();
        assert_eq!(
            complaints,
            complaint.into_iter().collect::<Vec<_>>(),
            "{env:?}"
        );
        let blocks: usize = o
            .stdout
            .split("settings: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .expect("the block count in the output");
        match capped {
            // ANYALLOC_GROW=0 applied: one zone of that size, and about as
            // many 1 MiB blocks as it holds.
            Some(zone) => {
                let summary = format!("anyalloc: 1 zones of {zone} bytes");
                assert!(o.stderr.contains(&summary), "{env:?}: {}", o.stderr);
                let mib = zone >> 20;
                assert!(
                    blocks <= mib && blocks >= mib * 3 / 4,
                    "{env:?}: {blocks} blocks"
                );
            }
            // Growth on: every block the program asked for.
            None => assert_eq!(blocks, 512, "{env:?}"),
        }
    }
}

/// A big first zone costs address space, not memory: with
/// ANYALLOC_MEMORY=64G the process stays at a few MiB resident (creating
/// the zone used to write a descriptor page in eight, 64 MiB, and take
/// tens of milliseconds; the statistics read every descriptor).
#[test]
fn a_big_first_zone_is_not_resident() {
    let exe = compile::<&str>(&["big_zone.c"], "big_zone", &[]);
    let mut cmd = preloaded(&exe);
    cmd.env("ANYALLOC_MEMORY", "64G");
    let o = run(cmd, TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "big_zone: {} {}", o.describe(), o.stdout);
    assert!(!o.stderr.contains("anyalloc:"), "{}", o.stderr);
    let kib: usize = o
        .stdout
        .split("rss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("rss in the output");
    assert!(
        kib < 16 << 10,
        "resident {kib} KiB with a 64 GiB first zone"
    );
}

/// Caches are per CPU, not per thread: threads that exit strand nothing.
#[test]
fn threads_that_exit_strand_nothing() {
    let exe = compile::<&str>(&["thread_exit.c"], "thread_exit", &[]);
    let o = run(preloaded(&exe), TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "thread_exit: {}", o.describe());
    let kib: u64 = o
        .stdout
        .split("peak rss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("peak rss in the output");
    // 4000 threads x ~256 KiB each would be ~1 GiB if anything stayed behind
    // per thread; one wave of 8 threads needs a few MiB (4-5 MiB measured).
    assert!(kib < 256 << 10, "peak RSS {kib} KiB");
}

/// More dlopen'ed TLS modules than a thread's DTV holds: glibc grows the
/// DTV with malloc from inside __tls_get_addr (and frees closed modules'
/// blocks there). Our routing words are initial-exec TLS, so that malloc
/// does not enter __tls_get_addr again.
#[test]
fn dlopen_of_many_tls_modules() {
    let dir = out_dir().join("tls-modules");
    std::fs::create_dir_all(&dir).unwrap();
    let first = compile(
        &["tls_module.c"],
        "tls-modules/libtls0.so",
        &["-shared", "-fPIC"],
    );
    const N: usize = 40;
    for i in 1..N {
        std::fs::copy(&first, dir.join(format!("libtls{i}.so"))).unwrap();
    }
    let exe = compile(&["dlopen_tls.c"], "dlopen_tls", &["-ldl"]);
    let mut cmd = preloaded(&exe);
    cmd.arg(&dir).arg(N.to_string());
    let o = run(cmd, TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "dlopen_tls: {}", o.describe());
}

/// No maintenance thread unless ANYALLOC_MAINTENANCE=1 asks for one.
#[test]
fn maintenance_thread_only_on_request() {
    let exe = compile::<&str>(&["threads.c"], "threads", &[]);
    let off = run(preloaded(&exe), TIMEOUT);
    let mut cmd = preloaded(&exe);
    cmd.env("ANYALLOC_MAINTENANCE", "1");
    let on = run(cmd, TIMEOUT);
    println!(
        "default: {}ANYALLOC_MAINTENANCE=1: {}",
        off.stdout, on.stdout
    );
    assert!(off.success() && on.success());
    assert_eq!(off.stdout.trim(), "threads: 1");
    assert_eq!(on.stdout.trim(), "threads: 2");
}

/// malloc_info writes well-formed XML: one <size> per class, one <zone>
/// per zone, and the counts reflect what the program holds.
#[test]
fn malloc_info_is_valid_xml_per_class_and_zone() {
    if !require("python3") {
        return;
    }
    let mut cmd = std::process::Command::new(api_exe());
    cmd.arg("info");
    let o = run(cmd, TIMEOUT);
    assert!(o.success(), "api info: {} {}", o.describe(), o.stderr);
    // Python's XML parser is the validator; it prints what it found.
    let check = r#"
import sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
assert root.tag == "malloc" and root.get("allocator") == "anyalloc", root.attrib
sizes = root.find("sizes").findall("size")
assert len(sizes) == 39, len(sizes)
assert [int(s.get("class")) for s in sizes] == list(range(39))
bytes_ = [int(s.get("bytes")) for s in sizes]
assert bytes_ == sorted(bytes_) and bytes_[0] == 8 and bytes_[-1] == 8192, bytes_
c100 = next(s for s in sizes if int(s.get("bytes")) >= 100)
assert int(c100.get("in_use")) >= 1000, c100.attrib
zones = root.findall("zone")
assert len(zones) >= 1 and zones[0].get("nr") == "0"
for z in zones:
    assert int(z.get("free")) <= int(z.get("pages")), z.attrib
mmap = next(t for t in root.findall("total") if t.get("type") == "mmap")
assert int(mmap.get("count")) >= 1 and int(mmap.get("size")) >= 6 << 20, mmap.attrib
print("valid:", len(sizes), "size classes,", len(zones), "zones; class", c100.get("bytes"), "in use", c100.get("in_use"))
"#;
    let py = std::process::Command::new(python_exe())
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_remove("LD_PRELOAD")
        .spawn()
        .expect("python3");
    use std::io::Write;
    py.stdin
        .as_ref()
        .unwrap()
        .write_all(o.stdout.as_bytes())
        .unwrap();
    let r = py.wait_with_output().unwrap();
    print!("{}", String::from_utf8_lossy(&r.stdout));
    assert!(
        r.status.success(),
        "malloc_info XML rejected: {}\n{}",
        String::from_utf8_lossy(&r.stderr),
        o.stdout
    );
}

/// ANYALLOC_MAINTENANCE=1: a child forked by a multithreaded parent has no
/// maintenance thread until its first malloc, then exactly one.
#[test]
fn maintainer_restarted_in_a_forked_child() {
    let mut cmd = std::process::Command::new(api_exe());
    cmd.arg("forkmaint").env("ANYALLOC_MAINTENANCE", "1");
    let o = run(cmd, TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "forkmaint: {}", o.describe());
    assert!(o.stdout.contains("after 1, later 1"), "{}", o.stdout);
}

/// free_sized / free_aligned_sized with a size the block cannot have:
/// with the `debug-checks` feature a one-line abort, without it (the
/// default, documented) a plain free.
#[test]
fn free_sized_with_a_wrong_size() {
    for mode in ["badsize", "badalignedsize"] {
        let mut cmd = std::process::Command::new(api_exe());
        cmd.arg(mode);
        let o = run(cmd, TIMEOUT);
        println!("{mode}: {} {}", o.describe(), o.stderr.trim());
        if cfg!(feature = "debug-checks") {
            assert_eq!(o.signal(), Some(libc::SIGABRT), "{mode}: {}", o.describe());
            let lines: Vec<&str> = o.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{:?}", o.stderr);
            assert!(lines[0].starts_with("anyalloc: free_"), "{}", lines[0]);
            assert!(
                lines[0].contains("allocated with another size"),
                "{}",
                lines[0]
            );
        } else {
            assert!(o.success(), "{mode}: {}", o.describe());
            assert!(o.stdout.contains("not checked"));
        }
    }
}

/// A program linked before glibc 2.26 frees with `cfree`, which binds to
/// glibc's compat `cfree@GLIBC_2.2.5` (its own free) unless this library
/// defines one: preloaded, such a program aborted on its first `cfree`
/// ("free(): invalid pointer"). Preloaded and linked.
#[test]
fn cfree_of_an_old_binary_frees_through_anyalloc() {
    if !cfg!(all(
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )) {
        return;
    }
    let plain_exe = compile::<&str>(&["cfree.c"], "cfree", &[]);
    let linked_exe = compile(&["cfree.c"], "cfree_linked", &link_args());
    for (how, cmd) in [
        ("preloaded", preloaded(&plain_exe)),
        ("linked", std::process::Command::new(&linked_exe)),
    ] {
        let o = run(cmd, TIMEOUT);
        print!("{how}: {}", o.stdout);
        eprint!("{}", o.stderr);
        assert!(o.success(), "cfree ({how}): {}", o.describe());
        assert!(o.stdout.contains("cfree: ok"), "{}", o.stdout);
    }
}

/// A thread with a pending `pthread_cancel` allocates until the heap grows
/// under a limit on address space: `malloc` is no cancellation point (as
/// glibc's), so the thread is not cancelled inside it. Growth read
/// `/proc/self/statm` with libc's `open`/`read`, cancellation points: the
/// thread was cancelled there with the growth lock held, and the next
/// growth waited for ever.
#[test]
fn malloc_is_no_cancellation_point() {
    let exe = compile::<&str>(&["cancel.c"], "cancel", &["-pthread"]);
    let mut cmd = preloaded(&exe);
    cmd.env("ANYALLOC_MEMORY", "16m");
    let o = run(cmd, TIMEOUT);
    print!("{}", o.stdout);
    eprint!("{}", o.stderr);
    assert!(o.success(), "cancel: {} {}", o.describe(), o.stdout);
    assert!(o.stdout.contains("cancel: worker finished"), "{}", o.stdout);
    assert!(o.stdout.contains("cancel: ok"), "{}", o.stdout);
}

/// A thread with a pending `pthread_cancel` frees a block twice, or frees a
/// foreign pointer: the process aborts with the one-line message, as
/// without the cancel. The message was written with libc's `write`, a
/// cancellation point: the thread was cancelled there, before the message
/// and the abort, and the process ran on with the heap corrupt.
#[test]
fn heap_corruption_aborts_under_a_pending_cancel() {
    let exe = compile::<&str>(&["cancel_fatal.c"], "cancel_fatal", &["-pthread"]);
    for (mode, message) in [("double", "double free"), ("foreign", "0x")] {
        let mut cmd = preloaded(&exe);
        cmd.arg(mode);
        let o = run(cmd, TIMEOUT);
        assert_eq!(
            o.signal(),
            Some(libc::SIGABRT),
            "{mode}: {} {}",
            o.describe(),
            o.stdout
        );
        assert!(
            o.stderr.starts_with("anyalloc: ") && o.stderr.contains(message),
            "{mode}: {}",
            o.stderr
        );
    }
}

/// `fork_handlers_registered_earlier_allocate`'s program, preloaded, run
/// twelve times: its busy threads' `malloc` must never return NULL. An
/// allocation that gave way to a fork (another thread's fork held the lock
/// it needed) returned NULL when that fork ended before the allocation
/// checked for a fork in progress; the program aborted in about one run in
/// five.
#[test]
fn allocations_that_gave_way_to_a_fork_that_ended_retry() {
    let out = out_dir();
    compile(
        &["atfork_lib.c"],
        "libanyalloc_c_atfork.so",
        &["-shared", "-fPIC"],
    );
    let lib_args = [
        format!("-L{}", out.display()),
        "-lanyalloc_c_atfork".to_string(),
        format!("-Wl,-rpath,{}", out.display()),
        "-pthread".to_string(),
    ];
    let exe = compile(&["atfork_main.c"], "atfork_main_repeated", &lib_args);
    for run_no in 0..12 {
        let o = run(preloaded(&exe), TIMEOUT);
        assert!(
            o.success() && o.stdout.contains("atfork: ok 20"),
            "run {run_no}: {} {}",
            o.describe(),
            o.stdout
        );
    }
}
