//! Test harness: temp dirs, generated images, and real processes (vmtd, qemu-nbd, qemu-img,
//! qemu-io, nbdinfo) started with unique paths and killed on drop, even when a test fails.
#![allow(dead_code)]

pub mod cluster;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmthunder::daemon::control::{self, ImageStatus, Request, Response};

pub const VMTD: &str = env!("CARGO_BIN_EXE_vmtd");
pub const VMT: &str = env!("CARGO_BIN_EXE_vmt");

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic image content: pseudo-random bytes with some all-zero chunks (holes).
pub fn image_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = vec![0u8; size];
    for (i, block) in out.chunks_mut(64 << 10).enumerate() {
        if i % 7 == 3 {
            continue;
        }
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    out
}

pub fn write_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = image_bytes(size, seed);
    std::fs::write(path, &data).unwrap();
    data
}

/// A test's private directory tree.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Env { dir: tempfile::Builder::new().prefix("vmt-test-").tempdir().unwrap() }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.path("run")
    }
    pub fn export_sock(&self, name: &str) -> PathBuf {
        self.run_dir().join("exports").join(format!("{name}.sock"))
    }
    pub fn export_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.export_sock(name).display())
    }
    pub fn control_sock(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    /// A config with the standard directories and `extra` appended (image sections, tuning).
    pub fn config(&self, head: &str, images: &str) -> PathBuf {
        let text = format!(
            "run_dir = \"{}\"\ncache_dir = \"{}\"\nprofile_dir = \"{}\"\n{head}\n{images}",
            self.run_dir().display(),
            self.path("cache").display(),
            self.path("profiles").display()
        );
        let p = self.path("vmtd.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub fn file_image(name: &str, path: &Path, extra: &str) -> String {
    format!("[[image]]\nname = \"{name}\"\norigin = \"file://{}\"\n{extra}\n", path.display())
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// SIGTERM and wait (bounded); returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} ignored SIGTERM for 20s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts vmtd on `config` and waits until its control socket answers.
pub fn start_vmtd(env: &Env, config: &Path) -> Proc {
    start_vmtd_with(env, config, &[])
}

/// [`start_vmtd`] with extra environment variables.
pub fn start_vmtd_with(env: &Env, config: &Path, vars: &[(&str, &str)]) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(env.path("vmtd.log")).unwrap();
    let child = Command::new(VMTD)
        .arg("--config")
        .arg(config)
        .env("VMT_LOG", "info")
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut p = Proc { child: Some(child), name: "vmtd".into() };
    let sock = env.control_sock();
    wait_until("vmtd control socket", Duration::from_secs(60), || {
        assert!(
            p.alive(),
            "vmtd exited at start; log:\n{}",
            std::fs::read_to_string(env.path("vmtd.log")).unwrap_or_default()
        );
        try_status(&sock).is_some()
    });
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub fn call(sock: &Path, req: Request) -> Result<Response, control::ControlError> {
    rt().block_on(control::call(sock, &req, Duration::from_secs(30)))
}

pub fn try_status(sock: &Path) -> Option<Vec<ImageStatus>> {
    match call(sock, Request::Status) {
        Ok(Response::Status { images, .. }) => Some(images),
        _ => None,
    }
}

/// Status once every started fetch of `image` is stored (stores follow the readers' replies).
pub fn settled(env: &Env, image: &str) -> ImageStatus {
    wait_until("fetches stored", Duration::from_secs(30), || status(env, image).fetching == 0);
    status(env, image)
}

pub fn status(env: &Env, image: &str) -> ImageStatus {
    try_status(&env.control_sock())
        .expect("vmtd answers status")
        .into_iter()
        .find(|i| i.name == image)
        .unwrap_or_else(|| panic!("image {image} not served"))
}

/// Starts `qemu-nbd` serving `file` read-only at `sock` as export `img`, many clients allowed.
pub fn start_qemu_nbd(file: &Path, sock: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-e", "0", "-x", "img", "-f", "raw", "--socket"])
        .arg(sock)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd is installed (scripts/setup)");
    let p = Proc { child: Some(child), name: "qemu-nbd".into() };
    wait_until("qemu-nbd socket", Duration::from_secs(20), || UnixStream::connect(sock).is_ok());
    p
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

/// Runs a client command with a time limit (NBD clients have no I/O timeout of their own).
pub fn run_limited(secs: u32, prog: &str, args: &[&str]) -> Output {
    run(Command::new("timeout").arg(secs.to_string()).arg(prog).args(args))
}

/// `qemu-img compare` of a raw file with an NBD URI: true when identical.
pub fn qemu_img_identical(file: &Path, uri: &str) -> bool {
    let out = run_limited(120, "qemu-img", &["compare", "-f", "raw", "-F", "raw", file.to_str().unwrap(), uri]);
    if !out.status.success() {
        eprintln!("qemu-img compare: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

/// `qemu-io` read of `len` bytes at `off` through `uri`: true on success.
pub fn qemu_io_read(uri: &str, off: u64, len: u64) -> bool {
    let cmd = format!("read {off} {len}");
    let out = run_limited(120, "qemu-io", &["-r", "-f", "raw", "-c", &cmd, uri]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out.status.success() && !text.contains("failed")
}

/// A raw byte-level connection to a unix socket, for malformed-input tests.
pub struct Raw(pub UnixStream);

impl Raw {
    pub fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }
    pub fn send(&mut self, b: &[u8]) {
        let _ = self.0.write_all(b);
    }
    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    /// True when the peer closed the connection (read returns 0 or an error).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return true,
                Ok(_) => continue,
            }
        }
    }
}

/// An image served by `qemu-nbd` as an NBD origin, its manifest, and a config serving it as
/// image `img` (with `head` on top): returns the image file, the origin process and the config.
pub fn nbd_origin_setup(env: &Env, size: usize, head: &str) -> (std::path::PathBuf, Proc, std::path::PathBuf) {
    let img = env.path("origin.raw");
    write_image(&img, size, 2);
    let osock = env.path("origin.sock");
    let origin = start_qemu_nbd(&img, &osock);
    let ouri = format!("nbd+unix:///img?socket={}", osock.display());
    let manifest = env.path("img.manifest");
    let out = run(Command::new(VMT).args([
        "image",
        "manifest",
        &ouri,
        "-o",
        manifest.to_str().unwrap(),
        "--chunk-size",
        "64KiB",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let images = format!("[[image]]\nname = \"img\"\norigin = \"{ouri}\"\nmanifest = \"{}\"\n", manifest.display());
    let cfg = env.config(head, &images);
    (img, origin, cfg)
}

/// An NBD client of export `name`, past its handshake (OPT_GO), ready for requests.
pub fn nbd_transmitting(env: &Env, name: &str) -> Raw {
    use vmthunder::nbd::proto::*;
    let mut c = Raw::connect(&env.export_sock(name));
    c.recv(GREETING_LEN);
    c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    let req = InfoRequest { name: name.into(), infos: vec![] }.encode();
    c.send(&OptionHeader { option: OPT_GO, len: req.len() as u32 }.encode());
    c.send(&req);
    loop {
        let h = OptionReplyHeader::parse(&c.recv(OPTION_REPLY_HEADER_LEN).try_into().unwrap()).unwrap();
        c.recv(h.len as usize);
        if h.reply != REP_INFO {
            assert_eq!(h.reply, REP_ACK);
            return c;
        }
    }
}

/// Reads `length` bytes at `offset` (simple reply, no error expected).
pub fn nbd_read(c: &mut Raw, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    use vmthunder::nbd::proto::{SimpleReply, CMD_READ, SIMPLE_REPLY_LEN};
    c.send(&vmthunder::nbd::proto::Request { flags: 0, command: CMD_READ, handle, offset, length }.encode());
    let r = SimpleReply::parse(&c.recv(SIMPLE_REPLY_LEN).try_into().unwrap()).unwrap();
    assert_eq!((r.handle, r.error), (handle, 0));
    c.recv(length as usize)
}

/// The number of the last `VMT-LOOP n SHA` line the readloop guest finished printing (0 before
/// the first).
pub fn last_loop(console: &str) -> u32 {
    finished_loops(console)
        .iter()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "VMT-LOOP").nth(1)?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Whether the readloop guest has finished loop `n`; panics with the console as soon as the
/// guest reports an error, rather than waiting out the caller's limit.
pub fn finished_loop(console: &str, n: u32) -> bool {
    assert!(!console.contains("VMT-ERROR"), "the guest failed:\n{console}");
    last_loop(console) >= n
}

/// The guest's `VMT-LOOP` lines it has finished printing: a console read can end in the middle
/// of the last one, whose checksum is then cut short.
pub fn finished_loops(console: &str) -> Vec<&str> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains("VMT-LOOP"))
        .map(|l| l.trim_end_matches(['\n', '\r']))
        .collect()
}

/// `GET path` on the metrics endpoint: the body of a 200 answer, or `None`.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of one sample line (`name{labels} value`) of a scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
