//! The two per-thread words of the routing (`depth`, `scope`), in
//! *initial-exec* TLS.
//!
//! Rust's `thread_local!` in a shared library compiles to general-dynamic
//! TLS: every access calls `__tls_get_addr`. That function is a plain load
//! for a library loaded at startup, except right after the process
//! `dlopen`ed (or `dlclose`d) a module with TLS: the next call on each thread
//! then updates the thread's DTV, which can `malloc` (to grow it) or `free`
//! (a closed module's block), i.e. call us, and our own TLS access inside
//! that `malloc` enters the unfinished update again. jemalloc, mimalloc and
//! tcmalloc use initial-exec TLS for this reason, and so do we: on x86-64 the
//! words live in this module's static TLS block, reached with one load from
//! the GOT and the thread pointer (`fs`), no call, nothing that allocates,
//! safe in a signal handler. The cost: the library is marked
//! `DF_STATIC_TLS`, so it must be loaded at startup (`LD_PRELOAD` or linked);
//! `dlopen` of it may fail, and would not replace `malloc` anyway.
//!
//! Other architectures fall back to a const-initialised `thread_local!`
//! without `Drop` (correct, but exposed to the DTV update described above).

use core::ffi::c_int;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

/// The routing state of one thread. Zero-initialised: a new thread starts
/// outside the allocator and outside any nolock scope.
#[repr(C)]
pub(crate) struct ThreadState {
    /// How many allocator calls of this thread are in progress.
    pub(crate) depth: AtomicU32,
    /// How many `anyalloc_nolock_enter` scopes are open on this thread.
    pub(crate) scope: AtomicU32,
    /// This thread's `errno` (`__errno_location()`), once asked: `free`
    /// saves and restores it on every call, and a call into libc through
    /// the PLT each time cost more than the rest of the routing.
    errno: AtomicPtr<c_int>,
}

impl ThreadState {
    /// This thread's `errno`.
    #[inline(always)]
    pub(crate) fn errno_location(&self) -> *mut c_int {
        let p = self.errno.load(Ordering::Relaxed);
        if p.is_null() {
            return self.errno_location_slow();
        }
        p
    }

    /// The first ask on this thread. A signal handler that interrupts it
    /// and asks too stores the same address.
    #[cold]
    #[inline(never)]
    fn errno_location_slow(&self) -> *mut c_int {
        // SAFETY: __errno_location returns this thread's errno, valid as
        // long as the thread (and the same in a forked child's only thread).
        let p = unsafe { libc::__errno_location() };
        self.errno.store(p, Ordering::Relaxed);
        p
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::ThreadState;

    // Sixteen zero bytes of thread-local storage (`.tbss`) with the layout
    // of `ThreadState` (asserted below): global so that every codegen
    // unit's object links to it, hidden so that it is not exported from
    // the library.
    core::arch::global_asm!(
        ".pushsection .tbss,\"awT\",@nobits",
        ".p2align 3",
        ".globl anyalloc_c_thread_state",
        ".hidden anyalloc_c_thread_state",
        ".type anyalloc_c_thread_state,@object",
        ".size anyalloc_c_thread_state,16",
        "anyalloc_c_thread_state:",
        ".zero 16",
        ".popsection",
    );
    const _: () = assert!(
        core::mem::size_of::<ThreadState>() == 16 && core::mem::align_of::<ThreadState>() <= 8
    );

    /// This thread's state.
    #[inline(always)]
    pub(crate) fn state() -> &'static ThreadState {
        let addr: usize;
        // The initial-exec sequence: the GOT slot holds the variable's
        // (negative) offset from the thread pointer, which `fs:0` holds (the
        // TCB's self pointer on x86-64 glibc and musl).
        // SAFETY: it only reads memory and has no side effects.
        unsafe {
            core::arch::asm!(
                "mov {a}, qword ptr [rip + anyalloc_c_thread_state@GOTTPOFF]",
                "add {a}, qword ptr fs:[0]",
                a = out(reg) addr,
                options(nostack, pure, readonly),
            );
        }
        // The `'static` is a white lie the callers respect: they use the
        // reference at once, on this thread (a signal handler on this thread
        // sees the same words, which are atomics).
        // SAFETY: `addr` is this thread's copy of the 8-aligned, 16-byte
        // variable, zeroed by the loader, live as long as the thread.
        unsafe { &*(addr as *const ThreadState) }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::ThreadState;
    use core::sync::atomic::{AtomicPtr, AtomicU32};

    std::thread_local! {
        static STATE: ThreadState = const {
            ThreadState {
                depth: AtomicU32::new(0),
                scope: AtomicU32::new(0),
                errno: AtomicPtr::new(core::ptr::null_mut()),
            }
        };
    }

    /// This thread's state.
    #[inline(always)]
    pub(crate) fn state() -> &'static ThreadState {
        // SAFETY: const-initialised, no destructor: the value lives as long
        // as the thread; callers use the reference at once, on this thread.
        STATE.with(|s| unsafe { &*(s as *const ThreadState) })
    }
}

pub(crate) use imp::state;
