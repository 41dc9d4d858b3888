//! Hostile and malformed input: NBD handshakes and requests, control frames, configs. Each
//! must get a clear error or an error reply, affect only its own connection, and never take the
//! daemon down.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vmthunder::daemon::control::{self, Response};
use vmthunder::nbd::proto::*;

fn serve_one(env: &Env) -> (Proc, std::path::PathBuf, Vec<u8>) {
    let img = env.path("img.raw");
    let data = write_image(&img, 1 << 20, 9);
    let cfg = env.config("", &file_image("img", &img, ""));
    (start_vmtd(env, &cfg), img, data)
}

fn greet(env: &Env) -> Raw {
    let mut c = Raw::connect(&env.export_sock("img"));
    let g: [u8; GREETING_LEN] = c.recv(GREETING_LEN).try_into().unwrap();
    assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    c
}

fn send_option(c: &mut Raw, option: u32, data: &[u8]) {
    c.send(&OptionHeader { option, len: data.len() as u32 }.encode());
    c.send(data);
}

/// Reads option replies up to the final one; returns its type and the INFO payloads seen.
fn option_replies(c: &mut Raw) -> (u32, Vec<Vec<u8>>) {
    let mut infos = Vec::new();
    loop {
        let h: [u8; OPTION_REPLY_HEADER_LEN] = c.recv(OPTION_REPLY_HEADER_LEN).try_into().unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let data = c.recv(h.len as usize);
        if h.reply == REP_INFO || h.reply == REP_SERVER {
            infos.push(data);
            continue;
        }
        return (h.reply, infos);
    }
}

fn go(c: &mut Raw, name: &str) -> u32 {
    send_option(c, OPT_GO, &InfoRequest { name: name.into(), infos: vec![INFO_BLOCK_SIZE] }.encode());
    option_replies(c).0
}

fn request(c: &mut Raw, command: u16, handle: u64, offset: u64, length: u32) {
    c.send(&Request { flags: 0, command, handle, offset, length }.encode());
}

fn simple_reply(c: &mut Raw) -> SimpleReply {
    SimpleReply::parse(&c.recv(SIMPLE_REPLY_LEN).try_into().unwrap()).unwrap()
}

fn transmitting(env: &Env) -> Raw {
    let mut c = greet(env);
    c.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    assert_eq!(go(&mut c, "img"), REP_ACK);
    c
}

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let env = Env::new();
    let (mut vmtd, img, _) = serve_one(&env);

    let mut c = greet(&env);
    c.send(&0x80u32.to_be_bytes());
    assert!(c.closed(), "unknown client flags");

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&[0x42; 16]);
    assert!(c.closed(), "bad option magic");

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&OptionHeader { option: OPT_GO, len: 1 << 30 }.encode());
    assert!(c.closed(), "huge option length");

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    send_option(&mut c, OPT_EXPORT_NAME, b"no-such-export");
    assert!(c.closed(), "unknown export by name");

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c); // truncated frame, then gone

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    send_option(&mut c, 99, b"whatever");
    assert_eq!(option_replies(&mut c).0, REP_ERR_UNSUP);
    assert_eq!(go(&mut c, "nope"), REP_ERR_UNKNOWN);
    send_option(&mut c, OPT_GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(option_replies(&mut c).0, REP_ERR_INVALID);
    send_option(&mut c, OPT_LIST, b"junk");
    assert_eq!(option_replies(&mut c).0, REP_ERR_INVALID);
    send_option(&mut c, OPT_LIST, b"");
    let (last, entries) = option_replies(&mut c);
    assert_eq!((last, entries), (REP_ACK, vec![list_entry("img")]));
    send_option(&mut c, OPT_INFO, &InfoRequest { name: "img".into(), infos: vec![] }.encode());
    let (last, infos) = option_replies(&mut c);
    assert_eq!(last, REP_ACK);
    let (size, flags) = parse_info_export(&infos[0]).unwrap();
    assert_eq!(size, 1 << 20);
    assert!(flags & TF_READ_ONLY != 0 && flags & TF_CAN_MULTI_CONN != 0);
    assert_eq!(go(&mut c, ""), REP_ACK, "default export name");
    request(&mut c, CMD_READ, 1, 0, 512);
    assert_eq!(simple_reply(&mut c), SimpleReply { error: 0, handle: 1 });

    let mut c = greet(&env);
    c.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    send_option(&mut c, OPT_ABORT, b"");
    assert_eq!(option_replies(&mut c).0, REP_ACK);
    assert!(c.closed());

    assert!(vmtd.alive());
    assert!(qemu_img_identical(&img, &env.export_uri("img")));
}

#[test]
fn bad_requests_get_error_replies_and_writes_are_refused() {
    let env = Env::new();
    let (mut vmtd, img, data) = serve_one(&env);
    let mut c = transmitting(&env);

    // A write is refused and its payload drained: the next request is read in sync.
    request(&mut c, CMD_WRITE, 10, 0, 4096);
    c.send(&[0xAA; 4096]);
    assert_eq!(simple_reply(&mut c), SimpleReply { error: EPERM, handle: 10 });
    request(&mut c, CMD_READ, 11, 4096, 4096);
    assert_eq!(simple_reply(&mut c), SimpleReply { error: 0, handle: 11 });
    assert_eq!(c.recv(4096), &data[4096..8192]);

    for (cmd, handle, off, len, want) in [
        (CMD_TRIM, 20, 0, 4096, EPERM),
        (CMD_WRITE_ZEROES, 21, 0, 4096, EPERM),
        (42, 22, 0, 4096, EINVAL),
        (CMD_READ, 23, (1 << 20) - 100, 200, EINVAL),
        (CMD_READ, 24, u64::MAX - 10, 100, EINVAL),
        (CMD_READ, 25, 0, 0, EINVAL),
        (CMD_READ, 26, 0, MAX_PAYLOAD + 1, EINVAL),
        (CMD_FLUSH, 27, 0, 0, 0),
    ] {
        request(&mut c, cmd, handle, off, len);
        assert_eq!(simple_reply(&mut c), SimpleReply { error: want, handle }, "command {cmd} off {off} len {len}");
    }

    // Many reads in flight on one connection: every handle answered once, data right.
    for h in 0..64u64 {
        request(&mut c, CMD_READ, 100 + h, h * 8192, 8192);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let r = simple_reply(&mut c);
        assert_eq!(r.error, 0);
        let h = r.handle - 100;
        assert!(seen.insert(h));
        assert_eq!(c.recv(8192), &data[(h * 8192) as usize..(h * 8192 + 8192) as usize]);
    }

    request(&mut c, CMD_DISC, 99, 0, 0);
    assert!(c.closed(), "DISC ends the connection");

    let mut c = transmitting(&env);
    request(&mut c, CMD_WRITE, 1, 0, u32::MAX);
    assert!(c.closed(), "write payload beyond the limit");

    let mut c = transmitting(&env);
    c.send(&[0x13; REQUEST_LEN]);
    assert!(c.closed(), "bad request magic");

    let mut c = transmitting(&env);
    c.send(&Request { flags: 0, command: CMD_READ, handle: 1, offset: 0, length: 4096 }.encode()[..10]);
    drop(c);

    assert!(vmtd.alive());
    assert!(qemu_img_identical(&img, &env.export_uri("img")));
    // The server notices the last disconnects asynchronously; every connection must be
    // accounted for within a bounded time, a leak never reaches zero.
    wait_until("every connection accounted for", Duration::from_secs(10), || status(&env, "img").clients == 0);
}

/// Reads one control response frame off a raw connection.
fn control_reply(c: &mut Raw) -> Response {
    let (len, crc) = control::decode_header(&c.recv(control::HEADER_LEN).try_into().unwrap()).unwrap();
    control::decode_payload(&c.recv(len as usize), crc).unwrap()
}

#[test]
fn control_socket_garbage_is_answered_not_fatal() {
    let env = Env::new();
    let (mut vmtd, _, _) = serve_one(&env);
    let mut c = Raw::connect(&env.control_sock());
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    let resp = control_reply(&mut c);
    assert!(matches!(resp, Response::Error { ref message } if message.contains("magic")), "{resp:?}");
    assert!(c.closed());

    // A well-framed but unknown request.
    let mut c = Raw::connect(&env.control_sock());
    c.send(&control::encode(&serde_json::json!({ "op": "format_disk" })));
    let resp = control_reply(&mut c);
    assert!(matches!(resp, Response::Error { ref message } if message.contains("format_disk")), "{resp:?}");

    // An image whose origin does not exist: refused, daemon fine.
    let add = run(Command::new(VMT).args([
        "--socket",
        env.control_sock().to_str().unwrap(),
        "image",
        "add",
        "ghost",
        "file:///nonexistent/x.raw",
    ]));
    assert!(!add.status.success());
    assert!(String::from_utf8_lossy(&add.stderr).contains("/nonexistent/x.raw"));
    assert!(vmtd.alive());
    assert_eq!(try_status(&env.control_sock()).unwrap().len(), 1);
}

#[test]
fn bad_configs_fail_with_the_key_named() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 65536, 1);
    let (key, open_key) = (env.path("cluster.key"), env.path("open.key"));
    for (path, mode) in [(&key, 0o600), (&open_key, 0o644)] {
        std::fs::write(path, "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let p2p = |body: &str, key: &std::path::Path| {
        format!("[p2p]\ntrackers = [\"10.0.0.2:7070\"]\ncluster_key_file = \"{}\"\n{body}", key.display())
    };
    let p2p_cases = [
        (p2p("listen = \"0.0.0.0:7000\"", &key), "p2p.listen"),
        (p2p("listen = \"10.0.0.5:7000\"\nadvertise = \"0.0.0.0:7000\"", &key), "p2p.advertise"),
        (p2p("listen = \"10.0.0.5:7000\"", &open_key), "p2p.cluster_key_file"),
        (p2p("listen = \"10.0.0.5:7000\"", &env.path("missing.key")), "p2p.cluster_key_file"),
        (p2p("listen = \"10.0.0.5:7000\"\nheartbeat = \"0s\"", &key), "p2p.heartbeat"),
        (p2p("listen = \"10.0.0.5:7000\"\npeer_stall = \"100ms\"", &key), "p2p.peer_stall"),
        (p2p("listen = \"10.0.0.5:7000\"\nstripe = \"1KiB\"", &key), "p2p.stripe"),
        (p2p("listen = \"10.0.0.5:7000\"\nupload_slots = 0", &key), "p2p.upload_slots"),
        (p2p("listen = \"10.0.0.5:7000\"\nfanout = 0", &key), "p2p.fanout"),
        (p2p("listen = \"10.0.0.5:7000\"\nupload_buffer = \"512KiB\"", &key), "p2p.upload_buffer"),
        (p2p("listen = \"10.0.0.5:7000\"\nsession_rate = \"1KiB\"", &key), "p2p.session_rate"),
        (p2p("listen = \"10.0.0.5:7000\"\nsession_rate = \"fast\"", &key), "p2p.session_rate"),
        (p2p("listen = \"10.0.0.5:7000\"\npeers_per_address = 0", &key), "p2p.peers_per_address"),
        (p2p("listen = \"10.0.0.5:7000\"\npeers = []", &key), "peers"),
        (p2p("listen = \"10.0.0.5:7000\"\ntracker_replicas = 2", &key), "p2p.tracker_replicas"),
        (p2p("listen = \"10.0.0.5:7000\"\ntracker_replicas = 0", &key), "p2p.tracker_replicas"),
        (p2p("listen = \"10.0.0.5:7000\"\nmax_sessions = 1", &key), "p2p.max_sessions"),
        (
            format!(
                "[p2p]\nlisten = \"10.0.0.5:7000\"\ntrackers = [\"nohost\"]\ncluster_key_file = \"{}\"",
                key.display()
            ),
            "p2p.trackers",
        ),
    ];
    for (head, key) in &p2p_cases {
        let cfg = env.config(head, "");
        let out = run(Command::new(VMTD).arg("--check").arg("--config").arg(&cfg));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {head}");
        assert!(err.contains(key), "error for {key} does not name it: {err}");
    }
    let cfg = env.config(&p2p("listen = \"10.0.0.5:7000\"", &key), "");
    assert!(run(Command::new(VMTD).arg("--check").arg("--config").arg(&cfg)).status.success());
    // No pacing ("0"), and a rate that lets two default stripes (1 MiB) go within the default
    // peer_timeout (10 s); a slower one is refused.
    for (rate, ok) in [("0", true), ("205KiB", true), ("204KiB", false), ("12MiB", true)] {
        let cfg = env.config(&p2p(&format!("listen = \"10.0.0.5:7000\"\nsession_rate = \"{rate}\""), &key), "");
        let out = run(Command::new(VMTD).arg("--check").arg("--config").arg(&cfg));
        assert_eq!(out.status.success(), ok, "session_rate = {rate}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cases = [
        ("bogus_key = 1", "", "bogus_key"),
        ("", "[[image]]\nname = \"a b\"\norigin = \"file:///x\"\n", "image[0].name"),
        ("", "[[image]]\nname = \"a\"\norigin = \"file:///x\"\nchunk_size = \"3KiB\"\n", "image[0].chunk_size"),
        ("", "[[image]]\nname = \"a\"\norigin = \"nbd://h/e\"\n", "image[0].manifest"),
        ("fetch_timeout = \"forever\"", "", "fetch_timeout"),
        ("max_fetch = \"1GiB\"", "", "max_fetch"),
        ("run_dir = 5", "", "run_dir"),
        ("[nbd]\nconnection_bytes = \"4KiB\"", "", "nbd.connection_bytes"),
        ("[nbd]\nnode_bytes = \"lots\"", "", "nbd.node_bytes"),
        ("[nbd]\nmax_connections = 0", "", "nbd.max_connections"),
        ("[nbd]\nwrite_timeout = \"0s\"", "", "nbd.write_timeout"),
        ("[nbd]\nmax_conns = 5", "", "max_conns"),
    ];
    for (head, images, key) in cases {
        let cfg = env.config(head, images);
        let out = run(Command::new(VMTD).arg("--check").arg("--config").arg(&cfg));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {head} {images}");
        assert!(err.contains(key), "error for {key} does not name it: {err}");
    }
    let out = run(Command::new(VMTD).args(["--config", "/nonexistent/vmtd.toml"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmtd.toml"));

    // A valid config with an image whose origin is missing: a clear error at start.
    let cfg = env.config("", "[[image]]\nname = \"a\"\norigin = \"file:///nonexistent/a.raw\"\n");
    let out = run(Command::new("timeout").arg("30").arg(VMTD).arg("--config").arg(&cfg));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("image a"), "{}", String::from_utf8_lossy(&out.stderr));
}
