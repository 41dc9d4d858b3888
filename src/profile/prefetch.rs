//! Prefetch: fetches a profile's chunks in deadline order ahead of the guest, through the same
//! miss path (single flight, verification, store) at low priority.
//!
//! Priority: guest misses never wait behind prefetch for an upstream slot. Prefetch keeps at most
//! `concurrency` runs in flight and takes an upstream slot only when no guest fetch is waiting
//! for one ([`crate::fetch::flight::Priority`]). With peers the `Fetcher` holds no slots and the
//! peer-aware source's origin slots apply the same rule to each origin read. Chunks already
//! present are skipped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use std::ops::Range;

use super::format::{Entry, Profile};
use crate::fetch::flight::{Fetcher, Priority};
use crate::store::ChunkStore;

/// Progress of one prefetch job, shared with `vmt-prefetch` through the status.
#[derive(Debug, Default)]
pub struct Job {
    pub total_chunks: AtomicU64,
    pub done_chunks: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub cancelled: AtomicBool,
    pub finished: AtomicBool,
    pub error: Mutex<Option<String>>,
}

impl Job {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

/// The runs a prefetch of `entries` (a profile's, in deadline order) fetches, in order: chunks
/// adjacent in the image and consecutive in deadline order, at most `max` per run. Pure: `vmt sim`
/// prefetches with it too.
pub fn prefetch_runs(entries: &[Entry], max: u32) -> Vec<Range<u32>> {
    let max = max.max(1) as usize;
    let mut runs: Vec<Range<u32>> = Vec::new();
    for e in entries {
        match runs.last_mut() {
            Some(r) if r.end == e.chunk && r.len() < max => r.end += 1,
            _ => runs.push(e.chunk..e.chunk.saturating_add(1)),
        }
    }
    runs
}

/// Runs prefetch of `profile` until done, cancelled or failed.
pub async fn run(
    fetcher: Arc<Fetcher>,
    store: Arc<ChunkStore>,
    profile: Arc<Profile>,
    rate: Option<u64>,
    concurrency: usize,
    job: Arc<Job>,
) {
    let runs = prefetch_runs(&profile.entries, fetcher.max_chunks());
    job.total_chunks.store(profile.entries.len() as u64, Ordering::SeqCst);
    let start = Instant::now();
    let chunk_size = store.geometry().chunk_size().bytes();
    let mut tasks = JoinSet::new();
    let mut failure = None;
    for run in runs {
        if job.cancelled.load(Ordering::SeqCst) || failure.is_some() {
            break;
        }
        if store.has_all(run.clone()) {
            job.done_chunks.fetch_add(run.len() as u64, Ordering::Relaxed);
            continue;
        }
        while tasks.len() >= concurrency {
            if let Some(Ok(Err(e))) = tasks.join_next().await {
                failure.get_or_insert(e);
            }
        }
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = start + Duration::from_secs_f64(job.fetched_bytes.load(Ordering::Relaxed) as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let (f, j, n) = (fetcher.clone(), job.clone(), run.len() as u64);
        job.fetched_bytes.fetch_add(n * chunk_size, Ordering::Relaxed);
        let s = store.clone();
        tasks.spawn(async move {
            let r = f.ensure_with(run.clone(), Priority::Prefetch).await.map(|_| ()).map_err(|e| e.to_string());
            // Readers get fetched bytes before they are written; a warmed chunk counts as done
            // once it is in the node cache.
            let deadline = Instant::now() + Duration::from_secs(30);
            while r.is_ok() && !s.has_all(run.clone()) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            j.done_chunks.fetch_add(n, Ordering::Relaxed);
            r
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            failure.get_or_insert(e);
        }
    }
    if let Some(e) = failure {
        *job.error.lock().unwrap() = Some(e);
    }
    job.finished.store(true, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(chunk: u32) -> Entry {
        Entry { chunk, deadline_ms: 0, count: 1, misses: 0 }
    }

    #[test]
    fn runs_follow_deadline_order_and_adjacency() {
        let entries: Vec<Entry> = [5, 6, 7, 1, 2, 9].into_iter().map(e).collect();
        assert_eq!(prefetch_runs(&entries, 2), vec![5..7, 7..8, 1..3, 9..10]);
        assert_eq!(prefetch_runs(&entries, 16), vec![5..8, 1..3, 9..10]);
    }
}
