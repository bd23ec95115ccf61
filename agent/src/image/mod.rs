//! In-guest image pull (peer pods: the VM shares no file system with the node).
//!
//! [`ImageStore::pull`] resolves the image's manifest for linux/amd64 with `oci-client`,
//! downloads every layer blob not already in the guest (the client checks each blob against
//! its digest), unpacks it into a directory of its own ([`unpack`]) and checks the
//! uncompressed stream against the config's diff_id, then mounts an overlay for the
//! container: the layers as lower directories (shared by every container of the image), an
//! upper and work directory of the container's own. The mount point is the one
//! CreateContainer expects: `<base>/shared/containers/<id>/rootfs`.
//!
//! Everything lives under `<base>/image` on the guest's `/run` tmpfs, i.e. in guest memory:
//! `layers/<n>` (unpacked layers, by manifest digest, reference-counted), `blobs/<n>` (a
//! compressed blob while it is unpacked, removed after), `containers/<id>/{upper,work}`.
//! [`ImageStore::release`] (RemoveContainer) unmounts the overlay and removes the upper
//! directory and every layer no other container uses.
//!
//! Registry traffic runs on the uplink runtime when there is one (network mode: its
//! threads are in the VM's network namespace, not the pod's).

pub mod registry;
pub mod service;
pub mod unpack;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kata_proto::image::PullImageResponse;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};

use registry::{classify, FailureKind, RegistryConfig};

/// The store's directory below the agent's base directory.
pub const IMAGE_DIR: &str = "image";
/// Longest overlay option string the kernel takes (one page, less the NUL).
const MAX_MOUNT_DATA: usize = 4095;

/// A failed pull or release. Messages name the image and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid container id {0:?}")]
    BadContainerId(String),
    #[error("invalid image reference {image:?}: {reason}")]
    Reference { image: String, reason: String },
    #[error("container {0} already has an image rootfs")]
    AlreadyExists(String),
    #[error("image {image}: {what}")]
    Registry {
        image: String,
        what: String,
        kind: FailureKind,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("image {image}: layer {digest}: content does not match its digest ({detail})")]
    DigestMismatch {
        image: String,
        digest: String,
        detail: String,
    },
    #[error("image {image}: layer {digest}: unpacked content is {actual}, the config's diff_id is {expected}")]
    DiffIdMismatch {
        image: String,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("image {image}: layer {digest} has media type {media_type:?}, not a tar layer (plain, gzip or zstd)")]
    MediaType {
        image: String,
        digest: String,
        media_type: String,
    },
    #[error("image {image}: bad image config: {reason}")]
    Config { image: String, reason: String },
    #[error("image {image}: unpack layer {digest}")]
    Unpack {
        image: String,
        digest: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("image {image}: {layers} layers do not fit one overlay mount")]
    TooManyLayers { image: String, layers: usize },
    #[error("image {image}: {what} {}", .path.display())]
    Io {
        image: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry settings")]
    Settings(#[from] registry::AuthFileError),
    #[error("image {image}: the registry client could not be built: {reason}")]
    Client { image: String, reason: String },
    #[error("image pull task")]
    Join(#[from] tokio::task::JoinError),
}

/// What a pull or release error means, for the service's status mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Unauthenticated,
    Unavailable,
    DataLoss,
    Internal,
}

impl ImageError {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImageError::BadContainerId(_) | ImageError::Reference { .. } => {
                ErrorKind::InvalidArgument
            }
            ImageError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ImageError::Registry { kind, .. } => match kind {
                FailureKind::NotFound => ErrorKind::NotFound,
                FailureKind::Unauthorized => ErrorKind::Unauthenticated,
                FailureKind::Unavailable => ErrorKind::Unavailable,
                FailureKind::DigestMismatch => ErrorKind::DataLoss,
                FailureKind::Other => ErrorKind::Internal,
            },
            ImageError::DigestMismatch { .. } | ImageError::DiffIdMismatch { .. } => {
                ErrorKind::DataLoss
            }
            ImageError::MediaType { .. } | ImageError::Config { .. } => ErrorKind::InvalidArgument,
            ImageError::TooManyLayers { .. } => ErrorKind::InvalidArgument,
            ImageError::Unpack { .. }
            | ImageError::Io { .. }
            | ImageError::Settings(_)
            | ImageError::Client { .. }
            | ImageError::Join(_) => ErrorKind::Internal,
        }
    }
}

/// One unpacked layer.
#[derive(Debug)]
struct Layer {
    dir: PathBuf,
    refs: usize,
}

/// One container's mounted image.
#[derive(Debug)]
struct Rootfs {
    layers: Vec<String>,
    mount: PathBuf,
    own: PathBuf,
}

#[derive(Debug, Default)]
struct State {
    /// By manifest layer digest.
    layers: HashMap<String, Layer>,
    containers: HashMap<String, Rootfs>,
    /// Containers with a pull under way.
    pulling: HashSet<String>,
}

#[derive(Debug, Default, Clone)]
struct Settings {
    registry: RegistryConfig,
    uplink: Option<tokio::runtime::Handle>,
}

/// The guest's image store (see the module docs).
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    rootfs_base: PathBuf,
    settings: Mutex<Settings>,
    state: Mutex<State>,
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rules the agent applies to container ids.
fn check_id(id: &str) -> Result<(), ImageError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 256
        && !id.contains(['/', ' ', '\n', '\0']);
    ok.then_some(())
        .ok_or_else(|| ImageError::BadContainerId(id.to_owned()))
}

impl ImageStore {
    /// A store under `<base_dir>/image` mounting roots under
    /// `<base_dir>/shared/containers`.
    pub fn new(base_dir: &Path) -> Self {
        Self {
            root: base_dir.join(IMAGE_DIR),
            rootfs_base: base_dir.join(crate::paths::SHARED_CONTAINERS),
            settings: Mutex::default(),
            state: Mutex::default(),
            layer_locks: Mutex::default(),
            next: AtomicU64::new(1),
        }
    }

    /// Sets the registry settings and the runtime registry traffic runs on.
    pub fn configure(&self, registry: RegistryConfig, uplink: Option<tokio::runtime::Handle>) {
        *lock(&self.settings) = Settings { registry, uplink };
    }

    /// Where the container's rootfs is mounted.
    pub fn rootfs_path(&self, container_id: &str) -> PathBuf {
        self.rootfs_base.join(container_id).join("rootfs")
    }

    /// Pulls `image` and mounts it as the rootfs of `container_id`.
    pub async fn pull(
        &self,
        container_id: &str,
        image: &str,
    ) -> Result<PullImageResponse, ImageError> {
        check_id(container_id)?;
        let reference: Reference =
            image
                .parse()
                .map_err(|e: oci_client::ParseError| ImageError::Reference {
                    image: image.to_owned(),
                    reason: e.to_string(),
                })?;
        {
            let mut st = lock(&self.state);
            if st.containers.contains_key(container_id)
                || !st.pulling.insert(container_id.to_owned())
            {
                return Err(ImageError::AlreadyExists(container_id.to_owned()));
            }
        }
        let started = std::time::Instant::now();
        let result = self.pull_and_mount(container_id, image, reference).await;
        lock(&self.state).pulling.remove(container_id);
        match &result {
            Ok(r) => {
                tracing::info!(container = container_id, image, digest = %r.manifest_digest, elapsed_ms = started.elapsed().as_millis() as u64, "image pulled and mounted")
            }
            Err(e) => {
                tracing::warn!(container = container_id, image, error = %crate::logging::chain(e), "image pull failed")
            }
        }
        result
    }

    async fn pull_and_mount(
        &self,
        container_id: &str,
        image: &str,
        reference: Reference,
    ) -> Result<PullImageResponse, ImageError> {
        let settings = lock(&self.settings).clone();
        let net = Net::new(image, reference, &settings)?;
        let (manifest, digest, config) = net.manifest().await?;
        let diff_ids = diff_ids(image, &config)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Config {
                image: image.to_owned(),
                reason: format!(
                    "the manifest has {} layers, the config {} diff_ids",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let mut acquired: Vec<(String, PathBuf)> = Vec::new();
        for (layer, diff_id) in manifest.layers.iter().zip(&diff_ids) {
            match self.acquire_layer(&net, layer, diff_id).await {
                Ok(dir) => acquired.push((layer.digest.clone(), dir)),
                Err(e) => {
                    self.drop_layers(acquired.iter().map(|(d, _)| d.clone()).collect())
                        .await;
                    return Err(e);
                }
            }
        }
        let mount = self.rootfs_path(container_id);
        let own = self.root.join("containers").join(container_id);
        let dirs: Vec<PathBuf> = acquired.iter().map(|(_, d)| d.clone()).collect();
        let (img, m, o) = (image.to_owned(), mount.clone(), own.clone());
        let mounted = tokio::task::spawn_blocking(move || mount_overlay(&img, &dirs, &o, &m)).await;
        let layers: Vec<String> = acquired.into_iter().map(|(d, _)| d).collect();
        match mounted.map_err(ImageError::from).and_then(|r| r) {
            Ok(()) => {}
            Err(e) => {
                self.drop_layers(layers).await;
                return Err(e);
            }
        }
        lock(&self.state).containers.insert(
            container_id.to_owned(),
            Rootfs {
                layers,
                mount: mount.clone(),
                own,
            },
        );
        Ok(PullImageResponse {
            rootfs: mount.display().to_string(),
            manifest_digest: digest,
            config: config.into_bytes(),
            ..Default::default()
        })
    }

    /// Makes sure the layer is unpacked and takes a reference on it.
    async fn acquire_layer(
        &self,
        net: &Net,
        layer: &OciDescriptor,
        diff_id: &str,
    ) -> Result<PathBuf, ImageError> {
        let image = net.image.as_str();
        let compression =
            unpack::compression_for(&layer.media_type).ok_or_else(|| ImageError::MediaType {
                image: image.to_owned(),
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            })?;
        let gate = lock(&self.layer_locks)
            .entry(layer.digest.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(l) = lock(&self.state).layers.get_mut(&layer.digest) {
            l.refs += 1;
            return Ok(l.dir.clone());
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let blob = self.root.join("blobs").join(n.to_string());
        let partial = self.root.join("layers").join(format!("{n}.partial"));
        let dir = self.root.join("layers").join(n.to_string());
        let io = |what, path: &Path| {
            let path = path.to_owned();
            let image = image.to_owned();
            move |source| ImageError::Io {
                image,
                what,
                path,
                source,
            }
        };
        for d in [blob.parent(), Some(partial.as_path())]
            .into_iter()
            .flatten()
        {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(io("create", d))?;
        }
        let downloaded = net.download(layer, &blob).await;
        if let Err(e) = downloaded {
            let _ = tokio::fs::remove_file(&blob).await;
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(e);
        }
        let (b, p) = (blob.clone(), partial.clone());
        let unpacked =
            tokio::task::spawn_blocking(move || unpack::unpack(&b, compression, &p)).await?;
        let _ = tokio::fs::remove_file(&blob).await;
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(source) => {
                let _ = tokio::fs::remove_dir_all(&partial).await;
                return Err(ImageError::Unpack {
                    image: image.to_owned(),
                    digest: layer.digest.clone(),
                    source,
                });
            }
        };
        if unpacked.diff_id != diff_id {
            let _ = tokio::fs::remove_dir_all(&partial).await;
            return Err(ImageError::DiffIdMismatch {
                image: image.to_owned(),
                digest: layer.digest.clone(),
                expected: diff_id.to_owned(),
                actual: unpacked.diff_id,
            });
        }
        tokio::fs::rename(&partial, &dir)
            .await
            .map_err(io("rename layer to", &dir))?;
        tracing::debug!(image, layer = %layer.digest, bytes = unpacked.tar_bytes, dir = %dir.display(), "layer unpacked");
        lock(&self.state).layers.insert(
            layer.digest.clone(),
            Layer {
                dir: dir.clone(),
                refs: 1,
            },
        );
        Ok(dir)
    }

    /// Gives back one reference on each layer; removes layers nobody uses.
    async fn drop_layers(&self, digests: Vec<String>) {
        let mut unused = Vec::new();
        {
            let mut st = lock(&self.state);
            for d in digests {
                if let Some(l) = st.layers.get_mut(&d) {
                    l.refs -= 1;
                    if l.refs == 0 {
                        if let Some(l) = st.layers.remove(&d) {
                            unused.push(l.dir);
                        }
                    }
                }
            }
        }
        for dir in unused {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(dir = %dir.display(), error = %e, "remove unused layer");
            }
        }
    }

    /// Unmounts the container's image rootfs and frees what nobody else uses. Nothing to do
    /// for a container whose image was not pulled here.
    pub async fn release(&self, container_id: &str) -> Result<(), ImageError> {
        let Some(rootfs) = lock(&self.state).containers.remove(container_id) else {
            return Ok(());
        };
        let Rootfs { layers, mount, own } = rootfs;
        let (m, o) = (mount.clone(), own.clone());
        let removed = tokio::task::spawn_blocking(move || {
            match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(("unmount", m, std::io::Error::from(e))),
            }
            let _ = std::fs::remove_dir(&m);
            if let Some(parent) = m.parent() {
                let _ = std::fs::remove_dir(parent);
            }
            std::fs::remove_dir_all(&o).map_err(|e| ("remove", o, e))
        })
        .await?;
        self.drop_layers(layers).await;
        removed.map_err(|(what, path, source)| ImageError::Io {
            image: format!("of container {container_id}"),
            what,
            path,
            source,
        })
    }
}

/// The diff_ids of an image config.
fn diff_ids(image: &str, config: &str) -> Result<Vec<String>, ImageError> {
    let bad = |reason: String| ImageError::Config {
        image: image.to_owned(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(config).map_err(|e| bad(e.to_string()))?;
    v.pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .ok_or_else(|| bad("no rootfs.diff_ids".into()))?
        .iter()
        .map(|d| {
            d.as_str()
                .filter(|s| s.starts_with("sha256:"))
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("diff_id {d} is not a sha256 digest")))
        })
        .collect()
}

/// Creates the container's upper and work directories and mounts the overlay at `mount`.
fn mount_overlay(
    image: &str,
    lowers: &[PathBuf],
    own: &Path,
    mount: &Path,
) -> Result<(), ImageError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io {
            image: image.to_owned(),
            what,
            path,
            source,
        }
    };
    let upper = own.join("upper");
    let work = own.join("work");
    for d in [&upper, &work, &mount.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(io("create", d))?;
    }
    // Top layer first.
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|d| d.display().to_string())
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    if data.len() > MAX_MOUNT_DATA {
        let _ = std::fs::remove_dir_all(own);
        return Err(ImageError::TooManyLayers {
            image: image.to_owned(),
            layers: lowers.len(),
        });
    }
    nix::mount::mount(
        Some("overlay"),
        mount,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| {
        let _ = std::fs::remove_dir_all(own);
        io("mount the overlay at", mount)(e.into())
    })
}

/// Registry access for one pull, on the uplink runtime when there is one.
struct Net {
    image: String,
    reference: Reference,
    client: Arc<Client>,
    auth: oci_client::secrets::RegistryAuth,
    uplink: Option<tokio::runtime::Handle>,
}

impl Net {
    fn new(image: &str, reference: Reference, settings: &Settings) -> Result<Self, ImageError> {
        // reqwest is built without a default crypto provider: ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // oci-client panics when reqwest refuses the configuration; a request must fail,
        // not take the agent's runtime down.
        let config = settings.registry.client_config();
        let client =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || Client::new(config)))
                .map_err(|p| ImageError::Client {
                    image: image.to_owned(),
                    reason: p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into()),
                })?;
        Ok(Self {
            image: image.to_owned(),
            auth: settings.registry.auth_for(&reference),
            reference,
            client: Arc::new(client),
            uplink: settings.uplink.clone(),
        })
    }

    /// Runs `f` on the uplink runtime (or here).
    async fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, ImageError> {
        match &self.uplink {
            Some(h) => Ok(h.spawn(f).await?),
            None => Ok(f.await),
        }
    }

    fn registry_error(
        &self,
        what: String,
        source: oci_client::errors::OciDistributionError,
    ) -> ImageError {
        ImageError::Registry {
            image: self.image.clone(),
            kind: classify(&source),
            what,
            source,
        }
    }

    async fn manifest(
        &self,
    ) -> Result<(oci_client::manifest::OciImageManifest, String, String), ImageError> {
        let (client, reference, auth) = (
            self.client.clone(),
            self.reference.clone(),
            self.auth.clone(),
        );
        self.run(async move { client.pull_manifest_and_config(&reference, &auth).await })
            .await?
            .map_err(|e| self.registry_error("pull manifest and config".into(), e))
    }

    async fn download(&self, layer: &OciDescriptor, to: &Path) -> Result<(), ImageError> {
        let (client, reference, layer_c, path) = (
            self.client.clone(),
            self.reference.clone(),
            layer.clone(),
            to.to_owned(),
        );
        let result = self
            .run(async move {
                let mut file = tokio::fs::File::create(&path).await?;
                client.pull_blob(&reference, &layer_c, &mut file).await?;
                tokio::io::AsyncWriteExt::flush(&mut file).await?;
                Ok::<_, oci_client::errors::OciDistributionError>(())
            })
            .await?;
        result.map_err(|e| match classify(&e) {
            FailureKind::DigestMismatch => ImageError::DigestMismatch {
                image: self.image.clone(),
                digest: layer.digest.clone(),
                detail: e.to_string(),
            },
            _ => self.registry_error(format!("download layer {}", layer.digest), e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_diff_ids_are_checked() {
        assert_eq!(
            diff_ids(
                "i",
                r#"{"rootfs":{"type":"layers","diff_ids":["sha256:ab"]}}"#
            )
            .unwrap(),
            ["sha256:ab"]
        );
        let e = diff_ids("img", r#"{"rootfs":{}}"#).unwrap_err();
        assert!(e.to_string().contains("img"), "{e}");
        assert!(diff_ids("i", r#"{"rootfs":{"diff_ids":["md5:x"]}}"#).is_err());
    }

    #[tokio::test]
    async fn bad_inputs_are_refused_before_any_network() {
        let t = tempfile::tempdir().unwrap();
        let store = ImageStore::new(t.path());
        let e = store.pull("a/b", "busybox").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = store.pull("c1", "Not A Reference!").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("Not A Reference!"), "{e}");
        // Nothing to release for a container that never pulled.
        store.release("c1").await.unwrap();
    }
}
