//! Filesystem work for a container: OCI mount options to `mount(2)` arguments, path
//! resolution inside the rootfs that cannot escape it, and device nodes.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

/// `mount(2)` arguments parsed from OCI options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for the mount (and, for binds, the remount).
    pub flags: MsFlags,
    /// Propagation changes applied after mounting (`rprivate`, `rslave`, ...).
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific data (`mode=755,size=65536k`).
    pub data: String,
}

impl MountOptions {
    /// Whether the options ask for a bind mount.
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    /// The flags that need a remount after a bind (bind ignores them).
    pub fn remount_flags(&self) -> MsFlags {
        self.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT)
    }
}

/// Parses OCI mount options the way runc does: known flags set or clear bits, propagation
/// keywords are kept apart, everything else is filesystem data.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: String::new(),
    };
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            word => {
                if let Some(p) = propagation(word) {
                    out.propagation.push(p);
                    continue;
                }
                match crate::storage::flag_option(word) {
                    Some(flags) => flags,
                    None => {
                        data.push(word);
                        continue;
                    }
                }
            }
        };
        out.flags = (out.flags | set) - clear;
    }
    out.data = data.join(",");
    out
}

/// The flags of a propagation keyword (`rslave` -> `MS_SLAVE | MS_REC`).
pub fn propagation(word: &str) -> Option<MsFlags> {
    Some(match word {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Most symlinks followed while resolving one path.
const MAX_LINKS: usize = 40;

/// Resolves `path` as if `root` were `/`: symlinks are followed relative to `root` and
/// `..` never climbs above it, so the result always lies under `root`. Missing components
/// are kept as they are (the caller creates them).
pub fn secure_join(root: &Path, path: &Path) -> io::Result<PathBuf> {
    fn push_components(queue: &mut VecDeque<OsString>, p: &Path, front: bool) {
        let comps: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        if front {
            for c in comps.into_iter().rev() {
                queue.push_front(c);
            }
        } else {
            queue.extend(comps);
        }
    }
    let mut queue = VecDeque::new();
    push_components(&mut queue, path, false);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&c);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&full)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                push_components(&mut queue, &target, true);
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// A device node to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Absolute path in the container.
    pub path: String,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    pub kind: libc::mode_t,
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Permission bits.
    pub mode: libc::mode_t,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The devices every container gets (as runc creates them).
pub fn default_devices() -> Vec<DeviceNode> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DeviceNode {
        path: path.to_owned(),
        kind: libc::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// A spec device as a node; `None` for a type that is not a node (`a`).
pub fn device_node(d: &super::spec::Device) -> Option<DeviceNode> {
    let kind = match d.typ.as_str() {
        "c" | "u" => libc::S_IFCHR,
        "b" => libc::S_IFBLK,
        "p" => libc::S_IFIFO,
        _ => return None,
    };
    Some(DeviceNode {
        path: d.path.clone(),
        kind,
        major: d.major.max(0) as u64,
        minor: d.minor.max(0) as u64,
        mode: d.file_mode.unwrap_or(0o666) & 0o7777,
        uid: d.uid.unwrap_or(0),
        gid: d.gid.unwrap_or(0),
    })
}

/// Creates `node` as `name` in directory `dir` (an existing entry is kept), then sets its
/// exact mode and owner without following a symlink.
pub fn make_node(dir: &OwnedFd, name: &Path, node: &DeviceNode) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(name.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dev = libc::makedev(node.major as u32, node.minor as u32);
    // SAFETY: `dir` is an open directory and `c` a valid NUL-terminated name.
    let rc = unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), node.kind | node.mode, dev) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    // SAFETY: as above; AT_SYMLINK_NOFOLLOW keeps a symlink's target untouched.
    if unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            node.uid,
            node.gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // mknod applies the umask; set the exact mode on the node itself (never a symlink).
    let fd = crate::resolve::openat2(
        dir.as_raw_fd(),
        name,
        libc::O_PATH,
        0,
        crate::resolve::BENEATH,
    )?;
    std::fs::set_permissions(
        crate::resolve::fd_path(&fd),
        std::os::unix::fs::PermissionsExt::from_mode(node.mode),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn options_become_flags_propagation_and_data() {
        let o = parse_options(
            &[
                "nosuid",
                "noexec",
                "nodev",
                "mode=755",
                "size=65536k",
                "rslave",
                "ro",
            ]
            .map(String::from),
        );
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.is_bind());
        let b = parse_options(&["rbind", "ro", "rw"].map(String::from));
        assert!(b.is_bind());
        assert!(b.flags.contains(MsFlags::MS_REC));
        assert!(!b.flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(
            parse_options(&["bind".into(), "ro".into()]).remount_flags(),
            MsFlags::MS_RDONLY
        );
    }

    #[test]
    fn secure_join_stays_under_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("etc/real")).unwrap();
        symlink("/etc/real", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("etc/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/abs/x")).unwrap(),
            root.join("etc/real/x")
        );
        assert_eq!(
            secure_join(root, Path::new("/etc/up/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/../../x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("/new/dir")).unwrap(),
            root.join("new/dir")
        );
        let e = secure_join(root, Path::new("/loop/x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn devices() {
        let d = default_devices();
        assert!(d
            .iter()
            .any(|n| n.path == "/dev/null" && n.major == 1 && n.minor == 3));
        let spec = super::super::spec::Device {
            path: "/dev/fuse".into(),
            typ: "c".into(),
            major: 10,
            minor: 229,
            file_mode: Some(0o20666),
            uid: None,
            gid: None,
        };
        let n = device_node(&spec).unwrap();
        assert_eq!((n.kind, n.mode), (libc::S_IFCHR, 0o666));
        let all = super::super::spec::Device {
            typ: "a".into(),
            ..spec
        };
        assert!(device_node(&all).is_none());
    }
}
