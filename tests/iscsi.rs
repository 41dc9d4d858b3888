//! End-to-end tests of the iSCSI origin: a real tgtd (own control and portal ports, stopped on
//! drop even when a test fails) serves a test image; vmtd reads it through its initiator and
//! qemu-img, qemu-io read vmtd's export. A small fake target answers login and then lies, to
//! show hostile answers give clear errors and never reach the cache.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vmthunder::fetch::ChunkSource;
use vmthunder::iscsi::chap::Credentials;
use vmthunder::iscsi::initiator::{IscsiClient, IscsiOptions, IscsiTarget};
use vmthunder::iscsi::pdu::*;

const MIB: usize = 1 << 20;
const IQN: &str = "iqn.2026-01.org.vmthunder.test:disk";

/// A free TCP port on 127.0.0.1 (bound once, then released for the server to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// tgtd control ports: unique per test process and per call.
fn control_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        // tgtd takes control ports up to 32767.
        let n = 10000 + (std::process::id() % 2000) as u16 * 8 + NEXT.fetch_add(1, Ordering::SeqCst) % 8;
        if !Path::new(&format!("/var/run/tgtd/socket.{n}")).exists() {
            return n;
        }
    }
}

/// A tgtd instance serving one image as LUN 1 of target [`IQN`] (tid 1).
struct Tgtd {
    control: u16,
    port: u16,
    image: PathBuf,
    chap: Option<(String, String)>,
    proc: Option<Proc>,
    /// Once a client knows the portal, restarts must keep its port.
    launched: bool,
}

impl Tgtd {
    fn start(image: &Path, chap: Option<(&str, &str)>) -> Tgtd {
        let mut t = Tgtd {
            control: control_port(),
            port: free_port(),
            image: image.into(),
            chap: chap.map(|(u, p)| (u.into(), p.into())),
            proc: None,
            launched: false,
        };
        t.launch();
        t
    }

    fn adm(&self, args: &[&str]) -> std::process::Output {
        let c = self.control.to_string();
        run(Command::new("tgtadm").args(["-C", &c, "--lld", "iscsi"]).args(args))
    }

    fn adm_ok(&self, args: &[&str]) {
        let out = self.adm(args);
        assert!(out.status.success(), "tgtadm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts tgtd; if it exits at start (a port taken meanwhile), tries other ports.
    fn launch(&mut self) {
        let mut tries = 0;
        let p = loop {
            let log = std::env::temp_dir().join(format!("vmt-test-tgtd.{}.log", self.control));
            let child = Command::new("/usr/sbin/tgtd")
                .args(["-f", "-C", &self.control.to_string(), "--iscsi", &format!("portal=127.0.0.1:{}", self.port)])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("tgtd is installed (scripts/setup)");
            let mut p = Proc { child: Some(child), name: "tgtd".into() };
            let start = Instant::now();
            let up = loop {
                if !p.alive() {
                    break false;
                }
                if self.adm(&["--op", "show", "--mode", "target"]).status.success() {
                    break true;
                }
                assert!(start.elapsed() < Duration::from_secs(20), "tgtd control port not up after 20s");
                std::thread::sleep(Duration::from_millis(20));
            };
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            if up {
                break p;
            }
            tries += 1;
            assert!(tries < 5, "tgtd exited at start:\n{text}");
            eprintln!("tgtd exited at start, trying another control port:\n{text}");
            self.control = control_port();
            if !self.launched {
                self.port = free_port();
            }
        };
        self.proc = Some(p);
        self.launched = true;
        self.adm_ok(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        let img = self.image.to_str().unwrap().to_string();
        self.adm_ok(&["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", &img]);
        self.adm_ok(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]);
        if let Some((u, p)) = self.chap.clone() {
            self.adm_ok(&["--op", "new", "--mode", "account", "--user", &u, "--password", &p]);
            self.adm_ok(&["--op", "bind", "--mode", "account", "--tid", "1", "--user", &u]);
        }
        wait_until("tgtd portal", Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", self.port)).is_ok());
    }

    /// Makes the target ask for CRC32C header and data digests (tgtd's default is None, which
    /// wins over an initiator's offer).
    fn want_digests(&self) {
        for key in ["HeaderDigest", "DataDigest"] {
            self.adm_ok(&["--op", "update", "--mode", "target", "--tid", "1", "-n", key, "-v", "CRC32C,None"]);
        }
    }

    /// Stops tgtd the only way it stops (it ignores SIGTERM): target offline, deleted, then
    /// the system; SIGKILL if it is still there after that.
    fn stop(&mut self) {
        let Some(mut p) = self.proc.take() else { return };
        let _ = self.adm(&["--op", "update", "--mode", "target", "--tid", "1", "-n", "state", "-v", "offline"]);
        let _ = self.adm(&["--op", "delete", "--mode", "target", "--tid", "1", "--force"]);
        let _ = self.adm(&["--op", "delete", "--mode", "system"]);
        let start = Instant::now();
        while p.alive() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        p.kill9();
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.control));
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}.lock", self.control));
    }

    fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/1", self.port)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn secret_file(env: &Env, name: &str, secret: &str) -> PathBuf {
    let p = env.path(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `vmt image manifest URL -o FILE [--chap-user U --chap-secret-file F]`.
fn vmt_manifest(url: &str, out: &Path, chap: Option<(&str, &Path)>) -> std::process::Output {
    let mut cmd = Command::new(VMT);
    cmd.args(["image", "manifest", url, "-o", out.to_str().unwrap(), "--chunk-size", "64KiB"]);
    if let Some((u, f)) = chap {
        cmd.args(["--chap-user", u, "--chap-secret-file", f.to_str().unwrap()]);
    }
    run(cmd.env("RUST_BACKTRACE", "0"))
}

fn iscsi_image(url: &str, manifest: &Path, extra: &str) -> String {
    format!("[[image]]\nname = \"img\"\norigin = \"{url}\"\nmanifest = \"{}\"\n{extra}\n", manifest.display())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn iscsi_origin_served_identically_through_vmtd() {
    let env = Env::new();
    let img = env.path("lun.raw");
    write_image(&img, 20 * MIB + 4096, 11);
    let tgtd = Tgtd::start(&img, None);

    let manifest = env.path("img.manifest");
    let out = vmt_manifest(&tgtd.url(), &manifest, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The manifest read over iSCSI equals the one read from the file itself.
    let from_file = env.path("file.manifest");
    let out = vmt_manifest(&format!("file://{}", img.display()), &from_file, None);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&manifest).unwrap(), std::fs::read(&from_file).unwrap());

    // With both digests offered and wanted by the target, every PDU of the session carries
    // CRC32C.
    tgtd.want_digests();
    let digests = "iscsi_header_digest = true\niscsi_data_digest = true";
    let cfg = env.config("", &iscsi_image(&tgtd.url(), &manifest, digests));
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    assert!(qemu_img_identical(&img, &uri), "vmtd export differs from the LUN's file");
    let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
    let login = log.lines().find(|l| l.contains("logged in to iSCSI target")).expect("a login line");
    assert!(login.contains("header_digest=true data_digest=true"), "digests not in force: {login}");
    let s = settled(&env, "img");
    assert_eq!(s.chunks_present, s.chunks_total);
    assert_eq!(s.verify_failures, 0);
    assert!(s.bytes_from_origin >= 20 * MIB as u64);
}

#[test]
fn digests_and_unaligned_reads_against_tgtd() {
    let env = Env::new();
    let img = env.path("lun.raw");
    let data = write_image(&img, 4 * MIB, 12);
    let tgtd = Tgtd::start(&img, None);
    tgtd.want_digests();
    let target = IscsiTarget { host: "127.0.0.1".into(), port: tgtd.port, iqn: IQN.into(), lun: 1 };
    let opts = IscsiOptions { credentials: None, digests: Digests { header: true, data: true } };
    let client = IscsiClient::new(target, opts);
    rt().block_on(async {
        assert_eq!(client.size().await.unwrap(), data.len() as u64);
        // Unaligned ranges are rounded out to blocks and sliced back.
        for (off, len) in [(0u64, 4096usize), (1, 1), (511, 2), (1000, 70_000), (3 * MIB as u64 + 7, MIB - 7)] {
            let got = client.read(off, len).await.unwrap();
            assert_eq!(got, &data[off as usize..off as usize + len], "{off}+{len}");
        }
        // One read far larger than MaxBurstLength is split and pipelined.
        assert_eq!(client.read(0, data.len()).await.unwrap(), data);
        let e = client.read(data.len() as u64 - 1, 2).await.unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
        client.shutdown().await;
    });
}

#[test]
fn chap_right_secret_works_wrong_secret_is_refused() {
    let env = Env::new();
    let img = env.path("lun.raw");
    write_image(&img, 4 * MIB, 13);
    let tgtd = Tgtd::start(&img, Some(("vmtuser", "correct-horse-12")));
    let good = secret_file(&env, "good.secret", "correct-horse-12");
    let bad = secret_file(&env, "bad.secret", "wrong-horse-123");

    let manifest = env.path("img.manifest");
    let out = vmt_manifest(&tgtd.url(), &manifest, Some(("vmtuser", &good)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let m2 = env.path("bad.manifest");
    let out = vmt_manifest(&tgtd.url(), &m2, Some(("vmtuser", &bad)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("authentication failed"), "{err}");
    assert!(!err.contains("wrong-horse"), "the secret must never be printed: {err}");
    assert!(!m2.exists());
    let out = vmt_manifest(&tgtd.url(), &m2, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("requires CHAP"), "{err}");
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = vmt_manifest(&tgtd.url(), &m2, Some(("vmtuser", &good)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("0644"), "{err}");
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();

    // vmtd with the right secret serves the image; with the wrong one, reads fail and nothing
    // reaches the cache.
    let chap = |f: &Path| format!("chap_user = \"vmtuser\"\nchap_secret_file = \"{}\"", f.display());
    let cfg = env.config("fetch_timeout = \"2s\"", &iscsi_image(&tgtd.url(), &manifest, &chap(&good)));
    let mut vmtd = start_vmtd(&env, &cfg);
    assert!(qemu_img_identical(&img, &env.export_uri("img")));
    assert_eq!(vmtd.terminate(), Some(0));

    let env2 = Env::new();
    let cfg = env2.config("fetch_timeout = \"2s\"", &iscsi_image(&tgtd.url(), &manifest, &chap(&bad)));
    let _vmtd = start_vmtd(&env2, &cfg);
    assert!(!qemu_io_read(&env2.export_uri("img"), 0, 65536), "a wrong secret must give no data");
    let s = status(&env2, "img");
    assert_eq!((s.chunks_present, s.bytes_from_origin), (0, 0));
    let log = std::fs::read_to_string(env2.path("vmtd.log")).unwrap();
    assert!(log.contains("authentication failed"), "vmtd log names the cause:\n{log}");
    assert!(!log.contains("wrong-horse"));
}

#[test]
fn tgtd_restart_mid_read_recovers_without_a_wrong_byte() {
    let env = Env::new();
    let img = env.path("lun.raw");
    write_image(&img, 32 * MIB, 14);
    let mut tgtd = Tgtd::start(&img, None);
    let manifest = env.path("img.manifest");
    assert!(vmt_manifest(&tgtd.url(), &manifest, None).status.success());
    let cfg = env.config("fetch_timeout = \"30s\"", &iscsi_image(&tgtd.url(), &manifest, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let uri = env.export_uri("img");
    let half = 16 * MIB as u64;
    assert!(qemu_io_read(&uri, 0, half), "first half readable");

    // Target gone: the session vmtd holds dies under it. Cached reads go on.
    tgtd.stop();
    assert!(qemu_io_read(&uri, 0, half), "cached half keeps working with the target down");
    // A full compare starts while the target is down and must finish once it is back.
    let (img2, uri2) = (img.clone(), uri.clone());
    let compare = std::thread::spawn(move || qemu_img_identical(&img2, &uri2));
    std::thread::sleep(Duration::from_secs(2));
    tgtd.launch();
    assert!(compare.join().unwrap(), "data after the restart differs");
    let s = settled(&env, "img");
    assert_eq!(s.chunks_present, s.chunks_total);
    assert_eq!(s.verify_failures, 0);
    assert!(s.retries > 0, "reads were retried across the outage: {s:?}");

    // And a restart with reads in flight: a fresh cache, tgtd restarted while qemu-img reads.
    let env2 = Env::new();
    let cfg = env2.config("fetch_timeout = \"30s\"", &iscsi_image(&tgtd.url(), &manifest, ""));
    let _vmtd2 = start_vmtd(&env2, &cfg);
    let (img2, uri2) = (img.clone(), env2.export_uri("img"));
    let compare = std::thread::spawn(move || qemu_img_identical(&img2, &uri2));
    std::thread::sleep(Duration::from_millis(150));
    tgtd.restart();
    assert!(compare.join().unwrap(), "data read across a restart differs");
    assert_eq!(status(&env2, "img").verify_failures, 0);
}

/// How the fake target lies once logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// A Data-In longer than the read asked for.
    Overrun,
    /// A Data-In whose length field promises more than is sent, then the connection closes.
    Truncated,
    /// A data segment length beyond anything negotiated.
    HugeSegment,
    /// Well-formed answers with the wrong bytes.
    WrongData,
    /// A Data-In with a bad data digest (digests negotiated).
    BadDigest,
    /// A sense-data length past the end of the SCSI Response.
    BadSense,
    /// Answers READ with CHECK CONDITION (medium error).
    MediumError,
    /// Rejects every READ (command not supported).
    Reject,
    /// Asks for a logout (asynchronous event 1) instead of answering READ.
    AsyncLogout,
    /// No lie: honest zero blocks, each READ preceded by a NOP-In ping that must be answered.
    Pings,
}

/// NOP-Outs received that answered the fake target's pings (TTT [`PING_TTT`]).
static PINGS_ANSWERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const PING_TTT: u32 = 0x1234_5678;

const FAKE_BLOCKS: u64 = 2048; // 1 MiB of 512-byte blocks

/// Serves logins on `listener` and lies as told; one thread per connection.
fn fake_target(listener: TcpListener, lie: Lie) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = fake_session(conn, lie);
            });
        }
    });
}

fn read_pdu_sync(s: &mut TcpStream, d: Digests) -> std::io::Result<Pdu> {
    let mut bhs = [0u8; BHS_LEN];
    s.read_exact(&mut bhs)?;
    let f = Frame::of(&bhs, d).map_err(std::io::Error::other)?;
    let mut rest = vec![0u8; f.rest_len];
    s.read_exact(&mut rest)?;
    Pdu::decode(&bhs, &rest, d).map_err(std::io::Error::other)
}

fn target_pdu(op: u8, itt: u32, stat_sn: u32, exp_cmd_sn: u32) -> Pdu {
    let mut p = Pdu::new(op);
    p.set_u32(16, itt);
    p.set_u32(24, stat_sn);
    p.set_u32(28, exp_cmd_sn);
    p.set_u32(32, exp_cmd_sn.wrapping_add(31));
    p
}

fn fake_session(mut s: TcpStream, lie: Lie) -> std::io::Result<()> {
    let none = Digests::default();
    let digests = if lie == Lie::BadDigest { Digests { header: false, data: true } } else { none };
    let mut stat_sn = 0u32;
    // Login: answer the security stage, then the operational stage, then full feature.
    loop {
        let req = read_pdu_sync(&mut s, none)?;
        let csg = (req.flags() >> 2) & 3;
        let mut r = target_pdu(OP_LOGIN_RSP, req.itt(), stat_sn, req.u32_at(24));
        stat_sn += 1;
        r.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        r.bhs[14..16].copy_from_slice(&7u16.to_be_bytes());
        if csg == STAGE_SECURITY {
            r.bhs[1] = 0x80 | 0x01; // T, CSG 0, NSG 1
            r.data = b"AuthMethod=None\0".to_vec();
            s.write_all(&r.encode(none))?;
        } else {
            r.bhs[1] = 0x80 | (1 << 2) | 3; // T, CSG 1, NSG 3
            let dd = if digests.data { "CRC32C" } else { "None" };
            r.data = format!("HeaderDigest=None\0DataDigest={dd}\0MaxBurstLength=262144\0MaxRecvDataSegmentLength=65536\0ErrorRecoveryLevel=0\0").into_bytes();
            s.write_all(&r.encode(none))?;
            break;
        }
    }
    loop {
        let cmd = read_pdu_sync(&mut s, digests)?;
        if cmd.opcode() == OP_NOP_OUT && cmd.itt() == RESERVED_TAG && cmd.u32_at(20) == PING_TTT {
            PINGS_ANSWERED.fetch_add(1, Ordering::SeqCst);
        }
        if cmd.opcode() != OP_SCSI_CMD {
            continue;
        }
        let (itt, sn, len) = (cmd.itt(), cmd.u32_at(24).wrapping_add(1), cmd.u32_at(20));
        let cdb = &cmd.bhs[32..48];
        let data_in = |data: Vec<u8>, stat_sn: u32| {
            let mut p = target_pdu(OP_DATA_IN, itt, stat_sn, sn);
            p.bhs[1] = 0x81; // F, S
            p.data = data;
            p
        };
        let reply = match cdb[0] {
            0x00 => {
                let mut p = target_pdu(OP_SCSI_RSP, itt, stat_sn, sn);
                p.bhs[1] = 0x80;
                p
            }
            0x12 => data_in(vec![0u8; len.min(96) as usize], stat_sn),
            0x9e => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&(FAKE_BLOCKS - 1).to_be_bytes());
                d[8..12].copy_from_slice(&512u32.to_be_bytes());
                data_in(d, stat_sn)
            }
            0x88 => match lie {
                Lie::Overrun => data_in(vec![0u8; len as usize + 512], stat_sn),
                Lie::WrongData => data_in(vec![0x5a; len as usize], stat_sn),
                Lie::Truncated => {
                    let w = data_in(vec![0u8; len as usize], stat_sn).encode(digests);
                    s.write_all(&w[..w.len() / 2])?;
                    return Ok(()); // and close
                }
                Lie::HugeSegment => {
                    let mut w = data_in(vec![0u8; 4], stat_sn).encode(digests);
                    w[5..8].copy_from_slice(&[0xff, 0xff, 0xf0]);
                    s.write_all(&w)?;
                    continue;
                }
                Lie::BadDigest => {
                    let mut w = data_in(vec![0u8; len as usize], stat_sn).encode(digests);
                    let n = w.len();
                    w[n - 1] ^= 0xff;
                    s.write_all(&w)?;
                    continue;
                }
                Lie::BadSense => {
                    let mut p = target_pdu(OP_SCSI_RSP, itt, stat_sn, sn);
                    p.bhs[1] = 0x80;
                    p.bhs[3] = 0x02;
                    p.data = vec![0x10, 0x00, 0x70, 0x00];
                    p
                }
                Lie::Reject => {
                    let mut p = target_pdu(OP_REJECT, RESERVED_TAG, stat_sn, sn);
                    p.bhs[2] = 0x05;
                    p.data = cmd.bhs.to_vec();
                    p
                }
                Lie::AsyncLogout => {
                    let mut p = target_pdu(OP_ASYNC, RESERVED_TAG, stat_sn, sn);
                    p.bhs[36] = 1;
                    p
                }
                Lie::Pings => {
                    let mut ping = target_pdu(OP_NOP_IN, RESERVED_TAG, stat_sn, sn);
                    ping.set_u64(8, cmd.u64_at(8));
                    ping.set_u32(20, PING_TTT);
                    s.write_all(&ping.encode(digests))?;
                    data_in(vec![0u8; len as usize], stat_sn)
                }
                Lie::MediumError => {
                    let mut p = target_pdu(OP_SCSI_RSP, itt, stat_sn, sn);
                    p.bhs[1] = 0x80;
                    p.bhs[3] = 0x02;
                    let mut sense = vec![0u8; 18];
                    (sense[0], sense[2], sense[12]) = (0x70, 0x03, 0x11);
                    p.data = [&[0u8, 18][..], &sense].concat();
                    p
                }
            },
            _ => {
                let mut p = target_pdu(OP_SCSI_RSP, itt, stat_sn, sn);
                p.bhs[1] = 0x80;
                p
            }
        };
        stat_sn += 1;
        s.write_all(&reply.encode(digests))?;
    }
}

#[test]
fn hostile_target_answers_give_clear_errors_and_nothing_cached() {
    let cases = [
        (Lie::Overrun, "overruns"),
        (Lie::Truncated, "truncated PDU"),
        (Lie::HugeSegment, "exceeds"),
        (Lie::BadDigest, "data digest mismatch"),
        (Lie::BadSense, "sense length"),
        (Lie::MediumError, "MEDIUM ERROR"),
        (Lie::Reject, "command not supported"),
        (Lie::AsyncLogout, "asynchronous event 1"),
        (Lie::WrongData, ""),
        (Lie::Pings, ""),
    ];
    let rt = rt();
    for (lie, want) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        fake_target(listener, lie);
        let target = IscsiTarget { host: "127.0.0.1".into(), port, iqn: IQN.into(), lun: 1 };
        let digests = Digests { header: false, data: lie == Lie::BadDigest };
        let client = IscsiClient::new(target, IscsiOptions { credentials: None, digests });
        let got = rt.block_on(async {
            assert_eq!(client.size().await.unwrap(), FAKE_BLOCKS * 512);
            tokio::time::timeout(Duration::from_secs(30), client.read(0, 65536)).await.expect("no hang")
        });
        match lie {
            Lie::WrongData => assert_eq!(got.unwrap(), vec![0x5a; 65536]),
            Lie::Pings => {
                assert_eq!(got.unwrap(), vec![0; 65536]);
                wait_until("NOP-Out answers", Duration::from_secs(10), || PINGS_ANSWERED.load(Ordering::SeqCst) > 0);
            }
            _ => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(want), "{lie:?}: {e}");
            }
        }
    }

    // Through vmtd: the manifest describes the real image, the fake target lies; reads fail,
    // vmtd stays up, and no chunk is cached.
    for lie in [Lie::WrongData, Lie::Overrun, Lie::Truncated] {
        let env = Env::new();
        let img = env.path("real.raw");
        write_image(&img, FAKE_BLOCKS as usize * 512, 15);
        let manifest = env.path("img.manifest");
        assert!(vmt_manifest(&format!("file://{}", img.display()), &manifest, None).status.success());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        fake_target(listener, lie);
        let url = format!("iscsi://127.0.0.1:{port}/{IQN}/1");
        let cfg = env.config("fetch_timeout = \"2s\"", &iscsi_image(&url, &manifest, ""));
        let mut vmtd = start_vmtd(&env, &cfg);
        assert!(!qemu_io_read(&env.export_uri("img"), 0, 65536), "{lie:?}: a lying target must give EIO");
        assert!(vmtd.alive());
        let s = status(&env, "img");
        assert_eq!(s.chunks_present, 0, "{lie:?}: nothing cached: {s:?}");
        if lie == Lie::WrongData {
            assert!(s.verify_failures > 0, "{s:?}");
        }
    }
}

#[test]
fn credentials_are_never_in_the_debug_output() {
    let c = Credentials::new("u", "topsecret-value");
    let o = IscsiOptions { credentials: Some(c), digests: Digests::default() };
    assert!(!format!("{o:?}").contains("topsecret"));
}
