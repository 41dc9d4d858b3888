//! NBD server: accepts connections within the node's connection cap, runs the fixed newstyle
//! handshake within `handshake_timeout`, then hands the connection to [`super::transmit`].
//!
//! A bad frame ends that connection only; nothing a client sends can panic the daemon, and
//! nothing it does can hold more than its budgets (see [`super::limits`]).

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::limits::Budgets;
use super::proto::*;
use crate::fetch::BoxFuture;

/// Something the server can export.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset` (already checked to lie inside the export). The error is an
    /// NBD error value such as [`EIO`].
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, u32>>;
    /// Called when a client enters the transmission phase: false refuses it, as the export
    /// already serves `max` clients. A client admitted here is later let go with
    /// [`Export::client_left`].
    fn client_joined(&self, _max: u64) -> bool {
        true
    }
    /// Called when an admitted client leaves the transmission phase.
    fn client_left(&self) {}
    /// Called as each valid READ, WRITE or FLUSH request arrives, before it is handled (the
    /// request tracer's tap: arrival order and time are what a replay needs).
    fn request_received(&self, _command: u16, _offset: u64, _length: u32) {}
    /// Turns true when this export stops being served; its connections then close, also on
    /// listeners that serve other exports.
    fn stop_signal(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// An admitted client's place on its export ([`Export::client_joined`]): dropping it, however
/// the connection ends (also a handshake cancelled by its timeout), lets the place go.
pub struct ClientPlace(Arc<dyn Export>);

impl Drop for ClientPlace {
    fn drop(&mut self) {
        self.0.client_left();
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
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("a reply could not be written within {0:?} (the client is not reading)")]
    WriteTimeout(std::time::Duration),
    #[error("a write request's payload did not arrive within {0:?}")]
    PayloadTimeout(std::time::Duration),
    #[error("idle for {0:?}")]
    Idle(std::time::Duration),
    #[error("a long read failed after its first piece was sent")]
    ReadFailedMidReply,
    #[error("export already serves {0} clients")]
    TooManyClients(u64),
}

const EXPORT_FLAGS: u16 = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;

/// Serves one connection until the client leaves, errs, or `shutdown` turns true.
pub async fn serve<S>(
    mut stream: S,
    lookup: Arc<dyn ExportLookup>,
    budgets: Arc<Budgets>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = budgets.limits.handshake_timeout;
    let max = budgets.limits.max_connections_per_export;
    let export = tokio::select! {
        r = tokio::time::timeout(t, handshake(&mut stream, lookup.as_ref(), max)) => r.map_err(|_| ServeError::HandshakeTimeout(t))??,
        _ = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
    };
    let Some((place, structured)) = export else {
        return Ok(());
    };
    let export = place.0.clone();
    let own = export.stop_signal();
    let result = super::transmit::transmission(stream, export, structured, budgets, shutdown, own).await;
    drop(place);
    result
}

async fn send_reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, reply: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&option_reply(option, reply, data)).await
}

/// Runs the option haggling; returns the export and whether structured replies were agreed,
/// or `None` when the client aborted cleanly.
async fn handshake<S>(
    s: &mut S,
    lookup: &dyn ExportLookup,
    max_clients: u64,
) -> Result<Option<(ClientPlace, bool)>, ServeError>
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
                if !export.client_joined(max_clients) {
                    return Err(ServeError::TooManyClients(max_clients));
                }
                let place = ClientPlace(export.clone());
                s.write_all(&export_name_reply(export.size(), EXPORT_FLAGS, no_zeroes)).await?;
                return Ok(Some((place, structured)));
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
                        if h.option == OPT_GO && !export.client_joined(max_clients) {
                            let why = format!("export {:?} already serves {max_clients} clients", req.name);
                            send_reply(s, h.option, REP_ERR_POLICY, why.as_bytes()).await?;
                            return Err(ServeError::TooManyClients(max_clients));
                        }
                        let place = (h.option == OPT_GO).then(|| ClientPlace(export.clone()));
                        let sent = async {
                            send_reply(s, h.option, REP_INFO, &info_export(export.size(), EXPORT_FLAGS)).await?;
                            if req.infos.contains(&INFO_BLOCK_SIZE) {
                                send_reply(s, h.option, REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD)).await?;
                            }
                            send_reply(s, h.option, REP_ACK, &[]).await
                        }
                        .await;
                        sent?;
                        if let Some(place) = place {
                            return Ok(Some((place, structured)));
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

/// Accepts connections on `listener` until `shutdown` turns true. Past the node's connection
/// cap a connection is closed at once; the ones already served are not disturbed.
pub async fn run<L: Listen>(
    listener: L,
    lookup: Arc<dyn ExportLookup>,
    budgets: Arc<Budgets>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept_stream() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "accept failed"); tokio::time::sleep(std::time::Duration::from_millis(50)).await; continue }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let Some(slot) = budgets.admit() else { continue };
        let (lookup, budgets, shutdown) = (lookup.clone(), budgets.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(stream, lookup, budgets, shutdown).await {
                tracing::info!(error = %e, "nbd connection closed");
            }
            drop(slot);
        });
    }
}
