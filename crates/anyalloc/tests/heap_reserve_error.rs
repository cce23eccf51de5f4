//! A heap the OS refuses memory for names both settings the refusal may
//! come from: its first zone (`Config::memory`) and its own metadata, whose
//! size grows with `Config::cpus` (about 0.5 MiB of address space per CPU).
//! The message used to name `Config::memory` alone, also when the metadata
//! of a small heap for many CPUs was refused, where a smaller
//! `Config::memory` does not help.

mod proc_self;
mod watchdog;

use std::time::Duration;

use anyalloc::{Config, Error, Heap};

/// The process's address space in use now, in bytes (`VmSize`).
fn vm_size() -> usize {
    proc_self::status_kib("VmSize:") << 10
}

#[test]
fn a_refused_reservation_names_what_it_was_for() {
    if watchdog::in_child() {
        // Room for a 64 MiB zone, not for the metadata of 4096 CPUs.
        let limit = (vm_size() + (512 << 20)) as libc::rlim_t;
        let lim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit reads the struct; it lowers this process's limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
        let cfg = Config::default().maintenance(false);

        let e = Heap::new(cfg.memory(64 << 20).cpus(4096)).expect_err("refused");
        let msg = e.to_string();
        println!("metadata: {msg}");
        assert!(matches!(e, Error::Reserve { .. }), "{e:?}");
        assert!(
            msg.contains("metadata") && msg.contains("Config::cpus"),
            "{msg}"
        );

        let e = Heap::new(cfg.memory(1 << 40).cpus(2)).expect_err("refused");
        let msg = e.to_string();
        println!("zone: {msg}");
        assert!(matches!(e, Error::Reserve { .. }), "{e:?}");
        assert!(msg.contains("Config::memory"), "{msg}");

        // Within the limit both are reserved.
        Heap::new(cfg.memory(64 << 20).cpus(2)).expect("fits");
        println!("CHILD DONE");
        return;
    }
    let out = watchdog::run_ok(
        "a_refused_reservation_names_what_it_was_for",
        &[],
        Duration::from_secs(60),
        "heaps under a limit on address space",
    );
    println!("{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("CHILD DONE"));
}
