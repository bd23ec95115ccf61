//! The VM's cost in the pod's host cgroup.
//!
//! The kubelet accounts, limits and evicts a pod by its host cgroup, so the processes that
//! run the pod's VM belong there ([`Mode`], Kata's `[runtime] sandbox_cgroup_only`):
//! - `true`: the shim, QEMU, virtiofsd and the vsock daemon all run in the sandbox
//!   container's `linux.cgroupsPath`;
//! - `false`: only QEMU's vCPU threads run there (cgroup v1 `tasks` of the cpu, cpuacct and
//!   cpuset controllers; on cgroup v2, which cannot split a process's threads without a
//!   threaded subtree, QEMU as a whole); the rest run in an unconstrained
//!   `/kata_overhead/<sandbox id>`.
//!
//! Hierarchies come from `/proc/self/mountinfo`: every cgroup v1 hierarchy (including named
//! ones such as `name=systemd`) and the cgroup2 mount, whether unified or hybrid. A path is
//! a cgroupfs path (absolute: from each hierarchy's root; relative: from this process's
//! cgroup there) or the systemd driver's `slice:prefix:name` ([`super::systemd`] creates
//! the transient scope, then its directories are used like any other). Children join their
//! cgroup before they exec ([`kata_hypervisor::process::place_on_exec`]): memory charges do
//! not move with a process. The v1 devices controller keeps the devices a VM needs allowed.

use std::path::{Path, PathBuf};

/// Character devices QEMU and vhost need: kvm, tun, vhost-net, vhost-vsock (with
/// /dev/null, zero, full, random, urandom).
const VM_DEVICES: &[&str] = &[
    "c 10:232 rwm",
    "c 10:200 rwm",
    "c 10:238 rwm",
    "c 10:241 rwm",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
];

/// Where the overhead of `sandbox_cgroup_only = false` goes.
pub const OVERHEAD_PARENT: &str = "/kata_overhead";

/// Errors placing a sandbox in its host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// mountinfo could not be read.
    #[error("cannot read {path}")]
    Mountinfo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No cgroup hierarchy is mounted.
    #[error("no cgroup hierarchy is mounted (see /proc/self/mountinfo)")]
    NoHierarchy,
    /// The sandbox's cgroupsPath is unusable.
    #[error("invalid linux.cgroupsPath {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// A cgroup directory or file could not be created or written.
    #[error("cannot set up cgroup {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The systemd driver's scope could not be created.
    #[error("systemd")]
    Systemd(#[from] super::systemd::SystemdError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which hierarchy kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// cgroup v1 with these controllers (`name=systemd` for named hierarchies).
    V1(Vec<String>),
    /// The cgroup2 hierarchy.
    V2,
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The cgroup the mount shows at `mount` (`/` unless in a cgroup namespace).
    pub root: PathBuf,
    pub kind: Kind,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        match &self.kind {
            Kind::V1(c) => c.iter().any(|c| c == controller),
            Kind::V2 => false,
        }
    }
}

/// The cgroup hierarchies of a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let options = r.next().unwrap_or_default();
        let kind = match fstype {
            "cgroup2" => Kind::V2,
            "cgroup" => {
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro" | "relatime" | "noatime" | "nosuid" | "nodev" | "noexec"
                        ) && !o.starts_with("release_agent")
                            && *o != "clone_children"
                            && *o != "xattr"
                    })
                    .map(str::to_owned)
                    .collect();
                if controllers.is_empty() {
                    continue;
                }
                Kind::V1(controllers)
            }
            _ => continue,
        };
        out.push(Hierarchy {
            mount: PathBuf::from(unescape(mount)),
            root: PathBuf::from(unescape(root)),
            kind,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.clone().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&oct, 8) {
                out.push(v as char);
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// This process's cgroup in each hierarchy, from a /proc/self/cgroup text: (controllers or
/// "" for v2, path).
fn own_cgroups(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let _id = p.next()?;
            Some((p.next()?.to_owned(), p.next()?.to_owned()))
        })
        .collect()
}

/// How the sandbox's processes are placed (`sandbox_cgroup_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything in the sandbox cgroup.
    SandboxOnly,
    /// vCPU threads in the sandbox cgroup, the rest in the overhead cgroup.
    VcpusOnly,
}

/// One cgroup, as a directory in each hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The path as given (for messages).
    pub path: String,
    /// (hierarchy, directory) pairs.
    pub dirs: Vec<(Hierarchy, PathBuf)>,
}

impl Cgroup {
    /// The cgroup `path` (cgroupfs form) in `hierarchies`; a relative path starts from
    /// this process's cgroup, as runc does.
    pub fn resolve(hierarchies: &[Hierarchy], own: &str, path: &str) -> Result<Self, CgroupError> {
        if path.is_empty() || path.split('/').any(|c| c == "..") {
            return Err(CgroupError::InvalidPath {
                path: path.to_owned(),
                reason: "expected a non-empty path without \"..\"",
            });
        }
        let own = own_cgroups(own);
        let mut dirs = Vec::new();
        for h in hierarchies {
            let base = if path.starts_with('/') {
                PathBuf::from("/")
            } else {
                let key = match &h.kind {
                    Kind::V2 => String::new(),
                    Kind::V1(c) => c.join(","),
                };
                PathBuf::from(
                    own.iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, p)| p.as_str())
                        .unwrap_or("/"),
                )
            };
            let full = base.join(path.trim_start_matches('/'));
            // The mount shows the cgroup `root`; paths outside it are not reachable.
            let Ok(rel) = full.strip_prefix(&h.root) else {
                continue;
            };
            dirs.push((h.clone(), h.mount.join(rel)));
        }
        if dirs.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(Self {
            path: path.to_owned(),
            dirs,
        })
    }

    /// Creates the directories (parents too), makes a new cpuset usable (its cpus and mems
    /// copied from the parent) and keeps the VM's devices allowed.
    pub fn create(&self) -> Result<(), CgroupError> {
        for (h, dir) in &self.dirs {
            if h.has("cpuset") {
                create_cpuset(&h.mount, dir)?;
            } else {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            if h.has("devices") {
                let allow = dir.join("devices.allow");
                for rule in VM_DEVICES {
                    std::fs::write(&allow, rule).map_err(io_err(&allow))?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files, for children to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Moves process `pid` (all its threads) here.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            std::fs::write(&file, pid.to_string()).map_err(io_err(&file))?;
        }
        Ok(())
    }

    /// Moves the threads `tids` of one process here, in the hierarchies that bound CPU
    /// (v1 cpu, cpuacct, cpuset: per-thread `tasks`). On cgroup v2 the whole process `pid`
    /// moves. Memory stays with the process's cgroup.
    pub fn add_threads(&self, pid: u32, tids: &[u32]) -> Result<(), CgroupError> {
        for (h, dir) in &self.dirs {
            match &h.kind {
                Kind::V1(_) if ["cpu", "cpuacct", "cpuset"].iter().any(|c| h.has(c)) => {
                    let tasks = dir.join("tasks");
                    for tid in tids {
                        std::fs::write(&tasks, tid.to_string()).map_err(io_err(&tasks))?;
                    }
                }
                Kind::V1(_) => {}
                Kind::V2 if is_unified(&self.dirs) => {
                    let procs = dir.join("cgroup.procs");
                    std::fs::write(&procs, pid.to_string()).map_err(io_err(&procs))?;
                }
                Kind::V2 => {}
            }
        }
        Ok(())
    }

    /// Removes the directories (the leaf only: parents may hold other pods), moving this
    /// process to each parent first if it is inside. Retries briefly while exiting
    /// processes leave. Returns the directories that could not be removed.
    pub fn remove(&self) -> Vec<PathBuf> {
        let me = std::process::id().to_string();
        let mut left = Vec::new();
        for (_, dir) in &self.dirs {
            if !dir.exists() {
                continue;
            }
            let inside = std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|p| p.lines().any(|l| l.trim() == me))
                .unwrap_or(false);
            if let (true, Some(parent)) = (inside, dir.parent()) {
                if let Err(error) = std::fs::write(parent.join("cgroup.procs"), &me) {
                    tracing::warn!(%error, dir = %dir.display(), "cannot leave the sandbox cgroup");
                }
            }
            let mut removed = false;
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        removed = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            if !removed {
                left.push(dir.clone());
            }
        }
        left
    }

    /// The memory directory (v1 memory controller, or v2).
    fn memory_dir(&self) -> Option<(&Hierarchy, &PathBuf)> {
        self.dirs
            .iter()
            .find(|(h, _)| h.has("memory"))
            .or_else(|| {
                self.dirs
                    .iter()
                    .find(|(h, _)| h.kind == Kind::V2 && is_unified(&self.dirs))
            })
            .map(|(h, d)| (h, d))
    }

    /// OOM kills counted in this cgroup so far (v1 `memory.oom_control` `oom_kill`, v2
    /// `memory.events` `oom_kill`).
    pub fn oom_kills(&self) -> Option<u64> {
        let (h, dir) = self.memory_dir()?;
        let (file, key) = match h.kind {
            Kind::V1(_) => ("memory.oom_control", "oom_kill"),
            Kind::V2 => ("memory.events", "oom_kill"),
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Memory in use in this cgroup, bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let (h, dir) = self.memory_dir()?;
        let file = match h.kind {
            Kind::V1(_) => "memory.usage_in_bytes",
            Kind::V2 => "memory.current",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The nearest memory limit at or above this cgroup, with the directory that sets it.
    pub fn memory_limit(&self) -> Option<(PathBuf, u64)> {
        let (h, dir) = self.memory_dir()?;
        let file = match h.kind {
            Kind::V1(_) => "memory.limit_in_bytes",
            Kind::V2 => "memory.max",
        };
        let mut d = dir.as_path();
        while d.starts_with(&h.mount) {
            if let Ok(text) = std::fs::read_to_string(d.join(file)) {
                if let Ok(limit) = text.trim().parse::<u64>() {
                    // v1 reports "no limit" as a page-rounded i64::MAX.
                    if limit < (1 << 62) {
                        return Some((d.to_path_buf(), limit));
                    }
                }
            }
            d = d.parent()?;
        }
        None
    }
}

/// Whether this is a unified (v2 only) layout: only the cgroup2 hierarchy.
fn is_unified(dirs: &[(Hierarchy, PathBuf)]) -> bool {
    dirs.iter().all(|(h, _)| h.kind == Kind::V2)
}

/// Creates `dir` in a cpuset hierarchy mounted at `mount`, level by level, giving each new
/// level its parent's cpus and mems (an empty cpuset admits no task).
fn create_cpuset(mount: &Path, dir: &Path) -> Result<(), CgroupError> {
    let rel = dir.strip_prefix(mount).unwrap_or(dir);
    let mut current = mount.to_path_buf();
    for part in rel.components() {
        let parent = current.clone();
        current.push(part);
        if current.exists() {
            continue;
        }
        std::fs::create_dir(&current).map_err(io_err(&current))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let value = std::fs::read_to_string(parent.join(file)).map_err(io_err(&parent))?;
            let target = current.join(file);
            std::fs::write(&target, value.trim()).map_err(io_err(&target))?;
        }
    }
    Ok(())
}

/// The cgroup hierarchies mounted on this host.
pub fn host_hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Mountinfo {
        path: path.clone(),
        source,
    })?;
    let hs = parse_mountinfo(&text);
    if hs.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(hs)
}

/// Resolves `path` on this host (relative paths from this process's cgroups).
pub fn resolve_on_host(path: &str) -> Result<Cgroup, CgroupError> {
    let hs = host_hierarchies()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Cgroup::resolve(&hs, &own, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's layout: cgroup v1 with cpu and cpuacct apart, a named systemd hierarchy
    /// and an empty cgroup2 (hybrid).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
22 1 0:21 / /proc rw,nosuid - proc proc rw
";

    const UNIFIED: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hierarchies_come_from_mountinfo() {
        let hs = parse_mountinfo(HYBRID);
        assert_eq!(hs.len(), 7, "{hs:?}");
        assert_eq!(hs[0].mount, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(hs[0].kind, Kind::V1(vec!["cpu".into()]));
        assert_eq!(hs[5].kind, Kind::V1(vec!["name=systemd".into()]));
        assert_eq!(hs[6].kind, Kind::V2);
        let hs = parse_mountinfo(UNIFIED);
        assert_eq!(
            hs,
            [Hierarchy {
                mount: "/sys/fs/cgroup".into(),
                root: "/".into(),
                kind: Kind::V2
            }]
        );
        assert!(parse_mountinfo("1 2 0:1 / /x rw - cgroup cgroup rw,relatime\n").is_empty());
    }

    #[test]
    fn paths_resolve_in_every_hierarchy() {
        let hs = parse_mountinfo(HYBRID);
        let own = "4:memory:/process_api/abc\n2:cpuacct:/\n0::/\n";
        let c = Cgroup::resolve(&hs, own, "/kubepods/pod1/sb").unwrap();
        assert!(c
            .dirs
            .iter()
            .any(|(_, d)| d == Path::new("/sys/fs/cgroup/memory/kubepods/pod1/sb")));
        assert!(c
            .dirs
            .iter()
            .any(|(_, d)| d == Path::new("/sys/fs/cgroup/unified/kubepods/pod1/sb")));
        assert_eq!(c.procs_files().len(), 7);
        // Relative paths start from this process's cgroup, per hierarchy.
        let c = Cgroup::resolve(&hs, own, "sb").unwrap();
        assert!(c
            .dirs
            .iter()
            .any(|(_, d)| d == Path::new("/sys/fs/cgroup/memory/process_api/abc/sb")));
        assert!(c
            .dirs
            .iter()
            .any(|(_, d)| d == Path::new("/sys/fs/cgroup/cpu/sb")));
        for bad in ["", "/a/../b"] {
            assert!(matches!(
                Cgroup::resolve(&hs, own, bad),
                Err(CgroupError::InvalidPath { .. })
            ));
        }
    }

    #[test]
    fn unified_layout_uses_the_one_hierarchy() {
        let hs = parse_mountinfo(UNIFIED);
        let c = Cgroup::resolve(&hs, "0::/\n", "/kubepods.slice/x").unwrap();
        assert_eq!(
            c.procs_files(),
            [PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/x/cgroup.procs"
            )]
        );
        assert!(is_unified(&c.dirs));
    }

    #[test]
    fn a_cgroup_on_a_scratch_tree_is_created_and_removed() {
        // A fake v1 tree in a temp dir: directories and files, no kernel.
        let root = tempfile::tempdir().unwrap();
        let cpuset = root.path().join("cpuset");
        let devices = root.path().join("devices");
        std::fs::create_dir_all(&cpuset).unwrap();
        std::fs::create_dir_all(&devices).unwrap();
        std::fs::write(cpuset.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        let hs = vec![
            Hierarchy {
                mount: cpuset.clone(),
                root: "/".into(),
                kind: Kind::V1(vec!["cpuset".into()]),
            },
            Hierarchy {
                mount: devices.clone(),
                root: "/".into(),
                kind: Kind::V1(vec!["devices".into()]),
            },
        ];
        let c = Cgroup::resolve(&hs, "", "/pods/sb").unwrap();
        c.create().unwrap();
        assert_eq!(
            std::fs::read_to_string(cpuset.join("pods/sb/cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(
            std::fs::read_to_string(devices.join("pods/sb/devices.allow")).unwrap(),
            *VM_DEVICES.last().unwrap()
        );
        // A real cgroup directory has only kernel files; the scratch one holds the
        // files written above, so remove them as the kernel would.
        for d in [cpuset.join("pods/sb"), devices.join("pods/sb")] {
            for e in std::fs::read_dir(&d).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
        assert!(c.remove().is_empty());
        assert!(!cpuset.join("pods/sb").exists() && cpuset.join("pods").exists());
    }
}
