//! This process's memory mappings, read from `/proc/self/maps`, for tests
//! that check what a heap maps and unmaps.

/// Every mapping of this process as `(start, end)`, end exclusive.
pub fn mappings() -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            )
        })
        .collect()
}
