//! Seed inputs per target: valid values encoded by vmthunder's own encoders, prefixed with the
//! selector byte of the mode they feed. `cargo run --example seeds` writes them to
//! `corpus/<target>/`.

use bytes::Bytes;
use roaring::RoaringBitmap;
use vmthunder::daemon::control::{self, ImageStatus, PeerStatus, PrefetchStatus, ProfileInfo};
use vmthunder::image::{ChunkSize, Digest, Geometry, Manifest};
use vmthunder::iscsi::login::encode_text;
use vmthunder::iscsi::pdu::{self, Digests, Pdu};
use vmthunder::nbd::proto::*;
use vmthunder::p2p::wire::{self, Frame, Message};
use vmthunder::profile::Profile;
use vmthunder::store::state;

/// Where the `config` target expects the cluster key of `[p2p]` sections: a config naming any
/// other key file is skipped, so fuzzed paths are never opened.
pub const CLUSTER_KEY: &str = "/tmp/vmthunder-fuzz/cluster.key";

/// Every target with its seeds.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("nbd_server", nbd_server()),
        ("nbd_client", nbd_client()),
        ("p2p_wire", p2p_wire()),
        ("control", control()),
        ("iscsi_pdu", iscsi_pdu()),
        ("iscsi_login", iscsi_login()),
        ("iscsi_scsi", iscsi_scsi()),
        ("profile", profile()),
        ("manifest", manifest()),
        ("store_state", store_state()),
        ("domain_xml", domain_xml()),
        ("config", config()),
    ]
}

fn with(sel: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(bytes);
    v
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OptionHeader { option, len: data.len() as u32 }.encode().to_vec();
    v.extend_from_slice(data);
    v
}

fn nbd_server() -> Vec<Vec<u8>> {
    let info = InfoRequest { name: "debian12".into(), infos: vec![INFO_BLOCK_SIZE] }.encode();
    let read = Request { flags: 0, command: CMD_READ, handle: 1, offset: 4096, length: 65536 };
    let mut phase = Vec::new();
    phase.extend(option(OPT_STRUCTURED_REPLY, &[]));
    phase.extend(option(OPT_LIST, &[]));
    phase.extend(option(OPT_INFO, &info));
    phase.extend(option(OPT_GO, &InfoRequest { name: "img".into(), infos: vec![] }.encode()));
    let mut old = option(OPT_EXPORT_NAME, b"img");
    old.extend(option(OPT_ABORT, &[]));
    vec![
        with(0, &OptionHeader { option: OPT_GO, len: info.len() as u32 }.encode()),
        with(1, &info),
        with(1, &InfoRequest { name: String::new(), infos: vec![INFO_EXPORT, INFO_BLOCK_SIZE, 9] }.encode()),
        with(2, &read.encode()),
        with(2, &Request { flags: 0, command: CMD_DISC, handle: 2, offset: 0, length: 0 }.encode()),
        with(3, &phase),
        with(3, &old),
    ]
}

fn nbd_client() -> Vec<Vec<u8>> {
    let export = info_export(1 << 30, TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH);
    vec![
        with(0, &greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)),
        with(1, &option_reply(OPT_GO, REP_INFO, &export)),
        with(1, &option_reply(OPT_GO, REP_INFO, &info_block_size(1, 4096, 32 << 20))),
        with(1, &option_reply(OPT_GO, REP_ACK, &[])),
        with(1, &option_reply(OPT_LIST, REP_SERVER, &list_entry("img"))),
        with(1, &option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export")),
        with(2, &export),
        with(3, &SimpleReply { error: 0, handle: 7 }.encode()),
        with(3, &SimpleReply { error: EIO, handle: 8 }.encode()),
        with(
            4,
            &StructuredHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, handle: 1, length: 520 }.encode(),
        ),
        with(4, &StructuredHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_ERROR, handle: 2, length: 6 }.encode()),
    ]
}

fn bitmap_bytes(bm: &RoaringBitmap) -> Vec<u8> {
    let mut v = Vec::new();
    bm.serialize_into(&mut v).unwrap();
    v
}

fn p2p_wire() -> Vec<Vec<u8>> {
    let mut have: RoaringBitmap = (0..100).collect();
    have.insert(5000);
    let frames = [
        Frame::new(Message::Hello { node: "10.0.0.1:7000".into(), image: [7; 32], nonce: [9; 32] }),
        Frame::new(Message::Challenge { node: "10.0.0.2:7000".into(), nonce: [1; 32], proof: [2; 32] }),
        Frame::new(Message::Proof { proof: [3; 32] }),
        Frame::with_tail(Message::Have, Bytes::from(bitmap_bytes(&have))),
        Frame::with_tail(Message::HaveDelta, Bytes::from(bitmap_bytes(&[7u32, 8].into_iter().collect()))),
        Frame::new(Message::Request { id: 1, first: 2, count: 3 }),
        Frame::with_tail(Message::Data { id: 1 }, Bytes::from(vec![0xab; 64])),
        Frame::with_tail(Message::Part { id: 1, count: 1 }, Bytes::from(vec![0xac; 64])),
        Frame::new(Message::NotHave { id: 1 }),
        Frame::new(Message::Busy { id: 1 }),
        Frame::new(Message::Ping),
        Frame::new(Message::Register { image: [4; 32], classes: 4, fanout: 4, near: 8, joined: 1_796_000_000_000 }),
        Frame::new(Message::Peers {
            image: [4; 32],
            ancestors: vec![vec!["10.0.0.3:7000".into()], vec![]],
            near: vec!["[::1]:7001".into()],
            total: 3,
            provisional: false,
        }),
    ];
    let mut out = Vec::new();
    for f in &frames {
        let enc = f.encode();
        out.push(with(0, &enc));
        let head = f.encode_head();
        let msg_len = (head.len() - wire::HEADER_LEN) as u16;
        let mut body = msg_len.to_le_bytes().to_vec();
        body.extend_from_slice(&enc[wire::HEADER_LEN..]);
        out.push(with(1, &body));
    }
    out.push(with(2, &frames[6].encode()[..wire::HEADER_LEN]));
    out
}

fn control() -> Vec<Vec<u8>> {
    use control::{Request, Response};
    let image: vmthunder::config::ImageConfig = serde_json::from_value(serde_json::json!({
        "name": "debian12", "origin": "nbd://10.0.0.9:10809/debian12", "chunk_size": "64KiB",
        "manifest": "/srv/debian12.manifest", "chap_user": "u", "chap_secret_file": "/etc/vmt/chap",
        "iscsi_header_digest": true
    }))
    .unwrap();
    let requests = vec![
        Request::Status,
        Request::ImageAdd { image },
        Request::ImageRemove { name: "x".into() },
        Request::Assemble { domain: "vm1".into(), images: vec!["a".into(), "b".into()] },
        Request::Release { domain: "vm1".into() },
        Request::Complete { name: "a".into(), rate: Some(1 << 20) },
        Request::RecordStart { image: "a".into(), duration_ms: Some(5000), domain: Some("vm1".into()) },
        Request::RecordStop { image: "a".into() },
        Request::Prefetch { image: "a".into(), profile: Some("/p".into()), rate: None },
        Request::PrefetchCancel { image: "a".into() },
        Request::ProfileList,
        Request::TraceStart { image: "a".into() },
        Request::TraceStop { image: "a".into(), path: "/tmp/t.csv".into() },
        Request::CacheList,
        Request::CacheGc { to: Some(1 << 30) },
        Request::CachePin { image: "a".into(), pinned: true },
    ];
    let status = ImageStatus {
        name: "a".into(),
        origin: "file:///a".into(),
        digest: "00".repeat(32),
        image_size: 1 << 30,
        chunk_size: 65536,
        chunks_present: 3,
        chunks_total: 16384,
        bytes_from_origin: 1,
        bytes_served: 2,
        chunks_fetched: 3,
        upstream_reads: 4,
        retries: 5,
        verify_failures: 6,
        failed_reads: 7,
        fetching: 8,
        clients: 9,
        holds: vec!["vm1".into()],
        reads: 10,
        reads_waited: 11,
        recording: Some(String::new()),
        tracing: true,
        profile_chunks: Some(12),
        prefetch: Some(PrefetchStatus {
            total_chunks: 1,
            done_chunks: 1,
            scheduled_bytes: 65536,
            finished: true,
            cancelled: false,
            error: Some("x".into()),
        }),
        socket: "/run/vmthunder/exports/a.sock".into(),
        cache_dir: "/var/lib/vmthunder/cache/00".into(),
        peers: 2,
        p2p: Some(PeerStatus { peers_usable: 1, sessions: 1, ..PeerStatus::default() }),
        cache: control::CacheHealth { write_errors: 1, ..Default::default() },
        gave_up: 1,
        reads_in_flight: 2,
        bytes_from_cache: 3,
        waits: control::WaitStatus {
            hit: vmthunder::metrics::Snapshot { counts: vec![1, 2, 3], sum_ns: 40_000 },
            ..Default::default()
        },
        origin_latency: vmthunder::metrics::Snapshot { counts: vec![0; 19], sum_ns: 0 },
        peer_latency: vmthunder::metrics::Snapshot::default(),
    };
    let responses = vec![
        Response::Status {
            version: "0.1.0".into(),
            images: vec![status],
            profiles_rejected: 0,
            p2p: Some(Box::new(control::NodeP2pStatus { node: "10.0.0.1:7000".into(), ..Default::default() })),
            nbd: control::NbdStatus { connections: 1, max_connections: 1024, ..Default::default() },
            cache: control::CacheUsage { used: 1, max: Some(2), ..Default::default() },
        },
        Response::Caches {
            usage: control::CacheUsage::default(),
            caches: vec![control::CacheEntry {
                digest: "00".repeat(32),
                image: Some("a".into()),
                state: "serving".into(),
                bytes: 1,
                chunks: Some(1),
                chunks_total: Some(2),
                idle_secs: None,
                holds: vec![],
                pinned: true,
            }],
        },
        Response::Collected { report: vmthunder::store::gc::Report { removed: vec!["00".into()], ..Default::default() } },
        Response::Assembled { sockets: vec!["/run/vmthunder/exports/a.sock".into()] },
        Response::Recorded { path: "/p".into(), boots: 1, chunks: 2, bytes: 3 },
        Response::Profiles {
            profiles: vec![ProfileInfo {
                digest: "ab".into(),
                image: None,
                boots: 1,
                chunks: 2,
                bytes: 3,
                path: "/p".into(),
            }],
        },
        Response::Traced { path: "/t".into(), rows: 1, dropped: 0 },
        Response::Done,
        Response::Error { message: "no such image \"\\u00e9\"".into() },
    ];
    let mut out = Vec::new();
    for r in &requests {
        out.push(with(0, &control::encode(r)));
        out.push(with(1, &serde_json::to_vec(r).unwrap()));
    }
    for r in &responses {
        out.push(with(0, &control::encode(r)));
        out.push(with(2, &serde_json::to_vec(r).unwrap()));
    }
    out
}

fn iscsi_pdu() -> Vec<Vec<u8>> {
    let window = |p: &mut Pdu| {
        p.set_u32(24, 10);
        p.set_u32(28, 2);
        p.set_u32(32, 33);
    };
    let mut login = Pdu::new(pdu::OP_LOGIN_RSP);
    login.bhs[1] = 0x87;
    login.set_u32(16, 1);
    window(&mut login);
    login.data = encode_text(&[("HeaderDigest", "CRC32C".into()), ("MaxRecvDataSegmentLength", "65536".into())]);
    let mut rsp = Pdu::new(pdu::OP_SCSI_RSP);
    rsp.bhs[3] = 2;
    window(&mut rsp);
    let mut sense = vec![0, 18, 0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0];
    sense.resize(20, 0);
    rsp.data = sense;
    let mut data_in = Pdu::new(pdu::OP_DATA_IN);
    data_in.bhs[1] = 0x81;
    data_in.set_u32(40, 0);
    data_in.ahs = vec![0; 4];
    data_in.data = vec![0x5a; 37];
    let mut nop = Pdu::new(pdu::OP_NOP_IN);
    nop.set_u32(16, pdu::RESERVED_TAG);
    nop.set_u32(20, 5);
    let mut reject = Pdu::new(pdu::OP_REJECT);
    reject.bhs[2] = 9;
    reject.data = Pdu::new(pdu::OP_SCSI_CMD).bhs.to_vec();
    let mut text = Pdu::new(pdu::OP_TEXT_RSP);
    text.data = b"TargetName=iqn.x\0".to_vec();
    let stream = [login, rsp, data_in, nop, reject, Pdu::new(pdu::OP_LOGOUT_RSP), Pdu::new(pdu::OP_ASYNC), text];
    let mut out = Vec::new();
    for sel in [0u8, 1, 2, 3] {
        let d = Digests { header: sel & 1 != 0, data: sel & 2 != 0 };
        let mut all = Vec::new();
        for p in &stream {
            let enc = p.encode(d);
            out.push(with(sel, &enc));
            all.extend(enc);
        }
        out.push(with(sel, &all));
    }
    out.push(with(4, &Pdu::new(pdu::OP_R2T).encode(Digests::default())));
    out
}

/// One response of the `iscsi_login` target's login mode.
fn login_rsp(flags: u8, stat_sn: u32, text: &str) -> Vec<u8> {
    let data = text.replace(' ', "\0").into_bytes();
    let mut v = vec![flags, 0, 0];
    v.extend_from_slice(&5u16.to_le_bytes());
    v.extend_from_slice(&stat_sn.to_le_bytes());
    v.extend_from_slice(&(data.len() as u16).to_le_bytes());
    v.extend(data);
    v
}

fn iscsi_login() -> Vec<Vec<u8>> {
    let op = "HeaderDigest=CRC32C DataDigest=None MaxRecvDataSegmentLength=65536 MaxBurstLength=1048576 \
              ErrorRecoveryLevel=0 MaxConnections=1 FirstBurstLength=65536";
    let plain = [vec![2, 3], login_rsp(0x81, 10, "AuthMethod=None"), login_rsp(0x87, 11, op)].concat();
    let chap = [
        vec![2, 7],
        login_rsp(0x01, 10, "AuthMethod=CHAP"),
        login_rsp(0x01, 11, "CHAP_A=5 CHAP_I=7 CHAP_C=0x0102030405060708090a0b0c0d0e0f10"),
        login_rsp(0x81, 12, ""),
        login_rsp(0x84, 13, "HeaderDigest=None"),
        login_rsp(0x87, 14, "DataDigest=CRC32C"),
    ]
    .concat();
    let continued = [
        vec![2, 0],
        login_rsp(0x41, 10, "AuthMeth"),
        login_rsp(0x81, 11, "od=None"),
        login_rsp(0x87, 12, "MaxBurstLength=512"),
    ]
    .concat();
    vec![
        with(0, &encode_text(&[("A", "1".into()), ("B", "x=y".into()), ("TargetAlias", String::new())])),
        with(1, b"0x0102ab"),
        with(1, b"0xf"),
        with(1, b"0bAQIDBA=="),
        plain,
        chap,
        continued,
    ]
}

fn iscsi_scsi() -> Vec<Vec<u8>> {
    let mut cap = vec![0u8; 32];
    cap[..8].copy_from_slice(&((1u64 << 21) - 1).to_be_bytes());
    cap[8..12].copy_from_slice(&512u32.to_be_bytes());
    let mut inq = vec![0u8; 36];
    inq[8..16].copy_from_slice(b"LIO-ORG ");
    inq[16..32].copy_from_slice(b"vmthunder disk  ");
    let mut luns = vec![0, 0, 0, 16, 0, 0, 0, 0];
    luns.extend((0u64 << 48).to_be_bytes());
    luns.extend(((0x4000u64 | 300) << 48).to_be_bytes());
    let fixed = [0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0];
    vec![
        with(0, &cap),
        with(1, &inq),
        with(2, &luns),
        with(3, &[&[2u8][..], &fixed].concat()),
        with(3, &[2, 0x72, 5, 0x24, 0]),
        with(3, &[0x08]),
        with(4, &[0, 1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0]),
    ]
}

fn geometry() -> Geometry {
    Geometry::new(100 * 65536 + 5, ChunkSize::new(65536).unwrap()).unwrap()
}

fn profile() -> Vec<Vec<u8>> {
    let root = Digest::of(b"img");
    let a = Profile::from_touches(root, &geometry(), &[(5, 0), (6, 0), (2, 1500), (100, 2500), (0, 2501)]);
    let b = Profile::from_touches(root, &geometry(), &[(2, 100), (4, 200)]);
    let merged = a.merge(&b, 3).unwrap();
    let empty = Profile::from_touches(root, &geometry(), &[]);
    let mut out = Vec::new();
    for p in [a, merged, empty] {
        let enc = p.encode();
        out.push(with(0, &enc));
        out.push(with(1, &enc[..enc.len() - 4]));
    }
    out
}

fn manifest() -> Vec<Vec<u8>> {
    let g = Geometry::new(3 * 4096 + 100, ChunkSize::new(4096).unwrap()).unwrap();
    let digests = (0..g.chunk_count()).map(|i| Digest::of(&i.to_le_bytes())).collect();
    let m = Manifest::from_digests(g, digests).unwrap();
    let one = Manifest::from_digests(
        Geometry::new(1 << 20, ChunkSize::new(4 << 20).unwrap()).unwrap(),
        vec![Digest::of(b"x")],
    )
    .unwrap();
    let mut out = Vec::new();
    for m in [m, one] {
        let enc = m.encode();
        out.push(with(0, &enc));
        out.push(with(1, &enc[..enc.len() - 4]));
        out.push(with(2, &enc[..enc.len() - 4]));
    }
    out
}

fn store_state() -> Vec<Vec<u8>> {
    let g = Geometry::new(1 << 30, ChunkSize::new(4096).unwrap()).unwrap();
    let root = Digest::of(b"img");
    let mut runs: RoaringBitmap = (1000..9000).collect();
    runs.insert(70000);
    let maps: Vec<RoaringBitmap> =
        vec![RoaringBitmap::new(), [1u32, 5, 255].into_iter().collect(), (0..5000).map(|i| i * 3).collect(), runs];
    let mut out = Vec::new();
    for bm in &maps {
        let enc = state::encode(&g, &root, bm);
        out.push(with(0, &enc));
        out.push(with(1, &enc[..enc.len() - 4]));
    }
    out
}

const OVERLAY: &str = r#"<domain type='qemu'><name>vm1</name><devices>
  <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
    <source pool='vmthunder' volume='vm1.qcow2'/>
    <backingStore type='network'><format type='raw'/>
      <source protocol='nbd' name='debian12'><host transport='unix' socket='/run/vmthunder/exports/debian12.sock'/><reconnect delay='10'/></source>
      <backingStore type='network'><source protocol='nbd'><host transport='unix' socket='/run/vmt2/exports/base.sock'/></source></backingStore>
    </backingStore>
    <target dev='vda' bus='virtio'/></disk>
  <disk type='network' device='disk'><source protocol='nbd' name='other'><host transport='unix' socket='/srv/nbd/other.sock'/></source><target dev='vdb'/></disk>
  <disk type='network' device='disk'><source protocol='nbd' name='x'><host name='h' port='10809'/><host transport='unix' socket='/run/vmthunder/exports/x.sock'/></source></disk>
  <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='sda'/></disk>
</devices></domain>"#;

fn domain_xml() -> Vec<Vec<u8>> {
    let example = include_str!("../../scripts/guest-domain.xml.example").replace(
        "@DISK_XML@",
        "<disk type='network'><source protocol='nbd' name='img'><host transport='unix' \
         socket='/run/vmthunder/exports/img.sock'/></source><target dev='vda'/></disk>",
    );
    let built = |name: &str, image: &str, dev: &str, run: u8| {
        let mut v = vec![1];
        for s in [name, image, dev] {
            v.push(s.len() as u8);
            v.extend_from_slice(s.as_bytes());
        }
        v.push(run);
        v
    };
    vec![
        with(0, OVERLAY.as_bytes()),
        with(0, example.as_bytes()),
        with(0, b"<domain><name> x </name></domain>"),
        built("vm-1", "debian12", "vda", 0),
        built(" a<b>&'\" ", "img.v2", "", 1),
    ]
}

fn config() -> Vec<Vec<u8>> {
    let full = format!(
        r#"run_dir = "/run/vmthunder"
cache_dir = "/var/lib/vmthunder/cache"
profile_dir = "/var/lib/vmthunder/profiles"
export_user = "libvirt-qemu"
listen = "127.0.0.1:10809"
fetch_timeout = "30s"
max_fetch = "1MiB"
commit_interval = "500ms"
auto_record = false
record_duration = "2m"
profile_age_out = 3
prefetch_concurrency = 4
prefetch_rate = "50MiB"
worker_threads = 1

[p2p]
listen = "10.0.0.5:7000"
advertise = "10.0.0.5:7000"
trackers = ["10.0.0.2:7070", "tracker:7070"]
cluster_key_file = "{CLUSTER_KEY}"
heartbeat = "1s"
peer_stall = "2s"
peer_timeout = "10s"
stripe = "4MiB"
fanout = 4
upload_slots = 8
upload_rate = "100MiB"

[[image]]
name = "debian12"
origin = "file:///srv/images/debian12.raw"
chunk_size = "64KiB"

[[image]]
name = "win"
origin = "nbd+unix:///win?socket=/run/nbd.sock"
manifest = "/srv/win.manifest"

[[image]]
name = "lun0"
origin = "iscsi://[fd00::1]:3260/iqn.2024-01.org.example:disk/0"
manifest = "/srv/lun0.manifest"
iscsi_header_digest = true
"#
    );
    vec![
        with(0, include_bytes!("../../scripts/vmtd.toml")),
        with(0, full.as_bytes()),
        with(0, b"[[image]]\nname = \"a\"\norigin = \"nbd://h:1/e\"\nmanifest = \"/m\"\n"),
        with(1, b"64KiB"),
        with(1, b"30s"),
        with(1, b"nbd://[::1]:10809/exp"),
        with(1, b"iscsi://host/iqn.x:y/3"),
        with(1, b"nbd+unix:///e?a=b&socket=/s"),
    ]
}
