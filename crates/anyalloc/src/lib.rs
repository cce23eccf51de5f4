//! # anyalloc: memory from any context
//!
//! A page allocator and an object allocator, each with two paths:
//!
//! * the **normal path**, which may wait for a lock and may reclaim;
//! * the **nolock path**, which takes no lock it could wait on (only
//!   `try_lock`s and atomics), so it can be called from *any* context: a
//!   signal handler that interrupted the same thread inside the allocator, a
//!   real-time thread, an interrupt handler in a `no_std` kernel. It never
//!   deadlocks and never blocks; it may fail (`None`).
//!
//! Frees never fail: a nolock free that cannot take a lock parks the memory on
//! a lock-free list, drained by the next normal-path operation.
//!
//! The design follows the Linux kernel's `alloc_pages_nolock` /
//! `kmalloc_nolock` work; see `docs/DESIGN.md` in the repository.
//!
//! ## Layers
//!
//! * `context` (internal): the per-thread route word. A thread holding (or
//!   acquiring) a lock others may wait on is marked "inside the allocator";
//!   every normal-path entry of such a thread, or of one in a
//!   `nolock_scope` (std), takes the nolock path, so
//!   no thread ever waits for itself.
//! * [`sync`]: the try-only slot lock, the zone lock, the lock-free stacks.
//! * [`platform`]: what the allocator needs from its environment.
//! * [`page`]: the buddy page allocator with per-CPU lists ([`PageAllocator`]).
//! * [`slab`]: the object allocator: size classes, sheaves, slabs ([`Heap`]).
//! * [`account`]: hierarchical accounting groups with limits ([`Group`]).
//!
//! ```
//! use anyalloc::{Config, PageAllocator};
//! let pages = PageAllocator::new(Config::default().memory(4 << 20)).unwrap();
//! let p = pages.alloc_pages_nolock(0).expect("memory to spare");
//! unsafe { pages.free_pages_nolock(p, 0) };
//! ```

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

/// Calls the interrupt-point hook at a critical section (feature
/// `interrupt-points`); nothing otherwise.
macro_rules! interrupt_point {
    ($site:ident) => {
        #[cfg(feature = "interrupt-points")]
        $crate::interrupt::point($crate::interrupt::Site::$site);
    };
}
pub(crate) use interrupt_point;

/// An internal consistency check for code that may run on the nolock path
/// (debug builds only, like `debug_assert!`): when `cond` is false, writes
/// the one line `anyalloc: internal error: <what>` and aborts, without
/// formatting or panicking (std's panic machinery allocates and formats,
/// which no context that interrupted the allocator may do).
/// `check!(always: cond, what)` checks in every build, for conditions
/// checked once (at set-up), not on a fast path.
macro_rules! check {
    (always: $cond:expr, $what:literal) => {
        if !$cond {
            $crate::platform::die(concat!("anyalloc: internal error: ", $what, "\n").as_bytes());
        }
    };
    ($cond:expr, $what:literal) => {
        if cfg!(debug_assertions) && !$cond {
            $crate::platform::die(concat!("anyalloc: internal error: ", $what, "\n").as_bytes());
        }
    };
}
pub(crate) use check;

pub mod account;
mod config;
mod context;
#[cfg(feature = "std")]
mod fork;
#[cfg(feature = "std")]
mod global;
mod idle;
#[cfg(feature = "interrupt-points")]
pub mod interrupt;
#[cfg(feature = "std")]
mod maintain;
pub mod page;
pub mod platform;
pub mod slab;
pub mod sync;

pub use account::Group;
pub use config::{Config, Error, MAX_CPUS, MAX_MEMORY, MIN_MEMORY};
#[cfg(feature = "std")]
#[doc(hidden)]
pub use global::{env_flag, init_without_maintainer, register_fork_handlers};
#[cfg(feature = "std")]
pub use global::{global_heap, in_nolock_scope, init, nolock_scope, Global, NoLock, NoLockScope};
pub use page::{FastPath, PageAllocator, PageStats};
pub use platform::Platform;
#[cfg(feature = "std")]
pub use platform::StdPlatform;
pub use slab::{ClassStats, Heap, HeapStats};

/// The optional checks compiled into this build of the crate: any of
/// `"debug-checks"` and `"interrupt-points"` (the features) and `"debug
/// assertions"`; empty for a release build with neither feature. Each one
/// slows the paths it checks (`debug-checks` searches for every double free,
/// several times the cost of a small free), so a report that measures the
/// allocator should say which were in: note that `cargo test --workspace
/// --all-features` rebuilds the workspace's binaries with all of them.
///
/// ```
/// if !anyalloc::BUILD_CHECKS.is_empty() {
///     eprintln!("note: anyalloc built with {}", anyalloc::BUILD_CHECKS.join(", "));
/// }
/// ```
pub const BUILD_CHECKS: &[&str] = &[
    #[cfg(feature = "debug-checks")]
    "debug-checks",
    #[cfg(feature = "interrupt-points")]
    "interrupt-points",
    #[cfg(debug_assertions)]
    "debug assertions",
];

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
pub(crate) const PAGE_SHIFT: u32 = 12;
/// The largest order: blocks of `2^10` pages (4 MiB), aligned to their size.
/// Both paths serve every order up to it: the nolock path takes orders up to
/// [`PCP_MAX_ORDER`] from the per-CPU lists, larger ones from the buddy lists
/// under a *tried* zone lock.
pub const MAX_ORDER: u32 = 10;
/// The highest order kept on per-CPU page lists (32 KiB, the kernel's
/// costly order): blocks up to it are cached per CPU and context level.
pub const PCP_MAX_ORDER: u32 = 3;
/// The highest order the nolock path serves: [`MAX_ORDER`], as for the
/// normal path (it was 3, the per-CPU lists' limit, before the nolock path
/// served every order; that limit is [`PCP_MAX_ORDER`]). A nolock request
/// above it gets `None`.
#[deprecated(note = "equals MAX_ORDER, the nolock path's limit now; \
                     the per-CPU list limit is PCP_MAX_ORDER")]
pub const NOLOCK_MAX_ORDER: u32 = MAX_ORDER;
