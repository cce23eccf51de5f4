//! Text assembled on the stack, for messages, `malloc_stats` and
//! `malloc_info`: nothing here allocates, so it can run while the heap is
//! busy (or inside a signal handler).

/// A fixed buffer of text; what does not fit is cut off.
pub(crate) struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub(crate) fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    pub(crate) fn text(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.push(b);
        }
        self
    }

    pub(crate) fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            self.push(d);
        }
        self
    }

    pub(crate) fn hex(&mut self, v: usize) -> &mut Self {
        self.text("0x");
        let mut started = false;
        for shift in (0..usize::BITS / 4).rev() {
            let d = (v >> (shift * 4)) & 0xf;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push(b"0123456789abcdef"[d]);
            }
        }
        self
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Writes the text to file descriptor `fd` with write(2)
    /// (async-signal-safe).
    pub(crate) fn write_fd(&self, fd: i32) {
        let b = self.bytes();
        let mut done = 0;
        while done < b.len() {
            let n = write_raw(fd, &b[done..]);
            if n <= 0 {
                return;
            }
            done += n as usize;
        }
    }
}

/// write(2) of `bytes` to `fd` as a direct system call: libc's `write` is a
/// cancellation point, and a thread with a `pthread_cancel` pending would
/// end there quietly, before a fatal message and the abort after it (the
/// process running on with its heap corrupt). Returns what write(2) does
/// (-1 on error).
pub(crate) fn write_raw(fd: i32, bytes: &[u8]) -> isize {
    // SAFETY: write(2) reads `bytes.len()` bytes of the live slice.
    unsafe {
        libc::syscall(
            libc::SYS_write,
            libc::c_long::from(fd),
            bytes.as_ptr(),
            bytes.len(),
        ) as isize
    }
}
