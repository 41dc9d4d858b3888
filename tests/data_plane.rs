//! End-to-end tests of the data plane against real clients and a real NBD origin: qemu-img,
//! qemu-io and nbdinfo read vmtd's exports; qemu-nbd serves as origin.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmthunder::image::{ChunkIdx, Manifest};
use vmthunder::store::state;

const MIB: usize = 1 << 20;

#[test]
fn file_origin_served_identically_and_second_pass_is_free() {
    let env = Env::new();
    let img = env.path("img.raw");
    let data = write_image(&img, 24 * MIB + 4096, 1);
    let cfg = env.config("", &file_image("img", &img, ""));
    let mut vmtd = start_vmtd(&env, &cfg);

    let uri = env.export_uri("img");
    assert!(qemu_img_identical(&img, &uri), "first pass differs");
    let s1 = settled(&env, "img");
    assert_eq!(s1.chunks_present, s1.chunks_total);
    assert!(s1.bytes_from_origin >= data.len() as u64, "{s1:?}");
    assert_eq!(s1.verify_failures, 0);

    assert!(qemu_img_identical(&img, &uri), "second pass differs");
    let s2 = status(&env, "img");
    assert_eq!(s2.bytes_from_origin, s1.bytes_from_origin, "second pass must take nothing from the origin");
    assert_eq!(s2.bytes_served - s1.bytes_served, data.len() as u64, "the second pass read the image once");
    assert_eq!(s2.reads_waited, s1.reads_waited, "no read of the second pass waited for a fetch");

    // nbdinfo: the export is listed, read-only, of the image's size.
    let out = run_limited(30, "nbdinfo", &["--json", &uri]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "img");
    assert_eq!(export["export-size"], data.len() as u64);
    assert_eq!(export["is_read_only"], true);
    let list = run_limited(30, "nbdinfo", &["--list", "--json", &uri]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["exports"].as_array().unwrap().len(), 1);

    // Export socket: root and the export user only.
    let meta = std::fs::metadata(env.export_sock("img")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let want_uid = Command::new("id").args(["-u", "libvirt-qemu"]).output().unwrap();
    if want_uid.status.success() {
        let uid: u32 = String::from_utf8_lossy(&want_uid.stdout).trim().parse().unwrap();
        assert_eq!(meta.uid(), uid, "export socket belongs to libvirt-qemu");
    }
    let ctl = std::fs::metadata(env.control_sock()).unwrap();
    assert_eq!((ctl.permissions().mode() & 0o777, ctl.uid()), (0o600, 0));

    // SIGTERM: exit 0, sockets removed.
    assert_eq!(vmtd.terminate(), Some(0));
    assert!(!env.export_sock("img").exists() && !env.control_sock().exists());
}

#[test]
fn nbd_origin_served_identically_and_cache_survives_restart_without_origin() {
    let env = Env::new();
    let (img, mut origin, cfg) = nbd_origin_setup(&env, 16 * MIB, "");
    let mut vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    assert!(qemu_img_identical(&img, &uri));
    let before = settled(&env, "img");
    assert_eq!(before.chunks_present, before.chunks_total);
    assert_eq!(vmtd.terminate(), Some(0));

    // Origin gone: every chunk must come from the cache, none refetched.
    origin.kill9();
    let _vmtd = start_vmtd(&env, &cfg);
    let after = status(&env, "img");
    assert_eq!(after.chunks_present, after.chunks_total, "cache reopened complete");
    assert!(qemu_img_identical(&img, &uri));
    let after = status(&env, "img");
    assert_eq!(after.bytes_from_origin, 0);
    assert_eq!(after.upstream_reads, 0);
}

#[test]
fn origin_outage_gives_bounded_eio_then_recovers() {
    let env = Env::new();
    let (img, mut origin, cfg) = nbd_origin_setup(&env, 8 * MIB, "fetch_timeout = \"2s\"");
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    let half = 4 * MIB as u64;
    assert!(qemu_io_read(&uri, 0, half), "first half readable");
    origin.kill9();

    assert!(qemu_io_read(&uri, 0, half), "cached half keeps working with the origin down");
    let t0 = Instant::now();
    assert!(!qemu_io_read(&uri, half, 65536), "uncached read must fail while the origin is down");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1500), "failed before the fetch budget: {waited:?}");
    assert!(waited < Duration::from_secs(20), "fetch budget not bounded: {waited:?}");
    let s = status(&env, "img");
    assert!(s.failed_reads >= 1 && s.retries >= 1, "{s:?}");

    let osock = env.path("origin.sock");
    let _origin = start_qemu_nbd(&img, &osock);
    assert!(qemu_img_identical(&img, &uri), "reads recover when the origin returns");
}

#[test]
fn chunk_failing_its_manifest_is_never_stored_or_served() {
    let env = Env::new();
    let img = env.path("img.raw");
    let data = write_image(&img, 4 * MIB, 3);
    let manifest = env.path("img.manifest");
    let out = run(Command::new(VMT).args([
        "image",
        "manifest",
        &format!("file://{}", img.display()),
        "-o",
        manifest.to_str().unwrap(),
    ]));
    assert!(out.status.success());
    // The origin changes under the manifest: chunk 5 no longer matches.
    let mut bad = data.clone();
    bad[5 * 65536 + 100] ^= 0xff;
    std::fs::write(&img, &bad).unwrap();
    let cfg = env
        .config("fetch_timeout = \"2s\"", &file_image("img", &img, &format!("manifest = \"{}\"", manifest.display())));
    let mut vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    assert!(qemu_io_read(&uri, 4 * 65536, 65536), "good chunk readable");
    assert!(!qemu_io_read(&uri, 5 * 65536, 4096), "corrupt chunk must not be served");
    assert!(!qemu_io_read(&uri, 5 * 65536, 4096), "and not on a second try either");
    let s = settled(&env, "img");
    assert!(s.verify_failures >= 2, "{s:?}");
    assert_eq!(s.chunks_present, 1);
    assert_eq!(vmtd.terminate(), Some(0));

    let m = Manifest::load(&manifest).unwrap();
    let dir = env.path("cache").join(m.root().to_hex());
    let present = state::decode(&std::fs::read(dir.join("state")).unwrap(), &m.geometry(), &m.root()).unwrap();
    assert!(present.contains(4) && !present.contains(5));
}

/// kill -9 at random moments during a full read under concurrent load: after every restart,
/// each chunk the cache claims must match the origin byte for byte.
#[test]
fn kill9_during_reads_leaves_a_consistent_cache() {
    let env = Env::new();
    let img = env.path("img.raw");
    let size = 48 * MIB;
    let data = write_image(&img, size, 4);
    let cfg = env.config("commit_interval = \"20ms\"", &file_image("img", &img, ""));
    let uri = env.export_uri("img");
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut last_present = 0;
    let rounds = 20;
    for round in 0..rounds {
        let mut vmtd = start_vmtd(&env, &cfg);
        // A full sequential read plus random reads, concurrently.
        let seq = Command::new("timeout").args(["60", "nbdcopy", &uri, "null:"]).spawn().unwrap();
        let mut seq = Proc { child: Some(seq), name: "nbdcopy".into() };
        let mut script = Vec::new();
        for _ in 0..64 {
            let off = (next() % (size as u64 / 4096)) * 4096;
            script.extend(["-c".to_string(), format!("read {off} 4096")]);
        }
        let mut args = vec!["60".to_string(), "qemu-io".into(), "-r".into(), "-f".into(), "raw".into()];
        args.extend(script);
        args.push(uri.clone());
        let rnd = Command::new("timeout")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut rnd = Proc { child: Some(rnd), name: "qemu-io".into() };
        std::thread::sleep(Duration::from_millis(30 + next() % 400));
        vmtd.kill9();
        seq.kill9();
        rnd.kill9();

        let m = Manifest::load(&env.path("cache/manifests/img.manifest")).unwrap();
        let dir = env.path("cache").join(m.root().to_hex());
        let present = match std::fs::read(dir.join("state")) {
            Ok(b) => state::decode(&b, &m.geometry(), &m.root()).expect("state decodes after kill -9"),
            Err(_) => Default::default(),
        };
        let cache = std::fs::read(dir.join("data")).unwrap();
        assert_eq!(cache.len(), size);
        for idx in present.iter() {
            let g = m.geometry();
            let off = g.chunk_offset(ChunkIdx(idx)).0 as usize;
            let len = g.chunk_len(ChunkIdx(idx));
            assert!(
                cache[off..off + len] == data[off..off + len],
                "round {round}: chunk {idx} marked present but differs"
            );
        }
        assert!(present.len() >= last_present, "presence never shrinks");
        last_present = present.len();
    }
    // The cache grew across rounds and a final full read is still identical.
    assert!(last_present > 0, "no chunk was ever committed in {rounds} rounds");
    let _vmtd = start_vmtd(&env, &cfg);
    assert!(qemu_img_identical(&img, &uri));
}

#[test]
fn images_added_and_removed_at_run_time() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 2 * MIB, 5);
    let cfg = env.config("", "");
    let _vmtd = start_vmtd(&env, &cfg);
    let ctl = env.control_sock();
    let origin = format!("file://{}", img.display());
    let add = || {
        let args = ["--socket", ctl.to_str().unwrap(), "image", "add", "late", &origin, "--chunk-size", "128KiB"];
        run(Command::new(VMT).args(args))
    };
    let out = add();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(qemu_img_identical(&img, &env.export_uri("late")));
    assert_eq!(status(&env, "late").chunk_size, 128 << 10);

    // The same image again (another manifest, such as another chunk size, would be a new version).
    let dup = add();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already served"));
    let hostile = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "add", "../evil", &origin]));
    assert!(!hostile.status.success());
    assert!(String::from_utf8_lossy(&hostile.stderr).contains("not a valid image name"));

    let out = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "remove", "late"]));
    assert!(out.status.success());
    assert!(!env.export_sock("late").exists());
    let list = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "list", "--json"]));
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    let gone = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "remove", "late"]));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no image named late"));
}

#[test]
fn complete_fills_the_cache_at_the_given_pace_then_the_origin_is_not_needed() {
    let env = Env::new();
    let (img, mut origin, cfg) = nbd_origin_setup(&env, 8 * MIB, "");
    let _vmtd = start_vmtd(&env, &cfg);
    let ctl = env.control_sock();
    let t0 = Instant::now();
    let out = run(Command::new(VMT).args([
        "--socket",
        ctl.to_str().unwrap(),
        "complete",
        "img",
        "--rate",
        "16MiB",
        "--wait",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t0.elapsed() >= Duration::from_millis(350), "8 MiB at 16 MiB/s took only {:?}", t0.elapsed());
    let s = status(&env, "img");
    assert_eq!(s.chunks_present, s.chunks_total);
    origin.kill9();
    assert!(qemu_img_identical(&img, &env.export_uri("img")));
    assert_eq!(status(&env, "img").bytes_from_origin, s.bytes_from_origin);
    let bad = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "complete", "nosuch"]));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no image named nosuch"));
}

/// Removing an image closes its connections on the shared TCP listener too, so its cache is
/// released and the image can be added again.
#[test]
fn removing_an_image_closes_its_tcp_connections() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, MIB, 6);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = env.config(&format!("listen = \"127.0.0.1:{port}\""), &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = format!("nbd://127.0.0.1:{port}/img");
    assert!(qemu_img_identical(&img, &uri));

    // A client in the transmission phase on TCP, holding the connection open.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut c, &mut greeting).unwrap();
    let go = vmthunder::nbd::proto::InfoRequest { name: "img".into(), infos: vec![] }.encode();
    let mut hello = 1u32.to_be_bytes().to_vec();
    hello.extend_from_slice(
        &vmthunder::nbd::proto::OptionHeader { option: vmthunder::nbd::proto::OPT_GO, len: go.len() as u32 }.encode(),
    );
    hello.extend_from_slice(&go);
    std::io::Write::write_all(&mut c, &hello).unwrap();
    wait_until("TCP client counted", Duration::from_secs(10), || status(&env, "img").clients == 1);

    let ctl = env.control_sock();
    let out = run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "remove", "img"]));
    assert!(out.status.success());
    // The connection is closed by vmtd: reading drains the handshake replies, then hits EOF.
    let mut sink = Vec::new();
    let n = std::io::Read::read_to_end(&mut c, &mut sink);
    assert!(n.is_ok(), "connection closed cleanly, not timed out: {n:?}");
    let origin = format!("file://{}", img.display());
    wait_until("image added again (cache released)", Duration::from_secs(10), || {
        run(Command::new(VMT).args(["--socket", ctl.to_str().unwrap(), "image", "add", "img", &origin]))
            .status
            .success()
    });
    assert!(qemu_img_identical(&img, &uri));
}

/// `vmt`, `vmt-profile` and `vmt-prefetch` find vmtd through its configuration (`--config`),
/// whatever its `run_dir`; `--config` and `--socket` together are refused.
#[test]
fn tools_find_vmtd_through_its_config() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, MIB, 3);
    let cfg = env.config("", &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let cfg = cfg.to_str().unwrap();
    let out = run(Command::new(VMT).args(["--config", cfg, "status", "--json"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"name\": \"img\""));
    let out = run(Command::new(env!("CARGO_BIN_EXE_vmt-profile")).args(["list", "--config", cfg]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Reaches vmtd, which knows no such image.
    let out =
        run(Command::new(env!("CARGO_BIN_EXE_vmt-prefetch")).args(["--config", cfg, "warm", "--image", "nosuch"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image named nosuch"), "{out:?}");
    let out = run(Command::new(VMT).args(["--config", cfg, "--socket", "/x.sock", "status"]));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{out:?}");
}
