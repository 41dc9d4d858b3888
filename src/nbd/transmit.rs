//! The NBD transmission phase of one connection: requests in, replies out in completion order,
//! every reply's bytes charged to the connection's and the node's budgets until written.
//!
//! ```text
//!   socket ─▶ read_requests ─(slot, then bytes held)─▶ one task per READ ─▶ Export::read
//!                 │  (reads > PIECE: streamed by the writer)                   │
//!                 └──(immediate errors)──▶ mpsc ◀──────────────────────────────┘
//!                                            └─▶ write_replies ─▶ socket (gathered, timed)
//! ```
//! A connection ends when the client leaves or sends a bad frame, when a reply cannot be written
//! within `write_timeout` (a client that stops reading), when it stays idle past
//! `idle_timeout`, or when its export or the daemon stops. Writes are refused with EPERM (their
//! payload is read and dropped so the stream stays in sync).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::limits::{Budgets, Held, PIECE};
use super::proto::*;
use super::server::{Export, ServeError};

/// Requests one connection may have in flight before the server stops reading from it.
const MAX_INFLIGHT: usize = 128;
/// Most replies gathered into one `writev`, and the most payload bytes they may carry.
const MAX_BATCH: usize = 64;
const MAX_BATCH_BYTES: usize = 4 << 20;

enum Reply {
    /// A whole reply: an error, or a read's bytes (with the budget they hold).
    Done {
        handle: u64,
        error: u32,
        /// `Some(offset)` for a READ: sent as a structured reply when those were agreed.
        read_at: Option<u64>,
        data: Option<Bytes>,
        _held: Option<Held>,
    },
    /// A read longer than [`PIECE`]: the writer produces and sends it a piece at a time, within
    /// the room `held` reserved for it ([`Budgets::stream_reserve`]).
    Stream { handle: u64, offset: u64, len: u32, held: Held, _slot: OwnedSemaphorePermit },
}

impl Reply {
    fn error(handle: u64, error: u32, read_at: Option<u64>) -> Self {
        Reply::Done { handle, error, read_at, data: None, _held: None }
    }
}

/// A read task's duty to answer: if the task ends without replying (a panic in
/// `Export::read`), the drop sends EIO, so the client is never left waiting on the handle (if the
/// channel is full at that moment, the reply is lost and the client's request times out).
struct Answer {
    tx: Option<mpsc::Sender<Reply>>,
    handle: u64,
    offset: u64,
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Reply::error(self.handle, EIO, Some(self.offset)));
        }
    }
}

/// What the reader, the read tasks and the writer of one connection share.
struct Conn {
    export: Arc<dyn Export>,
    budgets: Arc<Budgets>,
    bytes: Arc<Semaphore>,
    structured: bool,
}

/// Serves requests on `stream` until the connection ends (see the module comment).
pub(super) async fn transmission<S>(
    stream: S,
    export: Arc<dyn Export>,
    structured: bool,
    budgets: Arc<Budgets>,
    mut shutdown: watch::Receiver<bool>,
    mut own: Option<watch::Receiver<bool>>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let conn = Arc::new(Conn { export, bytes: budgets.connection(), budgets, structured });
    let (tx, rx) = mpsc::channel::<Reply>(MAX_INFLIGHT);
    let mut writer = tokio::spawn(write_replies(wr, rx, conn.clone()));
    let stopped = async {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => {}
            _ = async {
                match own.as_mut() {
                    Some(rx) => crate::shutdown::stopped(rx).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    };
    tokio::pin!(stopped);
    let result = tokio::select! {
        r = read_requests(rd, conn, tx) => r,
        // The writer ends early only on a failed or timed-out write: the connection is over.
        w = &mut writer => return w.unwrap_or(Ok(())),
        _ = &mut stopped => { writer.abort(); return Ok(()) }
    };
    // Replies still being computed hold senders; the writer ends after the last one is sent,
    // each write bounded by the write timeout.
    let written = tokio::select! {
        w = &mut writer => w.unwrap_or(Ok(())),
        _ = &mut stopped => { writer.abort(); Ok(()) }
    };
    // The reader also ends (quietly) when the writer failed first: report the writer's reason.
    result.and(written)
}

async fn read_requests<R: AsyncRead + Unpin>(
    mut rd: R,
    conn: Arc<Conn>,
    tx: mpsc::Sender<Reply>,
) -> Result<(), ServeError> {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let size = conn.export.size();
    let limits = conn.budgets.limits;
    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let idle = limits.idle_timeout.filter(|_| slots.available_permits() == MAX_INFLIGHT);
        let read = match idle {
            Some(t) => tokio::time::timeout(t, rd.read_exact(&mut hdr)).await.map_err(|_| ServeError::Idle(t))?,
            None => rd.read_exact(&mut hdr).await,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = Request::parse(&hdr)?;
        tracing::trace!(?req, "nbd request");
        let immediate = match req.command {
            CMD_READ => {
                let fits = crate::image::geometry::within(req.offset, u64::from(req.length), size);
                if req.length == 0 || req.length > MAX_PAYLOAD || !fits {
                    Some(Reply::error(req.handle, EINVAL, Some(req.offset)))
                } else {
                    conn.export.request_received(req.command, req.offset, req.length);
                    let slot = slots.clone().acquire_owned().await.expect("semaphore never closed");
                    if req.length > PIECE {
                        let held = conn.budgets.hold(&conn.bytes, conn.budgets.stream_reserve()).await;
                        let (handle, offset, len) = (req.handle, req.offset, req.length);
                        Some(Reply::Stream { handle, offset, len, held, _slot: slot })
                    } else {
                        // Waits here, not reading further requests, until the budgets have room.
                        let held = conn.budgets.hold(&conn.bytes, req.length).await;
                        let (conn, tx) = (conn.clone(), tx.clone());
                        tokio::spawn(async move {
                            let mut answer = Answer { tx: Some(tx), handle: req.handle, offset: req.offset };
                            let (error, data) = match conn.export.read(req.offset, req.length).await {
                                Ok(data) => (0, Some(data)),
                                Err(e) => (e, None),
                            };
                            let reply = Reply::Done {
                                handle: req.handle,
                                error,
                                read_at: Some(req.offset),
                                data,
                                _held: Some(held),
                            };
                            if let Some(tx) = answer.tx.take() {
                                let _ = tx.send(reply).await;
                            }
                            drop(slot);
                        });
                        None
                    }
                }
            }
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    return Err(ServeError::PayloadTooBig(req.length));
                }
                // Drain the payload so the next header is read in sync; it must arrive in time.
                let (mut payload, mut sink) = ((&mut rd).take(u64::from(req.length)), tokio::io::sink());
                let drain = tokio::io::copy(&mut payload, &mut sink);
                let t = limits.write_timeout;
                let got = tokio::time::timeout(t, drain).await.map_err(|_| ServeError::PayloadTimeout(t))??;
                if got < u64::from(req.length) {
                    return Ok(());
                }
                conn.export.request_received(req.command, req.offset, req.length);
                Some(Reply::error(req.handle, EPERM, None))
            }
            CMD_TRIM | CMD_WRITE_ZEROES => Some(Reply::error(req.handle, EPERM, None)),
            CMD_FLUSH => {
                conn.export.request_received(req.command, req.offset, req.length);
                Some(Reply::error(req.handle, 0, None))
            }
            CMD_DISC => return Ok(()),
            _ => Some(Reply::error(req.handle, EINVAL, None)),
        };
        if let Some(reply) = immediate {
            if tx.send(reply).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Writes `bufs` whole within `t`.
async fn write_timed<W: AsyncWrite + Unpin>(w: &mut W, bufs: &[&[u8]], t: Duration) -> Result<(), ServeError> {
    tokio::time::timeout(t, crate::netio::write_all_vectored(w, bufs))
        .await
        .map_err(|_| ServeError::WriteTimeout(t))??;
    Ok(())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
    conn: Arc<Conn>,
) -> Result<(), ServeError> {
    let t = conn.budgets.limits.write_timeout;
    // Replies that are ready go out together: their headers side by side in one buffer, their
    // payloads as they are, all in one gathered write. Their budgets are released after it.
    let mut heads: Vec<u8> = Vec::new();
    let mut batch: Vec<(std::ops::Range<usize>, Option<Bytes>, Option<Held>)> = Vec::new();
    let mut stream = None;
    loop {
        let first = match stream.take() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        heads.clear();
        batch.clear();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(r) = next.take() {
            let (handle, error, read_at, data, held) = match r {
                Reply::Done { handle, error, read_at, data, _held } => (handle, error, read_at, data, _held),
                Reply::Stream { handle, offset, len, held, _slot } => {
                    if batch.is_empty() {
                        stream_read(&mut w, &conn, handle, offset, len).await?;
                        drop(held);
                    } else {
                        stream = Some(Reply::Stream { handle, offset, len, held, _slot });
                    }
                    break;
                }
            };
            let at = heads.len();
            let data = encode_head(&mut heads, conn.structured, handle, error, read_at, data);
            bytes += data.as_ref().map_or(0, Bytes::len);
            batch.push((at..heads.len(), data, held));
            if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        for (head, data, _) in &batch {
            bufs.push(&heads[head.clone()]);
            if let Some(d) = data {
                bufs.push(d);
            }
        }
        write_timed(&mut w, &bufs, t).await?;
        drop(bufs);
        // Written: give the budgets back now, not when the next reply arrives (which may be
        // waiting for exactly this room).
        batch.clear();
    }
}

/// Appends the header of a whole reply to `heads`; returns the payload that follows it.
fn encode_head(
    heads: &mut Vec<u8>,
    structured: bool,
    handle: u64,
    error: u32,
    read_at: Option<u64>,
    data: Option<Bytes>,
) -> Option<Bytes> {
    match (structured, read_at, data) {
        (true, Some(offset), Some(data)) => {
            let length = 8 + data.len() as u32;
            let h = StructuredHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, handle, length };
            heads.extend_from_slice(&h.encode());
            heads.extend_from_slice(&offset.to_be_bytes());
            Some(data)
        }
        (true, Some(_), None) => {
            let h = StructuredHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_ERROR, handle, length: 6 };
            heads.extend_from_slice(&h.encode());
            heads.extend_from_slice(&error.to_be_bytes());
            heads.extend_from_slice(&0u16.to_be_bytes());
            None
        }
        (_, _, data) => {
            heads.extend_from_slice(&SimpleReply { error, handle }.encode());
            data
        }
    }
}

/// Produces and writes a long read a piece at a time, within the room its request reserved: the
/// next piece is read while the current one is written when two fit, else one after the other.
/// A piece that fails after the first was sent cannot be reported in a simple reply, so the
/// connection is closed (the client sees the read fail and may reconnect).
async fn stream_read<W: AsyncWrite + Unpin>(
    w: &mut W,
    conn: &Conn,
    handle: u64,
    offset: u64,
    len: u32,
) -> Result<(), ServeError> {
    let t = conn.budgets.limits.write_timeout;
    let overlap = conn.budgets.stream_reserve() >= 2 * PIECE;
    let end = offset + u64::from(len);
    let piece_len = |at: u64| (end - at).min(u64::from(PIECE)) as u32;
    let mut at = offset;
    let mut ready = Some(conn.export.read(offset, piece_len(offset)).await);
    while let Some(data) = ready.take() {
        let first = at == offset;
        let data = match data {
            Ok(d) if d.len() == piece_len(at) as usize => d,
            Err(e) if first => {
                let mut head = Vec::new();
                encode_head(&mut head, conn.structured, handle, e, Some(offset), None);
                return write_timed(w, &[&head], t).await;
            }
            _ => return Err(ServeError::ReadFailedMidReply),
        };
        let next_at = at + data.len() as u64;
        let mut head = Vec::with_capacity(32);
        if conn.structured {
            let flags = if next_at == end { REPLY_FLAG_DONE } else { 0 };
            let length = 8 + data.len() as u32;
            head.extend_from_slice(&StructuredHeader { flags, kind: REPLY_TYPE_OFFSET_DATA, handle, length }.encode());
            head.extend_from_slice(&at.to_be_bytes());
        } else if first {
            head.extend_from_slice(&SimpleReply { error: 0, handle }.encode());
        }
        let bufs: [&[u8]; 2] = [&head, &data];
        let write = write_timed(w, &bufs, t);
        if next_at < end && overlap {
            // A failed write ends the connection at once, without waiting for the next piece.
            let read_next = async { Ok(conn.export.read(next_at, piece_len(next_at)).await) };
            let ((), next) = tokio::try_join!(write, read_next)?;
            ready = Some(next);
        } else {
            write.await?;
            drop(data);
            if next_at < end {
                ready = Some(conn.export.read(next_at, piece_len(next_at)).await);
            }
        }
        at = next_at;
    }
    Ok(())
}
