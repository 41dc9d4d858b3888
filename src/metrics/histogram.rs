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
    /// Observes the time from now until the returned guard is dropped: also when the future
    /// holding it is cancelled (a timed-out read still counts, with the time it took).
    pub fn timer(&self) -> Timer<'_> {
        Timer { histogram: self, start: std::time::Instant::now() }
    }

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

/// See [`Histogram::timer`].
pub struct Timer<'a> {
    histogram: &'a Histogram,
    start: std::time::Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed());
    }
}

/// A histogram's counts at one moment (per bucket, not cumulative), as `vmt status` sends them.
/// Every method is total on any value (sums saturate, missing buckets count 0, extra ones are
/// beyond the last bound), since one may come from another process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.saturating_add(c))
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
            *a = a.saturating_add(*b);
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The upper bound of the bucket holding quantile `q` (0 < q <= 1), `None` without
    /// observations; `Duration::MAX` when it lies beyond the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return Some(BOUNDS_NS.get(i).map_or(Duration::MAX, |&ns| Duration::from_nanos(ns)));
            }
        }
        Some(Duration::MAX)
    }

    /// `(upper bound in seconds, count)` per bucket, not cumulative, ending with +Inf: what
    /// prometheus-client's encoder takes (it accumulates them itself).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        (0..BUCKETS)
            .map(|i| {
                let bound = BOUNDS_NS.get(i).map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                let extra: u64 = if i == BUCKETS - 1 {
                    self.counts.iter().skip(BUCKETS).fold(0, |a, &c| a.saturating_add(c))
                } else {
                    0
                };
                (bound, self.counts.get(i).copied().unwrap_or(0).saturating_add(extra))
            })
            .collect()
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
        let b = s.buckets();
        assert_eq!(b.len(), BOUNDS_NS.len() + 1);
        assert_eq!(b.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(b[0], (25e-6, 2));
        assert_eq!(b.iter().map(|(_, c)| c).sum::<u64>(), 6);
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
