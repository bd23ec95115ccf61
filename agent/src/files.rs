//! `ReadFile`: reading a small file below the base directory.
//!
//! The path is checked lexically ([`check_under`]), then opened with `openat2` relative to
//! the base directory with `RESOLVE_BENEATH`: a symlink may lead elsewhere below the base,
//! never out of it, and nothing is resolved twice (no check-then-open race).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::paths::{check_under, PathError};

/// A refused or failed read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not acceptable.
    #[error("invalid path")]
    Path(#[source] PathError),
    /// The file does not exist.
    #[error("{0:?} not found")]
    NotFound(PathBuf),
    /// The path resolves (through symlinks) to outside the base directory.
    #[error("{0:?} resolves outside the base directory")]
    Escapes(PathBuf),
    /// The path is not a regular file.
    #[error("{0:?} is not a regular file")]
    NotRegular(PathBuf),
    /// The request asks for more than the agent ever reads at once.
    #[error("max_bytes {max_bytes} exceeds the limit of {cap} bytes")]
    LimitTooLarge { max_bytes: u64, cap: u64 },
    /// The file is larger than the caller accepts.
    #[error("{path:?} is {size} bytes, more than max_bytes {max}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The caller's limit.
        max: u64,
    },
    /// An I/O error.
    #[error("read {path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The largest `max_bytes` a ReadFile request may ask for.
pub const MAX_READ_BYTES: u64 = 16 << 20;

fn io_err(path: &Path, source: std::io::Error) -> FileError {
    if source.kind() == std::io::ErrorKind::NotFound {
        FileError::NotFound(path.to_owned())
    } else {
        FileError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Reads `path` (below `base`) if it is a regular file of at most `max_bytes` bytes.
pub async fn read_file(base: &Path, path: &str, max_bytes: u64) -> Result<Vec<u8>, FileError> {
    let path = check_under(base, path).map_err(FileError::Path)?;
    // The agent is PID 1: a request must not make it allocate without bound.
    if max_bytes > MAX_READ_BYTES {
        return Err(FileError::LimitTooLarge {
            max_bytes,
            cap: MAX_READ_BYTES,
        });
    }
    let base = base.to_owned();
    tokio::task::spawn_blocking(move || read_beneath(&base, path, max_bytes))
        .await
        .map_err(|e| FileError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

fn read_beneath(base: &Path, path: PathBuf, max_bytes: u64) -> Result<Vec<u8>, FileError> {
    let base_fd = crate::resolve::open_dir(base).map_err(|e| io_err(base, e))?;
    let rel = path.strip_prefix(base).unwrap_or(&path);
    // O_NONBLOCK: opening a FIFO must not block; it is refused below.
    let fd = crate::resolve::openat2(
        base_fd.as_raw_fd(),
        rel,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::EXDEV | libc::ELOOP) => FileError::Escapes(path.clone()),
        _ => io_err(&path, e),
    })?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| io_err(&path, e))?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(path));
    }
    if meta.len() > max_bytes {
        return Err(FileError::TooLarge {
            path,
            size: meta.len(),
            max: max_bytes,
        });
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| io_err(&path, e))?;
    // The file may have grown since the size check.
    if data.len() as u64 > max_bytes {
        return Err(FileError::TooLarge {
            path,
            size: data.len() as u64,
            max: max_bytes,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_small_files_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::write(base.join("a.txt"), b"hello").unwrap();
        std::fs::create_dir(base.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", base.join("link")).unwrap();
        std::os::unix::fs::symlink("../../..", base.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("../a.txt", base.join("sub/inside")).unwrap();
        let p = |name: &str| format!("{}/{name}", base.display());

        assert_eq!(read_file(base, &p("a.txt"), 5).await.unwrap(), b"hello");
        let e = read_file(base, &p("a.txt"), 4).await.unwrap_err();
        assert!(matches!(
            e,
            FileError::TooLarge {
                size: 5,
                max: 4,
                ..
            }
        ));
        assert!(e.to_string().contains('5') && e.to_string().contains('4'));
        assert!(matches!(
            read_file(base, &p("missing"), 9).await,
            Err(FileError::NotFound(_))
        ));
        assert!(matches!(
            read_file(base, &p("sub"), 9).await,
            Err(FileError::NotRegular(_))
        ));
        assert!(matches!(
            read_file(base, &p("link"), 1 << 20).await,
            Err(FileError::Escapes(_))
        ));
        assert!(matches!(
            read_file(base, &p("sub/up/etc/hostname"), 1 << 20).await,
            Err(FileError::Escapes(_))
        ));
        // A symlink that stays below the base is followed.
        assert_eq!(
            read_file(base, &p("sub/inside"), 5).await.unwrap(),
            b"hello"
        );
        assert!(matches!(
            read_file(base, &p("../x"), 9).await,
            Err(FileError::Path(_))
        ));
        assert!(matches!(
            read_file(base, "/etc/passwd", 1 << 20).await,
            Err(FileError::Path(_))
        ));
    }

    #[tokio::test]
    async fn oversized_limit_is_refused_before_any_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let path = format!("{}/f", dir.path().display());
        let err = read_file(dir.path(), &path, MAX_READ_BYTES + 1)
            .await
            .unwrap_err();
        assert!(matches!(err, FileError::LimitTooLarge { .. }), "{err}");
        assert!(err.to_string().contains(&(MAX_READ_BYTES + 1).to_string()));
    }

    #[tokio::test]
    async fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_file(dir.path(), &fifo.to_string_lossy(), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, FileError::NotRegular(_)), "{err}");
    }
}
