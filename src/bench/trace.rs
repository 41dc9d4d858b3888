//! Request traces: the NBD requests one export received, in order, with the time each arrived.
//!
//! CSV, one request a line after the header `t_s,op,offset,length`: `t_s` is seconds since the
//! trace started (a decimal number), `op` is `R` (read), `W` (write) or `FLUSH`, `offset` and
//! `length` are bytes (both 0 for a flush). vmtd writes them (`trace_stop`); `vmt bench replay`,
//! `vmt sim` and `vmt-profile from-trace` read them. The recorder is [`Tracer`]: a relaxed
//! atomic load per request while no trace runs, one short lock and a push while one does.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::image::{ByteOffset, Geometry};

/// The first line of every trace file.
pub const HEADER: &str = "t_s,op,offset,length";

/// Longest read a trace may hold: the NBD protocol's limit on one request.
pub const MAX_READ: u64 = crate::nbd::proto::MAX_PAYLOAD as u64;

/// Why a trace file was refused.
#[derive(Debug, Error)]
pub enum TraceError {
    #[error("trace {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("trace line 1: expected the header `{HEADER}`")]
    Header,
    #[error("trace line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error(
        "trace: the read at t_s {t_s} (offset {offset}, length {length}) ends past the image's {image_size} bytes"
    )]
    PastImage { t_s: f64, offset: u64, length: u64, image_size: u64 },
}

/// A trace holds at most this many rows (32 bytes each in memory); requests beyond it are
/// counted as dropped rather than growing vmtd without bound while an operator forgets a trace.
pub const MAX_ROWS: usize = 1 << 23;

/// The kind of a traced request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        match s {
            "R" => Some(Op::Read),
            "W" => Some(Op::Write),
            "FLUSH" => Some(Op::Flush),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "R",
            Op::Write => "W",
            Op::Flush => "FLUSH",
        }
    }
}

/// One traced request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Seconds since the trace started.
    pub t_s: f64,
    pub op: Op,
    pub offset: u64,
    pub length: u64,
}

/// The CSV text of `rows`, header included.
pub fn to_csv(rows: &[Row]) -> String {
    let mut out = String::with_capacity(32 + rows.len() * 32);
    out.push_str(HEADER);
    out.push('\n');
    for r in rows {
        // Microseconds: finer than the timer jitter of any recorded request.
        let _ = writeln!(out, "{:.6},{},{},{}", r.t_s, r.op.as_str(), r.offset, r.length);
    }
    out
}

/// Parses a trace (see FORMAT.md, "Request trace"). Every refusal names the line.
pub fn parse(text: &str) -> Result<Vec<Row>, TraceError> {
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l.trim()));
    if lines.next().map(|(_, l)| l.replace(' ', "")) != Some(HEADER.to_string()) {
        return Err(TraceError::Header);
    }
    let mut rows = Vec::new();
    let mut last_t = 0.0f64;
    for (line, text) in lines {
        if text.is_empty() {
            continue;
        }
        let bad = |reason: String| TraceError::Line { line, reason };
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let [t, op, offset, length] = fields[..] else {
            return Err(bad(format!("expected 4 fields (t_s,op,offset,length), found {}", fields.len())));
        };
        let t_s: f64 = t.parse().map_err(|_| bad(format!("t_s {t:?} is not a number")))?;
        if !t_s.is_finite() || t_s < 0.0 {
            return Err(bad(format!("t_s {t} must be a finite number of seconds, at least 0")));
        }
        if t_s < last_t {
            return Err(bad(format!("t_s {t} is earlier than the line before ({last_t})")));
        }
        last_t = t_s;
        let op = Op::parse(op).ok_or_else(|| bad(format!("op {op:?} is not R, W or FLUSH")))?;
        let offset: u64 = offset.parse().map_err(|_| bad(format!("offset {offset:?} is not a byte count")))?;
        let length: u64 = length.parse().map_err(|_| bad(format!("length {length:?} is not a byte count")))?;
        if op == Op::Read && (length == 0 || length > MAX_READ) {
            return Err(bad(format!("read length {length} must be 1 to {MAX_READ} bytes")));
        }
        if offset.checked_add(length).is_none() {
            return Err(bad(format!("offset {offset} + length {length} overflows")));
        }
        rows.push(Row { t_s, op, offset, length });
    }
    Ok(rows)
}

/// Reads and parses the trace file at `path`.
pub fn load(path: &Path) -> Result<Vec<Row>, TraceError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.display().to_string(), source })?;
    parse(&text)
}

/// How much of the image a trace's reads touch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub reads: u64,
    /// Bytes of all reads together, counting re-reads.
    pub bytes_read: u64,
    /// Distinct bytes read (the union of the reads' ranges).
    pub distinct_bytes: u64,
    /// Chunks of `chunk_size` bytes that at least one read touches: what a chunk cache fetches.
    pub chunks: u64,
    pub chunk_size: u64,
}

/// The [`Footprint`] of `rows`' reads, in chunks of `chunk_size` bytes (not 0).
pub fn footprint(rows: &[Row], chunk_size: u64) -> Footprint {
    let chunk_size = chunk_size.max(1);
    let ranges: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r.op == Op::Read && r.length > 0)
        .map(|r| (r.offset, r.offset.saturating_add(r.length)))
        .collect();
    let (reads, bytes_read) = (ranges.len() as u64, ranges.iter().map(|(a, b)| b - a).sum());
    // Chunk ranges are unioned separately: a chunk shared by two reads that do not overlap counts
    // once.
    let chunk_ranges = ranges.iter().map(|&(a, b)| (a / chunk_size, (b - 1) / chunk_size + 1)).collect();
    let (distinct_bytes, chunks) = (union_len(ranges), union_len(chunk_ranges));
    Footprint { reads, bytes_read, distinct_bytes, chunks, chunk_size }
}

/// The chunks `rows`' reads touch, each once, in the order first read, with the milliseconds
/// from the first read to it: a boot's first touches, what a boot profile is made of
/// (`vmt-profile from-trace`). Reads more than `window` after the first are left out (as a
/// recording's `record_duration` ends it). Any read past the end of the image is refused; what
/// this holds is bounded by the image's chunks, however long the trace.
pub fn first_touches(rows: &[Row], geometry: &Geometry, window: Duration) -> Result<Vec<(u32, u32)>, TraceError> {
    // Whole microseconds, so that 0.7 − 0.1 s is 600 ms, not 599.
    let micros = |t_s: f64| (t_s * 1e6).round() as u64;
    let reads = rows.iter().filter(|r| r.op == Op::Read && r.length > 0);
    let Some(start) = reads.clone().next().map(|r| micros(r.t_s)) else { return Ok(Vec::new()) };
    let window = window.as_micros().min(u128::from(u64::MAX)) as u64;
    let mut seen = roaring::RoaringBitmap::new();
    let mut touches = Vec::new();
    for r in reads {
        // Every read is checked against the image, also those after the window: a trace of
        // another image is refused rather than half taken.
        if !geometry.contains(r.offset, r.length) {
            return Err(TraceError::PastImage {
                t_s: r.t_s,
                offset: r.offset,
                length: r.length,
                image_size: geometry.image_size(),
            });
        }
        let since = micros(r.t_s).saturating_sub(start);
        if since > window {
            continue;
        }
        // Saturates after 49 days, far past any window a profile keeps.
        let ms = (since / 1000).min(u64::from(u32::MAX)) as u32;
        for chunk in geometry.chunks_covering(ByteOffset(r.offset), r.length) {
            if seen.insert(chunk) {
                touches.push((chunk, ms));
            }
        }
    }
    Ok(touches)
}

/// Total length of the union of half-open ranges.
fn union_len(mut ranges: Vec<(u64, u64)>) -> u64 {
    ranges.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in ranges {
        cur = match cur {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + cur.map_or(0, |(s, e)| e - s)
}

struct Running {
    start: Instant,
    rows: Vec<Row>,
    dropped: u64,
}

/// What a stopped trace yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Traced {
    pub rows: Vec<Row>,
    /// Requests not kept because the trace was full ([`MAX_ROWS`]).
    pub dropped: u64,
}

/// The request tracer of one export.
#[derive(Default)]
pub struct Tracer {
    active: AtomicBool,
    inner: Mutex<Option<Running>>,
}

impl Tracer {
    /// Starts a trace; false when one is already running.
    pub fn start(&self) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.is_some() {
            return false;
        }
        *inner = Some(Running { start: Instant::now(), rows: Vec::new(), dropped: 0 });
        self.active.store(true, Ordering::Release);
        true
    }

    /// Notes one request as it arrives.
    pub fn note(&self, op: Op, offset: u64, length: u64) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = inner.as_mut() else { return };
        if t.rows.len() >= MAX_ROWS {
            t.dropped += 1;
            return;
        }
        let t_s = t.start.elapsed().as_secs_f64();
        t.rows.push(Row { t_s, op, offset, length });
    }

    /// Stops the running trace and returns it; `None` when none runs.
    pub fn stop(&self) -> Option<Traced> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = inner.take()?;
        self.active.store(false, Ordering::Release);
        Some(Traced { rows: t.rows, dropped: t.dropped })
    }

    pub fn running(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ChunkSize;
    use proptest::prelude::*;

    #[test]
    fn first_touches_are_each_chunk_once_in_read_order_timed_from_the_first_read() {
        let read = |t_s, offset, length| Row { t_s, op: Op::Read, offset, length };
        let write = |t_s| Row { t_s, op: Op::Write, offset: 0, length: 4096 };
        // 8 chunks of 4 KiB, the last one 100 bytes short.
        const C: u64 = 4096;
        let geo = Geometry::new(8 * C - 100, ChunkSize::new(C).unwrap()).unwrap();
        let all = Duration::from_secs(3600);
        let rows = vec![
            write(0.05),
            read(0.1, 3 * C + 10, 2 * C - 10), // chunks 3 and 4, to the byte
            Row { t_s: 0.6, op: Op::Flush, offset: 0, length: 0 },
            read(0.7, 4 * C, 1),       // 4 again: not a first touch
            read(0.7, C - 1, 2),       // 0 and 1, 600 ms after the first read (not 599)
            read(2.6, 7 * C, C - 100), // the last chunk, to the image's end
        ];
        let want = vec![(3, 0), (4, 0), (0, 600), (1, 600), (7, 2500)];
        assert_eq!(first_touches(&rows, &geo, all).unwrap(), want);
        // The window leaves out what comes later than it.
        assert_eq!(first_touches(&rows, &geo, Duration::from_secs(1)).unwrap(), want[..4]);
        // No reads, no touches.
        assert!(first_touches(&[write(0.0)], &geo, all).unwrap().is_empty());
        // One byte past the image's end is refused, and the read is named by its time.
        let err = first_touches(&[write(0.0), read(0.1, 0, 1), read(0.2, 7 * C, C - 99)], &geo, all).unwrap_err();
        assert!(matches!(err, TraceError::PastImage { t_s: 0.2, .. }), "{err}");
        assert!(err.to_string().contains("t_s 0.2"), "{err}");
        // Also after the window.
        let late = [read(0.1, 0, 1), read(5.0, 7 * C, C)];
        assert!(first_touches(&late, &geo, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn parses_what_it_writes_and_tolerates_crlf_and_blank_lines() {
        let rows = vec![
            Row { t_s: 0.0, op: Op::Read, offset: 0, length: 4096 },
            Row { t_s: 0.25, op: Op::Write, offset: 8192, length: 512 },
            Row { t_s: 1.5, op: Op::Flush, offset: 0, length: 0 },
        ];
        assert_eq!(parse(&to_csv(&rows)).unwrap(), rows);
        let text = "t_s, op, offset, length\r\n0.5 , R, 10, 20\r\n\r\n";
        assert_eq!(parse(text).unwrap(), vec![Row { t_s: 0.5, op: Op::Read, offset: 10, length: 20 }]);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("", "line 1"),
            ("offset,length\n", "line 1"),
            ("t_s,op,offset,length\n0,R,0\n", "line 2: expected 4 fields"),
            ("t_s,op,offset,length\n0,R,0,1\nx,R,0,1\n", "line 3: t_s \"x\""),
            ("t_s,op,offset,length\n-1,R,0,1\n", "line 2: t_s -1"),
            ("t_s,op,offset,length\nNaN,R,0,1\n", "line 2"),
            ("t_s,op,offset,length\n2,R,0,1\n1,R,0,1\n", "line 3: t_s 1 is earlier"),
            ("t_s,op,offset,length\n0,TRIM,0,1\n", "line 2: op \"TRIM\""),
            ("t_s,op,offset,length\n0,R,-5,1\n", "line 2: offset"),
            ("t_s,op,offset,length\n0,R,0,0\n", "line 2: read length 0"),
            ("t_s,op,offset,length\n0,R,0,99999999999\n", "line 2: read length"),
            ("t_s,op,offset,length\n0,W,18446744073709551615,2\n", "line 2: offset 18446744073709551615 + length 2"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn footprint_unions_bytes_and_chunks() {
        let r = |offset, length| Row { t_s: 0.0, op: Op::Read, offset, length };
        let rows = [r(0, 4096), r(2048, 4096), r(65536 + 10, 10), r(65536 + 100, 10), r(3 * 65536, 65537)];
        let f = footprint(&rows, 65536);
        assert_eq!(f.reads, 5);
        assert_eq!(f.bytes_read, 4096 + 4096 + 10 + 10 + 65537);
        assert_eq!(f.distinct_bytes, 6144 + 10 + 10 + 65537);
        assert_eq!(f.chunks, 1 + 1 + 2, "chunks 0, 1, 3 and 4");
        let none = footprint(&[Row { t_s: 0.0, op: Op::Flush, offset: 0, length: 0 }], 65536);
        assert_eq!((none.reads, none.distinct_bytes, none.chunks), (0, 0, 0));
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in "\\PC*") {
            let _ = parse(&text);
            let _ = parse(&format!("{HEADER}\n{text}"));
        }

        #[test]
        fn parser_never_panics_on_near_valid_lines(
            lines in proptest::collection::vec(("-?[0-9.eE+inf]{0,8}", "R|W|FLUSH|r|", "-?[0-9]{0,21}", "-?[0-9]{0,21}"), 0..8)
        ) {
            let body: String = lines.iter().map(|(t, o, a, b)| format!("{t},{o},{a},{b}\n")).collect();
            if let Ok(rows) = parse(&format!("{HEADER}\n{body}")) {
                let f = footprint(&rows, 65536);
                prop_assert!(f.distinct_bytes <= f.bytes_read);
            }
        }
    }

    #[test]
    fn notes_only_while_running_and_in_order() {
        let t = Tracer::default();
        t.note(Op::Read, 0, 4096);
        assert!(t.start());
        assert!(!t.start(), "one trace at a time");
        t.note(Op::Read, 8192, 512);
        t.note(Op::Flush, 0, 0);
        t.note(Op::Write, 4096, 4096);
        let got = t.stop().unwrap();
        assert_eq!(got.dropped, 0);
        let ops: Vec<_> = got.rows.iter().map(|r| (r.op, r.offset, r.length)).collect();
        assert_eq!(ops, vec![(Op::Read, 8192, 512), (Op::Flush, 0, 0), (Op::Write, 4096, 4096)]);
        assert!(got.rows.windows(2).all(|w| w[0].t_s <= w[1].t_s));
        t.note(Op::Read, 0, 1);
        assert!(t.stop().is_none());
    }

    #[test]
    fn csv_has_the_header_and_one_line_per_row() {
        let rows = [
            Row { t_s: 0.0, op: Op::Read, offset: 0, length: 4096 },
            Row { t_s: 1.5, op: Op::Flush, offset: 0, length: 0 },
        ];
        assert_eq!(to_csv(&rows), "t_s,op,offset,length\n0.000000,R,0,4096\n1.500000,FLUSH,0,0\n");
    }
}
