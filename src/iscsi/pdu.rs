//! iSCSI PDU codec (RFC 7143 §11), I/O-free: the 48-byte Basic Header Segment, additional header
//! segments, the data segment padded to 4 bytes and the optional CRC32C header and data digests.
//!
//! Invariants: decoding never panics and never allocates more than [`MAX_DATA_SEGMENT`] for a
//! data segment, whatever the bytes; every length is checked against what was received; a PDU
//! whose digest does not match is an error (ErrorRecoveryLevel 0: the caller drops the
//! connection). Only the PDUs a read-only initiator sends or expects are typed; anything else
//! decodes to a [`Pdu`] whose opcode the caller refuses.

use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Largest data segment accepted from a peer, whatever was negotiated: a hostile length field
/// cannot make us allocate more. (The 24-bit field allows 16 MiB - 1; we declare far less.)
pub const MAX_DATA_SEGMENT: usize = 8 << 20;
/// The reserved "no task" tag (ITT or TTT).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_LOGOUT_REQ: u8 = 0x06;
// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RSP: u8 = 0x21;
pub const OP_LOGIN_RSP: u8 = 0x23;
pub const OP_TEXT_RSP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RSP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

const FLAG_IMMEDIATE: u8 = 0x40;
const FLAG_FINAL: u8 = 0x80;

/// Errors decoding a PDU.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PduError {
    /// Fewer bytes than the header announces.
    #[error("truncated PDU: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    /// The data segment is longer than any we accept.
    #[error("data segment of {0} bytes exceeds the limit of {MAX_DATA_SEGMENT}")]
    TooLong(usize),
    /// The header digest does not match.
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest { got: u32, want: u32 },
    /// The data digest does not match.
    #[error("data digest mismatch (got {got:#010x}, computed {want:#010x})")]
    DataDigest { got: u32, want: u32 },
    /// A PDU of this opcode was not expected here.
    #[error("unexpected PDU opcode {0:#04x}")]
    Opcode(u8),
    /// A field holds a value the protocol forbids.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

/// Which digests are in force on a connection (both off during login).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// CRC32C as iSCSI sends it: little-endian on the wire (RFC 7143 §13.1 and its examples).
fn digest_bytes(bytes: &[&[u8]]) -> u32 {
    bytes.iter().fold(0, |crc, b| crc32c::crc32c_append(crc, b))
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// A raw PDU: header fields plus AHS and data segment (without padding or digests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

/// What the first 48 bytes say about the rest of a PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// AHS bytes (a multiple of 4).
    pub ahs_len: usize,
    /// Data segment bytes, without padding.
    pub data_len: usize,
    /// Bytes after the BHS: AHS, header digest, padded data, data digest.
    pub rest_len: usize,
}

impl Frame {
    /// Reads the lengths of a PDU from its BHS and checks them against the limits.
    pub fn of(bhs: &[u8; BHS_LEN], digests: Digests) -> Result<Frame, PduError> {
        let ahs_len = usize::from(bhs[4]) * 4;
        let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        if data_len > MAX_DATA_SEGMENT {
            return Err(PduError::TooLong(data_len));
        }
        let mut rest = ahs_len;
        if digests.header {
            rest += 4;
        }
        if data_len > 0 {
            rest += data_len + pad4(data_len);
            if digests.data {
                rest += 4;
            }
        }
        Ok(Frame { ahs_len, data_len, rest_len: rest })
    }
}

impl Pdu {
    /// An all-zero PDU of `opcode` with the F bit set.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        bhs[1] = FLAG_FINAL;
        Pdu { bhs, ahs: Vec::new(), data: Vec::new() }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & FLAG_IMMEDIATE != 0
    }
    pub fn set_immediate(&mut self) {
        self.bhs[0] |= FLAG_IMMEDIATE;
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().expect("4 bytes"))
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bhs[at..at + 8].try_into().expect("8 bytes"))
    }
    pub fn set_u64(&mut self, at: usize, v: u64) {
        self.bhs[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// The wire form of this PDU with `digests` applied. Lengths come from `ahs` and `data`.
    ///
    /// Panics if the AHS is not a multiple of 4 or too long, or the data segment is over
    /// [`MAX_DATA_SEGMENT`]: both are programming errors on our side, never peer input.
    pub fn encode(&self, digests: Digests) -> Vec<u8> {
        assert!(self.ahs.len() % 4 == 0 && self.ahs.len() <= 255 * 4, "AHS length");
        assert!(self.data.len() <= MAX_DATA_SEGMENT, "data segment length");
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5..8].copy_from_slice(&(self.data.len() as u32).to_be_bytes()[1..]);
        let pad = pad4(self.data.len());
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + self.data.len() + pad + 8);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if digests.header {
            out.extend_from_slice(&digest_bytes(&[&out]).to_le_bytes());
        }
        if !self.data.is_empty() {
            out.extend_from_slice(&self.data);
            out.extend_from_slice(&[0u8; 3][..pad]);
            if digests.data {
                out.extend_from_slice(&digest_bytes(&[&self.data, &[0u8; 3][..pad]]).to_le_bytes());
            }
        }
        out
    }

    /// Decodes a PDU from its BHS and the `rest` bytes [`Frame::of`] asked for.
    pub fn decode(bhs: &[u8; BHS_LEN], rest: &[u8], digests: Digests) -> Result<Pdu, PduError> {
        let f = Frame::of(bhs, digests)?;
        if rest.len() < f.rest_len {
            return Err(PduError::Truncated { have: BHS_LEN + rest.len(), need: BHS_LEN + f.rest_len });
        }
        let ahs = &rest[..f.ahs_len];
        let mut at = f.ahs_len;
        if digests.header {
            let got = u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
            let want = digest_bytes(&[bhs, ahs]);
            if got != want {
                return Err(PduError::HeaderDigest { got, want });
            }
            at += 4;
        }
        let mut data = Vec::new();
        if f.data_len > 0 {
            let padded = f.data_len + pad4(f.data_len);
            let seg = &rest[at..at + padded];
            if digests.data {
                let got = u32::from_le_bytes(rest[at + padded..at + padded + 4].try_into().expect("4 bytes"));
                let want = digest_bytes(&[seg]);
                if got != want {
                    return Err(PduError::DataDigest { got, want });
                }
            }
            data = seg[..f.data_len].to_vec();
        }
        Ok(Pdu { bhs: *bhs, ahs: ahs.to_vec(), data })
    }

    /// As [`Pdu::decode`], taking `rest` by value: when no AHS or header digest precedes the
    /// data segment, `rest` itself becomes the data (truncated), so a large Data-In is not copied
    /// once more on its way to the command's buffer.
    pub fn decode_owned(bhs: &[u8; BHS_LEN], mut rest: Vec<u8>, digests: Digests) -> Result<Pdu, PduError> {
        let f = Frame::of(bhs, digests)?;
        if f.ahs_len != 0 || digests.header || rest.len() < f.rest_len {
            return Pdu::decode(bhs, &rest, digests);
        }
        if f.data_len > 0 && digests.data {
            let padded = f.data_len + pad4(f.data_len);
            let got = u32::from_le_bytes(rest[padded..padded + 4].try_into().expect("4 bytes"));
            let want = digest_bytes(&[&rest[..padded]]);
            if got != want {
                return Err(PduError::DataDigest { got, want });
            }
        }
        rest.truncate(f.data_len);
        Ok(Pdu { bhs: *bhs, ahs: Vec::new(), data: rest })
    }

    /// Decodes one PDU from the front of `buf`: `Ok(None)` when more bytes are needed, else the
    /// PDU and how many bytes it took.
    pub fn decode_prefix(buf: &[u8], digests: Digests) -> Result<Option<(Pdu, usize)>, PduError> {
        let Some(bhs) = buf.get(..BHS_LEN) else { return Ok(None) };
        let bhs: &[u8; BHS_LEN] = bhs.try_into().expect("48 bytes");
        let f = Frame::of(bhs, digests)?;
        let Some(rest) = buf.get(BHS_LEN..BHS_LEN + f.rest_len) else { return Ok(None) };
        Ok(Some((Pdu::decode(bhs, rest, digests)?, BHS_LEN + f.rest_len)))
    }
}

/// Sequence numbers every target PDU after login may carry (RFC 7143 §11.2 and the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login stages (CSG/NSG).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// A Login Request (§11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

impl LoginRequest {
    pub fn to_pdu(&self) -> Pdu {
        let mut p = Pdu::new(OP_LOGIN_REQ);
        p.set_immediate();
        p.bhs[1] = (u8::from(self.transit) << 7) | ((self.csg & 3) << 2) | (self.nsg & 3);
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.bhs[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        p.set_u32(16, self.itt);
        p.bhs[20..22].copy_from_slice(&self.cid.to_be_bytes());
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.data = self.data.clone();
        p
    }
}

/// A Login Response (§11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_active: u8,
    pub tsih: u16,
    pub itt: u32,
    pub window: Window,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

/// A SCSI Command (§11.3); read-only: the W bit is never set and no data is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub lun: u64,
    pub itt: u32,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    pub fn to_pdu(&self) -> Pdu {
        let mut p = Pdu::new(OP_SCSI_CMD);
        // F, R (read) when data is expected, task attribute SIMPLE (1).
        p.bhs[1] = FLAG_FINAL | if self.expected_len > 0 { 0x40 } else { 0 } | 1;
        p.set_u64(8, self.lun);
        p.set_u32(16, self.itt);
        p.set_u32(20, self.expected_len);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.bhs[32..48].copy_from_slice(&self.cdb);
        p
    }
}

/// Residual flags and count of a SCSI Response or a final Data-In (§11.4.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

fn residual(flags: u8, count: u32) -> Residual {
    Residual { overflow: flags & 0x04 != 0, underflow: flags & 0x02 != 0, count }
}

/// A SCSI Response (§11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub itt: u32,
    /// iSCSI service response: 0 = command completed at target.
    pub response: u8,
    /// SCSI status: 0 = GOOD, 2 = CHECK CONDITION, ...
    pub status: u8,
    pub window: Window,
    pub residual: Residual,
    /// Sense data (without its 2-byte length), empty if none.
    pub sense: Vec<u8>,
}

/// A SCSI Data-In (§11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub itt: u32,
    pub final_: bool,
    /// Status follows in this PDU (S bit): no SCSI Response will come.
    pub status: Option<u8>,
    pub residual: Residual,
    /// Only meaningful when `status` is set (StatSN is valid only then).
    pub window: Window,
    pub data_sn: u32,
    pub offset: u32,
    pub data: Vec<u8>,
}

/// A NOP-In (§11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub window: Window,
    pub data: Vec<u8>,
}

/// A NOP-Out (§11.18): a ping of ours (`itt` set, `ttt` reserved) or an answer to a target's
/// NOP-In (`itt` reserved, its `ttt` and `lun` echoed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Vec<u8>,
}

impl NopOut {
    pub fn to_pdu(&self) -> Pdu {
        let mut p = Pdu::new(OP_NOP_OUT);
        p.set_immediate();
        p.set_u64(8, self.lun);
        p.set_u32(16, self.itt);
        p.set_u32(20, self.ttt);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.data = self.data.clone();
        p
    }
}

/// A Logout Request closing the session (§11.14, reason code 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LogoutRequest {
    pub fn to_pdu(&self) -> Pdu {
        let mut p = Pdu::new(OP_LOGOUT_REQ);
        p.set_immediate();
        p.bhs[1] = FLAG_FINAL; // reason 0: close the session
        p.set_u32(16, self.itt);
        p.bhs[20..22].copy_from_slice(&self.cid.to_be_bytes());
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p
    }
}

/// A Logout Response (§11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    pub itt: u32,
    pub response: u8,
    pub window: Window,
}

/// A Reject (§11.17): the target refused one of our PDUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub window: Window,
    /// The ITT of the rejected PDU, when its header came back whole.
    pub rejected_itt: Option<u32>,
}

/// An Asynchronous Message (§11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub event: u8,
    pub window: Window,
}

/// Every PDU a target may send to a read-only initiator, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPdu {
    Login(LoginResponse),
    ScsiResponse(ScsiResponse),
    DataIn(DataIn),
    NopIn(NopIn),
    Logout(LogoutResponse),
    Reject(Reject),
    Async(AsyncMessage),
    /// A Text Response: its key=value data.
    Text {
        itt: u32,
        final_: bool,
        ttt: u32,
        window: Window,
        data: Vec<u8>,
    },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> PduError {
    PduError::Malformed { what, reason: reason.into() }
}

impl TargetPdu {
    /// Types a PDU received from a target; initiator opcodes and R2T (we never write) are errors.
    pub fn parse(p: Pdu) -> Result<TargetPdu, PduError> {
        let window = Window { stat_sn: p.u32_at(24), exp_cmd_sn: p.u32_at(28), max_cmd_sn: p.u32_at(32) };
        let flags = p.flags();
        Ok(match p.opcode() {
            OP_LOGIN_RSP => TargetPdu::Login(LoginResponse {
                transit: flags & 0x80 != 0,
                cont: flags & 0x40 != 0,
                csg: (flags >> 2) & 3,
                nsg: flags & 3,
                version_active: p.bhs[3],
                tsih: u16::from_be_bytes([p.bhs[14], p.bhs[15]]),
                itt: p.itt(),
                window,
                status_class: p.bhs[36],
                status_detail: p.bhs[37],
                data: p.data,
            }),
            OP_SCSI_RSP => {
                let sense = if p.data.is_empty() {
                    Vec::new()
                } else {
                    let Some(len) = p.data.get(..2) else {
                        return Err(malformed("SCSI Response", "data segment shorter than its sense length"));
                    };
                    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                    match p.data.get(2..2 + len) {
                        Some(s) => s.to_vec(),
                        None => {
                            return Err(malformed(
                                "SCSI Response",
                                format!("sense length {len} exceeds the {}-byte data segment", p.data.len()),
                            ))
                        }
                    }
                };
                TargetPdu::ScsiResponse(ScsiResponse {
                    itt: p.itt(),
                    response: p.bhs[2],
                    status: p.bhs[3],
                    window,
                    residual: residual(flags, p.u32_at(44)),
                    sense,
                })
            }
            OP_DATA_IN => {
                let status_bit = flags & 0x01 != 0;
                let final_ = flags & 0x80 != 0;
                if status_bit && !final_ {
                    return Err(malformed("Data-In", "S bit without F bit"));
                }
                TargetPdu::DataIn(DataIn {
                    itt: p.itt(),
                    final_,
                    status: status_bit.then_some(p.bhs[3]),
                    residual: residual(flags, p.u32_at(44)),
                    window,
                    data_sn: p.u32_at(36),
                    offset: p.u32_at(40),
                    data: p.data,
                })
            }
            OP_NOP_IN => {
                TargetPdu::NopIn(NopIn { lun: p.u64_at(8), itt: p.itt(), ttt: p.u32_at(20), window, data: p.data })
            }
            OP_LOGOUT_RSP => TargetPdu::Logout(LogoutResponse { itt: p.itt(), response: p.bhs[2], window }),
            OP_REJECT => TargetPdu::Reject(Reject {
                reason: p.bhs[2],
                window,
                rejected_itt: p.data.get(16..20).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes"))),
            }),
            OP_ASYNC => TargetPdu::Async(AsyncMessage { event: p.bhs[36], window }),
            OP_TEXT_RSP => {
                TargetPdu::Text { itt: p.itt(), final_: flags & 0x80 != 0, ttt: p.u32_at(20), window, data: p.data }
            }
            op => return Err(PduError::Opcode(op)),
        })
    }
}

/// Reject reasons (§11.17.1), for messages.
pub fn reject_reason(code: u8) -> &'static str {
    match code {
        0x02 => "data (payload) digest error",
        0x03 => "SNACK reject",
        0x04 => "protocol error",
        0x05 => "command not supported",
        0x06 => "immediate command reject",
        0x07 => "task in progress",
        0x08 => "invalid data ack",
        0x09 => "invalid PDU field",
        0x0a => "long operation reject: out of resources",
        0x0c => "waiting for logout",
        _ => "unknown reason",
    }
}

#[cfg(test)]
mod tests;
