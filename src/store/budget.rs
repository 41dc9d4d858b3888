//! The node's cache budget: how many bytes the caches of all images may hold (`[cache] max`),
//! with the high and low watermarks the collector works between.
//!
//! Writes are admitted against an estimate: the usage last measured from the data files'
//! allocated blocks, plus every byte admitted since. Past the high watermark the collector is
//! woken at once (not at its next tick); a write that would pass `max` is refused, and its chunk
//! is served from memory without being cached. So usage never passes `max` by more than the
//! writes in flight when the collector measured, and never passes it for long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Shortest time between two warnings of one kind: a full cache must not flood the log.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A warning that is logged at most once per [`WARN_EVERY`].
#[derive(Debug, Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle { last: Mutex::new(None) }
    }

    /// True when the warning should be logged now (and then not again for a while).
    pub fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap();
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The byte budget shared by every image's cache on the node.
#[derive(Debug)]
pub struct Budget {
    /// Never held past this (beyond writes in flight at a measurement).
    pub max: u64,
    /// The collector starts here...
    pub high: u64,
    /// ...and stops here.
    pub low: u64,
    used: AtomicU64,
    /// Bytes refused because the budget was spent.
    refused: AtomicU64,
    /// Set by the collector when it could not get under `high`: everything left is pinned,
    /// held or in use.
    unreachable: AtomicBool,
    wake: Notify,
    warn: Throttle,
}

impl Budget {
    pub fn new(max: u64, high: u64, low: u64) -> Self {
        Budget {
            max,
            high,
            low,
            used: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unreachable: AtomicBool::new(false),
            wake: Notify::new(),
            warn: Throttle::default(),
        }
    }

    /// Reserves `bytes` for a write; false (and counted) when that would pass `max`.
    pub fn admit(&self, bytes: u64) -> bool {
        let admitted = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.max)
            })
            .is_ok();
        if !admitted {
            self.refused.fetch_add(bytes, Ordering::Relaxed);
            self.wake.notify_one();
            if self.warn.due() {
                tracing::warn!(max = self.max, used = self.used(), unreachable = self.unreachable(),
                    "cache budget spent: serving reads without caching them until the collector frees space");
            }
            return false;
        }
        if self.used() > self.high {
            self.wake.notify_one();
        }
        true
    }

    /// Returns a reservation whose write did not happen.
    pub fn give_back(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(bytes)));
    }

    /// Replaces the estimate with a measurement of the data files.
    pub fn measured(&self, bytes: u64) {
        self.used.store(bytes, Ordering::SeqCst);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    pub fn refused_bytes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn set_unreachable(&self, v: bool) {
        self.unreachable.store(v, Ordering::SeqCst);
    }

    pub fn unreachable(&self) -> bool {
        self.unreachable.load(Ordering::SeqCst)
    }

    /// Wakes when usage passed the high watermark or a write was refused.
    pub async fn pressed(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_max_and_counts_the_rest() {
        let b = Budget::new(100, 80, 60);
        assert!(b.admit(60));
        assert!(b.admit(40));
        assert!(!b.admit(1));
        assert_eq!(b.refused_bytes(), 1);
        b.give_back(40);
        assert_eq!(b.used(), 60);
        b.measured(10);
        assert!(b.admit(90));
        assert!(!b.admit(u64::MAX));
    }

    #[test]
    fn throttle_lets_one_warning_through() {
        let t = Throttle::default();
        assert!(t.due());
        assert!(!t.due());
    }
}
