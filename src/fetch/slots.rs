//! Upstream slots with two classes: urgent reads (a guest waiting now, or a peer relaying for
//! one) and background reads (prefetch). Invariant: for [`PATIENCE`] a background read takes
//! only a free slot while no urgent read waits, and never queues on the semaphore, so a released
//! slot goes to a waiting urgent read; past it, it queues like an urgent read, so a prefetch run
//! a guest read may have joined cannot starve into its fetch's timeout. Used by the `Fetcher` (slots held until a run is stored) and
//! by the peer-aware source (slots held around each origin read).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// How often a background read looks for a free slot: polling keeps the urgent path free of any
/// hand-off to background reads.
const POLL: Duration = Duration::from_millis(2);
/// A background read that has waited this long queues as an urgent one: under sustained urgent
/// load it is late but never starved into its fetch's timeout (a guest read may have joined it).
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A bounded set of slots; see the module doc.
#[derive(Debug)]
pub struct Slots {
    sem: Semaphore,
    urgent_waiting: AtomicUsize,
}

/// Counts an urgent read as waiting for as long as it exists (also if its future is dropped
/// mid-wait: a leaked count would hold background reads back for good).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots { sem: Semaphore::new(n.max(1)), urgent_waiting: AtomicUsize::new(0) }
    }

    /// A slot for an urgent read: a free one at once, else the next one released (urgent reads
    /// are served in arrival order).
    pub async fn urgent(&self) -> SemaphorePermit<'_> {
        if let Ok(p) = self.sem.try_acquire() {
            return p;
        }
        self.urgent_waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.urgent_waiting);
        self.sem.acquire().await.expect("semaphore never closed")
    }

    /// A slot for a background read: only a free one while no urgent read waits, for at most
    /// [`PATIENCE`]; then the next one released, in turn with the urgent reads.
    pub async fn background(&self) -> SemaphorePermit<'_> {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        while tokio::time::Instant::now() < give_up {
            if self.urgent_waiting.load(Ordering::SeqCst) == 0 {
                if let Ok(p) = self.sem.try_acquire() {
                    return p;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        self.urgent().await
    }

    /// Urgent reads waiting for a slot now.
    pub fn urgent_waiting(&self) -> usize {
        self.urgent_waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_waiting_urgent_read_gets_the_next_slot_before_background_reads() {
        let slots = Arc::new(Slots::new(2));
        let a = slots.urgent().await;
        let b = slots.background().await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (s, o) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = s.background().await;
                o.lock().unwrap().push(format!("background {i}"));
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (s, o) = (slots.clone(), order.clone());
        let urgent = tokio::spawn(async move {
            let _p = s.urgent().await;
            o.lock().unwrap().push("urgent".to_string());
        });
        while slots.urgent_waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(b);
        urgent.await.unwrap();
        drop(a);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(order.lock().unwrap()[0], "urgent", "{:?}", order.lock().unwrap());
        assert_eq!(order.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_cancelled_urgent_wait_does_not_hold_background_reads_back() {
        let slots = Slots::new(1);
        let p = slots.urgent().await;
        let waited = tokio::time::timeout(Duration::from_millis(10), slots.urgent()).await;
        assert!(waited.is_err());
        assert_eq!(slots.urgent_waiting(), 0);
        drop(p);
        let got = tokio::time::timeout(Duration::from_secs(5), slots.background()).await;
        assert!(got.is_ok(), "background read got the free slot");
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_read_starved_for_its_patience_queues_with_the_urgent_ones() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.urgent().await;
        // An urgent read waits all along: the background read stands back, then queues.
        let s = slots.clone();
        let urgent = tokio::spawn(async move { drop(s.urgent().await) });
        while slots.urgent_waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let s = slots.clone();
        let background = tokio::spawn(async move { drop(s.background().await) });
        tokio::time::sleep(PATIENCE + Duration::from_millis(10)).await;
        assert_eq!(slots.urgent_waiting(), 2, "past its patience it queues");
        drop(held);
        urgent.await.unwrap();
        background.await.unwrap();
    }
}
