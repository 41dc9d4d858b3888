//! A failing or slow cache disk, and an origin that is missing at start, on real vmtd processes.
//!
//! Faults are injected behind the store's I/O (`VMTHUNDER_STORE_FAULTS`): a failed sync there
//! really loses the bytes it should have made durable (they are overwritten), so a cache that
//! served such a chunk again would serve wrong bytes, and `qemu-img compare` would say so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmthunder::daemon::control::{Request, Response};

const MIB: usize = 1 << 20;

fn verify(env: &Env, image: &str) -> (u64, u64) {
    match call(&env.control_sock(), Request::CacheVerify { image: image.into() }).unwrap() {
        Response::Verified { checked, bad } => (checked, bad),
        r => panic!("unexpected answer {r:?}"),
    }
}

/// Syncs, writes and reads fail now and then, and vmtd is killed (-9) mid-read in every round:
/// reads never fail and never differ from the origin, and every chunk the cache keeps verifies.
#[test]
fn failed_syncs_and_writes_never_serve_lost_chunks_across_kill9() {
    let env = Env::new();
    let img = env.path("img.raw");
    let size = 24 * MIB;
    write_image(&img, size, 11);
    let cfg = env.config("commit_interval = \"10ms\"", &file_image("img", &img, ""));
    let faults = [("VMTHUNDER_STORE_FAULTS", "img@sync=eio/2,img@write=eio/11,img@read=eio/13")];
    let uri = env.export_uri("img");
    let mut failures = [0; 3];
    for round in 0..4 {
        let mut vmtd = start_vmtd_with(&env, &cfg, &faults);
        // A full read while the faults hit: every byte must match the origin.
        assert!(qemu_img_identical(&img, &uri), "round {round}: a read differed or failed");
        // And once more: now partly from the cache, which must not hold a lost chunk.
        assert!(qemu_img_identical(&img, &uri), "round {round}: a cached read differed or failed");
        let s = status(&env, "img");
        for (f, n) in failures.iter_mut().zip([s.cache.sync_errors, s.cache.write_errors, s.cache.read_errors]) {
            *f += n;
        }
        // kill -9 while a reader is busy, faults still on.
        let reader = Command::new("timeout").args(["60", "nbdcopy", &uri, "null:"]).spawn().unwrap();
        let mut reader = Proc { child: Some(reader), name: "nbdcopy".into() };
        wait_until("reads in progress", Duration::from_secs(30), || status(&env, "img").reads > s.reads);
        vmtd.kill9();
        reader.kill9();
    }
    assert!(failures.iter().all(|n| *n > 0), "sync, write and read failures all injected: {failures:?}");
    // Restarted without faults: what the cache claims verifies, and the image reads identically.
    let _vmtd = start_vmtd(&env, &cfg);
    let (checked, bad) = verify(&env, "img");
    assert!(checked > 0, "the cache kept nothing across four rounds");
    assert_eq!(bad, 0, "{bad} of {checked} cached chunks do not match the manifest");
    assert!(qemu_img_identical(&img, &uri));
}

/// A cache whose every write fails (EIO; a full disk, ENOSPC, is not a failure: see
/// tests/cache_lifecycle.rs): reads keep succeeding from the origin, the cache degrades to not
/// caching, and nothing is claimed present.
#[test]
fn a_cache_that_always_fails_degrades_to_the_origin() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 * MIB, 12);
    let cfg = env.config("", &file_image("img", &img, ""));
    let _vmtd = start_vmtd_with(&env, &cfg, &[("VMTHUNDER_STORE_FAULTS", "img@write=eio")]);
    let uri = env.export_uri("img");
    assert!(qemu_img_identical(&img, &uri));
    assert!(qemu_img_identical(&img, &uri));
    let s = settled(&env, "img");
    assert_eq!(s.chunks_present, 0, "no failed write may be claimed");
    assert!(s.cache.degraded, "repeated failures stop caching");
    assert!(s.cache.write_errors >= 3);
    assert_eq!(s.failed_reads, 0);
    let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
    assert!(log.contains("without caching"), "one clear log line says the cache is off");
}

/// With one runtime thread, a cache disk that takes 2 s per operation for one image does not
/// delay cache hits of another image on the same daemon.
#[test]
fn a_slow_cache_does_not_stall_other_images() {
    let env = Env::new();
    let (slow, fast) = (env.path("slow.raw"), env.path("fast.raw"));
    write_image(&slow, 16 * MIB, 13);
    write_image(&fast, 4 * MIB, 14);
    let images = format!("{}{}", file_image("slow", &slow, ""), file_image("fast", &fast, ""));
    let cfg = env.config("worker_threads = 1", &images);
    let _vmtd = start_vmtd_with(&env, &cfg, &[("VMTHUNDER_STORE_FAULTS", "slow@read=delay:2s,slow@write=delay:500ms")]);
    assert!(qemu_img_identical(&fast, &env.export_uri("fast")), "warm the fast image's cache");
    settled(&env, "fast");
    // Warm the slow image too (its writes take 0.5 s each, on the blocking pool), so the reads
    // below all come from its slow cache.
    assert!(qemu_img_identical(&slow, &env.export_uri("slow")));
    wait_until("slow image cached", Duration::from_secs(120), || {
        let s = settled(&env, "slow");
        s.chunks_present == s.chunks_total
    });

    // Keep the slow cache busy: many cached reads in flight on it, 2 s each.
    let warm = status(&env, "slow").reads;
    let sluggish = Command::new("timeout")
        .args(["120", "nbdcopy", "--requests=16", &env.export_uri("slow"), "null:"])
        .spawn()
        .unwrap();
    let mut sluggish = Proc { child: Some(sluggish), name: "nbdcopy".into() };
    wait_until("slow cache busy", Duration::from_secs(30), || status(&env, "slow").reads >= warm + 4);

    // Cache hits on the fast image, one at a time, each timed.
    let mut c = nbd_transmitting(&env, "fast");
    let mut lat = Vec::new();
    for i in 0..200u64 {
        let t0 = Instant::now();
        nbd_read(&mut c, i, (i * 20_000) % (4 * MIB as u64 - 4096), 4096);
        lat.push(t0.elapsed());
    }
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    assert!(sluggish.alive(), "the slow image's reads were still in progress throughout");
    assert!(p99 < Duration::from_secs(1), "cache-hit p99 {p99:?} with a 2 s slow cache next door");
}

/// Caches the first half of the 8 MiB image `img`, stops vmtd, takes the origin away
/// (`take_away`), restarts vmtd: the cached half must be served and the rest fail after the fetch
/// budget; then `bring_back` restores the origin and the whole image must read identically.
fn cached_half_outlives_its_origin(
    env: &Env,
    cfg: &std::path::Path,
    img: &std::path::Path,
    take_away: impl FnOnce(),
    bring_back: impl FnOnce() -> Option<Proc>,
) {
    let uri = env.export_uri("img");
    let half = 4 * MIB as u64;
    let mut vmtd = start_vmtd(env, cfg);
    assert!(qemu_io_read(&uri, 0, half));
    // Every fetched chunk stored before the stop, so the restart finds the half cached.
    settled(env, "img");
    assert_eq!(vmtd.terminate(), Some(0));
    take_away();

    let _vmtd = start_vmtd(env, cfg);
    assert!(qemu_io_read(&uri, 0, half), "the cached half is served without the origin");
    assert!(!qemu_io_read(&uri, half, 65536), "an uncached read fails while the origin is away");
    let _origin = bring_back();
    assert!(qemu_img_identical(img, &uri), "reads recover once the origin is back");
}

/// vmtd starts although its file origin is missing (and says why), serves every cached chunk,
/// gives EIO for the rest after the fetch budget, and recovers when the file is back.
#[test]
fn a_missing_file_origin_does_not_stop_the_node() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 * MIB, 15);
    let cfg = env.config("fetch_timeout = \"2s\"", &file_image("img", &img, ""));
    let away = env.path("img.away");
    cached_half_outlives_its_origin(
        &env,
        &cfg,
        &img,
        || std::fs::rename(&img, &away).unwrap(),
        || {
            let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
            assert!(log.contains("origin unavailable"), "the log says why");
            std::fs::rename(&away, &img).unwrap();
            None
        },
    );
}

/// The same with an NBD origin that is down when vmtd starts.
#[test]
fn an_nbd_origin_down_at_start_does_not_stop_the_node() {
    let env = Env::new();
    let (img, mut origin, cfg) = nbd_origin_setup(&env, 8 * MIB, "fetch_timeout = \"2s\"");
    let sock = env.path("origin.sock");
    cached_half_outlives_its_origin(&env, &cfg, &img, || origin.kill9(), || Some(start_qemu_nbd(&img, &sock)));
}
