//! The simulator's only source of randomness: a seeded generator, so that a run is the same
//! for the same seed and parameters, and what is drawn with it.

/// A deterministic generator (splitmix64): the simulator's only source of randomness.
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5EED_5EED_5EED_5EED)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `k` distinct nodes of `0..n`, chosen by `rng`.
pub(super) fn pick(rng: &mut Rng, n: u32, k: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..n).collect();
    let k = k.min(all.len());
    for j in 0..k {
        let r = j + (rng.next() % (all.len() - j) as u64) as usize;
        all.swap(j, r);
    }
    all.truncate(k);
    all
}
