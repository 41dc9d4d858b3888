//! The flags of `vmt sim`, turned into [`SimParams`]: sizes and rates are parsed here, each
//! error naming its flag.

use std::path::PathBuf;

use super::params::{parse_rate, SimParams, Strategy};
use super::SimError;
use crate::config::parse_size;

/// Simulate a bulk boot: every strategy side by side, deterministic for a seed.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Trace of one guest's boot (CSV from `vmt trace stop`).
    #[arg(long)]
    pub trace: PathBuf,
    /// Boot profile of the trace's image (needed by vmthunder-profile; sets the image size).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Number of nodes, each booting one guest.
    #[arg(long, default_value_t = 100)]
    pub nodes: u32,
    /// Distinct images booted at once, each with the trace's reads and its own content: node i
    /// boots image i mod M, so each image has every M-th node, its own relay trees and its own
    /// copy-on-read tree; all share the origin's link and the tracker.
    #[arg(long, default_value_t = 1)]
    pub images: u32,
    /// Run at each of these numbers of nodes in turn instead (comma-separated, e.g.
    /// 1,10,100,1000): one table, or a JSON array of reports.
    #[arg(long, value_delimiter = ',', conflicts_with = "nodes")]
    pub sweep: Vec<u32>,
    /// Write SVG figures into this directory: makespan ratio and guest-stall p99 against N per
    /// strategy, and the per-node completion CDF of the largest N's storm.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Strategies, comma-separated: direct, cor-tree, vmthunder, vmthunder-profile.
    #[arg(long, default_value = "direct,cor-tree,vmthunder")]
    pub strategies: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Factor applied to the trace's think times (as `vmt bench replay --scale`).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Leave out the requests recorded before this many seconds (as `vmt bench replay --from`).
    #[arg(long, default_value_t = 0.0)]
    pub from: f64,
    /// Spread the guests' starts uniformly over this many seconds (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub spread: f64,
    /// Seconds each node's vmtd runs before its guest starts.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Each node's up and down link, e.g. 1gbit, 10gbit.
    #[arg(long, default_value = "1gbit")]
    pub node_link: String,
    /// The origin's up link.
    #[arg(long, default_value = "1gbit")]
    pub origin_link: String,
    /// One-way latency of one hop, in milliseconds.
    #[arg(long, default_value_t = 0.1)]
    pub latency_ms: f64,
    /// CPU microseconds per request, at the end that serves it and at the end that receives it.
    #[arg(long, default_value_t = 50.0)]
    pub cpu_us_per_request: f64,
    /// CPU seconds per GiB relayed, both ends together (BENCHMARKS.md measures 4.3–6.8 on the
    /// testbed); half is charged to the sender, half to the receiver (also of a run from the
    /// origin).
    #[arg(long, default_value_t = 5.0)]
    pub cpu_s_per_gib: f64,
    /// Microseconds every guest read takes beyond its data's arrival (the answer's way through
    /// the NBD server, the kernel and the guest's side; cache hits pay it too).
    #[arg(long, default_value_t = 0.0)]
    pub read_overhead_us: f64,
    /// Microseconds the origin takes to start answering a read (its disk), beyond the hop's
    /// latency.
    #[arg(long, default_value_t = 0.0)]
    pub origin_delay_us: f64,
    /// Microseconds a node takes to handle a fetched run beyond its CPU cost (store, wake its
    /// readers).
    #[arg(long, default_value_t = 0.0)]
    pub fetch_overhead_us: f64,
    /// All nodes share this many CPU cores (an emulated testbed on one host); 0: each node has
    /// a CPU of its own.
    #[arg(long, default_value_t = 0)]
    pub host_cores: u32,
    /// Token-bucket depth of every link (as `tc tbf burst`): bytes an idle link has saved up
    /// send at once; 0: a pure rate.
    #[arg(long, default_value = "0")]
    pub link_burst: String,
    #[arg(long, default_value = "64KiB")]
    pub chunk_size: String,
    /// Image size (default: the profile's, or the end of the trace's last read).
    #[arg(long)]
    pub image_size: Option<String>,
    #[arg(long, default_value = "1MiB")]
    pub max_fetch: String,
    #[arg(long, default_value = "1MiB")]
    pub stripe: String,
    /// Fan-out of vmthunder's per-stripe relay trees (vmtd's default).
    #[arg(long, default_value_t = 2)]
    pub fanout: u32,
    /// Number of vmthunder's relay trees (stripes spread over them; each node is an inner node
    /// of one; vmtd's default).
    #[arg(long, default_value_t = 1)]
    pub classes: u32,
    /// Fan-out of the copy-on-read tree (2: node i's parent is node i/2, counting from 1).
    #[arg(long, default_value_t = 2)]
    pub tree_fanout: u32,
    #[arg(long, default_value_t = 16)]
    pub upload_slots: u32,
    /// Most peer sessions of a node at once, both ways (`p2p.max_sessions`).
    #[arg(long, default_value_t = 64)]
    pub max_sessions: u32,
    #[arg(long, default_value = "64MiB")]
    pub upload_buffer: String,
    /// Seconds between a node's tracker registrations.
    #[arg(long, default_value_t = 1.0)]
    pub heartbeat: f64,
    /// Seconds the tracker keeps a node after its last registration.
    #[arg(long, default_value_t = 3.0)]
    pub tracker_ttl: f64,
    /// Trackers sharing the nodes (as `vmt-tracker --peer`): each node registers with its home
    /// tracker, and the trackers join their partitions' trees (1 to 64).
    #[arg(long, default_value_t = 1)]
    pub trackers: u32,
    #[arg(long, default_value_t = 4)]
    pub prefetch_concurrency: u32,
    /// vmthunder-profile: seconds before its guest's start that a node starts prefetching (the
    /// libvirt hook starts it at `prepare begin`, before QEMU; the Debian trace's first root file
    /// system read comes 9.28 s after the guest's start, 2.3 s at scale 0.25). At most --warmup.
    #[arg(long, default_value_t = 0.0)]
    pub prefetch_lead: f64,
    /// Fraction of the nodes killed at --kill-at.
    #[arg(long, default_value_t = 0.0)]
    pub kill: f64,
    /// Seconds after the first guest's start at which nodes are killed.
    #[arg(long, default_value_t = 1.0)]
    pub kill_at: f64,
    /// START,LENGTH: the trackers answer nothing (and hear nothing from each other) for LENGTH
    /// seconds from START seconds after the first guest's start.
    #[arg(long)]
    pub tracker_down: Option<String>,
    /// Fraction of the nodes that claim every chunk and hold back what they lack.
    #[arg(long, default_value_t = 0.0)]
    pub liars: f64,
    /// Relays pass each chunk of a reply on as it arrives rather than once the whole run is in
    /// (cut through), as vmtd does; `--cut-through false` models a relay that waits for the run.
    /// The model is coarse (DESIGN.md).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub cut_through: bool,
    /// With `--cut-through` and `--push`: relays push each chunk of a run they fetch from a peer
    /// on to their children as it arrives (the push starts as the run starts arriving), as vmtd
    /// does; a run from the origin arrives whole and is pushed once it is in.
    /// `--push-cut-through false` pushes every run once it is in.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub push_cut_through: bool,
    /// What if peers' replies were checked and passed on in pieces of this size (a power of two
    /// from 1KiB to the chunk size: subtrees of the chunk's BLAKE3 tree, their chaining values
    /// sent first) rather than whole chunks? vmtd checks whole chunks (the default); runs from the
    /// origin are checked in whole chunks either way.
    #[arg(long)]
    pub verify_piece: Option<String>,
    /// Whether relays push each run they obtain (from their parent, the origin or a push) to
    /// their children in that stripe's tree that neither hold it nor fetch it, as vmtd does with
    /// `p2p.push` (its default); `--push false` models `p2p.push = false` (DESIGN.md).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub push: bool,
    /// With `--push`: a relay first pushes a child that starts reading after its own boot began
    /// the runs of that boot, in the order it obtained them (its first minute of reads), as vmtd
    /// does; `--push-boot false` leaves that out (what it brings: BENCHMARKS.md).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub push_boot: bool,
    /// Relay runs whose peer state would need more than this are not run (said why instead).
    #[arg(long, default_value = "6GiB")]
    pub max_peer_state: String,
    /// Node i's peer address is this one plus i (port 7000). The relay's trees are shaped by
    /// the nodes' addresses (and when they joined): the testbed's are 10.77.0.11 onwards.
    #[arg(long, default_value = "10.0.0.1")]
    pub first_address: std::net::Ipv4Addr,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn size(field: &'static str, s: &str) -> Result<u64, SimError> {
    parse_size(s).map_err(|e| SimError::Param { field, reason: e.to_string() })
}

impl SimArgs {
    pub fn params(&self) -> Result<SimParams, SimError> {
        let strategies = self
            .strategies
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Strategy::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let tracker_down = match &self.tracker_down {
            None => None,
            Some(s) => {
                let bad = || SimError::Param {
                    field: "tracker-down",
                    reason: format!("{s:?}: expected START,LENGTH in seconds"),
                };
                let (a, b) = s.split_once(',').ok_or_else(bad)?;
                Some((a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?))
            }
        };
        let p = SimParams {
            trace: self.trace.clone(),
            profile: self.profile.clone(),
            // A sweep checks its smallest N here (each run sets its own).
            nodes: self.sweep.iter().copied().min().unwrap_or(self.nodes),
            images: self.images,
            strategies,
            seed: self.seed,
            scale: self.scale,
            from: self.from,
            spread: self.spread,
            warmup: self.warmup,
            node_rate: parse_rate("node-link", &self.node_link)?,
            origin_rate: parse_rate("origin-link", &self.origin_link)?,
            latency: self.latency_ms / 1e3,
            cpu_per_request: self.cpu_us_per_request / 1e6,
            cpu_per_byte: self.cpu_s_per_gib / 2.0 / f64::from(1u32 << 30),
            read_overhead: self.read_overhead_us / 1e6,
            origin_delay: self.origin_delay_us / 1e6,
            fetch_overhead: self.fetch_overhead_us / 1e6,
            host_cores: self.host_cores,
            link_burst: size("link-burst", &self.link_burst)?,
            chunk_size: size("chunk-size", &self.chunk_size)?,
            image_size: self.image_size.as_deref().map(|s| size("image-size", s)).transpose()?,
            max_fetch: size("max-fetch", &self.max_fetch)?,
            stripe: size("stripe", &self.stripe)?,
            fanout: self.fanout,
            classes: self.classes,
            tree_fanout: self.tree_fanout,
            upload_slots: self.upload_slots,
            max_sessions: self.max_sessions,
            upload_buffer: size("upload-buffer", &self.upload_buffer)?,
            heartbeat: self.heartbeat,
            tracker_ttl: self.tracker_ttl,
            trackers: self.trackers,
            prefetch_concurrency: self.prefetch_concurrency,
            prefetch_lead: self.prefetch_lead,
            kill: self.kill,
            kill_at: self.kill_at,
            tracker_down,
            liars: self.liars,
            max_peer_state: size("max-peer-state", &self.max_peer_state)?,
            cut_through: self.cut_through,
            push_cut_through: self.push_cut_through,
            verify_piece: self.verify_piece.as_deref().map(|v| size("verify-piece", v)).transpose()?,
            push: self.push,
            push_boot: self.push_boot,
            first_address: self.first_address,
        };
        p.check()?;
        Ok(p)
    }
}
