//! Peer-to-peer relay: nodes serve their cached chunks to each other, so the origin sends each
//! chunk about once however many nodes boot.
//!
//! ```text
//!   fetch::Fetcher ──▶ swarm::Swarm (a ChunkSource) ──▶ select::Selector (pure: which source?)
//!                           │                               ├─ parent in the stripe's relay tree
//!                           │                               ├─ peer holding the run (have-maps)
//!                           │                               └─ origin
//!                           └─ peer::PeerConn ══ wire frames, conn handshake ══▶ server::PeerServer
//!   tracker::TrackerClient ── heartbeats ──▶ tracker::Tracker (soft state: who serves what)
//! ```
//! Every session starts with a mutual cluster-key challenge–response ([`auth`]), and is admitted
//! only under a name that is the address it comes from, within per-name and per-address bounds
//! ([`admit`]); every chunk a peer sends is verified against the manifest before it is used.
//! Every relay decision lives in pure state machines ([`select`] and [`core`]), which the tokio
//! code here and `vmt sim` drive alike.

pub mod admit;
pub mod auth;
pub mod conn;
pub mod core;
pub mod pack;
pub mod peer;
pub mod select;
pub mod server;
pub mod swarm;
pub mod tracker;
pub mod wire;
