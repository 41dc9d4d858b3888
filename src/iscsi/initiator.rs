//! The iSCSI initiator: one TCP connection and one session to one LUN, logged in on demand,
//! with several READ(16)s in flight inside the target's CmdSN window and Data-In reassembled by
//! ITT and buffer offset. It is a [`ChunkSource`]: the fetch layer reads bytes, the initiator
//! turns them into whole-block reads no longer than MaxBurstLength.
//!
//! Invariants:
//! - every command waiting on a connection is answered or failed when that connection dies,
//!   and a command unanswered for [`IO_TIMEOUT`] kills the connection: nothing hangs;
//! - ErrorRecoveryLevel 0: any protocol or digest error drops the connection; a read whose
//!   connection died under it is reissued on a new session (a few times, with backoff), and
//!   further retries are the fetch layer's (`fetch::flight`), which verifies every chunk
//!   against the manifest before caching it;
//! - the reader task never waits on the writer (answers to target NOP-Ins go out from a task
//!   of their own), so a full socket in one direction cannot deadlock the other;
//! - a LUN whose capacity changes between sessions is refused, not read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

mod reader;
mod state;

use reader::{read_loop, read_pdu};
use state::{Reply, Shared, State, Task};

use super::chap::Credentials;
use super::login::{Established, Login, LoginError, LoginParams, Negotiated, Step};
use super::pdu::*;
use super::scsi::{self, BlockSize, Capacity, Lba, ScsiError};
use crate::fetch::{BoxFuture, ChunkSource, SourceError};

/// Longest wait for a connection and login, for one write, or for one command's answer before
/// the connection is declared dead (as `nbd::client::IO_TIMEOUT`).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The name this initiator logs in with.
pub const INITIATOR_NAME: &str = "iqn.2026-01.org.vmthunder:vmtd";
/// The iSCSI port registered with IANA.
pub const ISCSI_DEFAULT_PORT: u16 = 3260;
/// How often one read is reissued after its connection died, and the first pause before it.
const REISSUES: u32 = 3;
const REISSUE_BACKOFF: Duration = Duration::from_millis(100);
/// How long a logout may take before the connection is simply closed.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// The CmdSN the leading login carries (any value works; the target echoes it in ExpCmdSN).
const FIRST_CMD_SN: u32 = 1;
const LOGIN_ITT: u32 = 0;

/// Where the LUN is: `iscsi://HOST[:PORT]/IQN/LUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiTarget {
    pub host: String,
    pub port: u16,
    pub iqn: String,
    pub lun: u16,
}

/// How to log in.
#[derive(Debug, Clone, Default)]
pub struct IscsiOptions {
    pub credentials: Option<Credentials>,
    /// Offer CRC32C header and data digests (the target chooses).
    pub digests: Digests,
}

/// Errors of one command or of one session.
#[derive(Debug, Clone, Error)]
pub enum IscsiError {
    #[error("connection: {0}")]
    Io(String),
    #[error("{0}")]
    Timeout(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("bad PDU from target: {0}")]
    Pdu(#[from] PduError),
    #[error("login: {0}")]
    Login(#[from] LoginError),
    #[error("{0}")]
    Scsi(#[from] ScsiError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl IscsiError {
    /// Whether the same read may be reissued at once on a new session.
    fn reissuable(&self) -> bool {
        match self {
            IscsiError::Lost(_) => true,
            IscsiError::Scsi(e) => e.is_transient(),
            _ => false,
        }
    }
}

type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// A logged-in session on one connection.
struct Session {
    shared: Arc<Shared>,
    writer: Writer,
    reader: JoinHandle<()>,
    negotiated: Negotiated,
    lun: u64,
    next_itt: AtomicU32,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.kill("session closed");
        self.reader.abort();
    }
}

async fn write_pdu(writer: &Writer, bytes: &[u8]) -> Result<(), IscsiError> {
    let mut w = writer.lock().await;
    match tokio::time::timeout(IO_TIMEOUT, w.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(IscsiError::Io(e.to_string())),
        Err(_) => Err(IscsiError::Timeout(format!("write blocked for {}s", IO_TIMEOUT.as_secs()))),
    }
}

impl Session {
    fn is_dead(&self) -> bool {
        self.shared.state.lock().unwrap().dead.is_some()
    }

    fn kill(&self, reason: &str) {
        self.shared.kill(reason);
        self.reader.abort();
    }

    fn new_itt(&self) -> u32 {
        loop {
            let itt = self.next_itt.fetch_add(1, Ordering::Relaxed);
            if itt != RESERVED_TAG && itt != LOGIN_ITT {
                return itt;
            }
        }
    }

    /// Sends a command once the CmdSN window allows; returns where its answer will arrive.
    async fn submit(&self, cdb: [u8; 16], expected_len: u32) -> Result<oneshot::Receiver<Reply>, IscsiError> {
        let itt = self.new_itt();
        let (tx, rx) = oneshot::channel();
        let mut waiter = Some(tx);
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let open = {
                let st = self.shared.state.lock().unwrap();
                if let Some(r) = &st.dead {
                    return Err(IscsiError::Lost(r.clone()));
                }
                st.window_open()
            };
            if !open {
                if tokio::time::timeout(IO_TIMEOUT, notified).await.is_err() {
                    self.kill("CmdSN window stayed closed");
                    return Err(IscsiError::Timeout(format!(
                        "target kept its command window closed for {}s",
                        IO_TIMEOUT.as_secs()
                    )));
                }
                continue;
            }
            // CmdSN is taken under the writer lock so commands leave in CmdSN order.
            let mut w = self.writer.lock().await;
            let bytes = {
                let mut st = self.shared.state.lock().unwrap();
                if let Some(r) = &st.dead {
                    return Err(IscsiError::Lost(r.clone()));
                }
                if !st.window_open() {
                    continue;
                }
                let cmd = ScsiCommand {
                    lun: self.lun,
                    itt,
                    expected_len,
                    cmd_sn: st.cmd_sn,
                    exp_stat_sn: st.exp_stat_sn,
                    cdb,
                };
                st.cmd_sn = st.cmd_sn.wrapping_add(1);
                let task =
                    Task { buf: vec![0u8; expected_len as usize], received: 0, next_data_sn: 0, waiter: waiter.take() };
                st.tasks.insert(itt, task);
                cmd.to_pdu().encode(self.negotiated.digests)
            };
            let sent = tokio::time::timeout(IO_TIMEOUT, w.write_all(&bytes)).await;
            drop(w);
            return match sent {
                Ok(Ok(())) => Ok(rx),
                Ok(Err(e)) => {
                    self.kill(&e.to_string());
                    Err(IscsiError::Lost(e.to_string()))
                }
                Err(_) => {
                    self.kill("write timed out");
                    Err(IscsiError::Timeout(format!("write blocked for {}s", IO_TIMEOUT.as_secs())))
                }
            };
        }
    }

    /// Waits for a submitted command's data (at most `expected_len` bytes; fewer on underflow).
    async fn complete(&self, rx: oneshot::Receiver<Reply>) -> Reply {
        match tokio::time::timeout(IO_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(IscsiError::Lost("connection closed".into())),
            Err(_) => {
                self.kill("command timed out");
                Err(IscsiError::Timeout(format!("no answer in {}s", IO_TIMEOUT.as_secs())))
            }
        }
    }

    async fn command(&self, cdb: [u8; 16], expected_len: u32) -> Reply {
        let rx = self.submit(cdb, expected_len).await?;
        self.complete(rx).await
    }

    /// Closes the session politely: Logout Request, then wait (bounded) for its response.
    async fn logout(&self) {
        let itt = self.new_itt();
        let (tx, rx) = oneshot::channel();
        let bytes = {
            let mut st = self.shared.state.lock().unwrap();
            if st.dead.is_some() {
                return;
            }
            st.logout = Some((itt, tx));
            LogoutRequest { itt, cid: 0, cmd_sn: st.cmd_sn, exp_stat_sn: st.exp_stat_sn }
                .to_pdu()
                .encode(self.negotiated.digests)
        };
        if write_pdu(&self.writer, &bytes).await.is_ok() {
            let _ = tokio::time::timeout(LOGOUT_TIMEOUT, rx).await;
        }
        self.kill("logged out");
    }
}

/// A reconnecting initiator for one LUN.
pub struct IscsiClient {
    target: IscsiTarget,
    options: IscsiOptions,
    /// Kept across reconnects so a new login reinstates (replaces) the old session.
    isid: [u8; 6],
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    capacity: Mutex<Option<Capacity>>,
}

impl IscsiClient {
    pub fn new(target: IscsiTarget, options: IscsiOptions) -> Self {
        // ISID of the "random" type (RFC 7143 §11.12.5): 0b10 then 22 bits, then a qualifier.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 24);
        let r = seed.to_be_bytes();
        let isid = [0x80 | (r[7] & 0x3f), r[6], r[5], r[4], r[3], r[2]];
        IscsiClient { target, options, isid, session: tokio::sync::Mutex::new(None), capacity: Mutex::new(None) }
    }

    fn source_error(&self, e: IscsiError) -> SourceError {
        let what = self.describe();
        match e {
            IscsiError::Io(_) | IscsiError::Timeout(_) | IscsiError::Lost(_) => {
                SourceError::Unreachable { what, reason: e.to_string() }
            }
            IscsiError::Login(ref l) if l.is_transient() => SourceError::Unreachable { what, reason: e.to_string() },
            IscsiError::Login(ref l @ (LoginError::Refused { .. } | LoginError::NeedsChap)) => {
                SourceError::Refused { what, reason: l.to_string() }
            }
            IscsiError::Scsi(_) => SourceError::Io { what, reason: e.to_string() },
            _ => SourceError::Protocol { what, reason: e.to_string() },
        }
    }

    async fn session(&self) -> Result<Arc<Session>, IscsiError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_dead() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let s = tokio::time::timeout(IO_TIMEOUT, self.connect())
            .await
            .map_err(|_| IscsiError::Timeout(format!("connect and login took over {}s", IO_TIMEOUT.as_secs())))??;
        *slot = Some(s.clone());
        Ok(s)
    }

    async fn connect(&self) -> Result<Arc<Session>, IscsiError> {
        let t = &self.target;
        let stream = TcpStream::connect((t.host.as_str(), t.port)).await.map_err(|e| IscsiError::Io(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(wr));
        let est = self.login(&mut rd, &writer).await?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dead: None,
                cmd_sn: est.window.exp_cmd_sn,
                exp_cmd_sn: est.window.exp_cmd_sn,
                max_cmd_sn: est.window.max_cmd_sn,
                exp_stat_sn: est.exp_stat_sn,
                tasks: HashMap::new(),
                logout: None,
            }),
            changed: Notify::new(),
        });
        let reader = tokio::spawn(read_loop(rd, shared.clone(), writer.clone(), est.negotiated));
        let s = Arc::new(Session {
            shared,
            writer,
            reader,
            negotiated: est.negotiated,
            lun: scsi::encode_lun(t.lun),
            next_itt: AtomicU32::new(1),
        });
        // A fresh session often starts with a UNIT ATTENTION (power on / reset): consume it.
        for _ in 0..4 {
            match s.command(scsi::test_unit_ready(), 0).await {
                Ok(_) => break,
                Err(IscsiError::Scsi(e)) if e.is_transient() => continue,
                Err(e) => return Err(e),
            }
        }
        let inq = scsi::parse_inquiry(&self.transient_retry(&s, scsi::inquiry(96), 96).await?)?;
        if inq.device_type != 0 {
            return Err(IscsiError::Protocol(format!(
                "LUN {} is not a disk (peripheral device type {:#x}, {} {})",
                t.lun, inq.device_type, inq.vendor, inq.product
            )));
        }
        let cap = self.transient_retry(&s, scsi::read_capacity_16(), scsi::READ_CAPACITY_16_LEN).await?;
        let cap = scsi::parse_read_capacity_16(&cap)?;
        {
            let mut known = self.capacity.lock().unwrap();
            if let Some(k) = *known {
                if k != cap {
                    return Err(IscsiError::Protocol(format!(
                        "LUN changed size: was {} blocks of {}, now {} blocks of {}",
                        k.blocks, k.block_size.0, cap.blocks, cap.block_size.0
                    )));
                }
            }
            *known = Some(cap);
        }
        tracing::info!(
            origin = %self.describe(),
            blocks = cap.blocks,
            block_size = cap.block_size.0,
            max_burst = est.negotiated.max_burst,
            header_digest = est.negotiated.digests.header,
            data_digest = est.negotiated.digests.data,
            "logged in to iSCSI target"
        );
        Ok(s)
    }

    async fn transient_retry(&self, s: &Session, cdb: [u8; 16], len: u32) -> Reply {
        let mut tries = 0;
        loop {
            match s.command(cdb, len).await {
                Err(IscsiError::Scsi(e)) if e.is_transient() && tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    async fn login(&self, rd: &mut OwnedReadHalf, writer: &Writer) -> Result<Established, IscsiError> {
        let params = LoginParams {
            initiator_name: INITIATOR_NAME.into(),
            target_name: self.target.iqn.clone(),
            credentials: self.options.credentials.clone(),
            want_digests: self.options.digests,
            isid: self.isid,
        };
        let mut login = Login::new(params, LOGIN_ITT, FIRST_CMD_SN);
        let mut req = login.start();
        loop {
            // Digests are off until login completes.
            write_pdu(writer, &req.to_pdu().encode(Digests::default())).await?;
            let rsp = match read_pdu(rd, Digests::default(), super::login::OUR_MAX_RECV_DATA_SEGMENT).await? {
                TargetPdu::Login(r) => r,
                TargetPdu::Reject(r) => {
                    return Err(IscsiError::Protocol(format!("target rejected login: {}", reject_reason(r.reason))))
                }
                other => return Err(IscsiError::Protocol(format!("unexpected PDU during login: {other:?}"))),
            };
            match login.on_response(rsp)? {
                Step::Send(next) => req = next,
                Step::Done(est) => return Ok(est),
            }
        }
    }

    /// The LUN's capacity (logs in to learn it the first time).
    async fn capacity(&self) -> Result<Capacity, IscsiError> {
        if let Some(c) = *self.capacity.lock().unwrap() {
            return Ok(c);
        }
        self.session().await?;
        Ok(self.capacity.lock().unwrap().expect("set by login"))
    }

    /// Reads whole blocks `[first, first + count)` in commands of at most MaxBurstLength bytes,
    /// all in flight at once; a piece whose connection died is reissued on a new session.
    async fn read_blocks(&self, first: Lba, count: u64, bs: BlockSize) -> Result<Vec<u8>, IscsiError> {
        let bsz = u64::from(bs.0);
        let mut out = Vec::with_capacity((count * bsz) as usize);
        let s = self.session().await?;
        let per = (u64::from(s.negotiated.max_burst) / bsz).max(1);
        let mut pieces = Vec::new();
        let mut lba = first.0;
        while lba < first.0 + count {
            let n = per.min(first.0 + count - lba);
            pieces.push((Lba(lba), n as u32));
            lba += n;
        }
        let mut sent = Vec::with_capacity(pieces.len());
        for &(lba, n) in &pieces {
            sent.push(s.submit(scsi::read_16(lba, n), n * bs.0).await);
        }
        for ((lba, n), rx) in pieces.into_iter().zip(sent) {
            let first_try = match rx {
                Ok(rx) => s.complete(rx).await,
                Err(e) => Err(e),
            };
            let data = match first_try {
                Ok(d) => Ok(d),
                Err(e) if e.reissuable() => self.reissue(lba, n, bs, e).await,
                Err(e) => Err(e),
            }?;
            if data.len() != (u64::from(n) * bsz) as usize {
                return Err(IscsiError::Protocol(format!("READ(16) of {n} blocks returned {} bytes", data.len())));
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    async fn reissue(&self, lba: Lba, n: u32, bs: BlockSize, mut last: IscsiError) -> Reply {
        let mut pause = REISSUE_BACKOFF;
        for _ in 0..REISSUES {
            tokio::time::sleep(pause).await;
            pause *= 2;
            tracing::debug!(origin = %self.describe(), lba = lba.0, blocks = n, error = %last, "reissuing read");
            let s = self.session().await?;
            match s.command(scsi::read_16(lba, n), n * bs.0).await {
                Ok(d) => return Ok(d),
                Err(e) if e.reissuable() => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn read_bytes(&self, offset: u64, len: usize) -> Result<Vec<u8>, IscsiError> {
        let cap = self.capacity().await?;
        let size = cap.bytes().expect("checked by parse_read_capacity_16");
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(IscsiError::Protocol(format!("read of {len} bytes at {offset} beyond the LUN size {size}")));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // Round out to whole blocks, then slice the requested bytes back out.
        let bs = u64::from(cap.block_size.0);
        let first = offset / bs;
        let end = (offset + len as u64).div_ceil(bs);
        let data = self.read_blocks(Lba(first), end - first, cap.block_size).await?;
        let skip = (offset - first * bs) as usize;
        Ok(if skip == 0 && data.len() == len { data } else { data[skip..skip + len].to_vec() })
    }

    /// Logs out of the current session, if any (also done, best effort, on drop).
    pub async fn shutdown(&self) {
        let s = self.session.lock().await.take();
        if let Some(s) = s {
            s.logout().await;
        }
    }
}

impl Drop for IscsiClient {
    fn drop(&mut self) {
        let Some(s) = self.session.get_mut().take() else { return };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { s.logout().await });
        }
    }
}

impl ChunkSource for IscsiClient {
    fn describe(&self) -> String {
        let t = &self.target;
        let host = if t.host.contains(':') { format!("[{}]", t.host) } else { t.host.clone() };
        format!("iscsi://{host}:{}/{}/{}", t.port, t.iqn, t.lun)
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move {
            let cap = self.capacity().await.map_err(|e| self.source_error(e))?;
            Ok(cap.bytes().expect("checked by parse_read_capacity_16"))
        })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move {
            match self.read_bytes(offset, len).await {
                Ok(d) => Ok(d),
                Err(IscsiError::Protocol(r)) if r.contains("beyond the LUN size") => {
                    let size = self.capacity.lock().unwrap().and_then(|c| c.bytes()).unwrap_or(0);
                    Err(SourceError::OutOfRange { what: self.describe(), offset, len, size })
                }
                Err(e) => Err(self.source_error(e)),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shutdown())
    }
}
