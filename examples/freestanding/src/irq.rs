//! "Interrupts": two signals, installed with raw `rt_sigaction` and driven by
//! raw interval timers, with the priorities of a kernel's interrupt lines.
//!
//! * `SIGPROF` (`ITIMER_PROF`, process CPU time) is the **low-priority** IRQ.
//!   While its handler runs, only `SIGPROF` itself is masked, so the
//!   high-priority one may interrupt it.
//! * `SIGALRM` (`ITIMER_REAL`, every [`HIGH_PERIOD_US`]) is the
//!   **high-priority** IRQ: its handler masks both signals, so nothing
//!   interrupts it.
//!
//! Both handlers run [`kalloc::irq_enter`] / [`kalloc::irq_exit`] around
//! their body, which routes every allocation they make to the nolock path.

use core::arch::naked_asm;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{kalloc, sys};

const SIGALRM: usize = 14;
const SIGPROF: usize = 27;
const ITIMER_REAL: usize = 0;
const ITIMER_PROF: usize = 2;

/// The high-priority timer's period: prime, so that its phase against the
/// scheduler tick (which paces `ITIMER_PROF`) drifts and it lands inside the
/// low-priority handler at a steady rate, not always or never.
pub const HIGH_PERIOD_US: u64 = 97;
/// The low-priority timer's period (CPU time; the kernel rounds it to its
/// tick).
pub const LOW_PERIOD_US: u64 = 1000;

/// Interrupts taken, and how many interrupted another handler.
pub static IRQS: AtomicU64 = AtomicU64::new(0);
pub static NESTED: AtomicU64 = AtomicU64::new(0);

const fn bit(sig: usize) -> u64 {
    1 << (sig - 1)
}

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
struct SigAction {
    handler: extern "C" fn(i32),
    flags: u64,
    restorer: unsafe extern "C" fn() -> !,
    mask: u64,
}

/// Returns from a handler: the kernel restores the interrupted context from
/// the frame on the stack (`SA_RESTORER` makes the kernel push our address).
#[unsafe(naked)]
unsafe extern "C" fn restorer() -> ! {
    naked_asm!("mov eax, {n}", "syscall", "ud2", n = const sys::SYS_RT_SIGRETURN)
}

fn install(sig: usize, handler: extern "C" fn(i32), mask: u64) -> Result<(), &'static str> {
    const SA_RESTART: u64 = 0x1000_0000;
    const SA_RESTORER: u64 = 0x0400_0000;
    let act = SigAction {
        handler,
        flags: SA_RESTORER | SA_RESTART,
        restorer,
        mask,
    };
    // SAFETY: `act` is a valid kernel sigaction; the handler is an
    // `extern "C" fn(i32)` and the restorer calls rt_sigreturn.
    let r = unsafe {
        sys::syscall(
            sys::SYS_RT_SIGACTION,
            [sig, &act as *const SigAction as usize, 0, 8, 0, 0],
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err("rt_sigaction failed")
    }
}

/// Installs both handlers and starts both timers.
pub fn enable() -> Result<(), &'static str> {
    install(SIGPROF, on_low, 0)?; // the handled signal itself is masked anyway
    install(SIGALRM, on_high, bit(SIGPROF))?;
    sys::setitimer(ITIMER_PROF, LOW_PERIOD_US);
    sys::setitimer(ITIMER_REAL, HIGH_PERIOD_US);
    Ok(())
}

/// Stops both timers and masks both signals for good (the kernel's
/// `local_irq_disable` before shutdown): no handler runs after this returns.
pub fn disable() {
    sys::setitimer(ITIMER_REAL, 0);
    sys::setitimer(ITIMER_PROF, 0);
    sys::block_signals(bit(SIGALRM) | bit(SIGPROF));
}

extern "C" fn on_low(_sig: i32) {
    if kalloc::irq_enter() > 0 {
        // Only the high-priority handler may interrupt another one.
        crate::violation(crate::Violation::IrqPriority);
    }
    IRQS.fetch_add(1, Relaxed);
    crate::low_irq();
    kalloc::irq_exit();
}

/// Raises the high-priority IRQ on this CPU now: it runs before this
/// returns (unless masked: in a handler, or after [`disable`]).
#[cfg(feature = "interrupt-points")]
pub fn raise_high() {
    sys::raise(SIGALRM);
}

extern "C" fn on_high(_sig: i32) {
    if kalloc::irq_enter() > 0 {
        NESTED.fetch_add(1, Relaxed);
    }
    IRQS.fetch_add(1, Relaxed);
    #[cfg(feature = "interrupt-points")]
    if crate::points::landed() {
        crate::lock_burst();
    }
    crate::high_irq();
    kalloc::irq_exit();
}
