//! Replays a request trace against an NBD export, as the traced client (a booting guest) would
//! have issued it, and measures how long it takes.
//!
//! Replay semantics:
//!
//! - **Bursts.** The trace is cut into bursts: a request joins the burst of the request before
//!   it when it arrived less than [`BURST_WINDOW`] (1 ms) after it. Requests that close together
//!   were in flight together in the guest (readahead, a driver queueing several requests), so a
//!   burst's requests are sent at once, pipelined on one connection.
//! - **Closed loop.** A burst is sent only once every request of the burst before it has been
//!   answered, and then only after its *think time*: `scale` × the recorded gap between the last
//!   request of the previous burst and the first of this one. In the recording that gap is the
//!   guest's work between the two bursts plus the (short: the trace is recorded against a local
//!   origin) service time of the previous burst. Counting it from the completion of the previous
//!   burst models a boot in which each step depends on the data of the step before: a slow read
//!   delays everything after it, as it does in a real boot, and a fast server cannot run ahead of
//!   the guest. `scale` < 1 stands for a faster guest than the recorded one (a trace recorded
//!   under TCG replayed at 0.25 stands for a KVM-speed boot); 0 replays back to back.
//! - **Requests.** Reads are sent as NBD READs and count their bytes; each is bounded by the
//!   per-request timeout and counted as a read error when it fails or runs out (the replay then
//!   goes on: a boot with a failed read is still timed, and reported as failed). Flushes are sent
//!   as NBD FLUSHes (their failures count as read errors too). Writes are counted and skipped:
//!   a base image export is read-only, and a VM's writes go to its local overlay.
//!
//! The elapsed time runs from the moment the first burst is sent (after connecting) to the
//! answer of the last request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use tokio::task::JoinSet;

use super::trace::{Op, Row};
use crate::fetch::origin::{OriginError, OriginUrl};
use crate::fetch::{BoxFuture, ChunkSource, SourceError};
use crate::nbd::client::{NbdClient, NbdTarget};

/// Requests this close together (recorded arrival times) were in flight together.
pub const BURST_WINDOW: Duration = Duration::from_millis(1);

/// Errors that stop a replay before it starts.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("export {0:?}: give a unix socket path or nbd://HOST[:PORT]/NAME")]
    Export(String),
    #[error(transparent)]
    Url(#[from] OriginError),
    #[error("connecting to {what}: {source}")]
    Connect { what: String, source: SourceError },
    #[error("scale {0} must be a finite number, at least 0")]
    Scale(f64),
}

/// Where the replayed requests go: an NBD server on a unix socket or over TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportAddr {
    pub target: NbdTarget,
    pub name: String,
}

impl ExportAddr {
    /// Parses `nbd://HOST[:PORT]/NAME`, `nbd+unix:///NAME?socket=PATH`, or a socket path, whose
    /// export name is `name`, or else the socket's file stem (vmtd's `exports/NAME.sock`).
    pub fn parse(export: &str, name: Option<&str>) -> Result<Self, ReplayError> {
        if export.starts_with("nbd://") || export.starts_with("nbd+unix://") {
            let OriginUrl::Nbd { target, export: n } = OriginUrl::parse(export)? else {
                return Err(ReplayError::Export(export.into()));
            };
            return Ok(ExportAddr { target, name: name.map_or(n, str::to_string) });
        }
        if export.is_empty() || export.contains("://") {
            return Err(ReplayError::Export(export.into()));
        }
        let path = std::path::PathBuf::from(export);
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
        Ok(ExportAddr { target: NbdTarget::Unix(path), name: name.map_or(stem, str::to_string) })
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub elapsed_s: f64,
    /// Requests sent (reads and flushes).
    pub ops: u64,
    /// Bytes of the reads that succeeded.
    pub bytes: u64,
    /// Reads (and flushes) that failed or ran out of time.
    pub read_errors: u64,
    pub writes_skipped: u64,
    /// Time spent waiting for bursts to be answered: the elapsed time less the think times.
    pub waiting_s: f64,
    /// Median and 99th percentile of the requests' times from sending to answer, in ms.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// The first few failures, for the operator (not part of the JSON report).
    #[serde(skip)]
    pub first_errors: Vec<String>,
}

/// Failures kept in [`Report::first_errors`].
const KEEP_ERRORS: usize = 5;

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} requests in {:.3} s ({:.3} s waiting; latency p50 {:.2} ms, p99 {:.2} ms): {} bytes read, \
             {} read errors, {} writes skipped",
            self.ops,
            self.elapsed_s,
            self.waiting_s,
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.bytes,
            self.read_errors,
            self.writes_skipped
        )
    }
}

impl Report {
    fn failed(&mut self, error: String) {
        self.read_errors += 1;
        if self.first_errors.len() < KEEP_ERRORS {
            self.first_errors.push(error);
        }
    }
}

/// A group of requests sent together, after `think` has passed since the group before it was
/// answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Burst {
    pub think: Duration,
    pub rows: Vec<Row>,
}

/// Cuts `rows` into bursts (see the module doc); think times are scaled by `scale`.
pub fn plan(rows: &[Row], scale: f64) -> Result<Vec<Burst>, ReplayError> {
    if !scale.is_finite() || scale < 0.0 {
        return Err(ReplayError::Scale(scale));
    }
    let window = BURST_WINDOW.as_secs_f64();
    let mut bursts: Vec<Burst> = Vec::new();
    let mut last_t: Option<f64> = None;
    for row in rows {
        match (last_t, bursts.last_mut()) {
            (Some(t), Some(b)) if row.t_s - t < window => b.rows.push(*row),
            _ => {
                let gap = last_t.map_or(0.0, |t| (row.t_s - t).max(0.0));
                // A think time beyond any real boot's is a damaged trace; capping it keeps the
                // conversion below from panicking.
                let think = Duration::from_secs_f64((gap * scale).min(1e6));
                bursts.push(Burst { think, rows: vec![*row] });
            }
        }
        last_t = Some(row.t_s);
    }
    Ok(bursts)
}

/// The requests of `rows` (in trace order) recorded at or after `from` seconds: replaying from
/// there leaves out a leading phase, such as a kernel's start before its first disk read, that
/// every node spends idle whatever the server.
pub fn skip_before(rows: &[Row], from: f64) -> &[Row] {
    &rows[rows.partition_point(|r| r.t_s < from)..]
}

/// An NBD server as the replay sees it.
pub trait ReplayTarget: Send + Sync + 'static {
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<(), String>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), String>>;
}

impl ReplayTarget for NbdClient {
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { ChunkSource::read(self, offset, len).await.map(drop).map_err(|e| e.to_string()) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { NbdClient::flush(self).await.map_err(|e| e.to_string()) })
    }
}

/// Connects to `addr` (so the handshake is not timed) and returns the client to replay with.
pub async fn connect(addr: &ExportAddr, op_timeout: Duration) -> Result<Arc<NbdClient>, ReplayError> {
    let client = Arc::new(NbdClient::with_timeout(addr.target.clone(), addr.name.clone(), op_timeout));
    client.connect_now().await.map_err(|source| ReplayError::Connect { what: client.describe(), source })?;
    Ok(client)
}

/// Waits until `due`, to within a fraction of a millisecond. tokio's timer rounds every sleep up
/// to whole milliseconds, which would add up to 1 ms to each think time: over the hundreds of
/// short gaps of a boot that is a large part of it. So the timer only takes the wait to within
/// 2 ms, and the thread sleeps the rest. Blocking is harmless here: the loop is closed, nothing
/// is in flight meanwhile, and a hand-off to another thread would cost more than the wait.
async fn wait_until(due: Instant) {
    if let Some(coarse) = due.checked_sub(Duration::from_millis(2)) {
        if coarse > Instant::now() {
            tokio::time::sleep_until(coarse.into()).await;
        }
    }
    let rest = due.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        std::thread::sleep(rest);
    }
}

/// Plays `bursts` against `target`, each request bounded by `op_timeout`. Each burst's answer
/// counts `added` later than it came (as if the server and its path were that much slower: a
/// time-dilated testbed stretches the software's own latency with it; zero otherwise).
pub async fn replay<T: ReplayTarget>(
    target: Arc<T>,
    bursts: &[Burst],
    op_timeout: Duration,
    added: Duration,
) -> Report {
    let mut report = Report::default();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut waiting = Duration::ZERO;
    let start = Instant::now();
    let mut answered = start;
    for burst in bursts {
        wait_until(answered + burst.think).await;
        let sent = Instant::now();
        let mut inflight = JoinSet::new();
        for row in &burst.rows {
            let (target, row) = (target.clone(), *row);
            match row.op {
                Op::Write => report.writes_skipped += 1,
                Op::Read | Op::Flush => {
                    report.ops += 1;
                    inflight.spawn(async move {
                        let work = async {
                            match row.op {
                                Op::Flush => target.flush().await.map(|()| 0),
                                _ => target.read(row.offset, row.length as usize).await.map(|()| row.length),
                            }
                        };
                        // The client's own timeout (the same `op_timeout`) comes first and resets
                        // a hung connection; this one only backs it up.
                        let result = match tokio::time::timeout(op_timeout + op_timeout / 2, work).await {
                            Ok(Ok(bytes)) => Ok(bytes),
                            Ok(Err(e)) => Err(format!("{} {}+{}: {e}", row.op.as_str(), row.offset, row.length)),
                            Err(_) => Err(format!(
                                "{} {}+{}: no answer in {op_timeout:?}",
                                row.op.as_str(),
                                row.offset,
                                row.length
                            )),
                        };
                        (result, sent.elapsed())
                    });
                }
            }
        }
        let inflight_was_empty = inflight.is_empty();
        while let Some(done) = inflight.join_next().await {
            match done {
                Ok((result, took)) => {
                    latencies.push(took + added);
                    match result {
                        Ok(bytes) => report.bytes += bytes,
                        Err(e) => report.failed(e),
                    }
                }
                Err(e) => report.failed(format!("request task: {e}")),
            }
        }
        // The answer counts `added` later (skipped writes are not sent: a burst of only those
        // has no answer to stretch); the next burst's wait takes it in.
        answered = Instant::now() + if inflight_was_empty { Duration::ZERO } else { added };
        waiting += answered - sent;
    }
    report.elapsed_s = answered.duration_since(start).as_secs_f64();
    report.waiting_s = waiting.as_secs_f64();
    latencies.sort_unstable();
    let pick = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    report.latency_ms_p50 = pick(0.5);
    report.latency_ms_p99 = pick(0.99);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn row(t_s: f64, op: Op, offset: u64) -> Row {
        Row { t_s, op, offset, length: 4096 }
    }

    #[test]
    fn bursts_join_requests_under_a_millisecond_apart_and_scale_the_gaps() {
        let rows = [
            row(0.0, Op::Read, 0),
            row(0.0004, Op::Read, 1),
            row(0.0008, Op::Read, 2), // chained: 0.4 ms after the one before
            row(0.1008, Op::Read, 3),
            row(0.3008, Op::Flush, 0),
            row(0.3013, Op::Write, 4),
        ];
        let b = plan(&rows, 0.5).unwrap();
        let shape: Vec<(u128, Vec<u64>)> =
            b.iter().map(|b| (b.think.as_millis(), b.rows.iter().map(|r| r.offset).collect())).collect();
        assert_eq!(shape, vec![(0, vec![0, 1, 2]), (50, vec![3]), (100, vec![0, 4])]);
        assert!(plan(&rows, -1.0).is_err() && plan(&rows, f64::NAN).is_err());
        assert!(plan(&[], 1.0).unwrap().is_empty());
    }

    #[test]
    fn skipping_the_start_keeps_later_requests() {
        let rows = [row(0.1, Op::Read, 0), row(0.4, Op::Read, 1), row(9.0, Op::Read, 2), row(9.5, Op::Read, 3)];
        assert_eq!(skip_before(&rows, 0.0).len(), 4);
        assert_eq!(skip_before(&rows, 9.0).iter().map(|r| r.offset).collect::<Vec<_>>(), vec![2, 3]);
        assert!(skip_before(&rows, 100.0).is_empty());
        let b = plan(skip_before(&rows, 5.0), 1.0).unwrap();
        assert_eq!(b[0].think, Duration::ZERO, "the first kept burst goes at once");
    }

    #[test]
    fn export_addresses() {
        let a = ExportAddr::parse("/run/x/exports/img.sock", None).unwrap();
        assert_eq!(a, ExportAddr { target: NbdTarget::Unix("/run/x/exports/img.sock".into()), name: "img".into() });
        assert_eq!(ExportAddr::parse("/tmp/o.sock", Some("other")).unwrap().name, "other");
        let t = ExportAddr::parse("nbd://10.77.0.1:10809/img", None).unwrap();
        assert_eq!(t.target, NbdTarget::Tcp { host: "10.77.0.1".into(), port: 10809 });
        assert_eq!(t.name, "img");
        assert!(ExportAddr::parse("http://x/y", None).is_err());
        assert!(ExportAddr::parse("", None).is_err());
    }

    /// Reads at `slow_offset` take `delay`; everything else answers at once. Logs send times.
    struct Fake {
        slow_offset: u64,
        delay: Duration,
        start: Instant,
        sent: Mutex<Vec<(u64, Duration)>>,
    }

    impl ReplayTarget for Fake {
        fn read(&self, offset: u64, _len: usize) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                self.sent.lock().unwrap().push((offset, self.start.elapsed()));
                if offset == self.slow_offset {
                    tokio::time::sleep(self.delay).await;
                }
                if offset == 666 {
                    return Err("bad sector".into());
                }
                Ok(())
            })
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_slow_read_delays_everything_after_it() {
        let rows = [
            row(0.0, Op::Read, 1),
            row(0.0001, Op::Read, 2),
            row(0.05, Op::Read, 3),
            row(0.06, Op::Read, 666),
            row(0.06, Op::Write, 5),
        ];
        let fake = Arc::new(Fake {
            slow_offset: 2,
            delay: Duration::from_millis(300),
            start: Instant::now(),
            sent: Mutex::new(vec![]),
        });
        let bursts = plan(&rows, 1.0).unwrap();
        let r = replay(fake.clone(), &bursts, Duration::from_secs(5), Duration::ZERO).await;
        let sent = fake.sent.lock().unwrap().clone();
        let at = |o: u64| sent.iter().find(|s| s.0 == o).unwrap().1;
        assert!(at(2) < Duration::from_millis(50), "burst members go out together: {sent:?}");
        // Offset 3 waits for the slow read (300 ms) and then its think time (50 ms).
        assert!(at(3) >= Duration::from_millis(345), "{sent:?}");
        assert!(at(666) >= at(3) + Duration::from_millis(9), "{sent:?}");
        assert_eq!((r.ops, r.bytes, r.read_errors, r.writes_skipped), (4, 3 * 4096, 1, 1));
        assert!(r.elapsed_s >= 0.36 && r.elapsed_s < 2.0, "{r:?}");
        // 300 ms of it waiting on the slow read, 60 ms thinking.
        assert!(r.waiting_s >= 0.3 && r.waiting_s < r.elapsed_s - 0.05, "{r:?}");
        assert!(r.latency_ms_p99 >= 300.0 && r.latency_ms_p50 < 100.0, "{r:?}");
    }

    #[tokio::test]
    async fn think_times_are_kept_to_a_fraction_of_a_millisecond() {
        let fake = Arc::new(Fake {
            slow_offset: u64::MAX,
            delay: Duration::ZERO,
            start: Instant::now(),
            sent: Mutex::new(vec![]),
        });
        // 200 bursts 1.2 ms apart at scale 0.25: 199 think times of 0.3 ms, 59.7 ms in all.
        let rows: Vec<Row> = (0..200).map(|i| row(i as f64 * 0.0012, Op::Read, i)).collect();
        let r = replay(fake, &plan(&rows, 0.25).unwrap(), Duration::from_secs(5), Duration::ZERO).await;
        assert!(r.elapsed_s >= 0.0597, "{r:?}");
        // Rounding each one up to the millisecond would take at least 199 ms.
        assert!(r.elapsed_s < 0.16, "{r:?}");
    }

    #[tokio::test]
    async fn added_latency_comes_once_per_burst_and_counts_as_waiting() {
        let fake = || {
            Arc::new(Fake {
                slow_offset: u64::MAX,
                delay: Duration::ZERO,
                start: Instant::now(),
                sent: Mutex::new(vec![]),
            })
        };
        // 50 bursts of two reads each, 10 ms apart.
        let rows: Vec<Row> =
            (0..100).map(|i| row((i / 2) as f64 * 0.01 + (i % 2) as f64 * 0.0001, Op::Read, i)).collect();
        let bursts = plan(&rows, 1.0).unwrap();
        assert_eq!(bursts.len(), 50);
        let base = replay(fake(), &bursts, Duration::from_secs(5), Duration::ZERO).await;
        let slow = replay(fake(), &bursts, Duration::from_secs(5), Duration::from_millis(2)).await;
        // 2 ms per burst, not per read: 100 ms of waiting beyond the real one, not 200 (the
        // fake answers at once, so the real waiting is far below 100 ms).
        assert!(base.waiting_s < 0.1, "{base:?}");
        assert!((0.1..0.2).contains(&slow.waiting_s), "{base:?} {slow:?}");
        assert!(slow.latency_ms_p50 >= 2.0 && base.latency_ms_p50 < 2.0, "{base:?} {slow:?}");
    }

    #[tokio::test]
    async fn requests_that_run_out_of_time_are_read_errors() {
        let fake = Arc::new(Fake {
            slow_offset: 1,
            delay: Duration::from_secs(30),
            start: Instant::now(),
            sent: Mutex::new(vec![]),
        });
        let bursts = plan(&[row(0.0, Op::Read, 1), row(0.0, Op::Read, 2)], 1.0).unwrap();
        let r = replay(fake, &bursts, Duration::from_millis(100), Duration::ZERO).await;
        assert_eq!((r.ops, r.bytes, r.read_errors), (2, 4096, 1));
        assert!(r.elapsed_s < 1.0);
    }
}
