//! vmthunder: boot many VMs from one base image at once. A node daemon serves each image to
//! QEMU over NBD from a local, crash-safe chunk cache and fetches only the chunks guests read.
//! See DESIGN.md for the architecture and FORMAT.md for every on-disk and wire format.

pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fetch;
pub mod fsutil;
pub mod image;
pub mod iscsi;
pub mod libvirt;
pub mod metrics;
pub mod nbd;
pub mod netio;
pub mod p2p;
pub mod profile;
pub mod shutdown;
pub mod sim;
pub mod store;
pub mod throttle;
