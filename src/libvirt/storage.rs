//! Where a libvirt storage pool keeps its volumes, read from libvirt's own pool files: the hook
//! runs inside libvirtd, which waits for it, so it may not ask libvirt.
//!
//! libvirtd (qemu:///system) writes each running pool's live state to
//! `/run/libvirt/storage/POOL.xml` (the definition inside `<poolstate>`) and each persistent
//! one's definition to `/etc/libvirt/storage/POOL.xml`.
//! Only pools whose volumes are files in a directory (`dir`, `fs`, `netfs`) have a path to look
//! into; for others there is nothing to find.

use std::io::Read;
use std::path::{Path, PathBuf};

/// libvirt's pool files, live definitions first.
pub const POOL_DIRS: [&str; 2] = ["/run/libvirt/storage", "/etc/libvirt/storage"];
/// A pool file larger than this is not libvirt's.
const MAX_POOL_XML: u64 = 1 << 20;

/// A pool or volume name usable as one path component.
fn component(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(format!("{what} name {name:?} is not a single path component"));
    }
    Ok(())
}

/// The file of `volume` in `pool`, from the pool files under `dirs`; `None` when no pool file
/// names the pool or the pool is not a directory of files.
pub fn volume_path(dirs: &[&Path], pool: &str, volume: &str) -> Result<Option<PathBuf>, String> {
    component("pool", pool)?;
    component("volume", volume)?;
    for dir in dirs {
        let file = dir.join(format!("{pool}.xml"));
        let mut text = String::new();
        match std::fs::File::open(&file) {
            Ok(f) => {
                f.take(MAX_POOL_XML).read_to_string(&mut text).map_err(|e| format!("{}: {e}", file.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
        let doc = roxmltree::Document::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        // The live file wraps the definition in <poolstate>.
        let root = match doc.root_element() {
            r if r.has_tag_name("poolstate") => r.children().find(|n| n.has_tag_name("pool")),
            r => Some(r),
        };
        let Some(root) = root.filter(|r| r.has_tag_name("pool")) else { return Ok(None) };
        if !matches!(root.attribute("type"), Some("dir" | "fs" | "netfs")) {
            return Ok(None);
        }
        let path = root
            .children()
            .find(|n| n.has_tag_name("target"))
            .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
            .and_then(|p| p.text())
            .map(str::trim)
            .filter(|p| p.starts_with('/'));
        return Ok(path.map(|p| Path::new(p).join(volume)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_live_definition_first_and_refuses_paths() {
        let (run, etc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dirs = [run.path(), etc.path()];
        let pool = |path: &str| format!("<pool type='dir'><name>p</name><target><path>{path}</path></target></pool>");
        std::fs::write(etc.path().join("p.xml"), pool("/etc-path")).unwrap();
        assert_eq!(volume_path(&dirs, "p", "vm.qcow2"), Ok(Some("/etc-path/vm.qcow2".into())));
        std::fs::write(
            run.path().join("p.xml"),
            format!("<!-- generated -->\n<poolstate>{}</poolstate>", pool("/live")),
        )
        .unwrap();
        assert_eq!(volume_path(&dirs, "p", "vm.qcow2"), Ok(Some("/live/vm.qcow2".into())));
        assert_eq!(volume_path(&dirs, "none", "vm.qcow2"), Ok(None));
        std::fs::write(run.path().join("lvm.xml"), "<pool type='logical'><target><path>/dev/vg</path></target></pool>")
            .unwrap();
        assert_eq!(volume_path(&dirs, "lvm", "lv"), Ok(None));
        for (p, v) in [("../p", "v"), ("p", "../../etc/shadow"), ("p", ""), ("", "v"), ("p", "a/b"), ("p", "..")] {
            assert!(volume_path(&dirs, p, v).is_err(), "{p:?} {v:?}");
        }
        std::fs::write(run.path().join("bad.xml"), "<pool").unwrap();
        assert!(volume_path(&dirs, "bad", "v").is_err());
    }
}
