//! `vmt top`: a live view of a node for someone watching a bulk boot. Every refresh it asks
//! vmtd for its status and shows, per image, what changed since the last one: the share of
//! guest reads that were cache hits, bytes per second from the cache, peers and the origin, the
//! guest-wait p99 over the interval (from the latency histograms' difference), prefetch
//! progress and peers. Totals are cumulative, as `vmt status` shows them.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::control::{self, ImageStatus, Response};
use crate::metrics::Snapshot;

/// Human-readable bytes, as the view prints them.
pub fn bytes(n: u64) -> String {
    // One word per value, so the columns split on whitespace.
    bytesize::ByteSize(n).display().iec().to_string().replace(' ', "")
}

/// A bucket bound as one word: `25µs`, `2.5ms`, `1s`.
fn short(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    let (v, unit) = if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    let v = format!("{v:.1}");
    format!("{}{unit}", v.strip_suffix(".0").unwrap_or(&v))
}

/// Every guest read's latency of an image, whatever the outcome.
fn all_waits(i: &ImageStatus) -> Snapshot {
    let mut s = i.waits.hit.clone();
    for o in [&i.waits.peer, &i.waits.origin, &i.waits.error] {
        s.add(o);
    }
    s
}

fn p2p_in(i: &ImageStatus) -> u64 {
    i.p2p.as_ref().map_or(0, |p| p.bytes_from_peers)
}

/// One frame: `now` against `before` (the previous refresh, `dt` ago), if any.
pub fn frame(now: &Response, before: Option<&Response>, dt: Duration) -> String {
    let mut out = String::new();
    let Response::Status { images, cache, nbd, .. } = now else {
        return "unexpected answer from vmtd\n".into();
    };
    let prev = |name: &str| match before {
        Some(Response::Status { images, .. }) => images.iter().find(|i| i.name == name),
        _ => None,
    };
    let secs = dt.as_secs_f64().max(1e-3);
    let _ = writeln!(
        out,
        "{}  |  NBD connections {}  |  every {:.1}s, Ctrl-C quits",
        super::cache::usage_line(cache),
        nbd.connections,
        dt.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "{:<16} {:>6} {:>11} {:>11} {:>11} {:>9} {:>13} {:>5} {:>11} {:>11}",
        "IMAGE", "HIT%", "CACHE/s", "PEERS/s", "ORIGIN/s", "WAIT p99", "PREFETCH", "PEERS", "SERVED", "ORIGIN"
    );
    for i in images {
        let p = prev(&i.name);
        let delta = |get: fn(&ImageStatus) -> u64| p.map_or(0, |p| get(i).saturating_sub(get(p)));
        let rate = |get: fn(&ImageStatus) -> u64| format!("{}/s", bytes((delta(get) as f64 / secs) as u64));
        let waits = match p {
            Some(p) => all_waits(i).since(&all_waits(p)),
            None => Snapshot::default(),
        };
        let hits = match p {
            Some(p) => i.waits.hit.count().saturating_sub(p.waits.hit.count()),
            None => 0,
        };
        let hit = match waits.count() {
            0 => "-".to_string(),
            n => format!("{:.1}", 100.0 * hits as f64 / n as f64),
        };
        let p99 = match waits.quantile(0.99) {
            None => "-".to_string(),
            Some(Duration::MAX) => ">10s".to_string(),
            Some(d) => short(d),
        };
        let prefetch = match &i.prefetch {
            Some(f) => format!("{}/{}", f.done_chunks, f.total_chunks),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>11} {:>11} {:>11} {:>9} {:>13} {:>5} {:>11} {:>11}",
            i.name,
            hit,
            rate(|i| i.bytes_from_cache),
            rate(p2p_in),
            rate(|i| i.bytes_from_origin),
            p99,
            prefetch,
            i.peers,
            bytes(i.bytes_served),
            bytes(i.bytes_from_origin),
        );
    }
    if images.is_empty() {
        out.push_str("no images served\n");
    }
    out
}

/// Runs the view until interrupted (or for one frame after one interval with `once`).
pub async fn run(socket: &Path, every: Duration, once: bool) -> anyhow::Result<()> {
    let ask = || control::call(socket, &control::Request::Status, Duration::from_secs(10));
    let mut before = ask().await?;
    let mut at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let now = ask().await?;
        let dt = at.elapsed();
        at = Instant::now();
        let text = frame(&now, Some(&before), dt);
        if once {
            print!("{text}");
            return Ok(());
        }
        // Clear the screen and draw from the top left.
        print!("\x1b[H\x1b[2J{text}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::control::{CacheUsage, NbdStatus, WaitStatus};

    fn status(served: u64, hits: u64, slow: u64) -> Response {
        let h = crate::metrics::Histogram::default();
        for _ in 0..hits {
            h.observe(Duration::from_micros(20));
        }
        let o = crate::metrics::Histogram::default();
        for _ in 0..slow {
            o.observe(Duration::from_millis(30));
        }
        let img: ImageStatus = serde_json::from_value(serde_json::json!({
            "name": "img", "origin": "file:///x", "digest": "00", "image_size": 1, "chunk_size": 1,
            "chunks_present": 0, "chunks_total": 1, "bytes_from_origin": served / 2, "bytes_served": served,
            "chunks_fetched": 0, "upstream_reads": 0, "retries": 0, "verify_failures": 0, "failed_reads": 0,
            "fetching": 0, "clients": 1, "holds": [], "reads": hits + slow, "reads_waited": slow,
            "recording": null, "profile_chunks": null, "prefetch": null, "socket": "s", "cache_dir": "c",
            "bytes_from_cache": served / 2,
        }))
        .unwrap();
        let img =
            ImageStatus { waits: WaitStatus { hit: h.snapshot(), origin: o.snapshot(), ..Default::default() }, ..img };
        Response::Status {
            version: "0".into(),
            images: vec![img],
            profiles_rejected: 0,
            p2p: None,
            nbd: NbdStatus::default(),
            cache: CacheUsage::default(),
        }
    }

    #[test]
    fn rates_hits_and_p99_are_over_the_interval() {
        let a = status(1 << 20, 10, 0);
        let b = status(3 << 20, 30, 1);
        let f = frame(&b, Some(&a), Duration::from_secs(2));
        let row = f.lines().find(|l| l.starts_with("img")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        // 20 hits and 1 slow read in the interval; 1 MiB more from the cache over 2 s.
        assert_eq!(cols[1], "95.2", "{f}");
        assert_eq!(cols[2], format!("{}/s", bytes(512 << 10)), "{f}");
        assert_eq!(bytes(512 << 10), "512.0KiB");
        assert_eq!(cols[5], "50ms", "{f}");
        assert_eq!(
            (short(Duration::from_micros(2500)), short(Duration::from_micros(25))),
            ("2.5ms".into(), "25µs".into())
        );
        assert_eq!(short(Duration::from_millis(2500)), "2.5s");
        assert_eq!(cols[8], bytes(3 << 20), "{f}");
        // No reads in the interval: nothing to say about hits or waits.
        let same = frame(&b, Some(&b), Duration::from_secs(1));
        let row = same.lines().find(|l| l.starts_with("img")).unwrap();
        assert_eq!(row.split_whitespace().nth(1), Some("-"));
    }
}
