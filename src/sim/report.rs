//! What one `vmt sim` run found, per strategy: JSON for scripts and a Markdown table for people.

use std::fmt::Write as _;
use std::time::Instant as WallClock;

use serde::Serialize;

use super::engine::{image_key, Sim};
use super::params::{SimParams, Strategy};
use super::Workload;
use crate::p2p::core::roster::NEAR;

/// Results of one strategy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StrategyReport {
    pub strategy: Strategy,
    pub nodes: u32,
    /// Why the strategy was not simulated at this scale, if it was not.
    pub skipped: Option<String>,
    /// Slowest surviving node's boot, from its guest's start, and the same at one node.
    pub makespan_s: f64,
    pub makespan_1_s: f64,
    pub ratio: f64,
    /// Nodes whose guest never finished (a read waits for ever).
    pub unfinished: u64,
    pub stall_mean_ms: f64,
    pub stall_p99_ms: f64,
    pub stall_max_ms: f64,
    pub failed_reads: u64,
    pub origin_bytes: u64,
    /// Origin egress ÷ (working set in chunks × chunk size × images).
    pub origin_per_working_set: f64,
    /// Origin egress ÷ (one node's origin egress with the same strategy × images): what the
    /// relay adds. It differs from the above where a node brings in more than its trace reads
    /// (a boot profile's chunks that this boot does not read).
    pub origin_per_solo: f64,
    /// Bytes a node sent to peers ÷ the working set: the busiest node, and the 99th percentile.
    pub upload_max_per_working_set: f64,
    pub upload_p99_per_working_set: f64,
    /// Peer sessions per node (asked and asking): the most any node held at once, and the mean
    /// at the end.
    pub sessions_max: u64,
    pub sessions_mean: f64,
    /// Peer state per node (selector and member lists), at the end, in bytes.
    pub peer_state_max_bytes: u64,
    pub peer_state_mean_bytes: f64,
    pub tracker_requests_per_s: f64,
    pub tracker_answer_bytes_per_s: f64,
    /// Registrations per second of the busiest tracker.
    pub tracker_max_requests_per_s: f64,
    pub tracker_nodes: u64,
    pub peer_requests: u64,
    pub refusals: u64,
    pub killed: u64,
    pub events: u64,
    /// Cut through (the default): replies started before their chunks were in, and those a kill
    /// broke.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub early_replies: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub early_broken: u64,
    /// With `--push`: runs pushed down the trees, their bytes, pushes the senders' budgets
    /// refused, and pushes a kill broke.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pushes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub push_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pushes_refused: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pushes_lost: u64,
    /// Wall-clock seconds this strategy took to simulate.
    pub wall_s: f64,
    /// Each finished guest's boot time from its start, sorted (for the completion CDF; not in
    /// the JSON, which stays one line per strategy's figures).
    #[serde(skip)]
    pub node_times_s: Vec<f64>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub params: SimParams,
    pub working_set_chunks: u64,
    pub reads_per_node: u64,
    pub strategies: Vec<StrategyReport>,
}

/// The peers one node keeps state for: its ancestors in each tree (about log_fanout N each)
/// and its ring successors.
fn view_size(p: &SimParams) -> u64 {
    let depth = (f64::from(p.nodes.max(2)).ln() / f64::from(p.fanout.max(2)).ln()).ceil() as u64 + 1;
    u64::from(p.classes) * depth + u64::from(NEAR)
}

/// Estimated peer state of the relay (a selector entry and a have-map of the working set per
/// peer of each node's view, on every node), to refuse runs that could not fit in memory.
fn peer_state_estimate(p: &SimParams, w: &Workload) -> u64 {
    let per_member = 260 + 2 * w.working_set.min(4096) + 8 * w.working_set.saturating_sub(4096) / 64;
    u64::from(p.nodes) * view_size(p) * per_member
}

pub(super) fn run_strategy(p: &SimParams, w: &Workload, s: Strategy) -> StrategyReport {
    let ws_bytes = (w.working_set * p.chunk_size).max(1) as f64;
    let mut r = StrategyReport {
        strategy: s,
        nodes: p.nodes,
        skipped: None,
        makespan_s: 0.0,
        makespan_1_s: 0.0,
        ratio: 0.0,
        unfinished: 0,
        stall_mean_ms: 0.0,
        stall_p99_ms: 0.0,
        stall_max_ms: 0.0,
        failed_reads: 0,
        origin_bytes: 0,
        origin_per_working_set: 0.0,
        origin_per_solo: 0.0,
        upload_max_per_working_set: 0.0,
        upload_p99_per_working_set: 0.0,
        sessions_max: 0,
        sessions_mean: 0.0,
        peer_state_max_bytes: 0,
        peer_state_mean_bytes: 0.0,
        tracker_requests_per_s: 0.0,
        tracker_answer_bytes_per_s: 0.0,
        tracker_max_requests_per_s: 0.0,
        tracker_nodes: 0,
        peer_requests: 0,
        refusals: 0,
        killed: 0,
        events: 0,
        early_replies: 0,
        early_broken: 0,
        pushes: 0,
        push_bytes: 0,
        pushes_refused: 0,
        pushes_lost: 0,
        wall_s: 0.0,
        node_times_s: Vec::new(),
    };
    if s.relays() {
        let need = peer_state_estimate(p, w);
        if need > p.max_peer_state {
            r.skipped = Some(format!(
                "each node keeps state for about {} peers (its ancestors and ring successors): about {:.1} GiB \
                 of peer state in all (limit --max-peer-state {:.1} GiB)",
                view_size(p),
                need as f64 / f64::from(1u32 << 30),
                p.max_peer_state as f64 / f64::from(1u32 << 30)
            ));
            return r;
        }
    }
    let solo = SimParams { nodes: 1, images: 1, kill: 0.0, liars: 0.0, tracker_down: None, spread: 0.0, ..p.clone() };
    let mut one = Sim::new(&solo, w, s, 1);
    one.run();
    r.makespan_1_s = makespan(&one).0;

    let wall = WallClock::now();
    let mut sim = Sim::new(p, w, s, p.nodes);
    sim.run();
    r.wall_s = wall.elapsed().as_secs_f64();
    let (m, unfinished) = makespan(&sim);
    r.makespan_s = m;
    r.unfinished = unfinished;
    r.node_times_s = sim
        .nodes
        .iter()
        .filter(|n| n.alive)
        .filter_map(|n| n.done.map(|d| d.saturating_sub(n.start) as f64 / 1e9))
        .collect();
    r.node_times_s.sort_by(f64::total_cmp);
    r.ratio = if r.makespan_1_s > 0.0 { m / r.makespan_1_s } else { 0.0 };
    let mut stalls = std::mem::take(&mut sim.c.stalls);
    stalls.sort_unstable();
    if !stalls.is_empty() {
        r.stall_mean_ms = stalls.iter().map(|&x| x as f64).sum::<f64>() / stalls.len() as f64 / 1e6;
        r.stall_p99_ms = percentile(&stalls, 0.99) as f64 / 1e6;
        r.stall_max_ms = stalls[stalls.len() - 1] as f64 / 1e6;
    }
    r.failed_reads = sim.c.failed_reads;
    r.origin_bytes = sim.c.origin_bytes;
    // Every image's working set comes from the origin once at best.
    r.origin_per_working_set = sim.c.origin_bytes as f64 / (ws_bytes * f64::from(p.images));
    r.origin_per_solo = sim.c.origin_bytes as f64 / (one.c.origin_bytes.max(1) as f64 * f64::from(p.images));
    let live: Vec<_> = sim.nodes.iter().filter(|n| n.alive).collect();
    let mut up: Vec<u64> = live.iter().map(|n| n.uploaded).collect();
    up.sort_unstable();
    if let Some(&max) = up.last() {
        r.upload_max_per_working_set = max as f64 / ws_bytes;
        r.upload_p99_per_working_set = percentile(&up, 0.99) as f64 / ws_bytes;
    }
    let sessions: Vec<u64> = live.iter().map(|n| (n.sessions_out.len() + n.subscribers.len()) as u64).collect();
    r.sessions_max = live.iter().map(|n| n.sessions_peak).max().unwrap_or(0);
    r.sessions_mean = sessions.iter().sum::<u64>() as f64 / sessions.len().max(1) as f64;
    let state: Vec<u64> = live
        .iter()
        .map(|n| {
            let sel = n.sel.as_ref().map_or(0, |s| s.state_bytes());
            let members = n.membership.as_ref().map_or(0, |m| {
                let v = m.view(&n.key);
                v.ancestors.iter().flatten().chain(&v.near).map(|x| x.len() as u64 + 48).sum()
            });
            sel + members
        })
        .collect();
    r.peer_state_max_bytes = state.iter().copied().max().unwrap_or(0);
    r.peer_state_mean_bytes = state.iter().sum::<u64>() as f64 / state.len().max(1) as f64;
    // Tracker load over the whole run (warm-up included: nodes register from their start).
    let total = (sim.now as f64 / 1e9).max(1e-9);
    r.tracker_requests_per_s = sim.c.registrations as f64 / total;
    r.tracker_answer_bytes_per_s = sim.c.answer_bytes as f64 / total;
    r.tracker_max_requests_per_s = sim.tracker_registrations.iter().copied().max().unwrap_or(0) as f64 / total;
    r.tracker_nodes = sim.rosters.iter().flat_map(|t| (0..p.images).map(|m| t.nodes(&image_key(m)) as u64)).sum();
    r.peer_requests = sim.c.peer_requests;
    r.refusals = sim.c.refusals;
    r.killed = sim.nodes.iter().filter(|n| !n.alive).count() as u64;
    r.events = sim.c.events;
    r.early_replies = sim.c.early_replies;
    r.early_broken = sim.c.early_broken;
    r.pushes = sim.c.pushes;
    r.push_bytes = sim.c.push_bytes;
    r.pushes_refused = sim.c.pushes_refused;
    r.pushes_lost = sim.c.pushes_lost;
    r
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The slowest surviving guest's boot time, and how many never finished.
fn makespan(sim: &Sim) -> (f64, u64) {
    let mut worst = 0u64;
    let mut unfinished = 0;
    for n in sim.nodes.iter().filter(|n| n.alive) {
        match n.done {
            Some(d) => worst = worst.max(d.saturating_sub(n.start)),
            None => {
                unfinished += 1;
                worst = worst.max(sim.now.saturating_sub(n.start));
            }
        }
    }
    (worst as f64 / 1e9, unfinished)
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let k = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[k]
}

impl Report {
    pub(super) fn new(p: &SimParams, w: &Workload, strategies: Vec<StrategyReport>) -> Report {
        Report {
            params: p.clone(),
            working_set_chunks: w.working_set,
            reads_per_node: w.bursts.iter().map(|b| b.len() as u64).sum(),
            strategies,
        }
    }

    /// A Markdown table, one row per strategy, and the strategies skipped with their reason.
    pub fn table(&self) -> String {
        let mut t = String::new();
        t.push_str(
            "| strategy | N | makespan (s) | ×N=1 | stall mean / p99 / max (ms) | failed reads | origin ÷ working set / ÷ N=1 \
             | upload max / p99 ÷ working set | sessions max / mean | peer state max / mean (KiB) | tracker req/s all / busiest \
             | tracker answer KiB/s | unfinished | killed | sim wall (s) |\n",
        );
        t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.strategies {
            if let Some(why) = &r.skipped {
                let _ = writeln!(t, "| {} | {} | not run: {why} |||||||||||||", r.strategy.name(), r.nodes);
                continue;
            }
            let _ = writeln!(
                t,
                "| {} | {} | {:.2} | {:.2} | {:.1} / {:.1} / {:.1} | {} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {:.0} | {:.0} / {:.0} \
                 | {:.0} / {:.0} | {:.0} | {} | {} | {:.1} |",
                r.strategy.name(),
                r.nodes,
                r.makespan_s,
                r.ratio,
                r.stall_mean_ms,
                r.stall_p99_ms,
                r.stall_max_ms,
                r.failed_reads,
                r.origin_per_working_set,
                r.origin_per_solo,
                r.upload_max_per_working_set,
                r.upload_p99_per_working_set,
                r.sessions_max,
                r.sessions_mean,
                r.peer_state_max_bytes as f64 / 1024.0,
                r.peer_state_mean_bytes / 1024.0,
                r.tracker_requests_per_s,
                r.tracker_max_requests_per_s,
                r.tracker_answer_bytes_per_s / 1024.0,
                r.unfinished,
                r.killed,
                r.wall_s,
            );
        }
        t
    }
}
