//! `vmt-tracker`: the peer tracker. Nodes register the images they serve and learn each
//! other's peer addresses; state is soft (a restart loses nothing the next heartbeats do not
//! restore). Trackers given each other (`--peer`) share the nodes, each answering about N / M.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmthunder::config::parse_duration;
use vmthunder::p2p::auth::ClusterKey;
use vmthunder::p2p::tracker::{Tracker, TrackerMetrics};

/// Tell vmthunder nodes which peers serve each image.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Log records to journald under systemd, else to stderr as text; or force text or JSON
    /// lines on stderr.
    #[arg(long, value_enum, default_value_t)]
    log_format: vmthunder::cli::logging::LogFormat,
    /// Address to listen on, e.g. 10.0.0.2:7070.
    #[arg(long)]
    listen: SocketAddr,
    /// The cluster key file shared with every node (owner-only permissions).
    #[arg(long)]
    cluster_key_file: PathBuf,
    /// A node not heard from for this long is forgotten (three node heartbeats by default).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    ttl: Duration,
    /// Node names one IP address may have registered per image, and sessions it may hold open
    /// (a node registers under its peer address; 1 to 4096).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=4096))]
    peers_per_address: u16,
    /// Another tracker of this cluster (HOST:PORT; repeat for each, this one's own address may be
    /// among them): the trackers share the nodes, each placing those that register with it, and
    /// join their trees. Needs a concrete --listen address (the name the others know it by).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// Serve Prometheus metrics, /healthz and /readyz on this address, e.g. 127.0.0.1:9478.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    vmthunder::cli::docs::generate_if_asked::<Args>("vmt-tracker");
    let args = Args::parse();
    vmthunder::cli::logging::init(args.log_format);
    anyhow::ensure!(!args.ttl.is_zero(), "--ttl must be positive");
    for p in &args.peers {
        anyhow::ensure!(
            vmthunder::p2p::conn::is_canonical_addr(p),
            "--peer {p:?} is not an IP address and port, e.g. 10.0.0.3:7070"
        );
    }
    anyhow::ensure!(
        args.peers.is_empty() || !args.listen.ip().is_unspecified(),
        "--peer needs a concrete --listen address: the other trackers know this one by it"
    );
    let key = ClusterKey::load(&args.cluster_key_file)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let tracker = Tracker::new(&args.listen.to_string(), key, args.ttl, usize::from(args.peers_per_address), &args.peers);
        let (stop, rx) = tokio::sync::watch::channel(false);
        if let Some(addr) = args.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics listening on {addr}"))?;
            let mut registry = vmthunder::metrics::registry();
            registry.register_collector(Box::new(TrackerMetrics(tracker.clone())));
            let ready = tokio::sync::watch::channel(true).1;
            let endpoint = vmthunder::metrics::http::Endpoint::new(registry, ready);
            tokio::spawn(vmthunder::metrics::http::serve(l, std::sync::Arc::new(endpoint), rx.clone()));
        }
        tokio::spawn(tracker.run(listener, rx));
        tracing::info!(listen = %args.listen, ttl = ?args.ttl, peers_per_address = args.peers_per_address, "tracker ready");
        vmthunder::metrics::notify::ready("answering nodes");
        vmthunder::metrics::notify::spawn_watchdog();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        vmthunder::metrics::notify::stopping();
        let _ = stop.send(true);
        anyhow::Ok(())
    })
}
