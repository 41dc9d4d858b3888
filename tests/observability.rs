//! Observability end to end on real vmtd processes: the guest-wait histogram against the reads
//! that missed (origin behind a shaped link, then a profile-warmed cache), systemd's readiness
//! protocol with a fake NOTIFY_SOCKET, a metrics scraper that never reads, bad
//! `metrics_listen` values, and `vmt top` under tmux.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VMT_PROFILE: &str = env!("CARGO_BIN_EXE_vmt-profile");
const VMT_PREFETCH: &str = env!("CARGO_BIN_EXE_vmt-prefetch");
const CHUNK: u64 = 65536;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qemu-nbd origin in a network namespace of its own, reached over a veth pair shaped with
/// tc tbf in both directions (a network storage origin). Removed on drop.
struct ShapedOrigin {
    ns: String,
    host: String,
    _origin: Option<Proc>,
    uri: String,
}

impl ShapedOrigin {
    fn start(file: &Path, rate: &str) -> ShapedOrigin {
        let id = std::process::id();
        let b = id % 250 + 1;
        let (hip, nip) = (format!("10.91.{b}.1"), format!("10.91.{b}.2"));
        let mut me = ShapedOrigin {
            ns: format!("vmtobs{id}"),
            host: format!("vo{}h", id % 1_000_000),
            _origin: None,
            uri: format!("nbd://{nip}:10809/img"),
        };
        let peer = format!("vo{}n", id % 1_000_000);
        sh(&["ip", "netns", "add", &me.ns]);
        sh(&["ip", "link", "add", &me.host, "type", "veth", "peer", "name", &peer, "netns", &me.ns]);
        sh(&["ip", "addr", "add", &format!("{hip}/30"), "dev", &me.host]);
        sh(&["ip", "link", "set", &me.host, "up"]);
        sh(&["ip", "-n", &me.ns, "addr", "add", &format!("{nip}/30"), "dev", &peer]);
        sh(&["ip", "-n", &me.ns, "link", "set", &peer, "up"]);
        sh(&["ip", "-n", &me.ns, "link", "set", "lo", "up"]);
        let tbf = ["root", "tbf", "rate", rate, "burst", "128kb", "latency", "50ms"];
        sh(&[&["tc", "qdisc", "add", "dev", &me.host][..], &tbf].concat());
        sh(&[&["tc", "-n", &me.ns, "qdisc", "add", "dev", &peer][..], &tbf].concat());
        let child = Command::new("ip")
            .args(["netns", "exec", &me.ns, "qemu-nbd", "-t", "-r", "-e", "0", "-x", "img", "-f", "raw", "-b", &nip])
            .args(["-p", "10809"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        me._origin = Some(Proc { child: Some(child), name: "qemu-nbd".into() });
        wait_until("shaped origin listening", Duration::from_secs(20), || {
            TcpStream::connect((nip.as_str(), 10809)).is_ok()
        });
        me
    }
}

impl Drop for ShapedOrigin {
    fn drop(&mut self) {
        self._origin = None;
        let _ = Command::new("ip").args(["link", "del", &self.host]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A trace that reads 4 KiB inside each of `chunks`, one request at a time, 1 ms apart.
fn trace(env: &Env, name: &str, chunks: &[u64]) -> std::path::PathBuf {
    let mut csv = String::from("t_s,op,offset,length\n");
    for (k, c) in chunks.iter().enumerate() {
        csv += &format!("{:.3},R,{},4096\n", k as f64 * 0.001, c * CHUNK + 4096);
    }
    let p = env.path(name);
    std::fs::write(&p, csv).unwrap();
    p
}

fn replay(env: &Env, trace: &Path) {
    let out = ok(run(Command::new(VMT)
        .args(["bench", "replay", "--json", "--trace"])
        .arg(trace)
        .args(["--export", env.export_sock("img").to_str().unwrap()])));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["read_errors"], 0, "{out}");
}

#[test]
fn guest_wait_histogram_counts_exactly_the_reads_that_missed() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 32 << 20, 5);
    let origin = ShapedOrigin::start(&img, "100mbit");
    let manifest = env.path("img.manifest");
    let file_uri = format!("file://{}", img.display());
    ok(run(Command::new(VMT)
        .args(["image", "manifest", &file_uri, "-o", manifest.to_str().unwrap()])
        .args(["--chunk-size", "64KiB"])));
    let port = free_port();
    let head = format!("metrics_listen = \"127.0.0.1:{port}\"\nauto_record = false");
    let images =
        format!("[[image]]\nname = \"img\"\norigin = \"{}\"\nmanifest = \"{}\"\n", origin.uri, manifest.display());
    let cfg = env.config(&head, &images);
    let mut vmtd = start_vmtd(&env, &cfg);
    let waits = |what: &str| {
        let scrape = http_get(port, "/metrics").expect("metrics answer");
        let series = format!("vmthunder_guest_read_seconds_count{{image=\"img\",outcome=\"{what}\"}}");
        sample(&scrape, &series).unwrap_or_else(|| panic!("no {series} in\n{scrape}")) as u64
    };

    // A cold cache: every read of the first trace misses (each chunk once), and is recorded
    // into a boot profile.
    let first: Vec<u64> = (0..150).map(|i| 2 * i).collect();
    let sock = env.control_sock();
    ok(run(Command::new(VMT_PROFILE).arg("--socket").arg(&sock).args(["record", "--image", "img"])));
    replay(&env, &trace(&env, "first.csv", &first));
    ok(run(Command::new(VMT_PROFILE).arg("--socket").arg(&sock).args(["stop", "--image", "img"])));
    assert_eq!((waits("origin"), waits("hit"), waits("peer"), waits("error")), (150, 0, 0, 0));
    let s = status(&env, "img");
    assert_eq!((s.reads, s.reads_waited, s.waits.origin.count()), (150, 150, 150), "{s:?}");
    // Waited reads crossed the shaped link: none was as fast as a cache hit.
    assert_eq!(s.waits.origin.counts[0], 0, "{s:?}");
    wait_until("the first trace's chunks cached", Duration::from_secs(30), || {
        status(&env, "img").chunks_present == 150
    });

    // Half cached, half new: exactly the new half waits.
    let second: Vec<u64> = (0..150).map(|i| if i % 2 == 0 { 2 * i } else { 2 * i + 1 }).collect();
    replay(&env, &trace(&env, "second.csv", &second));
    assert_eq!((waits("origin"), waits("hit")), (150 + 75, 75));
    let s = status(&env, "img");
    assert_eq!(s.reads_waited, 225, "{s:?}");
    assert_eq!(s.bytes_from_cache, 75 * 4096, "{s:?}");

    // A fresh cache warmed from the profile: the first trace again waits for nothing.
    assert_eq!(vmtd.terminate(), Some(0));
    std::fs::remove_dir_all(env.path("cache")).unwrap();
    let _vmtd = start_vmtd(&env, &cfg);
    ok(run(Command::new(VMT_PREFETCH).arg("--socket").arg(&sock).args(["warm", "--image", "img"])));
    // The prefetch reports done once every chunk was handed out; each is stored right after.
    wait_until("the profile's chunks cached", Duration::from_secs(30), || status(&env, "img").chunks_present == 150);
    replay(&env, &trace(&env, "again.csv", &first));
    assert_eq!((waits("origin"), waits("peer"), waits("hit")), (0, 0, 150));
}

#[test]
fn systemd_hears_ready_only_once_exports_listen_then_watchdog_pings() {
    let env = Env::new();
    let img = env.path("img.raw");
    // Big enough that building its manifest at start takes a while before the export listens.
    write_image(&img, 256 << 20, 3);
    let cfg = env.config("", &file_image("img", &img, ""));
    let notify = env.path("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log = std::fs::File::create(env.path("vmtd.log")).unwrap();
    let child = Command::new(VMTD)
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut vmtd = Proc { child: Some(child), name: "vmtd".into() };
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification within 60 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    // At the moment READY arrives the export takes NBD clients.
    let mut c = Raw::connect(&env.export_sock("img"));
    assert_eq!(&c.recv(8), b"NBDMAGIC");
    assert!(first.contains("READY=1") && first.contains("STATUS=serving 1 images"), "{first}");
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        if recv().contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    // Pings come at half the interval: 5 of them take about 0.5 s, far less than 60 s.
    assert!(start.elapsed() < Duration::from_secs(30));
    let _ = nix_kill(vmtd.pid(), libc::SIGTERM);
    loop {
        if recv().contains("STOPPING=1") {
            break;
        }
    }
    wait_until("vmtd exit", Duration::from_secs(30), || !vmtd.alive());
}

fn nix_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: sending a signal to a child of this test.
    unsafe { libc::kill(pid, sig) }
}

#[test]
fn scrapers_that_never_read_or_send_cannot_block_vmtd() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 8 << 20, 4);
    let port = free_port();
    let cfg = env.config(&format!("metrics_listen = \"127.0.0.1:{port}\""), &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    // Ready a moment after its control socket is (the image opened): waited for, not assumed.
    wait_until("vmtd ready", Duration::from_secs(30), || http_get(port, "/readyz").is_some());
    // Clients that ask and never read, and clients that never even ask: more than the
    // endpoint's connection slots.
    let mut stuck = Vec::new();
    for i in 0..80 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { continue };
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        }
        stuck.push(s);
    }
    // Guests and the control socket are served meanwhile.
    assert!(qemu_io_read(&env.export_uri("img"), 0, 1 << 20));
    assert_eq!(status(&env, "img").reads, 1);
    // And the endpoint answers again once the stuck clients time out, while they stay open.
    let start = Instant::now();
    wait_until("a scrape answered beside stuck clients", Duration::from_secs(60), || {
        http_get(port, "/metrics").is_some()
    });
    eprintln!("scrape answered after {:?} with {} stuck clients", start.elapsed(), stuck.len());
    assert!(qemu_io_read(&env.export_uri("img"), 1 << 20, 1 << 20));
}

#[test]
fn bad_metrics_listen_is_refused_naming_the_key() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 1 << 20, 1);
    for bad in ["\"localhost\"", "\"1.2.3.4\"", "\"127.0.0.1:99999\"", "9477"] {
        let cfg = env.config(&format!("metrics_listen = {bad}"), &file_image("img", &img, ""));
        let out = run(Command::new(VMTD).arg("--config").arg(&cfg).arg("--check"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("metrics_listen"), "{bad}: {err}");
    }
    // A port already taken: vmtd stops at start and says which address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = env.config(&format!("metrics_listen = \"{addr}\""), &file_image("img", &img, ""));
    let out = run(Command::new(VMTD).arg("--config").arg(&cfg));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("metrics listening on {addr}")), "{err}");
}

/// A tmux session, killed on drop.
struct Tmux(String);

impl Tmux {
    fn capture(&self) -> String {
        ok(run(Command::new("tmux").args(["capture-pane", "-p", "-t", &self.0])))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).status();
    }
}

#[test]
fn vmt_top_under_tmux_follows_a_replay_and_matches_status() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 64 << 20, 6);
    let cfg = env.config("", &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let session = Tmux(format!("vmtobs{}", std::process::id()));
    let top = format!("{VMT} --socket {} top --interval 300ms", env.control_sock().display());
    sh(&["tmux", "new-session", "-d", "-s", &session.0, "-x", "200", "-y", "20", &top]);
    // The SERVED and ORIGIN columns of the image's row.
    let row = || {
        let screen = session.capture();
        let line = screen.lines().find(|l| l.starts_with("img "))?.to_string();
        let cols: Vec<String> = line.split_whitespace().map(String::from).collect();
        Some((cols.get(8)?.clone(), cols.get(9)?.clone()))
    };
    wait_until("vmt top draws the image", Duration::from_secs(30), || row().is_some());
    let before = row().unwrap();
    // Read the image in the background, 1 MiB at a time, over a few seconds.
    let chunks: Vec<u64> = (0..1024).collect();
    let mut csv = String::from("t_s,op,offset,length\n");
    for (k, c) in chunks.iter().enumerate() {
        csv += &format!("{:.3},R,{},{}\n", k as f64 * 0.003, c * CHUNK, CHUNK);
    }
    std::fs::write(env.path("read.csv"), csv).unwrap();
    let mut reader = Command::new(VMT)
        .args(["bench", "replay", "--trace", env.path("read.csv").to_str().unwrap(), "--export"])
        .arg(env.export_sock("img"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while reader.try_wait().unwrap().is_none() {
        if let Some(r) = row() {
            seen.insert(r);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reader.wait().unwrap().success());
    // The view moved while the replay ran...
    seen.insert(before.clone());
    assert!(seen.len() >= 2, "vmt top never changed: {seen:?}");
    // ...and settles on what `vmt status` says.
    let s = status(&env, "img");
    assert_eq!(s.bytes_served, 64 << 20);
    let want = (vmthunder::cli::top::bytes(s.bytes_served), vmthunder::cli::top::bytes(s.bytes_from_origin));
    wait_until("vmt top shows the status totals", Duration::from_secs(30), || row().as_ref() == Some(&want));
    assert_ne!(before, want);
}
