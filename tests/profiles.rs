//! Boot profiles end to end: recording guest reads in vmtd, saving and merging profiles,
//! `vmt-profile` and `vmt-prefetch`, the hook-driven record-then-prefetch cycle, live loading
//! from `profile_dir`, and hostile profile files.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use vmthunder::daemon::control::{Request, Response};
use vmthunder::profile::Profile;

const VMT_PROFILE: &str = env!("CARGO_BIN_EXE_vmt-profile");
const VMT_PREFETCH: &str = env!("CARGO_BIN_EXE_vmt-prefetch");
const CHUNK: u64 = 65536;

fn tool(bin: &str, env: &Env, args: &[&str]) -> Output {
    run(Command::new(bin).arg("--socket").arg(env.control_sock()).args(args))
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn read_chunks(env: &Env, chunks: &[u64]) {
    for c in chunks {
        assert!(qemu_io_read(&env.export_uri("img"), c * CHUNK, 4096));
    }
}

fn rejected(env: &Env) -> u64 {
    match call(&env.control_sock(), Request::Status).unwrap() {
        Response::Status { profiles_rejected, .. } => profiles_rejected,
        other => panic!("{other:?}"),
    }
}

fn profile_file(env: &Env) -> std::path::PathBuf {
    let digest = status(env, "img").digest;
    env.path("profiles").join(format!("{digest}.profile"))
}

#[test]
fn record_show_merge_and_warm_a_fresh_cache() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 << 20, 11);
    let cfg = env.config("", &file_image("img", &img, ""));
    let mut vmtd = start_vmtd(&env, &cfg);

    ok(&tool(VMT_PROFILE, &env, &["record", "--image", "img"]));
    assert_eq!(status(&env, "img").recording.as_deref(), Some(""));
    read_chunks(&env, &[5, 10, 11, 50]);
    let out = ok(&tool(VMT_PROFILE, &env, &["stop"]));
    assert!(out.contains("4 chunks"), "{out}");
    let p = Profile::decode(&std::fs::read(profile_file(&env)).unwrap()).unwrap();
    assert_eq!(p.entries.iter().map(|e| e.chunk).collect::<Vec<_>>(), vec![5, 10, 11, 50]);
    assert_eq!(p.boots, 1);

    // A second boot touching other chunks merges in.
    ok(&tool(VMT_PROFILE, &env, &["record", "--image", "img", "--duration", "60s"]));
    read_chunks(&env, &[10, 60]);
    ok(&tool(VMT_PROFILE, &env, &["stop", "--image", "img"]));
    let show = ok(&tool(VMT_PROFILE, &env, &["show", "img"]));
    assert!(show.contains("boots merged  2") && show.contains("working set   5 chunks"), "{show}");
    let list = ok(&tool(VMT_PROFILE, &env, &["list"]));
    assert!(list.starts_with("img\t"), "{list}");

    // Offline merge of two files.
    let (a, b, m) = (env.path("a.profile"), env.path("b.profile"), env.path("m.profile"));
    std::fs::copy(profile_file(&env), &a).unwrap();
    std::fs::copy(profile_file(&env), &b).unwrap();
    let out = run(Command::new(VMT_PROFILE).args([
        "merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "-o",
        m.to_str().unwrap(),
    ]));
    assert!(ok(&out).contains("from 4 boots"));

    // A profile made of a request trace's reads, for the same image, merges into the recorded one.
    let (trace, t) = (env.path("boot.csv"), env.path("t.profile"));
    let csv =
        format!("t_s,op,offset,length\n0.5,W,0,4096\n1.0,R,{},8192\n1.25,R,{},4096\n", 70 * CHUNK - 4096, 5 * CHUNK);
    std::fs::write(&trace, csv).unwrap();
    let from_trace = |out: &Path| {
        run(Command::new(VMT_PROFILE).arg("from-trace").arg(&trace).arg("--like").arg(&a).arg("-o").arg(out))
    };
    let out = ok(&from_trace(&t));
    assert!(out.contains("3 chunks (192KiB) from 1 boot"), "{out}");
    let p = Profile::decode(&std::fs::read(&t).unwrap()).unwrap();
    assert_eq!(
        p.entries.iter().map(|e| (e.chunk, e.deadline_ms)).collect::<Vec<_>>(),
        vec![(69, 0), (70, 0), (5, 250)]
    );
    assert_eq!((p.boots, p.root.to_hex()), (1, status(&env, "img").digest));
    let out = run(Command::new(VMT_PROFILE).args(["merge", a.to_str().unwrap(), t.to_str().unwrap(), "-o"]).arg(&m));
    let merged = ok(&out);
    assert!(merged.contains("7 chunks from 3 boots"), "{merged}");
    // A read past the image's end, or no read at all, is refused, and OUT is left as it was.
    let before = std::fs::read(&t).unwrap();
    for (csv, why) in [
        (format!("t_s,op,offset,length\n0,W,0,512\n0.5,R,{},4096\n", (8 << 20) - 512), "t_s 0.5"),
        ("t_s,op,offset,length\n0,W,0,512\n".to_string(), "holds no read"),
    ] {
        std::fs::write(&trace, csv).unwrap();
        let out = from_trace(&t);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{why}: {stderr}");
        assert_eq!(std::fs::read(&t).unwrap(), before);
    }

    // A fresh node cache, same profiles: warming fetches exactly the profile's chunks, after
    // which the boot's reads never wait for the origin.
    assert_eq!(vmtd.terminate(), Some(0));
    std::fs::remove_dir_all(env.path("cache")).unwrap();
    let mut vmtd = start_vmtd(&env, &cfg);
    assert_eq!(status(&env, "img").chunks_present, 0);
    let out = tool(VMT_PREFETCH, &env, &["warm", "--image", "img", "--rate", "100MiB"]);
    ok(&out);
    let s = status(&env, "img");
    assert_eq!(s.chunks_present, 5, "{s:?}");
    // The same with --detach: it returns once vmtd took the job, which then runs on its own.
    assert_eq!(vmtd.terminate(), Some(0));
    std::fs::remove_dir_all(env.path("cache")).unwrap();
    let _vmtd = start_vmtd(&env, &cfg);
    let out = ok(&tool(VMT_PREFETCH, &env, &["warm", "--image", "img", "--detach"]));
    assert!(out.contains("img: prefetch started"), "{out}");
    wait_until("detached prefetch done", Duration::from_secs(20), || {
        status(&env, "img").prefetch.is_some_and(|j| j.finished && j.error.is_none())
    });
    let s = status(&env, "img");
    assert_eq!(s.chunks_present, 5, "{s:?}");
    read_chunks(&env, &[5, 10, 11, 50, 60]);
    let s = status(&env, "img");
    assert_eq!((s.reads, s.reads_waited), (5, 0), "{s:?}");
    assert!(qemu_img_identical(&img, &env.export_uri("img")));
}

#[test]
fn hook_cycle_records_the_first_boot_then_prefetches_the_next() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 4 << 20, 12);
    let cfg = env.config("record_duration = \"10m\"", &file_image("img", &img, ""));
    let mut vmtd = start_vmtd(&env, &cfg);
    let sock = env.control_sock();
    let assemble = |d: &str| call(&sock, Request::Assemble { domain: d.into(), images: vec!["img".into()] }).unwrap();
    assert!(matches!(assemble("vm1"), Response::Assembled { .. }));
    assert_eq!(status(&env, "img").recording.as_deref(), Some("vm1"), "first boot without a profile is recorded");
    read_chunks(&env, &[1, 2, 3, 40]);
    assert!(matches!(call(&sock, Request::Release { domain: "vm1".into() }).unwrap(), Response::Done));
    let s = status(&env, "img");
    assert_eq!((s.recording, s.profile_chunks), (None, Some(4)), "domain stop ends and saves the recording");

    assert_eq!(vmtd.terminate(), Some(0));
    std::fs::remove_dir_all(env.path("cache")).unwrap();
    let _vmtd = start_vmtd(&env, &cfg);
    assert!(matches!(assemble("vm2"), Response::Assembled { .. }));
    wait_until("prefetch done", Duration::from_secs(30), || status(&env, "img").prefetch.is_some_and(|p| p.finished));
    let s = status(&env, "img");
    assert!(s.recording.is_none(), "with a profile, boots are not recorded again");
    assert_eq!((s.chunks_present, s.prefetch.unwrap().error), (4, None));
}

#[test]
fn hostile_profile_files_are_refused_and_the_previous_profile_kept() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 4 << 20, 13);
    let other = env.path("other.raw");
    write_image(&other, 4 << 20, 14);
    let cfg = env.config("", &(file_image("img", &img, "") + &file_image("other", &other, "")));
    let _vmtd = start_vmtd(&env, &cfg);
    ok(&tool(VMT_PROFILE, &env, &["record", "--image", "img"]));
    read_chunks(&env, &[7, 8]);
    ok(&tool(VMT_PROFILE, &env, &["stop", "--image", "img"]));
    let good_path = profile_file(&env);
    let good = std::fs::read(&good_path).unwrap();
    assert_eq!(status(&env, "img").profile_chunks, Some(2));

    // Live loading: a valid profile copied in by configuration management.
    let other_digest = status(&env, "other").digest;
    let o = Profile::from_touches(
        vmthunder::image::Digest::from_hex(&other_digest).unwrap(),
        &vmthunder::image::Geometry::new(4 << 20, vmthunder::image::ChunkSize::new(CHUNK).unwrap()).unwrap(),
        &[(3, 0), (4, 5)],
    );
    std::fs::write(env.path("profiles/.staging"), o.encode()).unwrap();
    std::fs::rename(env.path("profiles/.staging"), env.path(&format!("profiles/{other_digest}.profile"))).unwrap();
    wait_until("profile loaded live", Duration::from_secs(10), || status(&env, "other").profile_chunks == Some(2));

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x55;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corrupt", flipped),
        ("truncated", good[..good.len() - 9].to_vec()),
        ("foreign", o.encode()),
        ("empty", vec![]),
        ("oversized", vec![0u8; (64 << 20) + 1]),
    ];
    for (what, bytes) in cases {
        let before = rejected(&env);
        std::fs::write(&good_path, &bytes).unwrap();
        // The watcher sees the change and refuses it; the previous profile stays in force.
        wait_until(&format!("{what} profile refused"), Duration::from_secs(10), || rejected(&env) > before);
        assert_eq!(status(&env, "img").profile_chunks, Some(2), "{what} profile replaced the good one");
        if what != "foreign" {
            // On its own a foreign profile is valid; every other case is not.
            let shown = run(Command::new(VMT_PROFILE).args(["show", good_path.to_str().unwrap()]));
            assert!(!shown.status.success(), "{what} profile shown as valid");
            assert!(!String::from_utf8_lossy(&shown.stderr).is_empty());
        }
    }
    // Profiles naming chunks beyond the image, fed to prefetch directly: refused.
    let beyond = Profile {
        entries: vec![vmthunder::profile::format::Entry { chunk: 9999, deadline_ms: 0, count: 1, misses: 0 }],
        ..o.clone()
    };
    let path = env.path("beyond.profile");
    std::fs::write(&path, beyond.encode()).unwrap();
    let out = tool(VMT_PREFETCH, &env, &["warm", "--image", "other", "--profile", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("beyond the image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tool(
        VMT_PREFETCH,
        &env,
        &[
            "warm",
            "--image",
            "img",
            "--profile",
            env.path(&format!("profiles/{other_digest}.profile")).to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is for image"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(Path::new(&env.control_sock()).exists() && try_status(&env.control_sock()).is_some(), "vmtd stays up");
}

/// The profiles shipped in profiles/ decode, and each is named by its image digest.
#[test]
fn shipped_profiles_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "profile") {
            let p =
                Profile::decode(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(path.file_name().unwrap().to_str().unwrap(), Profile::file_name(&p.root));
            assert!(!p.entries.is_empty());
            n += 1;
        }
    }
    assert!(n >= 1, "no profiles in {}", dir.display());
}
