//! `vmt-prefetch`: warm a node's cache from a boot profile before VMs are scheduled.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmthunder::config::parse_size;
use vmthunder::daemon::control::{self, Request};

/// Warm vmthunder's node cache ahead of boots.
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
    /// Fetch the chunks of an image's boot profile into the node cache, showing progress.
    /// Interrupting stops the prefetch; what was fetched stays cached.
    Warm {
        #[arg(long)]
        image: String,
        /// A profile file instead of the image's own profile.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Cap, e.g. 50MiB (per second).
        #[arg(long)]
        rate: Option<String>,
        /// Start the prefetch and return at once; `vmt status` shows its progress.
        #[arg(long)]
        detach: bool,
    },
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    vmthunder::cli::docs::generate_if_asked::<Args>("vmt-prefetch");
    let mut args = Args::parse();
    args.socket = args.vmtd.control_socket()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Cmd::Warm { image, profile, rate, detach } = args.cmd;
    let sock = &args.socket;
    let rate = rate.map(|r| parse_size(&r)).transpose().map_err(anyhow::Error::msg)?;
    let profile = profile.map(|p| std::path::absolute(&p).map(|p| p.display().to_string())).transpose()?;
    control::ask(sock, &Request::Prefetch { image: image.clone(), profile, rate }, TIMEOUT).await?;
    if detach {
        println!("{image}: prefetch started (progress: vmt status)");
        return Ok(());
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                control::ask(sock, &Request::PrefetchCancel { image: image.clone() }, TIMEOUT).await?;
                if let Some(b) = &bar {
                    b.abandon();
                }
                eprintln!("interrupted: prefetch of {image} stopped; chunks fetched so far stay cached");
                std::process::exit(130);
            }
        }
        let status = control::status(sock, TIMEOUT).await?;
        let img = status.into_iter().find(|i| i.name == image).context("image no longer served")?;
        let job = img.prefetch.context("vmtd reports no prefetch for this image")?;
        let bar = bar.get_or_insert_with(|| vmthunder::cli::progress::bytes(&image, job.total_chunks * img.chunk_size));
        // The total is known once vmtd's prefetch task has started: set it every time.
        bar.set_length(job.total_chunks * img.chunk_size);
        bar.set_position(job.done_chunks * img.chunk_size);
        if job.finished {
            bar.finish();
            if let Some(e) = job.error {
                bail!("prefetch of {image} failed: {e}");
            }
            if job.cancelled {
                bail!("prefetch of {image} was stopped before it finished (cancelled, replaced or image removed)");
            }
            println!(
                "{image}: {} chunks of the profile present ({} cached of {} in the image)",
                job.total_chunks, img.chunks_present, img.chunks_total
            );
            return Ok(());
        }
    }
}
