//! Crash-safe file helpers.
//!
//! A file is published by writing a temporary file next to it, fsyncing that file, renaming
//! it over the final name and fsyncing the directory. After a crash the final name holds
//! either the old content or the new, never a mix, and once [`write_atomic`] returns the new
//! content survives power loss.
//!
//! A failed fsync is not retried: after a failure the kernel may have dropped the dirty
//! pages, so a later fsync can succeed without the data being on disk. Every fsync error is
//! returned as [`DurableError::Fsync`], which callers treat as fatal for the process.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// fsync/fdatasync failed. Fatal: the process must stop rather than carry on.
    #[error("fsync of {path} failed: {source}; stopping, because data not known to be on disk must never be acknowledged")]
    Fsync { path: PathBuf, source: io::Error },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl DurableError {
    pub fn is_fsync(&self) -> bool {
        matches!(self, DurableError::Fsync { .. })
    }
    pub fn io(what: &'static str, path: &Path, source: io::Error) -> DurableError {
        DurableError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// fsyncs an open file (data and metadata).
pub fn fsync_file(file: &File, path: &Path) -> Result<(), DurableError> {
    file.sync_all().map_err(|source| DurableError::Fsync {
        path: path.to_owned(),
        source,
    })
}

/// fdatasyncs an open file: its data and the metadata needed to read it back.
pub fn fdatasync_file(file: &File, path: &Path) -> Result<(), DurableError> {
    file.sync_data().map_err(|source| DurableError::Fsync {
        path: path.to_owned(),
        source,
    })
}

/// fsyncs a directory, making the creations, renames and removals in it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    let d = File::open(dir).map_err(|e| DurableError::io("open directory", dir, e))?;
    d.sync_all().map_err(|source| DurableError::Fsync {
        path: dir.to_owned(),
        source,
    })
}

/// The temporary name used while publishing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Atomically replaces `path` with `contents`: temp file, fsync, rename, fsync directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), DurableError> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| DurableError::io("create", &tmp, e))?;
    f.write_all(contents)
        .map_err(|e| DurableError::io("write", &tmp, e))?;
    fsync_file(&f, &tmp)?;
    drop(f);
    publish(&tmp, path)
}

/// Renames a fully written and fsynced temporary file into place and fsyncs the directory.
pub fn publish(tmp: &Path, path: &Path) -> Result<(), DurableError> {
    fs::rename(tmp, path).map_err(|e| DurableError::io("rename into place", path, e))?;
    fsync_dir(parent_dir(path))
}

/// Removes a file and makes the removal durable.
pub fn remove_durable(path: &Path) -> Result<(), DurableError> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_dir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DurableError::io("remove", path, e)),
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("walship-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!temp_path(&p).exists());
        remove_durable(&p).unwrap();
        remove_durable(&p).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
