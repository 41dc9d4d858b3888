//! `vmt-tracker`: the peer tracker. Nodes register the images they serve and learn each
//! other's peer addresses; state is soft (a restart loses nothing the next heartbeats do not
//! restore), so several trackers may run side by side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmthunder::config::parse_duration;
use vmthunder::p2p::auth::ClusterKey;
use vmthunder::p2p::tracker::Tracker;

/// Tell vmthunder nodes which peers serve each image.
#[derive(Parser)]
#[command(version)]
struct Args {
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VMT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    anyhow::ensure!(!args.ttl.is_zero(), "--ttl must be positive");
    let key = ClusterKey::load(&args.cluster_key_file)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let tracker = Tracker::new(&args.listen.to_string(), key, args.ttl, usize::from(args.peers_per_address));
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(tracker.run(listener, rx));
        tracing::info!(listen = %args.listen, ttl = ?args.ttl, peers_per_address = args.peers_per_address, "tracker ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop.send(true);
        anyhow::Ok(())
    })
}
