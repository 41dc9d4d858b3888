//! The relay in the simulation: what a node asks, serves and knows, decided by the relay's own
//! code and carried out on simulated links.
//!
//! Decisions taken by vmtd's code, called here exactly as vmtd calls it:
//! - which source a piece is read from, and what a refusal, failure or lie costs the peer
//!   ([`PieceRead`] over [`crate::p2p::select::Selector`]: holders, relay trees, backoff, bans);
//! - whether a node fetches a run for an asker (`Selector::relays_run`) or answers `NotHave`;
//! - whether a request gets a reply or `Busy` ([`crate::p2p::core::UploadBudget`], per session
//!   and node-wide);
//! - each node's view of the image ([`crate::p2p::core::Membership`] from the answers of the
//!   tracker's own [`crate::p2p::core::Roster`]: ancestors in each tree, ring successors);
//!   sessions go to `Selector::usable_members` and close when a peer leaves the view, as
//!   `Swarm::set_view` does;
//! - have-maps on session open (`have_full`) and their deltas (`have_added`), a session's end
//!   (`disconnected`), a node that cannot be reached (`unreachable`).
//!
//! Modelled, not vmtd's code: the timing of messages (one hop of latency each), the peer server's
//! upload slots as a FIFO of `upload_slots`, the CPU cost of each reply and of each run from the
//! origin (FIFO per node), and
//! have-deltas reaching every subscriber at once, 250 ms after a node's first new chunk.

use super::engine::{Ev, Purpose, Req, Sim, Wait, Want};
use super::params::Strategy;
use crate::p2p::core::roster::REBUILD;
use crate::p2p::select::{Choice, Outcome};

impl Sim<'_> {
    /// Asks flight `f`'s piece where to go next, and goes there.
    pub(super) fn next_source(&mut self, f: u32) {
        let now = self.instant();
        let Some(fl) = self.flights.get(f) else { return };
        let i = fl.node;
        let Some(piece) = fl.piece.clone() else { return };
        let Some(sel) = self.nodes[i as usize].sel.as_mut() else { return };
        let choice = piece.next(sel, now);
        match choice {
            Choice::Origin => self.origin_read(f),
            Choice::Peer { node, .. } => {
                let Some(j) = self.index(&node) else { return };
                self.ask(i, j, f, piece.run());
            }
        }
    }

    /// The node a name stands for.
    pub(super) fn index(&self, name: &str) -> Option<u32> {
        let addr = crate::p2p::conn::node_addr(name);
        let addr: std::net::Ipv4Addr = addr.strip_suffix(":7000")?.parse().ok()?;
        u32::from(addr).checked_sub(u32::from(self.p.first_address)).filter(|&i| (i as usize) < self.nodes.len())
    }

    /// Node `i` asks node `j` for `run`, on behalf of its flight `f`.
    pub(super) fn ask(&mut self, i: u32, j: u32, f: u32, run: std::ops::Range<u32>) {
        let bytes = u64::from(run.end - run.start) * self.p.chunk_size;
        self.c.peer_requests += 1;
        let r = self.reqs.insert(Req::new(self.c.peer_requests, i, j, f, run, bytes, 0));
        let mut delay = self.lat();
        if self.strategy.relays() && self.nodes[i as usize].sessions_out.insert(j) {
            // A new session: connect and handshake first (two round trips), then its `Have`.
            delay += 4.0 * self.lat();
            self.open_session(i, j);
        }
        self.after(delay, Ev::AtServer(r));
    }

    /// Node `i` opens a session with `j`: `j`'s have-map arrives with it.
    fn open_session(&mut self, i: u32, j: u32) {
        let now = self.instant();
        let name = self.nodes[j as usize].name.clone();
        let held = |n: &super::engine::Node| n.sessions_out.len() + n.subscribers.len();
        let max = self.p.max_sessions as usize;
        // At either side's bound (`p2p.max_sessions`), refused: the asker reads elsewhere.
        let full = held(&self.nodes[i as usize]) > max || held(&self.nodes[j as usize]) >= max;
        if !self.nodes[j as usize].alive || full {
            self.nodes[i as usize].sessions_out.remove(&j);
            if let Some(sel) = self.nodes[i as usize].sel.as_mut() {
                sel.unreachable(&name, now);
            }
            return;
        }
        let have = if self.nodes[j as usize].liar {
            (0..self.w.chunks).collect()
        } else {
            self.nodes[j as usize].cache.clone()
        };
        self.nodes[j as usize].subscribers.push(i);
        for k in [i, j] {
            let n = &mut self.nodes[k as usize];
            n.sessions_peak = n.sessions_peak.max((n.sessions_out.len() + n.subscribers.len()) as u64);
        }
        if let Some(sel) = self.nodes[i as usize].sel.as_mut() {
            sel.have_full(&name, have);
        }
    }

    pub(super) fn at_server(&mut self, r: u32) {
        let Some(q) = self.reqs.get(r) else { return };
        let (i, j, run, bytes) = (q.client, q.server, q.run.clone(), q.bytes);
        let lat = self.lat();
        if !self.nodes[j as usize].alive
            || (self.strategy.relays() && !self.nodes[i as usize].sessions_out.contains(&j))
        {
            // The process is gone (its host resets the connection), or the session was refused.
            self.after(lat, Ev::AtClient(r, Outcome::Lost));
            return;
        }
        if self.strategy == Strategy::CorTree {
            self.nodes[j as usize].serving.insert(r);
            let w = self.waits.insert(Wait { node: j, pending: 0, unstarted: 0, failed: false, want: Want::Serve(r) });
            if self.ensure(j, run, w) {
                self.waits.remove(w);
                self.ready_to_serve(r, false);
            } else if let Some(q) = self.reqs.get_mut(r) {
                q.wait = Some(w);
            }
            return;
        }
        let Some(reserved) = self.reserve_upload(j, i, bytes, false) else {
            self.c.refusals += 1;
            self.after(lat, Ev::AtClient(r, Outcome::Busy));
            return;
        };
        let n = &mut self.nodes[j as usize];
        n.serving.insert(r);
        if let Some(q) = self.reqs.get_mut(r) {
            q.reserved = reserved;
        }
        let n = &self.nodes[j as usize];
        let holds = n.cache.contains_range(run.clone());
        let asker = self.nodes[i as usize].name.clone();
        let relays = !n.liar && n.sel.as_ref().is_some_and(|s| s.relays_run(run.clone(), &asker));
        if holds {
            self.want_slot(r);
        } else if relays {
            let w = self.waits.insert(Wait { node: j, pending: 0, unstarted: 0, failed: false, want: Want::Serve(r) });
            if self.ensure(j, run, w) {
                self.waits.remove(w);
                self.want_slot(r);
            } else {
                if let Some(q) = self.reqs.get_mut(r) {
                    q.wait = Some(w);
                }
                // Cut through, a reply whose chunks are all arriving already need not wait.
                if self.waits.get(w).is_some_and(|wt| wt.unstarted == 0) {
                    self.start_early(r);
                }
            }
        } else {
            self.release(r);
            self.c.refusals += 1;
            self.after(lat, Ev::AtClient(r, Outcome::NotHave));
        }
    }

    /// Takes `bytes` of node `j`'s upload budget for a reply to `i` on their session (as the
    /// peer server's `UploadBudget`; a push, as vmtd's, within half of it), booked against that
    /// session; `None`: over budget.
    pub(super) fn reserve_upload(&mut self, j: u32, i: u32, bytes: u64, push: bool) -> Option<u64> {
        let n = &mut self.nodes[j as usize];
        let (held, queued) = n.sessions_in.get(&i).copied().unwrap_or((0, 0));
        let b = n.budget.as_mut()?;
        let reserved = if push { b.reserve_push(held, queued, bytes) } else { b.reserve(held, queued, bytes) }?;
        let s = n.sessions_in.entry(i).or_default();
        s.0 += reserved;
        s.1 += 1;
        Some(reserved)
    }

    /// The chunks of request `r` are at its server now (or the fetch failed).
    pub(super) fn ready_to_serve(&mut self, r: u32, failed: bool) {
        if let Some(q) = self.reqs.get_mut(r) {
            q.wait = None;
        }
        if self.early_upstream_done(r, failed) {
            return;
        }
        let Some(q) = self.reqs.get(r) else { return };
        let j = q.server;
        if failed || !self.nodes[j as usize].alive {
            self.release(r);
            let lat = self.lat();
            self.after(lat, Ev::AtClient(r, if failed { Outcome::NotHave } else { Outcome::Lost }));
            return;
        }
        if self.strategy == Strategy::CorTree {
            self.reply_cpu(r);
        } else {
            self.want_slot(r);
        }
    }

    pub(super) fn want_slot(&mut self, r: u32) {
        let Some(j) = self.reqs.get(r).map(|q| q.server) else { return };
        let n = &mut self.nodes[j as usize];
        if n.slots_free == 0 {
            n.slot_queue.push_back(r);
            return;
        }
        n.slots_free -= 1;
        if let Some(q) = self.reqs.get_mut(r) {
            q.slot = true;
        }
        self.reply_cpu(r);
    }

    /// The server spends its CPU on the reply, then sends it.
    pub(super) fn reply_cpu(&mut self, r: u32) {
        let Some(q) = self.reqs.get(r) else { return };
        let (j, bytes, serial) = (q.server, q.bytes, q.serial);
        let cost = self.p.cpu_per_request + bytes as f64 * self.p.cpu_per_byte;
        // Cut through, the first check unit's share before the first byte; the rest as it goes
        // (booked once the reply is sent, `deliver`), so the relay checks its own incoming run
        // in between.
        let done = self.cpu(j, if self.cuts() { self.unit_cpu() } else { cost });
        self.at(super::engine::ns(done), Ev::StartReply(r, serial));
    }

    pub(super) fn start_reply(&mut self, r: u32, serial: u64) {
        let Some(q) = self.reqs.get(r).filter(|q| q.serial == serial) else { return };
        let (i, j, bytes, f) = (q.client, q.server, q.bytes, q.flight);
        if !self.nodes[j as usize].alive || (self.strategy.relays() && !self.nodes[j as usize].serving.contains(&r)) {
            // Gone, or released meanwhile (a kill, a lost push it waited on): a relay's replies
            // and pushes are being served until released.
            return;
        }
        debug_assert!(q.flow.is_none(), "one flow per reply");
        let (up, down) = (self.nodes[j as usize].up, self.nodes[i as usize].down);
        let id = self.flow(up, down, bytes, Purpose::Reply(r));
        if let Some(q) = self.reqs.get_mut(r) {
            q.flow = Some(id);
        }
        self.receiving(f, true);
    }

    /// Gives back what request `r` holds at its server (slot, reserved bytes, queue place).
    pub(super) fn release(&mut self, r: u32) {
        let Some(q) = self.reqs.get_mut(r) else { return };
        let (i, j, reserved, slot, q_serial) = (q.client, q.server, q.reserved, q.slot, q.serial);
        q.reserved = 0;
        q.slot = false;
        let n = &mut self.nodes[j as usize];
        n.serving.remove(&r);
        if let Some(b) = n.budget.as_mut() {
            b.release(reserved);
        }
        if let Some(s) = n.sessions_in.get_mut(&i) {
            s.0 = s.0.saturating_sub(reserved);
            s.1 = s.1.saturating_sub(1);
        }
        let push = super::push::is_push(q_serial);
        if slot {
            n.slots_free += 1;
            debug_assert!(n.slots_free <= self.p.upload_slots, "a slot given back twice");
            if let Some(next) = n.slot_queue.pop_front() {
                self.want_slot(next);
            }
        }
        if push && reserved > 0 {
            self.push_done(j, i);
        }
    }

    /// A reply's last byte left its server.
    pub(super) fn reply_sent(&mut self, r: u32) {
        let Some(q) = self.reqs.get_mut(r) else { return };
        q.flow = None;
        if q.early && q.upstream_done.is_none() {
            // Cut through: the last chunk is not at the server yet.
            q.sent = true;
            return;
        }
        self.deliver(r);
    }

    /// Request `r`'s reply is all sent: the server lets go, the asker checks it.
    pub(super) fn deliver(&mut self, r: u32) {
        let Some(q) = self.reqs.get(r) else { return };
        let (i, j, bytes) = (q.client, q.server, q.bytes);
        // Cut through, the last check unit leaves the server at best one unit's time after it
        // came.
        let last = q.upstream_done.map_or(0.0, |t| t as f64 / 1e9 + self.check_unit() as f64 / self.p.node_rate);
        self.nodes[j as usize].uploaded += bytes;
        self.release(r);
        // The asker checks the bytes (hashing costs it CPU) once they are in.
        let lat = self.lat();
        let cost = bytes as f64 * self.p.cpu_per_byte + self.p.cpu_per_request;
        let verify = self.cpu(i, cost);
        let t = if self.cuts() {
            // The sender's share past the first check unit, and the asker's checks unit by unit
            // as they come: only the last unit's check is left once it is in.
            self.cpu(j, (cost - self.unit_cpu()).max(0.0));
            let arrived = self.secs().max(last) + lat;
            (arrived + self.unit_cpu()).max(verify - (cost - self.unit_cpu()).max(0.0))
        } else {
            (self.secs() + lat).max(verify)
        };
        self.at(super::engine::ns(t), Ev::Served(r));
    }

    pub(super) fn served(&mut self, r: u32) {
        let Some(q) = self.reqs.remove(r) else { return };
        if !self.nodes[q.client as usize].alive {
            return;
        }
        self.answered(&q, Outcome::Served);
        self.fetched(q.flight);
    }

    pub(super) fn at_client(&mut self, r: u32, how: Outcome) {
        let Some(q) = self.reqs.remove(r) else { return };
        if !self.nodes[q.client as usize].alive {
            return;
        }
        self.c.refusals += u64::from(!matches!(how, Outcome::Failed | Outcome::Lost));
        if self.strategy == Strategy::CorTree {
            // A copy-on-read child has no other source: the read fails (EIO).
            self.flight_done(q.flight, true);
            return;
        }
        if matches!(how, Outcome::Failed | Outcome::Lost) {
            // The session broke: the peer's have-map goes with it.
            let name = self.nodes[q.server as usize].name.clone();
            let n = &mut self.nodes[q.client as usize];
            n.sessions_out.remove(&q.server);
            if let Some(sel) = n.sel.as_mut() {
                sel.disconnected(&name);
            }
        }
        if self.flights.get(q.flight).is_some_and(|fl| fl.pushed) {
            self.push_lost(q.flight);
            return;
        }
        self.answered(&q, how);
        self.next_source(q.flight);
    }

    /// Tells the asker's piece (and so its selector) how request `q` ended.
    fn answered(&mut self, q: &Req, how: Outcome) {
        let now = self.instant();
        let name = self.nodes[q.server as usize].name.clone();
        let Some(fl) = self.flights.get_mut(q.flight) else { return };
        let (Some(piece), Some(sel)) = (fl.piece.as_mut(), self.nodes[q.client as usize].sel.as_mut()) else {
            return;
        };
        piece.answered(sel, &name, how, now);
    }

    /// Whether the trackers are down now (`--tracker-down`).
    fn trackers_down(&self) -> bool {
        let since = self.now.saturating_sub(self.first_start) as f64 / 1e9;
        self.p.tracker_down.is_some_and(|(s, l)| since >= s && since < s + l && self.now >= self.first_start)
    }

    /// Every tracker sends the others its summaries (as each `Tracker::push` does every ttl / 3).
    pub(super) fn sync(&mut self) {
        if !self.trackers_down() {
            for t in 0..self.rosters.len() as u32 {
                self.tell(t, 0);
            }
        }
        let period = self.p.tracker_ttl / 3.0;
        self.after(period, Ev::Sync);
    }

    /// Tracker `t` tells the others its summaries of the images whose tops changed after
    /// `since` (0: of all).
    fn tell(&mut self, t: u32, since: u64) {
        let now = self.instant();
        let summary = self.rosters[t as usize].summary(since);
        for (_, fed) in self.feds.iter_mut().enumerate().filter(|(u, _)| *u != t as usize) {
            fed.heard(t as usize, summary.clone(), now);
        }
        let p = &mut self.pushed[t as usize];
        (p.0, p.1) = (self.rosters[t as usize].changes(), self.now);
    }

    /// A push of tracker `t`'s changed tops is due (sent a latency earlier).
    pub(super) fn push(&mut self, t: u32) {
        self.pushed[t as usize].2 = false;
        if !self.trackers_down() {
            self.tell(t, self.pushed[t as usize].0);
        }
    }

    /// After a registration at tracker `t`: if its tops changed since its last push, a push
    /// follows at most one per rebuild interval, arriving a hop's latency later (as
    /// `Tracker::push`).
    fn push_if_changed(&mut self, t: u32) {
        let (changes, last, due) = self.pushed[t as usize];
        if self.rosters.len() < 2 || due || self.rosters[t as usize].changes() == changes {
            return;
        }
        self.pushed[t as usize].2 = true;
        let at = self.now.max(last + super::engine::ns(REBUILD.as_secs_f64())) + super::engine::ns(self.lat());
        self.at(at, Ev::Push(t));
    }

    /// A node's heartbeat: it registers with its tracker (if up), and its members follow. A node
    /// whose guest has booted goes on (vmtd registers every image it serves, and a running
    /// guest's image stays served), so later guests find it in the trees.
    pub(super) fn heartbeat(&mut self, i: u32) {
        if !self.nodes[i as usize].alive {
            return;
        }
        let now = self.instant();
        if !self.trackers_down() {
            let ask = self.tree_shape();
            let (key, home) = (self.nodes[i as usize].key, self.nodes[i as usize].home as usize);
            let name = &self.nodes[i as usize].name;
            let (mut answer, _) = self.rosters[home].register(key, name, ask, now);
            if self.rosters.len() > 1 {
                if let Some(tops) = self.rosters[home].tops(&key, ask.classes) {
                    let own = (tops.as_slice(), self.rosters[home].placed(&key) as u32);
                    self.feds[home].join(&key, name, ask, &mut answer, own, now);
                }
            }
            self.c.registrations += 1;
            self.tracker_registrations[home] += 1;
            self.push_if_changed(home as u32);
            // The answer's encoded size: names with their length prefixes, the header and fields.
            let names: u64 = answer.ancestors.iter().flatten().chain(&answer.near).map(|n| n.len() as u64 + 1).sum();
            self.c.answer_bytes += names + answer.ancestors.len() as u64 + 64;
            if let Some(m) = self.nodes[i as usize].membership.as_mut() {
                m.tracker_answered(0, now);
                m.named(0, key, answer, now);
            }
        }
        let key = self.nodes[i as usize].key;
        let view = self.nodes[i as usize].membership.as_mut().and_then(|m| m.expire(now).then(|| m.view(&key)));
        if let Some(view) = view {
            let usable = {
                let Some(sel) = self.nodes[i as usize].sel.as_mut() else { return };
                sel.set_view(&view);
                sel.expire_bans(now);
                if view.provisional {
                    Vec::new()
                } else {
                    sel.usable_members(now)
                }
            };
            // Sessions to peers that left the view, or idle ones it does not keep, close (as
            // `Swarm::set_view` closes them).
            let sel = self.nodes[i as usize].sel.as_ref().expect("a relay node");
            let gone: Vec<u32> = self.nodes[i as usize]
                .sessions_out
                .iter()
                .copied()
                .filter(|&j| !sel.keeps_session(&self.nodes[j as usize].name, now))
                .collect();
            for j in gone {
                // A closed session's have-map goes with it (as `PeerConn` tells the selector).
                let name = self.nodes[j as usize].name.clone();
                if let Some(sel) = self.nodes[i as usize].sel.as_mut() {
                    sel.disconnected(&name);
                }
                self.nodes[i as usize].sessions_out.remove(&j);
                self.nodes[j as usize].subscribers.retain(|&s| s != i);
            }
            for name in usable {
                let Some(j) = self.index(&name) else { continue };
                if self.nodes[i as usize].sessions_out.insert(j) {
                    self.open_session(i, j);
                }
            }
            self.refresh_parents(i);
        }
        let hb = self.p.heartbeat;
        self.after(hb, Ev::Heartbeat(i));
    }

    /// The trees' shape the nodes ask the tracker for.
    fn tree_shape(&self) -> crate::p2p::core::Ask {
        crate::p2p::core::Ask { classes: self.p.classes, fanout: self.p.fanout, near: crate::p2p::core::roster::NEAR }
    }

    /// A node's new chunks reach the peers holding sessions with it.
    pub(super) fn announce(&mut self, j: u32) {
        let n = &mut self.nodes[j as usize];
        n.announcing = false;
        if !n.alive || n.liar {
            return;
        }
        let added = &n.cache - &n.announced;
        n.announced = n.cache.clone();
        if added.is_empty() {
            return;
        }
        let name = n.name.clone();
        let subs = std::mem::take(&mut self.nodes[j as usize].subscribers);
        let mut keep = Vec::with_capacity(subs.len());
        for s in subs {
            let peer = &mut self.nodes[s as usize];
            if !peer.alive || !peer.sessions_out.contains(&j) {
                continue;
            }
            if let Some(sel) = peer.sel.as_mut() {
                sel.have_added(&name, &added);
            }
            keep.push(s);
        }
        // A peer that reopened its session was added again: one delta each.
        keep.sort_unstable();
        keep.dedup();
        self.nodes[j as usize].subscribers = keep;
    }

    /// Request `r` ends at its server because a node was killed: its slot, bytes and wait go
    /// (the wait would otherwise fire on whatever request reuses the id).
    fn end_for_kill(&mut self, r: u32) {
        if let Some(q) = self.reqs.get_mut(r) {
            q.flow = None;
            // Pushes a kill breaks count as lost pushes (`pushes_lost`), not as early replies.
            self.c.early_broken += u64::from(q.early && !super::push::is_push(q.serial));
            if let Some(w) = q.wait.take() {
                if let Some(wt) = self.waits.get_mut(w) {
                    wt.want = Want::Dropped;
                }
            }
        }
        self.release(r);
    }

    /// Kills the configured fraction of nodes: their connections reset at once.
    pub(super) fn kill(&mut self) {
        let n = self.nodes.len() as u32;
        let k = (self.p.kill * f64::from(n)).floor() as usize;
        let victims = super::rng::pick(&mut self.rng, n, k);
        let lat = self.lat();
        for &j in &victims {
            let node = &mut self.nodes[j as usize];
            if node.alive && node.done.is_none() {
                self.running = self.running.saturating_sub(1);
            }
            node.alive = false;
        }
        // Flows from or to the dead end now; replies from them fail at their askers.
        let mut dead_flows: Vec<(u32, Purpose)> = self.flows.iter().map(|(&f, &p)| (f, p)).collect();
        dead_flows.sort_unstable_by_key(|(f, _)| *f);
        for (f, p) in dead_flows {
            let gone = match p {
                Purpose::Reply(r) => self
                    .reqs
                    .get(r)
                    .is_some_and(|q| !self.nodes[q.server as usize].alive || !self.nodes[q.client as usize].alive),
                Purpose::Origin(fl) => self.flights.get(fl).is_some_and(|x| !self.nodes[x.node as usize].alive),
                Purpose::Direct(r) => self.reads.get(r).is_some_and(|x| !self.nodes[x.node as usize].alive),
            };
            if gone {
                self.cancel_flow(f);
                if let Purpose::Reply(r) = p {
                    self.end_for_kill(r);
                    self.after(lat, Ev::AtClient(r, Outcome::Lost));
                }
            }
        }
        for &j in &victims {
            // Its queued replies end with the rest; none may take a slot freed below.
            self.nodes[j as usize].slot_queue.clear();
            let mut serving: Vec<u32> = self.nodes[j as usize].serving.drain().collect();
            serving.sort_unstable();
            for r in serving {
                self.end_for_kill(r);
                self.after(lat, Ev::AtClient(r, Outcome::Lost));
            }
            let name = self.nodes[j as usize].name.clone();
            for i in 0..n {
                let peer = &mut self.nodes[i as usize];
                if peer.sessions_out.remove(&j) {
                    if let Some(sel) = peer.sel.as_mut() {
                        sel.disconnected(&name);
                    }
                }
            }
        }
    }
}
