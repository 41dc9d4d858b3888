//! Records a boot: each chunk's first touch (order and milliseconds after the first guest read)
//! on one image's export, until stopped.
//!
//! The read path pays one relaxed atomic load when no recording runs; while one runs, a short
//! uncontended lock per read and nothing per chunk already seen (bitmap check).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use roaring::RoaringBitmap;

/// What a stopped recording yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// (chunk, ms after the first read), in first-touch order.
    pub touches: Vec<(u32, u32)>,
    /// The domain whose boot this was, when the hook started the recording.
    pub domain: Option<String>,
}

struct Recording {
    id: u64,
    first_read: Option<Instant>,
    seen: RoaringBitmap,
    touches: Vec<(u32, u32)>,
    domain: Option<String>,
}

/// The recorder of one image.
#[derive(Default)]
pub struct Recorder {
    active: AtomicBool,
    next_id: AtomicU64,
    inner: Mutex<Option<Recording>>,
}

impl Recorder {
    /// Starts a recording; returns its id, or `None` when one is already running.
    pub fn start(&self, domain: Option<String>) -> Option<u64> {
        let mut inner = self.inner.lock().unwrap();
        if inner.is_some() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        *inner = Some(Recording { id, first_read: None, seen: RoaringBitmap::new(), touches: Vec::new(), domain });
        self.active.store(true, Ordering::Release);
        Some(id)
    }

    /// Notes a guest read of chunks `range`.
    pub fn note(&self, range: Range<u32>) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        let Some(r) = inner.as_mut() else { return };
        let now = Instant::now();
        let first = *r.first_read.get_or_insert(now);
        let ms = now.duration_since(first).as_millis().min(u128::from(u32::MAX)) as u32;
        for c in range {
            if r.seen.insert(c) {
                r.touches.push((c, ms));
            }
        }
    }

    /// Stops the running recording (only if it is `id`, when given) and returns what it saw.
    pub fn stop(&self, id: Option<u64>) -> Option<Recorded> {
        let mut inner = self.inner.lock().unwrap();
        if id.is_some_and(|id| inner.as_ref().is_some_and(|r| r.id != id)) {
            return None;
        }
        let r = inner.take()?;
        self.active.store(false, Ordering::Release);
        Some(Recorded { touches: r.touches, domain: r.domain })
    }

    /// The domain of the running recording, if any (`Some(None)`: running, started by hand).
    pub fn running(&self) -> Option<Option<String>> {
        self.inner.lock().unwrap().as_ref().map(|r| r.domain.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touch_only_while_running() {
        let r = Recorder::default();
        r.note(0..3);
        let id = r.start(Some("vm".into())).unwrap();
        assert!(r.start(None).is_none(), "one recording at a time");
        r.note(4..6);
        r.note(5..7);
        assert_eq!(r.stop(Some(id + 1)), None, "a stale timer does not stop a newer recording");
        let got = r.stop(Some(id)).unwrap();
        assert_eq!(got.touches.iter().map(|t| t.0).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(got.domain.as_deref(), Some("vm"));
        r.note(9..10);
        assert!(r.stop(None).is_none());
    }
}
