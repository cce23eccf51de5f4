//! Signals and per-thread timers.
//!
//! A storm has two signals, [`storm_signals`]: `SIGRTMIN` and `SIGRTMIN + 1`
//! (real-time signals queue instead of merging and no library uses them by
//! default). Each is installed with [`install_handler`], which blocks the
//! signal itself while its handler runs and never sets `SA_NODEFER`: a
//! signal cannot nest in its own handler, so with two signals each masking
//! only itself, handlers nest at most two deep, each interrupting the
//! other's. Masking both in each handler ([`install_handler`]'s `also_mask`)
//! switches nesting off.
//!
//! A [`ThreadTimer`] is a POSIX timer that sends its signal to the one
//! thread that created it (`SIGEV_THREAD_ID`), with a value of the caller's
//! choosing in the signal's `sigval`: a handler finds its thread's state
//! through it ([`timer_signal`], [`signal_value`]) without a thread-local.

use std::time::Duration;

/// A handler with the `SA_SIGINFO` signature.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The two storm signals: `[SIGRTMIN, SIGRTMIN + 1]`.
pub fn storm_signals() -> [libc::c_int; 2] {
    let a = libc::SIGRTMIN();
    [a, a + 1]
}

/// Installs `handler` for `sig` with `SA_SIGINFO | SA_RESTART`. While it
/// runs, `sig` and every signal of `also_mask` are blocked; no
/// `SA_NODEFER`, so a signal never nests in its own handler. Normal context.
pub fn install_handler(
    sig: libc::c_int,
    handler: Handler,
    also_mask: &[libc::c_int],
) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid start; the handler has the
    // SA_SIGINFO signature; sigemptyset initialises the mask before
    // sigaddset and sigaction read it; no old action is requested.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaddset(&mut sa.sa_mask, sig);
        for &s in also_mask {
            libc::sigaddset(&mut sa.sa_mask, s);
        }
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks (`block`) or unblocks `sigs` for the calling thread only
/// (`pthread_sigmask`). Normal context.
pub fn mask(sigs: &[libc::c_int], block: bool) {
    // SAFETY: the set is initialised by sigemptyset before use;
    // pthread_sigmask changes only this thread's mask and writes no old set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Sends `sig` to the calling thread, now (`tgkill`). Handler-safe: a
/// handler uses it to force the other storm signal to nest at a chosen
/// point. Such a signal carries no timer value ([`timer_signal`] is `None`).
pub fn raise_here(sig: libc::c_int) {
    // SAFETY: tgkill to our own process and thread; no memory is passed. A
    // signal without a handler would take its default action, which is
    // the caller's choice.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), sig);
    }
}

/// Writes `msg` and a newline to standard error with `write(2)` and aborts.
/// Handler-safe: for a broken invariant where panicking is not an option.
pub fn die(msg: &str) -> ! {
    for part in [msg.as_bytes(), b"\n"] {
        // SAFETY: writes `part.len()` bytes from a live slice to fd 2; a
        // failed or short write only loses the message.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    std::process::abort()
}

/// Saves `errno` and restores it on drop. Handler-safe: a handler must not
/// change the `errno` of the code it interrupted (a futex wake or a failed
/// system call inside it can).
pub struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    /// Saves this thread's `errno`.
    pub fn save() -> Self {
        // SAFETY: `__errno_location` returns this thread's errno slot,
        // always valid.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// Reads the `sigval` attached to a signal (a [`ThreadTimer`]'s value, or
/// `sigqueue`'s), without checking where the signal came from: a signal
/// sent with `kill` or [`raise_here`] reads as 0. Handler-safe.
///
/// # Safety
/// `info` is the `siginfo_t` the kernel passed to an `SA_SIGINFO` handler.
pub unsafe fn signal_value(info: *const libc::siginfo_t) -> usize {
    // SAFETY: per the caller, a valid siginfo; the kernel zeroes what a
    // sender does not fill, so the union member reads as 0 if unused.
    unsafe { (*info).si_value().sival_ptr as usize }
}

/// What a timer signal carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerSignal {
    /// The value given to [`ThreadTimer::start`].
    pub value: usize,
    /// Expirations that produced no signal of their own (the previous one
    /// was still pending).
    pub overrun: u64,
}

/// The timer fields of a signal sent by a POSIX timer (`SI_TIMER`); `None`
/// for any other signal (someone's `kill`, a [`raise_here`]). Handler-safe.
///
/// # Safety
/// `info` is null or the `siginfo_t` the kernel passed to an `SA_SIGINFO`
/// handler.
pub unsafe fn timer_signal(info: *const libc::siginfo_t) -> Option<TimerSignal> {
    if info.is_null() {
        return None;
    }
    // SAFETY: per the caller, a valid siginfo; for SI_TIMER its timer
    // fields (value, overrun) are the ones filled in.
    let (code, value, overrun) =
        unsafe { ((*info).si_code, (*info).si_value(), (*info).si_overrun()) };
    (code == libc::SI_TIMER).then_some(TimerSignal {
        value: value.sival_ptr as usize,
        overrun: overrun.max(0) as u64,
    })
}

/// A periodic `CLOCK_MONOTONIC` POSIX timer that sends its signal to the
/// thread that started it (`SIGEV_THREAD_ID`). Deleted on drop (a signal
/// already queued may still arrive: block it with [`mask`] first if that
/// matters).
pub struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    /// Creates and arms a timer that sends `sig` to the calling thread every
    /// `period` (at least 1 ns), with `value` as the signal's `sival_ptr`.
    /// Normal context.
    pub fn start(sig: libc::c_int, period: Duration, value: usize) -> std::io::Result<Self> {
        let period = period.max(Duration::from_nanos(1));
        let ts = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        // SAFETY: an all-zero sigevent is valid; the SIGEV_THREAD_ID fields
        // are set below, for the calling thread (which exists).
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_value = libc::sigval {
            sival_ptr: value as *mut libc::c_void,
        };
        sev.sigev_notify_thread_id = crate::thread::gettid();
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call; the kernel copies
        // `sev` and writes the new timer's id into `id`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let timer = ThreadTimer(id); // deleted on the error path below
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `id` is the timer just created; `spec` is valid for reads;
        // no old value is requested.
        if unsafe { libc::timer_settime(id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(timer)
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: a live timer owned by this value, deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

    static VALUE: AtomicUsize = AtomicUsize::new(0);
    static TIMER_SIGNALS: AtomicU64 = AtomicU64::new(0);
    static OTHER_SIGNALS: AtomicU64 = AtomicU64::new(0);

    extern "C" fn on_signal(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let _errno = ErrnoGuard::save();
        // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
        match unsafe { timer_signal(info) } {
            Some(t) => {
                VALUE.store(t.value, Relaxed);
                TIMER_SIGNALS.fetch_add(1, Relaxed);
            }
            None => {
                OTHER_SIGNALS.fetch_add(1, Relaxed);
            }
        }
        // SAFETY: as above.
        unsafe { libc::__errno_location().write(libc::EINTR) };
    }

    #[test]
    fn a_timer_signals_its_thread_with_its_value_and_errno_survives() {
        let sig = libc::SIGRTMIN() + 5;
        install_handler(sig, on_signal, &[]).unwrap();
        // SAFETY: this thread's errno slot.
        unsafe { libc::__errno_location().write(1234) };
        let t = ThreadTimer::start(sig, Duration::from_micros(100), 0xfeed).unwrap();
        while TIMER_SIGNALS.load(Relaxed) < 5 {
            std::hint::spin_loop();
        }
        mask(&[sig], true);
        drop(t);
        assert_eq!(VALUE.load(Relaxed), 0xfeed);
        // SAFETY: as above.
        assert_eq!(unsafe { *libc::__errno_location() }, 1234, "errno restored");
        // A signal raised by hand is not a timer's.
        mask(&[sig], false);
        raise_here(sig);
        assert_eq!(OTHER_SIGNALS.load(Relaxed), 1);
    }
}
