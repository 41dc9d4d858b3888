//! End-to-end tests of request tracing (`vmt trace start/stop` on a real vmtd, driven by
//! qemu-io and nbdsh) and of `vmt bench replay` against vmtd and qemu-nbd exports.

mod common;

use std::process::Command;

use common::*;

const MIB: usize = 1 << 20;

fn vmt(env: &Env, args: &[&str]) -> std::process::Output {
    let out = run(Command::new(VMT).arg("--socket").arg(env.control_sock()).args(args));
    assert!(out.status.success(), "vmt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn trace_records_every_read_and_flush_in_order() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 * MIB, 11);
    let cfg = env.config("", &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");

    assert!(qemu_io_read(&uri, 0, 4096), "read before the trace");
    vmt(&env, &["trace", "start", "img"]);
    assert!(status(&env, "img").tracing);
    let refused = run(Command::new(VMT).arg("--socket").arg(env.control_sock()).args(["trace", "start", "img"]));
    assert!(!refused.status.success(), "a second trace of one image is refused");
    let reads = [(65536u64, 4096u64), (3 * MIB as u64 + 512, 1000), (7 * MIB as u64, 131072)];
    for (off, len) in reads {
        assert!(qemu_io_read(&uri, off, len));
    }
    // nbdsh needs Debian's python3 (python3-libnbd), not one that may come first on PATH.
    let flush =
        run(Command::new("timeout").args(["30", "nbdsh", "-u", &uri, "-c", "h.flush()"]).env("PATH", "/usr/bin:/bin"));
    assert!(flush.status.success(), "nbdsh flush: {}", String::from_utf8_lossy(&flush.stderr));
    let out_path = env.path("boot.trace.csv");
    let out = vmt(&env, &["trace", "stop", "img", "-o", out_path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(": 4 requests"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!status(&env, "img").tracing);
    assert!(qemu_io_read(&uri, 0, 4096), "read after the trace");

    let text = std::fs::read_to_string(&out_path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("t_s,op,offset,length"));
    let rows: Vec<(f64, String, u64, u64)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 4, "{l}");
            (f[0].parse().unwrap(), f[1].to_string(), f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect();
    let want: Vec<(String, u64, u64)> =
        reads.iter().map(|&(o, l)| ("R".to_string(), o, l)).chain([("FLUSH".to_string(), 0, 0)]).collect();
    assert_eq!(rows.iter().map(|r| (r.1.clone(), r.2, r.3)).collect::<Vec<_>>(), want);
    assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0), "times ascend: {rows:?}");
    assert!(rows[0].0 >= 0.0 && rows[3].0 < 60.0);

    let again = run(Command::new(VMT).arg("--socket").arg(env.control_sock()).args([
        "trace",
        "stop",
        "img",
        "-o",
        out_path.to_str().unwrap(),
    ]));
    assert!(!again.status.success(), "stopping a trace that is not running fails");
    assert!(String::from_utf8_lossy(&again.stderr).contains("not being traced"));
}

/// A trace of `bursts` bursts 50 ms apart, each of 4 reads of 64 KiB sent together, plus one
/// write and one flush; returns its path.
fn synthetic_trace(env: &Env, bursts: u64) -> std::path::PathBuf {
    let mut text = String::from("t_s,op,offset,length\n");
    for b in 0..bursts {
        let t = b as f64 * 0.05;
        for i in 0..4u64 {
            text.push_str(&format!("{:.6},R,{},65536\n", t + i as f64 * 0.0002, (b * 4 + i) * 65536));
        }
    }
    let end = bursts as f64 * 0.05;
    text.push_str(&format!("{end:.6},W,0,4096\n{:.6},FLUSH,0,0\n", end + 0.0005));
    let p = env.path("synthetic.trace.csv");
    std::fs::write(&p, text).unwrap();
    p
}

fn replay_json(args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all = vec!["60", VMT, "bench", "replay", "--json"];
    all.extend_from_slice(args);
    let out = run(Command::new("timeout").args(&all));
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn replay_against_vmtd_over_its_socket_and_tcp() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 * MIB, 12);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = env.config(&format!("listen = \"127.0.0.1:{port}\""), &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let trace = synthetic_trace(&env, 10);
    let trace = trace.to_str().unwrap();

    // Socket path: the export name comes from the socket's name. Scale 1: 9 gaps of ~50 ms.
    let sock = env.export_sock("img");
    let (ok, r, err) = replay_json(&["--trace", trace, "--export", sock.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!((r["ops"].as_u64(), r["bytes"].as_u64()), (Some(41), Some(40 * 65536)), "{r}");
    assert_eq!((r["read_errors"].as_u64(), r["writes_skipped"].as_u64()), (Some(0), Some(1)), "{r}");
    let slow = r["elapsed_s"].as_f64().unwrap();
    assert!(slow >= 0.45, "think times are kept: {r}");
    let s = status(&env, "img");
    assert_eq!(s.chunks_present, 40, "the replay read the traced chunks");

    // TCP, scale 0: back to back, so much faster than the recorded pace.
    let uri = format!("nbd://127.0.0.1:{port}/img");
    let (ok, r, err) = replay_json(&["--trace", trace, "--export", &uri, "--scale", "0"]);
    assert!(ok, "{err}");
    assert_eq!(r["bytes"].as_u64(), Some(40 * 65536));
    assert!(r["elapsed_s"].as_f64().unwrap() < slow / 2.0, "{r}");

    // Reads past the end of the export are read errors and fail the run, which still reports.
    let bad = env.path("bad.trace.csv");
    std::fs::write(&bad, format!("t_s,op,offset,length\n0,R,0,4096\n0.1,R,{},4096\n", 8 * MIB)).unwrap();
    let (ok, r, err) = replay_json(&["--trace", bad.to_str().unwrap(), "--export", &uri]);
    assert!(!ok, "a failed read makes the replay fail");
    assert_eq!((r["ops"].as_u64(), r["read_errors"].as_u64()), (Some(2), Some(1)), "{r} {err}");
    assert!(err.contains("1 of 2 requests failed"), "{err}");

    // A broken trace is refused with its line; an unknown export name fails to connect.
    std::fs::write(&bad, "t_s,op,offset,length\n0,R,0,4096\n0,X,0,1\n").unwrap();
    let (ok, _, err) = replay_json(&["--trace", bad.to_str().unwrap(), "--export", &uri]);
    assert!(!ok && err.contains("trace line 3"), "{err}");
    let (ok, _, err) = replay_json(&["--trace", trace, "--export", &format!("nbd://127.0.0.1:{port}/nope")]);
    assert!(!ok && err.contains("connecting to"), "{err}");
}

#[test]
fn replay_against_qemu_nbd_and_start_at() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 * MIB, 13);
    let sock = env.path("qemu.sock");
    let _q = start_qemu_nbd(&img, &sock);
    let trace = synthetic_trace(&env, 4);
    let start_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() + 1.0;
    let t0 = std::time::Instant::now();
    let (ok, r, err) = replay_json(&[
        "--trace",
        trace.to_str().unwrap(),
        "--export",
        sock.to_str().unwrap(),
        "--name",
        "img",
        "--scale",
        "0.5",
        "--start-at",
        &format!("{start_at:.3}"),
    ]);
    assert!(ok, "{err}");
    assert!(t0.elapsed() >= std::time::Duration::from_millis(900), "waited for --start-at");
    assert_eq!(
        (r["ops"].as_u64(), r["bytes"].as_u64(), r["read_errors"].as_u64()),
        (Some(17), Some(16 * 65536), Some(0))
    );
    let e = r["elapsed_s"].as_f64().unwrap();
    assert!((0.075..0.9).contains(&e), "three 25 ms think times, not the wait: {r}");

    // The text report.
    let out = run_limited(
        60,
        VMT,
        &["bench", "replay", "--trace", trace.to_str().unwrap(), "--export", sock.to_str().unwrap(), "--name", "img"],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("replayed 17 requests in "));

    let fp = run_limited(30, VMT, &["bench", "footprint", "--trace", trace.to_str().unwrap(), "--json"]);
    let fp: serde_json::Value = serde_json::from_slice(&fp.stdout).unwrap();
    assert_eq!((fp["distinct_bytes"].as_u64(), fp["chunks"].as_u64()), (Some(16 * 65536), Some(16)));
}
