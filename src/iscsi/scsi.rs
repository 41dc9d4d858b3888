//! SCSI commands a read cache needs (SPC-4/SBC-3): CDBs for TEST UNIT READY, INQUIRY,
//! READ CAPACITY(16), REPORT LUNS and READ(16); parsing of their answers; and decoding of
//! status and sense data into errors an operator can read. Pure functions, no I/O.
//!
//! Invariant: every parser checks lengths first; short or odd answers are errors, never panics.

use thiserror::Error;

/// A block count or address in logical blocks, kept apart from byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lba(pub u64);

/// A logical block size in bytes (a power of two from 512 to 1 MiB once validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(pub u32);

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const SENSE_UNIT_ATTENTION: u8 = 0x6;

/// Errors a SCSI command ended with, or answers we cannot use.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ScsiError {
    /// CHECK CONDITION with sense data.
    #[error("{}", describe_sense(*key, *asc, *ascq))]
    Sense { key: u8, asc: u8, ascq: u8 },
    /// A non-GOOD status without usable sense data.
    #[error("SCSI status {code:#04x} ({name})", code = .0, name = status_name(*.0))]
    Status(u8),
    /// An answer too short or inconsistent to use.
    #[error("bad {what} answer: {reason}")]
    Answer { what: &'static str, reason: String },
}

impl ScsiError {
    /// A transient condition the same command may succeed after (unit attention, busy, task
    /// set full): the initiator reissues instead of failing.
    pub fn is_transient(&self) -> bool {
        match self {
            ScsiError::Sense { key, .. } => *key == SENSE_UNIT_ATTENTION,
            ScsiError::Status(s) => matches!(s, 0x08 | 0x28),
            ScsiError::Answer { .. } => false,
        }
    }
}

pub fn test_unit_ready() -> [u8; 16] {
    [0u8; 16]
}

/// Standard INQUIRY of `alloc` bytes.
pub fn inquiry(alloc: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x12;
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// Length of the READ CAPACITY(16) answer we ask for.
pub const READ_CAPACITY_16_LEN: u32 = 32;

pub fn read_capacity_16() -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10; // SERVICE ACTION IN(16): READ CAPACITY(16)
    c[10..14].copy_from_slice(&READ_CAPACITY_16_LEN.to_be_bytes());
    c
}

pub fn report_luns(alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0xa0;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

pub fn read_16(lba: Lba, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.0.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The capacity of a logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_size: BlockSize,
}

impl Capacity {
    pub fn bytes(&self) -> Option<u64> {
        self.blocks.checked_mul(u64::from(self.block_size.0))
    }
}

fn answer(what: &'static str, reason: impl Into<String>) -> ScsiError {
    ScsiError::Answer { what, reason: reason.into() }
}

/// Parses a READ CAPACITY(16) answer.
pub fn parse_read_capacity_16(d: &[u8]) -> Result<Capacity, ScsiError> {
    if d.len() < 12 {
        return Err(answer("READ CAPACITY(16)", format!("{} bytes", d.len())));
    }
    let last = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    let bs = u32::from_be_bytes(d[8..12].try_into().expect("4 bytes"));
    if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
        return Err(answer("READ CAPACITY(16)", format!("block size {bs}")));
    }
    let blocks = last.checked_add(1).ok_or_else(|| answer("READ CAPACITY(16)", "last LBA overflows"))?;
    let cap = Capacity { blocks, block_size: BlockSize(bs) };
    cap.bytes().ok_or_else(|| answer("READ CAPACITY(16)", "capacity overflows 64 bits"))?;
    Ok(cap)
}

/// Standard INQUIRY data: peripheral device type and the vendor/product strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    pub device_type: u8,
    pub vendor: String,
    pub product: String,
}

pub fn parse_inquiry(d: &[u8]) -> Result<Inquiry, ScsiError> {
    if d.len() < 36 {
        return Err(answer("INQUIRY", format!("{} bytes", d.len())));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    Ok(Inquiry { device_type: d[0] & 0x1f, vendor: text(&d[8..16]), product: text(&d[16..32]) })
}

/// Parses REPORT LUNS data into LUN numbers (peripheral and flat addressing).
pub fn parse_report_luns(d: &[u8]) -> Result<Vec<u64>, ScsiError> {
    if d.len() < 8 {
        return Err(answer("REPORT LUNS", format!("{} bytes", d.len())));
    }
    let len = u32::from_be_bytes(d[..4].try_into().expect("4 bytes")) as usize;
    // The list may be longer than what we allocated: parse what came.
    let body = &d[8..d.len().min(8usize.saturating_add(len))];
    Ok(body.chunks_exact(8).map(|l| decode_lun(u64::from_be_bytes(l.try_into().expect("8 bytes")))).collect())
}

/// Encodes a LUN number into the 8-byte SAM form of the iSCSI header.
pub fn encode_lun(lun: u16) -> u64 {
    if lun < 256 {
        u64::from(lun) << 48
    } else {
        (0x4000 | u64::from(lun & 0x3fff)) << 48
    }
}

pub fn decode_lun(raw: u64) -> u64 {
    (raw >> 48) & 0x3fff
}

/// Decodes sense data (fixed 0x70/0x71 or descriptor 0x72/0x73 format).
pub fn decode_sense(s: &[u8]) -> Option<(u8, u8, u8)> {
    match s.first()? & 0x7f {
        0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
        0x70 | 0x71 if s.len() >= 3 => Some((s[2] & 0x0f, 0, 0)),
        0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
        _ => None,
    }
}

/// The error for a completed command's status and sense data; `Ok` for GOOD.
pub fn check_status(status: u8, sense: &[u8]) -> Result<(), ScsiError> {
    match status {
        STATUS_GOOD => Ok(()),
        STATUS_CHECK_CONDITION => match decode_sense(sense) {
            Some((key, asc, ascq)) => Err(ScsiError::Sense { key, asc, ascq }),
            None => Err(ScsiError::Status(status)),
        },
        s => Err(ScsiError::Status(s)),
    }
}

fn status_name(s: u8) -> &'static str {
    match s {
        0x02 => "CHECK CONDITION",
        0x08 => "BUSY",
        0x18 => "RESERVATION CONFLICT",
        0x28 => "TASK SET FULL",
        0x30 => "ACA ACTIVE",
        0x40 => "TASK ABORTED",
        _ => "unknown",
    }
}

fn sense_key_name(k: u8) -> &'static str {
    match k {
        0x0 => "NO SENSE",
        0x1 => "RECOVERED ERROR",
        0x2 => "NOT READY",
        0x3 => "MEDIUM ERROR",
        0x4 => "HARDWARE ERROR",
        0x5 => "ILLEGAL REQUEST",
        0x6 => "UNIT ATTENTION",
        0x7 => "DATA PROTECT",
        0x8 => "BLANK CHECK",
        0xb => "ABORTED COMMAND",
        _ => "OTHER",
    }
}

fn asc_name(asc: u8, ascq: u8) -> &'static str {
    match (asc, ascq) {
        (0x04, _) => "logical unit not ready",
        (0x11, _) => "unrecovered read error",
        (0x20, 0x00) => "invalid command operation code",
        (0x21, 0x00) => "logical block address out of range",
        (0x24, 0x00) => "invalid field in CDB",
        (0x25, 0x00) => "logical unit not supported",
        (0x28, 0x00) => "medium may have changed",
        (0x29, _) => "power on, reset or bus device reset occurred",
        (0x2a, _) => "parameters changed",
        (0x3a, _) => "medium not present",
        (0x3f, _) => "target operating conditions have changed",
        _ => "see SPC-4 for this code",
    }
}

fn describe_sense(key: u8, asc: u8, ascq: u8) -> String {
    format!(
        "CHECK CONDITION: {} (sense key {key:#x}), {} (ASC {asc:#04x}, ASCQ {ascq:#04x})",
        sense_key_name(key),
        asc_name(asc, ascq)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cdbs() {
        assert_eq!(&read_16(Lba(0x0102), 8)[..14], &[0x88, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 8]);
        assert_eq!(read_capacity_16()[..2], [0x9e, 0x10]);
        assert_eq!(inquiry(96)[..5], [0x12, 0, 0, 0, 96]);
        assert_eq!(encode_lun(1), 0x0001_0000_0000_0000);
        assert_eq!(decode_lun(encode_lun(300)), 300);
    }

    #[test]
    fn capacity() {
        let mut d = [0u8; 32];
        d[7] = 0xff;
        d[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_read_capacity_16(&d).unwrap().bytes(), Some(256 * 512));
        d[8..12].copy_from_slice(&500u32.to_be_bytes());
        assert!(parse_read_capacity_16(&d).is_err());
        assert!(parse_read_capacity_16(&d[..8]).is_err());
        let mut d = [0xffu8; 32];
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        assert!(parse_read_capacity_16(&d).is_err());
    }

    #[test]
    fn sense_is_readable() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x05;
        fixed[12] = 0x21;
        let e = check_status(2, &fixed).unwrap_err();
        assert_eq!(e, ScsiError::Sense { key: 5, asc: 0x21, ascq: 0 });
        assert!(e.to_string().contains("ILLEGAL REQUEST") && e.to_string().contains("out of range"));
        assert!(check_status(2, &[0x72, 0x06, 0x29, 0x00]).unwrap_err().is_transient());
        assert_eq!(check_status(0x08, &[]), Err(ScsiError::Status(8)));
        assert_eq!(check_status(2, &[]), Err(ScsiError::Status(2)));
    }

    #[test]
    fn report_luns() {
        let mut d = vec![0, 0, 0, 16, 0, 0, 0, 0];
        d.extend_from_slice(&encode_lun(0).to_be_bytes());
        d.extend_from_slice(&encode_lun(1).to_be_bytes());
        assert_eq!(parse_report_luns(&d), Ok(vec![0, 1]));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(d in proptest::collection::vec(any::<u8>(), 0..64), st: u8) {
            let _ = parse_read_capacity_16(&d);
            let _ = parse_inquiry(&d);
            let _ = parse_report_luns(&d);
            let _ = check_status(st, &d).map_err(|e| e.to_string());
        }
    }
}
