//! A local (or locally mounted) image file as origin. Reads run on the blocking pool so a slow
//! disk never stalls the daemon's network tasks.
//!
//! The file is opened at the first read, not at start, and opened again after a read fails: an
//! origin on a mount that is not up yet (NFS at boot) or that came back must not stop the node
//! from serving what it has cached.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BoxFuture, ChunkSource, SourceError};

/// An image file read with `pread`.
pub struct FileSource {
    path: PathBuf,
    file: Mutex<Option<Arc<File>>>,
}

impl FileSource {
    /// A source reading `path`; nothing is opened yet.
    pub fn new(path: &Path) -> Self {
        FileSource { path: path.to_path_buf(), file: Mutex::new(None) }
    }

    /// A source reading `path`, opened now (an error if it cannot be).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path).map_err(|e| unreachable(path, e))?;
        Ok(FileSource { path: path.to_path_buf(), file: Mutex::new(Some(Arc::new(file))) })
    }

    /// Runs `f` on the file on the blocking pool, opening it first if needed. A failure closes
    /// the file, so the next call opens the path afresh.
    async fn with_file<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> Result<T, SourceError> + Send + 'static,
    ) -> Result<T, SourceError> {
        let (path, cached) = (self.path.clone(), self.file.lock().unwrap().clone());
        let (file, result) = tokio::task::spawn_blocking(move || {
            let file = match cached {
                Some(f) => f,
                None => match File::open(&path) {
                    Ok(f) => Arc::new(f),
                    Err(e) => return (None, Err(unreachable(&path, e))),
                },
            };
            let r = f(&file);
            (Some(file), r)
        })
        .await
        .map_err(|e| SourceError::Io { what: self.path.display().to_string(), reason: e.to_string() })?;
        *self.file.lock().unwrap() = if result.is_ok() { file } else { None };
        result
    }
}

fn unreachable(path: &Path, e: std::io::Error) -> SourceError {
    SourceError::Unreachable { what: path.display().to_string(), reason: e.to_string() }
}

impl ChunkSource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        let what = self.path.display().to_string();
        Box::pin(async move {
            self.with_file(move |f| {
                f.metadata().map(|m| m.len()).map_err(|e| SourceError::Io { what, reason: e.to_string() })
            })
            .await
        })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        let (what, describe) = (self.path.display().to_string(), self.describe());
        Box::pin(async move {
            self.with_file(move |file| {
                let io = |e: std::io::Error| SourceError::Io { what: what.clone(), reason: e.to_string() };
                let size = file.metadata().map_err(io)?.len();
                if !crate::image::geometry::within(offset, len as u64, size) {
                    return Err(SourceError::OutOfRange { what: describe, offset, len, size });
                }
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map_err(io)?;
                Ok(buf)
            })
            .await
        })
    }
}
