//! The qemu hook's logic (`/etc/libvirt/hooks/qemu.d/vmthunder` → `vmt-hook`).
//!
//! libvirt runs the hook as `NAME OP SUBOP -` with the domain XML on stdin. On `prepare begin`,
//! `restore begin` (virsh restore, managed save) and `migrate begin` (the destination of an
//! incoming migration) the hook asks each vmtd named by the domain's disks to assemble their
//! exports, and fails the start with a one-line reason when it cannot; on `release end` it drops
//! the domain's holds. `restore` and `migrate` treat the hook as a filter of the XML: it prints
//! nothing, which libvirt reads as "unchanged" (it never needs to rewrite it: the export's path
//! is the same on every node). Domains without vmthunder disks never reach vmtd. The hook never
//! calls the libvirt API (libvirtd waits on the hook: it would deadlock) and never hands XML
//! text to a shell.
//!
//! A disk reads from vmthunder when its XML names an export (its source or `<backingStore>`
//! chain), or when its file (a `type='file'` or `'block'` disk's, or a `type='volume'` disk's,
//! found through libvirt's pool files) has a qcow2 backing chain that ends at one.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::domain::{self, Candidate, DiskSource, DomainXmlError};
use crate::daemon::control::{self, Request, Response};
use crate::daemon::RUN_DIR_MARKER;

/// How long the hook waits for vmtd: bounded, so `virsh start` never hangs on it.
pub const VMTD_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors that fail a domain start.
#[derive(Debug, Error)]
pub enum HookError {
    #[error(transparent)]
    Xml(#[from] DomainXmlError),
    #[error("vmtd ({control}): {message}")]
    Vmtd { control: String, message: String },
    #[error("disk {disk}: {message}")]
    Disk { disk: String, message: String },
}

/// What the hook has to do for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not our event, or no vmthunder disk.
    Nothing,
    /// Assemble these images, grouped by vmtd run directory.
    Assemble { domain: String, by_run_dir: BTreeMap<PathBuf, Vec<String>> },
    /// Drop the domain's holds at these vmtds.
    Release { domain: String, run_dirs: Vec<PathBuf> },
}

/// Looks into a candidate disk: the (image, run directory) its backing chain ends at, if any.
pub type Probe<'a> = &'a dyn Fn(&Candidate) -> Result<Option<(String, PathBuf)>, String>;

/// Decides what to do for (`op`, `sub_op`) given the domain XML (read only when needed).
/// Candidate disks are looked into with `probe`; a probe that fails fails a start (a release
/// goes on with the disks it could recognise).
pub fn plan(
    op: &str,
    sub_op: &str,
    read_xml: impl FnOnce() -> String,
    is_run_dir: &dyn Fn(&Path) -> bool,
    probe: Probe,
) -> Result<Plan, HookError> {
    let assemble = match (op, sub_op) {
        ("prepare" | "restore" | "migrate", "begin") => true,
        ("release", "end") => false,
        _ => return Ok(Plan::Nothing),
    };
    let d = domain::parse(&read_xml(), is_run_dir)?;
    let mut found: Vec<(String, PathBuf)> = d.disks.into_iter().map(|disk| (disk.image, disk.run_dir)).collect();
    for c in &d.candidates {
        match probe(c) {
            Ok(Some(export)) => found.push(export),
            Ok(None) => {}
            Err(message) if assemble => return Err(HookError::Disk { disk: c.target.clone(), message }),
            Err(_) => {}
        }
    }
    if found.is_empty() {
        return Ok(Plan::Nothing);
    }
    let mut by_run_dir: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for (image, run_dir) in found {
        let images = by_run_dir.entry(run_dir).or_default();
        if !images.contains(&image) {
            images.push(image);
        }
    }
    Ok(if assemble {
        Plan::Assemble { domain: d.name, by_run_dir }
    } else {
        Plan::Release { domain: d.name, run_dirs: by_run_dir.into_keys().collect() }
    })
}

/// The probe the hook uses: the candidate's file (a volume's through libvirt's pool files in
/// `pool_dirs`), then its qcow2 backing chain, then the export socket the chain ends at.
pub fn probe_disk(
    c: &Candidate,
    pool_dirs: &[&Path],
    is_run_dir: &dyn Fn(&Path) -> bool,
) -> Result<Option<(String, PathBuf)>, String> {
    let path = match &c.source {
        DiskSource::Path(p) => p.clone(),
        DiskSource::Volume { pool, volume } => match super::storage::volume_path(pool_dirs, pool, volume)? {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    // A disk root cannot see or read is libvirt's to deal with, not ours: one to be created by
    // an incoming migration, an optional one, one on NFS with root squash.
    if std::fs::metadata(&path).is_err() {
        return Ok(None);
    }
    let end = match super::qcow2::chain_end(&path) {
        Err(super::qcow2::ChainError::NoAccess { .. }) => return Ok(None),
        end => end.map_err(|e| e.to_string())?,
    };
    match end {
        super::qcow2::ChainEnd::Local => Ok(None),
        super::qcow2::ChainEnd::Network(name) => match super::qcow2::nbd_unix(&name) {
            Some((export, socket)) => {
                domain::export_of(&socket, Some(&export), is_run_dir).map_err(|e| format!("backing {name}: {e}"))
            }
            None => Ok(None),
        },
    }
}

/// A directory is a vmtd run directory when it is the configured one, or when it holds the
/// root-owned marker vmtd writes at start (kept while vmtd is stopped).
pub fn run_dir_check(configured: PathBuf) -> impl Fn(&Path) -> bool {
    move |dir: &Path| {
        dir == configured
            || std::fs::symlink_metadata(dir.join(RUN_DIR_MARKER)).is_ok_and(|m| m.is_file() && m.uid() == 0)
    }
}

/// Carries out `plan`. Release errors are logged only: the domain is gone either way.
pub async fn execute(plan: Plan) -> Result<(), HookError> {
    match plan {
        Plan::Nothing => Ok(()),
        Plan::Assemble { domain, by_run_dir } => {
            for (run_dir, images) in by_run_dir {
                let control = run_dir.join("control.sock");
                let fail = |message: String| HookError::Vmtd { control: control.display().to_string(), message };
                match control::call(&control, &Request::Assemble { domain: domain.clone(), images }, VMTD_TIMEOUT).await
                {
                    Ok(Response::Assembled { .. }) => {}
                    Ok(Response::Error { message }) => return Err(fail(message)),
                    Ok(other) => return Err(fail(format!("unexpected answer {other:?}"))),
                    Err(e @ control::ControlError::Connect { .. }) => {
                        return Err(fail(format!("{e} (is vmtd running?)")))
                    }
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            Ok(())
        }
        Plan::Release { domain, run_dirs } => {
            for run_dir in run_dirs {
                let control = run_dir.join("control.sock");
                if let Err(e) =
                    control::call(&control, &Request::Release { domain: domain.clone() }, VMTD_TIMEOUT).await
                {
                    eprintln!("vmthunder: releasing {domain} at {}: {e}", control.display());
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(p: &Path) -> bool {
        p == Path::new("/run/vmthunder")
    }

    const XML: &str = "<domain><name>vm</name><devices><disk type='network'><source protocol='nbd' name='img'><host transport='unix' socket='/run/vmthunder/exports/img.sock'/></source><target dev='vda'/></disk></devices></domain>";

    fn no_probe(_: &Candidate) -> Result<Option<(String, PathBuf)>, String> {
        panic!("no candidate expected")
    }

    #[test]
    fn plans_by_event() {
        assert_eq!(plan("started", "begin", || panic!("XML not needed"), &rd, &no_probe).unwrap(), Plan::Nothing);
        for op in ["restore", "migrate"] {
            assert!(matches!(plan(op, "begin", || XML.into(), &rd, &no_probe).unwrap(), Plan::Assemble { .. }), "{op}");
        }
        match plan("prepare", "begin", || XML.into(), &rd, &no_probe).unwrap() {
            Plan::Assemble { domain, by_run_dir } => {
                assert_eq!(domain, "vm");
                assert_eq!(by_run_dir[Path::new("/run/vmthunder")], vec!["img".to_string()]);
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(plan("release", "end", || XML.into(), &rd, &no_probe).unwrap(), Plan::Release { .. }));
        let plain = "<domain><name>vm</name><devices/></domain>";
        assert_eq!(plan("prepare", "begin", || plain.into(), &rd, &no_probe).unwrap(), Plan::Nothing);
        assert!(plan("prepare", "begin", || "<<".into(), &rd, &no_probe).is_err());
    }

    #[test]
    fn candidates_are_probed_and_a_failed_probe_fails_only_a_start() {
        let xml = "<domain><name>vm</name><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/vm.qcow2'/><target dev='vda'/></disk></devices></domain>";
        // A raw disk, or one whose chain is in the XML, is never looked into.
        for other in [xml.replace("type='qcow2'", "type='raw'"), xml.replace("<target", "<backingStore/><target")] {
            assert_eq!(plan("prepare", "begin", || other.clone(), &rd, &no_probe).unwrap(), Plan::Nothing);
        }
        let found = |_: &Candidate| Ok(Some(("img".to_string(), PathBuf::from("/run/vmthunder"))));
        assert!(matches!(plan("prepare", "begin", || xml.into(), &rd, &found).unwrap(), Plan::Assemble { .. }));
        let local = |_: &Candidate| Ok(None);
        assert_eq!(plan("prepare", "begin", || xml.into(), &rd, &local).unwrap(), Plan::Nothing);
        let broken = |_: &Candidate| Err("backing chain loops".to_string());
        let err = plan("prepare", "begin", || xml.into(), &rd, &broken).unwrap_err().to_string();
        assert!(err.contains("vda") && err.contains("loops"), "{err}");
        assert_eq!(plan("release", "end", || xml.into(), &rd, &broken).unwrap(), Plan::Nothing);
    }

    #[tokio::test]
    async fn unreachable_vmtd_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut by_run_dir = BTreeMap::new();
        by_run_dir.insert(dir.path().to_path_buf(), vec!["img".to_string()]);
        let err = execute(Plan::Assemble { domain: "vm".into(), by_run_dir }).await.unwrap_err().to_string();
        assert!(err.contains("is vmtd running?") && err.contains("control.sock"), "{err}");
    }
}
