//! A latency histogram cheap enough for every guest read: one bucket search over 18 bounds and
//! two relaxed atomic adds per observation, no lock. Buckets are fixed (Prometheus-style upper
//! bounds, 25 µs to 10 s, then +Inf), so snapshots of two moments subtract into the histogram
//! of the interval between them (`vmt top` shows p99 over its last refresh that way).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the finite buckets, in nanoseconds; a last bucket takes the rest (+Inf).
pub const BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// Observed durations by bucket, with their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now. Not one atomic moment: an observation racing the copy may show in its
    /// bucket and not yet in the sum, which no reader of a histogram can tell.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment (per bucket, not cumulative), as `vmt status` sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let before = |i: usize| earlier.counts.get(i).copied().unwrap_or(0);
        Snapshot {
            counts: self.counts.iter().enumerate().map(|(i, c)| c.saturating_sub(before(i))).collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// Adds `other`'s observations to these.
    pub fn add(&mut self, other: &Snapshot) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// The upper bound of the bucket holding quantile `q` (0 < q <= 1), `None` without
    /// observations; `Duration::MAX` when it lies beyond the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(BOUNDS_NS.get(i).map_or(Duration::MAX, |&ns| Duration::from_nanos(ns)));
            }
        }
        Some(Duration::MAX)
    }

    /// Cumulative `(upper bound in seconds, count)` pairs ending with +Inf, as the Prometheus
    /// exposition wants them.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut seen = 0;
        let mut out = Vec::with_capacity(BUCKETS);
        for i in 0..BUCKETS {
            seen += self.counts.get(i).copied().unwrap_or(0);
            let bound = BOUNDS_NS.get(i).map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
            out.push((bound, seen));
        }
        out
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_quantiles_and_intervals() {
        let h = Histogram::default();
        for us in [10, 25, 26, 900, 3_000] {
            h.observe(Duration::from_micros(us));
        }
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count(), 6);
        // 10 µs and exactly 25 µs go to the first bucket (bounds are inclusive).
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.quantile(0.5), Some(Duration::from_micros(50)));
        assert_eq!(s.quantile(0.66), Some(Duration::from_millis(1)));
        assert_eq!(s.quantile(1.0), Some(Duration::MAX));
        let c = s.cumulative();
        assert_eq!(c.last(), Some(&(f64::INFINITY, 6)));
        assert_eq!(c[0], (25e-6, 2));
        h.observe(Duration::from_millis(7));
        let later = h.snapshot().since(&s);
        assert_eq!(later.count(), 1);
        assert_eq!(later.quantile(0.99), Some(Duration::from_millis(10)));
        assert_eq!(Snapshot::default().quantile(0.99), None);
        let mut sum = s.clone();
        sum.add(&later);
        assert_eq!(sum, h.snapshot());
    }
}
