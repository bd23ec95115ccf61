//! Containers in a remote VM (peer pods), which shares no file system with the node.
//!
//! - Root filesystem: a pod's container pulls its image inside the VM (agent PullImage,
//!   the CRI annotation `io.kubernetes.cri.image-name`, CRI-O's
//!   `io.kubernetes.cri-o.ImageName`); the host rootfs containerd prepared is ignored. The
//!   sandbox (pause) container, and a container outside a pod, get their host rootfs
//!   copied in (CopyFile): the pause image is one small static binary the node already
//!   has, so the VM needs no registry access (nor credentials) for it and the pod VM image
//!   stays independent of the pause version; the copy is bounded by
//!   [`HOST_ROOTFS_LIMIT`].
//! - Host bind mounts (configMaps, secrets, CRI's hosts/hostname/resolv.conf, any other
//!   host path): copied to `<guest shared dir>/<container>/mounts/<n>`, where the spec's
//!   rewrite already points them. An emptyDir (`kubernetes.io~empty-dir`) is created empty
//!   once per pod at `<guest shared dir>/<sandbox>/empty-dirs/<name>`, so the pod's
//!   containers share it in the VM as they would on the node.
//! - Kubernetes updates configMap, secret, projected and downward API volumes on the node;
//!   a [`VolumeWatch`] rescans those sources every [`WATCH_INTERVAL`] and copies what
//!   changed (Kubernetes swaps the `..data` link, which is copied last, so a reader in the
//!   container sees the old or the new generation, never a mix).

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;

use crate::sandbox::agent::{AgentClient, AgentError, GUEST_SHARED_DIR};
use crate::sandbox::guest_files::{self, Entry, GuestCopyError};
use crate::sandbox::Sandbox;
use crate::task::error::TaskError;
use crate::task::spec::{self, Role};

/// containerd CRI: the container's image as the pod spec names it.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// CRI-O: the container's image.
pub const CRIO_IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";
/// How long an in-guest image pull may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// The most a host rootfs copied into the VM (the pause container's) may hold.
pub const HOST_ROOTFS_LIMIT: u64 = 64 << 20;
/// The most one host bind mount copied into the VM may hold (guest memory).
pub const VOLUME_LIMIT: u64 = 128 << 20;
/// How often watched volumes are rescanned.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Kubelet volume plugins whose content the node updates while pods run.
const WATCHED_PLUGINS: &[&str] = &[
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// The image a container's spec names through the CRI annotations.
pub fn image_name(spec: &Spec) -> Option<&str> {
    let annotations = spec.annotations().as_ref()?;
    [CRI_IMAGE_NAME, CRIO_IMAGE_NAME]
        .iter()
        .find_map(|k| annotations.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The kubelet volume plugin directory a host path lies in
/// (`.../volumes/<plugin>/<volume name>[/...]`): (plugin, volume name).
fn kubelet_volume(source: &Path) -> Option<(&str, &str)> {
    let parts: Vec<&str> = source.iter().filter_map(|c| c.to_str()).collect();
    let i = parts.iter().position(|c| *c == "volumes")?;
    let plugin = parts.get(i + 1)?;
    let name = parts.get(i + 2)?;
    plugin
        .starts_with("kubernetes.io~")
        .then_some((*plugin, *name))
}

/// The emptyDir volume name, if `source` is a kubelet emptyDir.
pub fn empty_dir_name(source: &Path) -> Option<&str> {
    kubelet_volume(source)
        .filter(|(plugin, _)| *plugin == EMPTY_DIR_PLUGIN)
        .map(|(_, name)| name)
}

/// Whether the node updates `source` while the pod runs (configMap, secret, projected,
/// downward API).
pub fn is_watched(source: &Path) -> bool {
    kubelet_volume(source).is_some_and(|(plugin, _)| WATCHED_PLUGINS.contains(&plugin))
}

/// Guest directory of the pod's emptyDir `name`.
pub fn guest_empty_dir(sandbox_id: &str, name: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{sandbox_id}/empty-dirs/{name}")
}

/// A host tree copied into the guest that the node may change.
#[derive(Debug, Clone)]
struct Watched {
    host: PathBuf,
    guest: String,
    entries: Vec<Entry>,
}

/// A container ready for CreateContainer in a remote VM.
#[derive(Debug)]
pub struct Prepared {
    /// The guest's spec.
    pub json: Vec<u8>,
    /// Whether its image was pulled in the guest (RemoveContainer frees it).
    pub pulled: bool,
    /// Copies to keep up to date, if any.
    watched: Vec<Watched>,
}

fn copy_error(e: GuestCopyError) -> TaskError {
    if e.is_invalid_input() {
        TaskError::InvalidArgument(crate::report::chain(&e))
    } else {
        TaskError::GuestCopy(Box::new(e))
    }
}

/// Gives container `id` of a remote sandbox its root and volumes in the guest and returns
/// the guest's spec (see the module docs). `host_rootfs` is the bundle's rootfs, read only
/// for a container without an image (the sandbox's). On error, an image already pulled is
/// freed again.
pub async fn prepare(
    sandbox: &Sandbox,
    id: &str,
    mut spec: Spec,
    role: &Role,
    host_rootfs: &Path,
) -> Result<Prepared, TaskError> {
    let agent = sandbox.agent();
    let image = match role {
        Role::Container { .. } => Some(image_name(&spec).map(str::to_owned).ok_or_else(|| {
            TaskError::InvalidArgument(format!(
                "container {id} has no {CRI_IMAGE_NAME} (or {CRIO_IMAGE_NAME}) annotation: a remote (peer pods) VM pulls the container's image itself"
            ))
        })?),
        Role::Sandbox | Role::Standalone => None,
    };
    let binds = spec::rewrite_for_guest(&mut spec, id, role)?;
    let mut watched = Vec::new();
    // Volumes first: they are cheap and most likely to be refused (a missing host path).
    for bind in &binds {
        let default_guest = format!("{GUEST_SHARED_DIR}/{id}/{}", bind.share_path.display());
        if let Some(name) = empty_dir_name(&bind.source) {
            let guest = guest_empty_dir(&sandbox.id, name);
            // Created empty: its content (none, for a new pod) stays on the node.
            let root = guest_files::scan_dir_root(bind.source.clone())
                .await
                .map_err(copy_error)?;
            guest_files::copy(agent, &bind.source, &guest, &[root])
                .await
                .map_err(copy_error)?;
            point_mount(&mut spec, &default_guest, &guest);
            continue;
        }
        let entries = guest_files::scan_async(bind.source.clone(), VOLUME_LIMIT)
            .await
            .map_err(copy_error)?;
        let bytes = guest_files::copy(agent, &bind.source, &default_guest, &entries)
            .await
            .map_err(copy_error)?;
        tracing::debug!(container = id, source = %bind.source.display(), guest = default_guest, bytes, "host mount copied into the guest");
        if is_watched(&bind.source) {
            watched.push(Watched {
                host: bind.source.clone(),
                guest: default_guest,
                entries,
            });
        }
    }
    let rootfs = spec::guest_rootfs(id);
    match image {
        Some(image) => {
            let started = std::time::Instant::now();
            let pulled = agent
                .pull_image(id, &image, &rootfs, PULL_TIMEOUT)
                .await
                .map_err(|e| pull_error(id, &image, e))?;
            tracing::info!(
                container = id,
                image,
                digest = pulled.manifest_digest,
                image_pull_ms = started.elapsed().as_millis() as u64,
                "image pulled in the guest"
            );
        }
        None => {
            let entries = guest_files::scan_async(host_rootfs.to_path_buf(), HOST_ROOTFS_LIMIT)
                .await
                .map_err(copy_error)?;
            let bytes = guest_files::copy(agent, host_rootfs, &rootfs, &entries)
                .await
                .map_err(copy_error)?;
            tracing::debug!(container = id, bytes, "host rootfs copied into the guest");
        }
    }
    let pulled = matches!(role, Role::Container { .. });
    let json = match serde_json::to_vec(&spec) {
        Ok(json) => json,
        Err(e) => {
            if pulled {
                release(agent, id).await;
            }
            return Err(spec::SpecError::Serialize(e).into());
        }
    };
    Ok(Prepared {
        json,
        pulled,
        watched,
    })
}

/// A refused pull names the image; the agent's code (NOT_FOUND, UNAUTHENTICATED...) is kept.
fn pull_error(id: &str, image: &str, e: AgentError) -> TaskError {
    match e.agent_code() {
        Some(_) => TaskError::Pull {
            container: id.to_owned(),
            image: image.to_owned(),
            source: Box::new(e),
        },
        None => TaskError::Agent(e),
    }
}

/// Frees an image rootfs pulled for a container that was not created after all
/// (RemoveContainer frees it also for a container the agent does not know).
pub async fn release(agent: &AgentClient, id: &str) {
    if let Err(error) = agent.remove_container(id).await {
        if error.agent_code() != Some(ttrpc::Code::NOT_FOUND) {
            tracing::warn!(container = id, error = %crate::report::chain(&error), "freeing the pulled image");
        }
    }
}

/// Points the mount whose source is `from` at `to`.
fn point_mount(spec: &mut Spec, from: &str, to: &str) {
    if let Some(mounts) = spec.mounts_mut() {
        for m in mounts.iter_mut() {
            if m.source().as_deref() == Some(Path::new(from)) {
                m.set_source(Some(PathBuf::from(to)));
            }
        }
    }
}

/// Keeps a container's watched volumes up to date until dropped.
#[derive(Debug)]
pub struct VolumeWatch(tokio::task::AbortHandle);

impl Drop for VolumeWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Prepared {
    /// Starts the watcher for this container's updatable volumes, if it has any.
    pub fn watch(&mut self, agent: &AgentClient, id: &str) -> Option<VolumeWatch> {
        if self.watched.is_empty() {
            return None;
        }
        let watched = std::mem::take(&mut self.watched);
        let task = tokio::spawn(watch(agent.clone(), id.to_owned(), watched, WATCH_INTERVAL));
        Some(VolumeWatch(task.abort_handle()))
    }
}

/// Rescans each watched source every `interval` and copies what changed; ends when the
/// sandbox is down.
async fn watch(agent: AgentClient, id: String, mut watched: Vec<Watched>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        for w in &mut watched {
            let now = match guest_files::scan_async(w.host.clone(), VOLUME_LIMIT).await {
                Ok(now) => now,
                Err(error) => {
                    // The pod's volume goes away as the pod is deleted.
                    tracing::debug!(container = id, error = %crate::report::chain(&error), "rescanning a volume");
                    continue;
                }
            };
            let changed = guest_files::diff(&w.entries, &now);
            if changed.is_empty() {
                continue;
            }
            match guest_files::copy(&agent, &w.host, &w.guest, &changed).await {
                Ok(bytes) => {
                    tracing::info!(container = id, source = %w.host.display(), entries = changed.len(), bytes, "volume update copied into the guest");
                    w.entries = now;
                }
                Err(GuestCopyError::Agent { source, .. })
                    if matches!(*source, AgentError::SandboxDown { .. }) =>
                {
                    tracing::debug!(container = id, error = %source, "volume watch ends");
                    return;
                }
                Err(error) => {
                    tracing::warn!(container = id, error = %crate::report::chain(&error), "copying a volume update into the guest");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_volumes_are_recognized() {
        let cm = Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/cfg");
        assert!(is_watched(cm));
        assert_eq!(empty_dir_name(cm), None);
        let ed = Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache");
        assert_eq!(empty_dir_name(ed), Some("cache"));
        assert!(!is_watched(ed));
        assert!(is_watched(Path::new(
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/tok/key"
        )));
        for other in [
            "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/s1/resolv.conf",
            "/data/volumes/mine/x",
            "/volumes",
        ] {
            assert!(!is_watched(Path::new(other)), "{other}");
            assert_eq!(empty_dir_name(Path::new(other)), None, "{other}");
        }
        assert_eq!(
            guest_empty_dir("sb", "cache"),
            "/run/kata-containers/shared/containers/sb/empty-dirs/cache"
        );
    }

    #[test]
    fn the_image_comes_from_containerds_or_crios_annotation() {
        let with = |k: &str| {
            let mut s = Spec::default();
            s.set_annotations(Some(
                [(k.to_owned(), "reg:5000/busybox:1".to_owned())].into(),
            ));
            s
        };
        assert_eq!(
            image_name(&with(CRI_IMAGE_NAME)),
            Some("reg:5000/busybox:1")
        );
        assert_eq!(
            image_name(&with(CRIO_IMAGE_NAME)),
            Some("reg:5000/busybox:1")
        );
        assert_eq!(image_name(&with("other")), None);
        assert_eq!(image_name(&Spec::default()), None);
    }

    #[test]
    fn mounts_are_repointed_by_source() {
        let mut spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","mounts":[
                {"destination":"/cache","type":"bind","source":"/g/c1/mounts/0"},
                {"destination":"/etc/hosts","type":"bind","source":"/g/c1/mounts/1"}]}"#,
        )
        .unwrap();
        point_mount(&mut spec, "/g/c1/mounts/0", "/g/sb/empty-dirs/cache");
        let sources: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.source().clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                PathBuf::from("/g/sb/empty-dirs/cache"),
                PathBuf::from("/g/c1/mounts/1")
            ]
        );
    }
}
