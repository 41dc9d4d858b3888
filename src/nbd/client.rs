//! NBD client used to read from an NBD origin (and by `vmt bench replay`): fixed newstyle,
//! `OPT_GO`, pipelined `READ`s and `FLUSH`es on one connection with replies matched by handle,
//! reconnect on demand.
//!
//! Invariants: every request waiting on a connection is answered or failed when that connection
//! dies (never left hanging); a request unanswered for [`IO_TIMEOUT`] (or the client's own
//! timeout) kills the connection, so a half-open socket cannot stall reads forever. Retrying is
//! the caller's job (`fetch::flight`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::proto::*;
use crate::fetch::{BoxFuture, ChunkSource, SourceError};

/// Longest wait for a connection or for one reply before the connection is declared dead.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
type BoxStream = Box<dyn Stream>;

type Waiter = oneshot::Sender<Result<Vec<u8>, SourceError>>;

/// Requests sent and not yet answered; `None` marks one whose caller gave up (its reply is
/// still read off the wire and dropped).
#[derive(Default)]
struct Pending {
    dead: bool,
    map: HashMap<u64, (usize, Option<Waiter>)>,
}

struct Conn {
    size: u64,
    /// Transmission flags the server sent (`TF_*`).
    flags: u16,
    writer: tokio::sync::Mutex<WriteHalf<BoxStream>>,
    pending: Arc<Mutex<Pending>>,
    dead: Arc<AtomicBool>,
    next_handle: AtomicU64,
    reader: JoinHandle<()>,
}

impl Conn {
    fn kill(&self) {
        kill(&self.pending, &self.dead);
        self.reader.abort();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill(pending: &Mutex<Pending>, dead: &AtomicBool) {
    let mut p = pending.lock().unwrap();
    dead.store(true, Ordering::SeqCst);
    p.dead = true;
    p.map.clear(); // drops every waiter: each gets "connection lost"
}

/// A reconnecting NBD client for one export.
pub struct NbdClient {
    target: NbdTarget,
    export: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    io_timeout: Duration,
}

impl NbdClient {
    pub fn new(target: NbdTarget, export: String) -> Self {
        Self::with_timeout(target, export, IO_TIMEOUT)
    }

    /// A client whose connect and per-reply limit is `io_timeout` instead of [`IO_TIMEOUT`].
    pub fn with_timeout(target: NbdTarget, export: String, io_timeout: Duration) -> Self {
        NbdClient { target, export, conn: tokio::sync::Mutex::new(None), io_timeout }
    }

    /// Connects now (the handshake included) rather than at the first request.
    pub async fn connect_now(&self) -> Result<(), SourceError> {
        self.connection().await.map(|_| ())
    }

    /// Sends a FLUSH and waits for its reply. A server that does not offer flushes (no
    /// `TF_SEND_FLUSH`) is not sent one: the call succeeds at once, as there is nothing to flush.
    pub async fn flush(&self) -> Result<(), SourceError> {
        let conn = self.connection().await?;
        if conn.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(&conn, CMD_FLUSH, 0, 0).await.map(|_| ())
    }

    fn unreachable(&self, reason: impl ToString) -> SourceError {
        SourceError::Unreachable { what: self.describe(), reason: reason.to_string() }
    }

    fn protocol(&self, reason: impl ToString) -> SourceError {
        SourceError::Protocol { what: self.describe(), reason: reason.to_string() }
    }

    async fn connection(&self) -> Result<Arc<Conn>, SourceError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let conn = tokio::time::timeout(self.io_timeout, self.connect())
            .await
            .map_err(|_| self.unreachable("connect and handshake timed out"))??;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Arc<Conn>, SourceError> {
        let mut stream: BoxStream = match &self.target {
            NbdTarget::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(|e| self.unreachable(e))?),
            NbdTarget::Tcp { host, port } => {
                let s =
                    tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(|e| self.unreachable(e))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        let (size, flags) = self.handshake(&mut stream).await?;
        let (rd, wr) = tokio::io::split(stream);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let dead = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_replies(rd, pending.clone(), dead.clone(), self.describe()));
        tracing::info!(origin = %self.describe(), size, "connected to NBD origin");
        Ok(Arc::new(Conn {
            size,
            flags,
            writer: tokio::sync::Mutex::new(wr),
            pending,
            dead,
            next_handle: AtomicU64::new(1),
            reader,
        }))
    }

    /// Returns the export's size and transmission flags.
    async fn handshake(&self, s: &mut BoxStream) -> Result<(u64, u16), SourceError> {
        let io = |e: std::io::Error| self.unreachable(e);
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).await.map_err(io)?;
        let flags = parse_greeting(&g).map_err(|e| self.protocol(e))?;
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await.map_err(io)?;
        let data = InfoRequest { name: self.export.clone(), infos: vec![] }.encode();
        s.write_all(&OptionHeader { option: OPT_GO, len: data.len() as u32 }.encode()).await.map_err(io)?;
        s.write_all(&data).await.map_err(io)?;
        let mut size = None;
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut h).await.map_err(io)?;
            let h = OptionReplyHeader::parse(&h).map_err(|e| self.protocol(e))?;
            if h.option != OPT_GO || h.len > MAX_OPTION_LEN {
                return Err(self.protocol(format!("unexpected option reply {h:?}")));
            }
            let mut data = vec![0u8; h.len as usize];
            s.read_exact(&mut data).await.map_err(io)?;
            match h.reply {
                REP_ACK => break,
                REP_INFO => {
                    if let Some(info) = parse_info_export(&data) {
                        size = Some(info);
                    }
                }
                r if r & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&data);
                    return Err(self.protocol(format!("server refused export {:?} (error {r:#x}: {msg})", self.export)));
                }
                _ => {}
            }
        }
        size.ok_or_else(|| self.protocol("server sent no export size"))
    }

    async fn read_once(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        if len as u64 > u64::from(MAX_PAYLOAD) {
            return Err(self.protocol(format!("read of {len} bytes exceeds the NBD maximum")));
        }
        let conn = self.connection().await?;
        if !crate::image::geometry::within(offset, len as u64, conn.size) {
            return Err(SourceError::OutOfRange { what: self.describe(), offset, len, size: conn.size });
        }
        self.request(&conn, CMD_READ, offset, len).await
    }

    /// Sends one request and waits for its reply; `len` is both the request's length and the
    /// payload the reply carries (0 for a FLUSH).
    async fn request(&self, conn: &Conn, command: u16, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let handle = conn.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = conn.pending.lock().unwrap();
            if p.dead {
                return Err(self.unreachable("connection lost"));
            }
            p.map.insert(handle, (len, Some(tx)));
        }
        // If this future is dropped (caller timed out), forget the waiter but keep the length
        // so the reply can still be skipped on the wire.
        struct Forget<'a>(&'a Mutex<Pending>, u64, bool);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    if let Some(e) = self.0.lock().unwrap().map.get_mut(&self.1) {
                        e.1 = None;
                    }
                }
            }
        }
        let mut guard = Forget(&conn.pending, handle, false);
        let req = Request { flags: 0, command, handle, offset, length: len as u32 };
        let sent = {
            let mut w = conn.writer.lock().await;
            w.write_all(&req.encode()).await
        };
        if let Err(e) = sent {
            conn.kill();
            return Err(self.unreachable(e));
        }
        let result = match tokio::time::timeout(self.io_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.unreachable("connection lost")),
            Err(_) => {
                conn.kill();
                Err(self.unreachable(format!("no reply in {:?}", self.io_timeout)))
            }
        };
        guard.2 = true;
        result
    }
}

async fn read_replies(rd: ReadHalf<BoxStream>, pending: Arc<Mutex<Pending>>, dead: Arc<AtomicBool>, what: String) {
    // A reply's header and the start of its data come in one read; the rest of a large reply
    // bypasses the buffer.
    let mut rd = tokio::io::BufReader::with_capacity(4096, rd);
    let err = loop {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        if let Err(e) = rd.read_exact(&mut h).await {
            break e.to_string();
        }
        let reply = match SimpleReply::parse(&h) {
            Ok(r) => r,
            Err(e) => break e.to_string(),
        };
        let Some((len, waiter)) = pending.lock().unwrap().map.remove(&reply.handle) else {
            break format!("reply for unknown handle {}", reply.handle);
        };
        let result = if reply.error == 0 {
            match crate::netio::read_exact_vec(&mut rd, len).await {
                Ok(buf) => Ok(buf),
                Err(e) => break e.to_string(),
            }
        } else {
            Err(SourceError::Remote { what: what.clone(), errno: reply.error, offset: 0, len })
        };
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    };
    tracing::warn!(origin = %what, error = %err, "NBD origin connection lost");
    kill(&pending, &dead);
}

impl ChunkSource for NbdClient {
    fn describe(&self) -> String {
        match &self.target {
            NbdTarget::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
            NbdTarget::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
        }
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move { Ok(self.connection().await?.size) })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(self.read_once(offset, len))
    }
}
