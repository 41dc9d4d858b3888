//! The vmthunder storage pool: a libvirt `dir` pool holding one persistent qcow2 overlay per VM,
//! each backed by an image's NBD export. Guest writes land in the overlay and survive domain
//! restarts; the base image stays read-only and shared.
//!
//! Names given by operators are checked against the image-name alphabet before anything
//! touches the file system, so a volume can never land outside the pool directory; `qemu-img`
//! is run with an argument vector, never through a shell.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;
use virt::connect::Connect;

use super::{xml_escape, SYSTEM_URI};
use crate::config::validate_name;

/// Errors managing the pool and its volumes.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("volume name: {0}")]
    BadName(String),
    #[error("pool {pool}: {message}")]
    Pool { pool: String, message: String },
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("qemu-img create failed: {0}")]
    QemuImg(String),
}

fn lv(e: virt::error::Error) -> PoolError {
    PoolError::Libvirt(e.to_string())
}

pub fn connect() -> Result<Connect, PoolError> {
    // libvirt prints every error to stderr by default; ours are returned and reported once.
    virt::error::clear_error_callback();
    Connect::open(Some(SYSTEM_URI)).map_err(lv)
}

/// Defines, builds, starts and autostarts pool `name` at `path` (each step only if needed).
/// Returns the pool's directory.
pub fn define(name: &str, path: &Path) -> Result<PathBuf, PoolError> {
    validate_name(name).map_err(PoolError::BadName)?;
    if !path.is_absolute() {
        return Err(PoolError::Pool {
            pool: name.into(),
            message: format!("{} must be an absolute path", path.display()),
        });
    }
    let conn = connect()?;
    let pool = match conn.lookup_storage_pool_by_name(name) {
        Ok(p) => p,
        Err(_) => {
            let xml = format!(
                "<pool type='dir'><name>{}</name><target><path>{}</path><permissions><mode>0711</mode></permissions></target></pool>",
                xml_escape(name),
                xml_escape(&path.display().to_string())
            );
            let p = conn.define_storage_pool_xml(&xml, 0).map_err(lv)?;
            p.build(0).map_err(lv)?;
            p
        }
    };
    if !pool.is_active().map_err(lv)? {
        pool.create(0).map_err(lv)?;
    }
    if !pool.autostart().map_err(lv)? {
        pool.set_autostart(true).map_err(lv)?;
    }
    pool_dir(&conn, name)
}

/// The directory of pool `name`.
pub fn pool_dir(conn: &Connect, name: &str) -> Result<PathBuf, PoolError> {
    let pool = conn
        .lookup_storage_pool_by_name(name)
        .map_err(|e| PoolError::Pool { pool: name.into(), message: format!("{e} (run `vmt pool define` first)") })?;
    let xml = pool.xml_desc(0).map_err(lv)?;
    let doc = roxmltree::Document::parse(&xml).map_err(|e| PoolError::Libvirt(e.to_string()))?;
    doc.descendants()
        .find(|n| n.has_tag_name("path") && n.parent().is_some_and(|p| p.has_tag_name("target")))
        .and_then(|n| n.text())
        .map(PathBuf::from)
        .ok_or_else(|| PoolError::Pool { pool: name.into(), message: "has no target path".into() })
}

/// Creates volume `vol` in `pool`: a qcow2 overlay of `size` bytes backed by the NBD export
/// of `image` at `socket`, then refreshes the pool. Returns the volume's path.
pub fn create_volume(pool: &str, vol: &str, image: &str, socket: &Path, size: u64) -> Result<PathBuf, PoolError> {
    validate_name(vol).map_err(PoolError::BadName)?;
    validate_name(image).map_err(PoolError::BadName)?;
    let conn = connect()?;
    let dir = pool_dir(&conn, pool)?;
    let path = dir.join(vol);
    if path.exists() {
        return Err(PoolError::Exists(vol.into()));
    }
    let backing = format!("nbd+unix:///{image}?socket={}", socket.display());
    // -u: the size is given, so qemu-img need not open the backing export now.
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b"])
        .arg(&backing)
        .arg(&path)
        .arg(size.to_string())
        .output()
        .map_err(|e| PoolError::QemuImg(e.to_string()))?;
    if !out.status.success() {
        return Err(PoolError::QemuImg(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let p = conn.lookup_storage_pool_by_name(pool).map_err(lv)?;
    p.refresh(0).map_err(lv)?;
    Ok(path)
}

/// Deletes volume `vol` from `pool`.
pub fn delete_volume(pool: &str, vol: &str) -> Result<(), PoolError> {
    validate_name(vol).map_err(PoolError::BadName)?;
    let conn = connect()?;
    let p = conn
        .lookup_storage_pool_by_name(pool)
        .map_err(|e| PoolError::Pool { pool: pool.into(), message: e.to_string() })?;
    p.refresh(0).map_err(lv)?;
    let v =
        p.lookup_storage_vol_by_name(vol).map_err(|e| PoolError::Pool { pool: pool.into(), message: e.to_string() })?;
    v.delete(0).map_err(lv)
}

/// How the printed `<disk>` names the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskForm<'a> {
    /// `<disk type='volume'>`: by pool and volume name.
    Volume,
    /// `<disk type='file'>` at this path: what `virsh migrate --copy-storage-inc` needs, as
    /// libvirt cannot match a volume disk with the overlay made ahead on the destination.
    File(&'a Path),
}

/// The `<disk>` element for a domain using volume `vol`. The explicit `<backingStore>` with
/// `<reconnect>` is what makes QEMU ride out a vmtd restart: libvirt rebuilds the backing
/// chain from the domain XML, not from the qcow2 header.
pub fn disk_xml(
    form: DiskForm,
    pool: &str,
    vol: &str,
    image: &str,
    socket: &Path,
    target: &str,
    reconnect_delay: u32,
) -> String {
    let (kind, source) = match form {
        DiskForm::Volume => ("volume", format!("<source pool='{}' volume='{}'/>", xml_escape(pool), xml_escape(vol))),
        DiskForm::File(path) => ("file", format!("<source file='{}'/>", xml_escape(&path.display().to_string()))),
    };
    format!(
        "<disk type='{kind}' device='disk'>
  <driver name='qemu' type='qcow2'/>
  {source}
  <backingStore type='network'>
    <format type='raw'/>
    <source protocol='nbd' name='{image}'>
      <host transport='unix' socket='{socket}'/>
      <reconnect delay='{reconnect_delay}'/>
    </source>
  </backingStore>
  <target dev='{target}' bus='virtio'/>
</disk>",
        image = xml_escape(image),
        socket = xml_escape(&socket.display().to_string()),
        target = xml_escape(target),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::domain;

    #[test]
    fn disk_xml_is_found_by_the_hook_parser() {
        let file = Path::new("/var/lib/vmthunder/pool/vm1.qcow2");
        for form in [DiskForm::Volume, DiskForm::File(file)] {
            let socket = Path::new("/run/vmthunder/exports/img.sock");
            let disk = disk_xml(form, "vmthunder", "vm1.qcow2", "img", socket, "vda", 10);
            let dom = format!("<domain><name>vm1</name><devices>{disk}</devices></domain>");
            let d = domain::parse(&dom, &|p: &Path| p == Path::new("/run/vmthunder")).unwrap();
            assert_eq!(d.disks.len(), 1);
            assert_eq!(d.disks[0].image, "img");
            assert!(disk.contains("<reconnect delay='10'/>"));
            assert_eq!(disk.contains("<source file='/var/lib/vmthunder/pool/vm1.qcow2'/>"), form != DiskForm::Volume);
        }
    }

    #[test]
    fn hostile_names_refused_before_any_libvirt_call() {
        for bad in ["../x", "a b", "x'y", ".hidden", ""] {
            assert!(
                matches!(create_volume("vmthunder", bad, "img", Path::new("/s"), 1), Err(PoolError::BadName(_))),
                "{bad}"
            );
            assert!(matches!(delete_volume("vmthunder", bad), Err(PoolError::BadName(_))));
        }
    }
}
