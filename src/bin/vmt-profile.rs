//! `vmt-profile`: record, inspect and merge boot profiles, and make one from a request trace
//! (see FORMAT.md for the file format).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmthunder::config::{format_size, parse_duration};
use vmthunder::daemon::control::{self, Request, Response};
use vmthunder::image::{ChunkSize, Geometry};
use vmthunder::profile::format::MAX_PROFILE_BYTES;
use vmthunder::profile::Profile;

/// Record, show and merge vmthunder boot profiles, and make one from a request trace.
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
    /// Record the next boot of an image (its guest reads) into the image's profile.
    Record {
        #[arg(long)]
        image: String,
        /// Stop after this long (default: vmtd's record_duration).
        #[arg(long)]
        duration: Option<String>,
        /// Also stop when this domain stops.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Stop recording (one image, or every image being recorded) and save the profile.
    Stop {
        #[arg(long)]
        image: Option<String>,
    },
    /// Show a profile: an image served by vmtd, or a profile file.
    Show { target: String },
    /// Merge profile B (newer) into A, writing OUT.
    Merge {
        a: PathBuf,
        b: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Drop chunks missed by this many boots in a row (0: keep all).
        #[arg(long, default_value_t = 3)]
        age_out: u32,
    },
    /// Make a one-boot profile of a request trace (`vmt trace`'s CSV), to merge into an image's.
    ///
    /// The profile holds the chunks the trace's reads touch, each once, in the order first read,
    /// each due at its time after the first read, up to --duration. Merge it into the image's
    /// profile with `merge`.
    FromTrace {
        /// The request trace.
        trace: PathBuf,
        /// A profile of the same image: the new one takes its digest, size and chunk size.
        #[arg(long)]
        like: PathBuf,
        /// Leave out the reads later than this after the first (like vmtd's `record_duration`,
        /// but counted from the first read).
        #[arg(long, default_value = "120s")]
        duration: String,
        /// Where to write the profile (atomically).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List the profiles vmtd knows.
    List,
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    vmthunder::cli::docs::generate_if_asked::<Args>("vmt-profile");
    let mut args = Args::parse();
    args.socket = args.vmtd.control_socket()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn load(path: &Path) -> anyhow::Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Profile::decode(&bytes).with_context(|| format!("{}", path.display()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sock = &args.socket;
    match args.cmd {
        Cmd::Record { image, duration, domain } => {
            let duration_ms = duration
                .map(|d| parse_duration(&d).map(|d| d.as_millis() as u64))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            control::ask(sock, &Request::RecordStart { image: image.clone(), duration_ms, domain }, TIMEOUT).await?;
            eprintln!("recording {image}; stop with `vmt-profile stop --image {image}`");
        }
        Cmd::Stop { image } => {
            let images = match image {
                Some(i) => vec![i],
                None => control::status(sock, TIMEOUT)
                    .await?
                    .into_iter()
                    .filter(|i| i.recording.is_some())
                    .map(|i| i.name)
                    .collect(),
            };
            if images.is_empty() {
                bail!("no image is being recorded");
            }
            for image in images {
                match control::ask(sock, &Request::RecordStop { image: image.clone() }, TIMEOUT).await? {
                    Response::Recorded { path, boots, chunks, bytes } => {
                        println!("{image}: {chunks} chunks ({}) from {boots} boots in {path}", format_size(bytes))
                    }
                    other => bail!("unexpected answer from vmtd: {other:?}"),
                }
            }
        }
        Cmd::Show { target } => {
            let path = if Path::new(&target).exists() {
                PathBuf::from(&target)
            } else {
                let list = match control::ask(sock, &Request::ProfileList, TIMEOUT).await? {
                    Response::Profiles { profiles } => profiles,
                    other => bail!("unexpected answer from vmtd: {other:?}"),
                };
                let p = list.into_iter().find(|p| p.image.as_deref() == Some(target.as_str()) || p.digest == target);
                PathBuf::from(
                    p.with_context(|| format!("no profile for {target} (neither a file nor an image with a profile)"))?
                        .path,
                )
            };
            show(&load(&path)?);
        }
        Cmd::Merge { a, b, output, age_out } => {
            let merged = load(&a)?.merge(&load(&b)?, age_out)?;
            vmthunder::fsutil::write_atomic(&output, &merged.encode(), 0o644)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{}: {} chunks from {} boots", output.display(), merged.entries.len(), merged.boots);
        }
        Cmd::FromTrace { trace, like, duration, output } => {
            let window = parse_duration(&duration).map_err(|m| anyhow::anyhow!("--duration: {m}"))?;
            let like = load(&like)?;
            let geometry = Geometry::new(like.image_size, ChunkSize::new(like.chunk_size)?)?;
            let rows = vmthunder::bench::trace::load(&trace).with_context(|| trace.display().to_string())?;
            let touches = vmthunder::bench::trace::first_touches(&rows, &geometry, window)
                .with_context(|| format!("{} (is it a trace of the image of --like?)", trace.display()))?;
            if touches.is_empty() {
                // Merged in, an empty boot would count a miss against every chunk of the profile.
                bail!("{}: the trace holds no read; no profile written", trace.display());
            }
            let p = Profile::from_touches(like.root, &geometry, &touches);
            let bytes = p.encode();
            if bytes.len() > MAX_PROFILE_BYTES {
                bail!("the profile would take {} bytes, over the {MAX_PROFILE_BYTES} vmtd loads", bytes.len());
            }
            vmthunder::fsutil::write_atomic(&output, &bytes, 0o644)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{}: {} chunks ({}) from 1 boot", output.display(), p.entries.len(), format_size(p.bytes()));
        }
        Cmd::List => match control::ask(sock, &Request::ProfileList, TIMEOUT).await? {
            Response::Profiles { profiles } => {
                for p in profiles {
                    let image = p.image.unwrap_or_else(|| "-".into());
                    println!(
                        "{image}\t{}\t{} boots\t{} chunks\t{}\t{}",
                        p.digest,
                        p.boots,
                        p.chunks,
                        format_size(p.bytes),
                        p.path
                    );
                }
            }
            other => bail!("unexpected answer from vmtd: {other:?}"),
        },
    }
    Ok(())
}

fn show(p: &Profile) {
    println!("image digest  {}", p.root);
    println!("image         {} bytes in chunks of {}", p.image_size, format_size(p.chunk_size));
    println!("boots merged  {}", p.boots);
    println!(
        "working set   {} chunks, {} bytes ({:.1}% of the image)",
        p.entries.len(),
        p.bytes(),
        100.0 * p.bytes() as f64 / p.image_size as f64
    );
    let buckets = p.buckets();
    let most = buckets.iter().map(|(_, b)| b.len()).max().unwrap_or(1);
    println!("first needed  (per second after the first read)");
    for (start, chunks) in &buckets {
        let bar = "#".repeat(((chunks.len() * 40).div_ceil(most)) as usize);
        println!(
            "  {:>5}s  {:>7} chunks  {:>10}  {bar}",
            start / 1000,
            chunks.len(),
            format_size(chunks.len() * p.chunk_size)
        );
    }
}
