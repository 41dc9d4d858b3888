//! Finds the disks of a libvirt domain XML that read from a vmthunder export.
//!
//! A disk is a vmthunder disk when its source, or any source in its `<backingStore>` chain, is
//! NBD over a unix socket `{RUN_DIR}/exports/{IMAGE}.sock` and `{RUN_DIR}` is a vmtd run
//! directory (the caller decides, see [`super::hook`]). A file, block or volume disk whose XML
//! shows no such chain is a *candidate*: its image headers may still lead to an export, which the
//! hook checks ([`super::qcow2`]). Pure: text in, findings out.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::validate_name;

/// Errors reading a domain XML.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainXmlError {
    #[error("domain XML is malformed: {0}")]
    Malformed(String),
    #[error("domain XML has no <name>")]
    NoName,
    #[error("disk {disk}: {message}")]
    BadDisk { disk: String, message: String },
}

/// One disk that needs a vmthunder export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmtDisk {
    /// The guest device (`vda`), or `?` when the disk has no target.
    pub target: String,
    pub image: String,
    pub run_dir: PathBuf,
}

/// Where a disk that may read from vmthunder through its image headers lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `<disk type='file'>` (`source file=`) or `type='block'` (`source dev=`).
    Path(PathBuf),
    /// `<disk type='volume'>`: a volume of a storage pool.
    Volume { pool: String, volume: String },
}

/// A disk to look into: its XML shows no vmthunder export, its backing chain may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub target: String,
    pub source: DiskSource,
}

/// A parsed domain: its name, its vmthunder disks, and the disks to look into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisks {
    pub name: String,
    pub disks: Vec<VmtDisk>,
    pub candidates: Vec<Candidate>,
}

/// The image and run directory of export socket `socket` (`{RUN_DIR}/exports/{IMAGE}.sock`),
/// if it is one; `export`, when given, must be the image's name.
pub fn export_of(
    socket: &Path,
    export: Option<&str>,
    is_run_dir: &dyn Fn(&Path) -> bool,
) -> Result<Option<(String, PathBuf)>, String> {
    let (Some(exports), Some(file)) = (socket.parent(), socket.file_name().and_then(|f| f.to_str())) else {
        return Ok(None);
    };
    let Some(run_dir) = exports.parent().filter(|_| exports.file_name().is_some_and(|f| f == "exports")) else {
        return Ok(None);
    };
    let Some(image) = file.strip_suffix(".sock") else { return Ok(None) };
    if !socket.is_absolute() || !is_run_dir(run_dir) {
        return Ok(None);
    }
    validate_name(image)?;
    if let Some(export) = export.filter(|e| *e != image) {
        return Err(format!("export name {export:?} does not match the socket of image {image:?}"));
    }
    Ok(Some((image.to_string(), run_dir.to_path_buf())))
}

/// Parses `xml` and lists its vmthunder disks; `is_run_dir` says whether a directory is a vmtd
/// run directory.
pub fn parse(xml: &str, is_run_dir: &dyn Fn(&Path) -> bool) -> Result<DomainDisks, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(DomainXmlError::Malformed(format!("root element is <{}>, not <domain>", root.tag_name().name())));
    }
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(DomainXmlError::NoName)?
        .to_string();
    let (mut disks, mut candidates) = (Vec::new(), Vec::new());
    let Some(devices) = root.children().find(|n| n.has_tag_name("devices")) else {
        return Ok(DomainDisks { name, disks, candidates });
    };
    for disk in devices.children().filter(|n| n.has_tag_name("disk")) {
        let target = disk
            .children()
            .find(|n| n.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
            .unwrap_or("?")
            .to_string();
        let bad = |message: String| DomainXmlError::BadDisk { disk: target.clone(), message };
        // The disk's own source, then each level of its backing chain.
        let found = disks.len();
        let mut level = Some(disk);
        while let Some(node) = level {
            if let Some(src) = node.children().find(|n| n.has_tag_name("source")) {
                if src.attribute("protocol") == Some("nbd") {
                    for host in src.children().filter(|n| n.has_tag_name("host")) {
                        if host.attribute("transport") != Some("unix") {
                            continue;
                        }
                        let Some(socket) = host.attribute("socket") else { continue };
                        let Some((image, run_dir)) =
                            export_of(Path::new(socket), src.attribute("name"), is_run_dir).map_err(&bad)?
                        else {
                            continue;
                        };
                        let d = VmtDisk { target: target.clone(), image, run_dir };
                        if !disks.contains(&d) {
                            disks.push(d);
                        }
                    }
                }
            }
            level = node.children().find(|n| n.has_tag_name("backingStore"));
        }
        // Only a disk declared qcow2 (a volume's format may be left to its pool) with no chain in
        // its XML is looked into: a raw disk's first bytes are the guest's to write, and would
        // otherwise steer what the hook opens.
        let driver = disk.children().find(|n| n.has_tag_name("driver")).and_then(|d| d.attribute("type"));
        let qcow2 = match disk.attribute("type") {
            Some("volume") => matches!(driver, None | Some("qcow2")),
            _ => driver == Some("qcow2"),
        };
        let chain_in_xml = disk.children().any(|n| n.has_tag_name("backingStore"));
        if disks.len() == found && qcow2 && !chain_in_xml && matches!(disk.attribute("device"), None | Some("disk")) {
            let src = disk.children().find(|n| n.has_tag_name("source"));
            let attr = |a: &str| src.and_then(|s| s.attribute(a)).filter(|v| !v.is_empty());
            let source = match disk.attribute("type") {
                Some("file") => attr("file").map(|f| DiskSource::Path(f.into())),
                Some("block") => attr("dev").map(|d| DiskSource::Path(d.into())),
                Some("volume") => match (attr("pool"), attr("volume")) {
                    (Some(pool), Some(volume)) => Some(DiskSource::Volume { pool: pool.into(), volume: volume.into() }),
                    _ => None,
                },
                _ => None,
            };
            if let Some(source) = source {
                candidates.push(Candidate { target: target.clone(), source });
            }
        }
    }
    Ok(DomainDisks { name, disks, candidates })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run_dir(p: &Path) -> bool {
        p == Path::new("/run/vmthunder")
    }

    const OVERLAY: &str = r#"<domain type='qemu'><name>vm1</name><devices>
      <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
        <source pool='vmthunder' volume='vm1.qcow2'/>
        <backingStore type='network'><format type='raw'/>
          <source protocol='nbd' name='debian12'><host transport='unix' socket='/run/vmthunder/exports/debian12.sock'/><reconnect delay='10'/></source>
        </backingStore>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='network' device='disk'><source protocol='nbd' name='other'><host transport='unix' socket='/srv/nbd/other.sock'/></source><target dev='vdb'/></disk>
      <disk type='file' device='cdrom'><source file='/x.iso'/><target dev='sda'/></disk>
    </devices></domain>"#;

    #[test]
    fn finds_backing_export_and_ignores_others() {
        let d = parse(OVERLAY, &run_dir).unwrap();
        assert_eq!(d.name, "vm1");
        assert_eq!(
            d.disks,
            vec![VmtDisk { target: "vda".into(), image: "debian12".into(), run_dir: "/run/vmthunder".into() }]
        );
    }

    #[test]
    fn direct_network_disk() {
        let xml = "<domain><name>x</name><devices><disk type='network'><source protocol='nbd' name='img'><host transport='unix' socket='/run/vmthunder/exports/img.sock'/></source><target dev='vda'/></disk></devices></domain>";
        assert_eq!(parse(xml, &run_dir).unwrap().disks.len(), 1);
    }

    #[test]
    fn no_disks_and_errors() {
        assert!(parse("<domain><name>x</name></domain>", &run_dir).unwrap().disks.is_empty());
        assert!(matches!(parse("<domain><name>x", &run_dir), Err(DomainXmlError::Malformed(_))));
        assert_eq!(parse("<domain/>", &run_dir), Err(DomainXmlError::NoName));
        assert!(matches!(parse("<pool><name>x</name></pool>", &run_dir), Err(DomainXmlError::Malformed(_))));
        let mismatch = OVERLAY.replace("name='debian12'", "name='other'");
        assert!(matches!(parse(&mismatch, &run_dir), Err(DomainXmlError::BadDisk { .. })));
        let hostile = OVERLAY.replace("exports/debian12.sock", "exports/a &quot;b.sock").replace("name='debian12'", "");
        assert!(matches!(parse(&hostile, &run_dir), Err(DomainXmlError::BadDisk { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let _ = parse(&s, &run_dir);
        }

        #[test]
        fn mutated_xml_never_panics(cut in 0usize..2000, junk in "[<>'\"/a-z ]{0,8}") {
            let cut = cut.min(OVERLAY.len());
            if OVERLAY.is_char_boundary(cut) {
                let s = format!("{}{}{}", &OVERLAY[..cut], junk, &OVERLAY[cut..]);
                let _ = parse(&s, &run_dir);
            }
        }
    }
}
