//! The initiator's receive side: one task per connection reads target PDUs, matches them to
//! the session's commands by ITT, reassembles Data-In in order, and moves the CmdSN window.
//! It never waits on the writer (a NOP-In's answer goes out from a task of its own), and when
//! the connection fails it fails every command still waiting.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::OwnedReadHalf;

use super::{write_pdu, IscsiError, Shared, Task, Writer};
use crate::iscsi::login::Negotiated;
use crate::iscsi::pdu::*;
use crate::iscsi::scsi;

/// Reads target PDUs until the connection fails; then fails every waiting command.
pub(super) async fn read_loop(rd: OwnedReadHalf, shared: Arc<Shared>, writer: Writer, n: Negotiated) {
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

pub(super) async fn read_pdu<R: AsyncRead + Unpin>(
    rd: &mut R,
    digests: Digests,
    max_data: u32,
) -> Result<TargetPdu, IscsiError> {
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
                // The target pings: answer with its TTT, from a task of its own (the
                // initiator's invariants: the reader never waits on the writer).
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
