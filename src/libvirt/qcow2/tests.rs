//! Backing chains from crafted headers (hostile ones included) and from qemu-img itself.

use super::*;

/// A minimal qcow2 header naming `backing` (or none), as qemu-img lays it out.
fn qcow2(path: &Path, backing: Option<&str>) {
    let mut h = vec![0u8; 104];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    if let Some(b) = backing {
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        h.resize(512, 0);
        h.extend_from_slice(b.as_bytes());
    }
    std::fs::write(path, h).unwrap();
}

#[test]
fn follows_files_to_a_network_end_or_a_local_one() {
    let d = tempfile::tempdir().unwrap();
    let nbd = "nbd+unix:///img?socket=/run/vmthunder/exports/img.sock";
    qcow2(&d.path().join("base.qcow2"), Some(nbd));
    qcow2(&d.path().join("mid.qcow2"), Some("base.qcow2"));
    qcow2(&d.path().join("top.qcow2"), Some(d.path().join("mid.qcow2").to_str().unwrap()));
    assert_eq!(chain_end(&d.path().join("top.qcow2")), Ok(ChainEnd::Network(nbd.into())));
    assert_eq!(nbd_unix(nbd), Some(("img".into(), "/run/vmthunder/exports/img.sock".into())));
    // Relative names resolve against the file as named, also through a symlink elsewhere.
    std::fs::create_dir(d.path().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(d.path().join("mid.qcow2"), d.path().join("elsewhere/link.qcow2")).unwrap();
    qcow2(&d.path().join("elsewhere/base.qcow2"), Some("nbd://other/x"));
    assert_eq!(chain_end(&d.path().join("elsewhere/link.qcow2")), Ok(ChainEnd::Network("nbd://other/x".into())));
    std::fs::write(d.path().join("raw.img"), vec![0u8; 4096]).unwrap();
    qcow2(&d.path().join("over-raw.qcow2"), Some("raw.img"));
    assert_eq!(chain_end(&d.path().join("over-raw.qcow2")), Ok(ChainEnd::Local));
    qcow2(&d.path().join("alone.qcow2"), None);
    assert_eq!(chain_end(&d.path().join("alone.qcow2")), Ok(ChainEnd::Local));
    std::fs::write(d.path().join("tiny"), b"QFI").unwrap();
    assert_eq!(chain_end(&d.path().join("tiny")), Ok(ChainEnd::Local));
}

#[test]
fn hostile_headers_end_in_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    // A loop.
    qcow2(&p("a"), Some("b"));
    qcow2(&p("b"), Some("a"));
    assert!(matches!(chain_end(&p("a")), Err(ChainError::Loop { .. })));
    // A name longer than qcow2 allows, and one past the end of the file.
    let mut h = std::fs::read(p("a")).unwrap();
    h[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
    std::fs::write(p("huge"), &h).unwrap();
    assert!(matches!(chain_end(&p("huge")), Err(ChainError::BadHeader { .. })));
    h[16..20].copy_from_slice(&100u32.to_be_bytes());
    std::fs::write(p("short"), &h).unwrap();
    assert!(matches!(chain_end(&p("short")), Err(ChainError::BadHeader { .. })));
    // A chain of 1,000 files stops at the limit, after reading MAX_DEPTH (200) headers.
    for i in 0..1000 {
        qcow2(&p(&format!("c{i}")), Some(&format!("c{}", i + 1)));
    }
    assert!(matches!(chain_end(&p("c0")), Err(ChainError::TooDeep { .. })));
    // A missing backing file, a FIFO (never waited on), a directory.
    qcow2(&p("dangling"), Some("nowhere"));
    assert!(matches!(chain_end(&p("dangling")), Err(ChainError::Io { .. })));
    let fifo = std::ffi::CString::new(p("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    qcow2(&p("to-fifo"), Some("fifo"));
    assert!(matches!(chain_end(&p("to-fifo")), Err(ChainError::NotAFile { .. })));
    assert!(matches!(chain_end(d.path()), Err(ChainError::NotAFile { .. })));
    // A block device named by a header (an LVM volume as base image) is read like a file: any
    // readable one of this machine, if it has one, ends the chain as a local disk.
    use std::os::unix::fs::FileTypeExt;
    let dev = std::fs::read_dir("/sys/block").into_iter().flatten().flatten().find_map(|e| {
        let dev = Path::new("/dev").join(e.file_name());
        let f = std::fs::File::open(&dev).ok()?;
        f.metadata().ok()?.file_type().is_block_device().then_some(dev)
    });
    match dev {
        Some(dev) => {
            qcow2(&p("to-blk"), Some(dev.to_str().unwrap()));
            assert!(chain_end(&p("to-blk")).is_ok(), "{dev:?}: {:?}", chain_end(&p("to-blk")));
        }
        None => eprintln!("no readable block device here: the block-device case is not checked"),
    }
    // A character device named by a header is never opened.
    qcow2(&p("to-null"), Some("/dev/null"));
    assert!(matches!(chain_end(&p("to-null")), Err(ChainError::NotAFile { .. })));
    // Version 7 is no qcow2 QEMU writes; version 1 (qcow) and an empty name end the chain.
    let mut v = std::fs::read(p("a")).unwrap();
    v[4..8].copy_from_slice(&7u32.to_be_bytes());
    std::fs::write(p("v7"), &v).unwrap();
    assert!(matches!(chain_end(&p("v7")), Err(ChainError::BadHeader { .. })));
    v[4..8].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(p("v1"), &v).unwrap();
    assert_eq!(chain_end(&p("v1")), Ok(ChainEnd::Local));
    let mut empty = std::fs::read(p("a")).unwrap();
    empty[16..20].copy_from_slice(&0u32.to_be_bytes());
    std::fs::write(p("empty-name"), empty).unwrap();
    assert_eq!(chain_end(&p("empty-name")), Ok(ChainEnd::Local));
    // A newline in a name stays on the error's one line.
    qcow2(&p("nl"), Some("no\nwhere"));
    let e = chain_end(&p("nl")).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn reads_what_qemu_img_writes() {
    let d = tempfile::tempdir().unwrap();
    let top = d.path().join("vm.qcow2");
    let nbd = "nbd+unix:///debian12?socket=/run/vmthunder/exports/debian12.sock";
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", nbd])
        .arg(&top)
        .arg("1G")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(chain_end(&top), Ok(ChainEnd::Network(nbd.into())));
}

#[test]
fn network_names_are_told_from_file_names() {
    for n in [
        "nbd://h/x",
        "nbd+unix:///x?socket=/s",
        "json:{\"driver\":\"nbd\"}",
        "iscsi://h/iqn/0",
        "rbd:pool/img",
        "nbd:unix:/s:exportname=x",
    ] {
        assert!(is_network(n), "{n}");
    }
    for n in ["base.qcow2", "/var/lib/x.qcow2", "dir/with:colon", "./a://b", "file:base.qcow2"] {
        assert!(!is_network(n), "{n}");
    }
    assert_eq!(nbd_unix("nbd://h/x"), None);
    assert_eq!(nbd_unix("nbd+unix:///x"), None);
}
