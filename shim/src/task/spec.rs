//! The bundle's OCI runtime spec: reading it, the grouping facts it carries (sandbox id,
//! container type), and rewriting it for the guest.
//!
//! The guest must never see host paths: the root moves to the container's directory in the
//! virtio-fs share, hooks (host binaries) go, namespace paths (host `/proc/<pid>/ns/...`)
//! go while their types stay, and bind mounts of host paths become binds of
//! `<share>/<id>/mounts/<n>`, where the shim bind-mounts the host path ([`HostBind`]).
//! The agent decides the guest cgroup, so `cgroupsPath` goes too.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use crate::sandbox::agent::GUEST_SHARED_DIR;
pub use crate::sandbox::mounts::HostBind;

/// containerd CRI: the pod's sandbox id.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// containerd CRI: `sandbox` or `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI-O: the pod's sandbox id.
pub const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";
/// CRI-O: `sandbox` or `container`.
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";

/// Mount types the guest kernel provides by itself; kept as they are.
const GUEST_FS_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// Errors reading the spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json is not a valid OCI runtime spec.
    #[error("invalid OCI spec {}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The rewritten spec could not be serialized.
    #[error("cannot serialize the OCI spec")]
    Serialize(#[source] serde_json::Error),
    /// A mount the guest cannot provide.
    #[error("mount of type {typ:?} on {destination} is not supported in the VM (expected a bind of a host path or one of {GUEST_FS_TYPES:?})")]
    UnsupportedMount { destination: String, typ: String },
    /// CRI annotations that contradict each other or are incomplete.
    #[error("invalid CRI annotations: {0}")]
    Annotation(String),
    /// A container joins a namespace the guest cannot give it.
    #[error("namespace {typ} path {path} cannot be shared in the VM (only a pod's ipc, uts, network and pid namespaces)")]
    Namespace { typ: String, path: String },
    /// A bind mount without a source path.
    #[error("bind mount on {destination} has no absolute source path")]
    BindWithoutSource { destination: String },
    /// The process's args or env are beyond what Linux's execve takes.
    #[error(transparent)]
    Limit(#[from] kata_proto::limits::LimitError),
}

/// The spec's root.path (relative to the bundle, or absolute), `rootfs` when unset.
pub fn root_path(spec: &Spec) -> PathBuf {
    spec.root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"))
}

/// Reads `<bundle>/config.json` for Create, refusing a process beyond Linux's limits
/// before anything is created.
pub async fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|source| SpecError::Read {
            path: path.clone(),
            source,
        })?;
    let spec = parse(&bytes).map_err(|source| SpecError::Parse { path, source })?;
    if let Some(process) = spec.process() {
        check_process_limits(process)?;
    }
    Ok(spec)
}

/// Checks a process's args and env against Linux's execve limits
/// ([`kata_proto::limits`], the same check the agent makes).
pub fn check_process_limits(process: &oci_spec::runtime::Process) -> Result<(), SpecError> {
    let stack = process.rlimits().iter().flatten().find_map(|r| {
        (r.typ() == oci_spec::runtime::PosixRlimitType::RlimitStack).then_some(r.soft())
    });
    kata_proto::limits::check_process(
        process.args().as_deref().unwrap_or_default(),
        process.env().as_deref().unwrap_or_default(),
        stack,
    )?;
    Ok(())
}

/// Reads `<bundle>/config.json` without async (the `start` and `delete` commands).
pub fn load_sync(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&bytes).map_err(|source| SpecError::Parse { path, source })
}

/// Parses spec JSON.
pub fn parse(bytes: &[u8]) -> Result<Spec, serde_json::Error> {
    serde_json::from_slice(bytes)
}

fn annotation<'a>(spec: &'a Spec, keys: &[&str]) -> Option<&'a str> {
    let annotations = spec.annotations().as_ref()?;
    keys.iter()
        .find_map(|k| annotations.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The id that groups containers into one shim and one VM: the pod's sandbox id from
/// the CRI annotations, else the container's own id (`ctr run`: one VM per container).
pub fn sandbox_id(spec: Option<&Spec>, container_id: &str) -> String {
    spec.and_then(|s| annotation(s, &[CRI_SANDBOX_ID, CRIO_SANDBOX_ID]))
        .unwrap_or(container_id)
        .to_owned()
}

/// Whether the spec describes a CRI pod sandbox (pause) container; `None` without CRI
/// annotations.
pub fn is_cri_sandbox(spec: &Spec) -> Option<bool> {
    annotation(spec, &[CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE]).map(|t| t == "sandbox")
}

/// What a container is to its pod, from the CRI annotations (containerd's or CRI-O's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No CRI annotations (`ctr run`): its own VM, its own namespaces.
    Standalone,
    /// The pod's sandbox (pause) container: it boots the VM; its namespaces are the pod's.
    Sandbox,
    /// An application container joining the pod `sandbox_id`.
    Container {
        /// The pod's sandbox id.
        sandbox_id: String,
    },
}

impl Role {
    /// Whether the container belongs to a CRI pod.
    pub fn in_pod(&self) -> bool {
        !matches!(self, Role::Standalone)
    }
}

/// Reads the container's [`Role`]; annotations that contradict each other are an error
/// naming them.
pub fn role(spec: &Spec, container_id: &str) -> Result<Role, SpecError> {
    let typ = annotation(spec, &[CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE]);
    let sandbox_id = annotation(spec, &[CRI_SANDBOX_ID, CRIO_SANDBOX_ID]);
    match (typ, sandbox_id) {
        (None, None) => Ok(Role::Standalone),
        (Some("sandbox"), Some(s)) if s != container_id => Err(SpecError::Annotation(format!(
            "sandbox container {container_id} names another sandbox id {s:?}"
        ))),
        (Some("sandbox"), _) => Ok(Role::Sandbox),
        (Some("container"), Some(s)) => Ok(Role::Container {
            sandbox_id: s.to_owned(),
        }),
        (Some("container"), None) => Err(SpecError::Annotation(format!(
            "container {container_id} has no {CRI_SANDBOX_ID} / {CRIO_SANDBOX_ID} annotation"
        ))),
        (Some(other), _) => Err(SpecError::Annotation(format!(
            "container type {other:?} (expected \"sandbox\" or \"container\")"
        ))),
        (None, Some(s)) => Err(SpecError::Annotation(format!(
            "sandbox id {s:?} without a container type annotation"
        ))),
    }
}

/// The host network namespace a sandbox (or a `ctr --with-ns network:`) container names:
/// the pod's, where CNI put its interfaces.
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        .and_then(|ns| ns.path().clone())
}

/// Where the guest keeps a pod's namespaces and its shared memory.
pub const GUEST_SANDBOX_NS_DIR: &str = "/run/kata-containers/sandbox/ns";
/// The pod's /dev/shm in the guest.
pub const GUEST_SANDBOX_SHM: &str = "/run/kata-containers/sandbox/shm";

/// The guest's name for a pod namespace of type `typ` (ipc, uts, net/network, pid).
fn guest_ns_path(typ: &str) -> Option<String> {
    let file = match typ {
        "ipc" => "ipc",
        "uts" => "uts",
        "net" | "network" => "net",
        "pid" => "pid",
        _ => return None,
    };
    Some(format!("{GUEST_SANDBOX_NS_DIR}/{file}"))
}

/// Where the guest sees a container's root filesystem.
pub fn guest_rootfs(container_id: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
}

/// Removes `linux.seccomp` (`[runtime] disable_guest_seccomp`): the guest then applies no
/// seccomp filter to the container.
pub fn strip_seccomp(spec: &mut Spec) {
    if let Some(linux) = spec.linux_mut() {
        linux.set_seccomp(None);
    }
}

/// Rewrites `spec` for the guest (see the module docs); returns it as JSON and the host
/// paths to bind into the container's share first.
pub fn to_guest_json(
    mut spec: Spec,
    container_id: &str,
    role: &Role,
) -> Result<(Vec<u8>, Vec<HostBind>), SpecError> {
    let binds = rewrite_for_guest(&mut spec, container_id, role)?;
    let json = serde_json::to_vec(&spec).map_err(SpecError::Serialize)?;
    Ok((json, binds))
}

/// The rewrite behind [`to_guest_json`].
///
/// In a pod, a container's namespace that has a host path (the sandbox's, as CRI gives it)
/// becomes the pod's namespace in the guest, and /dev/shm the pod's shm.
pub fn rewrite_for_guest(
    spec: &mut Spec,
    container_id: &str,
    role: &Role,
) -> Result<Vec<HostBind>, SpecError> {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from(guest_rootfs(container_id)));
    spec.set_root(Some(root));
    spec.set_hooks(None);
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(None);
        if let Some(namespaces) = linux.namespaces_mut() {
            // The VM is the pod's network namespace: a sandbox (or standalone container)
            // whose network namespace is the host pod's uses the guest's, which holds the
            // pod's interfaces.
            if !matches!(role, Role::Container { .. }) {
                namespaces.retain(|ns| {
                    ns.typ() != oci_spec::runtime::LinuxNamespaceType::Network
                        || ns.path().is_none()
                });
            }
            // A host-network pod's sandbox comes without a UTS namespace (it would be the
            // node's); in the VM the pod gets its own, so its hostname applies and the pod's
            // containers join it.
            let has_uts = namespaces
                .iter()
                .any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Uts);
            if !has_uts {
                let mut uts = oci_spec::runtime::LinuxNamespace::default();
                uts.set_typ(oci_spec::runtime::LinuxNamespaceType::Uts);
                match role {
                    Role::Sandbox => namespaces.push(uts),
                    // ...and the pod's containers join it.
                    Role::Container { .. } => {
                        uts.set_path(Some(PathBuf::from(format!("{GUEST_SANDBOX_NS_DIR}/uts"))));
                        namespaces.push(uts);
                    }
                    Role::Standalone => {}
                }
            }
            for ns in namespaces.iter_mut() {
                let Some(path) = ns.path().clone() else {
                    continue;
                };
                let typ = ns.typ().to_string();
                let joined = match role {
                    Role::Container { .. } => guest_ns_path(&typ),
                    _ => None,
                };
                match joined {
                    Some(guest) => {
                        ns.set_path(Some(PathBuf::from(guest)));
                    }
                    // The sandbox's (and ctr's) namespaces are new ones in the guest; the
                    // host path names the host's pod network namespace (CNI), which the
                    // VM stands in for.
                    None if matches!(role, Role::Container { .. }) => {
                        return Err(SpecError::Namespace {
                            typ,
                            path: path.display().to_string(),
                        })
                    }
                    None => {
                        ns.set_path(None);
                    }
                }
            }
        }
    }
    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts_mut() {
        let mut kept = Vec::with_capacity(mounts.len());
        for m in std::mem::take(mounts) {
            kept.push(guest_mount(m, container_id, role, &mut binds)?);
        }
        *mounts = kept;
    }
    Ok(binds)
}

/// The guest's version of a mount; a bind of a host path is recorded in `binds` and
/// pointed at its place in the share.
fn guest_mount(
    mut m: Mount,
    container_id: &str,
    role: &Role,
    binds: &mut Vec<HostBind>,
) -> Result<Mount, SpecError> {
    let typ = m.typ().clone().unwrap_or_default();
    if m.destination() == Path::new("/dev/shm") && role.in_pod() {
        // The pod's containers share one shm, which the guest keeps for the pod.
        m.set_typ(Some("bind".into()));
        m.set_source(Some(GUEST_SANDBOX_SHM.into()));
        m.set_options(Some(
            ["rbind", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        ));
        return Ok(m);
    }
    if GUEST_FS_TYPES.contains(&typ.as_str()) {
        return Ok(m);
    }
    if m.destination() == Path::new("/dev/shm") {
        // CRI binds the pod's host shm; the guest gets its own.
        m.set_typ(Some("tmpfs".into()));
        m.set_source(Some("shm".into()));
        m.set_options(Some(
            ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        ));
        return Ok(m);
    }
    let options = m.options().clone().unwrap_or_default();
    let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
    let destination = m.destination().display().to_string();
    if !is_bind {
        return Err(SpecError::UnsupportedMount { destination, typ });
    }
    let source = match m.source() {
        Some(s) if s.is_absolute() => s.clone(),
        _ => return Err(SpecError::BindWithoutSource { destination }),
    };
    let share_path = PathBuf::from(format!("mounts/{}", binds.len()));
    let guest_source = format!("{GUEST_SHARED_DIR}/{container_id}/{}", share_path.display());
    binds.push(HostBind {
        source,
        share_path,
        readonly: options.iter().any(|o| o == "ro"),
        destination: m.destination().clone(),
    });
    m.set_source(Some(PathBuf::from(guest_source)));
    m.set_typ(Some("bind".into()));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/run/containerd/bundle/rootfs", "readonly": true},
        "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
        "annotations": {"io.kubernetes.cri.sandbox-id": "pod1",
                        "io.kubernetes.cri.container-type": "container"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/pod1/shm",
             "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/pod1/hosts",
             "options": ["rbind"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
        ],
        "linux": {
            "cgroupsPath": "/kubepods/pod1/c1",
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"}
            ]
        }
    }"#;

    fn rewritten() -> serde_json::Value {
        let spec = parse(SPEC.as_bytes()).unwrap();
        let role = role(&spec, "c1").unwrap();
        serde_json::from_slice(&to_guest_json(spec, "c1", &role).unwrap().0).unwrap()
    }

    #[test]
    fn root_moves_into_the_share_and_keeps_readonly() {
        let v = rewritten();
        assert_eq!(
            v["root"]["path"],
            "/run/kata-containers/shared/containers/c1/rootfs"
        );
        assert_eq!(v["root"]["readonly"], true);
    }

    #[test]
    fn host_only_parts_are_dropped_and_pod_namespaces_point_at_the_guest() {
        let v = rewritten();
        assert!(v.get("hooks").is_none(), "{v}");
        assert!(v["linux"].get("cgroupsPath").is_none(), "{v}");
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 3, "{v}");
        assert!(ns[0].get("path").is_none());
        assert_eq!(ns[1]["type"], "network");
        assert_eq!(ns[1]["path"], "/run/kata-containers/sandbox/ns/net");
        // Without a UTS namespace of its own (host network), it joins the pod's.
        assert_eq!(ns[2]["type"], "uts");
        assert_eq!(ns[2]["path"], "/run/kata-containers/sandbox/ns/uts");
        // The sandbox's namespaces are new ones; its host network namespace is the VM's.
        let mut spec = parse(SPEC.as_bytes()).unwrap();
        rewrite_for_guest(&mut spec, "pod1", &Role::Sandbox).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        let types: Vec<&str> = ns.iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["pid", "uts"], "{v}");
        assert!(ns.iter().all(|n| n.get("path").is_none()), "{v}");
        // A pod container may not join a namespace the VM cannot give it.
        let mut spec = parse(
            &SPEC
                .replace(
                    r#"{"type": "pid"}"#,
                    r#"{"type": "mount", "path": "/proc/1/ns/mnt"}"#,
                )
                .into_bytes(),
        )
        .unwrap();
        let role = Role::Container {
            sandbox_id: "pod1".into(),
        };
        let e = rewrite_for_guest(&mut spec, "c1", &role).unwrap_err();
        assert!(e.to_string().contains("/proc/1/ns/mnt"), "{e}");
    }

    #[test]
    fn roles_come_from_either_dialect_and_contradictions_are_named() {
        let spec = |a: &str| {
            parse(format!(r#"{{"ociVersion":"1.0.2","annotations":{{{a}}}}}"#).as_bytes()).unwrap()
        };
        assert_eq!(role(&spec(""), "c").unwrap(), Role::Standalone);
        assert_eq!(
            role(&spec(r#""io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"p""#), "p").unwrap(),
            Role::Sandbox
        );
        assert_eq!(
            role(&spec(r#""io.kubernetes.cri-o.ContainerType":"container","io.kubernetes.cri-o.SandboxID":"p""#), "c").unwrap(),
            Role::Container { sandbox_id: "p".into() }
        );
        for (bad, named) in [
            (
                r#""io.kubernetes.cri.container-type":"pod","io.kubernetes.cri.sandbox-id":"p""#,
                "\"pod\"",
            ),
            (
                r#""io.kubernetes.cri.container-type":"container""#,
                "c has no",
            ),
            (
                r#""io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"q""#,
                "\"q\"",
            ),
            (r#""io.kubernetes.cri.sandbox-id":"p""#, "\"p\""),
        ] {
            let e = role(&spec(bad), "c").unwrap_err();
            assert!(e.to_string().contains(named), "{e}");
        }
    }

    #[test]
    fn mounts_keep_guest_filesystems_replace_shm_and_share_binds() {
        let v = rewritten();
        let mounts = v["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, ["/proc", "/dev/shm", "/etc/hosts", "/sys/fs/cgroup"]);
        // In a pod, /dev/shm is the pod's.
        assert_eq!(mounts[1]["type"], "bind");
        assert_eq!(mounts[1]["source"], "/run/kata-containers/sandbox/shm");
        assert_eq!(
            mounts[2]["source"],
            "/run/kata-containers/shared/containers/c1/mounts/0"
        );
        assert_eq!(mounts[2]["type"], "bind");
        let spec = parse(SPEC.as_bytes()).unwrap();
        let (_, binds) = to_guest_json(spec, "c1", &Role::Standalone).unwrap();
        assert_eq!(
            binds,
            [HostBind {
                source: "/var/lib/pod1/hosts".into(),
                share_path: "mounts/0".into(),
                readonly: false,
                destination: "/etc/hosts".into(),
            }]
        );
    }

    #[test]
    fn mounts_the_guest_cannot_provide_are_refused_by_name() {
        let spec = parse(
            br#"{"ociVersion":"1.0.2","mounts":[{"destination":"/data","type":"ext4","source":"/dev/sdb1"}]}"#,
        )
        .unwrap();
        let e = to_guest_json(spec, "c", &Role::Standalone).unwrap_err();
        assert!(e.to_string().contains("\"ext4\" on /data"), "{e}");
        let spec = parse(
            br#"{"ociVersion":"1.0.2","mounts":[{"destination":"/data","type":"bind","options":["rbind"]}]}"#,
        )
        .unwrap();
        assert!(matches!(
            to_guest_json(spec, "c", &Role::Standalone).unwrap_err(),
            SpecError::BindWithoutSource { .. }
        ));
    }

    #[test]
    fn seccomp_is_kept_unless_stripped() {
        let json = SPEC.replace(
            r#""cgroupsPath""#,
            r#""seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}, "cgroupsPath""#,
        );
        let mut spec = parse(json.as_bytes()).unwrap();
        let (guest, _) = to_guest_json(spec.clone(), "c1", &Role::Standalone).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&guest).unwrap();
        assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        strip_seccomp(&mut spec);
        let (guest, _) = to_guest_json(spec, "c1", &Role::Standalone).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&guest).unwrap();
        assert!(v["linux"].get("seccomp").is_none(), "{v}");
    }

    #[test]
    fn process_limits_are_checked_before_anything_is_made() {
        let big = format!("A={}", "x".repeat(200 << 10));
        let json = SPEC.replace(
            r#""args": ["sh"]"#,
            &format!(r#""args": ["sh"], "env": ["{big}"]"#),
        );
        let spec = parse(json.as_bytes()).unwrap();
        let e = check_process_limits(spec.process().as_ref().unwrap()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("MAX_ARG_STRLEN") && text.contains("204803"),
            "{text}"
        );
        let ok = parse(SPEC.as_bytes()).unwrap();
        check_process_limits(ok.process().as_ref().unwrap()).unwrap();
    }

    #[test]
    fn process_is_untouched() {
        let v = rewritten();
        assert_eq!(v["process"]["args"][0], "sh");
    }

    #[test]
    fn grouping_follows_cri_annotations() {
        let spec = parse(SPEC.as_bytes()).unwrap();
        assert_eq!(sandbox_id(Some(&spec), "c1"), "pod1");
        assert_eq!(is_cri_sandbox(&spec), Some(false));
        let crio = parse(
            br#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri-o.SandboxID":"p2",
                "io.kubernetes.cri-o.ContainerType":"sandbox"}}"#,
        )
        .unwrap();
        assert_eq!(sandbox_id(Some(&crio), "p2"), "p2");
        assert_eq!(is_cri_sandbox(&crio), Some(true));
        let plain = parse(br#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(sandbox_id(Some(&plain), "c9"), "c9");
        assert_eq!(sandbox_id(None, "c9"), "c9");
        assert_eq!(is_cri_sandbox(&plain), None);
    }
}
