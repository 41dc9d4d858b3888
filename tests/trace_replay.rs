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
