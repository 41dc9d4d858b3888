//! `vmtd`: the vmthunder node daemon. Parses arguments, loads the config, sets up logging and
//! runs [`vmthunder::daemon::Daemon`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Serve base images to QEMU over NBD from a lazily filled, crash-safe node cache.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Log records to journald under systemd, else to stderr as text; or force text or JSON
    /// lines on stderr.
    #[arg(long, value_enum, default_value_t)]
    log_format: vmthunder::cli::logging::LogFormat,
    /// Configuration file.
    #[arg(long, short, default_value = vmthunder::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    vmthunder::cli::docs::generate_if_asked::<Args>("vmtd");
    let args = Args::parse();
    // glibc gives each thread that allocates its own arena and keeps freed buffers there; with
    // tokio's worker and blocking threads passing MiB-sized buffers around, that alone grows RSS
    // by tens of MiB. Two arenas keep it small at no measurable cost to throughput.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    vmthunder::cli::logging::init(args.log_format);
    let cfg = vmthunder::config::Config::load(&args.config)?;
    if args.check {
        println!("{}: ok ({} images)", args.config.display(), cfg.images.len());
        return Ok(());
    }
    let mut rt = match cfg.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(vmthunder::daemon::Daemon::run(cfg))?;
    Ok(())
}
