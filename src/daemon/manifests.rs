//! The manifest of an image served from a file origin: built by reading the file once, and
//! remembered beside the image's cache with a stamp of the file's identity, so that a restart
//! reuses it while the file is unchanged (and while the file is missing, the cache serves on).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::fsutil;
use crate::image::{ChunkSize, Geometry, Manifest, ManifestError};

/// The manifest of a file origin: reused while the file's identity (path, size, mtime, inode)
/// and the chunk size are unchanged, else built by reading the file once.
pub(super) fn file_manifest(path: &Path, dir: &Path, name: &str, chunk: ChunkSize) -> Result<Manifest, ManifestError> {
    let io = |source: std::io::Error| ManifestError::Io { path: path.display().to_string(), source };
    let (mpath, spath) = (dir.join(format!("{name}.manifest")), dir.join(format!("{name}.stamp")));
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        // The origin is not there (a mount not up yet): serve what the cache holds under the
        // manifest built last time, and read the origin once it is back.
        Err(e) => match Manifest::load(&mpath) {
            Ok(m) if m.geometry().chunk_size() == chunk => {
                tracing::warn!(file = %path.display(), error = %e,
                    "origin unavailable; using the manifest remembered from its last build");
                return Ok(m);
            }
            _ => return Err(io(e)),
        },
    };
    let stamp = format!(
        "{}\n{}\n{}.{}\n{}\n{}\n",
        path.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
        chunk.bytes()
    );
    if std::fs::read_to_string(&spath).ok().as_deref() == Some(stamp.as_str()) {
        if let Ok(m) = Manifest::load(&mpath) {
            return Ok(m);
        }
    }
    tracing::info!(file = %path.display(), "building manifest (reading the image once)");
    let m = build_file_manifest(path, chunk)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    m.save(&mpath)?;
    fsutil::write_atomic(&spath, stamp.as_bytes(), 0o644).map_err(io)?;
    Ok(m)
}

/// Builds the manifest of an image file by reading it once.
fn build_file_manifest(path: &Path, chunk: ChunkSize) -> Result<Manifest, ManifestError> {
    use std::io::Read;
    let io = |source: std::io::Error| ManifestError::Io { path: path.display().to_string(), source };
    let mut f = std::io::BufReader::with_capacity(4 << 20, std::fs::File::open(path).map_err(io)?);
    let size = f.get_ref().metadata().map_err(io)?.len();
    let g = Geometry::new(size, chunk)?;
    Manifest::build(g, |_, buf| f.read_exact(buf)).map_err(io)
}
