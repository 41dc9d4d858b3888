//! The discrete-event loop of one strategy at one scale: a binary heap of timed events, the
//! nodes' state (cache, single-flight fetches, CPU), and the links; the guests' trace replays
//! are in `guest.rs`.
//!
//! Time is virtual: integer nanoseconds from the first node's vmtd start, turned into an
//! `Instant` (a fixed base plus the offset) wherever the relay's own code wants `now`. Events at
//! the same time run in the order they were scheduled (a sequence number breaks ties), and every
//! random choice comes from one seeded generator, so a seed gives one result.
//!
//! What is the relay's own code and what is model: see `relay.rs` and the module doc of `sim`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

use super::net::{FlowId, LinkId, Net};
use super::params::{SimParams, Strategy};
use super::rng::{pick, Rng};
use super::slab::Slab;
use super::Workload;
use crate::p2p::core::federation::rank;
use crate::p2p::core::{Federation, Membership, PieceRead, Roster, UploadBudget};
use crate::p2p::select::{Outcome, Selector};

#[derive(Debug, Clone, Copy)]
pub(super) enum Ev {
    /// A node's guest sends its next burst of reads.
    Burst(u32),
    /// A link's next flow completion, if the link's generation is still this one.
    LinkWake(LinkId, u64),
    /// A peer request reaches its server.
    AtServer(u32),
    /// A refusal or failure reaches the asker.
    AtClient(u32, Outcome),
    /// A reply's bytes reached the asker and were checked.
    Served(u32),
    /// A server starts sending a reply, its CPU work done (with its serial: ids are reused).
    StartReply(u32, u64),
    /// An origin read of a fetch starts (its request arrived at the origin).
    OriginStart(u32),
    /// An origin read's bytes reached the node.
    OriginDone(u32),
    /// A node has handled an origin read's bytes (vmtd: checked them against the manifest).
    OriginChecked(u32),
    /// A direct guest read's request reached the origin.
    DirectStart(u32),
    /// A direct guest read's bytes reached the node.
    DirectDone(u32),
    /// A node has handled a fetched run's bytes (checked, stored, woken its readers).
    Fetched(u32),
    /// A node starts prefetching its image's boot profile.
    Prefetch(u32),
    /// A guest read's answer reached the guest: its burst moves on.
    ReadAnswered(u32),
    /// The trackers send each other their summaries (every ttl / 3, with several trackers).
    Sync,
    /// A tracker whose tops changed tells the others (as `Tracker::push` does at once).
    Push(u32),
    Heartbeat(u32),
    Announce(u32),
    Kill,
}

/// What a flow carries.
#[derive(Debug, Clone, Copy)]
pub(super) enum Purpose {
    Origin(u32),
    Direct(u32),
    Reply(u32),
}

/// Who waits for chunks.
#[derive(Debug, Clone, Copy)]
pub(super) enum Want {
    Read(u32),
    Serve(u32),
    Prefetch,
    /// Its request was ended by a kill: the wait ends without effect.
    Dropped,
}

/// A wait on one or more fetches.
pub(super) struct Wait {
    pub node: u32,
    pub pending: u32,
    /// Of those, the fetches that have not started receiving (cut through, the default).
    pub unstarted: u32,
    pub failed: bool,
    pub want: Want,
}

/// One fetch in flight on one node (the `Fetcher`'s single flight).
pub(super) struct Flight {
    pub node: u32,
    pub run: Range<u32>,
    pub waits: Vec<u32>,
    pub piece: Option<PieceRead>,
    /// Its bytes have started arriving (cut through, the default).
    pub receiving: bool,
    /// A run a parent pushes to this node (`--push`): no source to choose, it just arrives.
    pub pushed: bool,
}

/// One guest read.
pub(super) struct Read {
    pub node: u32,
    pub issued: u64,
    pub bytes: u64,
}

/// One request to a peer (or a tree parent).
pub(super) struct Req {
    /// Unique for the run (the slab reuses ids).
    pub serial: u64,
    pub client: u32,
    pub server: u32,
    pub flight: u32,
    pub run: Range<u32>,
    pub bytes: u64,
    /// Bytes reserved from the server's budget (relay strategies).
    pub reserved: u64,
    pub slot: bool,
    pub flow: Option<FlowId>,
    /// Cut through (the default): started before its chunks were in; when they were (ns); all sent.
    pub early: bool,
    pub upstream_done: Option<u64>,
    pub sent: bool,
    /// The server's wait for its chunks while it has one (a kill drops it).
    pub wait: Option<u32>,
}

impl Req {
    /// A request (or a push: `--push`) of `run` from `server` to `client`, for `client`'s
    /// flight, with `reserved` bytes of the server's budget already taken.
    pub fn new(serial: u64, client: u32, server: u32, flight: u32, run: Range<u32>, bytes: u64, reserved: u64) -> Req {
        Req {
            serial,
            client,
            server,
            flight,
            run,
            bytes,
            reserved,
            slot: false,
            flow: None,
            early: false,
            upstream_done: None,
            sent: false,
            wait: None,
        }
    }
}

/// One node.
pub(super) struct Node {
    pub name: String,
    /// The tracker it registers with (its first in rendezvous order).
    pub home: u32,
    /// Most peer sessions (asked and asking) it held at once.
    pub sessions_peak: u64,
    /// The digest of the image its guest boots (node i: image i mod `images`).
    pub key: [u8; 32],
    pub up: LinkId,
    pub down: LinkId,
    pub alive: bool,
    pub liar: bool,
    /// When its guest starts, and when its replay ended.
    pub start: u64,
    pub done: Option<u64>,
    pub burst: usize,
    pub outstanding: u32,
    pub cache: RoaringBitmap,
    pub inflight: HashMap<u32, u32>,
    pub cpu_free: f64,
    pub uploaded: u64,
    pub origin_free: u32,
    pub origin_queue: VecDeque<u32>,
    pub prefetch: VecDeque<Range<u32>>,
    pub prefetching: u32,
    // The relay (vmthunder strategies only).
    pub sel: Option<Selector>,
    pub membership: Option<Membership>,
    pub budget: Option<UploadBudget>,
    pub slots_free: u32,
    pub slot_queue: VecDeque<u32>,
    /// Per asker: reply bytes reserved and requests being answered.
    pub sessions_in: HashMap<u32, (u64, usize)>,
    /// Peers this node holds a session with (it asks them).
    pub sessions_out: HashSet<u32>,
    /// Peers holding a session with this node (they get its have-deltas).
    pub subscribers: Vec<u32>,
    pub announced: RoaringBitmap,
    pub announcing: bool,
    /// Requests this node is answering now.
    pub serving: HashSet<u32>,
    /// `--push`: per class, this node's parent in its view as of its last heartbeat, and the
    /// nodes that named this one their parent then.
    pub parent_of: Vec<Option<u32>>,
    pub children: Vec<Vec<u32>>,
    /// `--push`: per child, pushes reserved and not yet sent (at most vmtd's window), and the
    /// runs waiting for a place among them, oldest first.
    pub pushes_out: HashMap<u32, PushQueue>,
    /// Its guest or its prefetch has begun reading: only then does it take a parent to push to
    /// it (as vmtd's `Adopt`).
    pub active: bool,
    /// When it became active, and the runs it obtained since (its boot log, see `push.rs`), with
    /// their bytes.
    pub active_at: u64,
    pub boot_log: (Vec<std::ops::Range<u32>>, u64),
}

/// `--push`: pushes to one child reserved and not yet sent, and the runs (with the flight that
/// brings them, cut through) waiting for a place among them, oldest first.
pub(super) type PushQueue = (u32, VecDeque<(Range<u32>, Option<u32>)>);

/// Counters of one run.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub stalls: Vec<u64>,
    pub failed_reads: u64,
    pub origin_bytes: u64,
    pub registrations: u64,
    pub answer_bytes: u64,
    pub events: u64,
    pub peer_requests: u64,
    pub refusals: u64,
    /// Cut through (the default): replies begun early, and those a kill broke.
    pub early_replies: u64,
    pub early_broken: u64,
    /// `--push`: runs pushed to a child, their bytes, those the sender's budget refused, and
    /// those lost (a kill) before they arrived.
    pub pushes: u64,
    pub push_bytes: u64,
    pub pushes_refused: u64,
    pub pushes_lost: u64,
}

/// Origin reads in flight per image over a peer-aware source (as `Swarm`'s).
pub(super) const ORIGIN_SLOTS: u32 = 32;
/// How soon a node's new chunks reach the peers holding sessions with it (the peer server's
/// announcer: every 250 ms while busy).
pub(super) const HAVE_INTERVAL: f64 = crate::p2p::server::HAVE_INTERVAL.as_secs_f64();
/// The digest standing for image `m` (the tracker and the relay key everything by it).
pub(super) fn image_key(m: u32) -> [u8; 32] {
    let mut k = [7; 32];
    k[..4].copy_from_slice(&m.to_le_bytes());
    k
}

pub(super) struct Sim<'a> {
    pub p: &'a SimParams,
    pub w: &'a Workload,
    pub strategy: Strategy,
    pub base: Instant,
    pub now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, usize)>>,
    evs: Slab<Ev>,
    pub net: Net,
    pub origin_up: LinkId,
    pub nodes: Vec<Node>,
    pub flights: Slab<Flight>,
    pub waits: Slab<Wait>,
    pub reads: Slab<Read>,
    pub reqs: Slab<Req>,
    pub flows: HashMap<FlowId, Purpose>,
    /// Per tracker: its table, what the others told it, and the registrations it answered.
    pub rosters: Vec<Roster>,
    pub feds: Vec<Federation>,
    pub tracker_registrations: Vec<u64>,
    /// Per tracker: its table's changes as of its last push, when that was, and whether a push
    /// is due.
    pub pushed: Vec<(u64, u64, bool)>,
    pub c: Counters,
    pub rng: Rng,
    pub first_start: u64,
    /// Guests neither done nor killed.
    pub running: usize,
    /// When each of the host's shared cores is free (`host_cores` > 0).
    host: Vec<f64>,
}

pub(super) fn ns(secs: f64) -> u64 {
    (secs.max(0.0) * 1e9).round() as u64
}

/// Tracker `t`'s name (the nodes rank the trackers by their names).
pub(super) fn tracker_name(t: u32) -> String {
    format!("192.0.2.{}:7070", t + 1)
}

/// Node `i`'s peer name for its image: an address of its own (vmtd binds names to addresses),
/// `first` + i, and when its vmtd opened the image (`at`, virtual ns, on a fixed epoch base).
pub(super) fn node_name(first: std::net::Ipv4Addr, i: u32, at: u64) -> String {
    let addr = format!("{}:7000", std::net::Ipv4Addr::from(u32::from(first) + i));
    crate::p2p::conn::image_name(&addr, EPOCH_MS + at / 1_000_000)
}

/// The Unix time in milliseconds that virtual time 0 stands for in node names.
const EPOCH_MS: u64 = 1_796_000_000_000;

impl<'a> Sim<'a> {
    pub fn new(p: &'a SimParams, w: &'a Workload, strategy: Strategy, n: u32) -> Sim<'a> {
        let mut rng = Rng::new(p.seed);
        let mut net = Net::with_burst(p.link_burst);
        let origin_up = net.link(p.origin_rate);
        let relays = strategy.relays();
        let ttl = Duration::from_secs_f64(p.tracker_ttl);
        let stripe = (p.stripe / p.chunk_size) as u32;
        let mut liars: Vec<bool> = (0..n).map(|_| false).collect();
        let nl = (p.liars * f64::from(n)).floor() as usize;
        for i in pick(&mut rng, n, nl) {
            liars[i as usize] = true;
        }
        let trackers: Vec<String> = (0..p.trackers).map(tracker_name).collect();
        let nodes = (0..n)
            .map(|i| {
                let start = ns(p.warmup + if p.spread > 0.0 { rng.unit() * p.spread } else { 0.0 });
                let name = node_name(p.first_address, i, start.saturating_sub(ns(p.warmup)));
                Node {
                    // vmtd ranks the trackers by its address, its name for no image.
                    home: rank(crate::p2p::conn::node_addr(&name), &trackers)[0] as u32,
                    sessions_peak: 0,
                    key: image_key(i % p.images),
                    up: net.link(p.node_rate),
                    down: net.link(p.node_rate),
                    alive: true,
                    liar: relays && liars[i as usize],
                    start,
                    done: None,
                    burst: 0,
                    outstanding: 0,
                    cache: RoaringBitmap::new(),
                    inflight: HashMap::new(),
                    cpu_free: 0.0,
                    uploaded: 0,
                    origin_free: ORIGIN_SLOTS,
                    origin_queue: VecDeque::new(),
                    prefetch: VecDeque::new(),
                    prefetching: 0,
                    sel: relays.then(|| Selector::new(&name, stripe, p.fanout, p.classes)),
                    membership: relays.then(|| Membership::new(Duration::from_secs_f64(p.heartbeat), usize::MAX)),
                    budget: relays.then(|| UploadBudget::new(p.upload_buffer, crate::p2p::core::upload::MAX_QUEUE)),
                    slots_free: p.upload_slots,
                    slot_queue: VecDeque::new(),
                    sessions_in: HashMap::new(),
                    sessions_out: HashSet::new(),
                    subscribers: Vec::new(),
                    announced: RoaringBitmap::new(),
                    announcing: false,
                    serving: HashSet::new(),
                    parent_of: vec![None; if p.push { p.classes as usize } else { 0 }],
                    children: vec![Vec::new(); if p.push { p.classes as usize } else { 0 }],
                    pushes_out: HashMap::new(),
                    active: false,
                    active_at: 0,
                    boot_log: (Vec::new(), 0),
                    name,
                }
            })
            .collect::<Vec<_>>();
        let first_start = nodes.iter().map(|n| n.start).min().unwrap_or(0);
        Sim {
            p,
            w,
            strategy,
            base: Instant::now(),
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            evs: Slab::default(),
            net,
            origin_up,
            nodes,
            flights: Slab::default(),
            waits: Slab::default(),
            reads: Slab::default(),
            reqs: Slab::default(),
            flows: HashMap::new(),
            rosters: (0..p.trackers).map(|_| Roster::new(ttl, 8).federated(p.trackers > 1)).collect(),
            feds: (0..p.trackers).map(|_| Federation::new(ttl)).collect(),
            tracker_registrations: vec![0; p.trackers as usize],
            pushed: vec![(0, 0, false); p.trackers as usize],
            c: Counters::default(),
            rng,
            first_start,
            running: 0,
            host: vec![0.0; p.host_cores as usize],
        }
    }

    /// The relay's clock: the fixed base plus virtual time.
    pub fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    pub fn secs(&self) -> f64 {
        self.now as f64 / 1e9
    }

    pub fn at(&mut self, t: u64, ev: Ev) {
        let id = self.evs.insert(ev) as usize;
        self.seq += 1;
        self.heap.push(Reverse((t.max(self.now), self.seq, id)));
    }

    pub fn after(&mut self, secs: f64, ev: Ev) {
        self.at(self.now + ns(secs), ev);
    }

    pub fn lat(&self) -> f64 {
        self.p.latency
    }

    /// Runs until every live node's guest is done (or nothing is left to happen).
    pub fn run(&mut self) {
        for i in 0..self.nodes.len() as u32 {
            let t = self.nodes[i as usize].start;
            self.at(t, Ev::Burst(i));
            if self.strategy == Strategy::VmthunderProfile {
                self.at(t.saturating_sub(ns(self.p.prefetch_lead)), Ev::Prefetch(i));
            }
            if self.strategy.relays() {
                // Each vmtd starts `warmup` before its guest; heartbeats from then on.
                let hb = t.saturating_sub(ns(self.p.warmup)) + ns(self.rng.unit() * self.p.heartbeat);
                self.at(hb, Ev::Heartbeat(i));
            }
        }
        if self.p.kill > 0.0 {
            self.at(self.first_start + ns(self.p.kill_at), Ev::Kill);
        }
        if self.strategy.relays() && self.p.trackers > 1 {
            self.at(0, Ev::Sync);
        }
        self.running = self.nodes.len();
        while let Some(Reverse((t, _, id))) = self.heap.pop() {
            let Some(ev) = self.evs.remove(id as u32) else { continue };
            self.now = t;
            self.c.events += 1;
            self.handle(ev);
            if self.running == 0 {
                break;
            }
        }
    }

    /// Node `i`'s guest finished its boot.
    pub(super) fn finish(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        if n.done.is_none() {
            n.done = Some(self.now);
            self.running = self.running.saturating_sub(1);
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Burst(i) => self.burst(i),
            Ev::LinkWake(l, g) => self.link_wake(l, g),
            Ev::DirectStart(r) => {
                let read = self.reads.get(r).map(|x| (x.node, x.bytes));
                if let Some((node, bytes)) = read {
                    self.c.origin_bytes += bytes;
                    let down = self.nodes[node as usize].down;
                    self.flow(self.origin_up, down, bytes, Purpose::Direct(r));
                }
            }
            Ev::DirectDone(r) => self.read_done(r, false),
            Ev::ReadAnswered(i) => {
                if self.nodes[i as usize].alive {
                    self.burst_step(i);
                }
            }
            Ev::Prefetch(i) => {
                if self.nodes[i as usize].alive {
                    self.activate(i);
                    self.nodes[i as usize].prefetch = self.w.profile_runs.iter().cloned().collect();
                    self.pump_prefetch(i);
                }
            }
            Ev::Fetched(f) => self.flight_done(f, false),
            Ev::OriginStart(f) => self.origin_start(f),
            Ev::OriginDone(f) => self.origin_done(f),
            Ev::OriginChecked(f) => self.fetched(f),
            Ev::AtServer(r) => self.at_server(r),
            Ev::AtClient(r, how) => self.at_client(r, how),
            Ev::StartReply(r, serial) => self.start_reply(r, serial),
            Ev::Served(r) => self.served(r),
            Ev::Heartbeat(i) => self.heartbeat(i),
            Ev::Announce(i) => self.announce(i),
            Ev::Kill => self.kill(),
            Ev::Sync => self.sync(),
            Ev::Push(t) => self.push(t),
        }
    }

    // ---- links ----

    pub fn flow(&mut self, up: LinkId, down: LinkId, bytes: u64, purpose: Purpose) -> FlowId {
        let now = self.secs();
        let (id, links) = self.net.start(up, down, bytes, now);
        self.flows.insert(id, purpose);
        self.reschedule(links);
        id
    }

    pub fn cancel_flow(&mut self, id: FlowId) {
        let now = self.secs();
        if let Some(links) = self.net.end(id, now) {
            self.flows.remove(&id);
            self.reschedule(links);
        }
    }

    fn reschedule(&mut self, links: [LinkId; 2]) {
        let now = self.secs();
        for l in links {
            if let Some((t, _, g)) = self.net.next_completion(l, now) {
                self.at(ns(t), Ev::LinkWake(l, g));
            }
        }
    }

    fn link_wake(&mut self, l: LinkId, g: u64) {
        if !self.net.current(l, g) {
            return;
        }
        let now = self.secs();
        let Some((_, id, _)) = self.net.next_completion(l, now) else { return };
        let links = self.net.end(id, now);
        let purpose = self.flows.remove(&id);
        if let Some(links) = links {
            self.reschedule(links);
        }
        let lat = self.lat();
        match purpose {
            Some(Purpose::Direct(r)) => self.after(lat, Ev::DirectDone(r)),
            Some(Purpose::Origin(f)) => self.after(lat, Ev::OriginDone(f)),
            Some(Purpose::Reply(r)) => self.reply_sent(r),
            None => {}
        }
    }

    /// Takes `cost` seconds of node `i`'s CPU, after what it is busy with; when it is done.
    /// With shared host cores, also after the first core to be free, which it then holds.
    pub fn cpu(&mut self, i: u32, cost: f64) -> f64 {
        let now = self.secs();
        let n = &mut self.nodes[i as usize];
        let mut start = n.cpu_free.max(now);
        if let Some(core) = self.host.iter_mut().min_by(|a, b| a.total_cmp(b)) {
            start = start.max(*core);
            *core = start + cost;
        }
        n.cpu_free = start + cost;
        n.cpu_free
    }
}
