//! The bare rseq floor: a per-CPU array pop and push, each one restartable
//! sequence (Linux rseq), and nothing else. It is a reference row of the page
//! pairs (workload 6): the physical limit of a per-CPU cache that is safe
//! against preemption, migration and signal handlers without an atomic
//! read-modify-write, so the cost of anyalloc's fast path over that limit is
//! visible in every report.
//!
//! How it works (x86-64, glibc >= 2.35, which registers a `struct rseq` for
//! every thread at `__rseq_offset` from the thread pointer; `__rseq_size`
//! is 0 when that failed or was switched off): each operation stores the
//! address of its 32-byte `struct rseq_cs` descriptor `{version 0, flags 0,
//! start_ip, post_commit_offset, abort_ip}` in the area's `rseq_cs` field,
//! reads `cpu_id`, and ends with one committing store of the CPU's count.
//! If the thread is preempted, migrated or gets a signal inside
//! `[start_ip, start_ip + post_commit_offset)`, the kernel moves it to
//! `abort_ip` (preceded by the signature 0x53053053, as glibc registered)
//! before anything else runs; the abort handler restarts the operation.
//!
//! The "pages" it hands out are tokens, never touched: the floor measures
//! the cache operation alone. An empty array hands out a spare token and a
//! full one drops the token (migrations between a pop and its push can
//! shift tokens between CPUs), so no outcome of the race matters.

use std::ptr::NonNull;

use crate::pages::PagePeer;

/// Tokens per CPU.
const CAP: usize = 1024;

/// One CPU's array: the count, then the tokens (`slots[i]` at byte
/// `8 + 8 * i`, so the top token `slots[count - 1]` is at `8 * count`).
#[repr(C, align(128))]
struct CpuArray {
    count: usize,
    slots: [usize; CAP],
}

const STRIDE: usize = std::mem::size_of::<CpuArray>();

extern "C" {
    // glibc >= 2.35: this thread's `struct rseq` relative to the thread
    // pointer, and its size (0: not registered).
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// This thread's rseq area, if glibc registered one and the kernel has
/// written a CPU id into it.
fn rseq_area() -> Option<usize> {
    // SAFETY: plain reads of two glibc globals set before user code runs.
    let (size, offset) = unsafe { (__rseq_size, __rseq_offset) };
    if size == 0 {
        return None;
    }
    let tp: usize;
    // SAFETY: on x86-64 `fs:0` holds the thread pointer (the TCB's self
    // pointer); reading it has no side effects.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    let area = tp.wrapping_add_signed(offset);
    // SAFETY: with rseq registered, `area` is this thread's live struct
    // rseq; `cpu_id` is the u32 at offset 4 (the kernel writes it).
    let cpu = unsafe { std::ptr::read_volatile((area + 4) as *const u32) };
    ((cpu as i32) >= 0).then_some(area)
}

/// The per-CPU arrays and the two restartable operations.
pub struct RseqFloor {
    arrays: Box<[CpuArray]>,
}

impl RseqFloor {
    /// The floor, or why it can't run here.
    pub fn new() -> Result<RseqFloor, String> {
        if rseq_area().is_none() {
            return Err(
                "rseq is not available (glibc did not register it: __rseq_size is 0, e.g. \
                 GLIBC_TUNABLES=glibc.pthread.rseq=0, or an old glibc or kernel)"
                    .into(),
            );
        }
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
        let arrays: Box<[CpuArray]> = (0..n)
            .map(|c| {
                let mut a = CpuArray {
                    count: CAP / 2,
                    slots: [0; CAP],
                };
                for (i, s) in a.slots.iter_mut().enumerate() {
                    *s = ((c * CAP + i + 1) * 4096) | 1 << 46;
                }
                a
            })
            .collect();
        Ok(RseqFloor { arrays })
    }

    /// Pops this CPU's top token (0 if the array is empty or the CPU id is
    /// out of range).
    #[inline]
    fn pop(&self, area: usize) -> usize {
        let out: usize;
        // `area` is this thread's registered struct rseq (rseq_cs at
        // offset 8, cpu_id at 4); the descriptor lives in `__rseq_cs` with
        // the layout the kernel expects and the abort handler is preceded by
        // the registered signature. The sequence only touches the array of
        // the CPU it runs on, below `count`, and commits with one store.
        // SAFETY: as just said; an abort restarts it from the top, and
        // `cpu < ncpu` is checked before the array is indexed.
        unsafe {
            std::arch::asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "29:",
                ".long 0, 0",
                ".quad 23f, (24f - 23f), 26f",
                ".popsection",
                ".pushsection __rseq_failure, \"ax\"",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "26:",
                "jmp 22f",
                ".popsection",
                "22:",
                "leaq 29b(%rip), {tmp}",
                "movq {tmp}, 8({rseq})",
                "23:",
                "movl 4({rseq}), {cpu:e}",
                "cmpq {ncpu}, {cpu}",
                "jae 25f",
                "imulq ${stride}, {cpu}",
                "addq {base}, {cpu}",
                "movq ({cpu}), {cnt}",
                "testq {cnt}, {cnt}",
                "jz 25f",
                "movq ({cpu},{cnt},8), {out}",
                "subq $1, {cnt}",
                "movq {cnt}, ({cpu})",
                "24:",
                "jmp 27f",
                "25:",
                "xorl {out:e}, {out:e}",
                "27:",
                rseq = in(reg) area,
                base = in(reg) self.arrays.as_ptr(),
                ncpu = in(reg) self.arrays.len(),
                stride = const STRIDE,
                tmp = out(reg) _,
                cpu = out(reg) _,
                cnt = out(reg) _,
                out = out(reg) out,
                options(att_syntax, nostack),
            );
        }
        out
    }

    /// Pushes `token` on this CPU's array (dropped if it is full or the CPU
    /// id is out of range).
    #[inline]
    fn push(&self, area: usize, token: usize) {
        // SAFETY: as in `pop`; the token is written above `count` first (a
        // restart leaves it unseen) and published by the committing store
        // of the new count, which stays <= CAP.
        unsafe {
            std::arch::asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "29:",
                ".long 0, 0",
                ".quad 23f, (24f - 23f), 26f",
                ".popsection",
                ".pushsection __rseq_failure, \"ax\"",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "26:",
                "jmp 22f",
                ".popsection",
                "22:",
                "leaq 29b(%rip), {tmp}",
                "movq {tmp}, 8({rseq})",
                "23:",
                "movl 4({rseq}), {cpu:e}",
                "cmpq {ncpu}, {cpu}",
                "jae 24f",
                "imulq ${stride}, {cpu}",
                "addq {base}, {cpu}",
                "movq ({cpu}), {cnt}",
                "cmpq ${cap}, {cnt}",
                "jae 24f",
                "addq $1, {cnt}",
                "movq {token}, ({cpu},{cnt},8)",
                "movq {cnt}, ({cpu})",
                "24:",
                rseq = in(reg) area,
                base = in(reg) self.arrays.as_ptr(),
                ncpu = in(reg) self.arrays.len(),
                token = in(reg) token,
                stride = const STRIDE,
                cap = const CAP,
                tmp = out(reg) _,
                cpu = out(reg) _,
                cnt = out(reg) _,
                options(att_syntax, nostack),
            );
        }
    }

    /// Tokens held by all CPUs (normal context, nothing else running).
    pub fn tokens(&self) -> usize {
        self.arrays.iter().map(|a| a.count).sum()
    }
}

impl PagePeer for RseqFloor {
    #[inline]
    fn alloc(&self, _order: u32) -> Option<NonNull<u8>> {
        let area = rseq_area()?;
        let t = self.pop(area);
        // An empty array: a spare token (never touched).
        NonNull::new(if t == 0 { 4096 } else { t } as *mut u8)
    }
    #[inline]
    unsafe fn free(&self, p: NonNull<u8>, _order: u32) {
        if let Some(area) = rseq_area() {
            self.push(area, p.as_ptr() as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor, or `None` (said on stderr) where rseq was switched off on
    /// purpose (`GLIBC_TUNABLES=glibc.pthread.rseq=0`) or skipping is
    /// allowed (`ANYALLOC_ALLOW_SKIP=1`). Anywhere else a missing rseq fails
    /// the test: the machines this project runs on have it (glibc >= 2.35).
    fn floor_or_skip() -> Option<RseqFloor> {
        match RseqFloor::new() {
            Ok(f) => Some(f),
            Err(e) => {
                let off = std::env::var("GLIBC_TUNABLES")
                    .is_ok_and(|t| t.contains("glibc.pthread.rseq=0"));
                assert!(
                    off || std::env::var_os("ANYALLOC_ALLOW_SKIP").is_some(),
                    "{e}; set ANYALLOC_ALLOW_SKIP=1 to skip"
                );
                eprintln!("SKIPPED: {e}");
                None
            }
        }
    }

    #[test]
    fn pop_and_push_conserve_tokens_on_one_thread() {
        let Some(f) = floor_or_skip() else { return };
        let before = f.tokens();
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(f.alloc(0).unwrap());
        }
        // Popped tokens are distinct (or spares, only if an array ran dry).
        let mut v: Vec<usize> = held.iter().map(|p| p.as_ptr() as usize).collect();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 100);
        for p in held {
            // SAFETY: tokens from `alloc`.
            unsafe { f.free(p, 0) };
        }
        assert_eq!(f.tokens(), before);
    }

    static STORM: std::sync::OnceLock<RseqFloor> = std::sync::OnceLock::new();
    static HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        if let (Some(f), Some(area)) = (STORM.get(), rseq_area()) {
            // Pop and push on the CPU the interrupted pop or push is using.
            for _ in 0..4 {
                let t = f.pop(area);
                if t != 0 {
                    f.push(area, t);
                }
            }
            HANDLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A handler that pops and pushes on the same CPU's array, every
    /// 20 us, interrupts the thread's own pops and pushes: the kernel restarts
    /// an interrupted sequence, so not one token is lost or duplicated.
    #[test]
    fn signals_inside_the_sequences_lose_nothing() {
        let Some(f) = floor_or_skip() else { return };
        let f = STORM.get_or_init(|| f);
        let sig = libc::SIGRTMIN() + 3;
        anyalloc_storm::install_handler(sig, on_signal, &[]).unwrap();
        let before = f.tokens();
        let timer =
            anyalloc_storm::ThreadTimer::start(sig, std::time::Duration::from_micros(20), 0)
                .unwrap();
        anyalloc_storm::mask(&[sig], false);
        let t0 = std::time::Instant::now();
        let mut pairs = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(300) {
            for _ in 0..1000 {
                let area = rseq_area().unwrap();
                let t = f.pop(area);
                if t != 0 {
                    f.push(area, t);
                }
            }
            pairs += 1000;
        }
        anyalloc_storm::mask(&[sig], true);
        drop(timer);
        let handled = HANDLED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(handled > 100, "only {handled} signals in 300 ms");
        assert!(pairs > 0);
        assert_eq!(f.tokens(), before, "{handled} signals, {pairs} pairs");
    }
}
