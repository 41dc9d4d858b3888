//! A local (or locally mounted) image file as origin. Reads run on the blocking pool so a slow
//! disk never stalls the daemon's network tasks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BoxFuture, ChunkSource, SourceError};

/// An image file read with `pread`.
pub struct FileSource {
    path: PathBuf,
    file: Arc<File>,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = File::open(path)
            .map_err(|e| SourceError::Unreachable { what: path.display().to_string(), reason: e.to_string() })?;
        Ok(FileSource { path: path.to_path_buf(), file: Arc::new(file) })
    }

    fn io(&self, e: impl ToString) -> SourceError {
        SourceError::Io { what: self.path.display().to_string(), reason: e.to_string() }
    }
}

impl ChunkSource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move { self.file.metadata().map(|m| m.len()).map_err(|e| self.io(e)) })
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move {
            let file = self.file.clone();
            let size = file.metadata().map_err(|e| self.io(e))?.len();
            if !crate::image::geometry::within(offset, len as u64, size) {
                return Err(SourceError::OutOfRange { what: self.describe(), offset, len, size });
            }
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(|e| self.io(e))?
            .map_err(|e| self.io(e))
        })
    }
}
