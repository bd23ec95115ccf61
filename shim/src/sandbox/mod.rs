//! The sandbox: one VM per pod, its directories on the host and the agent inside.
//!
//! [`Sandbox::create`] runs at the pod's first Create: configuration, state and shared
//! directories, VM, agent connection, virtio-fs mount in the guest. Every failure undoes
//! what was made. From then on [`health`] watches the VM and the agent and fences the
//! sandbox on a fault. [`Sandbox::teardown`] reverses the creation at the sandbox
//! container's Delete or at shutdown, bounded in time whatever the guest does. A small JSON
//! record in the state directory lists the host processes, so the `delete` command can
//! clean up after a shim that died ([`cleanup`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kata_hypervisor::vsock::Endpoint;
use kata_hypervisor::{Vm, VsockStream};
use tokio::sync::{watch, OnceCell};

use crate::config::{Config, ConfigError, HostLimits};

pub mod agent;
pub mod cgroups;
pub mod cleanup;
pub mod guest_files;
pub mod health;
pub mod hotplug;
pub mod machine;
pub mod mounts;
pub mod network;
pub mod placement;
pub mod remote;
pub mod resources;
pub mod state;
pub mod systemd;

use agent::{shared_fs_storage, AgentClient, AgentError};
use cgroups::Mode;
use health::{Fault, Fencer, Liveness};
use hotplug::{boot_ledger, Resources};
use machine::Machine;
use mounts::MountError;
pub use placement::{HostPlacement, SandboxCgroups};
use remote::RemoteVm;
pub use state::{dir_key, proc_start_time, read_record, SandboxPaths, StateRecord};

/// Timeout of every agent request except WaitProcess.
const AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU gets at each stop step (quit, SIGTERM, SIGKILL). With the agent's
/// Shutdown before it, a teardown ends within containerd's Shutdown bound (3 s) whatever
/// the guest does.
const VM_STOP_TIMEOUT: Duration = Duration::from_millis(750);
/// How long the agent gets to answer Shutdown.
const AGENT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stdio connection may take.
const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors creating or tearing down a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration file is missing, invalid or names missing files.
    #[error("configuration")]
    Config(#[source] ConfigError),
    /// A directory could not be created or removed.
    #[error("cannot create or remove {}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the state record failed.
    #[error("cannot write sandbox state {}", .path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Mounting or unmounting the shared directory failed.
    #[error("shared directory")]
    Mount(#[from] MountError),
    /// The VM did not start.
    #[error("cannot start the VM")]
    Vm(#[source] kata_hypervisor::Error),
    /// The agent did not come up or refused the shared filesystem.
    #[error("agent")]
    Agent(#[from] AgentError),
    /// A blocking helper task failed.
    #[error("sandbox setup task failed")]
    Join(#[source] tokio::task::JoinError),
    /// The pod network could not be plumbed.
    #[error("pod network")]
    Network(#[source] crate::sandbox::network::NetworkError),
    /// The host cgroup could not be set up.
    #[error("host cgroup")]
    Cgroup(#[source] cgroups::CgroupError),
    /// The remote hypervisor (peer pods adaptor) did not create or start the VM.
    #[error("remote VM")]
    Remote(#[source] remote::RemoteError),
    /// QEMU's vCPU threads could not be moved into the sandbox cgroup.
    #[error("cannot place QEMU's vCPU threads in the sandbox cgroup: {0}")]
    VcpuPlacement(String),
}

/// Reads the configuration file chosen by `explicit` / KATA_CONF_FILE / the default and
/// checks the files it names.
pub async fn load_config(explicit: Option<PathBuf>) -> Result<Config, SandboxError> {
    tokio::task::spawn_blocking(move || {
        let path = Config::path(explicit.as_deref());
        let config = Config::load(&path)?;
        config.check_files()?;
        Ok(config)
    })
    .await
    .map_err(SandboxError::Join)?
    .map_err(SandboxError::Config)
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    agent: AgentClient,
    endpoint: Endpoint,
    vm_pid: u32,
    /// The pod's VM, local or remote.
    machine: Machine,
    /// Ends the sandbox on a fault; knows why it ended.
    fencer: Arc<Fencer>,
    /// The VM's size and what the containers reserved of it.
    resources: Resources,
    /// The pod network plumbed into the VM, if the sandbox had a network namespace.
    network: Option<crate::sandbox::network::PodNetwork>,
    /// The host cgroups the VM runs in, if the spec named one.
    cgroups: Option<Arc<SandboxCgroups>>,
    /// Set once the teardown has run; concurrent callers wait for it.
    torn_down: OnceCell<()>,
}

/// What a backend's creation hands to [`Sandbox::assemble`].
struct Parts {
    machine: Machine,
    agent: AgentClient,
    probe: AgentClient,
    ledger: resources::Ledger,
    network: Option<crate::sandbox::network::PodNetwork>,
    cgroups: Option<Arc<SandboxCgroups>>,
}

/// Undoes a partial [`Sandbox::create`].
struct Undo {
    paths: SandboxPaths,
    shared_mounted: bool,
    /// The pod network's tc setup to remove.
    network: Option<(PathBuf, Vec<crate::sandbox::network::Interface>)>,
    /// Host cgroups made for the sandbox.
    cgroups: Option<Arc<SandboxCgroups>>,
}

impl Undo {
    async fn run(self, vm: Option<Vm>) {
        if let Some(vm) = vm {
            if let Err(error) = vm.stop(VM_STOP_TIMEOUT).await {
                tracing::warn!(error = %crate::report::chain(&error), "stopping VM after failed create");
            }
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove().await;
        }
        if let Some((netns, interfaces)) = self.network {
            let detached = tokio::task::spawn_blocking(move || {
                crate::sandbox::network::detach(&netns, &interfaces)
            })
            .await;
            if let Ok(Err(error)) = detached {
                tracing::warn!(error = %crate::report::chain(&error), "removing the pod network's tc setup");
            }
        }
        let paths = self.paths;
        let mounted = self.shared_mounted;
        let result = tokio::task::spawn_blocking(move || {
            if mounted {
                mounts::remove_dir_sync(&paths.shared_dir)?;
            } else if let Err(e) = std::fs::remove_dir(&paths.shared_dir) {
                tracing::debug!(error = %e, "removing shared dir");
            }
            mounts::remove_dir_sync(&paths.state_dir)
        })
        .await;
        if let Ok(Err(error)) = result {
            tracing::warn!(error = %crate::report::chain(&error), "cleanup after failed create");
        }
    }
}

impl Sandbox {
    /// Creates the sandbox `id` with `config` (see the module docs).
    ///
    /// `vm_annotations` go to a remote hypervisor's CreateVM (the pod's name and namespace,
    /// sizing); a local VM ignores them.
    pub async fn create(
        id: &str,
        config: &Config,
        netns: Option<&Path>,
        host: &HostPlacement,
        vm_annotations: HashMap<String, String>,
    ) -> Result<Sandbox, SandboxError> {
        let paths = SandboxPaths::new(id);
        if tokio::fs::try_exists(paths.state_file())
            .await
            .unwrap_or(false)
        {
            tracing::warn!(
                sandbox = id,
                "stale sandbox state found; cleaning it up first"
            );
            let stale = paths.clone();
            tokio::task::spawn_blocking(move || crate::sandbox::cleanup::cleanup_sandbox(&stale))
                .await
                .map_err(SandboxError::Join)?;
        }
        if let Some(remote) = &config.hypervisor.remote {
            return Self::create_remote(id, config, remote, netns, host, vm_annotations, &paths)
                .await;
        }
        let mut undo = Undo {
            paths: paths.clone(),
            shared_mounted: false,
            network: None,
            cgroups: None,
        };
        match Self::create_in(id, config, netns, host, &paths, &mut undo).await {
            Ok(sandbox) => Ok(sandbox),
            Err((error, vm)) => {
                undo.run(vm).await;
                Err(error)
            }
        }
    }

    async fn create_in(
        id: &str,
        config: &Config,
        netns: Option<&Path>,
        host: &HostPlacement,
        paths: &SandboxPaths,
        undo: &mut Undo,
    ) -> Result<Sandbox, (SandboxError, Option<Vm>)> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| (SandboxError::Dir { path, source }, None)
        };
        tokio::fs::create_dir_all(&paths.state_dir)
            .await
            .map_err(dir_err(&paths.state_dir))?;
        // The state record and the VM's sockets are root's alone.
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&paths.state_dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(dir_err(&paths.state_dir))?;
        tokio::fs::create_dir_all(&paths.shared_dir)
            .await
            .map_err(dir_err(&paths.shared_dir))?;
        mounts::make_shared_mountpoint(paths.shared_dir.clone())
            .await
            .map_err(|e| (e.into(), None))?;
        undo.shared_mounted = true;

        let mut vm_config = config
            .vm_config(
                &dir_key(id),
                paths.vm_run_dir.clone(),
                paths.shared_dir.clone(),
                HostLimits::detect(),
            )
            .map_err(|e| (SandboxError::Config(e), None))?;
        // The pod's network namespace (CNI's): a tap per interface, redirected with tc.
        let network = match netns {
            Some(ns) => {
                let ns = ns.to_owned();
                let attached =
                    tokio::task::spawn_blocking(move || crate::sandbox::network::attach(&ns))
                        .await
                        .map_err(|e| (SandboxError::Join(e), None))?
                        .map_err(|e| (SandboxError::Network(e), None))?;
                undo.network = Some((attached.netns.clone(), attached.interfaces.clone()));
                for (iface, tap) in attached.interfaces.iter().zip(&attached.taps) {
                    vm_config.net.push(kata_hypervisor::NetDevice {
                        tap: tap.clone(),
                        mac: iface.mac.clone(),
                    });
                }
                Some(attached)
            }
            None => None,
        };
        // The VM's cost goes in the pod's host cgroup (sandbox_cgroup_only).
        let cgroups = match &host.cgroups_path {
            Some(path) => {
                let mode = if config.runtime.sandbox_cgroup_only {
                    Mode::SandboxOnly
                } else {
                    Mode::VcpusOnly
                };
                let cgroups = SandboxCgroups::setup(&dir_key(id), path, mode)
                    .await
                    .map_err(|e| (SandboxError::Cgroup(e), None))?;
                let cgroups = Arc::new(cgroups);
                undo.cgroups = Some(cgroups.clone());
                vm_config.placement = cgroups.placement(host.oom_score_adj);
                Some(cgroups)
            }
            None => {
                vm_config.placement.qemu_oom_score_adj = host.oom_score_adj;
                None
            }
        };
        let launch_started = std::time::Instant::now();
        let vm = Vm::start(vm_config)
            .await
            .map_err(|e| (SandboxError::Vm(e), None))?;
        if let Some(cgroups) = &cgroups {
            if let Err(error) = cgroups.place_vcpus(&vm).await {
                let e = SandboxError::VcpuPlacement(error);
                return Err((e, Some(vm)));
            }
        }
        report_oom_score_adj(vm.pid(), host.oom_score_adj);
        let vm_launch_ms = launch_started.elapsed().as_millis() as u64;
        let record = StateRecord {
            sandbox_id: id.to_owned(),
            shim_pid: std::process::id(),
            qemu_pid: vm.pid(),
            qemu_start_time: proc_start_time(vm.pid()),
            vm_run_dir: paths.vm_run_dir.clone(),
            shared_dir: paths.shared_dir.clone(),
            cgroup_dirs: cgroups.as_ref().map(|c| c.dirs()).unwrap_or_default(),
            remote: None,
        };
        if let Err(source) = state::write_record(&paths.state_file(), &record).await {
            let path = paths.state_file();
            return Err((SandboxError::State { path, source }, Some(vm)));
        }
        let agent =
            match AgentClient::connect(&vm, config.dial_timeout(), AGENT_REQUEST_TIMEOUT).await {
                Ok(agent) => agent,
                Err(e) => return Err((e.into(), Some(vm))),
            };
        // Health probes get a connection of their own.
        let probe = match agent
            .probe_connection(vm.vsock_endpoint(), config.dial_timeout())
            .await
        {
            Ok(probe) => probe,
            Err(e) => return Err((e.into(), Some(vm))),
        };
        let agent_ready_ms = launch_started.elapsed().as_millis() as u64;
        if let Err(e) = agent.add_storages(vec![shared_fs_storage()]).await {
            return Err((e.into(), Some(vm)));
        }
        // Without a pod network namespace (host network) the guest still needs loopback:
        // an empty configuration brings just that up.
        let no_network = crate::sandbox::network::PodNetwork {
            netns: PathBuf::new(),
            interfaces: Vec::new(),
            routes: Vec::new(),
            taps: Vec::new(),
        };
        if let Err(e) = agent
            .configure_network(network.as_ref().unwrap_or(&no_network))
            .await
        {
            return Err((e.into(), Some(vm)));
        }
        if let Some(net) = &network {
            tracing::info!(sandbox = id, interfaces = ?net.interfaces, routes = ?net.routes, "pod network configured");
        }
        // QEMU holds the taps now.
        let network = network.map(|mut n| {
            n.taps.clear();
            n
        });
        let ledger = match boot_ledger(&agent, vm.config()).await {
            Ok(mut l) => {
                l.fixed = config.runtime.static_sandbox_resource_mgmt;
                l
            }
            Err(e) => return Err((e.into(), Some(vm))),
        };
        // Timings in ms from the VM launch: Vm::start returned, the agent answered, the
        // shared filesystem is mounted in the guest (hack/bench-ctr.sh reads them).
        tracing::info!(
            sandbox = id,
            qemu_pid = vm.pid(),
            accel = %vm.accel(),
            vm_launch_ms,
            agent_ready_ms,
            sandbox_ready_ms = launch_started.elapsed().as_millis() as u64,
            "sandbox ready"
        );
        let parts = Parts {
            machine: Machine::Local(Arc::new(vm)),
            agent,
            probe,
            ledger,
            network,
            cgroups,
        };
        Ok(Self::assemble(id, config, paths, parts))
    }

    /// The sandbox from its created parts: health monitoring starts here.
    fn assemble(id: &str, config: &Config, paths: &SandboxPaths, parts: Parts) -> Sandbox {
        let Parts {
            machine,
            agent,
            probe,
            ledger,
            network,
            cgroups,
        } = parts;
        let fencer = Arc::new(Fencer::new(machine.clone(), id));
        let agent = agent
            .with_down_reason(fencer.down_reason())
            .with_stopping(fencer.stopping_watch());
        let (interval, failures) = config.health_check();
        tokio::spawn(health::monitor(
            fencer.clone(),
            Some(probe),
            Liveness { interval, failures },
            cgroups.clone(),
        ));
        let resources = Resources::start(ledger, machine.local().cloned(), agent.clone());
        Sandbox {
            id: id.to_owned(),
            paths: paths.clone(),
            endpoint: machine.endpoint(),
            vm_pid: machine.task_pid(),
            agent,
            machine,
            fencer,
            resources,
            network,
            cgroups,
            torn_down: OnceCell::new(),
        }
    }

    /// A sandbox whose VM a peer pods adaptor creates (`[hypervisor.remote]`): no shared
    /// file system, no local VM processes; the shim alone joins the pod's host cgroup.
    async fn create_remote(
        id: &str,
        config: &Config,
        remote: &crate::config::Remote,
        netns: Option<&Path>,
        host: &HostPlacement,
        annotations: HashMap<String, String>,
        paths: &SandboxPaths,
    ) -> Result<Sandbox, SandboxError> {
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Dir { path, source }
        };
        tokio::fs::create_dir_all(&paths.state_dir)
            .await
            .map_err(dir_err(&paths.state_dir))?;
        let cgroups = match &host.cgroups_path {
            Some(path) => Some(Arc::new(
                SandboxCgroups::setup(&dir_key(id), path, Mode::SandboxOnly)
                    .await
                    .map_err(SandboxError::Cgroup)?,
            )),
            None => None,
        };
        let undo = |cgroups: Option<Arc<SandboxCgroups>>| async move {
            if let Some(c) = cgroups {
                c.remove().await;
            }
            if let Err(error) = mounts::remove_dir(paths.state_dir.clone()).await {
                tracing::warn!(error = %crate::report::chain(&error), "cleanup after failed create");
            }
        };
        let started = std::time::Instant::now();
        let vm = match RemoteVm::start(
            &remote.remote_hypervisor_socket,
            id,
            annotations,
            netns,
            Duration::from_secs(remote.remote_hypervisor_timeout),
        )
        .await
        {
            Ok(vm) => vm,
            Err(e) => {
                undo(cgroups).await;
                return Err(SandboxError::Remote(e));
            }
        };
        let vm_launch_ms = started.elapsed().as_millis() as u64;
        let result = async {
            let record = StateRecord {
                sandbox_id: id.to_owned(),
                shim_pid: std::process::id(),
                qemu_pid: 0,
                qemu_start_time: None,
                vm_run_dir: paths.vm_run_dir.clone(),
                shared_dir: paths.shared_dir.clone(),
                cgroup_dirs: cgroups.as_ref().map(|c| c.dirs()).unwrap_or_default(),
                remote: Some(state::RemoteRecord {
                    socket: vm.socket.clone(),
                    id: vm.id.clone(),
                }),
            };
            state::write_record(&paths.state_file(), &record)
                .await
                .map_err(|source| SandboxError::State {
                    path: paths.state_file(),
                    source,
                })?;
            let endpoint = vm.endpoint();
            let agent = AgentClient::connect_endpoint(
                &endpoint,
                config.dial_timeout(),
                AGENT_REQUEST_TIMEOUT,
            )
            .await?;
            let agent = match remote.agent_reconnect_timeout {
                0 => agent,
                secs => agent.with_redial(agent::Redial {
                    endpoint: endpoint.clone(),
                    bound: Duration::from_secs(secs),
                }),
            };
            let probe = agent
                .probe_connection(&endpoint, config.dial_timeout())
                .await?;
            // Sized once, by the adaptor: nothing is hot-added.
            let details = agent.guest_details().await?;
            let online = agent.online_resources(0, 0, 0).await?;
            let mut ledger = resources::Ledger::new(
                details.mem_block_size_bytes,
                online.mem_total_kib / 1024,
                online.mem_total_kib / 1024,
                0,
                online.online_cpus,
                online.online_cpus,
                online.memory_blocks,
            );
            ledger.fixed = true;
            Ok::<_, SandboxError>((agent, probe, ledger))
        }
        .await;
        let (agent, probe, ledger) = match result {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(error) = vm.stop().await {
                    tracing::warn!(error = %crate::report::chain(&error), "StopVM after failed create");
                }
                undo(cgroups).await;
                return Err(e);
            }
        };
        tracing::info!(
            sandbox = id,
            agent_socket = %vm.agent_socket.display(),
            vm_launch_ms,
            sandbox_ready_ms = started.elapsed().as_millis() as u64,
            "sandbox ready (remote VM)"
        );
        let parts = Parts {
            machine: Machine::Remote(Arc::new(vm)),
            agent,
            probe,
            ledger,
            network: None,
            cgroups,
        };
        Ok(Self::assemble(id, config, paths, parts))
    }

    /// Whether the VM is a remote one (peer pods): no shared file system, images pulled in
    /// the guest, nothing hot-added.
    pub fn is_remote(&self) -> bool {
        matches!(self.machine, Machine::Remote(_))
    }

    /// The VM's resources: hot-adds for containers' limits (see [`hotplug`]).
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The agent client.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// QEMU's pid: the pid containerd sees for every task of the sandbox (as in Kata).
    pub fn vm_pid(&self) -> u32 {
        self.vm_pid
    }

    /// Turns `Some` once the sandbox was fenced for a fault (its VM killed and reaped).
    pub fn fault_watch(&self) -> watch::Receiver<Option<Arc<Fault>>> {
        self.fencer.fault_watch()
    }

    /// Why the sandbox was fenced, if it was.
    pub fn fault(&self) -> Option<Arc<Fault>> {
        self.fencer.fault()
    }

    /// Turns true once the VM was stopped (by a teardown) or fenced and stopped.
    pub fn vm_stopped_watch(&self) -> watch::Receiver<bool> {
        self.machine.stopped_watch()
    }

    /// Ends the sandbox for `fault` (see [`health`]); returns once its VM is dead.
    pub async fn fence(&self, fault: Fault) {
        self.fencer.fence(fault).await;
    }

    /// The VM's helper daemons (virtiofsd, the hybrid vsock daemon) as (name, pid).
    pub fn daemon_pids(&self) -> Vec<(String, u32)> {
        self.machine
            .local()
            .map(|vm| vm.daemon_pids())
            .unwrap_or_default()
    }

    /// The pod's network namespace (CNI's), when the sandbox has one.
    pub fn netns(&self) -> Option<&Path> {
        self.network.as_ref().map(|n| n.netns.as_path())
    }

    /// Where the host reaches the guest's vsock ports (the agent's URL).
    pub fn vsock_endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether [`Sandbox::teardown`] has begun (a VM exit is then expected).
    pub fn is_stopping(&self) -> bool {
        self.fencer.is_stopping()
    }

    /// Pids of QEMU and its daemons, by name.
    pub fn vm_pids(&self) -> Vec<(String, u32)> {
        self.machine.pids()
    }

    /// One new connection to the guest's stdio port.
    pub async fn connect_stdio(&self) -> Result<VsockStream, kata_hypervisor::vsock::VsockError> {
        self.endpoint
            .connect(kata_proto::STDIO_VSOCK_PORT, STDIO_CONNECT_TIMEOUT)
            .await
    }

    /// The guest console's last lines.
    pub fn console_tail(&self) -> Vec<String> {
        self.machine.console_tail()
    }

    /// Stops the agent and the VM, unmounts and removes the sandbox's directories.
    /// Idempotent, and a second caller waits for the first to finish; errors are logged,
    /// never returned: teardown must go to the end. Bounded: a guest that does not answer
    /// gets [`AGENT_SHUTDOWN_TIMEOUT`], then QEMU is stopped with escalation.
    pub async fn teardown(&self) {
        self.torn_down.get_or_init(|| self.teardown_once()).await;
        // A remote VM whose StopVM failed (its adaptor was down, e.g. when the sandbox was
        // fenced for a connection not re-established in time) gets it again at every later
        // teardown, so that the pod's removal still deletes the instance.
        if let Machine::Remote(vm) = &self.machine {
            if !*vm.stopped_watch().borrow() {
                tracing::info!(sandbox = %self.id, "StopVM again (it failed before)");
                self.machine.stop(VM_STOP_TIMEOUT).await;
            }
        }
    }

    async fn teardown_once(&self) {
        let started = std::time::Instant::now();
        self.fencer.begin_stop();
        tracing::info!(sandbox = %self.id, "tearing down sandbox");
        if self.fencer.fault().is_none() && !self.machine.exited() {
            match tokio::time::timeout(AGENT_SHUTDOWN_TIMEOUT, self.agent.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %crate::report::chain(&e), "agent shutdown")
                }
                Err(_) => tracing::debug!("agent shutdown timed out"),
            }
        }
        self.machine.stop(VM_STOP_TIMEOUT).await;
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove().await;
        }
        if let Some(net) = self.network.clone() {
            let detached = tokio::task::spawn_blocking(move || {
                crate::sandbox::network::detach(&net.netns, &net.interfaces)
            })
            .await;
            if let Ok(Err(error)) = detached {
                tracing::warn!(error = %crate::report::chain(&error), "removing the pod network's tc setup");
            }
        }
        let paths = self.paths.clone();
        let result = tokio::task::spawn_blocking(move || {
            mounts::remove_dir_sync(&paths.shared_dir)?;
            mounts::remove_dir_sync(&paths.state_dir)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::report::chain(&error), "removing sandbox directories")
            }
            Err(error) => tracing::warn!(%error, "sandbox cleanup task failed"),
        }
        tracing::info!(
            sandbox = %self.id,
            teardown_ms = started.elapsed().as_millis() as u64,
            "sandbox torn down"
        );
    }
}

/// Logs when QEMU's oom_score_adj is not what the pod's QoS class asked for (a host may
/// refuse lowering it).
fn report_oom_score_adj(pid: u32, wanted: Option<i32>) {
    let Some(wanted) = wanted else {
        return;
    };
    let actual = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok());
    if actual != Some(wanted) {
        tracing::info!(
            wanted,
            ?actual,
            "QEMU's oom_score_adj differs from the pod's (this host does not allow lowering it)"
        );
    }
}
