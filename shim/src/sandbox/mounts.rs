//! Host mounts: a container's rootfs from containerd's mount list, its bind into the
//! sandbox's virtio-fs share, and recursive unmounting by path prefix.
//!
//! mount(2) and umount(2) can block on a busy filesystem, so the async entry points run
//! them on the blocking pool.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A host path a container mounts: the shim binds it at `<container share>/<share_path>`
/// before the guest creates the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path (file or directory).
    pub source: PathBuf,
    /// Where it goes, relative to the container's share directory (`mounts/<n>`).
    pub share_path: PathBuf,
    /// Mount it read-only on the host side too.
    pub readonly: bool,
    /// The destination in the container (for messages).
    pub destination: PathBuf,
}

/// Errors mounting or unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount from containerd uses a type we cannot mount.
    #[error("unsupported rootfs mount type {0:?}")]
    UnsupportedType(String),
    /// mount(2) failed.
    #[error("cannot mount {source_path} ({fstype}) on {}", .target.display())]
    Mount {
        source_path: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// umount(2) failed.
    #[error("cannot unmount {}", .target.display())]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// /proc/self/mountinfo could not be read.
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    /// Creating or removing a directory failed.
    #[error("cannot create or remove {}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bind mount's host source is not there.
    #[error("mount source {} for {} does not exist", .path.display(), .destination.display())]
    MissingSource {
        path: PathBuf,
        destination: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blocking task was cancelled or panicked.
    #[error("mount task failed")]
    Join(#[source] tokio::task::JoinError),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MountError> + Send + 'static,
) -> Result<T, MountError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(MountError::Join)?
}

/// Mounts containerd's rootfs `mounts` (in order) on `target`. Returns whether anything
/// was mounted: an empty list means the bundle's rootfs is already populated.
pub async fn mount_rootfs(mounts: Vec<Mount>, target: PathBuf) -> Result<bool, MountError> {
    if mounts.is_empty() {
        return Ok(false);
    }
    blocking(move || {
        for m in &mounts {
            if let Err(e) = mount_one(m, &target) {
                // Undo the ones that worked.
                let _ = unmount_under(&target);
                return Err(e);
            }
        }
        Ok(true)
    })
    .await
}

fn mount_one(m: &Mount, target: &Path) -> Result<(), MountError> {
    let (mut flags, data) = parse_options(&m.options);
    let fstype = match m.type_.as_str() {
        "bind" | "rbind" => {
            flags |= MsFlags::MS_BIND;
            if m.type_ == "rbind" {
                flags |= MsFlags::MS_REC;
            }
            None
        }
        "overlay" | "tmpfs" | "ext4" | "xfs" | "btrfs" => Some(m.type_.as_str()),
        other => return Err(MountError::UnsupportedType(other.to_owned())),
    };
    let err = |source| MountError::Mount {
        source_path: m.source.clone(),
        fstype: m.type_.clone(),
        target: target.to_path_buf(),
        source,
    };
    let data = (!data.is_empty()).then_some(data.as_str());
    // A read-only bind needs a remount: the first mount ignores MS_RDONLY.
    let bind_ro = flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY);
    mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(err)?;
    if bind_ro {
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, remount, None::<&str>).map_err(err)?;
    }
    Ok(())
}

/// Splits fstab-style options into mount flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "suid" | "dev" | "exec" | "async" | "atime" | "defaults" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Bind-mounts `source` on `target` (created as a directory), recursively.
pub async fn bind_dir(source: PathBuf, target: PathBuf) -> Result<(), MountError> {
    blocking(move || {
        std::fs::create_dir_all(&target).map_err(|e| MountError::Dir {
            path: target.clone(),
            source: e,
        })?;
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| MountError::Mount {
            source_path: source.display().to_string(),
            fstype: "bind".into(),
            target: target.clone(),
            source: e,
        })
    })
    .await
}

/// Binds a container's host path (file or directory) at `target` in the share, read-only
/// on the host side too when asked.
pub async fn bind_host_path(bind: HostBind, target: PathBuf) -> Result<(), MountError> {
    blocking(move || {
        let meta = std::fs::metadata(&bind.source).map_err(|e| MountError::MissingSource {
            path: bind.source.clone(),
            destination: bind.destination.clone(),
            source: e,
        })?;
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MountError::Dir { path, source }
        };
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(dir_err(&target))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(dir_err(parent))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map_err(dir_err(&target))?;
        }
        let err = |source| MountError::Mount {
            source_path: bind.source.display().to_string(),
            fstype: "bind".into(),
            target: target.clone(),
            source,
        };
        mount(
            Some(&bind.source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(err)?;
        if bind.readonly {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, &target, None::<&str>, flags, None::<&str>) {
                let _ = umount2(&target, MntFlags::MNT_DETACH);
                return Err(err(e));
            }
        }
        Ok(())
    })
    .await
}

/// Makes `dir` a shared mount point (a bind of itself), so that mounts made below it
/// later also appear in the virtio-fs daemon's mount namespace.
pub async fn make_shared_mountpoint(dir: PathBuf) -> Result<(), MountError> {
    blocking(move || {
        let err = |source| MountError::Mount {
            source_path: dir.display().to_string(),
            fstype: "bind".into(),
            target: dir.clone(),
            source,
        };
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err)?;
        mount(
            None::<&str>,
            &dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(err)
    })
    .await
}

/// Unmounts everything mounted at or below `path`, deepest first.
pub async fn unmount_all(path: PathBuf) -> Result<(), MountError> {
    blocking(move || unmount_under(&path)).await
}

/// Synchronous [`unmount_all`] (the `delete` command and failure paths).
pub fn unmount_under(path: &Path) -> Result<(), MountError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    let mut targets = mount_points_under(&info, path);
    // Deepest first; a path mounted several times appears several times.
    targets.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for target in targets {
        match umount2(&target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => return Err(MountError::Unmount { target, source }),
        }
    }
    Ok(())
}

/// Mount points in `mountinfo` text equal to or below `path`.
pub fn mount_points_under(mountinfo: &str, path: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .filter(|p| p.starts_with(path))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN` (octal).
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match escaped {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `path` and everything below it, after checking nothing is mounted there.
pub async fn remove_dir(path: PathBuf) -> Result<(), MountError> {
    blocking(move || remove_dir_sync(&path)).await
}

/// Synchronous [`remove_dir`]. A missing directory is not an error.
pub fn remove_dir_sync(path: &Path) -> Result<(), MountError> {
    unmount_under(path)?;
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MountError::Dir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "index=off", "lowerdir=/a:/b", "workdir=/w"]
            .map(String::from)
            .to_vec();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "index=off,lowerdir=/a:/b,workdir=/w");
        let (flags, data) = parse_options(&["rbind".to_owned()]);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }

    #[test]
    fn mountinfo_prefix_match_is_by_component() {
        let info = "\
22 1 0:21 / /run rw - tmpfs tmpfs rw
30 22 0:40 / /run/kata-containers/shared/sandboxes/s1 rw shared:5 - tmpfs tmpfs rw
31 30 0:41 / /run/kata-containers/shared/sandboxes/s1/c1/rootfs rw - overlay overlay rw
32 22 0:42 / /run/kata-containers/shared/sandboxes/s10 rw - tmpfs tmpfs rw
33 22 0:43 / /run/with\\040space rw - tmpfs tmpfs rw
";
        let under = mount_points_under(info, Path::new("/run/kata-containers/shared/sandboxes/s1"));
        assert_eq!(
            under,
            [
                PathBuf::from("/run/kata-containers/shared/sandboxes/s1"),
                PathBuf::from("/run/kata-containers/shared/sandboxes/s1/c1/rootfs"),
            ]
        );
        assert_eq!(
            mount_points_under(info, Path::new("/run/with space")),
            [PathBuf::from("/run/with space")]
        );
    }
}
