//! Bad frees abort the process with a one-line message instead of corrupting
//! the heap. Each scenario runs in a child process under a watchdog (this
//! test binary, re-executed with `ANYALLOC_BAD_INPUT=<scenario>` selecting
//! the `child_scenario` test); the parent checks that the child was killed
//! by `SIGABRT` and that stderr holds exactly the expected line.

mod watchdog;

use std::os::unix::process::ExitStatusExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::time::Duration;

use anyalloc::{Config, PageAllocator, PAGE_SIZE};

const SCENARIO_ENV: &str = "ANYALLOC_BAD_INPUT";

/// Runs one bad free, after printing `EXPECT <message>` on stdout: the line
/// the allocator must write to stderr before aborting. Exits normally
/// (printing `SURVIVED`) only if the allocator accepted the bad free.
fn run_scenario(name: &str) {
    let pa = PageAllocator::new(Config::default().memory(16 << 20).cpus(2).grow(false)).unwrap();
    // Announce the expected message (stdout), then commit the bad free.
    let expect = |line: String| {
        println!("\nEXPECT {line}");
        use std::io::Write;
        std::io::stdout().flush().unwrap();
    };
    // SAFETY (for every block below): each call is a deliberately invalid
    // free that the allocator must detect in `claim` *before* touching any
    // list or any memory, and report by aborting; the valid calls free
    // blocks allocated just before with their order.
    match name {
        "double_free" => {
            let p = pa.alloc_pages(0).unwrap();
            // SAFETY: see above: the first free is valid.
            unsafe { pa.free_pages(p, 0) };
            expect(format!(
                "anyalloc: double free of page {:#x} (order 0)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: the second free must abort.
            unsafe { pa.free_pages(p, 0) };
        }
        "double_free_nolock" => {
            let p = pa.alloc_pages_nolock(1).unwrap();
            // SAFETY: see above: the first free is valid.
            unsafe { pa.free_pages_nolock(p, 1) };
            expect(format!(
                "anyalloc: double free of page {:#x} (order 1)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: the second free must abort.
            unsafe { pa.free_pages_nolock(p, 1) };
        }
        "double_free_of_a_direct_zone_block" => {
            // Order 5 goes to the buddy lists directly (no per-CPU list).
            let p = pa.alloc_pages(5).unwrap();
            // Keep its buddy allocated so the freed block stays a head.
            let _buddy = pa.alloc_pages(5).unwrap();
            // SAFETY: see above: the first free is valid.
            unsafe { pa.free_pages(p, 5) };
            expect(format!(
                "anyalloc: double free of page {:#x} (order 5)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: the second free must abort.
            unsafe { pa.free_pages_nolock(p, 5) };
        }
        "wrong_order" => {
            let p = pa.alloc_pages(2).unwrap();
            expect(format!(
                "anyalloc: free of page {:#x} with order 0, but it was allocated with order 2",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(p, 0) };
        }
        "wrong_larger_order" => {
            // An order-0 page at an address aligned for order 1, freed with
            // order 1: the fast path's claim (a per-CPU list has room).
            let p = std::iter::repeat_with(|| pa.alloc_pages(0).unwrap())
                .find(|p| (p.as_ptr() as usize).is_multiple_of(2 * PAGE_SIZE))
                .unwrap();
            expect(format!(
                "anyalloc: free of page {:#x} with order 1, but it was allocated with order 0",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(p, 1) };
        }
        "double_free_by_another_thread" => {
            let p = pa.alloc_pages(3).unwrap();
            let addr = p.as_ptr() as usize;
            std::thread::scope(|s| {
                // SAFETY: see above: the first free is valid.
                s.spawn(|| unsafe { pa.free_pages(NonNull::new(addr as *mut u8).unwrap(), 3) });
            });
            expect(format!("anyalloc: double free of page {addr:#x} (order 3)"));
            // SAFETY: see above: the second free must abort.
            unsafe { pa.free_pages_nolock(p, 3) };
        }
        "double_free_in_a_handler" => {
            // The second free comes from a signal handler (the routed free).
            static PA: AtomicPtr<PageAllocator> = AtomicPtr::new(std::ptr::null_mut());
            static BLOCK: AtomicUsize = AtomicUsize::new(0);
            extern "C" fn free_again(_: libc::c_int) {
                let pa = PA.load(Ordering::Acquire);
                let p = NonNull::new(BLOCK.load(Ordering::Acquire) as *mut u8).unwrap();
                // SAFETY: `pa` lives until the child exits; the free must abort.
                unsafe { (*pa).free_pages(p, 1) };
            }
            let p = pa.alloc_pages(1).unwrap();
            // SAFETY: see above: the first free is valid.
            unsafe { pa.free_pages(p, 1) };
            PA.store(
                &pa as *const PageAllocator as *mut PageAllocator,
                Ordering::Release,
            );
            BLOCK.store(p.as_ptr() as usize, Ordering::Release);
            expect(format!(
                "anyalloc: double free of page {:#x} (order 1)",
                p.as_ptr() as usize
            ));
            // SAFETY: installs a handler with the plain signature; raise
            // runs it on this thread before returning.
            unsafe {
                libc::signal(
                    libc::SIGUSR1,
                    free_again as extern "C" fn(libc::c_int) as usize,
                );
                libc::raise(libc::SIGUSR1);
            }
        }
        "block_of_another_allocator" => {
            let other = PageAllocator::new(Config::default().memory(16 << 20).grow(false)).unwrap();
            let p = other.alloc_pages(0).unwrap();
            expect(format!(
                "anyalloc: free of {:#x}, which is outside managed memory (order 0)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(p, 0) };
        }
        "misaligned" => {
            let p = pa.alloc_pages(0).unwrap();
            let bad = p.as_ptr() as usize + 8;
            expect(format!(
                "anyalloc: free of {bad:#x}, which is misaligned for its order (order 0)"
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(NonNull::new(bad as *mut u8).unwrap(), 0) };
        }
        "misaligned_for_order" => {
            // Page-aligned, but not aligned to the order's block size.
            let p = pa.alloc_pages(2).unwrap();
            let bad = p.as_ptr() as usize + PAGE_SIZE;
            expect(format!(
                "anyalloc: free of {bad:#x}, which is misaligned for its order (order 1)"
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages_nolock(NonNull::new(bad as *mut u8).unwrap(), 1) };
        }
        "outside" => {
            let mut local = [0u64; 1024];
            let bad = local.as_mut_ptr() as usize;
            expect(format!(
                "anyalloc: free of {bad:#x}, which is outside managed memory (order 0)"
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(NonNull::new(bad as *mut u8).unwrap(), 0) };
        }
        "interior_page" => {
            let p = pa.alloc_pages(2).unwrap();
            let bad = p.as_ptr() as usize + 3 * PAGE_SIZE;
            expect(format!(
                "anyalloc: free of {bad:#x}, which is not the start of an allocated block: \
                 double free or interior pointer (order 0)"
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(NonNull::new(bad as *mut u8).unwrap(), 0) };
        }
        "order_above_max" => {
            let p = pa.alloc_pages(0).unwrap();
            expect(format!(
                "anyalloc: free of page {:#x} with an order above MAX_ORDER (order 11)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: must abort.
            unsafe { pa.free_pages(p, 11) };
        }
        "default_platform_fatal" => {
            // An embedder's platform that keeps the default `fatal`: the
            // report must still be the one-line write(2) + abort (no panic,
            // no formatting), from any context.
            struct Embedder;
            impl anyalloc::Platform for Embedder {
                fn cpu_id(&self) -> usize {
                    0
                }
                fn cpu_count(&self) -> usize {
                    1
                }
            }
            static EMBEDDER: Embedder = Embedder;
            let region: &'static mut [u8] = Box::leak(vec![0u8; 1 << 20].into_boxed_slice());
            // SAFETY: a leaked, exclusively owned region.
            let pa = unsafe {
                PageAllocator::from_region(
                    NonNull::new(region.as_mut_ptr()).unwrap(),
                    region.len(),
                    &EMBEDDER,
                    Config::default(),
                )
            }
            .unwrap();
            let p = pa.alloc_pages_nolock(0).unwrap();
            // SAFETY: see above: the first free is valid.
            unsafe { pa.free_pages_nolock(p, 0) };
            expect(format!(
                "anyalloc: double free of page {:#x} (order 0)",
                p.as_ptr() as usize
            ));
            // SAFETY: see above: the second free must abort.
            unsafe { pa.free_pages_nolock(p, 0) };
        }
        other => panic!("unknown scenario {other}"),
    }
    // Only reached when the allocator accepted the bad free.
    println!("SURVIVED");
    std::process::exit(0);
}

/// The child side: does nothing unless `ANYALLOC_BAD_INPUT` names a scenario.
#[test]
fn child_scenario() {
    // (The watchdog's children dump no core for the expected abort.)
    if let Ok(name) = std::env::var(SCENARIO_ENV) {
        run_scenario(&name);
    }
}

/// Runs `scenario` in a child and checks it died of `SIGABRT` with exactly
/// the announced message as one line of its stderr.
fn expect_abort(scenario: &str) {
    // A watchdog, not a timing assertion: a bad free that corrupts a list
    // could make the child loop forever instead of aborting.
    let out = watchdog::run(
        "child_scenario",
        &[(SCENARIO_ENV, scenario)],
        Duration::from_secs(60),
        scenario,
    );
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    assert!(
        !stdout.contains("SURVIVED"),
        "{scenario}: the bad free was accepted\n{stdout}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{scenario}: child was not killed by SIGABRT: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let expected = stdout
        .lines()
        .find_map(|l| l.split_once("EXPECT ").map(|(_, m)| m))
        .unwrap_or_else(|| panic!("{scenario}: child announced no message\n{stdout}"));
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("anyalloc:"))
        .collect();
    assert_eq!(
        lines,
        [expected],
        "{scenario}: unexpected report\nstderr:\n{stderr}"
    );
}

#[test]
fn double_free_aborts() {
    expect_abort("double_free");
}

#[test]
fn nolock_double_free_aborts() {
    expect_abort("double_free_nolock");
}

#[test]
fn double_free_of_a_large_block_aborts() {
    expect_abort("double_free_of_a_direct_zone_block");
}

#[test]
fn free_with_the_wrong_order_aborts() {
    expect_abort("wrong_order");
}

#[test]
fn free_with_a_larger_order_aborts() {
    expect_abort("wrong_larger_order");
}

#[test]
fn double_free_by_another_thread_aborts() {
    expect_abort("double_free_by_another_thread");
}

#[test]
fn double_free_in_a_signal_handler_aborts() {
    expect_abort("double_free_in_a_handler");
}

#[test]
fn block_of_another_page_allocator_aborts() {
    expect_abort("block_of_another_allocator");
}

#[test]
fn misaligned_pointer_aborts() {
    expect_abort("misaligned");
}

#[test]
fn pointer_misaligned_for_its_order_aborts() {
    expect_abort("misaligned_for_order");
}

#[test]
fn pointer_outside_managed_memory_aborts() {
    expect_abort("outside");
}

#[test]
fn interior_page_of_a_block_aborts() {
    expect_abort("interior_page");
}

#[test]
fn order_above_max_aborts() {
    expect_abort("order_above_max");
}

/// A platform that keeps `Platform::fatal`'s default reports corruption with
/// the same one-line write(2) + abort as the std platform (it used to panic
/// with a formatted message, which a signal handler must not do).
#[test]
fn default_platform_fatal_writes_one_line_and_aborts() {
    expect_abort("default_platform_fatal");
}
