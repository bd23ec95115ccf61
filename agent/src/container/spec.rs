//! The part of the OCI runtime spec the guest acts on, parsed from the JSON the shim sends,
//! and its validation.
//!
//! Our own serde types instead of `oci_spec`'s: the helper process needs plain data it can
//! serialize back into its plan, and fields Go writes as `null` must read as empty.

use std::collections::HashMap;
use std::path::{Component, Path};

use serde::{Deserialize, Deserializer, Serialize};

/// Reads `null` as the type's default (Go marshals nil slices and maps as `null`).
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The runtime spec (`config.json`), the fields the guest uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The container's init process.
    #[serde(default)]
    pub process: Option<Process>,
    /// The root filesystem.
    #[serde(default)]
    pub root: Option<Root>,
    /// Hostname in the container's UTS namespace.
    #[serde(default, deserialize_with = "null_default")]
    pub hostname: String,
    /// NIS domain name in the container's UTS namespace.
    #[serde(default, deserialize_with = "null_default")]
    pub domainname: String,
    /// Mounts, in order.
    #[serde(default, deserialize_with = "null_default")]
    pub mounts: Vec<Mount>,
    /// Linux specifics.
    #[serde(default, deserialize_with = "null_default")]
    pub linux: Linux,
}

/// An OCI process (init, or an exec's `spec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Whether the process gets a pty.
    #[serde(default, deserialize_with = "null_default")]
    pub terminal: bool,
    /// Initial pty size.
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    /// Identity.
    #[serde(default, deserialize_with = "null_default")]
    pub user: User,
    /// argv; `args[0]` is looked up in the container's `PATH` if it has no `/`.
    #[serde(default, deserialize_with = "null_default")]
    pub args: Vec<String>,
    /// `KEY=value` entries.
    #[serde(default, deserialize_with = "null_default")]
    pub env: Vec<String>,
    /// Absolute working directory in the container.
    #[serde(default, deserialize_with = "null_default")]
    pub cwd: String,
    /// Capability sets; `None` = no capabilities at all.
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Resource limits.
    #[serde(default, deserialize_with = "null_default")]
    pub rlimits: Vec<Rlimit>,
    /// `PR_SET_NO_NEW_PRIVS`.
    #[serde(default, deserialize_with = "null_default")]
    pub no_new_privileges: bool,
    /// `/proc/<pid>/oom_score_adj` (-1000 to 1000); `None` keeps the agent's.
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
}

/// A pty size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleSize {
    /// Rows.
    #[serde(default)]
    pub height: u32,
    /// Columns.
    #[serde(default)]
    pub width: u32,
}

/// The process's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// File mode creation mask.
    #[serde(default)]
    pub umask: Option<u32>,
    /// Supplementary groups; empty = those `/etc/group` gives the user.
    #[serde(default, deserialize_with = "null_default")]
    pub additional_gids: Vec<u32>,
}

/// Capability sets, by name (`CAP_CHOWN`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    #[serde(default, deserialize_with = "null_default")]
    pub bounding: Vec<String>,
    /// Effective set.
    #[serde(default, deserialize_with = "null_default")]
    pub effective: Vec<String>,
    /// Inheritable set.
    #[serde(default, deserialize_with = "null_default")]
    pub inheritable: Vec<String>,
    /// Permitted set.
    #[serde(default, deserialize_with = "null_default")]
    pub permitted: Vec<String>,
    /// Ambient set.
    #[serde(default, deserialize_with = "null_default")]
    pub ambient: Vec<String>,
}

/// One `setrlimit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, ...
    #[serde(rename = "type")]
    pub typ: String,
    /// Hard limit.
    #[serde(default)]
    pub hard: u64,
    /// Soft limit.
    #[serde(default)]
    pub soft: u64,
}

/// The root filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Absolute guest path (in the virtio-fs share).
    pub path: String,
    /// Mount the root read-only.
    #[serde(default, deserialize_with = "null_default")]
    pub readonly: bool,
}

/// A mount in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute path in the container.
    pub destination: String,
    /// Filesystem type; `bind` or absent with a `bind` option for binds.
    #[serde(default, rename = "type")]
    pub typ: Option<String>,
    /// Device, filesystem name or (binds) guest path.
    #[serde(default)]
    pub source: Option<String>,
    /// Flags and data options.
    #[serde(default, deserialize_with = "null_default")]
    pub options: Vec<String>,
}

/// Linux specifics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    /// Namespaces to create.
    #[serde(default, deserialize_with = "null_default")]
    pub namespaces: Vec<Namespace>,
    /// Paths hidden from the container.
    #[serde(default, deserialize_with = "null_default")]
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    #[serde(default, deserialize_with = "null_default")]
    pub readonly_paths: Vec<String>,
    /// Sysctls written in the container's namespaces.
    #[serde(default, deserialize_with = "null_default")]
    pub sysctl: HashMap<String, String>,
    /// Device nodes to create in the container's /dev.
    #[serde(default, deserialize_with = "null_default")]
    pub devices: Vec<Device>,
    /// Propagation of the root mount (`rprivate` by default).
    #[serde(default)]
    pub rootfs_propagation: Option<String>,
    /// Cgroup resources (OCI `LinuxResources`), applied by the agent.
    #[serde(default)]
    pub resources: Option<serde_json::Value>,
    /// The seccomp profile, compiled by [`super::seccomp`].
    #[serde(default)]
    pub seccomp: Option<super::seccomp::Profile>,
}

/// A namespace of the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// `pid`, `mount`, `ipc`, `uts`, `network`, `cgroup`, `user`, `time`.
    #[serde(rename = "type")]
    pub typ: String,
    /// An existing namespace to join instead of a new one.
    #[serde(default)]
    pub path: Option<String>,
}

/// A device node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Absolute path in the container.
    pub path: String,
    /// `c`, `u`, `b` or `p`.
    #[serde(rename = "type")]
    pub typ: String,
    /// Major number.
    #[serde(default)]
    pub major: i64,
    /// Minor number.
    #[serde(default)]
    pub minor: i64,
    /// Permission bits.
    #[serde(default)]
    pub file_mode: Option<u32>,
    /// Owner.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group.
    #[serde(default)]
    pub gid: Option<u32>,
}

/// A spec or process the guest cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not valid JSON for the type.
    #[error("invalid {what} JSON: {reason}")]
    Json {
        /// `OCI spec` or `OCI process`.
        what: &'static str,
        /// serde's message.
        reason: String,
    },
    /// A required part is missing.
    #[error("the OCI spec has no {0}")]
    Missing(&'static str),
    /// `process.args` is empty.
    #[error("process.args is empty: nothing to run")]
    NoArgs,
    /// A path that must be absolute and clean is not.
    #[error("{field} {value:?} must be an absolute path without \"..\"")]
    Path {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// The root is not inside the directory the shim shares.
    #[error("root.path {path:?} is not under {base}")]
    RootOutsideShare {
        /// root.path.
        path: String,
        /// Where roots must live.
        base: String,
    },
    /// A namespace type we do not know or do not support.
    #[error("namespace {typ:?} is not supported in the guest ({reason})")]
    Namespace {
        /// The type.
        typ: String,
        /// Why.
        reason: &'static str,
    },
    /// A namespace path other than the pod's.
    #[error("namespace {typ} path {path:?} cannot be joined (expected {expected})")]
    NamespacePath {
        /// The type.
        typ: String,
        /// The path.
        path: String,
        /// What would be accepted.
        expected: String,
    },
    /// An unknown rlimit.
    #[error("unknown rlimit {0:?} (expected RLIMIT_NOFILE, RLIMIT_NPROC, ...)")]
    Rlimit(String),
    /// `process.oomScoreAdj` out of the kernel's range.
    #[error("process.oomScoreAdj {0} is out of range (expected -1000 to 1000)")]
    OomScoreAdj(i32),
    /// An unknown capability name.
    #[error("unknown capability {0:?} (expected CAP_CHOWN, CAP_NET_ADMIN, ...)")]
    Capability(String),
    /// A sysctl that is not namespaced (it would change the whole guest).
    #[error("sysctl {0:?} is not namespaced (allowed: net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*, kernel.hostname, kernel.domainname)")]
    Sysctl(String),
    /// A namespaced sysctl without its namespace.
    #[error("sysctl {key:?} needs a {namespace} namespace in the spec")]
    SysctlNamespace {
        /// The sysctl.
        key: String,
        /// The namespace it belongs to.
        namespace: &'static str,
    },
    /// An `env` entry without `=`.
    #[error("process.env entry {0:?} is not KEY=value")]
    Env(String),
    /// A seccomp profile the guest cannot apply.
    #[error(transparent)]
    Seccomp(#[from] super::seccomp::SeccompError),
    /// `args` or `env` beyond Linux's `execve` limits.
    #[error(transparent)]
    Limit(#[from] kata_proto::limits::LimitError),
}

/// Parses and validates a container's spec; `shared_base` is where roots must live,
/// `pod_ns_dir` where a pod's namespaces are kept (the only paths a spec may join).
pub fn parse_spec(json: &[u8], shared_base: &Path, pod_ns_dir: &Path) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(|e| SpecError::Json {
        what: "OCI spec",
        reason: e.to_string(),
    })?;
    let process = spec.process.as_ref().ok_or(SpecError::Missing("process"))?;
    validate_process(process)?;
    let root = spec.root.as_ref().ok_or(SpecError::Missing("root"))?;
    check_abs("root.path", &root.path)?;
    if !Path::new(&root.path).starts_with(shared_base) {
        return Err(SpecError::RootOutsideShare {
            path: root.path.clone(),
            base: shared_base.display().to_string(),
        });
    }
    for m in &spec.mounts {
        check_abs("mounts[].destination", &m.destination)?;
    }
    for d in &spec.linux.devices {
        check_abs("linux.devices[].path", &d.path)?;
    }
    let has = |t: &str| spec.linux.namespaces.iter().any(|n| n.typ == t);
    if !has("mount") {
        // Without its own mount namespace, pivot_root would move the guest's root.
        return Err(SpecError::Namespace {
            typ: "mount".into(),
            reason: "a container needs its own mount namespace in the guest",
        });
    }
    for key in spec.linux.sysctl.keys() {
        let ns = sysctl_namespace(key).ok_or_else(|| SpecError::Sysctl(key.clone()))?;
        if !has(ns) {
            return Err(SpecError::SysctlNamespace {
                key: key.clone(),
                namespace: ns,
            });
        }
    }
    for ns in &spec.linux.namespaces {
        namespace_flag(&ns.typ)?;
        if let Some(path) = &ns.path {
            let expected = namespace_file(&ns.typ).map(|f| pod_ns_dir.join(f));
            let pod_ns = matches!(ns.typ.as_str(), "ipc" | "uts" | "network" | "pid");
            if !pod_ns || expected.as_deref() != Some(Path::new(path)) {
                return Err(SpecError::NamespacePath {
                    typ: ns.typ.clone(),
                    path: path.clone(),
                    expected: expected
                        .filter(|_| pod_ns)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "no path (a new namespace)".into()),
                });
            }
        }
    }
    Ok(spec)
}

/// Parses and validates an exec's process.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    let p: Process = serde_json::from_slice(json).map_err(|e| SpecError::Json {
        what: "OCI process",
        reason: e.to_string(),
    })?;
    validate_process(&p)?;
    Ok(p)
}

fn validate_process(p: &Process) -> Result<(), SpecError> {
    if p.args.is_empty() || p.args[0].is_empty() {
        return Err(SpecError::NoArgs);
    }
    if !p.cwd.is_empty() {
        check_abs("process.cwd", &p.cwd)?;
    }
    for e in &p.env {
        if !e.contains('=') {
            // Named by its key only: the value may be huge (or secret).
            let key: String = e.chars().take(64).collect();
            return Err(SpecError::Env(key));
        }
    }
    let stack = p
        .rlimits
        .iter()
        .find(|r| r.typ == "RLIMIT_STACK")
        .map(|r| r.soft);
    kata_proto::limits::check_process(&p.args, &p.env, stack)?;
    for r in &p.rlimits {
        rlimit_resource(&r.typ)?;
    }
    if let Some(adj) = p.oom_score_adj.filter(|a| !(-1000..=1000).contains(a)) {
        return Err(SpecError::OomScoreAdj(adj));
    }
    if let Some(c) = &p.capabilities {
        for name in c
            .bounding
            .iter()
            .chain(&c.effective)
            .chain(&c.inheritable)
            .chain(&c.permitted)
            .chain(&c.ambient)
        {
            super::caps::number(name).ok_or_else(|| SpecError::Capability(name.clone()))?;
        }
    }
    Ok(())
}

fn check_abs(field: &'static str, value: &str) -> Result<(), SpecError> {
    let p = Path::new(value);
    let clean = p.is_absolute() && !p.components().any(|c| c == Component::ParentDir);
    if clean {
        Ok(())
    } else {
        Err(SpecError::Path {
            field,
            value: value.to_owned(),
        })
    }
}

/// The namespace a sysctl belongs to, if it is namespaced at all (runc's list).
pub fn sysctl_namespace(key: &str) -> Option<&'static str> {
    match key {
        "kernel.sem"
        | "kernel.msgmax"
        | "kernel.msgmnb"
        | "kernel.msgmni"
        | "kernel.shmall"
        | "kernel.shmmax"
        | "kernel.shmmni"
        | "kernel.shm_rmid_forced" => Some("ipc"),
        k if k.starts_with("fs.mqueue.") => Some("ipc"),
        "kernel.hostname" | "kernel.domainname" => Some("uts"),
        k if k.starts_with("net.") => Some("network"),
        _ => None,
    }
}

/// The `CLONE_NEW*` flag of a namespace type.
pub fn namespace_flag(typ: &str) -> Result<libc::c_int, SpecError> {
    Ok(match typ {
        "pid" => libc::CLONE_NEWPID,
        "mount" => libc::CLONE_NEWNS,
        "ipc" => libc::CLONE_NEWIPC,
        "uts" => libc::CLONE_NEWUTS,
        "network" => libc::CLONE_NEWNET,
        "cgroup" => libc::CLONE_NEWCGROUP,
        "user" => {
            return Err(SpecError::Namespace {
                typ: typ.to_owned(),
                reason: "the VM is the isolation boundary; user namespaces are not mapped",
            })
        }
        "time" => libc::CLONE_NEWTIME,
        _ => {
            return Err(SpecError::Namespace {
                typ: typ.to_owned(),
                reason: "unknown type",
            })
        }
    })
}

/// The `/proc/<pid>/ns/` file of a namespace type.
pub fn namespace_file(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "pid" => "pid",
        "mount" => "mnt",
        "ipc" => "ipc",
        "uts" => "uts",
        "network" => "net",
        "cgroup" => "cgroup",
        "time" => "time",
        _ => return None,
    })
}

/// The `setrlimit` resource of an OCI rlimit type.
pub fn rlimit_resource(typ: &str) -> Result<libc::__rlimit_resource_t, SpecError> {
    Ok(match typ {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        other => return Err(SpecError::Rlimit(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/run/kata-containers/shared/containers";
    const POD_NS: &str = "/run/kata-containers/sandbox/ns";

    fn parse_spec(json: &[u8], base: &Path) -> Result<Spec, SpecError> {
        super::parse_spec(json, base, Path::new(POD_NS))
    }

    fn spec_json(extra: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2",
              "process":{{"args":["sh"],"env":["PATH=/bin"],"cwd":"/","user":{{"uid":0,"gid":0,"additionalGids":null}},
                          "capabilities":{{"bounding":["CAP_CHOWN"],"effective":null}},
                          "rlimits":[{{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}}]}},
              "root":{{"path":"{BASE}/c1/rootfs","readonly":true}},
              "mounts":[{{"destination":"/proc","type":"proc","source":"proc","options":null}}],
              "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}}],"maskedPaths":null}}
              {extra}}}"#
        )
    }

    #[test]
    fn parses_a_containerd_spec_with_nulls() {
        let s = parse_spec(spec_json("").as_bytes(), Path::new(BASE)).unwrap();
        let p = s.process.unwrap();
        assert_eq!(p.args, ["sh"]);
        assert!(p.user.additional_gids.is_empty());
        assert_eq!(p.capabilities.unwrap().bounding, ["CAP_CHOWN"]);
        assert!(s.root.unwrap().readonly);
        assert_eq!(s.mounts[0].typ.as_deref(), Some("proc"));
        assert_eq!(s.linux.namespaces.len(), 2);
    }

    #[test]
    fn rejections_name_the_value() {
        let base = Path::new(BASE);
        let e = parse_spec(br#"{"root":{"path":"/x"}}"#, base).unwrap_err();
        assert_eq!(e, SpecError::Missing("process"));
        let outside = spec_json("").replace(&format!("{BASE}/c1/rootfs"), "/etc");
        let e = parse_spec(outside.as_bytes(), base).unwrap_err();
        assert!(e.to_string().contains("\"/etc\""), "{e}");
        let dots = spec_json("").replace("\"/proc\"", "\"/../proc\"");
        let e = parse_spec(dots.as_bytes(), base).unwrap_err();
        assert!(e.to_string().contains("/../proc"), "{e}");
        let userns = spec_json("").replace(r#"{"type":"pid"}"#, r#"{"type":"user"}"#);
        let e = parse_spec(userns.as_bytes(), base).unwrap_err();
        assert!(e.to_string().contains("\"user\""), "{e}");
        let joined = spec_json("").replace(
            r#"{"type":"pid"}"#,
            r#"{"type":"network","path":"/proc/1/ns/net"}"#,
        );
        let e = parse_spec(joined.as_bytes(), base).unwrap_err();
        assert!(
            e.to_string()
                .contains("/run/kata-containers/sandbox/ns/net"),
            "{e}"
        );
        let pod = spec_json("").replace(
            r#"{"type":"pid"}"#,
            r#"{"type":"network","path":"/run/kata-containers/sandbox/ns/net"}"#,
        );
        parse_spec(pod.as_bytes(), base).unwrap();
        let rl = spec_json("").replace("RLIMIT_NOFILE", "RLIMIT_BOGUS");
        let e = parse_spec(rl.as_bytes(), base).unwrap_err();
        assert_eq!(e, SpecError::Rlimit("RLIMIT_BOGUS".into()));
        let cap = spec_json("").replace("CAP_CHOWN", "CAP_FLY");
        let e = parse_spec(cap.as_bytes(), base).unwrap_err();
        assert_eq!(e, SpecError::Capability("CAP_FLY".into()));
        let e = parse_spec(b"[", base).unwrap_err();
        assert!(matches!(e, SpecError::Json { .. }));
        let no_mnt = spec_json("").replace(r#",{"type":"mount"}"#, "");
        let e = parse_spec(no_mnt.as_bytes(), base).unwrap_err();
        assert!(e.to_string().contains("\"mount\""), "{e}");
        let vm =
            spec_json("").replace(r#""maskedPaths":null"#, r#""sysctl":{"vm.swappiness":"1"}"#);
        let e = parse_spec(vm.as_bytes(), base).unwrap_err();
        assert_eq!(e, SpecError::Sysctl("vm.swappiness".into()));
        let net = spec_json("").replace(
            r#""maskedPaths":null"#,
            r#""sysctl":{"net.ipv4.ip_forward":"1"}"#,
        );
        let e = parse_spec(net.as_bytes(), base).unwrap_err();
        assert!(e.to_string().contains("network namespace"), "{e}");
    }

    #[test]
    fn exec_process_is_validated() {
        let p = parse_process(
            br#"{"args":["id"],"cwd":"/home","env":["A=b"],"user":{"uid":1000,"gid":1000}}"#,
        )
        .unwrap();
        assert_eq!(p.user.uid, 1000);
        assert_eq!(
            parse_process(br#"{"args":[],"cwd":"/"}"#).unwrap_err(),
            SpecError::NoArgs
        );
        assert!(matches!(
            parse_process(br#"{"args":["x"],"cwd":"rel"}"#).unwrap_err(),
            SpecError::Path {
                field: "process.cwd",
                ..
            }
        ));
        assert_eq!(
            parse_process(br#"{"args":["x"],"env":["NOEQ"]}"#).unwrap_err(),
            SpecError::Env("NOEQ".into())
        );
    }

    #[test]
    fn oom_score_adj_is_kept_within_the_kernel_range() {
        for adj in [-1000, -997, 0, 1000] {
            let json = format!(r#"{{"args":["x"],"oomScoreAdj":{adj}}}"#);
            assert_eq!(
                parse_process(json.as_bytes()).unwrap().oom_score_adj,
                Some(adj)
            );
        }
        assert_eq!(
            parse_process(br#"{"args":["x"]}"#).unwrap().oom_score_adj,
            None
        );
        let e = parse_process(br#"{"args":["x"],"oomScoreAdj":1001}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "process.oomScoreAdj 1001 is out of range (expected -1000 to 1000)"
        );
    }
}
