//! More possible CPU ids than [`MAX_CPUS`]: the default slot count is
//! capped at `MAX_CPUS`, and the fast path is then the try-locked slots
//! (the restartable sequences need a slot set for every CPU id), as with
//! an explicit `Config::cpus` below the possible count. Before, the
//! default followed the possible ids whatever their number: 8192 slot sets,
//! and a heap's per-CPU metadata for each (about 4 GiB of address space).
//!
//! The possible CPU ids are the kernel's
//! `/sys/devices/system/cpu/possible`: the test runs itself again in a
//! private mount namespace (`unshare`) where a file saying `0-8191` is
//! bound over it. Where no such namespace can be made (no `unshare`, user
//! namespaces off and not root) it fails, unless `ANYALLOC_ALLOW_SKIP=1`
//! (then it says it skipped).

use std::process::Command;

use anyalloc::{Config, FastPath, Heap, PageAllocator, MAX_CPUS};

const CHILD: &str = "ANYALLOC_MANY_CPUS_CHILD";
const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
const NAME: &str = "more_possible_cpu_ids_than_max_cpus_are_capped";
/// The child's exit code when the bind mount failed (no namespace here).
const NO_MOUNT: i32 = 77;

/// In the namespace: what the allocators made of 8192 possible CPU ids.
fn child() {
    let possible = std::fs::read_to_string(POSSIBLE).unwrap();
    assert_eq!(possible.trim(), "0-8191", "the fake file is not in place");
    let pages = PageAllocator::new(Config::default().memory(16 << 20).grow(false)).unwrap();
    assert_eq!(
        pages.cpus(),
        MAX_CPUS,
        "slot sets for 8192 possible CPU ids"
    );
    assert_eq!(pages.stats().fast_path, FastPath::SlotLock);
    let p = pages.alloc_pages(0).unwrap();
    // SAFETY: allocated above with order 0, freed once.
    unsafe { pages.free_pages(p, 0) };
    // An explicit count is taken as it is.
    let three = PageAllocator::new(Config::default().memory(16 << 20).cpus(3)).unwrap();
    assert_eq!(three.cpus(), 3);

    let heap = Heap::new(
        Config::default()
            .memory(16 << 20)
            .grow(false)
            .maintenance(false),
    )
    .unwrap();
    assert_eq!(heap.pages().cpus(), MAX_CPUS);
    assert_eq!(heap.stats().fast_path, FastPath::SlotLock);
    let layout = std::alloc::Layout::from_size_align(64, 8).unwrap();
    let objs: Vec<_> = (0..1000).map(|_| heap.alloc(layout).unwrap()).collect();
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { heap.free(p) };
    }
    assert_eq!(heap.stats().objects_in_use, 0);
    println!("CHILD OK");
}

#[test]
fn more_possible_cpu_ids_than_max_cpus_are_capped() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let fake = std::env::temp_dir().join(format!("anyalloc-possible-{}", std::process::id()));
    std::fs::write(&fake, "0-8191\n").unwrap();
    let exe = std::env::current_exe().unwrap();
    // `$0` the fake file, `$1` this test binary.
    let script = format!(
        "mount --bind \"$0\" {POSSIBLE} || exit {NO_MOUNT}; \
         exec \"$1\" --exact {NAME} --nocapture --test-threads=1"
    );
    // A user namespace first (no privilege needed where they are on),
    // then a mount namespace alone (root).
    let mut out = None;
    for flags in ["-Urm", "-m"] {
        let o = Command::new("unshare")
            .args([flags, "sh", "-c", &script])
            .arg(&fake)
            .arg(&exe)
            .env(CHILD, "1")
            .output();
        match o {
            Ok(o) if o.status.code() == Some(NO_MOUNT) => continue,
            // unshare itself refused (its own message, exit 1, no child).
            Ok(o) if String::from_utf8_lossy(&o.stderr).starts_with("unshare:") => continue,
            Ok(o) => {
                out = Some(o);
                break;
            }
            Err(_) => break, // no unshare
        }
    }
    let _ = std::fs::remove_file(&fake);
    let Some(out) = out else {
        assert!(
            std::env::var("ANYALLOC_ALLOW_SKIP").as_deref() == Ok("1"),
            "no private mount namespace to fake {POSSIBLE} in (unshare -Urm and -m failed); \
             set ANYALLOC_ALLOW_SKIP=1 to skip"
        );
        println!("skipped: no private mount namespace to fake {POSSIBLE} in");
        return;
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("CHILD OK"),
        "the child failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}
