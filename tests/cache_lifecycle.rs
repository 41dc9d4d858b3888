//! The cache lifecycle on real vmtd processes: a node serving many images within a disk budget,
//! eviction order (profile chunks of held images and pinned images survive), image versions,
//! kill -9 during eviction, and a cache filesystem that fills up.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use vmthunder::daemon::control::{CacheEntry, CacheUsage, Request, Response};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// A sparse image of `size` bytes whose every 64KiB chunk starts with 4KiB of bytes unique to
/// (`seed`, chunk): distinct images, cheap to make, and every chunk's content checkable.
fn sparse_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for c in 0..size / CHUNK {
        let head = image_bytes(4096, seed * 1_000_003 + c + 1);
        f.write_all_at(&head, c * CHUNK).unwrap();
    }
}

fn pread(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Bytes the caches hold, measured as vmtd does: the data files' allocated blocks.
fn cache_usage(env: &Env) -> u64 {
    let Ok(dirs) = std::fs::read_dir(env.path("cache")) else { return 0 };
    dirs.flatten().filter_map(|d| std::fs::metadata(d.path().join("data")).ok()).map(|m| m.blocks() * 512).sum()
}

fn caches(env: &Env) -> (CacheUsage, Vec<CacheEntry>) {
    match call(&env.control_sock(), Request::CacheList).unwrap() {
        Response::Caches { usage, caches } => (usage, caches),
        r => panic!("unexpected answer {r:?}"),
    }
}

fn verify(env: &Env, image: &str) -> (u64, u64) {
    match call(&env.control_sock(), Request::CacheVerify { image: image.into() }).unwrap() {
        Response::Verified { checked, bad } => (checked, bad),
        r => panic!("unexpected answer {r:?}"),
    }
}

fn ok(r: Response) {
    assert!(matches!(r, Response::Done | Response::Assembled { .. }), "{r:?}");
}

/// xorshift: the tests' reads are random but repeatable.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 20 images of 256MiB behind a 1GiB budget, random 1MiB reads rotating over them (about
/// 2.5GiB): every read is right, usage never passes the budget (the high watermark plus the
/// 10% above it, more than one 100ms commit interval of fetches here), evictions happened, and
/// every cache verifies afterwards.
#[test]
fn twenty_images_rotate_through_a_one_gib_budget() {
    let env = Env::new();
    let images: Vec<(String, std::path::PathBuf)> = (0..20)
        .map(|k| {
            let p = env.path(&format!("img{k}.raw"));
            sparse_image(&p, 256 * MIB, k);
            (format!("img{k}"), p)
        })
        .collect();
    let sections: String = images.iter().map(|(n, p)| file_image(n, p, "")).collect();
    let head =
        "commit_interval = \"100ms\"\n[cache]\nmax = \"1GiB\"\nhigh_watermark = \"90%\"\nlow_watermark = \"80%\"\n";
    let cfg = env.config(head, &sections);
    let _vmtd = start_vmtd(&env, &cfg);
    let mut conns: Vec<Raw> = images.iter().map(|(n, _)| nbd_transmitting(&env, n)).collect();
    let mut rng = Rng(0x5eed);
    let mut peak = 0;
    for i in 0..2600u64 {
        let k = (i % 20) as usize;
        let offset = rng.below(256) * MIB;
        let got = nbd_read(&mut conns[k], i, offset, MIB as u32);
        assert!(got == pread(&images[k].1, offset, MIB), "read {i} of {} at {offset} differs", images[k].0);
        peak = peak.max(cache_usage(&env));
        assert!(peak <= 1 << 30, "usage {peak} passed the 1GiB budget at read {i}");
    }
    let (usage, list) = caches(&env);
    assert_eq!(list.len(), 20);
    assert_eq!(usage.max, Some(1 << 30));
    let evicted: u64 = images.iter().map(|(n, _)| status(&env, n).cache.chunks_evicted).sum();
    assert!(evicted > 0, "nothing was evicted (peak {peak})");
    assert!(peak > 800 * MIB, "the budget was never under pressure (peak {peak})");
    for (n, _) in &images {
        let (checked, bad) = verify(&env, n);
        assert_eq!(bad, 0, "{n}: {bad} of {checked} cached chunks are wrong");
    }
    wait_until("usage under the high watermark", Duration::from_secs(30), || cache_usage(&env) <= (1 << 30) / 100 * 90);
    eprintln!("peak usage {:.1} MiB, {evicted} chunks evicted", peak as f64 / MIB as f64);
}

/// Held images and a pinned one under pressure: the held image's least recently used chunks go
/// first, except its boot profile's; the pinned image loses nothing.
#[test]
fn held_profile_chunks_and_pinned_images_survive_pressure() {
    let env = Env::new();
    let names = ["held", "pinned", "other1", "other2"];
    let paths: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let p = env.path(&format!("{n}.raw"));
            sparse_image(&p, 32 * MIB, 100 + k as u64);
            p
        })
        .collect();
    let sections: String = names.iter().zip(&paths).map(|(n, p)| file_image(n, p, "")).collect();
    let head = "commit_interval = \"50ms\"\nauto_record = false\n[cache]\nmax = \"48MiB\"\n";
    let cfg = env.config(head, &sections);
    let _vmtd = start_vmtd(&env, &cfg);
    let sock = env.control_sock();
    let uri = |n: &str| env.export_uri(n);

    // "pinned" pinned (through the CLI), then cached whole.
    let out = run(std::process::Command::new(VMT).arg("--socket").arg(&sock).args(["cache", "pin", "pinned"]));
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("pinned: pinned"), "{out:?}");
    assert!(qemu_img_identical(&paths[1], &uri("pinned")));
    let pinned_before = settled(&env, "pinned").chunks_present;
    assert_eq!(pinned_before, 32 * MIB / CHUNK);
    // A profile of "held": its first 4MiB.
    ok(call(&sock, Request::RecordStart { image: "held".into(), duration_ms: Some(60_000), domain: None }).unwrap());
    assert!(qemu_io_read(&uri("held"), 0, 4 * MIB));
    let profile_chunks = match call(&sock, Request::RecordStop { image: "held".into() }).unwrap() {
        Response::Recorded { chunks, .. } => chunks,
        r => panic!("{r:?}"),
    };
    assert_eq!(profile_chunks, 4 * MIB / CHUNK);
    ok(call(&sock, Request::Assemble { domain: "vm-held".into(), images: vec!["held".into()] }).unwrap());
    // All of "held" read: more than the budget has room for beside the pinned image.
    assert!(qemu_img_identical(&paths[0], &uri("held")));
    // Pressure from two other held images, read in full twice.
    ok(call(&sock, Request::Assemble { domain: "vm-other".into(), images: vec!["other1".into(), "other2".into()] })
        .unwrap());
    for _ in 0..2 {
        assert!(qemu_img_identical(&paths[2], &uri("other1")));
        assert!(qemu_img_identical(&paths[3], &uri("other2")));
    }
    let held = settled(&env, "held");
    assert!(held.cache.chunks_evicted > 0, "the held image's other chunks were evicted first");
    assert_eq!(settled(&env, "pinned").chunks_present, pinned_before, "the pinned image lost chunks");
    assert_eq!(status(&env, "pinned").cache.chunks_evicted, 0);
    // The profile's chunks are all still cached: reading them waits for nothing.
    let waited = held.reads_waited;
    assert!(qemu_io_read(&uri("held"), 0, 4 * MIB));
    assert_eq!(status(&env, "held").reads_waited, waited, "a profile chunk of the held image was evicted");
    let (_, list) = caches(&env);
    let pinned = list.iter().find(|c| c.image.as_deref() == Some("pinned")).unwrap();
    assert!(pinned.pinned && pinned.holds.is_empty());
    let held = list.iter().find(|c| c.image.as_deref() == Some("held")).unwrap();
    assert_eq!(held.holds, ["vm-held"]);
    for n in names {
        assert_eq!(verify(&env, n).1, 0, "{n}");
    }
}

/// A new version of an image: a connected reader of the old one keeps reading it, new readers
/// get the new one; once released, the old cache is the first one collected.
#[test]
fn a_new_version_serves_new_readers_while_old_readers_keep_theirs() {
    let env = Env::new();
    let (v1, v2, other) = (env.path("v1.raw"), env.path("v2.raw"), env.path("other.raw"));
    sparse_image(&v1, 16 * MIB, 1);
    sparse_image(&v2, 16 * MIB, 2);
    sparse_image(&other, 16 * MIB, 3);
    let sections = file_image("img", &v1, "") + &file_image("other", &other, "");
    let cfg = env.config("commit_interval = \"50ms\"\n[cache]\nmax = \"1GiB\"\n", &sections);
    let _vmtd = start_vmtd(&env, &cfg);
    let sock = env.control_sock();
    ok(call(&sock, Request::Assemble { domain: "old-vm".into(), images: vec!["img".into()] }).unwrap());
    let mut old = nbd_transmitting(&env, "img");
    assert_eq!(nbd_read(&mut old, 1, 0, MIB as u32), pread(&v1, 0, MIB));
    assert!(qemu_img_identical(&other, &env.export_uri("other")));
    let old_digest = status(&env, "img").digest;

    let add = |path: &Path| {
        let image = vmthunder::config::ImageConfig {
            name: "img".into(),
            origin: format!("file://{}", path.display()),
            chunk_size: None,
            manifest: None,
            chap_user: None,
            chap_secret_file: None,
            iscsi_header_digest: false,
            iscsi_data_digest: false,
        };
        call(&sock, Request::ImageAdd { image }).unwrap()
    };
    ok(add(&v2));
    assert!(matches!(add(&v2), Response::Error { .. }), "the same version twice is refused");
    assert_ne!(status(&env, "img").digest, old_digest);
    // The old reader keeps the old bytes; a new one gets the new.
    for (h, at) in [(2, 5 * MIB), (3, 15 * MIB)] {
        assert_eq!(nbd_read(&mut old, h, at, MIB as u32), pread(&v1, at, MIB), "old reader at {at}");
    }
    let mut new = nbd_transmitting(&env, "img");
    assert_eq!(nbd_read(&mut new, 1, 5 * MIB, MIB as u32), pread(&v2, 5 * MIB, MIB));
    let (_, list) = caches(&env);
    let entry = list.iter().find(|c| c.digest == old_digest).unwrap();
    let out = run(std::process::Command::new(VMT).arg("--socket").arg(&sock).args(["cache", "ls"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("cache ") && text.contains("of 1024.0 MiB"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(&old_digest[..16]) && l.contains("old-version") && l.contains("old-vm")),
        "{text}"
    );
    let out = run(std::process::Command::new(VMT).arg("--socket").arg(&sock).arg("status"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cache "), "vmt status shows the usage first");
    assert_eq!((entry.state.as_str(), entry.holds.as_slice()), ("old-version", ["old-vm".to_string()].as_slice()));
    assert!(status(&env, "img").holds.is_empty(), "the old domain does not hold the new version");

    // Released and disconnected: the old version closes and is collected before anything else.
    ok(call(&sock, Request::Release { domain: "old-vm".into() }).unwrap());
    drop(old);
    wait_until("old version closed", Duration::from_secs(30), || {
        caches(&env).1.iter().any(|c| c.digest == old_digest && c.state == "unused")
    });
    let other_before = status(&env, "other").chunks_present;
    // The closed version's last references (its connection's task) go a moment after it:
    // until then its cache is still locked, and the collector rightly leaves it.
    let lock = env.path("cache").join(&old_digest).join("lock");
    wait_until("old cache unlocked", Duration::from_secs(30), || {
        let f = std::fs::File::open(&lock).unwrap();
        use std::os::unix::io::AsRawFd;
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    });
    let used = cache_usage(&env);
    let report = match call(&sock, Request::CacheGc { to: Some(used - 1) }).unwrap() {
        Response::Collected { report } => report,
        r => panic!("{r:?}"),
    };
    assert_eq!(report.removed, std::slice::from_ref(&old_digest));
    assert_eq!(report.chunks, 0, "a chunk of a served image was evicted before the unused cache");
    assert_eq!(status(&env, "other").chunks_present, other_before);
    assert!(!caches(&env).1.iter().any(|c| c.digest == old_digest));
    assert_eq!(nbd_read(&mut new, 2, 0, MIB as u32), pread(&v2, 0, MIB));
}

/// kill -9 at random points while reads keep the collector evicting, 20 rounds: after every
/// restart each chunk the caches claim verifies.
#[test]
fn kill9_during_eviction_leaves_caches_that_verify() {
    let env = Env::new();
    let names: Vec<String> = (0..4).map(|k| format!("img{k}")).collect();
    let paths: Vec<_> = (0..4u64)
        .map(|k| {
            let p = env.path(&format!("img{k}.raw"));
            sparse_image(&p, 16 * MIB, 200 + k);
            p
        })
        .collect();
    let sections: String = names.iter().zip(&paths).map(|(n, p)| file_image(n, p, "")).collect();
    let cfg = env.config("commit_interval = \"20ms\"\n[cache]\nmax = \"24MiB\"\n", &sections);
    let mut rng = Rng(0xdead_beef);
    let mut evicted = 0;
    let mut checked_total = 0;
    for round in 0..20 {
        let mut vmtd = start_vmtd(&env, &cfg);
        for n in &names {
            let (checked, bad) = verify(&env, n);
            assert_eq!(bad, 0, "round {round}: {n}: {bad} of {checked} claimed chunks are wrong");
            checked_total += checked;
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let kill_after = Duration::from_millis(100 + rng.below(400));
        // Connected before the clock starts: a kill during a handshake is not what is tested.
        let mut conns: Vec<Raw> = names.iter().map(|n| nbd_transmitting(&env, n)).collect();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut r = Rng(round + 1);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let k = (i % 4) as usize;
                    let at = r.below(16) * MIB;
                    i += 1;
                    // The daemon dies under these reads: a failed read ends the load.
                    let req = vmthunder::nbd::proto::Request {
                        flags: 0,
                        command: vmthunder::nbd::proto::CMD_READ,
                        handle: i,
                        offset: at,
                        length: MIB as u32,
                    };
                    use std::io::{Read, Write};
                    if conns[k].0.write_all(&req.encode()).is_err() {
                        return;
                    }
                    let mut header = [0u8; vmthunder::nbd::proto::SIMPLE_REPLY_LEN];
                    if conns[k].0.read_exact(&mut header).is_err() {
                        return;
                    }
                    let reply = vmthunder::nbd::proto::SimpleReply::parse(&header).unwrap();
                    assert_eq!(reply.error, 0, "round {round}: a read failed");
                    let mut data = vec![0u8; MIB as usize];
                    if conns[k].0.read_exact(&mut data).is_err() {
                        return;
                    }
                    assert!(data == pread(&paths[k], at, MIB), "round {round}: a read differs");
                }
            });
            let start = Instant::now();
            while start.elapsed() < kill_after {
                std::thread::sleep(Duration::from_millis(10));
            }
            evicted += names.iter().map(|n| status(&env, n).cache.chunks_evicted).sum::<u64>();
            vmtd.kill9();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let _vmtd = start_vmtd(&env, &cfg);
    for n in &names {
        assert_eq!(verify(&env, n).1, 0, "{n} after the last round");
    }
    assert!(evicted > 0, "no round evicted anything");
    assert!(checked_total > 0, "no round kept anything");
    eprintln!("{evicted} chunks evicted over 20 rounds; {checked_total} claimed chunks verified");
}

/// The cache on a 64MiB tmpfs, a 256MiB image read in full: every read succeeds and is right,
/// vmtd warns and counts the chunks it could not cache, and caches again once space is freed.
#[test]
fn a_full_cache_filesystem_serves_reads_and_recovers() {
    let env = Env::new();
    let mnt = env.path("cache");
    std::fs::create_dir_all(&mnt).unwrap();
    let out =
        run(std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=64m", "vmt-test-cache"]).arg(&mnt));
    assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let img = env.path("img.raw");
    write_image(&img, 256 << 20, 77);
    // Space the operator frees later.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 16 << 20]).unwrap();
    let cfg = env.config("commit_interval = \"50ms\"", &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    assert!(qemu_img_identical(&img, &uri), "a read failed or differed on the full disk");
    let s = settled(&env, "img");
    assert!(s.cache.chunks_not_cached > 0, "no chunk was refused: {:?}", s.cache);
    assert_eq!((s.failed_reads, s.cache.write_errors), (0, 0));
    assert!(s.chunks_present < s.chunks_total);
    let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
    assert!(log.contains("cache disk full"), "no warning in the log");
    assert!(log.matches("cache disk full").count() < 20, "the warning is not rate-limited");
    // Eviction on a disk so full that not even the state file can be written: it frees space
    // all the same (the state goes first), and what stays claimed verifies.
    let mut last = std::fs::File::create(mnt.join("last-bytes")).unwrap();
    let page = [7u8; 4096];
    while std::io::Write::write_all(&mut last, &page).is_ok() {}
    drop(last);
    let report = match call(&env.control_sock(), Request::CacheGc { to: Some(0) }).unwrap() {
        Response::Collected { report } => report,
        r => panic!("{r:?}"),
    };
    assert!(report.freed > 0 && report.chunks > 0, "{report:?}");
    let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
    assert!(log.contains("state file dropped to free space"), "the full-disk eviction path did not run");
    std::fs::remove_file(mnt.join("last-bytes")).unwrap();
    assert_eq!(verify(&env, "img").1, 0);
    let s = settled(&env, "img");
    // Space returns: caching resumes (after the short back-off).
    std::fs::remove_file(&filler).unwrap();
    let before = s.chunks_present;
    wait_until("caching resumed", Duration::from_secs(60), || {
        assert!(qemu_img_identical(&img, &uri));
        settled(&env, "img").chunks_present > before
    });
    assert_eq!(verify(&env, "img").1, 0);
}
