//! A fixed-size message buffer for fatal errors: no allocation, no `fmt`.
//!
//! Heap corruption is reported from any context (a signal handler included),
//! so the message is assembled by hand in a stack buffer and handed to
//! [`Platform::fatal`](super::Platform::fatal), which writes it with
//! write(2) on std.

/// The default fatal path of every platform, and of the crate's internal
/// checks (the `check!` macro): writes `message` (one line) and stops
/// the process, in any context, without allocating, formatting or
/// panicking. On std: write(2) to stderr, then `abort()`. Without std there
/// is nowhere to write: the CPU executes its trap instruction (an embedder
/// that wants the message implements [`Platform::fatal`](super::Platform::fatal)).
#[cold]
#[inline(never)]
pub(crate) fn die(message: &[u8]) -> ! {
    #[cfg(feature = "std")]
    {
        super::write_stderr(message);
        // SAFETY: abort has no preconditions and is async-signal-safe.
        unsafe { libc::abort() }
    }
    #[cfg(not(feature = "std"))]
    {
        let _ = message;
        trap()
    }
}

/// Stops the CPU with its undefined-instruction / breakpoint trap (no_std).
#[cfg(not(feature = "std"))]
fn trap() -> ! {
    // SAFETY (each arm): the instruction only raises the CPU's trap; it
    // touches no memory and never returns to this code.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    unsafe {
        core::arch::asm!("ud2", options(noreturn, nomem, nostack))
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("brk #0xf000", options(noreturn, nomem, nostack))
    }
    #[cfg(any(target_arch = "riscv32", target_arch = "riscv64"))]
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("unimp", options(noreturn, nomem, nostack))
    }
    #[cfg(not(any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv32",
        target_arch = "riscv64"
    )))]
    loop {
        core::hint::spin_loop();
    }
}

/// A one-line message built without allocating or formatting: a fatal
/// one for [`die`], or a warning for `write_stderr` (the global heap's
/// report of an invalid setting).
pub(crate) struct FatalMessage {
    buf: [u8; 512],
    len: usize,
}

impl FatalMessage {
    pub(crate) fn new() -> Self {
        FatalMessage {
            buf: [0; 512],
            len: 0,
        }
    }

    /// Appends text (truncated at the buffer's end).
    pub(crate) fn text(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    /// Appends bytes (truncated at the buffer's end, which keeps room for
    /// the newline).
    pub(crate) fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends `0x` and the value in hexadecimal.
    pub(crate) fn hex(self, v: usize) -> Self {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        let mut n = 2;
        let mut started = false;
        for shift in (0..usize::BITS / 4).rev() {
            let d = (v >> (shift * 4)) & 0xf;
            if d != 0 || started || shift == 0 {
                started = true;
                digits[n] = b"0123456789abcdef"[d];
                n += 1;
            }
        }
        // SAFETY: only ASCII digits were written.
        let s = unsafe { core::str::from_utf8_unchecked(&digits[..n]) };
        self.text(s)
    }

    /// Appends the value in decimal.
    pub(crate) fn dec(self, mut v: usize) -> Self {
        let mut digits = [0u8; 20];
        let mut n = digits.len();
        loop {
            n -= 1;
            digits[n] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        // SAFETY: only ASCII digits were written.
        let s = unsafe { core::str::from_utf8_unchecked(&digits[n..]) };
        self.text(s)
    }

    /// The message with a trailing newline.
    pub(crate) fn line(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..self.len + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_line_without_fmt() {
        let mut m = FatalMessage::new()
            .text("anyalloc: double free of page ")
            .hex(0x7f00_1000)
            .text(" (order ")
            .dec(2)
            .text(")");
        assert_eq!(
            m.line(),
            b"anyalloc: double free of page 0x7f001000 (order 2)\n"
        );
        let mut z = FatalMessage::new().hex(0).dec(0);
        assert_eq!(z.line(), b"0x00\n");
    }
}
