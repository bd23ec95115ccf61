//! Mount syscalls behind the [`Mounter`] trait, `/proc/self/mountinfo` parsing, and the
//! pseudo filesystems PID 1 mounts at boot.
//!
//! Everything that decides *what* to mount is tested against a recording fake; only
//! [`SyscallMounter`] touches the kernel.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A failed boot-time mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point could not be created.
    #[error("create mount point {path:?}")]
    CreateDir {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// mount(2) failed.
    #[error("mount {fstype} on {target:?}")]
    Mount {
        /// The filesystem type.
        fstype: String,
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
}

/// The mount-related calls the agent makes; faked in unit tests.
pub trait Mounter: Send + Sync {
    /// mount(2); an empty `data` is passed as NULL.
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), Errno>;
    /// umount2(2) with `MNT_DETACH`.
    fn umount_lazy(&self, target: &Path) -> Result<(), Errno>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates directory `path` (below `base`) and its parents without following any
    /// symlink, and holds it open: mounting on [`MountPoint::path`] mounts on exactly that
    /// directory, never on what a symlink swapped in later points to.
    fn open_mount_point(&self, base: &Path, path: &Path) -> io::Result<MountPoint>;
    /// The text of `/proc/self/mountinfo`.
    fn mountinfo(&self) -> io::Result<String>;
}

/// A directory held open for mounting on it.
#[derive(Debug)]
pub struct MountPoint {
    path: PathBuf,
    _fd: Option<std::os::fd::OwnedFd>,
}

impl MountPoint {
    /// What to pass to mount(2): `/proc/self/fd/N` for a real one.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The real [`Mounter`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SyscallMounter;

impl Mounter for SyscallMounter {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), Errno> {
        let data = (!data.is_empty()).then_some(data);
        nix::mount::mount(Some(source), target, Some(fstype), flags, data)
    }

    fn umount_lazy(&self, target: &Path) -> Result<(), Errno> {
        nix::mount::umount2(target, MntFlags::MNT_DETACH)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn open_mount_point(&self, base: &Path, path: &Path) -> io::Result<MountPoint> {
        // The base is the agent's own directory.
        std::fs::create_dir_all(base)?;
        let base_fd = crate::resolve::open_dir(base)?;
        let rel = path
            .strip_prefix(base)
            .map_err(|_| io::Error::from_raw_os_error(libc::EXDEV))?;
        let fd = crate::resolve::mkdir_all(&base_fd, rel, 0o755, crate::resolve::BENEATH)?;
        Ok(MountPoint {
            path: crate::resolve::fd_path(&fd),
            _fd: Some(fd),
        })
    }

    fn mountinfo(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }
}

/// One line of `/proc/self/mountinfo`, reduced to what the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type.
    pub fstype: String,
    /// The mount source (a device, or a virtio-fs tag).
    pub source: String,
}

/// Parses `/proc/self/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mount visible at `target`: the last entry for it (later mounts stack on top).
pub fn find_mount<'a>(entries: &'a [MountEntry], target: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == target)
}

/// Undoes the kernel's octal escaping (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pseudo filesystem mounted at boot.
#[derive(Debug, Clone, Copy)]
pub struct BootMount {
    /// Source string passed to mount(2).
    pub source: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Flags.
    pub flags: MsFlags,
    /// Filesystem data options.
    pub data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// The filesystems PID 1 mounts, parents before children.
pub const BOOT_MOUNTS: &[BootMount] = &[
    BootMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    BootMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    BootMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    BootMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620",
    },
    BootMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    BootMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    BootMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    BootMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

/// Mounts `mounts` in order, creating mount points; EBUSY (already mounted) counts as
/// success. Keeps going after a failure and returns every failure, so the caller can log
/// them once logging works (which needs `/dev` and `/proc`).
pub fn mount_all(mounter: &dyn Mounter, mounts: &[BootMount]) -> Vec<MountError> {
    let mut errors = Vec::new();
    for m in mounts {
        let target = Path::new(m.target);
        if let Err(source) = mounter.create_dir_all(target) {
            errors.push(MountError::CreateDir {
                path: target.to_owned(),
                source,
            });
            continue;
        }
        match mounter.mount(m.source, target, m.fstype, m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => errors.push(MountError::Mount {
                fstype: m.fstype.to_owned(),
                target: target.to_owned(),
                source,
            }),
        }
    }
    errors
}

#[cfg(test)]
pub(crate) mod fake {
    //! A recording [`Mounter`] for unit tests.
    use super::*;
    use std::sync::Mutex;

    /// Records calls; fails mounts on targets listed in `fail`.
    #[derive(Debug, Default)]
    pub struct FakeMounter {
        pub calls: Mutex<Vec<String>>,
        pub fail: Vec<(PathBuf, Errno)>,
        pub mountinfo: String,
    }

    impl Mounter for FakeMounter {
        fn mount(
            &self,
            source: &str,
            target: &Path,
            fstype: &str,
            flags: MsFlags,
            data: &str,
        ) -> Result<(), Errno> {
            self.calls.lock().unwrap().push(format!(
                "mount {source} {} {fstype} {:#x} {data}",
                target.display(),
                flags.bits()
            ));
            match self.fail.iter().find(|(p, _)| p == target) {
                Some((_, e)) => Err(*e),
                None => Ok(()),
            }
        }
        fn umount_lazy(&self, target: &Path) -> Result<(), Errno> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("umount {}", target.display()));
            Ok(())
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn open_mount_point(&self, _base: &Path, path: &Path) -> io::Result<MountPoint> {
            self.create_dir_all(path)?;
            Ok(MountPoint {
                path: path.to_owned(),
                _fd: None,
            })
        }
        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.mountinfo.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMounter;
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec - proc proc rw
40 30 0:40 / /run/kata-containers/shared/containers rw,relatime shared:5 - virtiofs kataShared rw
41 30 0:41 / /mnt/with\\040space rw - tmpfs none rw
42 40 0:42 / /run/kata-containers/shared/containers rw - tmpfs other rw
garbage line
";

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let e = parse_mountinfo(MOUNTINFO);
        assert_eq!(e.len(), 4);
        assert_eq!(e[1].fstype, "virtiofs");
        assert_eq!(e[1].source, "kataShared");
        assert_eq!(e[2].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn find_mount_returns_the_top_of_the_stack() {
        let e = parse_mountinfo(MOUNTINFO);
        let top = find_mount(&e, Path::new("/run/kata-containers/shared/containers")).unwrap();
        assert_eq!(top.source, "other");
        assert!(find_mount(&e, Path::new("/nope")).is_none());
    }

    #[test]
    fn mount_all_tolerates_ebusy_and_continues_after_failure() {
        let fake = FakeMounter {
            fail: vec![
                (PathBuf::from("/proc"), Errno::EBUSY),
                (PathBuf::from("/sys"), Errno::ENODEV),
            ],
            ..Default::default()
        };
        let errors = mount_all(&fake, BOOT_MOUNTS);
        assert_eq!(errors.len(), 1);
        assert!(matches!(
            &errors[0],
            MountError::Mount {
                source: Errno::ENODEV,
                ..
            }
        ));
        let calls = fake.calls.lock().unwrap();
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("mount ")).count(),
            BOOT_MOUNTS.len()
        );
        assert!(calls.contains(&format!(
            "mount devpts /dev/pts devpts {:#x} newinstance,ptmxmode=0666,mode=0620",
            (MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC).bits()
        )));
    }

    #[test]
    fn boot_mounts_come_after_their_parents() {
        for (i, m) in BOOT_MOUNTS.iter().enumerate() {
            for later in &BOOT_MOUNTS[i + 1..] {
                assert!(
                    !Path::new(m.target).starts_with(later.target),
                    "{} before {}",
                    m.target,
                    later.target
                );
            }
        }
    }
}
