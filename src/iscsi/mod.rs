//! iSCSI origin: a native initiator for the read path (RFC 7143), so an image already exported
//! by an iSCSI target (tgt, LIO, a SAN) is an origin as it stands.
//!
//! ```text
//!   fetch::flight ──▶ initiator::IscsiClient (ChunkSource: session, CmdSN window, reconnect)
//!                        ├─ login   (key=value negotiation; chap: one-way CHAP-MD5)
//!                        ├─ scsi    (CDBs, capacity, sense decoding)
//!                        └─ pdu     (I/O-free codec: BHS, AHS, data segment, CRC32C digests)
//! ```
//! Subset: one connection per session, ErrorRecoveryLevel 0 (any error drops the connection;
//! reads are reissued on a new one), reads only (no R2T, no Data-Out).

pub mod chap;
pub mod initiator;
pub mod login;
pub mod pdu;
pub mod scsi;
