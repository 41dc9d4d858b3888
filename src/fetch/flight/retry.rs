//! The upstream read of one run, retried: a failing source is asked again with exponential
//! backoff until the fetch budget (`FetchTuning::timeout`) is spent, and every attempt is bounded
//! by that deadline; a source smaller than the manifest says is not retried.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{FetchError, Fetcher, Priority, FIRST_BACKOFF, MAX_BACKOFF};
use crate::fetch::{Progress, SourceError};

impl Fetcher {
    pub(super) async fn read_with_retries(
        &self,
        offset: u64,
        len: usize,
        priority: Priority,
        progress: Progress<'_>,
    ) -> Result<(Vec<u8>, bool), FetchError> {
        let start = Instant::now();
        let deadline = start + self.tuning.timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::from("no attempt finished in time");
        loop {
            let attempt = async {
                self.stats.upstream_reads.fetch_add(1, Ordering::Relaxed);
                // Observed when the attempt ends, also by the deadline (the guard drops then).
                let _timer = (!self.source.waits_on_peers()).then(|| self.stats.origin_latency.timer());
                self.source.read_streaming(offset, len, priority, progress).await
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok((data, checked))) if data.len() == len => return Ok((data, checked)),
                Ok(Ok((data, _))) => last = format!("short read: {} of {len} bytes", data.len()),
                Ok(Err(e @ SourceError::OutOfRange { .. })) => {
                    // Retrying cannot fix a source smaller than the manifest says.
                    return Err(self.gave_up(start, e.to_string()));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => return Err(self.gave_up(start, last)),
            }
            if Instant::now() + backoff >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(self.gave_up(start, last));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %self.source.describe(), offset, len, error = %last, "upstream read failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn gave_up(&self, start: Instant, last: String) -> FetchError {
        self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
        FetchError::GaveUp { what: self.source.describe(), secs: start.elapsed().as_secs_f64(), last }
    }
}
