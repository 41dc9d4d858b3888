//! NBD server: fixed newstyle handshake, then a read-only transmission phase with many requests
//! in flight per connection and replies in completion order.
//!
//! ```text
//!   socket ─▶ reader loop ──(one task per READ, bounded)──▶ Export::read
//!                 │                                            │
//!                 └──(immediate errors)──▶ mpsc ◀──────────────┘
//!                                            └─▶ writer task ─▶ socket (gathered writes)
//! ```
//! A bad frame ends that connection only; nothing a client sends can panic the daemon. Writes
//! are refused with EPERM (their payload is read and dropped so the stream stays in sync).

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};

use super::proto::*;
use crate::fetch::BoxFuture;

/// Requests one connection may have in flight before the server stops reading from it.
const MAX_INFLIGHT: usize = 128;

/// Something the server can export.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset` (already checked to lie inside the export). The error is an
    /// NBD error value such as [`EIO`].
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, u32>>;
    /// Called when a client enters / leaves the transmission phase.
    fn client_changed(&self, _connected: bool) {}
    /// Called as each valid READ, WRITE or FLUSH request arrives, before it is handled (the
    /// request tracer's tap: arrival order and time are what a replay needs).
    fn request_received(&self, _command: u16, _offset: u64, _length: u32) {}
    /// Turns true when this export stops being served; its connections then close, also on
    /// listeners that serve other exports.
    fn stop_signal(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// Finds exports by name for a listener.
pub trait ExportLookup: Send + Sync + 'static {
    fn find(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn names(&self) -> Vec<String>;
}

/// A listener that serves exactly one export, under its name or the default (empty) name.
pub struct SingleExport {
    pub name: String,
    pub export: Arc<dyn Export>,
}

impl ExportLookup for SingleExport {
    fn find(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name.is_empty() || name == self.name).then(|| self.export.clone())
    }
    fn names(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("client sent a {0}-byte payload, more than the server accepts")]
    PayloadTooBig(u32),
}

const EXPORT_FLAGS: u16 = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;

/// Serves one connection until the client leaves, errs, or `shutdown` turns true.
pub async fn serve<S>(
    mut stream: S,
    lookup: Arc<dyn ExportLookup>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let export = tokio::select! {
        r = handshake(&mut stream, lookup.as_ref()) => r?,
        _ = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
    };
    let Some((export, structured)) = export else {
        return Ok(());
    };
    export.client_changed(true);
    let own = export.stop_signal();
    let result = transmission(stream, export.clone(), structured, shutdown, own).await;
    export.client_changed(false);
    result
}

async fn send_reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, reply: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&option_reply(option, reply, data)).await
}

/// Runs the option haggling; returns the export and whether structured replies were agreed,
/// or `None` when the client aborted cleanly.
async fn handshake<S>(s: &mut S, lookup: &dyn ExportLookup) -> Result<Option<(Arc<dyn Export>, bool)>, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ServeError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let h = OptionHeader::parse(&h)?;
        if h.len > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooBig(h.len).into());
        }
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await?;
        match h.option {
            OPT_EXPORT_NAME => {
                // This option has no error reply: an unknown name can only close the connection.
                let name = String::from_utf8(data).map_err(|_| ProtoError::BadName)?;
                let export = lookup.find(&name).ok_or(ServeError::UnknownExport(name))?;
                s.write_all(&export_name_reply(export.size(), EXPORT_FLAGS, no_zeroes)).await?;
                return Ok(Some((export, structured)));
            }
            OPT_ABORT => {
                let _ = send_reply(s, h.option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => send_reply(s, h.option, REP_ERR_INVALID, b"OPT_LIST takes no data").await?,
            OPT_LIST => {
                for name in lookup.names() {
                    send_reply(s, h.option, REP_SERVER, &list_entry(&name)).await?;
                }
                send_reply(s, h.option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => match InfoRequest::parse(&data) {
                Err(e) => send_reply(s, h.option, REP_ERR_INVALID, e.to_string().as_bytes()).await?,
                Ok(req) => match lookup.find(&req.name) {
                    None => {
                        send_reply(s, h.option, REP_ERR_UNKNOWN, format!("no export named {:?}", req.name).as_bytes())
                            .await?
                    }
                    Some(export) => {
                        send_reply(s, h.option, REP_INFO, &info_export(export.size(), EXPORT_FLAGS)).await?;
                        if req.infos.contains(&INFO_BLOCK_SIZE) {
                            send_reply(s, h.option, REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD)).await?;
                        }
                        send_reply(s, h.option, REP_ACK, &[]).await?;
                        if h.option == OPT_GO {
                            return Ok(Some((export, structured)));
                        }
                    }
                },
            },
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                send_reply(s, h.option, REP_ERR_INVALID, b"OPT_STRUCTURED_REPLY takes no data").await?
            }
            OPT_STRUCTURED_REPLY => {
                // Lets a client read an export whose size is not a multiple of its block size:
                // each read reply says how many bytes it carries.
                structured = true;
                send_reply(s, h.option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => send_reply(s, h.option, REP_ERR_POLICY, b"TLS is not offered; use the unix socket").await?,
            _ => send_reply(s, h.option, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

struct Reply {
    handle: u64,
    error: u32,
    /// `Some(offset)` for a READ: sent as a structured reply when those were agreed.
    read_at: Option<u64>,
    data: Option<Bytes>,
}

impl Reply {
    fn error(handle: u64, error: u32) -> Self {
        Reply { handle, error, read_at: None, data: None }
    }
}

async fn transmission<S>(
    stream: S,
    export: Arc<dyn Export>,
    structured: bool,
    mut shutdown: watch::Receiver<bool>,
    mut own: Option<watch::Receiver<bool>>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_INFLIGHT);
    let mut writer = tokio::spawn(write_replies(wr, rx, structured));
    let limit = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let size = export.size();
    let result: Result<(), ServeError> = loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut hdr) => r,
            _ = crate::shutdown::stopped(&mut shutdown) => { writer.abort(); return Ok(()) }
            _ = async {
                match own.as_mut() {
                    Some(rx) => crate::shutdown::stopped(rx).await,
                    None => std::future::pending().await,
                }
            } => { writer.abort(); return Ok(()) }
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match Request::parse(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        tracing::trace!(?req, "nbd request");
        let immediate = match req.command {
            CMD_READ => {
                let len = u64::from(req.length);
                let fits = crate::image::geometry::within(req.offset, len, size);
                if req.length == 0 || req.length > MAX_PAYLOAD || !fits {
                    if tx.send(Reply { read_at: Some(req.offset), ..Reply::error(req.handle, EINVAL) }).await.is_err() {
                        break Ok(());
                    }
                    None
                } else {
                    export.request_received(req.command, req.offset, req.length);
                    let permit = limit.clone().acquire_owned().await.expect("semaphore never closed");
                    let (export, tx) = (export.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (error, data) = match export.read(req.offset, req.length).await {
                            Ok(data) => (0, Some(data)),
                            Err(e) => (e, None),
                        };
                        let reply = Reply { handle: req.handle, error, read_at: Some(req.offset), data };
                        let _ = tx.send(reply).await;
                        drop(permit);
                    });
                    None
                }
            }
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    break Err(ServeError::PayloadTooBig(req.length));
                }
                // Drain the payload so the next header is read in sync.
                let mut left = u64::from(req.length);
                let mut sink = [0u8; 8192];
                while left > 0 {
                    let n = left.min(sink.len() as u64) as usize;
                    if rd.read_exact(&mut sink[..n]).await.is_err() {
                        break;
                    }
                    left -= n as u64;
                }
                if left > 0 {
                    break Ok(());
                }
                export.request_received(req.command, req.offset, req.length);
                Some(EPERM)
            }
            CMD_TRIM | CMD_WRITE_ZEROES => Some(EPERM),
            CMD_FLUSH => {
                export.request_received(req.command, req.offset, req.length);
                Some(0)
            }
            CMD_DISC => break Ok(()),
            _ => Some(EINVAL),
        };
        if let Some(error) = immediate {
            if tx.send(Reply::error(req.handle, error)).await.is_err() {
                break Ok(());
            }
        }
    };
    // Replies still being computed hold senders; the writer ends after the last one is sent.
    drop(tx);
    let _ = (&mut writer).await;
    result
}

/// Most replies gathered into one `writev`, and the most payload bytes they may carry.
const MAX_BATCH: usize = 64;
const MAX_BATCH_BYTES: usize = 4 << 20;

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
) -> std::io::Result<()> {
    // Replies that are ready go out together: their headers side by side in one buffer, their
    // payloads as they are, all in one gathered write.
    let mut heads: Vec<u8> = Vec::new();
    let mut batch: Vec<(std::ops::Range<usize>, Option<Bytes>)> = Vec::new();
    while let Some(first) = rx.recv().await {
        heads.clear();
        batch.clear();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(r) = next {
            let at = heads.len();
            let data = match (structured, r.read_at, r.data) {
                (true, Some(offset), Some(data)) => {
                    let h = StructuredHeader {
                        flags: REPLY_FLAG_DONE,
                        kind: REPLY_TYPE_OFFSET_DATA,
                        handle: r.handle,
                        length: 8 + data.len() as u32,
                    };
                    heads.extend_from_slice(&h.encode());
                    heads.extend_from_slice(&offset.to_be_bytes());
                    Some(data)
                }
                (true, Some(_), None) => {
                    let h = StructuredHeader {
                        flags: REPLY_FLAG_DONE,
                        kind: REPLY_TYPE_ERROR,
                        handle: r.handle,
                        length: 6,
                    };
                    heads.extend_from_slice(&h.encode());
                    heads.extend_from_slice(&r.error.to_be_bytes());
                    heads.extend_from_slice(&0u16.to_be_bytes());
                    None
                }
                (_, _, data) => {
                    heads.extend_from_slice(&SimpleReply { error: r.error, handle: r.handle }.encode());
                    data
                }
            };
            bytes += data.as_ref().map_or(0, Bytes::len);
            batch.push((at..heads.len(), data));
            next = if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES { rx.try_recv().ok() } else { None };
        }
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
        for (head, data) in &batch {
            bufs.push(&heads[head.clone()]);
            if let Some(d) = data {
                bufs.push(d);
            }
        }
        crate::netio::write_all_vectored(&mut w, &bufs).await?;
    }
    Ok(())
}

/// A listening socket the server can accept NBD connections on.
pub trait Listen: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listen for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Listen for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<Self::Stream> {
        let s = self.accept().await?.0;
        // Replies are written whole; Nagle would only delay the last segment of each.
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Accepts connections on `listener` until `shutdown` turns true.
pub async fn run<L: Listen>(listener: L, lookup: Arc<dyn ExportLookup>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept_stream() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "accept failed"); tokio::time::sleep(std::time::Duration::from_millis(50)).await; continue }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        spawn_connection(stream, lookup.clone(), shutdown.clone());
    }
}

fn spawn_connection<S>(stream: S, lookup: Arc<dyn ExportLookup>, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = serve(stream, lookup, shutdown).await {
            tracing::info!(error = %e, "nbd connection closed");
        }
    });
}
