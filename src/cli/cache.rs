//! `vmt cache`: list the node's caches against the budget, collect, pin, verify.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;

use crate::config::parse_size;
use crate::daemon::control::{self, CacheEntry, CacheUsage, Request, Response};

/// `vmt cache verify` reads a whole cache: as long as the disk takes, not the usual timeout.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// A collection may punch many holes and remove whole directories.
const GC_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Subcommand)]
pub enum CacheCmd {
    /// List every cache on the node: image, digest, bytes held, chunks, idle time, holds, pin;
    /// and the usage against the budget.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Free cache space now: down to SIZE with --to (e.g. 2GiB), else to the low watermark;
    /// without a budget and --to, only caches no image is served from are removed.
    Gc {
        #[arg(long, value_parser = parse_size)]
        to: Option<u64>,
    },
    /// Never evict IMAGE's cache (a served image's name, or 8+ digits of a cache's digest).
    Pin { image: String },
    /// Let IMAGE's cache be evicted again.
    Unpin { image: String },
    /// Read every cached chunk of IMAGE and check it against the manifest. Chunks that fail are
    /// dropped and fetched again when read; exits with status 2 when any failed.
    Verify { image: String },
}

/// Runs one `vmt cache` subcommand against the vmtd at `socket`.
pub async fn run(socket: &Path, cmd: CacheCmd, timeout: Duration) -> anyhow::Result<()> {
    match cmd {
        CacheCmd::Ls { json } => match control::ask(socket, &Request::CacheList, timeout).await? {
            Response::Caches { usage, caches } if json => {
                println!("{}", serde_json::json!({ "usage": usage, "caches": caches }));
            }
            Response::Caches { usage, caches } => {
                println!("{}", usage_line(&usage));
                print_table(&caches);
            }
            r => bail!("unexpected answer from vmtd: {r:?}"),
        },
        CacheCmd::Gc { to } => match control::ask(socket, &Request::CacheGc { to }, GC_TIMEOUT).await? {
            Response::Collected { report: r } => {
                println!(
                    "freed {} ({} caches removed, {} chunks evicted): {} -> {}{}",
                    mib(r.freed),
                    r.removed.len(),
                    r.chunks,
                    mib(r.before),
                    mib(r.after),
                    if r.reached { "" } else { " (target not reached: the rest is pinned, held or in use)" }
                );
            }
            r => bail!("unexpected answer from vmtd: {r:?}"),
        },
        CacheCmd::Pin { image } => pin(socket, image, true, timeout).await?,
        CacheCmd::Unpin { image } => pin(socket, image, false, timeout).await?,
        CacheCmd::Verify { image } => {
            match control::ask(socket, &Request::CacheVerify { image: image.clone() }, VERIFY_TIMEOUT).await? {
                Response::Verified { checked, bad } => {
                    println!("{image}: {checked} cached chunks checked, {bad} bad");
                    if bad > 0 {
                        eprintln!("the bad chunks were dropped from the cache and will be fetched again");
                        std::process::exit(2);
                    }
                }
                r => bail!("unexpected answer from vmtd: {r:?}"),
            }
        }
    }
    Ok(())
}

async fn pin(socket: &Path, image: String, pinned: bool, timeout: Duration) -> anyhow::Result<()> {
    match control::ask(socket, &Request::CachePin { image: image.clone(), pinned }, timeout).await? {
        Response::Done => {
            println!("{image}: {}", if pinned { "pinned" } else { "unpinned" });
            Ok(())
        }
        r => bail!("unexpected answer from vmtd: {r:?}"),
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

/// One line: usage against the budget (`vmt status` prints it too).
pub fn usage_line(u: &CacheUsage) -> String {
    match (u.max, u.high, u.low) {
        (Some(max), Some(high), Some(low)) => format!(
            "cache {} of {} ({:.0}%; collects from {} down to {}){}{}",
            mib(u.used),
            mib(max),
            100.0 * u.used as f64 / max.max(1) as f64,
            mib(high),
            mib(low),
            if u.refused_bytes > 0 {
                format!("; {} served without caching", mib(u.refused_bytes))
            } else {
                String::new()
            },
            if u.unreachable { "; budget unreachable (pinned or held)" } else { "" },
        ),
        _ => format!("cache {} (no budget: [cache] max is not set)", mib(u.used)),
    }
}

fn print_table(caches: &[CacheEntry]) {
    println!(
        "{:<16} {:<20} {:<12} {:>12} {:>17} {:>9} {:<6} HOLDS",
        "DIGEST", "IMAGE", "STATE", "HELD", "CHUNKS", "IDLE", "PINNED"
    );
    for c in caches {
        let chunks = match (c.chunks, c.chunks_total) {
            (Some(n), Some(t)) => format!("{n}/{t}"),
            _ => "-".into(),
        };
        // Whole units are enough to compare caches: "3h", not "3h 2m 41s".
        let idle = c.idle_secs.map_or("-".into(), |s| {
            let s = match s {
                0..=119 => s,
                120..=7199 => s / 60 * 60,
                7200..=172_799 => s / 3600 * 3600,
                _ => s / 86400 * 86400,
            };
            humantime::format_duration(Duration::from_secs(s)).to_string()
        });
        println!(
            "{:<16} {:<20} {:<12} {:>12} {:>17} {:>9} {:<6} {}",
            &c.digest[..16.min(c.digest.len())],
            c.image.as_deref().unwrap_or("-"),
            c.state,
            mib(c.bytes),
            chunks,
            idle,
            if c.pinned { "yes" } else { "no" },
            c.holds.join(",")
        );
    }
}
