//! A test-owned containerd 1.6 with its CRI plugin enabled, and a small CRI v1 client: tests
//! play the kubelet's part over CRI gRPC (`runtime.v1`, the `k8s-cri` crate with tonic) on
//! containerd's own unix socket.
//!
//! The CRI configuration ([`cri_config`]):
//! - `sandbox_image = "registry.k8s.io/pause:kata"`; it and busybox are imported offline from
//!   `build/images/` into namespace `k8s.io` (`hack/build-test-images.sh`). Nothing is pulled:
//!   `docker.io` and `registry.k8s.io` resolve to `127.0.0.1:9` (refused at once), so a
//!   missing image fails fast instead of reaching for a registry.
//! - handlers `runc` (default, `io.containerd.runc.v2`) and, when a [`ShimInstall`] is given,
//!   `kata` (`io.containerd.kata.v2`, `pod_annotations = ["io.katacontainers.*"]`,
//!   `privileged_without_host_devices`, options `ConfigPath` = the test configuration);
//! - no CNI by default: the CNI conf and bin dirs are empty temp dirs. containerd 1.6 logs
//!   "failed to load cni during init" and carries on (its NetworkReady condition stays
//!   false); pods must use host networking (`NamespaceOption.network = NODE`), which never
//!   calls CNI. With [`Networking::Cni`] ([`CriContainerd::for_handler_with_cni`]) the conf
//!   dir holds `hack/cni/10-kata-bridge.conflist` ([`CniNetwork`]: bridge `kata-cni0`,
//!   host-local IPAM in 10.88.213.0/24, no masquerade) and the bin dir is Debian's
//!   `/usr/lib/cni` (`containernetworking-plugins`): pods with `network = POD` get a network
//!   namespace from CNI with a veth on that bridge ([`with_network_mode`]).
//! - `restrict_oom_score_adj = true`: a process on these hosts may not lower its
//!   oom_score_adj, which every runc sandbox would otherwise try (and fail). A kata-only
//!   test may turn it off ([`CriContainerd::for_kata_with_unrestricted_oom_score_adj`]):
//!   then the specs carry the kubelet's values (-998 for the pause container, -997 for
//!   Guaranteed containers), which the guest applies.
//!
//! [`CriContainerd`] removes leftover pods through CRI before containerd stops.

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, Options, ShimInstall, CRI_NAMESPACE};
use crate::wait_until;

/// The CRI v1 messages (`runtime.v1`).
pub use k8s_cri::v1 as api;

/// The pause image CRI runs as each pod's sandbox container (`build/images/pause.tar`).
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:kata";
/// The busybox image (`build/images/busybox.tar`).
pub const BUSYBOX: &str = crate::containerd::BUSYBOX;
/// The CRI runtime handler of our runtime (RuntimeClass `kata`).
pub const KATA_HANDLER: &str = "kata";
/// The CRI runtime handler of runc, the reference.
pub const RUNC_HANDLER: &str = "runc";
/// The CRI runtime handler of peer pods (RuntimeClass `kata-remote`).
pub const KATA_REMOTE_HANDLER: &str = "kata-remote";
/// Kubernetes namespace of the test pods' metadata.
pub const POD_NAMESPACE: &str = "kata-test";

/// Deadline of one CRI call (a kata RunPodSandbox boots a VM: seconds under TCG).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where Debian's `containernetworking-plugins` puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// How the test containerd's CRI plugin networks pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Networking {
    /// No CNI configuration: only host-network pods (`NamespaceOption.network = NODE`) run.
    HostOnly,
    /// CNI with [`CniNetwork::kata_bridge`] from [`CNI_BIN_DIR`]: pods with `network = POD`
    /// get their own network namespace and an address on the bridge.
    Cni,
}

/// The CNI network of `hack/cni/10-kata-bridge.conflist`, as read from that file: a bridge
/// on this host with the gateway address, host-local IPAM, no NAT. Traffic stays on the
/// bridge: nothing is masqueraded to the outside.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    /// The conflist file.
    pub conflist: PathBuf,
    /// The network's name (`name`).
    pub name: String,
    /// The host bridge (`bridge`), holding the gateway address.
    pub bridge: String,
    /// The IPAM subnet: (network address, prefix length).
    pub subnet: (Ipv4Addr, u8),
    /// The gateway: the bridge's address and the pods' default route.
    pub gateway: Ipv4Addr,
    /// The MTU the bridge plugin gives the bridge and the pods' veths.
    pub mtu: u32,
}

impl CniNetwork {
    /// Reads `<repo>/hack/cni/10-kata-bridge.conflist`; panics (with the hint to run
    /// `hack/install-deps.sh`) when the plugins it needs are not in [`CNI_BIN_DIR`].
    pub fn kata_bridge() -> Self {
        let conflist = crate::repo_root().join("hack/cni/10-kata-bridge.conflist");
        let text = std::fs::read_to_string(&conflist)
            .unwrap_or_else(|e| panic!("{}: {e}", conflist.display()));
        let this = Self::parse(&conflist, &text)
            .unwrap_or_else(|e| panic!("{}: {e:#}", conflist.display()));
        for plugin in ["bridge", "host-local", "loopback"] {
            let bin = Path::new(CNI_BIN_DIR).join(plugin);
            assert!(
                bin.is_file(),
                "{} missing: run hack/install-deps.sh (containernetworking-plugins)",
                bin.display()
            );
        }
        this
    }

    fn parse(conflist: &Path, text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
        let bridge = v["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["type"] == "bridge"))
            .context("no bridge plugin")?;
        let range = &bridge["ipam"]["ranges"][0][0];
        let (net, len) = range["subnet"]
            .as_str()
            .and_then(|s| s.split_once('/'))
            .context("no ipam.ranges[0][0].subnet")?;
        Ok(Self {
            conflist: conflist.to_owned(),
            name: v["name"].as_str().context("no name")?.to_owned(),
            bridge: bridge["bridge"].as_str().context("no bridge")?.to_owned(),
            subnet: (net.parse()?, len.parse()?),
            gateway: range["gateway"]
                .as_str()
                .context("no gateway")?
                .parse()
                .context("gateway")?,
            mtu: bridge["mtu"].as_u64().context("no mtu")? as u32,
        })
    }

    /// Whether `ip` is in the IPAM subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.subnet.1))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.subnet.0) & mask
    }
}

/// containerd's CRI plugin configuration (config version 2) for a test containerd whose
/// scratch space is `dir`; the `kata` handler is configured when `kata_config` is given.
/// The CNI conf dir is `<dir>/cni/net.d`; the bin dir `cni_bin`, else the empty
/// `<dir>/cni/bin`.
pub fn cri_config(dir: &Path, kata_config: Option<&Path>, cni_bin: Option<&Path>) -> String {
    cri_config_with(dir, kata_config, cni_bin, true, None)
}

/// [`cri_config`] with `restrict_oom_score_adj` as given.
fn cri_config_with(
    dir: &Path,
    kata_config: Option<&Path>,
    cni_bin: Option<&Path>,
    restrict_oom_score_adj: bool,
    remote_config: Option<&Path>,
) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let mut s = format!(
        r#"
[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = {restrict_oom_score_adj}
  enable_selinux = false
  disable_apparmor = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "{RUNC_HANDLER}"
[{cri}.containerd.runtimes.{RUNC_HANDLER}]
  runtime_type = "{runc}"
[{cri}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
[{cri}.registry]
  config_path = "{hosts}"
"#,
        runc = crate::containerd::RUNC_RUNTIME,
        cni_bin = cni_bin
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("cni/bin"))
            .display(),
        cni_conf = dir.join("cni/net.d").display(),
        hosts = dir.join("certs.d").display(),
    );
    if let Some(config) = kata_config {
        s.push_str(&format!(
            r#"[{cri}.containerd.runtimes.{KATA_HANDLER}]
  runtime_type = "{kata}"
  privileged_without_host_devices = true
  pod_annotations = ["io.katacontainers.*"]
[{cri}.containerd.runtimes.{KATA_HANDLER}.options]
  ConfigPath = "{config}"
"#,
            kata = crate::containerd::KATA_RUNTIME,
            config = config.display(),
        ));
    }
    if let Some(config) = remote_config {
        // As hack/containerd/kata-remote.toml writes it.
        s.push_str(&format!(
            r#"[{cri}.containerd.runtimes.{KATA_REMOTE_HANDLER}]
  runtime_type = "{kata}"
  pod_annotations = ["io.katacontainers.*"]
[{cri}.containerd.runtimes.{KATA_REMOTE_HANDLER}.options]
  ConfigPath = "{config}"
"#,
            kata = crate::containerd::KATA_RUNTIME,
            config = config.display(),
        ));
    }
    s
}

/// Makes the registry hosts directory: every registry the test images name points at a
/// closed loopback port, so an image that is not imported fails at once and nothing is
/// fetched. (containerd 1.6.20 as Debian builds it ignores a hosts.toml holding only
/// `server` and falls back to the registry itself; with a `[host]` table it reads both.)
fn write_registry_hosts(dir: &Path) {
    const HOSTS: &str = r#"server = "http://127.0.0.1:9"

[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
"#;
    for registry in ["docker.io", "registry.k8s.io"] {
        let d = dir.join("certs.d").join(registry);
        std::fs::create_dir_all(&d).expect("registry hosts dir");
        std::fs::write(d.join("hosts.toml"), HOSTS).expect("write hosts.toml");
    }
}

/// Unwraps a CRI call's result, or panics with the error chain and containerd's last errors
/// and warnings (the CRI plugin and CNI log there).
pub trait OrPanic<T> {
    fn or_panic(self, env: &CriContainerd) -> T;
}

impl<T> OrPanic<T> for anyhow::Result<T> {
    #[track_caller]
    fn or_panic(self, env: &CriContainerd) -> T {
        match self {
            Ok(v) => v,
            Err(e) => {
                let log = env.ctd.log();
                let mut tail: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("level=error") || l.contains("level=warning"))
                    .rev()
                    .take(20)
                    .collect();
                tail.reverse();
                panic!(
                    "{e:#}\n--- containerd errors and warnings (last 20) ---\n{}",
                    tail.join("\n")
                );
            }
        }
    }
}

/// The IPv4 address CNI gave a pod, as PodSandboxStatus reports it.
pub fn pod_ip(status: &api::PodSandboxStatus) -> Result<Ipv4Addr> {
    status
        .network
        .as_ref()
        .map(|n| n.ip.as_str())
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("no IPv4 pod address in {status:?}"))
}

/// A private containerd with the CRI plugin, its CRI client, and the scratch space of both.
/// Drop removes the pods CRI still knows (StopPodSandbox, RemovePodSandbox), then stops
/// containerd as [`Containerd`] does.
#[derive(Debug)]
pub struct CriContainerd {
    // Field order: the client goes first, then containerd, then the directories it used.
    pub client: CriClient,
    pub ctd: Containerd,
    shim: Option<ShimInstall>,
    dir: tempfile::TempDir,
}

impl CriContainerd {
    /// A containerd serving the handler `handler`: `kata` installs the debug shim with the
    /// test configuration (and keeps `runc` too); `runc` needs no shim. No CNI: host-network
    /// pods only.
    pub fn for_handler(handler: &str) -> Self {
        let shim = (handler == KATA_HANDLER).then(ShimInstall::new);
        Self::start(shim)
    }

    /// Like [`Self::for_handler`], with CNI ([`Networking::Cni`]): pods with network POD get
    /// an address on the `kata-bridge` network.
    pub fn for_handler_with_cni(handler: &str) -> Self {
        let shim = (handler == KATA_HANDLER).then(ShimInstall::new);
        Self::start_with(shim, Networking::Cni)
    }

    /// Starts containerd with the CRI plugin; with `shim`, the `kata` handler runs it.
    pub fn start(shim: Option<ShimInstall>) -> Self {
        Self::start_with(shim, Networking::HostOnly)
    }

    /// Starts containerd with the CRI plugin and pod networking `networking`; with `shim`,
    /// the `kata` handler runs it. With CNI, waits for CRI's NetworkReady condition.
    pub fn start_with(shim: Option<ShimInstall>, networking: Networking) -> Self {
        Self::start_configured(shim, networking, true)
    }

    /// A containerd for the `kata` handler whose CRI passes the containers' oom_score_adj
    /// through unchanged (`restrict_oom_score_adj = false`), as on a node where containerd
    /// itself runs with a low score. runc pods fail there (see the module docs).
    pub fn for_kata_with_unrestricted_oom_score_adj() -> Self {
        Self::start_configured(Some(ShimInstall::new()), Networking::HostOnly, false)
    }

    /// A containerd with the `kata` handler and `kata-remote` (peer pods) running the same
    /// shim with the configuration `remote_config`; host-network pods only.
    pub fn for_remote(shim: ShimInstall, remote_config: &Path) -> Self {
        Self::for_remote_with(shim, remote_config, Networking::HostOnly)
    }

    /// [`Self::for_remote`] with pod networking `networking`.
    pub fn for_remote_with(
        shim: ShimInstall,
        remote_config: &Path,
        networking: Networking,
    ) -> Self {
        Self::start_full(Some(shim), networking, true, Some(remote_config))
    }

    /// Lets containerd pull from the plain-HTTP registry at `host` (`host:port`) through a
    /// `hosts.toml` in this containerd's registry hosts directory.
    pub fn allow_insecure_registry(&self, host: &str) {
        let d = self.dir.path().join("certs.d").join(host);
        std::fs::create_dir_all(&d).expect("registry hosts dir");
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("write hosts.toml");
    }

    fn start_configured(
        shim: Option<ShimInstall>,
        networking: Networking,
        restrict_oom_score_adj: bool,
    ) -> Self {
        Self::start_full(shim, networking, restrict_oom_score_adj, None)
    }

    fn start_full(
        shim: Option<ShimInstall>,
        networking: Networking,
        restrict_oom_score_adj: bool,
        remote_config: Option<&Path>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kata-cri-")
            .tempdir()
            .expect("cri temp dir");
        for sub in ["cni/bin", "cni/net.d"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("cni dirs");
        }
        let cni_bin = match networking {
            Networking::HostOnly => None,
            Networking::Cni => {
                // A copy, so the conf dir holds this one network and nothing else.
                let net = CniNetwork::kata_bridge();
                let name = net.conflist.file_name().expect("conflist name");
                std::fs::copy(&net.conflist, dir.path().join("cni/net.d").join(name))
                    .expect("copy the CNI conflist");
                Some(PathBuf::from(CNI_BIN_DIR))
            }
        };
        write_registry_hosts(dir.path());
        let kata_config = shim.as_ref().map(ShimInstall::config_path);
        let (bin_dir, env) = match &shim {
            Some(s) => (
                s.bin_dir().to_path_buf(),
                vec![("KATA_CONF_FILE".to_owned(), s.config_path())],
            ),
            None => (std::env::temp_dir(), Vec::new()),
        };
        let options = Options {
            env,
            cri: Some(cri_config_with(
                dir.path(),
                kata_config.as_deref(),
                cni_bin.as_deref(),
                restrict_oom_score_adj,
                remote_config,
            )),
            imports: vec![
                (CRI_NAMESPACE.to_owned(), "pause.tar".to_owned()),
                (CRI_NAMESPACE.to_owned(), "busybox.tar".to_owned()),
            ],
        };
        let ctd = Containerd::start_with(&bin_dir, options);
        let client = CriClient::connect(&ctd.socket())
            .unwrap_or_else(|e| panic!("CRI client: {e:#}\ncontainerd log:\n{}", ctd.log()));
        // The CRI plugin answers once initialised, and sees imported images through
        // containerd's image events.
        let mut last = String::new();
        let ready = wait_until(Duration::from_secs(30), || {
            let r = client.version().and_then(|_| {
                for image in [SANDBOX_IMAGE, BUSYBOX] {
                    if client.image_status(image)?.is_none() {
                        bail!("CRI does not see {image} yet");
                    }
                }
                if networking == Networking::Cni {
                    let ready = client.condition("NetworkReady")?;
                    if !ready.status {
                        bail!("CNI not ready: {ready:?}");
                    }
                }
                Ok(())
            });
            match r {
                Ok(()) => true,
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        assert!(
            ready,
            "CRI never became ready: {last}\ncontainerd log:\n{}",
            ctd.log()
        );
        Self {
            client,
            ctd,
            shim,
            dir,
        }
    }

    /// The shim installation behind the `kata` handler, when configured.
    pub fn shim(&self) -> Option<&ShimInstall> {
        self.shim.as_ref()
    }

    /// Scratch space of this containerd's CRI configuration (CNI and registry dirs).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's CRI state for a pod: `<state>/io.containerd.grpc.v1.cri/sandboxes/<id>`.
    pub fn sandbox_state_dir(&self, pod_id: &str) -> PathBuf {
        self.ctd
            .state_dir()
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(pod_id)
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        // A failed test may leave pods: stop and remove them through CRI so their shims
        // clean up (containers, VM, mounts, directories) before containerd stops.
        let Ok(pods) = self.client.list_pods() else {
            return;
        };
        for pod in pods {
            if let Err(e) = self.client.stop_pod(&pod.id) {
                eprintln!("cleanup: StopPodSandbox {}: {e:#}", pod.id);
            }
            if let Err(e) = self.client.remove_pod(&pod.id) {
                eprintln!("cleanup: RemovePodSandbox {}: {e:#}", pod.id);
            }
        }
    }
}

/// A running pod: its id and the configuration it was created with (CreateContainer needs it).
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: api::PodSandboxConfig,
}

/// ExecSync's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A blocking CRI v1 client: each call runs on its own small tokio runtime with a deadline.
#[derive(Debug)]
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl CriClient {
    /// Connects to containerd's gRPC unix socket (the CRI plugin shares it).
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is not used: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(socket).await?,
                            ))
                        }
                    }))
                    .await
            })
            .context("connect to containerd's socket")?;
        Ok(Self { rt, channel })
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one CRI call to completion within [`CALL_TIMEOUT`]; errors name the call.
    pub fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(anyhow!("{what}: {:?}: {}", status.code(), status.message())),
            Err(_) => Err(anyhow!("{what}: no answer in {CALL_TIMEOUT:?}")),
        }
    }

    /// CRI Version: (runtime name, runtime version, CRI API version).
    pub fn version(&self) -> Result<api::VersionResponse> {
        let mut c = self.runtime();
        self.call("Version", c.version(api::VersionRequest::default()))
    }

    /// The runtime condition `typ` of CRI Status (`RuntimeReady`, `NetworkReady`).
    pub fn condition(&self, typ: &str) -> Result<api::RuntimeCondition> {
        let mut c = self.runtime();
        let status = self
            .call("Status", c.status(api::StatusRequest { verbose: false }))?
            .status
            .context("Status without a status")?;
        status
            .conditions
            .into_iter()
            .find(|c| c.r#type == typ)
            .with_context(|| format!("no condition {typ}"))
    }

    /// The image CRI knows under `image` (None when it does not know it).
    pub fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let mut c = self.images();
        let req = api::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        Ok(self.call("ImageStatus", c.image_status(req))?.image)
    }

    /// PullImage of `image` (tests use it to show nothing is fetched: see [`cri_config`]).
    pub fn pull_image(&self, image: &str) -> Result<String> {
        let mut c = self.images();
        let req = api::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        Ok(self.call("PullImage", c.pull_image(req))?.image_ref)
    }

    /// RunPodSandbox with `config` and runtime handler `handler`.
    pub fn run_pod_with(&self, config: api::PodSandboxConfig, handler: &str) -> Result<Pod> {
        let mut c = self.runtime();
        let req = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        };
        let what = format!("RunPodSandbox (handler {handler})");
        let id = self.call(&what, c.run_pod_sandbox(req))?.pod_sandbox_id;
        Ok(Pod { id, config })
    }

    /// RunPodSandbox of a host-network pod named `name` ([`pod_config`] without a hostname,
    /// as the kubelet sends host-network pods, and without a log directory).
    pub fn run_pod(&self, name: &str, handler: &str) -> Result<Pod> {
        self.run_pod_with(pod_config(name, "", None), handler)
    }

    /// PodSandboxStatus.
    pub fn pod_status(&self, pod_id: &str) -> Result<api::PodSandboxStatus> {
        let mut c = self.runtime();
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: false,
        };
        self.call("PodSandboxStatus", c.pod_sandbox_status(req))?
            .status
            .context("PodSandboxStatus without a status")
    }

    /// PodSandboxStatus with `verbose`: the status and containerd's sandbox info (the JSON
    /// of its `info` key: pid, runtime handler, the sandbox's OCI spec, the CNI result).
    pub fn pod_status_verbose(
        &self,
        pod_id: &str,
    ) -> Result<(api::PodSandboxStatus, serde_json::Value)> {
        let mut c = self.runtime();
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: true,
        };
        let r = self.call("PodSandboxStatus (verbose)", c.pod_sandbox_status(req))?;
        let info = r
            .info
            .get("info")
            .context("PodSandboxStatus without verbose info")?;
        let info = serde_json::from_str(info).context("verbose info is not JSON")?;
        Ok((r.status.context("PodSandboxStatus without a status")?, info))
    }

    /// The host network namespace of a pod, as its sandbox's OCI spec names it
    /// (`/var/run/netns/cni-...` for a CNI pod); None for a host-network pod.
    pub fn pod_netns(&self, pod_id: &str) -> Result<Option<PathBuf>> {
        let (_, info) = self.pod_status_verbose(pod_id)?;
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .context("no runtimeSpec.linux.namespaces in the sandbox info")?;
        Ok(namespaces
            .iter()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .map(PathBuf::from))
    }

    /// ListPodSandbox (all pods).
    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>> {
        let mut c = self.runtime();
        Ok(self
            .call(
                "ListPodSandbox",
                c.list_pod_sandbox(api::ListPodSandboxRequest::default()),
            )?
            .items)
    }

    /// StopPodSandbox (stops its containers too).
    pub fn stop_pod(&self, pod_id: &str) -> Result<()> {
        let mut c = self.runtime();
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        self.call("StopPodSandbox", c.stop_pod_sandbox(req))
            .map(drop)
    }

    /// RemovePodSandbox (removes its containers too).
    pub fn remove_pod(&self, pod_id: &str) -> Result<()> {
        let mut c = self.runtime();
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        self.call("RemovePodSandbox", c.remove_pod_sandbox(req))
            .map(drop)
    }

    /// CreateContainer of `config` in `pod`; returns the container id.
    pub fn create_container_with(&self, pod: &Pod, config: api::ContainerConfig) -> Result<String> {
        let mut c = self.runtime();
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let what = format!("CreateContainer {name}");
        Ok(self.call(&what, c.create_container(req))?.container_id)
    }

    /// CreateContainer of `image` running `cmd` with `mounts` ([`container_config`]), its
    /// namespace options the pod's ([`with_pod_namespaces`]) as the kubelet sets them.
    pub fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        cmd: &[&str],
        mounts: Vec<api::Mount>,
    ) -> Result<String> {
        let config = with_pod_namespaces(container_config(name, image, cmd, mounts), pod);
        self.create_container_with(pod, config)
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime();
        let req = api::StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.call("StartContainer", c.start_container(req))
            .map(drop)
    }

    /// StopContainer with a grace period of `timeout_secs` before SIGKILL.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        let mut c = self.runtime();
        let req = api::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: timeout_secs,
        };
        self.call("StopContainer", c.stop_container(req)).map(drop)
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime();
        let req = api::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.call("RemoveContainer", c.remove_container(req))
            .map(drop)
    }

    /// ContainerStatus.
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let mut c = self.runtime();
        let req = api::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        self.call("ContainerStatus", c.container_status(req))?
            .status
            .context("ContainerStatus without a status")
    }

    /// Polls ContainerStatus until the container has exited (or `timeout` passes).
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Result<api::ContainerStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self.container_status(id)?;
            if status.state == api::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                bail!("container {id} not exited after {timeout:?}: {status:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// ListContainers of one pod.
    pub fn list_containers(&self, pod_id: &str) -> Result<Vec<api::Container>> {
        let mut c = self.runtime();
        let req = api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                pod_sandbox_id: pod_id.to_owned(),
                ..Default::default()
            }),
        };
        Ok(self
            .call("ListContainers", c.list_containers(req))?
            .containers)
    }

    /// ExecSync of `cmd` in container `id` with a deadline of `timeout_secs` (0: none).
    pub fn exec_sync_with_timeout(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecOutput> {
        let mut c = self.runtime();
        let req = api::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: timeout_secs,
        };
        let what = format!("ExecSync {cmd:?}");
        let r = self.call(&what, c.exec_sync(req))?;
        Ok(ExecOutput {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// ExecSync of `cmd` in container `id` (60 s deadline): (exit code, stdout, stderr).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let out = self.exec_sync_with_timeout(id, cmd, 60)?;
        Ok((out.exit_code, out.stdout, out.stderr))
    }

    /// UpdateContainerResources of container `id` to `resources`.
    pub fn update_container_resources(
        &self,
        id: &str,
        resources: api::LinuxContainerResources,
    ) -> Result<()> {
        let mut c = self.runtime();
        let req = api::UpdateContainerResourcesRequest {
            container_id: id.to_owned(),
            linux: Some(resources),
            ..Default::default()
        };
        self.call(
            "UpdateContainerResources",
            c.update_container_resources(req),
        )?;
        Ok(())
    }

    /// ContainerStats.
    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats> {
        let mut c = self.runtime();
        let req = api::ContainerStatsRequest {
            container_id: id.to_owned(),
        };
        self.call("ContainerStats", c.container_stats(req))?
            .stats
            .context("ContainerStats without stats")
    }

    /// PodSandboxStats. containerd 1.6 reads the pod's host cgroup (`cgroup_parent`): the
    /// pod config must name one that exists (the kubelet creates it; see [`PodCgroup`]).
    pub fn pod_stats(&self, pod_id: &str) -> Result<api::PodSandboxStats> {
        let mut c = self.runtime();
        let req = api::PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        self.call("PodSandboxStats", c.pod_sandbox_stats(req))?
            .stats
            .context("PodSandboxStats without stats")
    }

    /// ListPodSandboxStats (ready pods only; `pod_id` filters when not empty).
    pub fn list_pod_stats(&self, pod_id: &str) -> Result<Vec<api::PodSandboxStats>> {
        let mut c = self.runtime();
        let req = api::ListPodSandboxStatsRequest {
            filter: (!pod_id.is_empty()).then(|| api::PodSandboxStatsFilter {
                id: pod_id.to_owned(),
                ..Default::default()
            }),
        };
        Ok(self
            .call("ListPodSandboxStats", c.list_pod_sandbox_stats(req))?
            .stats)
    }
}

/// An image reference as CRI takes it.
pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// A host-network pod (`NamespaceOption.network = NODE`; pid and ipc are the pod's own):
/// metadata name `name` (uid `<name>-uid`, namespace [`POD_NAMESPACE`]), `hostname`, and
/// container logs under `log_directory` when given.
///
/// Network NODE means uts NODE too, yet containerd 1.6 writes a non-empty `hostname` into
/// the sandbox spec, which runc refuses ("unable to set hostname without a private UTS
/// namespace"): for runc pass "" (the kubelet sends none for host-network pods; containers
/// then see the node's hostname). A kata pod's VM has a UTS namespace of its own.
pub fn pod_config(
    name: &str,
    hostname: &str,
    log_directory: Option<&Path>,
) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("{name}-uid"),
            namespace: POD_NAMESPACE.to_owned(),
            attempt: 0,
        }),
        hostname: hostname.to_owned(),
        log_directory: log_directory
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default(),
        labels: HashMap::from([("kata-test".to_owned(), "cri".to_owned())]),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: api::NamespaceMode::Node as i32,
                    pid: api::NamespaceMode::Pod as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container `name` of `image` running `cmd` (as its command, the image's entrypoint
/// replaced), with `mounts`; its CRI log goes to `<pod log_directory>/<name>.log`.
pub fn container_config(
    name: &str,
    image: &str,
    cmd: &[&str],
    mounts: Vec<api::Mount>,
) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: cmd.iter().map(|s| (*s).to_owned()).collect(),
        mounts,
        log_path: format!("{name}.log"),
        labels: HashMap::from([("kata-test".to_owned(), "cri".to_owned())]),
        ..Default::default()
    }
}

/// `config` with network namespace mode `mode`: `Pod` for a pod network namespace CNI
/// sets up, `Node` for host networking.
pub fn with_network_mode(
    mut config: api::PodSandboxConfig,
    mode: api::NamespaceMode,
) -> api::PodSandboxConfig {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
        .network = mode as i32;
    config
}

/// `config` with the pod's namespace options (network, pid, ipc modes) in its security
/// context, as the kubelet copies them into every container of a pod. (containerd 1.6 reads
/// only the pid mode there: a container always joins the sandbox's network, ipc and uts
/// namespaces by `/proc/<sandbox pid>/ns/...`, for a host-network pod too.)
pub fn with_pod_namespaces(mut config: api::ContainerConfig, pod: &Pod) -> api::ContainerConfig {
    let options = pod
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options = options;
    config
}

/// A read-write bind of host directory `host` at `container_path` (how the kubelet passes
/// an emptyDir).
pub fn bind_mount(host: &Path, container_path: &str) -> api::Mount {
    api::Mount {
        container_path: container_path.to_owned(),
        host_path: host.to_string_lossy().into_owned(),
        readonly: false,
        ..Default::default()
    }
}

/// One line of a CRI container log: `<RFC3339Nano time> <stdout|stderr> <P|F> <content>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub time: String,
    pub stream: String,
    /// `P`: a partial line, continued by the next; `F`: the line ends here.
    pub tag: String,
    pub content: String,
}

/// The lines of a CRI log file (empty when it does not exist).
pub fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            Some(LogLine {
                time: f.next()?.to_owned(),
                stream: f.next()?.to_owned(),
                tag: f.next()?.to_owned(),
                content: f.next().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// The text of one stream of a CRI log file, partial lines joined.
pub fn log_text(path: &Path, stream: &str) -> String {
    let mut out = String::new();
    for line in read_log(path).into_iter().filter(|l| l.stream == stream) {
        out.push_str(&line.content);
        if line.tag != "P" {
            out.push('\n');
        }
    }
    out
}

/// A pod-level host cgroup, created as the kubelet creates it before RunPodSandbox (pass
/// [`PodCgroup::parent`] as the pod's `cgroup_parent`) in every cgroup v1 hierarchy and the
/// unified one; removed (deepest first, what the runtimes left under it included) on drop.
#[derive(Debug)]
pub struct PodCgroup {
    parent: String,
}

impl PodCgroup {
    /// `/<name>` in each hierarchy under /sys/fs/cgroup.
    pub fn new(name: &str) -> Self {
        let this = Self {
            parent: format!("/{name}"),
        };
        for root in cgroup_roots() {
            // cpuset children start with no CPUs: the runtimes fill them from the parent.
            if root.ends_with("cpuset") {
                continue;
            }
            let _ = std::fs::create_dir_all(root.join(name));
        }
        this
    }

    /// The cgroupfs path to pass as `LinuxPodSandboxConfig.cgroup_parent`.
    pub fn parent(&self) -> &str {
        &self.parent
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for root in cgroup_roots() {
            remove_cgroup_tree(&root.join(self.parent.trim_start_matches('/')));
        }
    }
}

/// Mount points of cgroup hierarchies (v1 and v2).
fn cgroup_roots() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mount_point = pre.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// rmdir of a cgroup and its children, deepest first (cgroup dirs hold only control files).
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kata_bridge_conflist_reads_as_the_tests_expect() {
        let path = crate::repo_root().join("hack/cni/10-kata-bridge.conflist");
        let net = CniNetwork::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(net.name, "kata-bridge");
        assert_eq!(net.bridge, "kata-cni0");
        assert_eq!(net.subnet, (Ipv4Addr::new(10, 88, 213, 0), 24));
        assert_eq!(net.gateway, Ipv4Addr::new(10, 88, 213, 1));
        assert_eq!(net.mtu, 1450);
        assert!(net.contains(Ipv4Addr::new(10, 88, 213, 254)));
        assert!(!net.contains(Ipv4Addr::new(10, 88, 214, 2)));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let bridge = &v["plugins"][0];
        // Traffic stays on this host: no masquerade to the outside.
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["hairpinMode"], true);
        assert_eq!(v["plugins"][1]["type"], "loopback");
    }
}
