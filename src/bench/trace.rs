//! Request traces: the NBD requests one export received, in order, with the time each arrived.
//!
//! CSV, one request a line after the header `t_s,op,offset,length`: `t_s` is seconds since the
//! trace started (a decimal number), `op` is `R` (read), `W` (write) or `FLUSH`, `offset` and
//! `length` are bytes (both 0 for a flush). vmtd writes them (`trace_stop`); `vmt bench replay`
//! reads them. The recorder is [`Tracer`]: a relaxed atomic load per request while no trace runs,
//! one short lock and a push while one does.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A trace holds at most this many rows (24 bytes each in memory); requests beyond it are
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
    out.push_str("t_s,op,offset,length\n");
    for r in rows {
        // Microseconds: finer than the timer jitter of any recorded request.
        let _ = writeln!(out, "{:.6},{},{},{}", r.t_s, r.op.as_str(), r.offset, r.length);
    }
    out
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
