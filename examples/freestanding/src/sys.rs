//! The runtime a kernel has anyway: the entry point, raw system calls, the
//! `mem*` functions the compiler emits calls to, and the panic handler.
//!
//! Everything here may be called from any context (the handlers included):
//! nothing allocates, nothing takes a lock.

use core::arch::{asm, naked_asm};
use core::fmt;
use core::sync::atomic::AtomicU32;

const SYS_WRITE: usize = 1;
const SYS_MMAP: usize = 9;
pub const SYS_RT_SIGACTION: usize = 13;
const SYS_RT_SIGPROCMASK: usize = 14;
pub const SYS_RT_SIGRETURN: usize = 15;
const SYS_SETITIMER: usize = 38;
const SYS_FUTEX: usize = 202;
const SYS_SCHED_GETAFFINITY: usize = 204;
const SYS_CLOCK_GETTIME: usize = 228;
const SYS_EXIT_GROUP: usize = 231;
#[cfg(feature = "interrupt-points")]
const SYS_GETPID: usize = 39;
#[cfg(feature = "interrupt-points")]
const SYS_KILL: usize = 62;

/// The process starts here with `rsp` pointing at `argc`, then `argv[]`.
/// Clear the frame pointer, align the stack to 16 bytes, call [`start`].
#[unsafe(naked)]
#[unsafe(no_mangle)]
extern "C" fn _start() -> ! {
    naked_asm!(
        "xor ebp, ebp",
        "mov rdi, rsp",
        "and rsp, -16",
        "call {start}",
        "ud2",
        start = sym start,
    )
}

/// Collects the arguments from the initial stack and runs the program.
extern "C" fn start(stack: *const usize) -> ! {
    // SAFETY: the kernel put argc at `stack`, followed by argc pointers to
    // NUL-terminated strings that live for the whole process.
    let args = unsafe { Args::from_stack(stack) };
    exit(crate::kmain(args))
}

/// The command-line arguments, read from the initial stack.
pub struct Args {
    argv: *const *const u8,
    argc: usize,
    next: usize,
}

impl Args {
    /// # Safety
    /// `stack` is the process's initial stack pointer.
    unsafe fn from_stack(stack: *const usize) -> Args {
        // SAFETY: per the contract, argc is at `stack` and argv follows it.
        unsafe {
            Args {
                argc: *stack,
                argv: stack.add(1) as *const *const u8,
                next: 1,
            }
        }
    }
}

impl Iterator for Args {
    type Item = &'static [u8];
    fn next(&mut self) -> Option<&'static [u8]> {
        if self.next >= self.argc {
            return None;
        }
        // SAFETY: argv[0..argc] are valid NUL-terminated strings that live
        // as long as the process (see `start`).
        let arg = unsafe { core::ffi::CStr::from_ptr(*self.argv.add(self.next) as _) };
        self.next += 1;
        Some(arg.to_bytes())
    }
}

/// A raw system call with up to six arguments; returns `rax` (negative
/// errno on failure).
///
/// # Safety
/// The arguments must be valid for system call `n`.
pub unsafe fn syscall(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the arguments; `syscall` clobbers only
    // rcx and r11, declared here.
    unsafe {
        asm!("syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret
}

/// Writes all of `bytes` to file descriptor `fd` (any context).
pub fn write(fd: usize, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the buffer is valid for reads of its length.
        let n = unsafe {
            syscall(
                SYS_WRITE,
                [fd, bytes.as_ptr() as usize, bytes.len(), 0, 0, 0],
            )
        };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// Ends the process with `code`.
pub fn exit(code: i32) -> ! {
    // SAFETY: exit_group takes an int and does not return.
    unsafe {
        asm!("syscall", in("rax") SYS_EXIT_GROUP, in("rdi") code as usize,
             options(noreturn, nostack));
    }
}

/// Maps `len` bytes of fresh, zeroed, private memory; `None` if refused.
pub fn mmap(len: usize) -> Option<*mut u8> {
    const PROT_RW: usize = 0x3;
    const MAP_PRIVATE_ANONYMOUS_NORESERVE: usize = 0x02 | 0x20 | 0x4000;
    // SAFETY: an anonymous mapping at an address of the kernel's choosing
    // touches no existing memory.
    let p = unsafe {
        syscall(
            SYS_MMAP,
            [
                0,
                len,
                PROT_RW,
                MAP_PRIVATE_ANONYMOUS_NORESERVE,
                usize::MAX,
                0,
            ],
        )
    };
    (p > 0).then_some(p as *mut u8)
}

/// Monotonic time in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = [0i64; 2];
    const CLOCK_MONOTONIC: usize = 1;
    // SAFETY: `ts` is a writable `struct timespec`.
    unsafe {
        syscall(
            SYS_CLOCK_GETTIME,
            [CLOCK_MONOTONIC, ts.as_mut_ptr() as usize, 0, 0, 0, 0],
        )
    };
    ts[0] as u64 * 1_000_000_000 + ts[1] as u64
}

/// How many CPUs this process may run on: one past the highest CPU number in
/// its affinity mask (so every id `rdtscp` reports is below it).
pub fn cpu_count() -> usize {
    let mut mask = [0u64; 16];
    // SAFETY: `mask` is a writable buffer of the length passed.
    let n = unsafe {
        syscall(
            SYS_SCHED_GETAFFINITY,
            [0, 128, mask.as_mut_ptr() as usize, 0, 0, 0],
        )
    };
    let words = if n > 0 { n as usize / 8 } else { 0 };
    (0..words)
        .rev()
        .find(|&i| mask[i] != 0)
        .map_or(1, |i| i * 64 + 64 - mask[i].leading_zeros() as usize)
}

/// The CPU this code runs on, as the kernel stores it in `TSC_AUX` for the
/// vDSO's `getcpu` (a kernel would read its per-CPU area instead). Any
/// context; 0 if the CPU has no `rdtscp`.
pub fn cpu_id() -> usize {
    use core::sync::atomic::{AtomicU8, Ordering};
    static HAS_RDTSCP: AtomicU8 = AtomicU8::new(2); // 2: not probed yet
    let mut has = HAS_RDTSCP.load(Ordering::Relaxed);
    if has == 2 {
        // SAFETY: every x86_64 CPU has cpuid (the intrinsic is an `unsafe fn`
        // in older Rust versions, safe in newer ones).
        #[allow(unused_unsafe)]
        let edx = unsafe { core::arch::x86_64::__cpuid(0x8000_0001) }.edx;
        has = ((edx >> 27) & 1) as u8;
        HAS_RDTSCP.store(has, Ordering::Relaxed);
    }
    if has == 0 {
        return 0;
    }
    let mut aux = 0u32;
    // SAFETY: the CPU supports rdtscp (probed above); it writes `aux`.
    unsafe { core::arch::x86_64::__rdtscp(&mut aux) };
    (aux & 0xfff) as usize
}

/// Sleeps while `*word == expected` (normal context only); may return
/// spuriously.
pub fn futex_wait(word: &AtomicU32, expected: u32) {
    const FUTEX_WAIT_PRIVATE: usize = 128;
    // SAFETY: `word` is a valid, aligned u32; no timeout.
    unsafe {
        syscall(
            SYS_FUTEX,
            [
                word.as_ptr() as usize,
                FUTEX_WAIT_PRIVATE,
                expected as usize,
                0,
                0,
                0,
            ],
        )
    };
}

/// Wakes one waiter on `word`. Any context: never blocks.
pub fn futex_wake(word: &AtomicU32) {
    const FUTEX_WAKE_PRIVATE: usize = 129;
    // SAFETY: `word` is a valid, aligned u32.
    unsafe {
        syscall(
            SYS_FUTEX,
            [word.as_ptr() as usize, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0],
        )
    };
}

/// Arms interval timer `which` (`ITIMER_REAL`, `ITIMER_PROF`) to fire every
/// `interval_us` microseconds; 0 disarms it.
pub fn setitimer(which: usize, interval_us: u64) {
    let tv = [interval_us / 1_000_000, interval_us % 1_000_000];
    let itimerval = [tv[0], tv[1], tv[0], tv[1]];
    // SAFETY: `itimerval` is a valid `struct itimerval`; no old value.
    unsafe {
        syscall(
            SYS_SETITIMER,
            [which, itimerval.as_ptr() as usize, 0, 0, 0, 0],
        )
    };
}

/// Sends signal `sig` to this (single-threaded) process: unless it is
/// blocked, its handler runs before this returns.
#[cfg(feature = "interrupt-points")]
pub fn raise(sig: usize) {
    // SAFETY: getpid takes no arguments; kill takes a pid and a signal
    // number and touches no memory.
    unsafe {
        let pid = syscall(SYS_GETPID, [0; 6]) as usize;
        syscall(SYS_KILL, [pid, sig, 0, 0, 0, 0]);
    }
}

/// Blocks the signals in `mask` (bit `sig - 1` per signal) for good.
pub fn block_signals(mask: u64) {
    const SIG_BLOCK: usize = 0;
    // SAFETY: `mask` is a valid 8-byte sigset; no old set.
    unsafe {
        syscall(
            SYS_RT_SIGPROCMASK,
            [SIG_BLOCK, &mask as *const u64 as usize, 0, 8, 0, 0],
        )
    };
}

/// One line of output built without allocating (any context may format
/// into it, only a normal context should: formatting is slow).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Writes the line, with a newline, to standard output.
    pub fn print(mut self, fd: usize) {
        let _ = fmt::Write::write_str(&mut self, "\n");
        write(fd, &self.buf[..self.len]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line::new();
    let _ = fmt::write(&mut line, format_args!("freestanding FAIL: {info}"));
    line.print(1);
    exit(1)
}

/// Nothing unwinds (`panic = "abort"`), but the prebuilt `alloc` library was
/// compiled for unwinding and names the personality routine, so the linker
/// wants one. It is never called; if it were, it would stop the program.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {
    write(1, b"freestanding FAIL: unwinding is not supported\n");
    exit(1)
}

// The memory functions the compiler calls. Copies and fills use the
// string instructions; the kernel clears the direction flag for handlers.

/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep movsb` copies rcx bytes forwards.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` and `src` are valid for `n` bytes (they may overlap).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: `dst` is below `src` or past its end: a forward copy is safe.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with `dst` above `src`: copy backwards (direction
    // flag set for the copy and cleared again, as the ABI requires).
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
    }
    dst
}

/// # Safety
/// `dst` is valid for writes of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep stosb` stores al rcx times.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `a` and `b` are valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, within both buffers.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// `s` points to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let end: *const u8;
    // SAFETY: the caller's contract; `repne scasb` scans for al (0) from rdi.
    unsafe {
        asm!("repne scasb", inout("rcx") usize::MAX => _, inout("rdi") s => end, in("al") 0u8,
             options(nostack, readonly));
    }
    end as usize - s as usize - 1
}

/// # Safety
/// As for [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
