//! `CopyFile`: files, directories and symlinks created below the shared containers
//! directory by the host, for VMs that share no file system with it (peer pods): their
//! volumes (configMaps, secrets, CRI's hosts/resolv.conf, the sandbox's pause root) are
//! copied in this way.
//!
//! The path is checked lexically, every component is then resolved from the base directory
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so nothing walks a symlink; the
//! entry is made relative to its parent's fd. A file is written to a staging name and
//! renamed over the target with its last chunk; a symlink is made at a staging name and
//! renamed, so an update (Kubernetes swaps `..data` links) is seen whole or not at all.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::paths::{check_under, PathError};

/// The largest chunk one request may carry.
pub const MAX_CHUNK: usize = 1 << 20;
/// The largest file the agent accepts in total.
pub const MAX_FILE: u64 = 64 << 20;

/// What to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One CopyFile request, checked.
#[derive(Debug, Clone)]
pub struct Copy {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
    pub offset: u64,
    pub last: bool,
    pub target: String,
}

/// A refused or failed copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("invalid path")]
    Path(#[source] PathError),
    #[error("a chunk of {size} bytes is larger than {MAX_CHUNK}")]
    ChunkTooLarge { size: usize },
    #[error("{path:?} would be {size} bytes, more than {MAX_FILE}")]
    FileTooLarge { path: PathBuf, size: u64 },
    #[error("mode {0:o} has bits beyond 07777")]
    Mode(u32),
    #[error("empty symlink target for {0:?}")]
    NoTarget(PathBuf),
    #[error("{0:?} goes through a symlink")]
    Symlink(PathBuf),
    #[error("cannot make {path:?}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CopyError {
    /// Whether the request itself is at fault (as opposed to the guest).
    pub fn is_invalid_request(&self) -> bool {
        !matches!(self, CopyError::Io { .. })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CopyError + '_ {
    move |source| match source.raw_os_error() {
        Some(libc::ELOOP | libc::EXDEV) => CopyError::Symlink(path.to_owned()),
        _ => CopyError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("checked: no NUL")
}

/// Applies `copy` below `base`.
pub async fn copy_file(base: &Path, copy: Copy) -> Result<(), CopyError> {
    let path = check_under(base, &copy.path).map_err(CopyError::Path)?;
    if copy.data.len() > MAX_CHUNK {
        return Err(CopyError::ChunkTooLarge {
            size: copy.data.len(),
        });
    }
    let end = copy.offset.saturating_add(copy.data.len() as u64);
    if end > MAX_FILE {
        return Err(CopyError::FileTooLarge { path, size: end });
    }
    if copy.mode & !0o7777 != 0 {
        return Err(CopyError::Mode(copy.mode));
    }
    if copy.kind == Kind::Symlink && copy.target.is_empty() {
        return Err(CopyError::NoTarget(path));
    }
    let base = base.to_owned();
    tokio::task::spawn_blocking(move || apply(&base, &path, &copy))
        .await
        .map_err(|e| CopyError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

const BENEATH: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;

fn apply(base: &Path, path: &Path, copy: &Copy) -> Result<(), CopyError> {
    std::fs::create_dir_all(base).map_err(io(base))?;
    let base_fd = crate::resolve::open_dir(base).map_err(io(base))?;
    let rel = path.strip_prefix(base).unwrap_or(path);
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let name = Path::new(
        rel.file_name()
            .expect("checked: a normalized path below base"),
    );
    let parent = if parent_rel.as_os_str().is_empty() {
        base_fd
    } else {
        crate::resolve::mkdir_all(&base_fd, parent_rel, 0o755, BENEATH).map_err(io(path))?
    };
    match copy.kind {
        Kind::Dir => {
            let dir =
                crate::resolve::mkdir_all(&parent, name, copy.mode, BENEATH).map_err(io(path))?;
            // mkdir_all hands out O_PATH fds, which fchmod refuses: reopen it for reading.
            let flags = libc::O_RDONLY | libc::O_DIRECTORY;
            let dir = crate::resolve::openat2(dir.as_raw_fd(), Path::new(""), flags, 0, BENEATH)
                .map_err(io(path))?;
            set_owner_mode(&dir, copy, path)
        }
        Kind::Symlink => {
            let staging = staging_name(name);
            let target = CString::new(copy.target.as_bytes())
                .map_err(|_| CopyError::NoTarget(path.to_owned()))?;
            // SAFETY: plain syscalls on a valid directory fd and NUL-terminated strings.
            unsafe {
                libc::unlinkat(parent.as_raw_fd(), cstr(&staging).as_ptr(), 0);
                if libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), cstr(&staging).as_ptr())
                    != 0
                {
                    return Err(io(path)(std::io::Error::last_os_error()));
                }
            }
            rename(&parent, &staging, name, path)
        }
        Kind::File => {
            let staging = staging_name(name);
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW;
            let flags = if copy.offset == 0 {
                flags | libc::O_TRUNC
            } else {
                flags
            };
            let fd = crate::resolve::openat2(parent.as_raw_fd(), &staging, flags, 0o600, BENEATH)
                .map_err(io(path))?;
            let file = std::fs::File::from(fd);
            use std::os::unix::fs::FileExt;
            file.write_all_at(&copy.data, copy.offset)
                .map_err(io(path))?;
            if copy.last {
                set_owner_mode(&OwnedFd::from(file), copy, path)?;
                rename(&parent, &staging, name, path)?;
            }
            Ok(())
        }
    }
}

/// `.name.kata-copy`: where a file or link is prepared before it replaces `name`.
fn staging_name(name: &Path) -> PathBuf {
    let mut s = std::ffi::OsString::from(".");
    s.push(name.as_os_str());
    s.push(".kata-copy");
    PathBuf::from(s)
}

fn rename(dir: &OwnedFd, from: &Path, to: &Path, path: &Path) -> Result<(), CopyError> {
    // SAFETY: plain syscall on a valid directory fd and NUL-terminated names.
    let r = unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            cstr(from).as_ptr(),
            dir.as_raw_fd(),
            cstr(to).as_ptr(),
        )
    };
    if r != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_owner_mode(fd: &OwnedFd, copy: &Copy, path: &Path) -> Result<(), CopyError> {
    // SAFETY: plain syscalls on a valid fd.
    unsafe {
        if libc::fchown(fd.as_raw_fd(), copy.uid, copy.gid) != 0
            || libc::fchmod(fd.as_raw_fd(), copy.mode) != 0
        {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn req(path: String, kind: Kind) -> Copy {
        Copy {
            path,
            kind,
            mode: 0o644,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            data: Vec::new(),
            offset: 0,
            last: true,
            target: String::new(),
        }
    }

    #[tokio::test]
    async fn files_dirs_and_links_are_made_whole_and_never_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("containers");
        let p = |rel: &str| format!("{}/{rel}", base.display());
        // A file in two chunks: invisible until the last one.
        let mut first = req(p("c1/mounts/0/config.yaml"), Kind::File);
        first.data = b"hello ".to_vec();
        first.last = false;
        copy_file(&base, first).await.unwrap();
        assert!(!base.join("c1/mounts/0/config.yaml").exists());
        let mut second = req(p("c1/mounts/0/config.yaml"), Kind::File);
        second.data = b"world".to_vec();
        second.offset = 6;
        second.mode = 0o600;
        copy_file(&base, second).await.unwrap();
        let file = base.join("c1/mounts/0/config.yaml");
        assert_eq!(std::fs::read(&file).unwrap(), b"hello world");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A directory and a link that replaces an older one.
        let mut d = req(p("c1/mounts/1"), Kind::Dir);
        d.mode = 0o750;
        copy_file(&base, d).await.unwrap();
        assert_eq!(
            std::fs::metadata(base.join("c1/mounts/1"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        for target in ["..2024_1", "..2024_2"] {
            let mut l = req(p("c1/mounts/1/..data"), Kind::Symlink);
            l.target = target.into();
            copy_file(&base, l).await.unwrap();
        }
        assert_eq!(
            std::fs::read_link(base.join("c1/mounts/1/..data")).unwrap(),
            PathBuf::from("..2024_2")
        );
        // Nothing goes through a symlink, even one inside the base.
        std::os::unix::fs::symlink("/etc", base.join("c1/evil")).unwrap();
        let e = copy_file(&base, req(p("c1/evil/passwd"), Kind::File))
            .await
            .unwrap_err();
        assert!(matches!(e, CopyError::Symlink(_)), "{e:?}");
        assert!(e.is_invalid_request());
        let e = copy_file(&base, req("/etc/passwd".into(), Kind::File))
            .await
            .unwrap_err();
        assert!(matches!(e, CopyError::Path(_)), "{e:?}");
        let mut big = req(p("c1/big"), Kind::File);
        big.offset = MAX_FILE;
        big.data = vec![0; 1];
        assert!(matches!(
            copy_file(&base, big).await.unwrap_err(),
            CopyError::FileTooLarge { .. }
        ));
    }
}
