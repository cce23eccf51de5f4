//! Random numbers for storms.
//!
//! A thread keeps a [`XorShift`] of its own. A handler must not share one
//! with the code it interrupted, nor keep one in a plain static that a
//! nested handler could tear half-way through an update; it draws from an
//! atomic counter instead, `mix64(counter.fetch_add(1))` (one atomic
//! instruction), or seeds a local [`XorShift`] from such a draw. Both are
//! pure arithmetic: handler-safe.

/// splitmix64: the finaliser applied to `z` plus the golden-ratio
/// increment, so consecutive inputs give unrelated outputs. Handler-safe.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*: tiny, no allocation, good enough for workloads.
/// Handler-safe (a value owned by one context).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value: it is mixed, so 0, 1, 2... give
    /// unrelated sequences).
    #[inline]
    pub const fn new(seed: u64) -> Self {
        XorShift(mix64(seed) | 1)
    }

    /// The next value.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; multiply-shift, no division).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = XorShift::new(0);
        for n in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[r.below(7) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn nearby_seeds_and_inputs_differ() {
        assert_ne!(XorShift::new(1).next_u64(), XorShift::new(2).next_u64());
        assert_ne!(mix64(0), mix64(1));
        assert_ne!(mix64(0), 0);
    }
}
