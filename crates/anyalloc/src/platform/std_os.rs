//! The std platform: Linux (and other Unix) primitives that are safe in any
//! context.
//!
//! * CPU id: the rseq area's `cpu_id`, found through glibc's `__rseq_offset`
//!   from the thread pointer (0.7 ns here), else `sched_getcpu` (vDSO, 4 ns).
//!   Both are async-signal-safe and never block.
//! * Waiting: futex wait / wake on the lock word (wake never blocks).
//! * Memory: `mmap` reservations with `MAP_NORESERVE`, committed by the OS on
//!   first touch, so an untouched zone costs address space only.
//! * Fatal errors: write(2) to stderr, then `abort()`.

use super::Platform;
use core::sync::atomic::AtomicU32;

/// The longest single wait of [`StdPlatform::wait`]: far longer than a
/// lock is normally held, short enough that a child's only thread, left
/// waiting for a lock of a thread that is not there, finds out soon.
const WAIT_SLICE: core::time::Duration = core::time::Duration::from_millis(50);

/// The platform of a std program. Stateless; use the [`StdPlatform::get`]
/// static.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdPlatform;

static STD_PLATFORM: StdPlatform = StdPlatform;

impl StdPlatform {
    /// The process-wide instance.
    ///
    /// ```
    /// use anyalloc::{Platform, StdPlatform};
    /// let platform = StdPlatform::get();
    /// assert!(core::ptr::eq(platform, StdPlatform::get()));
    /// assert!(platform.cpu_count() >= 1);
    /// ```
    pub fn get() -> &'static StdPlatform {
        &STD_PLATFORM
    }
}

#[cfg(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod rseq {
    extern "C" {
        // Exported by glibc >= 2.35: where this thread's `struct rseq` sits
        // relative to the thread pointer, and its size (0: not registered).
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    #[inline(always)]
    fn thread_pointer() -> usize {
        let tp: usize;
        // SAFETY: reading the thread pointer register has no side effects;
        // on x86-64 `fs:0` holds the TCB's self pointer (the thread pointer).
        unsafe {
            #[cfg(target_arch = "x86_64")]
            core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
            #[cfg(target_arch = "aarch64")]
            core::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem, preserves_flags));
        }
        tp
    }

    /// The address of this thread's rseq area, or `None` when rseq is not
    /// registered.
    #[inline(always)]
    pub(super) fn area() -> Option<usize> {
        // SAFETY: plain reads of two immutable glibc globals, set before any
        // thread runs user code.
        let (size, offset) = unsafe { (__rseq_size, __rseq_offset) };
        (size != 0).then(|| thread_pointer().wrapping_add_signed(offset))
    }

    /// This thread's CPU as the kernel last wrote it into the rseq area, or
    /// `None` when rseq is not registered.
    #[inline(always)]
    pub(super) fn cpu_id() -> Option<usize> {
        let area = area()?;
        // The kernel updates `cpu_id` behind our back: read it as an atomic.
        // SAFETY: with rseq registered (`area` is `Some`), `area` is this
        // thread's live, 32-byte aligned `struct rseq`
        // (`sync::rseq::abi::Rseq`).
        let cpu = unsafe {
            (*((area + crate::sync::rseq::abi::CPU_ID) as *const core::sync::atomic::AtomicU32))
                .load(core::sync::atomic::Ordering::Relaxed)
        };
        // Negative values: uninitialised (-1) or registration failed (-2).
        if (cpu as i32) < 0 {
            None
        } else {
            Some(cpu as usize)
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod rseq {
    #[inline(always)]
    pub(super) fn area() -> Option<usize> {
        None
    }

    #[inline(always)]
    pub(super) fn cpu_id() -> Option<usize> {
        None
    }
}

/// The address of this thread's rseq area, if glibc registered one (the
/// zones keep their most used descriptors off its cache line:
/// `page::zone::descs_offset`).
pub(crate) fn rseq_area() -> Option<usize> {
    rseq::area()
}

/// The highest CPU id in a kernel CPU list such as `0-3,8-11\n`.
fn parse_cpu_list_max(list: &[u8]) -> Option<usize> {
    let mut max = None;
    let mut cur: Option<usize> = None;
    for &b in list {
        match b {
            b'0'..=b'9' => {
                cur = Some(
                    cur.unwrap_or(0)
                        .checked_mul(10)?
                        .checked_add((b - b'0') as usize)?,
                )
            }
            b'-' | b',' | b'\n' => {
                if let Some(c) = cur.take() {
                    max = max.max(Some(c));
                }
            }
            _ => return None,
        }
    }
    if let Some(c) = cur {
        max = max.max(Some(c));
    }
    max
}

#[cold]
fn sched_cpu() -> usize {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu has no preconditions (vDSO getcpu; never
        // blocks, async-signal-safe in practice).
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu >= 0 {
            return cpu as usize;
        }
    }
    0
}

impl StdPlatform {
    /// The current CPU from the rseq area, or `None` when glibc did not
    /// register one for this thread.
    #[inline(always)]
    pub(crate) fn rseq_cpu() -> Option<usize> {
        rseq::cpu_id()
    }

    /// The number of possible CPU ids (`/sys/devices/system/cpu/possible`,
    /// read with raw `open`/`read`: `sysconf` would call `malloc`), or
    /// `None` if it cannot be read whole.
    pub(crate) fn possible_cpus() -> Option<usize> {
        #[cfg(target_os = "linux")]
        {
            const BUF: usize = 256;
            let mut buf = [0u8; BUF];
            let list = read_small_file(c"/sys/devices/system/cpu/possible", &mut buf)?;
            // A list that fills the buffer may have been cut short, and a
            // count from it too small: the restartable sequences need a
            // slot set for every CPU id (without one, `available` refuses
            // them).
            if list.len() == BUF {
                return None;
            }
            parse_cpu_list_max(list).map(|max| max + 1)
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// The current CPU, without dynamic dispatch (the allocators call this
    /// directly when their platform is the std one).
    #[inline(always)]
    pub(crate) fn current_cpu() -> usize {
        match rseq::cpu_id() {
            Some(c) => c,
            None => sched_cpu(),
        }
    }
}

impl Platform for StdPlatform {
    #[inline(always)]
    fn cpu_id(&self) -> usize {
        Self::current_cpu()
    }

    fn cpu_count(&self) -> usize {
        // Not sysconf(_SC_NPROCESSORS_CONF): glibc reads sysfs with opendir,
        // which calls malloc, and this runs while the global heap is being
        // created (possibly from inside malloc). The affinity mask is one
        // syscall; CPU ids above the count share slots (modulo).
        #[cfg(target_os = "linux")]
        {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; the syscall
            // writes at most size_of::<cpu_set_t>() bytes into it.
            let n = unsafe {
                let mut set: libc::cpu_set_t = core::mem::zeroed();
                if libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set)
                    == 0
                {
                    libc::CPU_COUNT(&set) as usize
                } else {
                    0
                }
            };
            if n > 0 {
                return n;
            }
        }
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        n.max(1) as usize
    }

    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// Until woken (or EINTR / EAGAIN, which callers treat as spurious
    /// wake-ups), or 50 ms at most (`WAIT_SLICE`): a waiter looks again at least
    /// that often. Its thread may have become the only one of a forked
    /// child meanwhile, in a signal handler that forked (the kernel resumes
    /// an interrupted wait), and the holder be gone: the lock then gives
    /// way instead of waiting (the `fork` module's "Orphaned locks").
    #[cfg(target_os = "linux")]
    fn wait(&self, word: &AtomicU32, expected: u32) {
        super::futex::wait(word, expected, Some(WAIT_SLICE));
    }

    #[cfg(target_os = "linux")]
    fn wait_timeout(&self, word: &AtomicU32, expected: u32, nanos: u64) {
        super::futex::wait(
            word,
            expected,
            Some(core::time::Duration::from_nanos(nanos)),
        );
    }

    #[cfg(target_os = "linux")]
    fn wake_one(&self, word: &AtomicU32) {
        super::futex::wake_one(word);
    }

    #[cfg(target_os = "linux")]
    fn wake_many(&self, word: &AtomicU32, n: u32) {
        super::futex::wake_many(word, n);
    }

    fn fatal(&self, message: &[u8]) -> ! {
        super::die(message)
    }
}

/// The start of the file at `path`, read into `buf` with raw `open`/`read`
/// (no allocation, unlike `std::fs`): at most `buf.len()` bytes, from one
/// `read`. `None` when it cannot be opened or read, or is empty.
///
/// On Linux the three calls are system calls made with `syscall(2)`, not
/// libc's `open`, `read` and `close`: those are cancellation points, and
/// this runs under the heap's locks (zone growth reads `/proc/self/statm`
/// under a limit on address space). A thread with a pending
/// `pthread_cancel` was cancelled there, inside `malloc`, the lock left
/// held, and the next growth waited for ever. glibc's malloc has no
/// cancellation point.
pub(crate) fn read_small_file<'a>(path: &core::ffi::CStr, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    // A missing file (no /proc in a container) is not the caller's error.
    let _errno = KeepErrno::new();
    #[cfg(target_os = "linux")]
    // SAFETY: a NUL-terminated path; `read` writes at most `buf.len()`
    // bytes into `buf`; the descriptor is closed before returning. Every
    // `syscall` argument is passed as the `long` it reads.
    let n = unsafe {
        use libc::{c_long, syscall};
        let flags = c_long::from(libc::O_RDONLY | libc::O_CLOEXEC);
        let at = c_long::from(libc::AT_FDCWD);
        let fd = syscall(libc::SYS_openat, at, path.as_ptr(), flags);
        if fd < 0 {
            return None;
        }
        let n = syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len());
        syscall(libc::SYS_close, fd);
        n
    };
    #[cfg(not(target_os = "linux"))]
    // SAFETY: as above.
    let n = unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    match usize::try_from(n) {
        Ok(n) if n > 0 => Some(&buf[..n]),
        _ => None,
    }
}

/// Writes all of `bytes` to stderr with write(2): no allocation, any context.
///
/// On Linux the system call is made directly, not through libc's `write`,
/// which is a cancellation point: in a thread with a `pthread_cancel`
/// pending, a heap corruption's message would otherwise end the thread
/// quietly there, before the message and the abort that follows it, and
/// the process would run on with the heap corrupt (and any lock of the
/// reporting call held); and a report made while the global heap is being
/// created would leave it half made for ever. (glibc writes its own fatal
/// messages with a direct system call for the same reason.)
pub(crate) fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        #[cfg(target_os = "linux")]
        // SAFETY: the pointer and length describe the live slice `bytes`;
        // write(2) only reads them.
        let n = unsafe {
            libc::syscall(
                libc::SYS_write,
                libc::c_long::from(2),
                bytes.as_ptr(),
                bytes.len(),
            )
        };
        #[cfg(not(target_os = "linux"))]
        // SAFETY: the pointer and length describe the live slice `bytes`.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            // EINTR: try again; anything else: give up quietly.
            // SAFETY: reading errno through libc's accessor is always allowed.
            if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// How many more bytes of address space this process may reserve before a
/// limit refuses it: `RLIMIT_AS` (every mapping counts) or `RLIMIT_DATA`
/// (private writable mappings count, Linux 4.7 and later), less what the
/// process maps already (`/proc/self/statm`: its size, and its data and
/// stack). `None` when neither limit is set. An estimate (other threads
/// map and unmap meanwhile; without `/proc` nothing is taken as used): a
/// hint for choosing sizes, never a promise that a reservation will
/// succeed. No allocation; normal context (it reads a file).
pub(crate) fn address_space_headroom() -> Option<usize> {
    let limit = |resource| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `l` is a valid, writable rlimit.
        let ok = unsafe { libc::getrlimit(resource, &mut l) } == 0;
        (ok && l.rlim_cur != libc::RLIM_INFINITY)
            .then(|| usize::try_from(l.rlim_cur).unwrap_or(usize::MAX))
    };
    let as_limit = limit(libc::RLIMIT_AS);
    let data_limit = limit(libc::RLIMIT_DATA);
    if as_limit.is_none() && data_limit.is_none() {
        return None;
    }
    let (size, data) = mapped_now().unwrap_or((0, 0));
    let room = |l: Option<usize>, used: usize| l.map_or(usize::MAX, |l| l.saturating_sub(used));
    Some(room(as_limit, size).min(room(data_limit, data)))
}

/// A decimal number: digits only (no sign, space or other text), and
/// `None` for an empty one or one beyond `usize`. No allocation.
pub(crate) fn parse_decimal(bytes: &[u8]) -> Option<usize> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    bytes.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// The process's mapped bytes and its data and stack bytes, from
/// `/proc/self/statm` (fields 1 and 6, in pages).
fn mapped_now() -> Option<(usize, usize)> {
    let mut buf = [0u8; 128];
    let text = read_small_file(c"/proc/self/statm", &mut buf)?;
    let mut fields = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let size = parse_decimal(fields.next()?)?;
    let data = parse_decimal(fields.nth(4)?)?;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    Some((size.checked_mul(page)?, data.checked_mul(page)?))
}

/// Reserves `size` bytes of address space aligned to `align` (a power of two
/// and a multiple of the OS page size), readable and writable, committed on
/// first touch. Normal context only (mmap can block). `None` when refused,
/// and for `size` 0 (nothing would stay mapped at the address).
pub(crate) fn os_reserve(size: usize, align: usize) -> Option<*mut u8> {
    if size == 0 {
        return None;
    }
    let span = size.checked_add(align)?;
    // A refused mapping is retried smaller, or reported by the caller.
    let _errno = KeepErrno::new();
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = span - head - size;
    // SAFETY: both ranges lie inside the mapping just created and are
    // page-aligned (align and size are multiples of the page size); nothing
    // references them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    Some(aligned as *mut u8)
}

/// Returns a reservation made by [`os_reserve`].
///
/// # Safety
/// `ptr` and `size` must describe exactly one reservation from `os_reserve`
/// that nothing uses any more.
pub(crate) unsafe fn os_release(ptr: *mut u8, size: usize) {
    // SAFETY: the caller guarantees the range is one of our unused mappings.
    unsafe {
        libc::munmap(ptr.cast(), size);
    }
}

/// Resizes a reservation made by [`os_reserve`] to `new` bytes with
/// `mremap` (the pages move, their contents are not copied); the new
/// address, or `None` (then the old reservation is untouched).
///
/// # Safety
/// `ptr` and `old` describe exactly one reservation from `os_reserve`; on
/// success it is replaced by the result.
pub(crate) unsafe fn os_remap(ptr: *mut u8, old: usize, new: usize) -> Option<*mut u8> {
    // A refused move is made with a copy instead, or reported by the caller.
    let _errno = KeepErrno::new();
    // SAFETY: the caller guarantees the range is one of our mappings.
    let p = unsafe { libc::mremap(ptr.cast(), old, new, libc::MREMAP_MAYMOVE) };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

/// `pthread_cancel` cannot act on this thread until the guard is dropped,
/// which restores the thread's cancelability as it was (a cancel that came
/// meanwhile stays pending, and acts at the next cancellation point after
/// that). For a wait the heap makes through libc's cancellation points
/// (`pthread_join`, joining the maintenance thread as a heap is dropped):
/// a pending cancel acting there cut the drop short, the process aborting
/// (glibc's forced unwind finds no way through the Rust frames) or, where
/// it could unwind, the heap's memory leaked. Normal context: two calls
/// that make no system call. (On other systems than Linux a no-op: the
/// constant's value differs there, and the `libc` crate names none.)
#[must_use = "cancellation is enabled again as soon as the guard is dropped"]
pub(crate) struct CancelDisabled {
    #[cfg(target_os = "linux")]
    old: libc::c_int,
    /// Not `Send`: the state is the thread's.
    _thread: core::marker::PhantomData<*const ()>,
}

#[cfg(target_os = "linux")]
extern "C" {
    fn pthread_setcancelstate(state: libc::c_int, oldstate: *mut libc::c_int) -> libc::c_int;
}

/// `PTHREAD_CANCEL_DISABLE` in glibc's and musl's `pthread.h`.
#[cfg(target_os = "linux")]
const PTHREAD_CANCEL_DISABLE: libc::c_int = 1;

impl CancelDisabled {
    pub(crate) fn new() -> Self {
        #[cfg(target_os = "linux")]
        let mut old = 0;
        #[cfg(target_os = "linux")]
        // SAFETY: a valid state; `old` is written with the previous one.
        // It changes only the calling thread's state and is not a
        // cancellation point.
        unsafe {
            pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old)
        };
        CancelDisabled {
            #[cfg(target_os = "linux")]
            old,
            _thread: core::marker::PhantomData,
        }
    }
}

impl Drop for CancelDisabled {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        {
            let mut was = 0;
            // SAFETY: `old` is the state `new` read on this same thread
            // (the guard is not `Send`), a valid one; not a cancellation
            // point.
            unsafe { pthread_setcancelstate(self.old, &mut was) };
        }
    }
}

/// This thread's `errno` as it was when the guard was made, put back when
/// it is dropped: around the system calls that may fail on the way to an
/// allocation that succeeds all the same. A futex wait returns `EAGAIN`
/// when the lock word changed first, `ETIMEDOUT` after its slice, `EINTR`
/// for a signal; zone growth under a limit on address space has a mapping
/// refused and retries it smaller; a huge block that `mremap` cannot move
/// is copied instead; a refused membarrier falls back to visiting the CPU.
/// glibc's malloc leaves `errno` alone on success (its locks make their
/// futex calls without it), and C code relies on that: a loop that sets
/// `errno = 0`, then tests it after calls that may allocate, must not see
/// the `ENOMEM` of a mapping the heap did without (or a signal handler's
/// `malloc` change the `errno` of the code it interrupted). Any context:
/// `__errno_location` is async-signal-safe, and this is two plain accesses.
pub(crate) struct KeepErrno {
    saved: libc::c_int,
    /// Not `Send`: `errno` is the thread's.
    _thread: core::marker::PhantomData<*const ()>,
}

impl KeepErrno {
    #[inline]
    pub(crate) fn new() -> Self {
        KeepErrno {
            // SAFETY: libc's accessor returns this thread's errno, always
            // valid.
            saved: unsafe { *libc::__errno_location() },
            _thread: core::marker::PhantomData,
        }
    }
}

impl Drop for KeepErrno {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as in `new`, on the same thread (the guard is not `Send`).
        unsafe { *libc::__errno_location() = self.saved };
    }
}

/// Every signal that can be blocked is blocked on this thread until the
/// guard is dropped, which restores the mask as it was (signals that came
/// meanwhile are handled then). Normal context: two system calls.
#[must_use = "the signals are unblocked as soon as the guard is dropped"]
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
    /// Not `Send`: the mask is the thread's.
    _thread: core::marker::PhantomData<*const ()>,
}

impl SignalsBlocked {
    pub(crate) fn new() -> Self {
        SignalsBlocked {
            old: block_all_signals(),
            _thread: core::marker::PhantomData,
        }
    }
}

/// Makes the calling thread an ordinary one, whatever thread created it:
/// `SCHED_OTHER` (a real-time policy and priority inherited from the
/// creator dropped) and, on Linux, the CPUs of the process's main thread
/// (a creator's pinning dropped). For the maintenance thread, which a
/// real-time thread pinned to its CPU may start: at the creator's
/// priority its passes would hold off the application's real-time threads
/// of that priority, and pinned to a CPU a real-time thread keeps busy it
/// would never run. Best effort: a call the system refuses changes
/// nothing. Normal context.
pub(crate) fn ordinary_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the calling thread, a valid policy and parameter block.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_OTHER, &param) };
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it with
    // the main thread's CPUs (its thread id is the process id), and
    // sched_setaffinity applies them to the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        let size = core::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(libc::getpid(), size, &mut set) == 0 {
            libc::sched_setaffinity(0, size, &set);
        }
    }
}

/// Blocks every signal that can be blocked on the calling thread (glibc
/// leaves its own internal ones alone); returns the mask as it was. Normal
/// context: one system call.
pub(crate) fn block_all_signals() -> libc::sigset_t {
    let mut all = core::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = core::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises `all`; pthread_sigmask reads it and
    // writes the previous mask into `old` (it cannot fail with a valid
    // `how` and set); it changes only the calling thread's mask.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, all.as_ptr(), old.as_mut_ptr());
        old.assume_init()
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask `new` read on this same thread (the
        // guard is not `Send`), a valid set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, core::ptr::null_mut()) };
    }
}

/// Gives the memory of `[addr, addr + len)` back to the OS; it reads as
/// zeros when next touched. Returns whether the kernel took it: it refuses
/// (`EINVAL`) pages locked in memory (`mlock`, `mlockall`), which stay
/// resident. `errno` is left as it was: the inline decay (`Config::decay`)
/// runs this inside the program's own allocations and frees, which must
/// not change it. Normal context (madvise can block).
pub(crate) fn os_discard(addr: usize, len: usize) -> bool {
    let _errno = KeepErrno::new();
    // SAFETY: the range is page-aligned memory of one of our reservations
    // that nobody uses right now (the caller took it off the free lists).
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 }
}

/// The monotonic clock in nanoseconds (`CLOCK_MONOTONIC`: on Linux read
/// from the vDSO, no system call where the clock source allows). Never
/// allocates; 0 if the clock cannot be read.
pub(crate) fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return 0;
    }
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list_max;

    #[test]
    fn cpu_lists_parse_to_their_highest_id() {
        assert_eq!(parse_cpu_list_max(b"0-1\n"), Some(1));
        assert_eq!(parse_cpu_list_max(b"0\n"), Some(0));
        assert_eq!(parse_cpu_list_max(b"0-3,8-11\n"), Some(11));
        assert_eq!(parse_cpu_list_max(b""), None);
        assert_eq!(parse_cpu_list_max(b"x"), None);
    }
}
