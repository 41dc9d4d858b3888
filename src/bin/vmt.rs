//! `vmt`: the vmthunder admin CLI. Talks to `vmtd` over its control socket; `vmt image manifest`
//! works without a daemon, anywhere the origin is readable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmthunder::config::{format_size, load_chap, parse_size, ImageConfig};
use vmthunder::daemon::control::{self, ImageStatus, Request, Response};
use vmthunder::fetch::origin::OriginUrl;
use vmthunder::image::ChunkSize;
use vmthunder::iscsi::initiator::IscsiOptions;
use vmthunder::iscsi::pdu::Digests;
use vmthunder::libvirt::{detach, pool};

/// Administer the vmthunder node daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    vmtd: vmthunder::cli::vmtd::VmtdArgs,
    /// The control socket `vmtd` names (set after parsing).
    #[arg(skip)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-image cache and traffic counters, and export sockets.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// A live view of the node: per image hit ratio, bytes/s from cache, peers and origin,
    /// guest wait p99, prefetch progress, peers. Ctrl-C quits.
    Top {
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = vmthunder::config::parse_duration)]
        interval: std::time::Duration,
        /// Print one frame after one interval and exit.
        #[arg(long)]
        once: bool,
    },
    /// Manage served images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage the libvirt storage pool of VM overlays.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Manage per-VM overlay volumes.
    #[command(subcommand)]
    Vol(VolCmd),
    /// Fill the node cache with every chunk of an image in the background, so the node no
    /// longer needs the origin.
    Complete {
        image: String,
        /// Pace, e.g. 50MiB (per second); unlimited by default.
        #[arg(long)]
        rate: Option<String>,
        /// Wait, showing progress, until the cache is complete.
        #[arg(long)]
        wait: bool,
    },
    /// Inspect and repair the node cache.
    #[command(subcommand)]
    Cache(vmthunder::cli::cache::CacheCmd),
    /// Record every NBD request an image's export receives (for `vmt bench replay`).
    #[command(subcommand)]
    Trace(TraceCmd),
    /// Replay request traces against NBD exports; measure traces.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Simulate a bulk boot of many nodes (direct, copy-on-read tree, vmthunder) in one process,
    /// with the relay's own decision code: deterministic for a seed.
    Sim(Box<vmthunder::sim::SimArgs>),
    /// Copy a running VM's disk into its overlay so it no longer needs vmtd (block pull).
    Detach {
        domain: String,
        #[arg(long, default_value = "vda")]
        disk: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Start tracing the requests of IMAGE's export.
    Start { image: String },
    /// Stop tracing IMAGE and write the trace as CSV (t_s,op,offset,length).
    Stop {
        image: String,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Replay a request trace against an NBD export, closed loop (see README), and report the
    /// elapsed time. Exits non-zero when a read failed.
    Replay {
        /// Trace file (CSV from `vmt trace stop`).
        #[arg(long)]
        trace: PathBuf,
        /// A unix socket path, nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH.
        #[arg(long)]
        export: String,
        /// Export name on a unix socket (default: the socket's file stem).
        #[arg(long)]
        name: Option<String>,
        /// Factor applied to the recorded think times (0.25: a TCG-recorded boot at KVM pace).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Replay only the requests recorded at or after this many seconds into the trace (the
        /// first of them is sent at once).
        #[arg(long, default_value_t = 0.0)]
        from: f64,
        /// Seconds one request may take before it counts as a read error.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Connect, then wait until this wall-clock time (seconds since the Unix epoch) before
        /// replaying: lets many nodes start together.
        #[arg(long)]
        start_at: Option<f64>,
        /// Count each burst as answered this many microseconds after it was: a time-dilated
        /// testbed (scripts/bench-relay --dilate) stretches the software's own latency with it.
        #[arg(long, default_value_t = 0.0)]
        added_latency_us: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic sparse image: every chunk starts with 4KiB unique to (SEED, chunk).
    Image {
        path: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size: u64,
    },
    /// How much of the image a trace reads: distinct bytes and chunks touched.
    Footprint {
        #[arg(long)]
        trace: PathBuf,
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Define, build, start and autostart the pool (idempotent).
    Define {
        #[arg(long, default_value = "vmthunder")]
        name: String,
        #[arg(long, default_value = "/var/lib/vmthunder/pool")]
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolCmd {
    /// Create a VM's persistent qcow2 overlay backed by IMAGE's export; prints the <disk> XML.
    Create {
        #[arg(long)]
        image: String,
        vol: String,
        #[arg(long, default_value = "vmthunder")]
        pool: String,
        /// Guest device in the printed <disk> XML.
        #[arg(long, default_value = "vda")]
        target: String,
        /// Seconds QEMU keeps retrying the export while vmtd restarts.
        #[arg(long, default_value_t = 10)]
        reconnect_delay: u32,
        /// Print a `<disk type='file'>` naming the overlay's path (needed to live-migrate the
        /// domain with --copy-storage-inc) instead of a `<disk type='volume'>`.
        #[arg(long)]
        file: bool,
    },
    /// Delete a VM's overlay.
    Delete {
        vol: String,
        #[arg(long, default_value = "vmthunder")]
        pool: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List served images.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Serve an image until vmtd stops (lasting images belong in vmtd.toml).
    Add {
        name: String,
        /// file:///PATH, nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT or iscsi://HOST[:PORT]/IQN/LUN
        origin: String,
        #[arg(long)]
        chunk_size: Option<String>,
        /// Manifest file (required for network origins).
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[command(flatten)]
        iscsi: IscsiArgs,
    },
    /// Stop serving an image (its cache stays on disk).
    Remove { name: String },
    /// Build an image manifest by reading the origin once.
    Manifest {
        origin: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "64KiB")]
        chunk_size: String,
        #[command(flatten)]
        iscsi: IscsiArgs,
    },
}

/// How to log in to an iscsi:// origin.
#[derive(clap::Args)]
struct IscsiArgs {
    /// CHAP user for an iscsi:// origin.
    #[arg(long, requires = "chap_secret_file")]
    chap_user: Option<String>,
    /// File holding the CHAP secret (mode 0600; the secret never goes on the command line).
    #[arg(long, requires = "chap_user")]
    chap_secret_file: Option<PathBuf>,
    /// Offer CRC32C header digests to an iscsi:// origin.
    #[arg(long)]
    iscsi_header_digest: bool,
    /// Offer CRC32C data digests to an iscsi:// origin.
    #[arg(long)]
    iscsi_data_digest: bool,
}

const TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    vmthunder::cli::docs::generate_if_asked::<Args>("vmt");
    let mut args = Args::parse();
    args.socket = args.vmtd.control_socket()?;
    // libvirt calls block: run them on this thread, outside the async runtime.
    match &args.cmd {
        Cmd::Pool(PoolCmd::Define { name, path }) => {
            let dir = pool::define(name, path)?;
            println!("pool {name} ready at {}", dir.display());
            return Ok(());
        }
        Cmd::Vol(VolCmd::Delete { vol, pool: p }) => {
            pool::delete_volume(p, vol)?;
            return Ok(());
        }
        Cmd::Detach { domain, disk, timeout } => return detach(&args.socket, domain, disk, *timeout),
        Cmd::Sim(a) => return sim(a),
        _ => {}
    }
    let rt = if matches!(args.cmd, Cmd::Bench(BenchCmd::Replay { .. })) {
        // A replay stands in for one guest: one thread, so that emulating many nodes on one
        // machine spends its CPU on the servers under test, not on waking worker threads.
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?
    };
    rt.block_on(run(args))
}

fn sim(a: &vmthunder::sim::SimArgs) -> anyhow::Result<()> {
    let p = a.params()?;
    let reports =
        if a.sweep.is_empty() { vec![vmthunder::sim::run(&p)?] } else { vmthunder::sim::sweep(&p, &a.sweep)? };
    match (a.json, &reports[..]) {
        (true, [one]) => println!("{}", serde_json::to_string_pretty(one)?),
        (true, all) => println!("{}", serde_json::to_string_pretty(all)?),
        (false, all) => {
            for r in all {
                print!("{}", r.table());
            }
        }
    }
    if let Some(dir) = &a.svg {
        for path in vmthunder::sim::plot::write(&reports, dir)? {
            eprintln!("vmt sim: wrote {}", path.display());
        }
    }
    Ok(())
}

async fn call(socket: &std::path::Path, req: Request) -> anyhow::Result<Response> {
    match control::call(socket, &req, TIMEOUT).await? {
        Response::Error { message } => bail!("{message}"),
        r => Ok(r),
    }
}

async fn images(socket: &std::path::Path) -> anyhow::Result<Vec<ImageStatus>> {
    match call(socket, Request::Status).await? {
        Response::Status { images, profiles_rejected, .. } => {
            if profiles_rejected > 0 {
                eprintln!("note: vmtd refused {profiles_rejected} profile file(s) since start (see its log)");
            }
            Ok(images)
        }
        r => bail!("unexpected answer from vmtd: {r:?}"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Status { json } => {
            let images = images(&args.socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                if let Response::Status { cache, .. } = call(&args.socket, Request::Status).await? {
                    println!("{}", vmthunder::cli::cache::usage_line(&cache));
                }
                for i in &images {
                    print_status(i);
                }
                if images.is_empty() {
                    println!("no images served");
                }
            }
        }
        Cmd::Top { interval, once } => {
            anyhow::ensure!(!interval.is_zero(), "--interval must be positive");
            vmthunder::cli::top::run(&args.socket, interval, once).await?;
        }
        Cmd::Image(ImageCmd::List { json }) => {
            let images = images(&args.socket).await?;
            if json {
                let names: Vec<_> = images.iter().map(|i| &i.name).collect();
                println!("{}", serde_json::to_string(&names)?);
            } else {
                for i in images {
                    println!("{}\t{}\t{}", i.name, i.digest, i.origin);
                }
            }
        }
        Cmd::Image(ImageCmd::Add { name, origin, chunk_size, manifest, iscsi }) => {
            let manifest = manifest.map(|m| std::path::absolute(&m)).transpose()?;
            let chap_secret_file = iscsi.chap_secret_file.map(|m| std::path::absolute(&m)).transpose()?;
            let image = ImageConfig {
                name,
                origin,
                chunk_size,
                manifest,
                chap_user: iscsi.chap_user,
                chap_secret_file,
                iscsi_header_digest: iscsi.iscsi_header_digest,
                iscsi_data_digest: iscsi.iscsi_data_digest,
            };
            image.validate()?;
            call(&args.socket, Request::ImageAdd { image }).await?;
        }
        Cmd::Vol(VolCmd::Create { image, vol, pool: p, target, reconnect_delay, file }) => {
            let img = images(&args.socket)
                .await?
                .into_iter()
                .find(|i| i.name == image)
                .with_context(|| format!("vmtd serves no image named {image}"))?;
            let socket = PathBuf::from(&img.socket);
            let path = tokio::task::spawn_blocking({
                let (p, vol, image, socket) = (p.clone(), vol.clone(), image.clone(), socket.clone());
                move || pool::create_volume(&p, &vol, &image, &socket, img.image_size)
            })
            .await??;
            eprintln!("created {}", path.display());
            let form = if file { pool::DiskForm::File(&path) } else { pool::DiskForm::Volume };
            println!("{}", pool::disk_xml(form, &p, &vol, &image, &socket, &target, reconnect_delay));
        }
        Cmd::Complete { image, rate, wait } => {
            let rate = rate.map(|r| parse_size(&r)).transpose().map_err(anyhow::Error::msg)?;
            call(&args.socket, Request::Complete { name: image.clone(), rate }).await?;
            if !wait {
                eprintln!("completing the cache of {image} in the background (see `vmt status`)");
                return Ok(());
            }
            let mut bar = None;
            loop {
                let i = images(&args.socket).await?.into_iter().find(|i| i.name == image).context("image vanished")?;
                let bar = bar.get_or_insert_with(|| vmthunder::cli::progress::count(&image, i.chunks_total, "chunks"));
                bar.set_position(i.chunks_present);
                if i.chunks_present == i.chunks_total {
                    bar.finish();
                    eprintln!("{image}: cache complete");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Cmd::Cache(cmd) => vmthunder::cli::cache::run(&args.socket, cmd, TIMEOUT).await?,
        Cmd::Trace(TraceCmd::Start { image }) => {
            call(&args.socket, Request::TraceStart { image: image.clone() }).await?;
            eprintln!("tracing the requests of {image} (stop with `vmt trace stop {image} -o FILE`)");
        }
        Cmd::Trace(TraceCmd::Stop { image, output }) => {
            // vmtd writes the file itself: give it a path that does not depend on its cwd.
            let path = std::path::absolute(&output)?.display().to_string();
            match call(&args.socket, Request::TraceStop { image, path }).await? {
                Response::Traced { path, rows, dropped } => {
                    println!("{path}: {rows} requests");
                    if dropped > 0 {
                        eprintln!("note: {dropped} more requests did not fit in the trace and were not kept");
                    }
                }
                r => bail!("unexpected answer from vmtd: {r:?}"),
            }
        }
        Cmd::Bench(cmd) => bench(cmd).await?,
        Cmd::Pool(_) | Cmd::Vol(_) | Cmd::Detach { .. } | Cmd::Sim(_) => {
            unreachable!("handled before the runtime starts")
        }
        Cmd::Image(ImageCmd::Remove { name }) => {
            call(&args.socket, Request::ImageRemove { name }).await?;
        }
        Cmd::Image(ImageCmd::Manifest { origin, output, chunk_size, iscsi }) => {
            let chunk = ChunkSize::new(parse_size(&chunk_size).map_err(anyhow::Error::msg)?)?;
            let origin = OriginUrl::parse(&origin)?;
            let credentials = match (&iscsi.chap_user, &iscsi.chap_secret_file) {
                (Some(user), Some(file)) => Some(load_chap(user, &std::path::absolute(file)?)?),
                _ => None,
            };
            let digests = Digests { header: iscsi.iscsi_header_digest, data: iscsi.iscsi_data_digest };
            if digests != Digests::default() && !matches!(origin, OriginUrl::Iscsi(_)) {
                bail!("--iscsi-header-digest and --iscsi-data-digest apply to iscsi:// origins only");
            }
            let source = origin.open(IscsiOptions { credentials, digests })?;
            let built = vmthunder::fetch::build_manifest(source.as_ref(), chunk).await;
            source.close().await;
            let m = built.context("building the manifest")?;
            m.save(&output)?;
            println!(
                "{}: image {} bytes, {} chunks of {}, digest {}",
                output.display(),
                m.geometry().image_size(),
                m.geometry().chunk_count(),
                format_size(chunk.bytes()),
                m.root()
            );
        }
    }
    Ok(())
}

async fn bench(cmd: BenchCmd) -> anyhow::Result<()> {
    use vmthunder::bench::{replay, trace};
    match cmd {
        BenchCmd::Replay { trace: file, export, name, scale, from, timeout, start_at, added_latency_us, json } => {
            if !(timeout.is_finite() && timeout > 0.0 && timeout <= 86400.0) {
                bail!("--timeout {timeout}: give a number of seconds above 0, at most 86400");
            }
            if !(added_latency_us.is_finite() && (0.0..=1e6).contains(&added_latency_us)) {
                bail!("--added-latency-us {added_latency_us}: give microseconds from 0 to 1000000");
            }
            let added = Duration::from_secs_f64(added_latency_us / 1e6);
            let op_timeout = Duration::from_secs_f64(timeout);
            let rows = trace::load(&file)?;
            if !from.is_finite() {
                bail!("--from {from}: give a number of seconds");
            }
            let bursts = replay::plan(replay::skip_before(&rows, from), scale)?;
            let addr = replay::ExportAddr::parse(&export, name.as_deref())?;
            let client = replay::connect(&addr, op_timeout).await?;
            if let Some(at) = start_at {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
                if !at.is_finite() || at - now > 3600.0 {
                    bail!("--start-at {at} is not within the next hour");
                }
                if at > now {
                    tokio::time::sleep(Duration::from_secs_f64(at - now)).await;
                } else {
                    eprintln!("note: --start-at was {:.3} s ago; starting now", now - at);
                }
            }
            let report = replay::replay(client, &bursts, op_timeout, added).await;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report}");
            }
            for e in &report.first_errors {
                eprintln!("failed: {e}");
            }
            if report.read_errors > 0 {
                bail!("{} of {} requests failed", report.read_errors, report.ops);
            }
        }
        BenchCmd::Image { path, size, seed, chunk_size } => {
            vmthunder::bench::image::write(&path, size, chunk_size, seed)?;
        }
        BenchCmd::Footprint { trace: file, chunk_size, json } => {
            let chunk = parse_size(&chunk_size).map_err(anyhow::Error::msg)?;
            if chunk == 0 {
                bail!("--chunk-size must be above 0");
            }
            let f = trace::footprint(&trace::load(&file)?, chunk);
            if json {
                println!("{}", serde_json::to_string(&f)?);
            } else {
                println!(
                    "{} reads, {} bytes read, {} distinct bytes ({:.1} MiB), {} chunks of {} touched ({:.1} MiB)",
                    f.reads,
                    f.bytes_read,
                    f.distinct_bytes,
                    f.distinct_bytes as f64 / 1048576.0,
                    f.chunks,
                    format_size(chunk),
                    (f.chunks * chunk) as f64 / 1048576.0
                );
            }
        }
    }
    Ok(())
}

fn print_status(i: &ImageStatus) {
    let pct = if i.chunks_total == 0 { 0.0 } else { 100.0 * i.chunks_present as f64 / i.chunks_total as f64 };
    println!("image {}  ({})", i.name, i.origin);
    println!("  digest        {}", i.digest);
    println!("  size          {} in chunks of {}", i.image_size, format_size(i.chunk_size));
    println!("  cached        {}/{} chunks ({pct:.1}%)", i.chunks_present, i.chunks_total);
    println!(
        "  from origin   {} bytes in {} reads ({} retries, {} failed reads, {} bad chunks)",
        i.bytes_from_origin, i.upstream_reads, i.retries, i.failed_reads, i.verify_failures
    );
    println!("  served        {} bytes to {} clients", i.bytes_served, i.clients);
    println!("  guest reads   {} ({} waited for a fetch)", i.reads, i.reads_waited);
    match (&i.recording, i.profile_chunks) {
        (Some(d), _) if !d.is_empty() => println!("  profile       recording the boot of {d}"),
        (Some(_), _) => println!("  profile       recording"),
        (None, Some(n)) => println!("  profile       {n} chunks"),
        (None, None) => println!("  profile       none"),
    }
    if let Some(p) = &i.prefetch {
        let state = match (&p.error, p.finished) {
            (Some(e), _) => format!("failed: {e}"),
            (None, true) => "done".into(),
            (None, false) => "running".into(),
        };
        println!("  prefetch      {}/{} chunks, {state}", p.done_chunks, p.total_chunks);
    }
    if let Some(p) = &i.p2p {
        println!(
            "  peers         {} known, {} usable, {} banned ({} bans since start)",
            i.peers, p.peers_usable, p.peers_banned, p.bans
        );
        println!(
            "  peer traffic  {} bytes in, {} bytes out; {} requests ({} refused, {} failed, {} bad replies)",
            p.bytes_from_peers,
            p.bytes_to_peers,
            p.peer_requests,
            p.peer_refusals,
            p.peer_failures,
            p.peer_verify_failures
        );
    }
    println!("  export        nbd+unix:///{}?socket={}", i.name, i.socket);
    if !i.holds.is_empty() {
        println!("  held by       {}", i.holds.join(", "));
    }
}

fn detach(socket: &std::path::Path, domain: &str, disk: &str, timeout: u64) -> anyhow::Result<()> {
    let bar = vmthunder::cli::progress::bytes(&format!("{domain} {disk}"), 0);
    let mut draw = |cur: u64, end: u64| {
        bar.set_length(end);
        bar.set_position(cur);
    };
    let others = detach::block_pull(domain, disk, Duration::from_secs(timeout), &mut draw)?;
    bar.finish();
    eprintln!("{domain} {disk}: detached");
    if !others {
        // No disk of this domain reads from vmtd any more: drop its hold.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(call(socket, Request::Release { domain: domain.to_string() }))?;
    }
    Ok(())
}
