//! # A signal-safe sampling profiler
//!
//! **The problem.** A sampling profiler interrupts the program every
//! millisecond of CPU time (`SIGPROF`) and records the interrupted stack. The
//! handler cannot know what it interrupted, and often it is `malloc` itself:
//! a handler that calls `malloc` then can deadlock or corrupt the heap. So
//! profilers preallocate a table for the worst case (how many distinct
//! stacks will there be?) and drop samples when it is full.
//!
//! **How anyalloc solves it.** The handler walks the interrupted stack by
//! frame pointers (reading `RBP` from the signal's `ucontext`, every read
//! bounds-checked against this thread's stack, every return address checked
//! to lie in executable code) and counts the stack in a
//! one `hashbrown::HashMap<StackKey, u64, _, NoLock>`. A new stack's key is
//! a `NoLock` box of exactly its length, and the map grows with
//! `try_reserve` as new stacks appear (its table reaches hundreds of KiB:
//! the nolock path serves blocks up to 4 MiB), both through the nolock path
//! of the same heap the
//! program allocates from ([`anyalloc::Global`] is the global
//! allocator): it never waits, even when the handler interrupted the
//! allocator. If memory cannot be had in that context, the sample is counted
//! as dropped. No locks, no printing, no panics in the handler. At exit,
//! outside the handler, the stacks are symbolised (the `backtrace` crate) and
//! written as folded stacks (`frame;frame;frame count`, flamegraph input),
//! and a top-10 table goes to stdout.
//!
//! The profiled workload has an obvious hot function (`hot_spin`, ~90% of
//! the work), a colder one (`cold_path`) and some allocation churn (so
//! samples do land inside the allocator).
//!
//! ```sh
//! cargo run --release -p anyalloc --example profiler                # 3 s of CPU time
//! cargo run --release -p anyalloc --example profiler -- --seconds 1 --out /tmp/p.folded
//! # Whole stacks need frame pointers (without them each sample still has
//! # its interrupted PC, and the top-10 "self" column is exact):
//! RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/fp \
//!     cargo run --release -p anyalloc --example profiler
//! # A flame graph (the folded stacks go to $TMPDIR/profile.folded unless --out):
//! #   inferno-flamegraph < /tmp/profile.folded > profile.svg
//! ```
//!
//! x86_64 Linux only (the frame walk reads x86_64 registers); elsewhere the
//! example says so and exits.

#[global_allocator]
static A: anyalloc::Global = anyalloc::Global;

/// Command-line options.
#[derive(Debug, Clone)]
struct Args {
    seconds: f64,
    out: std::path::PathBuf,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args {
            seconds: 3.0,
            out: std::env::temp_dir().join("profile.folded"),
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--seconds" => {
                    let v = it.next().ok_or("--seconds needs a value")?;
                    a.seconds = v.parse().map_err(|_| format!("bad --seconds {v}"))?;
                }
                "--out" => a.out = it.next().ok_or("--out needs a path")?.into(),
                "-h" | "--help" => {
                    return Err("usage: profiler [--seconds N] [--out FILE.folded]".into())
                }
                other if !other.starts_with('-') => a.out = other.into(),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if !a.seconds.is_finite() || a.seconds <= 0.0 {
            return Err("--seconds must be positive".into());
        }
        Ok(a)
    }
}

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        match imp::run(&args) {
            Ok(report) => report.print(),
            Err(e) => {
                eprintln!("profiler: {e}");
                std::process::exit(1);
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = args;
        println!(
            "profiler: this example walks x86_64 frame pointers from a Linux ucontext; \
             it does not support {} on {}.",
            std::env::consts::ARCH,
            std::env::consts::OS
        );
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::Args;
    use anyalloc::NoLock;
    use core::cell::{Cell, UnsafeCell};
    use core::hash::{BuildHasher, Hasher};
    use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::collections::HashMap as StdMap;
    use std::io::Write;
    use std::time::Duration;

    /// Frames kept per sample: the interrupted PC plus return addresses.
    pub const MAX_FRAMES: usize = 32;

    /// One distinct stack, leaf first (`[0]` is the interrupted PC): a
    /// boxed slice of exactly its length, allocated with `NoLock` when the
    /// stack is first seen. Looked up by `&[usize]`, so counting a known
    /// stack allocates nothing.
    pub type StackKey = allocator_api2::boxed::Box<[usize], NoLock>;

    /// A small multiply-rotate hasher: no state to seed, no allocation, no
    /// system call: usable in a signal handler.
    #[derive(Clone, Copy, Default)]
    pub struct StackHasher(u64);

    impl Hasher for StackHasher {
        fn write(&mut self, bytes: &[u8]) {
            for chunk in bytes.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                self.write_u64(u64::from_ne_bytes(word));
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        fn write_usize(&mut self, n: usize) {
            self.write_u64(n as u64);
        }
        fn finish(&self) -> u64 {
            // Spread the bits: hashbrown uses the top 7 bits as a tag.
            let mut x = self.0;
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            x
        }
    }

    /// Builds [`StackHasher`]s; the seed picks the function.
    #[derive(Clone, Copy, Default)]
    pub struct BuildStackHasher(u64);

    impl BuildHasher for BuildStackHasher {
        type Hasher = StackHasher;
        fn build_hasher(&self) -> StackHasher {
            StackHasher(self.0)
        }
    }

    /// Sample counts per distinct stack, allocated with the nolock path.
    pub type Samples = hashbrown::HashMap<StackKey, u64, BuildStackHasher, NoLock>;

    /// The profile: one map plus a try-only flag. A handler that finds the
    /// flag taken (another thread's handler is recording) drops its sample
    /// rather than wait.
    struct Profile {
        busy: AtomicBool,
        map: UnsafeCell<Samples>,
    }

    // SAFETY: `map` is only touched by whoever set `busy` from false to true
    // (Acquire) until it stores false again (Release).
    unsafe impl Sync for Profile {}

    impl Profile {
        const fn new() -> Profile {
            Profile {
                busy: AtomicBool::new(false),
                map: UnsafeCell::new(Samples::with_hasher_in(BuildStackHasher(0), NoLock)),
            }
        }
    }

    /// The profile the handler records into.
    static PROFILE: Profile = Profile::new();

    /// What became of one sample.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Counted {
        Known,
        New,
        NoMemory,
        Busy,
    }

    /// Counts one stack: any context (the handler's path).
    fn count(profile: &Profile, stack: &[usize]) -> Counted {
        if profile.busy.swap(true, Ordering::Acquire) {
            return Counted::Busy;
        }
        // SAFETY: we own `busy`, so nothing else touches the map.
        let map = unsafe { &mut *profile.map.get() };
        let outcome = if let Some(n) = map.get_mut(stack) {
            *n += 1;
            Counted::Known
        } else if record_new(map, stack) {
            Counted::New
        } else {
            Counted::NoMemory
        };
        profile.busy.store(false, Ordering::Release);
        outcome
    }

    /// Takes the profile's flag from normal context (waits for a handler on
    /// another thread to finish with it).
    fn lock_profile(profile: &Profile) {
        while profile.busy.swap(true, Ordering::Acquire) {
            std::hint::spin_loop();
        }
    }

    static SAMPLES: AtomicU64 = AtomicU64::new(0);
    static RECORDED: AtomicU64 = AtomicU64::new(0);
    static DROPPED_NO_MEMORY: AtomicU64 = AtomicU64::new(0);
    static DROPPED_BUSY: AtomicU64 = AtomicU64::new(0);
    static TABLE_GROWTHS: AtomicU64 = AtomicU64::new(0);

    /// Executable address ranges of every loaded object, captured at start:
    /// a return address outside them ends the walk.
    const MAX_RANGES: usize = 64;
    static RANGES: [(AtomicUsize, AtomicUsize); MAX_RANGES] =
        [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RANGES];
    static NRANGES: AtomicUsize = AtomicUsize::new(0);

    std::thread_local! {
        /// This thread's stack, `[low, high)`, or `(0, 0)` if unknown. Const
        /// initialised without a destructor: readable in a signal handler.
        static STACK: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    fn in_code(addr: usize) -> bool {
        let n = NRANGES.load(Ordering::Acquire).min(MAX_RANGES);
        RANGES[..n]
            .iter()
            .any(|(lo, hi)| addr >= lo.load(Ordering::Relaxed) && addr < hi.load(Ordering::Relaxed))
    }

    /// Records the executable segments of the program and its libraries.
    fn capture_code_ranges() {
        unsafe extern "C" fn each(
            info: *mut libc::dl_phdr_info,
            _size: libc::size_t,
            _data: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: dl_iterate_phdr passes a valid info for this call.
            let info = unsafe { &*info };
            for i in 0..info.dlpi_phnum as usize {
                // SAFETY: dlpi_phdr has dlpi_phnum entries.
                let ph = unsafe { &*info.dlpi_phdr.add(i) };
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                    let n = NRANGES.load(Ordering::Relaxed);
                    if n < MAX_RANGES {
                        let lo = info.dlpi_addr as usize + ph.p_vaddr as usize;
                        RANGES[n].0.store(lo, Ordering::Relaxed);
                        RANGES[n]
                            .1
                            .store(lo + ph.p_memsz as usize, Ordering::Relaxed);
                        NRANGES.store(n + 1, Ordering::Release);
                    }
                }
            }
            0
        }
        NRANGES.store(0, Ordering::Release);
        // SAFETY: the callback only reads the headers it is given.
        unsafe { libc::dl_iterate_phdr(Some(each), core::ptr::null_mut()) };
    }

    /// Captures this thread's stack bounds for the handler's frame walk.
    pub fn register_thread() {
        // SAFETY: attr is initialised by pthread_getattr_np before use and
        // destroyed after; pthread_attr_getstack writes two out-parameters.
        unsafe {
            let mut attr: libc::pthread_attr_t = core::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) == 0 {
                let mut addr: *mut libc::c_void = core::ptr::null_mut();
                let mut size: libc::size_t = 0;
                if libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0 {
                    STACK.set((addr as usize, addr as usize + size));
                }
                libc::pthread_attr_destroy(&mut attr);
            }
        }
    }

    /// Reads one word of the interrupted stack.
    ///
    /// # Safety
    /// `addr..addr + 8` lies between the interrupted stack pointer and the
    /// top of this thread's stack: mapped, readable memory.
    #[inline(always)]
    unsafe fn stack_word(addr: usize) -> usize {
        // SAFETY: per the contract; volatile because the frames belong to the
        // interrupted code, not to us.
        unsafe { core::ptr::read_volatile(addr as *const usize) }
    }

    /// The interrupted stack: PC first, then return addresses while the
    /// frame-pointer chain makes sense.
    fn capture(ctx: *mut libc::c_void) -> ([usize; MAX_FRAMES], usize) {
        let mut frames = [0usize; MAX_FRAMES];
        // SAFETY: a SA_SIGINFO handler's third argument is the ucontext_t of
        // the interrupted code.
        let gregs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        let pc = gregs[libc::REG_RIP as usize] as usize;
        let sp = gregs[libc::REG_RSP as usize] as usize;
        let mut fp = gregs[libc::REG_RBP as usize] as usize;
        frames[0] = pc;
        let mut len = 1;
        let (low, high) = STACK.get();
        if low < high && sp >= low && sp < high {
            // Each frame: [fp] = caller's fp, [fp + 8] = return address.
            // Frames lie above the stack pointer and below the stack's top,
            // and each caller's frame lies above its callee's.
            while len < MAX_FRAMES && fp >= sp && fp.is_multiple_of(8) && fp + 16 <= high {
                // SAFETY: sp <= fp and fp + 16 <= high: inside the live part
                // of this thread's stack.
                let (next, ret) = unsafe { (stack_word(fp), stack_word(fp + 8)) };
                if !in_code(ret) {
                    break;
                }
                frames[len] = ret;
                len += 1;
                if next <= fp {
                    break;
                }
                fp = next;
            }
        }
        (frames, len)
    }

    /// A stack seen for the first time: its key and room in the map, both
    /// from the nolock path (fallible, never waits). False: no memory here
    /// and now; nothing was changed.
    fn record_new(map: &mut Samples, stack: &[usize]) -> bool {
        let Ok(mut key) = StackKey::try_new_uninit_slice_in(stack.len(), NoLock) else {
            return false;
        };
        for (slot, &frame) in key.iter_mut().zip(stack) {
            slot.write(frame);
        }
        // SAFETY: every element was written just above.
        let key = unsafe { key.assume_init() };
        let capacity = map.capacity();
        if map.try_reserve(1).is_err() {
            return false; // `key` is freed, through NoLock, on return
        }
        if map.capacity() != capacity {
            TABLE_GROWTHS.fetch_add(1, Ordering::Relaxed);
        }
        map.insert(key, 1);
        true
    }

    /// The `SIGPROF` handler: capture, then count the stack in the NoLock
    /// map, growing it if needed. No locks, no printing, no panics.
    extern "C" fn on_sigprof(
        _sig: libc::c_int,
        _info: *mut libc::siginfo_t,
        ctx: *mut libc::c_void,
    ) {
        // Restored when the handler returns: the interrupted code never
        // sees our changes.
        let _errno = anyalloc_storm::ErrnoGuard::save();
        SAMPLES.fetch_add(1, Ordering::Relaxed);
        let (frames, len) = capture(ctx);
        let stack = &frames[..len.min(MAX_FRAMES)];
        match count(&PROFILE, stack) {
            Counted::Known | Counted::New => RECORDED.fetch_add(1, Ordering::Relaxed),
            Counted::NoMemory => DROPPED_NO_MEMORY.fetch_add(1, Ordering::Relaxed),
            Counted::Busy => DROPPED_BUSY.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Ignores `SIGPROF` from now on (the handler is installed with the
    /// storm kit's `install_handler`).
    fn ignore_sigprof() -> std::io::Result<()> {
        // SAFETY: SIG_IGN is a valid disposition for SIGPROF.
        if unsafe { libc::signal(libc::SIGPROF, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_timer(interval_us: i64) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: interval_us as libc::suseconds_t,
        };
        let it = libc::itimerval {
            it_interval: tv,
            it_value: tv,
        };
        // SAFETY: `it` is a valid itimerval; the old value is not wanted.
        if unsafe { libc::setitimer(libc::ITIMER_PROF, &it, core::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Counts `distinct` synthetic stacks twice each into a fresh profile
    /// (normal context, same code as the handler): how they were counted,
    /// and the bytes of the map's table (one NoLock block).
    #[cfg(test)]
    pub fn count_synthetic(distinct: usize) -> ([usize; 4], usize) {
        let profile = Box::new(Profile::new());
        let mut outcomes = [0usize; 4];
        for round in 0..2 {
            for i in 0..distinct {
                let len = 1 + i % MAX_FRAMES;
                let stack: Vec<usize> = (0..len).map(|f| 0x40_0000 + i * 64 + f).collect();
                let o = count(&profile, &stack);
                outcomes[o as usize] += 1;
                assert!(round == 0 || o == Counted::Known, "{o:?}");
            }
        }
        lock_profile(&profile);
        // SAFETY: we hold the profile's `busy`.
        let table = unsafe { (*profile.map.get()).allocation_size() };
        (outcomes, table)
    }

    // ----- the profiled program ----------------------------------------------

    /// The hot function: most of the CPU time goes here.
    #[inline(never)]
    pub fn hot_spin(n: u64) -> u64 {
        let mut x = std::hint::black_box(0x2545_f491_4f6c_dd1d_u64);
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = x.wrapping_add(i);
        }
        x
    }

    /// A colder function: about a twentieth of the time.
    #[inline(never)]
    pub fn cold_path(n: u64) -> u64 {
        let mut x = std::hint::black_box(7u64);
        for i in 0..n {
            x = x.rotate_left(5).wrapping_mul(0x100_0000_01b3) ^ i;
        }
        x
    }

    /// Allocation churn through the global allocator: samples land inside
    /// the allocator, and the handler's NoLock allocations must cope.
    #[inline(never)]
    pub fn alloc_churn(round: u64) -> u64 {
        let mut v: Vec<Box<[u64]>> = Vec::new();
        for i in 0..256 {
            v.push(vec![round ^ i; 1 + (i as usize * 7) % 90].into_boxed_slice());
        }
        let s: String = (0..32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        v.iter().map(|b| b[0]).sum::<u64>() ^ s.len() as u64
    }

    /// This thread's CPU time: the profile covers `--seconds` of it, so a
    /// busy machine stretches the run instead of thinning the profile.
    fn thread_cpu_time() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[inline(never)]
    fn workload(cpu: Duration) -> u64 {
        let start = thread_cpu_time();
        let mut acc = 0u64;
        let mut round = 0u64;
        while thread_cpu_time() - start < cpu {
            acc = acc.wrapping_add(hot_spin(std::hint::black_box(80_000)));
            acc = acc.wrapping_add(cold_path(std::hint::black_box(8_000)));
            acc = acc.wrapping_add(alloc_churn(round));
            round += 1;
        }
        acc
    }

    // ----- after the run: symbolise and report --------------------------------

    /// One frame's names, innermost inlined function first, the function
    /// that contains the address last.
    fn names_at(addr: usize, is_pc: bool) -> Vec<String> {
        let mut names = Vec::new();
        // `resolve` looks up `addr - 1` (the call instruction for a return
        // address); the interrupted PC is the instruction itself.
        let lookup = if is_pc { addr + 1 } else { addr };
        backtrace::resolve(lookup as *mut libc::c_void, |sym| {
            if let Some(n) = sym.name() {
                names.push(format!("{n:#}"));
            }
        });
        if names.is_empty() {
            names.push(format!("{addr:#x}"));
        }
        names
    }

    /// What one run found.
    #[derive(Debug)]
    pub struct Report {
        pub seconds: f64,
        pub samples: u64,
        pub recorded: u64,
        pub dropped_no_memory: u64,
        pub dropped_busy: u64,
        pub distinct_stacks: usize,
        pub table_growths: u64,
        pub table_bytes: usize,
        pub mean_depth: f64,
        pub max_depth: usize,
        /// Samples whose interrupted PC lies in `hot_spin`.
        pub hot_samples: u64,
        /// Samples whose stack contains `alloc_churn` or whose PC is in the
        /// allocator.
        pub in_allocator: u64,
        pub folded_path: std::path::PathBuf,
        pub folded_lines: usize,
        /// (function, self samples, total samples), by self samples.
        pub top: Vec<(String, u64, u64)>,
        pub heap_nolock_ok: u64,
        pub heap_nolock_failed: u64,
    }

    impl Report {
        pub fn hot_share(&self) -> f64 {
            self.hot_samples as f64 / self.recorded.max(1) as f64
        }

        pub fn print(&self) {
            println!(
                "profiled {:.1} s of CPU time: {} SIGPROF samples, {} recorded, dropped {} (no memory) + {} (busy)",
                self.seconds, self.samples, self.recorded, self.dropped_no_memory, self.dropped_busy
            );
            println!(
                "stack table: {} distinct stacks in one map, grown {} times in the handler \
                 (NoLock), {} bytes with the keys",
                self.distinct_stacks, self.table_growths, self.table_bytes
            );
            println!(
                "frames per sample: mean {:.1}, max {}{}",
                self.mean_depth,
                self.max_depth,
                if self.mean_depth < 2.0 {
                    "  (only PCs: for whole stacks build with RUSTFLAGS=\"-C force-frame-pointers=yes\")"
                } else {
                    ""
                }
            );
            println!(
                "hot_spin: {:.1}% of recorded samples; samples in the allocator: {}",
                100.0 * self.hot_share(),
                self.in_allocator
            );
            println!(
                "heap: {} nolock allocations ok, {} failed",
                self.heap_nolock_ok, self.heap_nolock_failed
            );
            println!();
            println!(
                "{:>4}  {:>7} {:>6}  {:>7} {:>6}  function",
                "rank", "self", "self%", "total", "total%"
            );
            let n = self.recorded.max(1) as f64;
            for (i, (name, own, total)) in self.top.iter().enumerate() {
                println!(
                    "{:>4}  {:>7} {:>5.1}%  {:>7} {:>5.1}%  {}",
                    i + 1,
                    own,
                    100.0 * *own as f64 / n,
                    total,
                    100.0 * *total as f64 / n,
                    name
                );
            }
            println!();
            println!(
                "folded stacks ({} lines): {}",
                self.folded_lines,
                self.folded_path.display()
            );
        }
    }

    /// Profiles the workload for `args.seconds` and reports.
    pub fn run(args: &Args) -> Result<Report, String> {
        let heap = anyalloc::init().map_err(|e| format!("no heap: {e:?}"))?;
        let before = heap.stats();
        capture_code_ranges();
        register_thread();
        for c in [
            &SAMPLES,
            &RECORDED,
            &DROPPED_NO_MEMORY,
            &DROPPED_BUSY,
            &TABLE_GROWTHS,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        // An empty map: it allocates only when the first stack arrives.
        lock_profile(&PROFILE);
        // SAFETY: we hold the profile's `busy`.
        unsafe { *PROFILE.map.get() = Samples::with_hasher_in(BuildStackHasher(0), NoLock) };
        PROFILE.busy.store(false, Ordering::Release);

        anyalloc_storm::install_handler(libc::SIGPROF, on_sigprof, &[])
            .map_err(|e| format!("sigaction: {e}"))?;
        set_timer(1000).map_err(|e| format!("setitimer: {e}"))?;
        let t0 = thread_cpu_time();
        std::hint::black_box(workload(Duration::from_secs_f64(args.seconds)));
        let seconds = (thread_cpu_time() - t0).as_secs_f64();
        set_timer(0).map_err(|e| format!("setitimer: {e}"))?;
        // A SIGPROF still pending must not kill the process (its default
        // action): ignore the signal from now on.
        ignore_sigprof().map_err(|e| format!("sigaction: {e}"))?;

        lock_profile(&PROFILE);
        let empty = Samples::with_hasher_in(BuildStackHasher(0), NoLock);
        // SAFETY: we hold the profile's `busy`; the handler is no longer
        // installed.
        let map = core::mem::replace(unsafe { &mut *PROFILE.map.get() }, empty);
        PROFILE.busy.store(false, Ordering::Release);
        let table_bytes = map.allocation_size()
            + map
                .keys()
                .map(|k| core::mem::size_of_val(&**k))
                .sum::<usize>();
        let after = heap.stats();
        let report = analyse(&map, args, seconds, table_bytes);
        drop(map);
        let mut report = report?;
        report.heap_nolock_ok = after.nolock_alloc_ok - before.nolock_alloc_ok;
        report.heap_nolock_failed = (after.nolock_alloc_fail_busy + after.nolock_alloc_fail_empty)
            - (before.nolock_alloc_fail_busy + before.nolock_alloc_fail_empty);
        Ok(report)
    }

    fn analyse(
        map: &Samples,
        args: &Args,
        seconds: f64,
        table_bytes: usize,
    ) -> Result<Report, String> {
        let mut cache: StdMap<(usize, bool), Vec<String>> = StdMap::new();
        let mut folded: StdMap<String, u64> = StdMap::new();
        let mut own: StdMap<String, u64> = StdMap::new();
        let mut total: StdMap<String, u64> = StdMap::new();
        let (mut hot, mut in_alloc, mut frames_sum, mut max_depth) = (0u64, 0u64, 0u64, 0usize);
        for (key, &count) in map.iter() {
            let len = key.len();
            frames_sum += len as u64 * count;
            max_depth = max_depth.max(len);
            // Names per frame, leaf first.
            for (i, &a) in key.iter().enumerate() {
                cache
                    .entry((a, i == 0))
                    .or_insert_with(|| names_at(a, i == 0));
            }
            let stack: Vec<&Vec<String>> = key
                .iter()
                .enumerate()
                .map(|(i, &a)| &cache[&(a, i == 0)])
                .collect();
            let leaf_fn = stack[0].last().cloned().unwrap_or_default();
            if stack[0].iter().any(|n| n.ends_with("hot_spin")) {
                hot += count;
            }
            if stack
                .iter()
                .flat_map(|f| f.iter())
                .any(|n| n.starts_with("anyalloc::") || n.ends_with("alloc_churn"))
            {
                in_alloc += count;
            }
            *own.entry(leaf_fn).or_default() += count;
            let mut seen: Vec<&String> = Vec::new();
            for f in &stack {
                let name = f.last().expect("at least one name per frame");
                if !seen.contains(&name) {
                    seen.push(name);
                    *total.entry(name.clone()).or_default() += count;
                }
            }
            // Folded: root first, inlined callees after their caller.
            let line = stack
                .iter()
                .rev()
                .flat_map(|f| f.iter().rev())
                .map(|n| n.replace(';', ":"))
                .collect::<Vec<_>>()
                .join(";");
            *folded.entry(line).or_default() += count;
        }
        let mut lines: Vec<(&String, &u64)> = folded.iter().collect();
        lines.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&args.out)
                .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?,
        );
        for (stack, count) in &lines {
            writeln!(out, "{stack} {count}").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
        let mut top: Vec<(String, u64, u64)> = own
            .iter()
            .map(|(name, &s)| (name.clone(), s, total.get(name).copied().unwrap_or(s)))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        top.truncate(10);
        let recorded = RECORDED.load(Ordering::Relaxed);
        Ok(Report {
            seconds,
            samples: SAMPLES.load(Ordering::Relaxed),
            recorded,
            dropped_no_memory: DROPPED_NO_MEMORY.load(Ordering::Relaxed),
            dropped_busy: DROPPED_BUSY.load(Ordering::Relaxed),
            distinct_stacks: map.len(),
            table_growths: TABLE_GROWTHS.load(Ordering::Relaxed),
            table_bytes,
            mean_depth: frames_sum as f64 / recorded.max(1) as f64,
            max_depth,
            hot_samples: hot,
            in_allocator: in_alloc,
            folded_path: args.out.clone(),
            folded_lines: lines.len(),
            top,
            heap_nolock_ok: 0,
            heap_nolock_failed: 0,
        })
    }
}

#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn profiler_finds_the_hot_function() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let out =
            std::env::temp_dir().join(format!("anyalloc-profile-{}.folded", std::process::id()));
        let args = Args {
            seconds: 1.0,
            out: out.clone(),
        };
        let r = imp::run(&args).expect("profile");
        r.print();
        assert!(r.samples >= 20, "too few samples: {}", r.samples);
        assert!(r.distinct_stacks > 1, "the table grew as stacks appeared");
        assert!(r.table_growths >= 1, "the handler grew the table itself");
        assert_eq!(r.dropped_no_memory, 0, "NoLock had memory to spare");
        assert!(
            r.hot_share() > 0.5,
            "hot_spin got only {:.1}% of the samples",
            100.0 * r.hot_share()
        );
        assert_eq!(
            r.top[0].0.rsplit("::").next(),
            Some("hot_spin"),
            "{:?}",
            r.top
        );
        let text = std::fs::read_to_string(&out).expect("folded file written");
        let mut sum = 0u64;
        for line in text.lines() {
            let (stack, count) = line.rsplit_once(' ').expect("`stack count` lines");
            assert!(!stack.is_empty());
            sum += count.parse::<u64>().expect("a count");
        }
        assert_eq!(sum, r.recorded, "every recorded sample is in the file");
        assert!(text.contains("hot_spin"));
        let _ = std::fs::remove_file(&out);
    }

    /// The tests read process-wide counters: one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_stack_table_grows_far_past_one_nolock_block() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // 20,000 stacks in one map: a table of about 0.8 MiB (one NoLock
        // block, grown with try_reserve) plus 2.6 MiB of keys, all from the
        // nolock path.
        let ([known, new, no_memory, busy], table) = imp::count_synthetic(20_000);
        assert_eq!((known, new, no_memory, busy), (20_000, 20_000, 0, 0));
        assert!(table > 256 << 10, "one table of {table} bytes");
    }

    #[test]
    fn arguments_parse() {
        let a = Args::parse(
            ["--seconds", "0.5", "--out", "/tmp/x"]
                .map(String::from)
                .into_iter(),
        )
        .unwrap();
        assert_eq!(a.seconds, 0.5);
        assert_eq!(a.out, std::path::PathBuf::from("/tmp/x"));
        assert!(Args::parse(["--bogus"].map(String::from).into_iter()).is_err());
    }
}
