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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

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

type Reply = Result<Vec<u8>, IscsiError>;

/// A command sent and not yet complete.
struct Task {
    buf: Vec<u8>,
    /// Bytes received so far; Data-In must arrive in order (DataPDUInOrder=Yes).
    received: usize,
    next_data_sn: u32,
    waiter: Option<oneshot::Sender<Reply>>,
}

/// Sequence numbers and commands of a session, guarded together.
struct State {
    dead: Option<String>,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    tasks: HashMap<u32, Task>,
    logout: Option<(u32, oneshot::Sender<()>)>,
}

/// True when `a` comes after `b` in serial number arithmetic (RFC 1982, 32 bits).
fn serial_gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

impl State {
    fn window_open(&self) -> bool {
        !serial_gt(self.cmd_sn, self.max_cmd_sn)
    }

    /// Applies the window of a target PDU; `stat` when it carries a valid StatSN.
    fn update(&mut self, w: &Window, stat: bool) {
        // MaxCmdSN = ExpCmdSN - 1 is a closed window; anything further behind is invalid.
        if !serial_gt(w.exp_cmd_sn, w.max_cmd_sn.wrapping_add(1)) {
            if serial_gt(w.exp_cmd_sn, self.exp_cmd_sn) {
                self.exp_cmd_sn = w.exp_cmd_sn;
            }
            if serial_gt(w.max_cmd_sn, self.max_cmd_sn) {
                self.max_cmd_sn = w.max_cmd_sn;
            }
        }
        if stat && serial_gt(w.stat_sn.wrapping_add(1), self.exp_stat_sn) {
            self.exp_stat_sn = w.stat_sn.wrapping_add(1);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken when the window moves or the connection dies.
    changed: Notify,
}

impl Shared {
    fn kill(&self, reason: &str) {
        let tasks = {
            let mut st = self.state.lock().unwrap();
            if st.dead.is_none() {
                st.dead = Some(reason.to_string());
            }
            st.logout = None;
            std::mem::take(&mut st.tasks)
        };
        for (_, t) in tasks {
            if let Some(w) = t.waiter {
                let _ = w.send(Err(IscsiError::Lost(reason.to_string())));
            }
        }
        self.changed.notify_waiters();
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

/// Reads target PDUs until the connection fails; then fails every waiting command.
async fn read_loop(rd: OwnedReadHalf, shared: Arc<Shared>, writer: Writer, n: Negotiated) {
    // Buffered: a 48-byte header and a small PDU cost no syscall of their own; reads as large
    // as the buffer bypass it. (Login reads stay unbuffered, so no byte is left behind there.)
    let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
    let reason = loop {
        match read_pdu(&mut rd, n.digests, n.our_max_recv).await {
            Err(e) => break e.to_string(),
            Ok(p) => {
                if let Err(e) = handle(p, &shared, &writer, n) {
                    break e.to_string();
                }
            }
        }
    };
    tracing::warn!(reason = %reason, "iSCSI connection ended");
    shared.kill(&reason);
}

async fn read_pdu<R: AsyncRead + Unpin>(rd: &mut R, digests: Digests, max_data: u32) -> Result<TargetPdu, IscsiError> {
    let mut bhs = [0u8; BHS_LEN];
    rd.read_exact(&mut bhs).await.map_err(|e| IscsiError::Io(e.to_string()))?;
    let f = Frame::of(&bhs, digests)?;
    if f.data_len > max_data as usize {
        return Err(IscsiError::Protocol(format!(
            "data segment of {} bytes exceeds our MaxRecvDataSegmentLength {max_data}",
            f.data_len
        )));
    }
    let mut rest = vec![0u8; f.rest_len];
    rd.read_exact(&mut rest).await.map_err(|e| IscsiError::Io(format!("truncated PDU: {e}")))?;
    Ok(TargetPdu::parse(Pdu::decode_owned(&bhs, rest, digests)?)?)
}

/// Handles one PDU of the full feature phase; an error kills the connection.
fn handle(p: TargetPdu, shared: &Shared, writer: &Writer, n: Negotiated) -> Result<(), IscsiError> {
    let mut st = shared.state.lock().unwrap();
    let proto = |s: String| Err(IscsiError::Protocol(s));
    match p {
        TargetPdu::DataIn(d) => {
            st.update(&d.window, d.status.is_some());
            let Some(t) = st.tasks.get_mut(&d.itt) else {
                return proto(format!("Data-In for unknown ITT {:#x}", d.itt));
            };
            if d.data_sn != t.next_data_sn {
                return proto(format!("Data-In DataSN {} where {} was due", d.data_sn, t.next_data_sn));
            }
            if d.offset as usize != t.received {
                return proto(format!("Data-In at offset {} where {} was due (out of order)", d.offset, t.received));
            }
            let end = t.received + d.data.len();
            if end > t.buf.len() {
                return proto(format!(
                    "Data-In of {} bytes at {} overruns the {}-byte read",
                    d.data.len(),
                    d.offset,
                    t.buf.len()
                ));
            }
            t.buf[t.received..end].copy_from_slice(&d.data);
            t.received = end;
            t.next_data_sn = t.next_data_sn.wrapping_add(1);
            if let Some(status) = d.status {
                let t = st.tasks.remove(&d.itt).expect("present");
                finish(t, status, &[], d.residual);
            }
        }
        TargetPdu::ScsiResponse(r) => {
            st.update(&r.window, true);
            let Some(t) = st.tasks.remove(&r.itt) else {
                return proto(format!("SCSI Response for unknown ITT {:#x}", r.itt));
            };
            if r.response != 0 {
                if let Some(w) = t.waiter {
                    let _ = w.send(Err(IscsiError::Protocol(format!(
                        "target failed the command (response {:#x})",
                        r.response
                    ))));
                }
            } else {
                finish(t, r.status, &r.sense, r.residual);
            }
        }
        TargetPdu::NopIn(nop) => {
            st.update(&nop.window, nop.itt != RESERVED_TAG);
            if nop.ttt != RESERVED_TAG {
                // The target pings: answer with its TTT, from a task of its own (see invariants).
                let out = NopOut {
                    lun: nop.lun,
                    itt: RESERVED_TAG,
                    ttt: nop.ttt,
                    cmd_sn: st.cmd_sn,
                    exp_stat_sn: st.exp_stat_sn,
                    data: nop.data,
                };
                let bytes = out.to_pdu().encode(n.digests);
                let writer = writer.clone();
                tokio::spawn(async move {
                    let _ = write_pdu(&writer, &bytes).await;
                });
            }
        }
        TargetPdu::Reject(r) => {
            st.update(&r.window, true);
            let reason = format!("target rejected a PDU: {} ({:#04x})", reject_reason(r.reason), r.reason);
            match r.rejected_itt.and_then(|itt| st.tasks.remove(&itt)) {
                Some(t) => {
                    if let Some(w) = t.waiter {
                        let _ = w.send(Err(IscsiError::Protocol(reason)));
                    }
                }
                None => return proto(reason),
            }
        }
        TargetPdu::Logout(l) => {
            st.update(&l.window, true);
            match st.logout.take() {
                Some((itt, tx)) if itt == l.itt => {
                    let _ = tx.send(());
                }
                _ => return proto("unsolicited Logout Response".into()),
            }
        }
        TargetPdu::Async(a) => {
            st.update(&a.window, true);
            // 1: logout requested, 2: connection drop, 3: session drop, 4: renegotiation.
            // With ErrorRecoveryLevel 0 each means: end this session, reads go to a new one.
            if (1..=4).contains(&a.event) {
                return proto(format!("target ends the session (asynchronous event {})", a.event));
            }
        }
        TargetPdu::Login(_) | TargetPdu::Text { .. } => return proto("login or text PDU in full feature phase".into()),
    }
    drop(st);
    shared.changed.notify_waiters();
    Ok(())
}

fn finish(t: Task, status: u8, sense: &[u8], residual: Residual) {
    let result = scsi::check_status(status, sense).map_err(IscsiError::from).and_then(|()| {
        let mut buf = t.buf;
        if residual.underflow {
            // The target says it sent fewer bytes: keep only what came.
            let sent = buf.len().saturating_sub(residual.count as usize);
            if t.received < sent {
                return Err(IscsiError::Protocol(format!("target reported {sent} bytes, sent {}", t.received)));
            }
            buf.truncate(sent);
        } else if t.received != buf.len() {
            return Err(IscsiError::Protocol(format!("target sent {} of {} bytes", t.received, buf.len())));
        }
        Ok(buf)
    });
    if let Some(w) = t.waiter {
        let _ = w.send(result);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic() {
        assert!(serial_gt(2, 1));
        assert!(serial_gt(0, u32::MAX));
        assert!(!serial_gt(1, 1));
        assert!(!serial_gt(u32::MAX, 0));
    }

    #[test]
    fn window_rules() {
        let mut st = State {
            dead: None,
            cmd_sn: 10,
            exp_cmd_sn: 10,
            max_cmd_sn: 9,
            exp_stat_sn: 0,
            tasks: HashMap::new(),
            logout: None,
        };
        assert!(!st.window_open(), "MaxCmdSN = ExpCmdSN - 1 is closed");
        st.update(&Window { stat_sn: 4, exp_cmd_sn: 10, max_cmd_sn: 12 }, true);
        assert!(st.window_open());
        assert_eq!(st.exp_stat_sn, 5);
        // An invalid window (MaxCmdSN far behind ExpCmdSN) and a stale one are ignored.
        st.update(&Window { stat_sn: 1, exp_cmd_sn: 10, max_cmd_sn: 5 }, true);
        st.update(&Window { stat_sn: 1, exp_cmd_sn: 9, max_cmd_sn: 11 }, true);
        assert_eq!((st.exp_cmd_sn, st.max_cmd_sn, st.exp_stat_sn), (10, 12, 5));
    }
}
