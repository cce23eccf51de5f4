//! The calling thread: its id, its CPU, and a clock.

/// The kernel thread id of the calling thread. Handler-safe.
#[inline]
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    unsafe { libc::gettid() }
}

/// The CPU the calling thread runs on now (`sched_getcpu`: rseq or vDSO,
/// no lock), `0` if unknown. Handler-safe.
#[inline]
pub fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    c.max(0) as usize
}

/// Pins the calling thread to `cpu`; `false` if the OS refused. Normal
/// context.
pub fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside
    // it; sched_setaffinity(0, ..) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPUs the calling thread may run on (its affinity mask), in
/// order; empty if the OS refused to say. Normal context.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is the empty set, which sched_getaffinity
    // fills for the calling thread; CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Lets the calling thread run on every CPU of `cpus` (undoing
/// [`pin_to_cpu`]); `false` if the OS refused. Normal context.
pub fn allow_cpus(cpus: &[usize]) -> bool {
    // SAFETY: as in `pin_to_cpu`, with every CPU of `cpus` in the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (vDSO: usually no system call).
/// Handler-safe.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always
    // exists, and clock_gettime is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_can_be_pinned_where_it_runs() {
        let allowed = allowed_cpus();
        assert!(allowed.contains(&current_cpu()));
        assert!(pin_to_cpu(current_cpu()));
        assert_eq!(allowed_cpus(), vec![current_cpu()]);
        assert!(allow_cpus(&allowed));
        assert_eq!(allowed_cpus(), allowed);
        assert!(gettid() > 0);
        let t = now_ns();
        assert!(now_ns() >= t);
    }
}
