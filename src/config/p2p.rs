//! The `[p2p]` section: this node's peer server, its trackers, the cluster key and the relay
//! trees' shape. Values are checked on load and each error names its key (`p2p.KEY`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, parse_duration, parse_size, ConfigError};

/// The `[p2p]` section: this node's peer server, its trackers and the shared cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct P2pConfig {
    /// Address of this node's peer server.
    pub listen: SocketAddr,
    /// The address peers reach this node at (its name in the cluster); `listen` by default,
    /// which then must not be a wildcard address.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Trackers (`HOST:PORT`, at most 64). This node registers with `tracker_replicas` of them:
    /// its home first (a rendezvous hash of its name and theirs, so nodes spread evenly), and
    /// the next in its order while one does not answer.
    pub trackers: Vec<String>,
    /// How many trackers this node registers with at once. 1 for trackers that share the load
    /// (`vmt-tracker --peer`); trackers that do not know each other each place only their own
    /// nodes, so give their count here.
    #[serde(default = "default_tracker_replicas")]
    pub tracker_replicas: usize,
    /// File holding the cluster key (at least 16 bytes; owner-only permissions).
    pub cluster_key_file: PathBuf,
    /// How often this node registers with the trackers.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: String,
    /// Silence after which a peer session counts as dead and its requests go elsewhere.
    #[serde(default = "default_peer_stall")]
    pub peer_stall: String,
    /// How long this node's peer server waits for a connecting peer to prove itself. (A node
    /// opening a session waits `peer_stall` for the whole opening.)
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
    /// Longest wait for one peer request (a parent may first have to fetch the run itself).
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout: String,
    /// Unit of the relay trees: each stripe of this many bytes has its own tree of nodes, whose
    /// root alone reads it from the origin.
    #[serde(default = "default_stripe")]
    pub stripe: String,
    /// Fan-out of the relay trees: most peers one node relays a stripe to.
    #[serde(default = "default_fanout")]
    pub fanout: u32,
    /// Number of relay trees: stripes are spread over them, and each node is an inner node of
    /// one only (its group), so it forwards about `fanout / classes` of the image.
    #[serde(default = "default_classes")]
    pub classes: u32,
    /// Chunk replies sent to peers at once.
    #[serde(default = "default_upload_slots")]
    pub upload_slots: usize,
    /// Optional cap on upload traffic to peers, e.g. "50MiB" (per second).
    #[serde(default)]
    pub upload_rate: Option<String>,
    /// Optional cap on what each peer session sends, e.g. "12MiB" (per second), enforced by the
    /// kernel packet by packet (`SO_MAX_PACING_RATE`): uploads to children then never fill the
    /// node's link queue ahead of its own requests and acknowledgements.
    #[serde(default)]
    pub session_rate: Option<String>,
    /// Bytes of replies to peers held at once, node-wide, each from its request's arrival until
    /// it is written; a request past it gets `Busy`.
    #[serde(default = "default_upload_buffer")]
    pub upload_buffer: String,
    /// Node names one IP address may hold peer sessions under at once (a node holds one session
    /// per image), and handshakes it may have in progress.
    #[serde(default = "default_peers_per_address")]
    pub peers_per_address: usize,
    /// Most peer sessions one image holds at once, opened by this node and by peers together.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Whether a node pushes each run it obtains to its children in that run's relay tree
    /// (what they neither hold nor asked for), below asked replies, instead of waiting to be
    /// asked.
    #[serde(default = "default_push")]
    pub push: bool,
    /// Whether chunks sent to peers go packed (LZ4, chunk by chunk, each only where that makes
    /// it smaller): packed once where they enter the cluster and sent on as they came by
    /// relays. It halves the bytes on the links for some CPU per chunk at each receiver: for
    /// clusters whose links, not CPUs, bound a bulk boot. Packed chunks are always read.
    #[serde(default)]
    pub pack: bool,
}

/// Run-time settings of the `[p2p]` section, in typed units.
#[derive(Debug, Clone)]
pub struct P2pTuning {
    pub listen: SocketAddr,
    pub trackers: Vec<String>,
    pub tracker_replicas: usize,
    pub advertise: String,
    pub heartbeat: Duration,
    pub peer_stall: Duration,
    pub peer_timeout: Duration,
    pub handshake_timeout: Duration,
    pub stripe: u64,
    pub fanout: u32,
    pub classes: u32,
    pub upload_slots: usize,
    pub upload_rate: Option<u64>,
    pub session_rate: Option<u64>,
    pub upload_buffer: u64,
    pub peers_per_address: usize,
    pub max_sessions: usize,
    pub push: bool,
    pub pack: bool,
}

fn default_push() -> bool {
    true
}
fn default_max_sessions() -> usize {
    64
}
fn default_heartbeat() -> String {
    "1s".into()
}
fn default_tracker_replicas() -> usize {
    1
}
fn default_peer_stall() -> String {
    "1s".into()
}
fn default_peer_timeout() -> String {
    "10s".into()
}
fn default_handshake_timeout() -> String {
    "5s".into()
}
fn default_stripe() -> String {
    "1MiB".into()
}
fn default_fanout() -> u32 {
    2
}
fn default_classes() -> u32 {
    1
}
fn default_upload_slots() -> usize {
    16
}
fn default_upload_buffer() -> String {
    "64MiB".into()
}
fn default_peers_per_address() -> usize {
    8
}

impl P2pConfig {
    /// Checks every field; errors carry `p2p.FIELD` as key. The key file is checked here too,
    /// so a bad key stops vmtd at start rather than at the first peer.
    pub fn tuning(&self) -> Result<P2pTuning, ConfigError> {
        let advertise = self.advertise.unwrap_or(self.listen);
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            let key = if self.advertise.is_some() { "p2p.advertise" } else { "p2p.listen" };
            return Err(invalid(key, "peers need a concrete address and port (set p2p.advertise)"));
        }
        if !(1..=64).contains(&self.trackers.len()) {
            return Err(invalid("p2p.trackers", "name between 1 and 64 trackers (HOST:PORT)"));
        }
        if !(1..=self.trackers.len()).contains(&self.tracker_replicas) {
            return Err(invalid("p2p.tracker_replicas", "must be between 1 and the number of trackers"));
        }
        for t in &self.trackers {
            if !t.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)) {
                return Err(invalid("p2p.trackers", format!("{t:?} is not HOST:PORT")));
            }
        }
        if !self.cluster_key_file.is_absolute() {
            return Err(invalid("p2p.cluster_key_file", "must be an absolute path"));
        }
        crate::p2p::auth::ClusterKey::load(&self.cluster_key_file)
            .map_err(|e| invalid("p2p.cluster_key_file", e.to_string()))?;
        let dur = |key: &str, v: &str, max: Duration| {
            let d = parse_duration(v).map_err(|m| invalid(format!("p2p.{key}"), m))?;
            if d < Duration::from_millis(10) || d > max {
                return Err(invalid(format!("p2p.{key}"), format!("must be between 10ms and {max:?}")));
            }
            Ok(d)
        };
        let heartbeat = dur("heartbeat", &self.heartbeat, Duration::from_secs(60))?;
        let peer_stall = dur("peer_stall", &self.peer_stall, Duration::from_secs(60))?;
        // A waiting client hears from the server at least every HAVE_INTERVAL: a shorter limit
        // would take every relay that is still fetching for a hung peer.
        let min_stall = crate::p2p::server::HAVE_INTERVAL * 2;
        if peer_stall < min_stall {
            return Err(invalid("p2p.peer_stall", format!("must be at least {min_stall:?}")));
        }
        let peer_timeout = dur("peer_timeout", &self.peer_timeout, Duration::from_secs(600))?;
        // Each connection still proving itself holds one of MAX_HANDSHAKES places meanwhile.
        let handshake_timeout = dur("handshake_timeout", &self.handshake_timeout, Duration::from_secs(120))?;
        let stripe = parse_size(&self.stripe).map_err(|m| invalid("p2p.stripe", m))?;
        if !(4096..=1 << 30).contains(&stripe) {
            return Err(invalid("p2p.stripe", "must be between 4KiB and 1GiB"));
        }
        if !(1..=64).contains(&self.fanout) {
            return Err(invalid("p2p.fanout", "must be between 1 and 64"));
        }
        if !(1..=crate::p2p::core::roster::MAX_CLASSES).contains(&self.classes) {
            return Err(invalid("p2p.classes", "must be between 1 and 16"));
        }
        if !(1..=1024).contains(&self.upload_slots) {
            return Err(invalid("p2p.upload_slots", "must be between 1 and 1024"));
        }
        let upload_rate =
            self.upload_rate.as_deref().map(parse_size).transpose().map_err(|m| invalid("p2p.upload_rate", m))?;
        let session_rate = self
            .session_rate
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(|m| invalid("p2p.session_rate", m))?
            .filter(|r| *r > 0);
        // Paced slower, a reply of one stripe could not reach its asker within its peer_timeout,
        // and every session would be taken for a failed one.
        let floor = ((2 * stripe) as f64 / peer_timeout.as_secs_f64()).ceil().max(f64::from(64u32 << 10)) as u64;
        if session_rate.is_some_and(|r| r < floor) {
            return Err(invalid(
                "p2p.session_rate",
                format!("must be at least {floor} bytes per second (two stripes within p2p.peer_timeout, and 64KiB), or 0 for none"),
            ));
        }
        let upload_buffer = parse_size(&self.upload_buffer).map_err(|m| invalid("p2p.upload_buffer", m))?;
        if !(1 << 20..=crate::p2p::server::MAX_BUFFER).contains(&upload_buffer) {
            return Err(invalid("p2p.upload_buffer", "must be between 1MiB and 2GiB"));
        }
        if !(1..=4096).contains(&self.peers_per_address) {
            return Err(invalid("p2p.peers_per_address", "must be between 1 and 4096"));
        }
        if !(2..=4096).contains(&self.max_sessions) {
            return Err(invalid("p2p.max_sessions", "must be between 2 and 4096"));
        }
        Ok(P2pTuning {
            listen: self.listen,
            trackers: self.trackers.clone(),
            tracker_replicas: self.tracker_replicas,
            advertise: advertise.to_string(),
            heartbeat,
            peer_stall,
            peer_timeout,
            handshake_timeout,
            stripe,
            fanout: self.fanout,
            classes: self.classes,
            upload_slots: self.upload_slots,
            upload_rate,
            session_rate,
            upload_buffer,
            peers_per_address: self.peers_per_address,
            max_sessions: self.max_sessions,
            push: self.push,
            pack: self.pack,
        })
    }
}
