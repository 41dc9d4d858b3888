//! vmtd's Prometheus metrics: every value is read at scrape time from the node's status (the
//! same `Response::Status` that `vmt status` prints), so the two always agree. Labels: `image`
//! (configured names, bounded by the configuration), `outcome` and `source` (fixed sets);
//! peers appear only as aggregates.

use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::control::{ImageStatus, Response};
use super::Daemon;
use crate::metrics::{Families, Fmt, Labels, Snapshot};

/// The collector registered on the node's metrics registry.
pub struct NodeMetrics {
    pub daemon: Weak<Daemon>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl Collector for NodeMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let Some(d) = self.daemon.upgrade() else {
            return Ok(());
        };
        // Scrapes render on the blocking pool (see `metrics::http`): measuring usage may stat
        // every cache file.
        let used = super::cache::cache_used(&d.cfg.cache_dir, d.budget.as_deref());
        let Response::Status { images, profiles_rejected, p2p, nbd, cache, .. } = d.status(used) else {
            return Ok(());
        };
        let mut f = Families::new(&mut enc);
        encode_images(&mut f, &images)?;
        let node = |v: u64| vec![(Labels::new(), v)];
        let gauge = |v: u64| vec![(Labels::new(), v as i64)];
        f.gauge("images", "Images served.", None, &gauge(images.len() as u64))?;
        f.counter(
            "profiles_rejected",
            "Profile files refused (malformed or misnamed).",
            None,
            &node(profiles_rejected),
        )?;
        f.gauge("cache_used", "Bytes all caches hold (allocated blocks).", Some(Unit::Bytes), &gauge(cache.used))?;
        let opt = |v: Option<u64>| v.map(gauge).unwrap_or_default();
        f.gauge("cache_budget", "The cache budget ([cache] max).", Some(Unit::Bytes), &opt(cache.max))?;
        f.gauge("cache_high_watermark", "Usage that starts a collection.", Some(Unit::Bytes), &opt(cache.high))?;
        f.gauge("cache_low_watermark", "Usage a collection stops at.", Some(Unit::Bytes), &opt(cache.low))?;
        f.counter(
            "cache_refused",
            "Bytes served without caching because the budget was spent.",
            Some(Unit::Bytes),
            &node(cache.refused_bytes),
        )?;
        f.gauge("nbd_connections", "NBD connections open (handshakes included).", None, &gauge(nbd.connections))?;
        f.gauge("nbd_connections_max", "The node's NBD connection cap.", None, &gauge(nbd.max_connections))?;
        f.counter("nbd_refused_connections", "NBD connections refused at a cap.", None, &node(nbd.refused))?;
        f.gauge(
            "nbd_reply_in_flight",
            "Reply bytes held for NBD clients.",
            Some(Unit::Bytes),
            &gauge(nbd.bytes_in_flight),
        )?;
        if let Some(p) = p2p {
            f.gauge("peer_server_sessions", "Peer sessions open to this node.", None, &gauge(p.open_sessions))?;
            f.counter("peer_server_requests", "Chunk requests peers sent this node.", None, &node(p.requests))?;
            f.counter("peer_server_busy", "Peer requests answered busy.", None, &node(p.busy))?;
            f.counter("peer_server_not_have", "Peer requests answered not-have.", None, &node(p.not_have))?;
            f.counter("peer_server_refused", "Peer sessions refused at the handshake.", None, &node(p.refused))?;
            f.gauge("trackers_up", "Trackers that answered recently.", None, &gauge(p.trackers_up))?;
        }
        Ok(())
    }
}

fn encode_images(f: &mut Families, images: &[ImageStatus]) -> Fmt {
    let l = |i: &ImageStatus| vec![("image", i.name.clone())];
    let c = |get: fn(&ImageStatus) -> u64| images.iter().map(|i| (l(i), get(i))).collect::<Vec<_>>();
    let g = |get: fn(&ImageStatus) -> u64| images.iter().map(|i| (l(i), get(i) as i64)).collect::<Vec<_>>();
    let p2p = |get: fn(&super::control::PeerStatus) -> u64| {
        images.iter().filter_map(|i| Some((l(i), get(i.p2p.as_ref()?)))).collect::<Vec<_>>()
    };
    let mut waits: Vec<(Labels, Snapshot)> = Vec::new();
    for i in images {
        for (outcome, s) in
            [("hit", &i.waits.hit), ("peer", &i.waits.peer), ("origin", &i.waits.origin), ("error", &i.waits.error)]
        {
            waits.push((vec![("image", i.name.clone()), ("outcome", outcome.into())], s.clone()));
        }
    }
    f.seconds(
        "guest_read",
        "Guest read latency by outcome: hit (cached), peer (waited on chunks from peers), origin (waited on the origin), error.",
        &waits,
    )?;
    let hist = |get: fn(&ImageStatus) -> &Snapshot| images.iter().map(|i| (l(i), get(i).clone())).collect::<Vec<_>>();
    f.seconds("origin_request", "Latency of reads from the origin.", &hist(|i| &i.origin_latency))?;
    f.seconds("peer_request", "Latency of chunk requests to peers, whatever the answer.", &hist(|i| &i.peer_latency))?;
    let bytes = Some(Unit::Bytes);
    f.counter("served", "Bytes served to guests.", bytes.clone(), &c(|i| i.bytes_served))?;
    f.counter(
        "served_from_cache",
        "Guest bytes of reads that found every chunk cached.",
        bytes.clone(),
        &c(|i| i.bytes_from_cache),
    )?;
    f.counter("origin_received", "Bytes read from the origin.", bytes.clone(), &c(|i| i.bytes_from_origin))?;
    f.counter("peer_received", "Bytes received from peers (verified).", bytes.clone(), &p2p(|p| p.bytes_from_peers))?;
    f.counter(
        "peer_pushed_received",
        "Bytes received from peers that a parent pushed unasked (verified; part of peer_received).",
        bytes.clone(),
        &p2p(|p| p.bytes_pushed),
    )?;
    f.counter("peer_sent", "Bytes uploaded to peers, replies and pushes.", bytes.clone(), &p2p(|p| p.bytes_to_peers))?;
    f.counter(
        "peer_chunks_packed",
        "Chunks packed here to send to peers (where they entered the cluster, or no longer kept packed).",
        None,
        &p2p(|p| p.chunks_packed),
    )?;
    f.counter(
        "peer_chunks_sent_as_received",
        "Chunks sent to peers in the packed form they came in.",
        None,
        &p2p(|p| p.chunks_sent_as_received),
    )?;
    f.gauge(
        "peer_pack_held",
        "Bytes of packed chunks kept to be sent on.",
        bytes.clone(),
        &p2p(|p| p.pack_bytes).into_iter().map(|(l, v)| (l, v as i64)).collect::<Vec<_>>(),
    )?;
    f.counter("guest_reads", "Guest reads.", None, &c(|i| i.reads))?;
    f.counter("guest_reads_waited", "Guest reads that waited for a fetch.", None, &c(|i| i.reads_waited))?;
    f.gauge("guest_reads_in_flight", "Guest reads being answered.", None, &g(|i| i.reads_in_flight))?;
    f.gauge("nbd_clients", "NBD clients connected to the image's export.", None, &g(|i| i.clients))?;
    f.counter(
        "upstream_reads",
        "Upstream read attempts (origin, or the peer-aware source).",
        None,
        &c(|i| i.upstream_reads),
    )?;
    f.counter("fetch_retries", "Upstream reads retried after a failure.", None, &c(|i| i.retries))?;
    f.counter("fetch_give_ups", "Fetches that failed after their retries.", None, &c(|i| i.gave_up))?;
    f.gauge("fetches_in_flight", "Chunks being fetched.", None, &g(|i| i.fetching))?;
    let mut verify = Vec::new();
    for i in images {
        verify.push((vec![("image", i.name.clone()), ("source", "origin".into())], i.verify_failures));
        if let Some(p) = &i.p2p {
            verify.push((vec![("image", i.name.clone()), ("source", "peer".into())], p.peer_verify_failures));
        }
    }
    f.counter("verify_failures", "Fetched chunks that did not match the manifest, by source.", None, &verify)?;
    f.counter("peer_bans", "Peers banned for sending data not matching the manifest.", None, &p2p(|p| p.bans))?;
    f.gauge(
        "peers_banned",
        "Peers banned now.",
        None,
        &p2p(|p| p.peers_banned).into_iter().map(|(l, v)| (l, v as i64)).collect::<Vec<_>>(),
    )?;
    f.gauge("peers", "Peers known for the image.", None, &g(|i| i.peers))?;
    f.gauge(
        "peer_sessions",
        "Sessions open to peers.",
        None,
        &p2p(|p| p.sessions).into_iter().map(|(l, v)| (l, v as i64)).collect::<Vec<_>>(),
    )?;
    f.counter("peer_requests", "Chunk requests sent to peers.", None, &p2p(|p| p.peer_requests))?;
    f.counter("peer_refusals", "Peer requests answered not-have or busy.", None, &p2p(|p| p.peer_refusals))?;
    f.counter(
        "peer_failures",
        "Peer requests that failed (no session, broken, timeout).",
        None,
        &p2p(|p| p.peer_failures),
    )?;
    f.gauge("cache_chunks", "Chunks the image's cache holds.", None, &g(|i| i.chunks_present))?;
    f.gauge("image_chunks", "Chunks in the image.", None, &g(|i| i.chunks_total))?;
    f.gauge("chunk_size", "The image's chunk size.", bytes.clone(), &g(|i| i.chunk_size))?;
    f.counter(
        "cache_evicted_chunks",
        "Chunks evicted to keep the node within its budget.",
        None,
        &c(|i| i.cache.chunks_evicted),
    )?;
    f.counter(
        "cache_uncached_chunks",
        "Fetched chunks served without caching (disk full or budget spent).",
        None,
        &c(|i| i.cache.chunks_not_cached),
    )?;
    f.counter(
        "cache_kept_reads",
        "Reads of chunks not durable yet served from their verified bytes in memory.",
        None,
        &c(|i| i.cache.kept_reads),
    )?;
    f.gauge("cache_kept", "Bytes of chunks not durable yet kept in memory.", bytes, &g(|i| i.cache.kept_bytes))?;
    f.counter("cache_write_errors", "Failed writes to the cache disk.", None, &c(|i| i.cache.write_errors))?;
    f.counter("cache_sync_errors", "Failed syncs of the cache disk.", None, &c(|i| i.cache.sync_errors))?;
    f.counter("cache_read_errors", "Failed reads of the cache disk.", None, &c(|i| i.cache.read_errors))?;
    f.gauge(
        "cache_degraded",
        "1 while the image's cache keeps failing and is not caching.",
        None,
        &g(|i| u64::from(i.cache.degraded)),
    )?;
    let prefetch = |get: fn(&super::control::PrefetchStatus) -> u64| {
        images.iter().filter_map(|i| Some((l(i), get(i.prefetch.as_ref()?) as i64))).collect::<Vec<_>>()
    };
    f.gauge("prefetch_chunks", "Chunks the last prefetch set out to fetch.", None, &prefetch(|p| p.total_chunks))?;
    f.gauge("prefetch_done_chunks", "Chunks the last prefetch has done.", None, &prefetch(|p| p.done_chunks))?;
    f.gauge(
        "prefetch_running",
        "1 while a prefetch runs.",
        None,
        &prefetch(|p| u64::from(!p.finished && !p.cancelled)),
    )?;
    f.gauge(
        "profile_chunks",
        "Chunks in the image's boot profile.",
        None,
        &images.iter().filter_map(|i| Some((l(i), i.profile_chunks? as i64))).collect::<Vec<_>>(),
    )?;
    f.gauge("recording", "1 while a boot profile is being recorded.", None, &g(|i| u64::from(i.recording.is_some())))?;
    Ok(())
}
