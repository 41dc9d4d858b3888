//! NBD: the protocol QEMU speaks to vmtd ([`server`]) and vmtd speaks to NBD origins
//! ([`client`]); [`proto`] is the I/O-free codec both share.

pub mod client;
pub mod limits;
pub mod proto;
pub mod server;
mod transmit;
