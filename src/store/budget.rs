//! The node's cache budget: how many bytes the caches of all images may hold (`[cache] max`),
//! with the high and low watermarks the collector works between.
//!
//! Writes are admitted against an estimate: the usage last measured from the data files'
//! allocated blocks, plus every byte admitted since. Past the high watermark the collector is
//! woken at once (not at its next tick); a write that would pass `max` is refused, and its chunk
//! is served from memory without being cached. So usage never passes `max` by more than the
//! writes in flight when the collector measured, and never passes it for long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::throttle::Throttle;

/// The budget's counters when a measurement began.
#[derive(Debug, Clone, Copy)]
pub struct Measuring {
    admitted: u64,
    unwritten: u64,
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
    /// Every byte ever admitted, and those admitted whose write has not finished: a
    /// measurement misses neither writes still in flight nor writes admitted while it ran.
    admitted: AtomicU64,
    unwritten: AtomicU64,
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
            admitted: AtomicU64::new(0),
            unwritten: AtomicU64::new(0),
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
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| u.checked_add(bytes).filter(|&n| n <= self.max))
            .is_ok();
        if !admitted {
            self.refused.fetch_add(bytes, Ordering::Relaxed);
            self.wake.notify_one();
            if self.warn.due() {
                tracing::warn!(
                    max = self.max,
                    used = self.used(),
                    unreachable = self.unreachable(),
                    "cache budget spent: serving reads without caching them until the collector frees space"
                );
            }
            return false;
        }
        self.admitted.fetch_add(bytes, Ordering::SeqCst);
        self.unwritten.fetch_add(bytes, Ordering::SeqCst);
        if self.used() > self.high {
            self.wake.notify_one();
        }
        true
    }

    /// The write of an admitted reservation finished (or failed).
    pub fn written(&self, bytes: u64) {
        let _ = self.unwritten.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(bytes)));
    }

    /// Returns bytes no longer held: a reservation whose write failed, or space freed.
    pub fn give_back(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(bytes)));
    }

    /// Taken just before measuring the data files, for [`Budget::measured`].
    pub fn before_measuring(&self) -> Measuring {
        Measuring { admitted: self.admitted.load(Ordering::SeqCst), unwritten: self.unwritten.load(Ordering::SeqCst) }
    }

    /// Replaces the estimate with a measurement of the data files, plus the writes in flight
    /// when it began and every write admitted since (some may be counted twice: the estimate
    /// errs high, never low).
    pub fn measured(&self, at: Measuring, bytes: u64) {
        let since = self.admitted.load(Ordering::SeqCst).saturating_sub(at.admitted);
        self.used.store(bytes + at.unwritten + since, Ordering::SeqCst);
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
        b.written(60);
        b.give_back(40);
        b.written(40);
        assert_eq!(b.used(), 60);
        b.measured(b.before_measuring(), 10);
        assert!(b.admit(90));
        assert!(!b.admit(u64::MAX));
    }

    #[test]
    fn a_measurement_counts_writes_in_flight_and_admitted_meanwhile() {
        let b = Budget::new(1000, 800, 600);
        assert!(b.admit(100)); // in flight: not in the files yet
        let at = b.before_measuring();
        assert!(b.admit(50)); // admitted while measuring
        b.measured(at, 300);
        assert_eq!(b.used(), 450);
        b.written(150);
        b.measured(b.before_measuring(), 450);
        assert_eq!(b.used(), 450);
    }
}
