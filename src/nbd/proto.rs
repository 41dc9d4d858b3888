//! The NBD wire format (fixed newstyle handshake, simple and structured replies), as pure
//! functions over bytes. No I/O here: the server and client do the reading and writing, and
//! proptest reaches every parser directly. Numbers and layouts follow the protocol specification
//! (`doc/proto.md` of the NBD project); FORMAT.md lists the subset vmthunder speaks.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

/// Info types inside `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Error values in replies (Linux errno numbers, as the protocol fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;

/// Largest payload (read reply or write data) vmthunder accepts: the protocol's usual maximum.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data a server reads during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const GREETING_LEN: usize = 18;

/// Malformed protocol data.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("option data malformed: {0}")]
    BadOption(&'static str),
    #[error("export name is not UTF-8")]
    BadName,
    #[error("option of {0} bytes exceeds the limit")]
    OptionTooBig(u32),
    #[error("server does not speak fixed newstyle NBD")]
    NotFixedNewstyle,
}

fn be_u16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be_u32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be_u64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// The server's first message: magic, IHAVEOPT, handshake flags.
pub fn greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parses the server greeting; returns its handshake flags.
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    if be_u64(b, 0) != NBDMAGIC {
        return Err(ProtoError::BadMagic(be_u64(b, 0)));
    }
    if be_u64(b, 8) != IHAVEOPT {
        return Err(ProtoError::NotFixedNewstyle);
    }
    let flags = be_u16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// An option header sent by the client: which option and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(OptionHeader { option: be_u32(b, 8), len: be_u32(b, 12) })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The data of `OPT_INFO` / `OPT_GO`: an export name and the info types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        if data.len() < 6 {
            return Err(ProtoError::BadOption("shorter than name length and info count"));
        }
        let name_len = be_u32(data, 0) as usize;
        let rest = &data[4..];
        if name_len > rest.len().saturating_sub(2) {
            return Err(ProtoError::BadOption("name length exceeds the option"));
        }
        let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| ProtoError::BadName)?.to_string();
        let rest = &rest[name_len..];
        let count = be_u16(rest, 0) as usize;
        let rest = &rest[2..];
        if rest.len() != count * 2 {
            return Err(ProtoError::BadOption("info count does not match the option length"));
        }
        let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
        Ok(InfoRequest { name, infos })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.infos.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }
}

/// An option reply: header plus data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option reply header as the client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn parse(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(b, 0);
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(OptionReplyHeader { option: be_u32(b, 8), reply: be_u32(b, 12), len: be_u32(b, 16) })
    }
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..].copy_from_slice(&max.to_be_bytes());
    b
}

/// Parses `NBD_INFO_EXPORT` data; `None` for any other info type or a bad length.
pub fn parse_info_export(data: &[u8]) -> Option<(u64, u16)> {
    (data.len() == 12 && be_u16(data, 0) == INFO_EXPORT).then(|| (be_u64(data, 2), be_u16(data, 10)))
}

/// One `REP_SERVER` entry of `OPT_LIST`.
pub fn list_entry(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client said
/// `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(u64::from(magic)));
        }
        Ok(Request {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            handle: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header: error (0 for success) and the request's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(u64::from(magic)));
        }
        Ok(SimpleReply { error: be_u32(b, 4), handle: be_u64(b, 8) })
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub length: u32,
}

impl StructuredHeader {
    pub fn encode(&self) -> [u8; STRUCTURED_HEADER_LEN] {
        let mut b = [0u8; STRUCTURED_HEADER_LEN];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8; STRUCTURED_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(b, 0);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic(u64::from(magic)));
        }
        Ok(StructuredHeader { flags: be_u16(b, 4), kind: be_u16(b, 6), handle: be_u64(b, 8), length: be_u32(b, 16) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_bytes() {
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(parse_greeting(&g), Ok(3));
        let r = SimpleReply { error: EPERM, handle: 7 }.encode();
        assert_eq!(&r[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
    }

    #[test]
    fn info_request_limits() {
        let ok = InfoRequest { name: "img".into(), infos: vec![INFO_BLOCK_SIZE] };
        assert_eq!(InfoRequest::parse(&ok.encode()), Ok(ok.clone()));
        let mut long = ok.encode();
        long[3] = 200;
        assert!(InfoRequest::parse(&long).is_err());
        let mut count = ok.encode();
        let n = count.len();
        count[n - 3] = 9;
        assert!(InfoRequest::parse(&count).is_err());
        assert!(InfoRequest::parse(&[0, 0]).is_err());
        let bad_utf8 = [0, 0, 0, 1, 0xff, 0, 0];
        assert_eq!(InfoRequest::parse(&bad_utf8), Err(ProtoError::BadName));
    }

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, command: u16, handle: u64, offset: u64, length: u32) {
            let r = Request { flags, command, handle, offset, length };
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn reply_roundtrip(error: u32, handle: u64, flags: u16, kind: u16, length: u32) {
            let r = SimpleReply { error, handle };
            prop_assert_eq!(SimpleReply::parse(&r.encode()), Ok(r));
            let s = StructuredHeader { flags, kind, handle, length };
            prop_assert_eq!(StructuredHeader::parse(&s.encode()), Ok(s));
        }

        #[test]
        fn info_request_roundtrip(name in "\\PC{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, infos };
            prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InfoRequest::parse(&bytes);
            let _ = parse_info_export(&bytes);
            if bytes.len() >= REQUEST_LEN {
                let _ = Request::parse(bytes[..REQUEST_LEN].try_into().unwrap());
            }
            if bytes.len() >= OPTION_REPLY_HEADER_LEN {
                let _ = OptionReplyHeader::parse(bytes[..OPTION_REPLY_HEADER_LEN].try_into().unwrap());
                let _ = OptionHeader::parse(bytes[..OPTION_HEADER_LEN].try_into().unwrap());
                let _ = parse_greeting(bytes[..GREETING_LEN].try_into().unwrap());
                let _ = SimpleReply::parse(bytes[..SIMPLE_REPLY_LEN].try_into().unwrap());
            }
        }
    }
}
