//! Opening paths so that symlinks cannot lead out of a root, and making directories by file
//! descriptor, so a checked path is never walked again.
//!
//! Everything goes through `openat2(2)` (Linux 5.6) relative to a directory fd:
//! [`IN_ROOT`] resolves symlinks as if the directory were `/` (container roots, as runc's
//! securejoin), [`BENEATH`] refuses any symlink and any escape (the agent's own
//! directories). The result is an fd; the caller mounts onto it (`/proc/self/fd/N` or
//! `move_mount`), reads it or makes nodes relative to it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks resolve inside the directory (absolute ones from it, `..` stops at it).
pub const IN_ROOT: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
/// No symlink, no `..` above the directory, no magic link.
pub const BENEATH: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(dirfd, path, flags, mode, resolve)`; `path` relative (or empty for `.`).
pub fn openat2(
    dir: RawFd,
    path: &Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let rel = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let c = cstring(rel)?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    loop {
        // SAFETY: `c` is a valid C string and `how` a valid open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: openat2 returned a new fd that we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        // RESOLVE_IN_ROOT/BENEATH lookups fail with EAGAIN when a rename raced them.
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Opens a directory to resolve paths under (an `O_PATH` fd).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: `c` is a valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The normal components of `path` (`/`, `.` dropped); `..` is refused.
fn components(path: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::ParentDir => Some(Err(io::Error::from_raw_os_error(libc::EINVAL))),
            _ => None,
        })
        .collect()
}

/// Opens directory `path` under `root` (resolved with `resolve`), creating what is missing
/// with `mode`: the longest existing prefix is opened with `resolve`, the rest is made one
/// component at a time with `mkdirat` and opened without following any symlink (a symlink
/// swapped in meanwhile fails with `ELOOP`). Returns an `O_PATH` fd of the directory.
pub fn mkdir_all(root: &OwnedFd, path: &Path, mode: u32, resolve: u64) -> io::Result<OwnedFd> {
    let parts = components(path)?;
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY;
    let mut existing = parts.len();
    let mut fd = loop {
        let prefix: PathBuf = parts[..existing].iter().collect();
        match openat2(root.as_raw_fd(), &prefix, dir_flags, 0, resolve) {
            Ok(fd) => break fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && existing > 0 => existing -= 1,
            Err(e) => return Err(e),
        }
    };
    for part in &parts[existing..] {
        let c = CString::new(part.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `fd` is an open directory and `c` a valid C string.
        if unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        fd = openat2(fd.as_raw_fd(), Path::new(part), dir_flags, 0, BENEATH)?;
    }
    Ok(fd)
}

/// Opens (creating it as an empty regular file if missing) the file `name` in directory
/// `dir`, never through a symlink. Returns an `O_PATH` fd.
pub fn touch(dir: &OwnedFd, name: &Path, mode: u32) -> io::Result<OwnedFd> {
    match openat2(dir.as_raw_fd(), name, libc::O_PATH, 0, BENEATH) {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let created = openat2(
                dir.as_raw_fd(),
                name,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                mode,
                BENEATH,
            )?;
            drop(created);
            openat2(dir.as_raw_fd(), name, libc::O_PATH, 0, BENEATH)
        }
        Err(e) => Err(e),
    }
}

/// `/proc/self/fd/<fd>`: a path the kernel resolves to exactly the fd's file, for calls
/// that only take paths (mount(2), chmod).
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn real(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(fd_path(fd)).unwrap()
    }

    #[test]
    fn in_root_resolves_symlinks_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root_path = t.path().join("root");
        std::fs::create_dir_all(root_path.join("etc")).unwrap();
        symlink("/etc", root_path.join("abs")).unwrap();
        symlink("../../../..", root_path.join("up")).unwrap();
        let root = open_dir(&root_path).unwrap();
        let fd = mkdir_all(&root, Path::new("abs/new/dir"), 0o755, IN_ROOT).unwrap();
        assert_eq!(real(&fd), root_path.join("etc/new/dir"));
        let fd = mkdir_all(&root, Path::new("up/x"), 0o755, IN_ROOT).unwrap();
        assert_eq!(real(&fd), root_path.join("x"));
        let fd = mkdir_all(&root, Path::new(""), 0o755, IN_ROOT).unwrap();
        assert_eq!(real(&fd), root_path);
    }

    #[test]
    fn a_symlink_swapped_in_after_the_check_stays_inside() {
        // The old way: resolve lexically, then create_dir_all/mount on the joined path,
        // which a symlink placed in between redirects anywhere. By fd it cannot.
        let t = tempfile::tempdir().unwrap();
        let root_path = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&root_path).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let root = open_dir(&root_path).unwrap();
        let resolved = crate::container::fs::secure_join(&root_path, Path::new("/data/x")).unwrap();
        // ...and now "data" becomes a symlink out of the root.
        symlink(&outside, root_path.join("data")).unwrap();
        let rel = resolved.strip_prefix(&root_path).unwrap();
        // The symlink resolves inside the root, where its target does not exist: the
        // component cannot be made, and nothing appears outside.
        let e = mkdir_all(&root, rel, 0o755, IN_ROOT).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert!(!outside.join("x").exists());
        // Where the target exists inside the root, that is where it goes.
        std::fs::create_dir_all(root_path.join(outside.strip_prefix("/").unwrap())).unwrap();
        let fd = mkdir_all(&root, rel, 0o755, IN_ROOT).unwrap();
        assert!(real(&fd).starts_with(&root_path), "{:?}", real(&fd));
        assert!(!outside.join("x").exists());
    }

    #[test]
    fn beneath_refuses_every_symlink_and_escape() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        std::fs::create_dir_all(base.join("real")).unwrap();
        symlink("/etc", base.join("abs")).unwrap();
        symlink("real", base.join("rel")).unwrap();
        let dir = open_dir(&base).unwrap();
        for p in ["abs/x", "rel/x"] {
            let e = mkdir_all(&dir, Path::new(p), 0o755, BENEATH).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{p}");
        }
        assert!(!base.join("real/x").exists());
        let e = mkdir_all(&dir, Path::new("../x"), 0o755, BENEATH).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let fd = mkdir_all(&dir, Path::new("real/a/b"), 0o755, BENEATH).unwrap();
        assert_eq!(real(&fd), base.join("real/a/b"));
    }

    #[test]
    fn touch_creates_a_file_and_refuses_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let dir = open_dir(t.path()).unwrap();
        let fd = touch(&dir, Path::new("f"), 0o644).unwrap();
        assert_eq!(real(&fd), t.path().join("f"));
        assert!(t.path().join("f").is_file());
        symlink("/etc/passwd", t.path().join("l")).unwrap();
        let e = touch(&dir, Path::new("l"), 0o644).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }
}
