//! The context checker: normal-path functions called where only the nolock
//! path is allowed (see `global::nolock_scope`) abort in debug builds.
//!
//! Without std (or in release builds) this compiles to nothing.

/// Called on entry of every normal-path function with its name.
#[inline(always)]
pub(crate) fn might_wait(function: &'static str) {
    #[cfg(all(feature = "std", any(debug_assertions, feature = "debug-checks")))]
    crate::global::check_might_wait(function);
    #[cfg(not(all(feature = "std", any(debug_assertions, feature = "debug-checks"))))]
    let _ = function;
}
