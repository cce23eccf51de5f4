//! A lock-free log-linear latency histogram that signal handlers can record
//! into: a fixed array of `AtomicU64` buckets, no allocation, no lock.
//!
//! Values below `2^SUB_BITS` get a bucket each; above that every power of
//! two is split into `2^SUB_BITS` linear sub-buckets, so a bucket's width is
//! at most 1/32 (about 3%) of its values.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Enough buckets for every `u64`.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// The histogram. `const`-constructible, so it can be a `static`.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

/// Percentiles of a histogram, in the unit recorded (nanoseconds here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub mean: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[inline]
fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    (e - SUB_BITS + 1) as usize * SUB + sub
}

/// The largest value that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let e = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = (i % SUB) as u64;
    let low = (1u64 << e) | (sub << (e - SUB_BITS));
    low.saturating_add((1u64 << (e - SUB_BITS)) - 1)
}

impl Histogram {
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO: AtomicU64 = AtomicU64::new(0);

    pub const fn new() -> Self {
        Histogram {
            buckets: [Self::ZERO; BUCKETS],
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Records one value: a few relaxed atomic adds; async-signal-safe.
    #[inline]
    pub fn record(&self, v: u64) {
        self.buckets[index(v)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    /// Percentiles from the buckets (each reported as its bucket's upper
    /// bound, capped at the exact maximum). No allocation.
    pub fn summary(&self) -> Summary {
        let mut counts = [0u64; BUCKETS];
        let mut total = 0u64;
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            *c = b.load(Relaxed);
            total += *c;
        }
        let max = self.max.load(Relaxed);
        if total == 0 {
            return Summary::default();
        }
        let at = |q_per_mille: u64| -> u64 {
            // The smallest value with at least q of the samples at or below.
            let rank = (total * q_per_mille).div_ceil(1000).max(1);
            let mut seen = 0;
            for (i, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper(i).min(max);
                }
            }
            max
        };
        Summary {
            count: total,
            mean: self.sum.load(Relaxed) / self.count.load(Relaxed).max(1),
            p50: at(500),
            p99: at(990),
            p999: at(999),
            max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i >= last, "index not monotonic at {v}");
            assert!(i < BUCKETS);
            assert!(upper(i) >= v, "upper({i}) = {} < {v}", upper(i));
            if v >= SUB as u64 {
                // Bucket width at most 1/32 of the value.
                assert!(upper(i) - v <= v / SUB as u64, "bucket too wide at {v}");
            }
            last = i;
        }
    }

    #[test]
    fn percentiles() {
        let h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max, 1000);
        assert!((500..=516).contains(&s.p50), "{s:?}");
        assert!((990..=1000).contains(&s.p99), "{s:?}");
        assert!((999..=1000).contains(&s.p999), "{s:?}");
        assert_eq!(s.mean, 500);
        assert_eq!(Histogram::new().summary(), Summary::default());
    }
}
