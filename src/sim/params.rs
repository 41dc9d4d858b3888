//! Parameters of one `vmt sim` run, checked before anything runs: every bad value is refused
//! with an error naming its field (the CLI flag without its dashes).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SimError;

/// A strategy a bulk boot can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every node reads the origin, no cache and no relay.
    Direct,
    /// A static copy-on-read relay tree of fan-out `tree_fanout` per image: counting an
    /// image's nodes from 0, node i's parent is node (i − 1) / k (node 0, the root, reads the
    /// origin), as the `qemu-nbd` tree of `scripts/bench-relay`.
    CorTree,
    /// vmtd's peer-to-peer relay, as it is: its own decision code, simulated I/O.
    Vmthunder,
    /// The same, with every node prefetching the boot profile from its start.
    VmthunderProfile,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Strategy, SimError> {
        Ok(match s {
            "direct" => Strategy::Direct,
            "cor-tree" => Strategy::CorTree,
            "vmthunder" => Strategy::Vmthunder,
            "vmthunder-profile" => Strategy::VmthunderProfile,
            _ => {
                return Err(SimError::Param {
                    field: "strategies",
                    reason: format!("unknown strategy {s:?} (direct, cor-tree, vmthunder, vmthunder-profile)"),
                })
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::CorTree => "cor-tree",
            Strategy::Vmthunder => "vmthunder",
            Strategy::VmthunderProfile => "vmthunder-profile",
        }
    }

    pub fn relays(self) -> bool {
        matches!(self, Strategy::Vmthunder | Strategy::VmthunderProfile)
    }
}

/// Everything one run needs. Rates are bytes per second, times seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimParams {
    pub trace: PathBuf,
    /// A boot profile of the trace's image (for `vmthunder-profile`; gives the image size and
    /// chunk size too).
    pub profile: Option<PathBuf>,
    pub nodes: u32,
    /// Distinct images of the trace's shape booted at once; node i boots image i mod `images`.
    pub images: u32,
    pub strategies: Vec<Strategy>,
    pub seed: u64,
    /// Think times of the trace × this.
    pub scale: f64,
    /// Requests recorded before this many seconds are left out.
    pub from: f64,
    /// Node starts spread uniformly over this many seconds (0: all at once).
    pub spread: f64,
    /// Seconds each node's vmtd runs before its guest starts (heartbeats, sessions).
    pub warmup: f64,
    pub node_rate: f64,
    pub origin_rate: f64,
    /// One-way latency of one hop, seconds.
    pub latency: f64,
    /// CPU seconds per request served or fetched (from a peer or the origin), and per byte, at
    /// each end a node's process is.
    pub cpu_per_request: f64,
    pub cpu_per_byte: f64,
    /// Seconds every guest read takes beyond its data's arrival (the answer's way to the guest).
    pub read_overhead: f64,
    /// Seconds the origin takes to start answering a read (its disk), beyond the hop's latency.
    pub origin_delay: f64,
    /// Seconds a node takes to handle a fetched run beyond its CPU cost (store, wake its readers).
    pub fetch_overhead: f64,
    /// Cores all nodes share (0: a CPU per node).
    pub host_cores: u32,
    /// Token-bucket depth of every link, bytes (0: a pure rate).
    pub link_burst: u64,
    pub chunk_size: u64,
    pub image_size: Option<u64>,
    pub max_fetch: u64,
    pub stripe: u64,
    pub fanout: u32,
    /// Number of vmthunder's relay trees.
    pub classes: u32,
    pub tree_fanout: u32,
    pub upload_slots: u32,
    /// Most peer sessions of a node at once, both ways.
    pub max_sessions: u32,
    pub upload_buffer: u64,
    pub heartbeat: f64,
    pub tracker_ttl: f64,
    /// Trackers sharing the nodes (each node at its home, partitions joined through the merged tops of their trees).
    pub trackers: u32,
    pub prefetch_concurrency: u32,
    /// Seconds before its guest's start that a node starts prefetching the profile (at most
    /// `warmup`).
    pub prefetch_lead: f64,
    /// Fraction of nodes killed at `kill_at` seconds after the first guest starts.
    pub kill: f64,
    pub kill_at: f64,
    /// The tracker answers nothing in [start, start + length) seconds after the first guest.
    pub tracker_down: Option<(f64, f64)>,
    /// Fraction of nodes that claim every chunk in their have-maps and hold back what they lack.
    pub liars: f64,
    /// Refuse relay strategies whose peer state alone would exceed this many bytes.
    pub max_peer_state: u64,
    /// Relays pass each chunk of a reply on as it arrives (vmtd does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cut_through: bool,
    /// With `cut_through` and `push`: a run fetched from a peer is pushed on chunk by chunk as
    /// it arrives, as vmtd does (a run from the origin once it is in).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub push_cut_through: bool,
    /// With `cut_through`: peers' replies are checked and passed on in pieces of this many bytes,
    /// not whole chunks (a what-if: vmtd checks whole chunks); origin runs stay whole chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_piece: Option<u64>,
    /// Whether relays push each run they obtain down its stripe's tree to the children that
    /// lack it, as vmtd does with `p2p.push` (its default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub push: bool,
    /// Whether a pushing relay first pushes a child that starts reading the runs of its own
    /// boot, as vmtd does when it pushes (`Fetcher::boot_log`).
    #[serde(default)]
    pub push_boot: bool,
    /// Node i's peer name is this address plus i, port 7000: node keys, and so the trees'
    /// shapes, come from names (`scripts/calibrate-sim` gives the testbed's).
    pub first_address: std::net::Ipv4Addr,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SimError {
    SimError::Param { field, reason: reason.into() }
}

impl SimParams {
    /// Refuses values the simulation cannot run with, naming the field.
    pub fn check(&self) -> Result<(), SimError> {
        let finite = |field: &'static str, v: f64, min: f64| {
            if v.is_finite() && v >= min {
                Ok(())
            } else {
                Err(bad(field, format!("{v} must be a finite number, at least {min}")))
            }
        };
        if !(1..=1_000_000).contains(&self.nodes) {
            return Err(bad("nodes", format!("{} must be between 1 and 1000000", self.nodes)));
        }
        let max_images = self.nodes.min(crate::p2p::core::roster::MAX_IMAGES as u32);
        if !(1..=max_images).contains(&self.images) {
            return Err(bad(
                "images",
                format!(
                    "{} must be between 1 and {max_images} (at most one per node, and the tracker's limit)",
                    self.images
                ),
            ));
        }
        if u64::from(u32::from(self.first_address)) + u64::from(self.nodes) > 1 << 32 {
            return Err(bad(
                "first-address",
                format!("{} plus {} nodes runs past 255.255.255.255", self.first_address, self.nodes),
            ));
        }
        if self.strategies.is_empty() {
            return Err(bad("strategies", "at least one"));
        }
        finite("scale", self.scale, 0.0)?;
        finite("from", self.from, 0.0)?;
        finite("spread", self.spread, 0.0)?;
        finite("warmup", self.warmup, 0.0)?;
        finite("latency", self.latency, 0.0)?;
        finite("cpu-per-request", self.cpu_per_request, 0.0)?;
        finite("cpu-per-byte", self.cpu_per_byte, 0.0)?;
        finite("read-overhead", self.read_overhead, 0.0)?;
        finite("origin-delay", self.origin_delay, 0.0)?;
        finite("fetch-overhead", self.fetch_overhead, 0.0)?;
        if self.host_cores > 1024 {
            return Err(bad("host-cores", format!("{} must be at most 1024", self.host_cores)));
        }
        finite("kill-at", self.kill_at, 0.0)?;
        if !(self.node_rate.is_finite() && self.node_rate >= 1.0) {
            return Err(bad("node-rate", "must be at least 1 bit/s"));
        }
        if !(self.origin_rate.is_finite() && self.origin_rate >= 1.0) {
            return Err(bad("origin-rate", "must be at least 1 bit/s"));
        }
        if !(self.heartbeat.is_finite() && self.heartbeat > 0.0 && self.heartbeat <= 3600.0) {
            return Err(bad("heartbeat", "must be more than 0 and at most 3600"));
        }
        if !(self.tracker_ttl.is_finite() && self.tracker_ttl > 0.0 && self.tracker_ttl <= 3600.0) {
            return Err(bad("tracker-ttl", "must be more than 0 and at most 3600"));
        }
        if !(2..=4096).contains(&self.max_sessions) {
            return Err(bad("max-sessions", "must be between 2 and 4096"));
        }
        if !(1..=64).contains(&self.trackers) {
            return Err(bad("trackers", "must be between 1 and 64"));
        }
        for (field, f) in [("kill", self.kill), ("liars", self.liars)] {
            if !(0.0..=1.0).contains(&f) {
                return Err(bad(field, format!("{f} must be a fraction between 0 and 1")));
            }
        }
        if let Some((start, len)) = self.tracker_down {
            if !(start.is_finite() && len.is_finite() && start >= 0.0 && len >= 0.0) {
                return Err(bad("tracker-down", "START,LENGTH: two numbers of seconds, at least 0"));
            }
        }
        if !self.chunk_size.is_power_of_two() || !(4096..=16 << 20).contains(&self.chunk_size) {
            return Err(bad("chunk-size", "must be a power of two between 4KiB and 16MiB"));
        }
        if self.max_fetch < self.chunk_size {
            return Err(bad("max-fetch", "must be at least one chunk"));
        }
        if self.stripe < self.chunk_size {
            return Err(bad("stripe", "must be at least one chunk"));
        }
        if let Some(piece) = self.verify_piece {
            if !self.cut_through {
                return Err(bad("verify-piece", "needs --cut-through (the default)"));
            }
            if !piece.is_power_of_two() || !(1024..=self.chunk_size).contains(&piece) {
                return Err(bad("verify-piece", "must be a power of two from 1KiB to the chunk size"));
            }
        }
        if !(1..=64).contains(&self.fanout) {
            return Err(bad("fanout", "must be between 1 and 64"));
        }
        if !(1..=crate::p2p::core::roster::MAX_CLASSES).contains(&self.classes) {
            return Err(bad("classes", "must be between 1 and 16"));
        }
        if !(1..=64).contains(&self.tree_fanout) {
            return Err(bad("tree-fanout", "must be between 1 and 64"));
        }
        if self.upload_slots == 0 {
            return Err(bad("upload-slots", "must be at least 1"));
        }
        if self.upload_buffer < 1 << 20 {
            return Err(bad("upload-buffer", "must be at least 1MiB"));
        }
        if !(self.prefetch_lead.is_finite() && (0.0..=self.warmup).contains(&self.prefetch_lead)) {
            return Err(bad("prefetch-lead", format!("{} must be between 0 and --warmup", self.prefetch_lead)));
        }
        if self.prefetch_concurrency == 0 {
            return Err(bad("prefetch-concurrency", "must be at least 1"));
        }
        if self.strategies.contains(&Strategy::VmthunderProfile) && self.profile.is_none() {
            return Err(bad("profile", "strategy vmthunder-profile needs a boot profile"));
        }
        Ok(())
    }
}

/// A link rate such as `1gbit`, `200mbit`, `10gbit` or `125MB` (bytes), in bytes per second.
pub fn parse_rate(field: &'static str, s: &str) -> Result<f64, SimError> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad(field, format!("{s:?}: expected a number and a unit, e.g. 1gbit")))?;
    let bits = match unit {
        "gbit" => 1e9,
        "mbit" => 1e6,
        "kbit" => 1e3,
        "bit" => 1.0,
        "gb" => 8e9,
        "mb" => 8e6,
        "kb" => 8e3,
        _ => return Err(bad(field, format!("{s:?}: unit must be gbit, mbit, kbit, bit, GB, MB or kB"))),
    };
    let r = n * bits / 8.0;
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        Err(bad(field, format!("{s:?} must be more than 0")))
    }
}
