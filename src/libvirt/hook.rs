//! The qemu hook's logic (`/etc/libvirt/hooks/qemu.d/vmthunder` → `vmt-hook`).
//!
//! libvirt runs the hook as `NAME OP SUBOP -` with the domain XML on stdin. On `prepare begin`
//! the hook asks each vmtd named by the domain's disks to assemble their exports, and fails the
//! start with a one-line reason when it cannot; on `release end` it drops the domain's holds.
//! Domains without vmthunder disks never reach vmtd. The hook never calls the libvirt API
//! (libvirtd waits on the hook: it would deadlock) and never hands XML text to a shell.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::domain::{self, DomainXmlError};
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

/// Decides what to do for (`op`, `sub_op`) given the domain XML (read only when needed).
pub fn plan(
    op: &str,
    sub_op: &str,
    read_xml: impl FnOnce() -> String,
    is_run_dir: &dyn Fn(&Path) -> bool,
) -> Result<Plan, HookError> {
    let assemble = match (op, sub_op) {
        ("prepare", "begin") => true,
        ("release", "end") => false,
        _ => return Ok(Plan::Nothing),
    };
    let d = domain::parse(&read_xml(), is_run_dir)?;
    if d.disks.is_empty() {
        return Ok(Plan::Nothing);
    }
    let mut by_run_dir: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for disk in d.disks {
        let images = by_run_dir.entry(disk.run_dir).or_default();
        if !images.contains(&disk.image) {
            images.push(disk.image);
        }
    }
    Ok(if assemble {
        Plan::Assemble { domain: d.name, by_run_dir }
    } else {
        Plan::Release { domain: d.name, run_dirs: by_run_dir.into_keys().collect() }
    })
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

    #[test]
    fn plans_by_event() {
        assert_eq!(plan("started", "begin", || panic!("XML not needed"), &rd).unwrap(), Plan::Nothing);
        match plan("prepare", "begin", || XML.into(), &rd).unwrap() {
            Plan::Assemble { domain, by_run_dir } => {
                assert_eq!(domain, "vm");
                assert_eq!(by_run_dir[Path::new("/run/vmthunder")], vec!["img".to_string()]);
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(plan("release", "end", || XML.into(), &rd).unwrap(), Plan::Release { .. }));
        let plain = "<domain><name>vm</name><devices/></domain>";
        assert_eq!(plan("prepare", "begin", || plain.into(), &rd).unwrap(), Plan::Nothing);
        assert!(plan("prepare", "begin", || "<<".into(), &rd).is_err());
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
