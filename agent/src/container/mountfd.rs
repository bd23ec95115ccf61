//! Mounts made with the new mount API (Linux 5.2; `mount_setattr` 5.12): a filesystem or
//! a bind is built detached (`fsopen`/`fsmount`, `open_tree`), given its flags and
//! propagation while detached (`mount_setattr`), then attached onto a directory fd
//! (`move_mount`). No step takes a path inside the container's root, so nothing there can
//! redirect it, and flags never need a remount of a path that would have to be walked
//! again.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::MsFlags;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A mount not attached anywhere yet (or attached by [`Detached::attach`], which it still
/// names).
#[derive(Debug)]
pub struct Detached(OwnedFd);

/// The `MOUNT_ATTR_*` bits for the per-mount flags among `flags`, and whether an atime
/// mode is among them.
pub fn mount_attrs(flags: MsFlags) -> (u64, bool) {
    let mut attr = 0;
    for (f, a) in [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, libc::MOUNT_ATTR_NODIRATIME),
    ] {
        if flags.contains(f) {
            attr |= a;
        }
    }
    let atime = if flags.contains(MsFlags::MS_NOATIME) {
        Some(libc::MOUNT_ATTR_NOATIME)
    } else if flags.contains(MsFlags::MS_STRICTATIME) {
        Some(libc::MOUNT_ATTR_STRICTATIME)
    } else if flags.contains(MsFlags::MS_RELATIME) {
        Some(libc::MOUNT_ATTR_RELATIME)
    } else {
        None
    };
    (attr | atime.unwrap_or(0), atime.is_some())
}

/// The superblock flags among `flags`, as `fsconfig` flag names.
fn sb_flag_names(flags: MsFlags) -> Vec<&'static str> {
    [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_SYNCHRONOUS, "sync"),
        (MsFlags::MS_DIRSYNC, "dirsync"),
        (MsFlags::MS_LAZYTIME, "lazytime"),
        (MsFlags::MS_MANDLOCK, "mand"),
        (MsFlags::MS_SILENT, "silent"),
    ]
    .into_iter()
    .filter(|(f, _)| flags.contains(*f))
    .map(|(_, n)| n)
    .collect()
}

/// A new filesystem of type `fstype` from `source` with the comma-separated `data`
/// options and the mount(2)-style `flags`.
pub fn filesystem(fstype: &str, source: &str, data: &str, flags: MsFlags) -> io::Result<Detached> {
    let t = cstr(fstype)?;
    // SAFETY: `t` is a valid C string.
    let fs = check(unsafe { libc::syscall(libc::SYS_fsopen, t.as_ptr(), libc::FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a new fd that we own.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    let config = |cmd: libc::c_uint, key: Option<&str>, value: Option<&str>| -> io::Result<()> {
        let k = key.map(cstr).transpose()?;
        let v = value.map(cstr).transpose()?;
        // SAFETY: the strings are valid C strings or null, as the command expects.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                cmd,
                k.as_ref().map_or(std::ptr::null(), |k| k.as_ptr()),
                v.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        })
        .map(drop)
    };
    config(libc::FSCONFIG_SET_STRING, Some("source"), Some(source))?;
    for opt in data.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some((k, v)) => config(libc::FSCONFIG_SET_STRING, Some(k), Some(v))?,
            None => config(libc::FSCONFIG_SET_FLAG, Some(opt), None)?,
        }
    }
    for name in sb_flag_names(flags) {
        config(libc::FSCONFIG_SET_FLAG, Some(name), None)?;
    }
    config(libc::FSCONFIG_CMD_CREATE, None, None)?;
    let (attrs, _) = mount_attrs(flags);
    // SAFETY: plain integer arguments on our fd.
    let mnt = check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    })?;
    // SAFETY: fsmount returned a new fd that we own.
    Ok(Detached(unsafe { OwnedFd::from_raw_fd(mnt as RawFd) }))
}

/// A copy of the mount tree at `source` (with its submounts when `recursive`), as a bind
/// mount is. `source` is a guest path the agent chose (the share, the pod's shm, a cgroup).
pub fn bind(source: &Path, recursive: bool) -> io::Result<Detached> {
    let s = CString::new(source.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: `s` is a valid C string.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, s.as_ptr(), flags) })?;
    // SAFETY: open_tree returned a new fd that we own.
    Ok(Detached(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

impl Detached {
    /// `mount_setattr` on this mount (and its submounts when `recursive`).
    fn setattr(&self, attr: &libc::mount_attr, recursive: bool) -> io::Result<()> {
        let empty = c"";
        let mut flags = libc::AT_EMPTY_PATH;
        if recursive {
            flags |= libc::AT_RECURSIVE;
        }
        // SAFETY: `attr` is a valid mount_attr of the size passed; the path is empty.
        check(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.0.as_raw_fd(),
                empty.as_ptr(),
                flags as libc::c_uint,
                attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        })
        .map(drop)
    }

    /// Adds the per-mount flags among `flags` (read-only, nosuid, ...); the mount's own
    /// restrictions stay.
    pub fn set_flags(&self, flags: MsFlags) -> io::Result<()> {
        let (set, atime) = mount_attrs(flags);
        if set == 0 && !atime {
            return Ok(());
        }
        // SAFETY: plain data; zeroed is valid.
        let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
        attr.attr_set = set;
        attr.attr_clr = if atime { libc::MOUNT_ATTR__ATIME } else { 0 };
        self.setattr(&attr, false)
    }

    /// Sets the propagation type (`MS_SHARED`, `MS_SLAVE`, `MS_PRIVATE` or
    /// `MS_UNBINDABLE`, with `MS_REC` for the whole tree).
    pub fn set_propagation(&self, flags: MsFlags) -> io::Result<()> {
        // SAFETY: plain data; zeroed is valid.
        let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
        attr.propagation = (flags - MsFlags::MS_REC).bits();
        self.setattr(&attr, flags.contains(MsFlags::MS_REC))
    }

    /// Attaches the mount onto the directory (or file) `target` is open on.
    pub fn attach(&self, target: &OwnedFd) -> io::Result<()> {
        let empty = c"";
        // SAFETY: both fds are open; the paths are empty strings.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.0.as_raw_fd(),
                empty.as_ptr(),
                target.as_raw_fd(),
                empty.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            )
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_split_into_mount_attributes_and_superblock_flags() {
        let (a, atime) =
            mount_attrs(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_SYNCHRONOUS);
        assert_eq!(a, libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID);
        assert!(!atime);
        let (a, atime) = mount_attrs(MsFlags::MS_NOATIME | MsFlags::MS_NODEV);
        assert_eq!(a, libc::MOUNT_ATTR_NOATIME | libc::MOUNT_ATTR_NODEV);
        assert!(atime);
        assert_eq!(
            sb_flag_names(MsFlags::MS_RDONLY | MsFlags::MS_SYNCHRONOUS | MsFlags::MS_NOSUID),
            ["ro", "sync"]
        );
    }
}
