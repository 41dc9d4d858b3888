//! NBD clients against the node's limits on a real vmtd: clients that pipeline huge reads and
//! never read the replies, clients that never finish a handshake, and a flood of connections.
//! Others keep being served; vmtd's memory stays within its byte budget.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vmthunder::daemon::control::{self, NbdStatus, Response};
use vmthunder::nbd::proto::*;

const MIB: u64 = 1 << 20;

fn nbd_status(env: &Env) -> NbdStatus {
    match call(&env.control_sock(), control::Request::Status).unwrap() {
        Response::Status { nbd, .. } => nbd,
        r => panic!("unexpected answer {r:?}"),
    }
}

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// 50 connections each pipeline 64 reads of 32 MiB and 64 of 64 KiB and never read a reply. Each
/// holds its own budget and no more, vmtd's memory stays within the node budget, and another
/// client reads the whole image, identical, while all 50 are still connected.
#[test]
fn clients_that_never_read_replies_cost_only_their_budget() {
    let env = Env::new();
    let img = env.path("img.raw");
    let data = write_image(&img, 64 * MIB as usize, 21);
    let head = "[nbd]\nconnection_bytes = \"2MiB\"\nnode_bytes = \"128MiB\"\nwrite_timeout = \"10m\"\n";
    let cfg = env.config(head, &file_image("img", &img, ""));
    let vmtd = start_vmtd(&env, &cfg);

    let mut hostile = Vec::new();
    for n in 0..50u64 {
        let mut c = nbd_transmitting(&env, "img");
        for h in 0..128u64 {
            // Long and short reads mixed: both kinds are charged to the connection's budget.
            let (offset, length) = if h % 2 == 0 { (((n + h) % 4) * 8 * MIB, 32 << 20) } else { (h * 65536, 65536) };
            c.send(&Request { flags: 0, command: CMD_READ, handle: h, offset, length }.encode());
        }
        hostile.push(c);
    }
    // Each stalled connection fills its 2 MiB and no more.
    wait_until("stalled connections at their budget", Duration::from_secs(120), || {
        nbd_status(&env).bytes_in_flight >= 50 * 2 * MIB
    });
    let s = nbd_status(&env);
    assert_eq!(s.bytes_in_flight, 50 * 2 * MIB, "each connection holds exactly its budget: {s:?}");
    let rss = rss_bytes(vmtd.pid());
    eprintln!("vmtd RSS with 50 stalled clients: {} MiB, {s:?}", rss / MIB);
    assert!(rss <= 256 * MIB, "vmtd RSS {} MiB with 50 stalled clients", rss / MIB);

    // Another client is served in full meanwhile.
    let mut good = nbd_transmitting(&env, "img");
    for (i, at) in (0..64 * MIB).step_by(MIB as usize).enumerate() {
        let got = nbd_read(&mut good, i as u64, at, MIB as u32);
        assert!(got == data[at as usize..(at + MIB) as usize], "bytes at {at} differ");
    }
    let s = nbd_status(&env);
    assert_eq!(s.connections, 51, "all stalled clients were still connected: {s:?}");
    assert!(rss_bytes(vmtd.pid()) <= 256 * MIB);
    drop(hostile);
}

/// A client that stops reading replies is closed after `write_timeout`; one that never sends
/// its handshake after `handshake_timeout`. Neither disturbs a client being served.
#[test]
fn stalled_clients_are_closed_by_their_timeouts() {
    let env = Env::new();
    let img = env.path("img.raw");
    write_image(&img, 40 * MIB as usize, 22);
    let head = "[nbd]\nhandshake_timeout = \"1s\"\nwrite_timeout = \"1s\"\n";
    let cfg = env.config(head, &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);

    let mut mute = Raw::connect(&env.export_sock("img"));
    let mut stalled = nbd_transmitting(&env, "img");
    for h in 0..8 {
        stalled.send(&Request { flags: 0, command: CMD_READ, handle: h, offset: 0, length: 32 << 20 }.encode());
    }
    let mut good = nbd_transmitting(&env, "img");
    wait_until("stalled clients closed", Duration::from_secs(60), || nbd_status(&env).connections == 1);
    assert!(mute.closed(), "the client without a handshake was closed");
    nbd_read(&mut good, 1, 0, 65536);
    let log = std::fs::read_to_string(env.path("vmtd.log")).unwrap();
    assert!(log.contains("not reading") && log.contains("no handshake"), "the log says why");
}

/// 10,000 connections against a cap of 64: the rest are closed at once, the client already
/// being served keeps reading, and the cap frees up as connections go.
#[test]
fn a_flood_of_connections_is_refused_past_the_cap() {
    let env = Env::new();
    let img = env.path("img.raw");
    let data = write_image(&img, 4 * MIB as usize, 23);
    let head = "[nbd]\nmax_connections = 64\nhandshake_timeout = \"10m\"\n";
    let cfg = env.config(head, &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    raise_fd_limit(10_500);

    let mut good = nbd_transmitting(&env, "img");
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(UnixStream::connect(env.export_sock("img")).expect("connect"));
    }
    // Connections still in the listen backlog are refused as vmtd gets to them.
    wait_until("the flood refused", Duration::from_secs(60), || nbd_status(&env).refused >= 10_000 - 63);
    let s = nbd_status(&env);
    assert!(s.connections <= 64, "{s:?}");
    for (i, at) in (0..4 * MIB).step_by(65536).enumerate() {
        assert!(nbd_read(&mut good, i as u64, at, 65536) == data[at as usize..at as usize + 65536]);
    }
    drop(idle);
    wait_until("idle connections gone", Duration::from_secs(60), || nbd_status(&env).connections == 1);
    let mut again = nbd_transmitting(&env, "img");
    nbd_read(&mut again, 1, 0, 4096);
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(lim.rlim_max >= want, "this test needs {want} open files; the hard limit is {}", lim.rlim_max);
    lim.rlim_cur = lim.rlim_max;
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// A long read pipelined with many short ones, with the smallest budgets (connection and node
/// alike): every reply arrives, with the right bytes. The long read's room is reserved before it
/// is queued, so its writer never waits on replies queued behind it.
#[test]
fn long_and_short_reads_mixed_on_a_small_budget_all_complete() {
    let env = Env::new();
    let img = env.path("img.raw");
    let data = write_image(&img, 40 * MIB as usize, 24);
    let cfg = env.config("[nbd]\nconnection_bytes = \"1MiB\"\nnode_bytes = \"1MiB\"\n", &file_image("img", &img, ""));
    let _vmtd = start_vmtd(&env, &cfg);
    let mut c = nbd_transmitting(&env, "img");
    let short = |h: u64| (h * 131_072) % (39 * MIB);
    c.send(&Request { flags: 0, command: CMD_READ, handle: 0, offset: MIB, length: 32 << 20 }.encode());
    for h in 1..=200u64 {
        c.send(&Request { flags: 0, command: CMD_READ, handle: h, offset: short(h), length: 65536 }.encode());
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..=200 {
        let r = SimpleReply::parse(&c.recv(SIMPLE_REPLY_LEN).try_into().unwrap()).unwrap();
        assert_eq!(r.error, 0);
        let (at, len) = if r.handle == 0 { (MIB, 32 * MIB) } else { (short(r.handle), 65536) };
        let got = c.recv(len as usize);
        assert!(got == data[at as usize..(at + len) as usize], "reply {} differs", r.handle);
        assert!(seen.insert(r.handle), "reply {} twice", r.handle);
    }
}
