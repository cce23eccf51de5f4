//! A seccomp filter on the calling thread, for the tests that take system
//! calls away from the allocator (the nolock path makes none; drain falls
//! back when `membarrier` fails).

#![allow(dead_code)]

/// `SECCOMP_RET_ALLOW`: the call runs.
pub const ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_TRAP`: the call does not run; the thread gets `SIGSYS`.
pub const TRAP: u32 = 0x0003_0000;
/// `SECCOMP_RET_ERRNO`: the call fails with the errno in the low 16 bits.
pub const ERRNO: u32 = 0x0005_0000;

/// From now on, system call `nr` of the calling thread gets `on_match` and
/// every other call `otherwise` (calls of another architecture than x86-64
/// are allowed). Sets `no_new_privs`, as an unprivileged filter needs.
pub fn filter_syscall(nr: libc::c_long, on_match: u32, otherwise: u32) {
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const ARCH_X86_64: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = [
        f(LD_ABS, 0, 0, 4), // seccomp_data.arch
        f(JEQ, 1, 0, ARCH_X86_64),
        f(RET, 0, 0, ALLOW),
        f(LD_ABS, 0, 0, 0), // seccomp_data.nr
        f(JEQ, 0, 1, nr as u32),
        f(RET, 0, 0, on_match),
        f(RET, 0, 0, otherwise),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: valid prctl arguments; the kernel copies the program; the
    // filter applies to the calling thread only.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        let rc = libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        );
        assert_eq!(rc, 0, "seccomp: {}", std::io::Error::last_os_error());
    }
}
