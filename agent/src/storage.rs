//! `AddStorages`: validation of [`Storage`] requests and their mounting.
//!
//! A request is validated once, here, into a [`MountSpec`]; only then is anything
//! created or mounted. Mounting is idempotent: a mount point that already shows the same
//! source and filesystem type is left alone.

use std::path::{Path, PathBuf};

use kata_proto::agent::Storage;
use nix::errno::Errno;
use nix::mount::MsFlags;

use crate::mounts::{find_mount, parse_mountinfo, Mounter};
use crate::paths::{check_under, PathError};

/// The storage driver of the virtio-fs share.
pub const VIRTIO_FS_DRIVER: &str = "virtio-fs";
/// The filesystem type of a virtio-fs mount.
pub const VIRTIOFS_FSTYPE: &str = "virtiofs";

/// A refused or failed storage request.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The driver is not one the agent knows.
    #[error("unknown storage driver {0:?}")]
    UnknownDriver(String),
    /// The filesystem type does not fit the driver.
    #[error("storage driver {driver} needs fstype {expected:?}, got {got:?}")]
    FsType {
        /// The driver.
        driver: String,
        /// The fstype the driver needs.
        expected: &'static str,
        /// The fstype requested.
        got: String,
    },
    /// The virtio-fs tag is empty or contains `/`.
    #[error("invalid virtio-fs tag {0:?}")]
    Tag(String),
    /// The mount point is not acceptable.
    #[error("invalid mount point")]
    MountPoint(#[source] PathError),
    /// A mount option the agent refuses (it would change what the mount is).
    #[error("unsupported mount option {0:?}")]
    Option(String),
    /// Something else is mounted at the mount point.
    #[error("{path:?} already has {fstype} {source_name:?} mounted")]
    Busy {
        /// The mount point.
        path: PathBuf,
        /// The filesystem type found there.
        fstype: String,
        /// The source found there.
        source_name: String,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("read mountinfo")]
    MountInfo(#[source] std::io::Error),
    /// A symlink on the way to the mount point (the agent follows none there).
    #[error("mount point {path:?} goes through a symlink")]
    Symlink {
        /// The mount point.
        path: PathBuf,
    },
    /// The mount point could not be created.
    #[error("create mount point {path:?}")]
    CreateDir {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("mount {tag:?} on {path:?}")]
    Mount {
        /// The source tag.
        tag: String,
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
}

impl StorageError {
    /// Whether the request itself is at fault (as opposed to the guest).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::UnknownDriver(_)
                | Self::FsType { .. }
                | Self::Tag(_)
                | Self::MountPoint(_)
                | Self::Option(_)
        )
    }
}

/// A validated mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Source (the virtio-fs tag).
    pub source: String,
    /// Absolute, normalized mount point below the base directory.
    pub mount_point: PathBuf,
    /// The base directory (created and resolved beneath without symlinks).
    pub base: PathBuf,
    /// Filesystem type.
    pub fstype: &'static str,
    /// mount(2) flags.
    pub flags: MsFlags,
    /// Filesystem data options, comma-separated.
    pub data: String,
}

/// What [`mount_storage`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The filesystem was mounted now.
    Mounted,
    /// It was already mounted there.
    AlreadyMounted,
}

/// Validates a request; `base` is the directory mount points must lie below.
pub fn validate(storage: &Storage, base: &Path) -> Result<MountSpec, StorageError> {
    if storage.driver != VIRTIO_FS_DRIVER {
        return Err(StorageError::UnknownDriver(storage.driver.clone()));
    }
    if storage.fstype != VIRTIOFS_FSTYPE {
        return Err(StorageError::FsType {
            driver: storage.driver.clone(),
            expected: VIRTIOFS_FSTYPE,
            got: storage.fstype.clone(),
        });
    }
    let tag = &storage.source;
    if tag.is_empty() || tag.contains('/') || tag.contains(['\0', ',', ' ']) {
        return Err(StorageError::Tag(tag.clone()));
    }
    let mount_point = check_under(base, &storage.mount_point).map_err(StorageError::MountPoint)?;
    let (flags, data) = parse_options(&storage.options)?;
    Ok(MountSpec {
        source: tag.clone(),
        mount_point,
        base: base.to_owned(),
        fstype: VIRTIOFS_FSTYPE,
        flags,
        data,
    })
}

/// The mount(2) flags a plain flag option sets and clears (`ro` -> set RDONLY, `rw` ->
/// clear it, ...); `None` for anything else (bind, propagation, data). Shared by storages and
/// container mounts.
pub fn flag_option(opt: &str) -> Option<(MsFlags, MsFlags)> {
    Some(match opt {
        "" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
        "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
        "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
        "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
        "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
        "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
        "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
        "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
        "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
        "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
        "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
        "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
        "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
        "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
        "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
        "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
        "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
        "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
        "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
        "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
        "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
        "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
        "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
        "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
        "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
        "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
        _ => return None,
    })
}

/// Splits mount options into mount(2) flags and filesystem data.
///
/// Flags that would turn the mount into something else (bind, move, remount,
/// propagation changes) are refused; unknown options are passed on as data.
pub fn parse_options(options: &[String]) -> Result<(MsFlags, String), StorageError> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')) {
        let opt = opt.trim();
        if let Some((set, clear)) = flag_option(opt) {
            flags = (flags | set) & !clear;
            continue;
        }
        match opt {
            "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "slave" | "rslave"
            | "private" | "rprivate" | "unbindable" | "runbindable" => {
                return Err(StorageError::Option(opt.to_owned()))
            }
            other => {
                if other.contains(['\0', ' ']) {
                    return Err(StorageError::Option(other.to_owned()));
                }
                data.push(other);
            }
        }
    }
    Ok((flags, data.join(",")))
}

/// Mounts a validated storage unless the same source is already mounted there.
///
/// Blocking: call it from `spawn_blocking`.
pub fn mount_storage(mounter: &dyn Mounter, spec: &MountSpec) -> Result<Outcome, StorageError> {
    let info = mounter.mountinfo().map_err(StorageError::MountInfo)?;
    let entries = parse_mountinfo(&info);
    if let Some(e) = find_mount(&entries, &spec.mount_point) {
        if e.fstype == spec.fstype && e.source == spec.source {
            return Ok(Outcome::AlreadyMounted);
        }
        return Err(StorageError::Busy {
            path: spec.mount_point.clone(),
            fstype: e.fstype.clone(),
            source_name: e.source.clone(),
        });
    }
    let target = mounter
        .open_mount_point(&spec.base, &spec.mount_point)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP | libc::EXDEV) => StorageError::Symlink {
                path: spec.mount_point.clone(),
            },
            _ => StorageError::CreateDir {
                path: spec.mount_point.clone(),
                source,
            },
        })?;
    mounter
        .mount(
            &spec.source,
            target.path(),
            spec.fstype,
            spec.flags,
            &spec.data,
        )
        .map_err(|source| StorageError::Mount {
            tag: spec.source.clone(),
            path: spec.mount_point.clone(),
            source,
        })?;
    Ok(Outcome::Mounted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::fake::FakeMounter;
    use crate::paths::DEFAULT_BASE_DIR;

    const SHARED: &str = "/run/kata-containers/shared/containers";

    fn storage(driver: &str, source: &str, fstype: &str, mp: &str, opts: &[&str]) -> Storage {
        let mut s = Storage::new();
        s.driver = driver.into();
        s.source = source.into();
        s.fstype = fstype.into();
        s.mount_point = mp.into();
        s.options = opts.iter().map(|o| o.to_string()).collect();
        s
    }

    fn base() -> &'static Path {
        Path::new(DEFAULT_BASE_DIR)
    }

    fn opts(o: &[&str]) -> Result<(MsFlags, String), StorageError> {
        parse_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = opts(&["ro", "nosuid,nodev", "relatime", "dax=never", "noexec"]).unwrap();
        assert_eq!(
            f,
            MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_RELATIME
                | MsFlags::MS_NOEXEC
        );
        assert_eq!(d, "dax=never");
        let (f, d) = opts(&["ro", "rw", "a=1", "b"]).unwrap();
        assert_eq!(f, MsFlags::empty());
        assert_eq!(d, "a=1,b");
        assert_eq!(opts(&[]).unwrap(), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn options_refuse_bind_and_propagation() {
        for o in ["bind", "rbind", "remount", "shared", "rprivate", "x y"] {
            assert!(matches!(opts(&[o]), Err(StorageError::Option(_))), "{o}");
        }
    }

    #[test]
    fn validate_accepts_the_shared_dir() {
        let s = storage("virtio-fs", "kataShared", "virtiofs", SHARED, &["nodev"]);
        let spec = validate(&s, base()).unwrap();
        assert_eq!(spec.source, "kataShared");
        assert_eq!(spec.mount_point, PathBuf::from(SHARED));
        assert_eq!(spec.flags, MsFlags::MS_NODEV);
    }

    #[test]
    fn validate_rejects_bad_requests() {
        let e = validate(
            &storage("9p", "kataShared", "virtiofs", SHARED, &[]),
            base(),
        )
        .unwrap_err();
        assert!(matches!(&e, StorageError::UnknownDriver(d) if d == "9p"));
        assert!(e.to_string().contains("9p"));
        assert!(e.is_invalid_request());
        let cases = [
            storage("virtio-fs", "kataShared", "ext4", SHARED, &[]),
            storage("virtio-fs", "", "virtiofs", SHARED, &[]),
            storage("virtio-fs", "a/b", "virtiofs", SHARED, &[]),
            storage(
                "virtio-fs",
                "kataShared",
                "virtiofs",
                "/run/kata-containers/../etc",
                &[],
            ),
            storage(
                "virtio-fs",
                "kataShared",
                "virtiofs",
                "run/kata-containers/x",
                &[],
            ),
            storage("virtio-fs", "kataShared", "virtiofs", "/mnt", &[]),
            storage("virtio-fs", "kataShared", "virtiofs", SHARED, &["bind"]),
        ];
        for c in cases {
            let e = validate(&c, base()).unwrap_err();
            assert!(e.is_invalid_request(), "{c:?}: {e}");
        }
    }

    #[test]
    fn mount_creates_dir_then_mounts() {
        let fake = FakeMounter::default();
        let spec = validate(
            &storage(
                "virtio-fs",
                "kataShared",
                "virtiofs",
                SHARED,
                &["ro", "dax"],
            ),
            base(),
        )
        .unwrap();
        assert_eq!(mount_storage(&fake, &spec).unwrap(), Outcome::Mounted);
        let calls = fake.calls.lock().unwrap();
        assert_eq!(
            *calls,
            vec![
                format!("mkdir {SHARED}"),
                format!(
                    "mount kataShared {SHARED} virtiofs {:#x} dax",
                    MsFlags::MS_RDONLY.bits()
                ),
            ]
        );
    }

    #[test]
    fn mount_is_idempotent_and_detects_busy() {
        let spec = validate(
            &storage("virtio-fs", "kataShared", "virtiofs", SHARED, &[]),
            base(),
        )
        .unwrap();
        let fake = FakeMounter {
            mountinfo: format!("40 30 0:40 / {SHARED} rw - virtiofs kataShared rw\n"),
            ..Default::default()
        };
        assert_eq!(
            mount_storage(&fake, &spec).unwrap(),
            Outcome::AlreadyMounted
        );
        assert!(fake.calls.lock().unwrap().is_empty());

        let fake = FakeMounter {
            mountinfo: format!("40 30 0:40 / {SHARED} rw - tmpfs tmpfs rw\n"),
            ..Default::default()
        };
        assert!(matches!(
            mount_storage(&fake, &spec),
            Err(StorageError::Busy { .. })
        ));
    }

    #[test]
    fn mount_failure_names_the_errno() {
        let spec = validate(
            &storage("virtio-fs", "kataShared", "virtiofs", SHARED, &[]),
            base(),
        )
        .unwrap();
        let fake = FakeMounter {
            fail: vec![(PathBuf::from(SHARED), Errno::ENODEV)],
            ..Default::default()
        };
        let e = mount_storage(&fake, &spec).unwrap_err();
        assert!(matches!(
            e,
            StorageError::Mount {
                source: Errno::ENODEV,
                ..
            }
        ));
    }
}
