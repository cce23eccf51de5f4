//! What `/proc/self` says of this process's memory, for the tests that
//! measure it: resident and mapped bytes (`statm`, counted in 4 KiB pages
//! on the machines the tests run on) and the `status` fields in kB
//! (`VmSize`, `VmRSS`, `VmHWM`).

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

/// Field `n` of `/proc/self/statm`, in pages.
fn statm_pages(n: usize) -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    statm
        .split_whitespace()
        .nth(n)
        .and_then(|f| f.parse().ok())
        .expect("a statm field")
}

/// Resident bytes now (`statm`'s second field).
pub fn rss_bytes() -> usize {
    statm_pages(1) * 4096
}

/// Bytes of address space in use now (`statm`'s first field).
pub fn mapped_bytes() -> usize {
    statm_pages(0) * 4096
}

/// The `/proc/self/status` field named `key` (with its colon: `"VmHWM:"`),
/// in kB.
pub fn status_kib(key: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in /proc/self/status"));
    line[key.len()..]
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("a number of kB")
}
