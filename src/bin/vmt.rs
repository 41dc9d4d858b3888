//! `vmt`: the vmthunder admin CLI. Talks to `vmtd` over its control socket; `vmt image manifest`
//! works without a daemon, anywhere the origin is readable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmthunder::config::{format_size, parse_size, ImageConfig};
use vmthunder::daemon::control::{self, ImageStatus, Request, Response};
use vmthunder::fetch::origin::OriginUrl;
use vmthunder::image::ChunkSize;

/// Administer the vmthunder node daemon.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// vmtd's control socket.
    #[arg(long, global = true, default_value = "/run/vmthunder/control.sock")]
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
    /// Manage served images.
    #[command(subcommand)]
    Image(ImageCmd),
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
        /// file:///PATH, nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT
        origin: String,
        #[arg(long)]
        chunk_size: Option<String>,
        /// Manifest file (required for network origins).
        #[arg(long)]
        manifest: Option<PathBuf>,
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
    },
}

const TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn call(socket: &std::path::Path, req: Request) -> anyhow::Result<Response> {
    match control::call(socket, &req, TIMEOUT).await? {
        Response::Error { message } => bail!("{message}"),
        r => Ok(r),
    }
}

async fn images(socket: &std::path::Path) -> anyhow::Result<Vec<ImageStatus>> {
    match call(socket, Request::Status).await? {
        Response::Status { images, .. } => Ok(images),
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
                for i in &images {
                    print_status(i);
                }
                if images.is_empty() {
                    println!("no images served");
                }
            }
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
        Cmd::Image(ImageCmd::Add {
            name,
            origin,
            chunk_size,
            manifest,
        }) => {
            let manifest = manifest.map(|m| std::path::absolute(&m)).transpose()?;
            let image = ImageConfig {
                name,
                origin,
                chunk_size,
                manifest,
            };
            image.validate()?;
            call(&args.socket, Request::ImageAdd { image }).await?;
        }
        Cmd::Image(ImageCmd::Remove { name }) => {
            call(&args.socket, Request::ImageRemove { name }).await?;
        }
        Cmd::Image(ImageCmd::Manifest {
            origin,
            output,
            chunk_size,
        }) => {
            let chunk = ChunkSize::new(parse_size(&chunk_size).map_err(anyhow::Error::msg)?)?;
            let origin = OriginUrl::parse(&origin)?;
            let source = origin.open()?;
            let m = vmthunder::fetch::build_manifest(source.as_ref(), chunk)
                .await
                .context("building the manifest")?;
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

fn print_status(i: &ImageStatus) {
    let pct = if i.chunks_total == 0 {
        0.0
    } else {
        100.0 * i.chunks_present as f64 / i.chunks_total as f64
    };
    println!("image {}  ({})", i.name, i.origin);
    println!("  digest        {}", i.digest);
    println!(
        "  size          {} in chunks of {}",
        i.image_size,
        format_size(i.chunk_size)
    );
    println!(
        "  cached        {}/{} chunks ({pct:.1}%)",
        i.chunks_present, i.chunks_total
    );
    println!(
        "  from origin   {} bytes in {} reads ({} retries, {} failed reads, {} bad chunks)",
        i.bytes_from_origin, i.upstream_reads, i.retries, i.failed_reads, i.verify_failures
    );
    println!(
        "  served        {} bytes to {} clients",
        i.bytes_served, i.clients
    );
    println!("  export        nbd+unix:///{}?socket={}", i.name, i.socket);
}
