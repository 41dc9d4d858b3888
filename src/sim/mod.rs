//! `vmt sim`: a deterministic discrete-event simulation of a bulk boot, in one process, that runs
//! the relay's own decision code ([`crate::p2p::select`], [`crate::p2p::core`], the Fetcher's run
//! planning and the prefetch order) on simulated links, CPUs and guests.
//!
//! ```text
//!   trace CSV ─▶ bench::replay::plan (the replayer's own bursts and think times)
//!                 │ per node: bursts of reads, closed loop
//!                 ▼
//!   engine::Sim ── event heap (virtual ns, seq) ── net::Net (links: processor sharing)
//!     │ node cache + single flight (fetch::flight::runs plans the runs)
//!     ├─ direct: every read from the origin
//!     ├─ cor-tree: misses from the parent (i − 1) / k among the image's nodes, its root from
//!     │            the origin (node i boots image i mod --images)
//!     └─ vmthunder: relay.rs ── PieceRead / Selector / UploadBudget / Membership / Roster
//! ```
//!
//! Same parameters and seed, same report: time is virtual, ties are broken by scheduling order,
//! and all randomness comes from one seeded generator. What is modelled and what is not is in
//! DESIGN.md ("Simulating a bulk boot").

pub mod args;
mod cut;
mod engine;
mod fetch;
mod guest;
pub mod net;
pub mod params;
pub mod plot;
mod push;
mod relay;
pub mod report;
mod rng;
mod slab;

use std::ops::Range;
use std::path::Path;

use thiserror::Error;

pub use args::SimArgs;
pub use params::{parse_rate, SimParams, Strategy};
pub use report::{Report, StrategyReport};

use crate::bench::replay;
use crate::bench::trace::{self, Op};
use crate::profile::format::Profile;
use crate::profile::prefetch::prefetch_runs;

/// Why a simulation could not run.
#[derive(Debug, Error)]
pub enum SimError {
    /// A parameter is out of range.
    #[error("{field}: {reason}")]
    Param { field: &'static str, reason: String },
    /// The trace could not be read.
    #[error("trace: {0}")]
    Trace(#[from] trace::TraceError),
    /// The profile could not be read or does not fit the trace's image.
    #[error("profile {path}: {reason}")]
    Profile { path: String, reason: String },
}

/// What every node's guest does, and the image it reads.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Reads of each burst, as (offset, length) in bytes.
    pub bursts: Vec<Vec<(u64, u64)>>,
    /// Seconds between the end of burst k − 1 and the start of burst k.
    pub think: Vec<f64>,
    pub chunks: u32,
    pub stripe_chunks: u32,
    /// The boot profile's prefetch runs, in order (empty without a profile).
    pub profile_runs: Vec<Range<u32>>,
    /// Distinct chunks the trace reads.
    pub working_set: u64,
}

impl Workload {
    /// Reads the trace (and profile), checking them against the parameters.
    pub fn load(p: &SimParams) -> Result<Workload, SimError> {
        let rows = trace::load(&p.trace)?;
        let rows = replay::skip_before(&rows, p.from);
        if !rows.iter().any(|r| r.op == Op::Read) {
            return Err(SimError::Param { field: "trace", reason: "no reads (after --from)".into() });
        }
        let profile = p.profile.as_deref().map(load_profile).transpose()?;
        let cs = p.chunk_size;
        let end =
            rows.iter().filter(|r| r.op == Op::Read).map(|r| r.offset.saturating_add(r.length)).max().unwrap_or(0);
        let image = match (&profile, p.image_size) {
            (Some(pr), _) => {
                if pr.chunk_size != cs {
                    return Err(SimError::Param {
                        field: "chunk-size",
                        reason: format!("{cs} differs from the profile's chunk size {}", pr.chunk_size),
                    });
                }
                pr.image_size
            }
            (None, Some(s)) => s,
            (None, None) => end.div_ceil(cs) * cs,
        };
        if end > image {
            return Err(SimError::Param {
                field: "trace",
                reason: format!("reads up to byte {end}, beyond the image's {image} bytes"),
            });
        }
        let chunks = u32::try_from(image.div_ceil(cs))
            .map_err(|_| SimError::Param { field: "image-size", reason: "more than 2^32 chunks".into() })?;
        let plan =
            replay::plan(rows, p.scale).map_err(|e| SimError::Param { field: "scale", reason: e.to_string() })?;
        let mut touched = roaring::RoaringBitmap::new();
        let mut bursts = Vec::with_capacity(plan.len());
        let mut think = Vec::with_capacity(plan.len());
        for b in &plan {
            let reads: Vec<(u64, u64)> =
                b.rows.iter().filter(|r| r.op == Op::Read && r.length > 0).map(|r| (r.offset, r.length)).collect();
            for &(o, l) in &reads {
                touched.insert_range((o / cs) as u32..(o + l).div_ceil(cs) as u32);
            }
            bursts.push(reads);
            think.push(b.think.as_secs_f64());
        }
        let max = (p.max_fetch / cs).max(1) as u32;
        let profile_runs = profile
            .map(|pr| {
                let entries: Vec<_> = pr.entries.into_iter().filter(|e| e.chunk < chunks).collect();
                prefetch_runs(&entries, max)
            })
            .unwrap_or_default();
        Ok(Workload {
            bursts,
            think,
            chunks,
            stripe_chunks: (p.stripe / cs).max(1) as u32,
            profile_runs,
            working_set: touched.len(),
        })
    }
}

fn load_profile(path: &Path) -> Result<Profile, SimError> {
    let err = |reason: String| SimError::Profile { path: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    Profile::decode(&bytes).map_err(|e| err(e.to_string()))
}

/// Runs every strategy of `p` at `p.nodes` nodes (and at one node, for the ratio).
pub fn run(p: &SimParams) -> Result<Report, SimError> {
    p.check()?;
    let w = Workload::load(p)?;
    let mut out = Vec::new();
    for &s in &p.strategies {
        out.push(report::run_strategy(p, &w, s));
    }
    Ok(Report::new(p, &w, out))
}

/// [`run`] at each of `nodes` in turn (the other parameters as in `p`).
pub fn sweep(p: &SimParams, nodes: &[u32]) -> Result<Vec<Report>, SimError> {
    nodes.iter().map(|&n| run(&SimParams { nodes: n, ..p.clone() })).collect()
}
