//! Configuration and configuration errors.

use core::fmt;

/// The smallest allowed zone: 16 pages.
pub const MIN_MEMORY: usize = 16 * crate::PAGE_SIZE;

/// The largest allowed zone ([`Config::memory`]): 16 TiB less 4 MiB
/// (17,592,181,850,112 bytes) on 64-bit targets. A zone numbers its pages
/// with 32-bit indices, `u32::MAX` meaning "no page", and its blocks are
/// whole 4 MiB blocks up to index 2^32: so at most 2^32 - 2^10 pages. (On a
/// 32-bit target, the largest page-aligned size, which no OS can reserve.)
pub const MAX_MEMORY: usize = {
    let pages = crate::page::MAX_ZONE_PAGES;
    if pages > usize::MAX / crate::PAGE_SIZE {
        usize::MAX / crate::PAGE_SIZE * crate::PAGE_SIZE
    } else {
        pages * crate::PAGE_SIZE
    }
};

/// How an allocator is set up. Start from [`Config::default`] and adjust:
///
/// ```
/// use anyalloc::Config;
/// let config = Config::default().memory(64 << 20).cpus(4).grow(false);
/// assert_eq!(config.memory_bytes(), 64 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub(crate) memory: usize,
    pub(crate) cpus: Option<usize>,
    pub(crate) grow: bool,
    pub(crate) maintenance: bool,
    pub(crate) decay: bool,
    pub(crate) rseq: bool,
    pub(crate) nolock_syscalls: bool,
    pub(crate) min_reserve: Option<usize>,
}

impl Default for Config {
    /// 64 MiB first zone (address space only until touched), one slot set per
    /// CPU the platform reports, growth on.
    fn default() -> Self {
        Config {
            memory: 64 << 20,
            cpus: None,
            grow: true,
            maintenance: true,
            decay: true,
            rseq: true,
            nolock_syscalls: true,
            min_reserve: None,
        }
    }
}

impl Config {
    /// Size in bytes of the first zone (rounded up to whole pages). With
    /// growth off this is a hard cap on the memory the allocator manages.
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator, PAGE_SIZE};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20)).unwrap();
    /// assert_eq!(pages.stats().total_pages, (16 << 20) / PAGE_SIZE);
    /// ```
    pub fn memory(mut self, bytes: usize) -> Self {
        self.memory = bytes;
        self
    }

    /// Number of CPU slot sets (default: the platform's CPU count, and with
    /// the restartable-sequence fast path at least every possible CPU id,
    /// so that a process restricted to some CPUs keeps that fast path; at
    /// most [`MAX_CPUS`] either way). CPU ids at or above it share slots
    /// (modulo); the rseq fast path needs a slot set for every possible CPU
    /// id, so a smaller count (explicit, or the default on a machine with
    /// more than [`MAX_CPUS`] possible CPU ids) selects the try-locked
    /// slots.
    ///
    /// ```
    /// use anyalloc::{Config, Error, PageAllocator};
    /// let pages = PageAllocator::new(Config::default().memory(16 << 20).cpus(2)).unwrap();
    /// assert_eq!(pages.cpus(), 2);
    /// let none = PageAllocator::new(Config::default().memory(16 << 20).cpus(0));
    /// assert!(matches!(none, Err(Error::Config { setting: "Config::cpus", .. })));
    /// ```
    pub fn cpus(mut self, n: usize) -> Self {
        self.cpus = Some(n);
        self
    }

    /// Whether the normal path may reserve further zones from the OS when
    /// every zone is exhausted (std only; default on).
    ///
    /// ```
    /// use anyalloc::{Config, PageAllocator, MAX_ORDER};
    /// // 1 MiB and no growth: a 4 MiB block can never fit.
    /// let pages = PageAllocator::new(Config::default().memory(1 << 20).grow(false)).unwrap();
    /// assert!(pages.alloc_pages(MAX_ORDER).is_none());
    /// assert_eq!(pages.stats().zones, 1);
    /// ```
    pub fn grow(mut self, grow: bool) -> Self {
        self.grow = grow;
        self
    }

    /// Whether a maintenance thread may be started for this allocator (std;
    /// default on).
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false)).unwrap();
    /// // No thread: the program runs the passes itself.
    /// heap.maintain();
    /// assert_eq!(heap.stats().maintenance_passes, 1);
    /// ```
    pub fn maintenance(mut self, on: bool) -> Self {
        self.maintenance = on;
        self
    }

    /// Whether a heap that no maintenance thread serves gives idle memory
    /// back from its own slow paths (std, a heap over memory from the OS:
    /// `Heap::new` and the global heap; default on).
    ///
    /// Without a maintenance thread ([`maintenance(false)`](Self::maintenance),
    /// `ANYALLOC_MAINTENANCE=0`, or the C library's default) nothing else
    /// returns idle memory to the OS, and the resident memory of a program
    /// that freed a burst stayed at its peak. With `decay`, the
    /// normal-path calls that take a slow path anyway (a sheaf refill or
    /// flush, a page-block allocation or free beyond the per-CPU lists, a
    /// block above 4 MiB) count ticks per thread; every 64th tick reads the
    /// monotonic clock, and at most once per 100 ms one such call runs a
    /// bounded pass of the maintainer's give-back work: free blocks idle for
    /// half a second (below 256 KiB: two seconds) go back to the OS
    /// (`MADV_DONTNEED`, at most 16 MiB of large blocks and 64 small ones
    /// per zone and pass: about a millisecond in the call that runs it),
    /// freed mappings above 4 MiB kept for reuse are unmapped once unused
    /// for half a second, per-CPU caches and barns left unchanged for ten
    /// such passes give their objects back, and a zone's stock of large
    /// blocks for the nolock path that no nolock allocation used for ten
    /// passes goes back to the free lists (and from there to the OS). The
    /// fast paths do not tick,
    /// calls on the nolock path (and calls routed there: a signal handler
    /// that interrupted the allocator, a nolock scope) never run a pass.
    /// A pass takes the locks as the maintainer's does: its `madvise` calls
    /// run with only the maintenance and drain locks held, which no nolock
    /// call tries (the zone lock is let go around each), and flushing
    /// another CPU's idle cache holds that slot across a membarrier fence
    /// (a nolock call there finds it busy and goes elsewhere). Idle memory
    /// goes back only while the program keeps making calls that take a slow
    /// path: a program that frees a burst and then only sleeps, or only
    /// allocates and frees one small block at a time (which this CPU's
    /// cache serves on its fast path, for ever), keeps it resident (call
    /// `Heap::trim`, or run a maintainer).
    ///
    /// A heap with a maintenance thread never does this (the thread does
    /// the work; a heap whose thread starts later stops then), but its
    /// forked child does: the thread stayed in the parent. Off, the
    /// slow paths pay one load and a branch for it. `ANYALLOC_DECAY=0`
    /// turns it off for the global heap.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// // No thread and no give-back from the allocation calls: memory goes
    /// // back to the OS only when the program calls `maintain` or `trim`.
    /// let heap = Heap::new(Config::default().memory(16 << 20).maintenance(false).decay(false))
    ///     .unwrap();
    /// # let _ = heap;
    /// ```
    pub fn decay(mut self, on: bool) -> Self {
        self.decay = on;
        self
    }

    /// Whether the object fast path may use restartable sequences (std,
    /// x86-64 Linux with glibc's rseq registration; default on). Off, or
    /// where rseq is unavailable, every context uses the try-locked per-CPU
    /// slots instead. [`HeapStats::fast_path`](crate::HeapStats::fast_path)
    /// says which one a heap chose.
    ///
    /// On x86-64 glibc the fast paths still start a restartable sequence
    /// when this is off, which ends at once (it finds no CPU slots): that
    /// costs an allocator without rseq nothing and spares every one with
    /// rseq a test. So to single-step through allocations in a debugger (every
    /// step aborts a sequence), switch glibc's registration off instead:
    /// `GLIBC_TUNABLES=glibc.pthread.rseq=0`.
    ///
    /// ```
    /// use anyalloc::{Config, FastPath, Heap};
    /// let heap = Heap::new(Config::default().memory(16 << 20).rseq(false)).unwrap();
    /// assert_eq!(heap.stats().fast_path, FastPath::SlotLock);
    /// ```
    pub fn rseq(mut self, on: bool) -> Self {
        self.rseq = on;
        self
    }

    /// Whether the nolock path may make the two (non-blocking) system calls
    /// it otherwise makes (default on): waking the maintenance thread after
    /// parking memory on a deferred list (a `FUTEX_WAKE`, at most one per
    /// maintainer sleep), and waking a normal-path caller that waits for a
    /// lock the nolock call held (a `FUTEX_WAKE`, only when one waits).
    ///
    /// With `false` the nolock path makes no system call at all (for
    /// real-time threads that count them): nobody is woken; instead the
    /// maintainer polls its work every millisecond and a normal-path caller
    /// waiting for a lock re-checks it every 50 microseconds (a timed
    /// futex wait on its own thread, never woken by the nolock path). The
    /// normal path is unchanged otherwise.
    ///
    /// ```
    /// use anyalloc::{Config, Heap};
    /// use core::alloc::Layout;
    /// // For a real-time thread that counts its system calls.
    /// let heap = Heap::new(Config::default().memory(16 << 20).nolock_syscalls(false)).unwrap();
    /// let p = heap.alloc_nolock(Layout::new::<[u64; 4]>()).expect("memory to spare");
    /// // SAFETY: allocated above, freed once.
    /// unsafe { heap.free_nolock(p) };
    /// assert_eq!(heap.stats().objects_in_use, 0);
    /// ```
    pub fn nolock_syscalls(mut self, on: bool) -> Self {
        self.nolock_syscalls = on;
        self
    }

    /// The reserve held back for handlers' sake, in bytes per zone (rounded
    /// up to whole pages): the zone's *min watermark*. The nolock path (signal
    /// and interrupt handlers, real-time sections) never takes a zone's free
    /// pages below it, so what it refuses stays for the normal path, which
    /// dips into the reserve only as a last resort, after reclaim (the
    /// kernel's `ALLOC_NO_WATERMARKS`); twice the reserve is the low mark
    /// below which the maintainer runs shrinkers. Default: about 1/256 of
    /// each zone, between 16 KiB and 16 MiB. At most half of
    /// [`memory`](Self::memory) (and of a `from_region` zone; a zone added
    /// by growth, which a limit on address space may make smaller, keeps
    /// at most half of its own pages); 0 lets handlers take the last page.
    ///
    /// A larger reserve keeps memory for the normal path when handlers
    /// allocate heavily (they fail sooner); a smaller one lets handlers use
    /// more of the zone:
    ///
    /// ```
    /// use anyalloc::{Config, Error, PageAllocator};
    /// let pages = PageAllocator::new(
    ///     Config::default().memory(16 << 20).grow(false).min_reserve(6 << 20),
    /// )
    /// .unwrap();
    /// // 16 MiB, 6 MiB of it held back: handlers get two 4 MiB blocks, not three.
    /// let a = pages.alloc_pages_nolock(10).expect("above the reserve");
    /// let b = pages.alloc_pages_nolock(10).expect("above the reserve");
    /// let c = pages.alloc_pages_nolock(10);
    /// assert!(c.is_none(), "the third one would dip into the reserve");
    /// // The normal path may still use it (after reclaim found nothing).
    /// let d = pages.alloc_pages(10).expect("the normal path reaches the reserve");
    /// unsafe {
    ///     pages.free_pages_nolock(a, 10);
    ///     pages.free_pages_nolock(b, 10);
    ///     pages.free_pages(d, 10);
    /// }
    ///
    /// let bad = PageAllocator::new(Config::default().memory(16 << 20).min_reserve(9 << 20));
    /// assert!(matches!(bad, Err(Error::Config { setting: "Config::min_reserve", .. })));
    /// ```
    pub fn min_reserve(mut self, bytes: usize) -> Self {
        self.min_reserve = Some(bytes);
        self
    }

    /// The configured first-zone size in bytes.
    ///
    /// ```
    /// use anyalloc::Config;
    /// assert_eq!(Config::default().memory_bytes(), 64 << 20);
    /// assert_eq!(Config::default().memory(1 << 30).memory_bytes(), 1 << 30);
    /// ```
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.memory < MIN_MEMORY {
            return Err(Error::Config {
                setting: "Config::memory",
                value: self.memory,
                reason: "too little memory: at least 65536 bytes (16 pages) are needed",
            });
        }
        if self.memory > MAX_MEMORY {
            return Err(Error::Config {
                setting: "Config::memory",
                value: self.memory,
                reason: "too much memory: at most 17592181850112 bytes (16 TiB - 4 MiB, \
                         2^32 - 2^10 pages: a zone's page indices are 32-bit) per zone",
            });
        }
        self.validate_cpus()?;
        if let Some(r) = self.min_reserve {
            if r > self.memory / 2 {
                return Err(Error::Config {
                    setting: "Config::min_reserve",
                    value: r,
                    reason: "the reserve may be at most half of Config::memory",
                });
            }
        }
        Ok(())
    }

    /// The CPU setting's own checks (every constructor, `from_region`'s
    /// too): at least one, at most [`MAX_CPUS`].
    pub(crate) fn validate_cpus(&self) -> Result<(), Error> {
        match self.cpus {
            Some(0) => Err(Error::Config {
                setting: "Config::cpus",
                value: 0,
                reason: "at least one CPU is needed",
            }),
            Some(n) if n > MAX_CPUS => Err(Error::Config {
                setting: "Config::cpus",
                value: n,
                reason: "at most 4096 CPUs are supported",
            }),
            _ => Ok(()),
        }
    }

    /// The slot sets a `from_region` allocator gets: `Config::cpus`, else
    /// the platform's count (0 taken as 1). Errors on a bad setting, and on
    /// a platform count above [`MAX_CPUS`] (per-CPU metadata of that size
    /// would not fit any region, and its size could overflow).
    pub(crate) fn region_cpus(&self, platform: &dyn crate::Platform) -> Result<usize, Error> {
        self.validate_cpus()?;
        if let Some(n) = self.cpus {
            return Ok(n);
        }
        match platform.cpu_count() {
            n if n > MAX_CPUS => Err(Error::Config {
                setting: "Platform::cpu_count",
                value: n,
                reason: "at most 4096 CPUs are supported (set Config::cpus to use fewer)",
            }),
            n => Ok(n.max(1)),
        }
    }
}

/// The most CPUs (slot sets) an allocator supports.
pub const MAX_CPUS: usize = 4096;

/// Why an allocator could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A setting has a value the allocator cannot work with.
    Config {
        /// The setting, e.g. `"Config::memory"`.
        setting: &'static str,
        /// The value it had.
        value: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The OS refused to reserve the memory (mmap failed): a zone (its
    /// size is `Config::memory`) or a heap's metadata, whose address space
    /// grows with `Config::cpus` (about 0.5 MiB per CPU).
    Reserve {
        /// How many bytes were asked for.
        bytes: usize,
    },
    /// The region handed to a `no_std` constructor cannot hold a zone.
    Region {
        /// The region's length in bytes.
        len: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config {
                setting,
                value,
                reason,
            } => write!(f, "invalid {setting} = {value}: {reason}"),
            Error::Reserve { bytes } => write!(
                f,
                "the OS refused to reserve {bytes} bytes of address space (mmap failed): \
                 a zone is Config::memory, a heap's metadata grows with Config::cpus \
                 (about 0.5 MiB per CPU)"
            ),
            Error::Region { len, reason } => {
                write!(f, "unusable memory region of {len} bytes: {reason}")
            }
        }
    }
}

#[cfg(feature = "std")]
extern crate std;
#[cfg(feature = "std")]
impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest zone the 32-bit page indices number is accepted; one
    /// byte more is refused, naming the limit (validation only: a zone of
    /// that size would write a descriptor per 4 MiB block, gigabytes).
    #[test]
    fn memory_up_to_the_index_limit_validates() {
        assert_eq!(MAX_MEMORY / crate::PAGE_SIZE, crate::page::MAX_ZONE_PAGES);
        assert!(crate::page::MAX_ZONE_PAGES < crate::page::NIL as usize);
        assert_eq!(crate::page::MAX_ZONE_PAGES % (1 << crate::MAX_ORDER), 0);
        assert_eq!(Config::default().memory(MAX_MEMORY).validate(), Ok(()));
        let e = Config::default().memory(MAX_MEMORY + 1).validate();
        assert!(
            matches!(e, Err(Error::Config { setting: "Config::memory", value, .. }) if value == MAX_MEMORY + 1),
            "{e:?}"
        );
    }
}
