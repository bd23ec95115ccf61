//! Client side of the agent protocol.
//!
//! [`AgentClient::connect`] dials the agent's vsock port through the VM (vhost-vsock or
//! hybrid vsock, hidden by [`kata_hypervisor::Vm::connect`]) and waits until the agent
//! answers a health check. Every later call carries a timeout, so a wedged guest turns into
//! an error instead of a hung shim; only [`AgentClient::wait_process`] and
//! [`AgentClient::get_oom_events`] have none, because a process may run (and a container
//! go without an OOM kill) for as long as it likes.
//!
//! A remote VM's client ([`AgentClient::with_redial`]) survives the peer pods adaptor's
//! restart: when its connection closes, it dials the agent socket again (bounded) and
//! repeats the idempotent call that noticed; clones share the connection, swapped through a
//! `watch` channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_hypervisor::Vm;
use std::future::Future;
use tokio::sync::watch;

use kata_proto::agent::{
    AddStoragesRequest, CloseStdinRequest, CopyFileRequest, CreateContainerRequest,
    ExecProcessRequest, GetMetricsRequest, GuestDetailsRequest, GuestDetailsResponse,
    ListPidsRequest, Metrics, OnlineResourcesRequest, OnlineResourcesResponse,
    PauseContainerRequest, ReadFileRequest, RemoveContainerRequest, ResizeTtyRequest,
    ResumeContainerRequest, ShutdownRequest, SignalProcessRequest, StartContainerRequest,
    StartProcessRequest, StatsContainerRequest, StatsContainerResponse, Stdio, Storage,
    UpdateContainerRequest, WaitProcessRequest, WaitProcessResponse,
};
use kata_proto::agent_ttrpc::{AgentServiceClient, ContainerServiceClient};
use kata_proto::health::{
    health_check_response::ServingStatus, CheckRequest, VersionCheckResponse,
};
use kata_proto::health_ttrpc::HealthClient;
use kata_proto::image::{PullImageRequest, PullImageResponse};
use kata_proto::image_ttrpc::ImageServiceClient;
use ttrpc::asynchronous::{transport::Socket, Client};

/// The virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "kataShared";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/kata-containers/shared/containers";

/// Timeout of one health probe while the agent is coming up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Failures talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock connection could not be made before the dial timeout.
    #[error("cannot reach the agent on vsock port {port}")]
    Dial {
        port: u32,
        #[source]
        source: kata_hypervisor::Error,
    },
    /// A connection was made but the agent never reported SERVING.
    #[error("agent did not answer a health check within {timeout:?}: {last}")]
    NotServing { timeout: Duration, last: String },
    /// The agent speaks another major protocol version.
    #[error("agent protocol version {agent} is incompatible with ours ({ours})")]
    VersionMismatch { agent: String, ours: &'static str },
    /// An RPC failed (transport error, timeout, or a status from the agent).
    #[error("agent call {method} failed")]
    Rpc {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// The agent answered with something that cannot be true.
    #[error("agent call {method} answered {what}")]
    Malformed { method: &'static str, what: String },
    /// The connection broke and no new one answered within the bound (remote VMs).
    #[error("the connection to the agent through the peer pods adaptor could not be re-established within {bound:?} (agent_reconnect_timeout): {last}")]
    Reconnect { bound: Duration, last: String },
    /// The sandbox is down (its VM was fenced): nothing in the guest can be reached.
    #[error("agent call {method} failed: sandbox is down: {reason}")]
    SandboxDown {
        method: &'static str,
        reason: String,
    },
}

impl AgentError {
    /// The status code the agent answered with, when the call reached the agent and it
    /// refused the request (as opposed to a transport failure or a timeout).
    pub fn agent_code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the connection to the agent failed (as opposed to the agent refusing the
    /// request, answering nonsense, or the sandbox being down).
    pub fn is_transport(&self) -> bool {
        matches!(self, AgentError::Reconnect { .. })
            || matches!(self, AgentError::Rpc { source, .. } if !matches!(source, ttrpc::Error::RpcStatus(_)))
    }

    /// Whether the connection itself is gone (closed or failed), as opposed to a call
    /// that timed out or was refused: only then does dialing again help.
    fn is_connection_closed(&self) -> bool {
        matches!(
            self,
            AgentError::Rpc {
                source: ttrpc::Error::LocalClosed
                    | ttrpc::Error::RemoteClosed
                    | ttrpc::Error::Socket(_),
                ..
            }
        )
    }
}

/// A guest pid from `method`'s answer: never 0.
fn positive_pid(method: &'static str, pid: u32) -> Result<u32, AgentError> {
    if pid == 0 {
        return Err(AgentError::Malformed {
            method,
            what: "pid 0".into(),
        });
    }
    Ok(pid)
}

/// Why a sandbox went down; calls fail at once with this reason once it is set.
pub type DownReason = watch::Receiver<Option<std::sync::Arc<str>>>;

/// The ttrpc clients of one connection to the agent.
#[derive(Clone)]
struct Clients {
    health: HealthClient,
    agent: AgentServiceClient,
    containers: ContainerServiceClient,
    /// In-guest image pull (remote VMs only).
    images: ImageServiceClient,
}

impl Clients {
    fn over(client: Client) -> Self {
        Self {
            health: HealthClient::new(client.clone()),
            agent: AgentServiceClient::new(client.clone()),
            containers: ContainerServiceClient::new(client.clone()),
            images: ImageServiceClient::new(client),
        }
    }
}

/// The connection every clone of a client shares: connection number `generation`.
#[derive(Clone)]
struct Link {
    generation: u64,
    clients: Clients,
    state: LinkState,
}

#[derive(Clone, PartialEq, Eq)]
enum LinkState {
    /// In use.
    Up,
    /// Broke; one caller redials, the others wait.
    Redialing,
    /// The redial failed: calls go to the broken connection and fail.
    Lost(Arc<str>),
}

/// How a client whose connection breaks dials again (remote VMs: the adaptor that owns
/// the agent socket may restart and recreate it).
#[derive(Debug, Clone)]
pub struct Redial {
    /// The agent socket (recreated by a restarted adaptor).
    pub endpoint: kata_hypervisor::vsock::Endpoint,
    /// How long after the break a new connection may take.
    pub bound: Duration,
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    link: Arc<watch::Sender<Link>>,
    /// Set for a remote VM: a broken connection is dialed again.
    redial: Option<Arc<Redial>>,
    timeout: Duration,
    /// Set when the sandbox goes down: pending and later calls fail at once with it.
    down: Option<DownReason>,
    /// True once the sandbox's teardown began: a redial then gives up at once.
    stopping: Option<watch::Receiver<bool>>,
    /// Latency of every call, by method (`kata_shim_agent_rpc_durations_*`).
    durations: kata_metrics::RpcDurations,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Longest wait for the agent's ready line before dialing anyway (its log level may hide it).
const READY_MARKER_WAIT: Duration = Duration::from_secs(20);

/// Waits until the guest console shows the agent's ready line, QEMU exits, or
/// [`READY_MARKER_WAIT`] (or `deadline`) passes: dialing earlier races the guest's vsock
/// driver start, which was seen to leave the hybrid-vsock daemon unanswering.
async fn wait_for_ready_marker(vm: &Vm, deadline: Instant) {
    let until = (Instant::now() + READY_MARKER_WAIT).min(deadline);
    let exited = vm.exit_watch();
    while Instant::now() < until {
        if exited.borrow().is_some() {
            return;
        }
        if vm
            .console_tail()
            .iter()
            .rev()
            .any(|l| l.contains(kata_proto::AGENT_READY_MARKER))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        marker = kata_proto::AGENT_READY_MARKER,
        "the agent's ready line did not appear on the guest console; dialing anyway"
    );
}

impl AgentClient {
    /// Dials the agent through `vm` and waits until it reports SERVING.
    ///
    /// `dial_timeout` bounds the whole wait (guest boot included); `request_timeout` is the
    /// timeout of every later call.
    pub async fn connect(
        vm: &Vm,
        dial_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let deadline = Instant::now() + dial_timeout;
        wait_for_ready_marker(vm, deadline).await;
        let dial = |port, remaining| vm.connect(port, remaining);
        Self::dial_until_serving(dial, deadline, dial_timeout, request_timeout).await
    }

    /// Dials the agent at `endpoint` (a remote VM's agent socket: no console to watch, no
    /// daemons to race) and waits until it reports SERVING.
    pub async fn connect_endpoint(
        endpoint: &kata_hypervisor::vsock::Endpoint,
        dial_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let deadline = Instant::now() + dial_timeout;
        let dial = |port, remaining| async move {
            endpoint.connect(port, remaining).await.map_err(|source| {
                kata_hypervisor::Error::Connect {
                    port,
                    source,
                    console_tail: Vec::new(),
                }
            })
        };
        Self::dial_until_serving(dial, deadline, dial_timeout, request_timeout).await
    }

    async fn dial_until_serving<D, F>(
        dial: D,
        deadline: Instant,
        dial_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, AgentError>
    where
        D: Fn(u32, Duration) -> F,
        F: Future<Output = Result<kata_hypervisor::VsockStream, kata_hypervisor::Error>>,
    {
        let port = kata_proto::AGENT_VSOCK_PORT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let stream = dial(port, remaining)
                .await
                .map_err(|source| AgentError::Dial { port, source })?;
            let client = Client::new(Socket::new(stream));
            let this = Self::over(client, request_timeout);
            let last = match this.check(PROBE_TIMEOUT).await {
                Ok(ServingStatus::SERVING) => {
                    this.ensure_compatible().await?;
                    return Ok(this);
                }
                Ok(status) => format!("status {status:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(AgentError::NotServing {
                    timeout: dial_timeout,
                    last,
                });
            }
            tracing::debug!(%last, "agent not serving yet; retrying");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn over(client: Client, timeout: Duration) -> Self {
        let link = Link {
            generation: 0,
            clients: Clients::over(client),
            state: LinkState::Up,
        };
        Self {
            link: Arc::new(watch::channel(link).0),
            redial: None,
            timeout,
            down: None,
            stopping: None,
            durations: kata_metrics::RpcDurations::agent_rpc(),
        }
    }

    /// A client over an already connected stream to the agent (tests, tools).
    pub fn over_stream(
        stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + 'static,
        request_timeout: Duration,
    ) -> Self {
        Self::over(Client::new(Socket::new(stream)), request_timeout)
    }

    /// This client, dialing `redial` again when its connection breaks (remote VMs).
    pub fn with_redial(mut self, redial: Redial) -> Self {
        self.redial = Some(Arc::new(redial));
        self
    }

    /// How long a broken connection is dialed again, when it is (remote VMs).
    pub fn redial_bound(&self) -> Option<Duration> {
        self.redial.as_ref().map(|r| r.bound)
    }

    /// The clients of the current connection; waits while another caller redials.
    async fn link(&self) -> Clients {
        self.current().await.1
    }

    /// The current connection's generation and clients; waits while a redial runs. A lost
    /// link hands out the last clients, whose calls fail at once.
    async fn current(&self) -> (u64, Clients) {
        let mut rx = self.link.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = rx.wait_for(|l| l.state != LinkState::Redialing).await;
        let link = rx.borrow();
        (link.generation, link.clients.clone())
    }

    /// After connection `generation` broke: dials again (or waits for the caller that
    /// does) until the redial bound passes. Ok once a newer connection is up.
    async fn reconnect(&self, generation: u64) -> Result<(), AgentError> {
        let Some(redial) = self.redial.clone() else {
            return Ok(());
        };
        let mine = self.link.send_if_modified(|link| {
            let claim = link.generation == generation && link.state == LinkState::Up;
            if claim {
                link.state = LinkState::Redialing;
            }
            claim
        });
        if !mine {
            let mut rx = self.link.subscribe();
            let settled = rx
                .wait_for(|l| l.state != LinkState::Redialing)
                .await
                .map(|l| l.state.clone());
            return match settled {
                Ok(LinkState::Lost(reason)) => Err(AgentError::Reconnect {
                    bound: redial.bound,
                    last: reason.to_string(),
                }),
                _ => Ok(()),
            };
        }
        tracing::warn!(
            bound = ?redial.bound,
            "the agent connection broke (peer pods adaptor restarting?); dialing again"
        );
        let started = Instant::now();
        let deadline = started + redial.bound;
        let dialed = async {
            let mut last = String::from("no attempt");
            let mut pause = Duration::from_millis(100);
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(last);
                }
                match redial
                    .endpoint
                    .connect(kata_proto::AGENT_VSOCK_PORT, remaining)
                    .await
                {
                    Ok(stream) => {
                        let clients = Clients::over(Client::new(Socket::new(stream)));
                        let probe = clients
                            .health
                            .check(Self::ctx(PROBE_TIMEOUT), &CheckRequest::new())
                            .await;
                        match probe {
                            Ok(r) if r.status.enum_value_or_default() == ServingStatus::SERVING => {
                                return Ok(clients)
                            }
                            Ok(r) => last = format!("agent status {:?}", r.status),
                            Err(e) => last = e.to_string(),
                        }
                    }
                    Err(e) => last = crate::report::chain(&e),
                }
                tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        };
        let down = self.down.clone();
        let stopping = self.stopping.clone();
        let result = tokio::select! {
            r = dialed => r,
            _ = async {
                match down {
                    Some(mut d) => { let _ = d.wait_for(Option::is_some).await; }
                    None => std::future::pending().await,
                }
            } => Err("the sandbox went down".to_owned()),
            _ = async {
                match stopping {
                    Some(mut s) => { let _ = s.wait_for(|s| *s).await; }
                    None => std::future::pending().await,
                }
            } => Err("the sandbox is being stopped".to_owned()),
        };
        match result {
            Ok(clients) => {
                tracing::info!(
                    redial_ms = started.elapsed().as_millis() as u64,
                    "agent connection re-established"
                );
                self.link.send_replace(Link {
                    generation: generation + 1,
                    clients,
                    state: LinkState::Up,
                });
                Ok(())
            }
            Err(last) => {
                self.link
                    .send_modify(|l| l.state = LinkState::Lost(Arc::from(last.as_str())));
                Err(AgentError::Reconnect {
                    bound: redial.bound,
                    last,
                })
            }
        }
    }

    /// Runs an idempotent RPC; when its connection breaks on a client with a redial, dials
    /// again and repeats it (as often as the connection breaks, each redial bounded).
    async fn call_again<T, F, Fut>(&self, method: &'static str, rpc: F) -> Result<T, AgentError>
    where
        F: Fn(Clients) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        loop {
            let (generation, clients) = self.current().await;
            match self.call(method, rpc(clients)).await {
                Err(e) if self.redial.is_some() && e.is_connection_closed() => {
                    self.reconnect(generation).await?;
                }
                result => return result,
            }
        }
    }

    /// This client, giving up a redial once `stopping` turns true (a teardown began: the
    /// VM is going away on purpose).
    pub fn with_stopping(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// This client, failing every call at once (also calls in flight) with the reason
    /// `down` carries once it is set.
    pub fn with_down_reason(mut self, down: DownReason) -> Self {
        self.down = Some(down);
        self
    }

    /// This client with another per-call timeout (for calls that must be bounded tighter,
    /// such as Kill and Delete).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        let mut this = self.clone();
        this.timeout = timeout;
        this
    }

    /// A second connection to the agent for health probes only, so a busy or broken
    /// main connection never hides (or fakes) the agent's liveness.
    pub async fn probe_connection(
        &self,
        endpoint: &kata_hypervisor::vsock::Endpoint,
        dial_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let port = kata_proto::AGENT_VSOCK_PORT;
        let stream = endpoint
            .connect(port, dial_timeout)
            .await
            .map_err(|source| AgentError::Dial {
                port,
                source: kata_hypervisor::Error::Connect {
                    port,
                    source,
                    console_tail: Vec::new(),
                },
            })?;
        let mut probe = Self::over(Client::new(Socket::new(stream)), self.timeout);
        probe.redial = self.redial.clone();
        Ok(probe)
    }

    /// One health probe bounded by `timeout`: Ok when the agent answered SERVING.
    pub async fn probe(&self, timeout: Duration) -> Result<(), AgentError> {
        match self.check(timeout).await? {
            ServingStatus::SERVING => Ok(()),
            status => Err(AgentError::NotServing {
                timeout,
                last: format!("status {status:?}"),
            }),
        }
    }

    /// Runs one RPC, naming it in the error; fails at once when the sandbox is down.
    async fn call<T>(
        &self,
        method: &'static str,
        rpc: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        // Latency as Kata labels it (`grpc.<Method>Request`).
        let started = Instant::now();
        let timed = async {
            let result = rpc.await;
            self.durations
                .observe(&format!("grpc.{method}Request"), started.elapsed());
            result
        };
        let Some(down) = &self.down else {
            return timed
                .await
                .map_err(|source| AgentError::Rpc { method, source });
        };
        let mut down = down.clone();
        let gone = |reason: &std::sync::Arc<str>| AgentError::SandboxDown {
            method,
            reason: reason.to_string(),
        };
        if let Some(reason) = down.borrow().as_ref() {
            return Err(gone(reason));
        }
        tokio::select! {
            result = timed => result.map_err(|source| AgentError::Rpc { method, source }),
            reason = down.wait_for(Option::is_some) => match reason {
                Ok(reason) => Err(gone(reason.as_ref().expect("waited for Some"))),
                // The sandbox is gone altogether.
                Err(_) => Err(AgentError::SandboxDown { method, reason: "sandbox dropped".into() }),
            },
        }
    }

    fn ctx(timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
    }

    async fn check(&self, timeout: Duration) -> Result<ServingStatus, AgentError> {
        let resp = self
            .call_again("Check", |c| async move {
                c.health
                    .check(Self::ctx(timeout), &CheckRequest::new())
                    .await
            })
            .await?;
        Ok(resp.status.enum_value_or_default())
    }

    /// Fails unless the agent speaks our protocol's major version.
    pub async fn ensure_compatible(&self) -> Result<(), AgentError> {
        let v = self.version().await?;
        let major = |s: &str| s.split('.').next().unwrap_or_default().to_owned();
        if major(&v.grpc_version) != major(kata_proto::PROTOCOL_VERSION) {
            return Err(AgentError::VersionMismatch {
                agent: v.grpc_version,
                ours: kata_proto::PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// Whether the agent reports SERVING.
    pub async fn health_check(&self) -> Result<bool, AgentError> {
        Ok(self.check(self.timeout).await? == ServingStatus::SERVING)
    }

    /// The agent's binary and protocol versions.
    pub async fn version(&self) -> Result<VersionCheckResponse, AgentError> {
        self.call(
            "Version",
            self.link()
                .await
                .health
                .version(Self::ctx(self.timeout), &CheckRequest::new()),
        )
        .await
    }

    /// Kernel release, memory block size, memory and CPUs as the guest sees them.
    pub async fn guest_details(&self) -> Result<GuestDetailsResponse, AgentError> {
        let details = self
            .call(
                "GetGuestDetails",
                self.link()
                    .await
                    .agent
                    .get_guest_details(Self::ctx(self.timeout), &GuestDetailsRequest::new()),
            )
            .await?;
        let block = details.mem_block_size_bytes;
        if block < 4096 || !block.is_power_of_two() {
            return Err(AgentError::Malformed {
                method: "GetGuestDetails",
                what: format!("a memory block size of {block} bytes (expected a power of two of at least 4096)"),
            });
        }
        Ok(details)
    }

    /// Mounts `storages` in the guest.
    pub async fn add_storages(&self, storages: Vec<Storage>) -> Result<(), AgentError> {
        let mut req = AddStoragesRequest::new();
        req.storages = storages;
        self.call(
            "AddStorages",
            self.link()
                .await
                .agent
                .add_storages(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Reads a guest file of at most `max_bytes`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let mut req = ReadFileRequest::new();
        req.path = path.to_owned();
        req.max_bytes = max_bytes;
        let data = self
            .call(
                "ReadFile",
                self.link().await.agent.read_file(self.ctx_default(), &req),
            )
            .await?
            .data;
        if data.len() as u64 > max_bytes {
            return Err(AgentError::Malformed {
                method: "ReadFile",
                what: format!("{} bytes, more than the {max_bytes} asked for", data.len()),
            });
        }
        Ok(data)
    }

    /// Asks the agent to sync and power the VM off. The VM exits shortly after the reply.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.call(
            "Shutdown",
            self.link()
                .await
                .agent
                .shutdown(self.ctx_default(), &ShutdownRequest::new()),
        )
        .await
        .map(drop)
    }
}

/// What a VM without a shared file system needs (peer pods): images pulled in the guest,
/// files copied in.
impl AgentClient {
    /// Pulls `image` in the guest and mounts it as `container_id`'s root filesystem;
    /// bounded by `timeout` (a pull takes longer than other calls). The answer must name
    /// the root the container's spec points at (`expected_rootfs`).
    pub async fn pull_image(
        &self,
        container_id: &str,
        image: &str,
        expected_rootfs: &str,
        timeout: Duration,
    ) -> Result<PullImageResponse, AgentError> {
        let req = PullImageRequest {
            container_id: container_id.to_owned(),
            image: image.to_owned(),
            ..Default::default()
        };
        let resp = self
            .call(
                "PullImage",
                self.link()
                    .await
                    .images
                    .pull_image(Self::ctx(timeout), &req),
            )
            .await?;
        if resp.rootfs != expected_rootfs {
            return Err(AgentError::Malformed {
                method: "PullImage",
                what: format!("rootfs {:?} (expected {expected_rootfs:?})", resp.rootfs),
            });
        }
        Ok(resp)
    }

    /// Makes one file, directory or symlink (or one chunk of a file) below the guest's
    /// [`GUEST_SHARED_DIR`].
    pub async fn copy_file(&self, req: &CopyFileRequest) -> Result<(), AgentError> {
        self.call(
            "CopyFile",
            self.link().await.agent.copy_file(self.ctx_default(), req),
        )
        .await
        .map(drop)
    }
}

/// Metrics.
impl AgentClient {
    /// Latency of this client's calls, by method.
    pub fn rpc_durations(&self) -> &kata_metrics::RpcDurations {
        &self.durations
    }

    /// The agent's and the guest's metrics (Prometheus text) and the containers' usage,
    /// within `timeout`.
    pub async fn get_metrics(&self, timeout: Duration) -> Result<Metrics, AgentError> {
        self.call(
            "GetMetrics",
            self.link()
                .await
                .agent
                .get_metrics(Self::ctx(timeout), &GetMetricsRequest::new()),
        )
        .await
    }
}

/// The ContainerService: containers and processes in the guest.
impl AgentClient {
    fn ctx_default(&self) -> ttrpc::context::Context {
        Self::ctx(self.timeout)
    }

    /// Onlines hot-added memory and vCPUs in the guest and waits (at most `timeout_ms`)
    /// until at least `min_blocks` memory blocks and `min_cpus` CPUs are online.
    pub async fn online_resources(
        &self,
        min_blocks: u32,
        min_cpus: u32,
        timeout_ms: u32,
    ) -> Result<OnlineResourcesResponse, AgentError> {
        let req = OnlineResourcesRequest {
            min_memory_blocks: min_blocks,
            min_cpus,
            timeout_ms,
            ..Default::default()
        };
        let deadline = std::time::Duration::from_millis(timeout_ms.into()) + self.timeout;
        let online = self
            .call(
                "OnlineResources",
                self.link()
                    .await
                    .agent
                    .online_resources(Self::ctx(deadline), &req),
            )
            .await?;
        if online.memory_blocks < min_blocks || online.online_cpus < min_cpus {
            return Err(AgentError::Malformed {
                method: "OnlineResources",
                what: format!(
                    "{} memory blocks and {} CPUs online, fewer than the {min_blocks} and {min_cpus} it was asked to wait for",
                    online.memory_blocks, online.online_cpus
                ),
            });
        }
        Ok(online)
    }

    /// Gives the guest the pod's interfaces (by MAC), addresses, MTU and routes.
    pub async fn configure_network(
        &self,
        net: &crate::sandbox::network::PodNetwork,
    ) -> Result<(), AgentError> {
        use kata_proto::agent::{ConfigureNetworkRequest, IPAddress, Interface, Route};
        let req = ConfigureNetworkRequest {
            interfaces: net
                .interfaces
                .iter()
                .map(|i| Interface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    mtu: i.mtu,
                    addresses: i
                        .addresses
                        .iter()
                        .map(|(ip, len)| IPAddress {
                            address: ip.to_string(),
                            prefix_len: (*len).into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            routes: net
                .routes
                .iter()
                .map(|r| Route {
                    destination: r
                        .destination
                        .map(|(d, _)| d.to_string())
                        .unwrap_or_default(),
                    dest_prefix_len: r.destination.map(|(_, l)| l.into()).unwrap_or(0),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    link_scope: r.link_scope,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.call(
            "ConfigureNetwork",
            self.link()
                .await
                .agent
                .configure_network(self.ctx_default(), &req),
        )
        .await?;
        Ok(())
    }

    /// Creates a container from a guest-ready OCI spec; returns the guest pid of its init
    /// process, created but not started.
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec: Vec<u8>,
        stdio: Stdio,
        sandbox: bool,
    ) -> Result<u32, AgentError> {
        let req = CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec,
            stdio: Some(stdio).into(),
            sandbox,
            ..Default::default()
        };
        let resp = self
            .call(
                "CreateContainer",
                self.link()
                    .await
                    .containers
                    .create_container(self.ctx_default(), &req),
            )
            .await?;
        positive_pid("CreateContainer", resp.pid)
    }

    /// Starts a created container's init process (its stdio must be attached).
    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call(
            "StartContainer",
            self.link()
                .await
                .containers
                .start_container(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Creates (does not start) an exec process from an OCI `Process` (JSON).
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: Stdio,
    ) -> Result<(), AgentError> {
        let req = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.call(
            "ExecProcess",
            self.link()
                .await
                .containers
                .exec_process(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Runs a created exec process; returns its guest pid.
    pub async fn start_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<u32, AgentError> {
        let req = StartProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        let resp = self
            .call(
                "StartProcess",
                self.link()
                    .await
                    .containers
                    .start_process(self.ctx_default(), &req),
            )
            .await?;
        positive_pid("StartProcess", resp.pid)
    }

    /// Sends `signal` to a process (`exec_id` empty: the init), or to every process of the
    /// container when `all`.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.call(
            "SignalProcess",
            self.link()
                .await
                .containers
                .signal_process(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Waits, without a timeout, until the process exits and its output is closed.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError> {
        let req = WaitProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        // A ttrpc timeout of 0 means none.
        let req = &req;
        let exit = self
            .call_again("WaitProcess", |c| async move {
                c.containers
                    .wait_process(ttrpc::context::with_timeout(0), req)
                    .await
            })
            .await?;
        if !(0..=255).contains(&exit.status) {
            return Err(AgentError::Malformed {
                method: "WaitProcess",
                what: format!("exit status {} (expected 0 to 255)", exit.status),
            });
        }
        Ok(exit)
    }

    /// Removes a container whose processes have exited.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call(
            "RemoveContainer",
            self.link()
                .await
                .containers
                .remove_container(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Guest pids of the container's processes.
    pub async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ListPidsRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let req = &req;
        let resp = self
            .call_again("ListPids", |c| async move {
                c.containers.list_pids(self.ctx_default(), req).await
            })
            .await?;
        Ok(resp.pids)
    }

    /// Resizes a process's pty.
    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            columns,
            ..Default::default()
        };
        self.call(
            "ResizeTty",
            self.link()
                .await
                .containers
                .resize_tty(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Closes a process's stdin in the guest.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.call(
            "CloseStdin",
            self.link()
                .await
                .containers
                .close_stdin(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Freezes every process of the container.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = PauseContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call(
            "PauseContainer",
            self.link()
                .await
                .containers
                .pause_container(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Thaws a paused container.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ResumeContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call(
            "ResumeContainer",
            self.link()
                .await
                .containers
                .resume_container(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// Applies OCI `LinuxResources` (JSON) to the container's cgroup.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources,
            ..Default::default()
        };
        self.call(
            "UpdateContainer",
            self.link()
                .await
                .containers
                .update_container(self.ctx_default(), &req),
        )
        .await
        .map(drop)
    }

    /// The container's cgroup v2 counters.
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, AgentError> {
        let req = StatsContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let req = &req;
        self.call_again("StatsContainer", |c| async move {
            c.containers.stats_container(self.ctx_default(), req).await
        })
        .await
    }

    /// Waits, without a timeout, until some container's cgroup counted an OOM kill after
    /// the answer numbered `after` (0 at first); returns the containers whose count grew,
    /// with their count now, and the number to pass next.
    pub async fn get_oom_events(
        &self,
        after: u64,
    ) -> Result<kata_proto::agent::GetOOMEventsResponse, AgentError> {
        let req = kata_proto::agent::GetOOMEventsRequest {
            after,
            ..Default::default()
        };
        const METHOD: &str = "GetOOMEvents";
        // A ttrpc timeout of 0 means none.
        let req = &req;
        let resp = self
            .call_again(METHOD, |c| async move {
                c.containers
                    .get_oom_events(ttrpc::context::with_timeout(0), req)
                    .await
            })
            .await?;
        let malformed = |what: String| AgentError::Malformed {
            method: METHOD,
            what,
        };
        if resp.seq <= after {
            return Err(malformed(format!(
                "sequence number {} (expected more than {after})",
                resp.seq
            )));
        }
        if resp.events.is_empty() {
            return Err(malformed("no event".into()));
        }
        if resp.events.iter().any(|e| e.container_id.is_empty()) {
            return Err(malformed("an event without a container id".into()));
        }
        Ok(resp)
    }
}

/// The storage that mounts the sandbox's virtio-fs share at [`GUEST_SHARED_DIR`].
pub fn shared_fs_storage() -> Storage {
    let mut s = Storage::new();
    s.driver = "virtio-fs".into();
    s.source = SHARED_FS_TAG.into();
    s.fstype = "virtiofs".into();
    s.options = vec!["nodev".into()];
    s.mount_point = GUEST_SHARED_DIR.into();
    s
}
