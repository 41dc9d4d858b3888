//! A warning logged at most once per [`WARN_EVERY`]: a condition that holds for a while (a full
//! disk, a spent budget, a node at its connection cap) must not flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest time between two warnings of one kind.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// When a warning of one kind was last logged.
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

#[cfg(test)]
mod tests {
    #[test]
    fn lets_one_warning_through() {
        let t = super::Throttle::new();
        assert!(t.due());
        assert!(!t.due());
    }
}
