//! The sandbox: one VM per pod, its directories on the host and the agent inside.
//!
//! [`Sandbox::create`] runs at the pod's first Create: configuration, state and shared
//! directories, VM, agent connection, virtio-fs mount in the guest. Every failure undoes
//! what was made. [`Sandbox::teardown`] reverses it at the sandbox container's Delete or at
//! shutdown. A small JSON record in the state directory lists the host processes, so the
//! `delete` command can clean up after a shim that died ([`crate::sandbox::cleanup`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kata_hypervisor::vsock::Endpoint;
use kata_hypervisor::{ExitReport, Vm, VsockStream};
use tokio::sync::{watch, Mutex};

use crate::config::{Config, ConfigError, HostLimits};

pub mod agent;
pub mod cleanup;
pub mod mounts;
pub mod network;
pub mod resources;
pub mod state;

use agent::{shared_fs_storage, AgentClient, AgentError};
use mounts::MountError;
use resources::{Ledger, Limits, ResourceError};
pub use state::{dir_key, proc_start_time, read_record, SandboxPaths, StateRecord};

/// Timeout of every agent request except WaitProcess.
const AGENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU gets at each stop step (quit, SIGTERM, SIGKILL).
const VM_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to answer Shutdown.
const AGENT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// The VM's helper daemons as (name, pid), for metrics.
    daemon_pids: Vec<(String, u32)>,
    vm: Mutex<Option<Vm>>,
    /// The VM's size and what the containers reserved of it.
    resources: Mutex<Ledger>,
    /// The pod network plumbed into the VM, if the sandbox had a network namespace.
    network: Option<crate::sandbox::network::PodNetwork>,
    exit_rx: watch::Receiver<Option<ExitReport>>,
    stopping: AtomicBool,
    /// Held for the whole teardown; true once it is done.
    torn_down: Mutex<bool>,
}

/// How long the guest may take to online hot-added resources.
const ONLINE_TIMEOUT_MS: u32 = 20_000;

/// The ledger of a freshly booted VM: its configured size and the guest's memory block
/// size and online blocks.
async fn boot_ledger(
    agent: &AgentClient,
    config: &kata_hypervisor::VmConfig,
) -> Result<Ledger, AgentError> {
    let details = agent.guest_details().await?;
    let online = agent.online_resources(0, 0, 0).await?;
    Ok(Ledger::new(
        details.mem_block_size_bytes,
        config.memory_mib.into(),
        config.max_memory_mib.into(),
        config.memory_slots,
        config.vcpus,
        config.max_vcpus.max(config.vcpus),
        online.memory_blocks,
    ))
}

/// Hot-adds `bytes` of memory as DIMM number `n`: a shared memfd backend (virtio-fs needs
/// guest RAM shared) and a pc-dimm on it. A failed device_add removes the backend again.
async fn plug_memory(vm: &Vm, n: u32, bytes: u64) -> Result<(), ResourceError> {
    use kata_hypervisor::qmp::Command;
    let (mem, dimm) = (format!("hpmem{n}"), format!("hpdimm{n}"));
    let qmp = vm.qmp();
    qmp.execute_unit(&Command::memfd_backend(&mem, bytes, true))
        .await
        .map_err(|source| ResourceError::Qmp {
            what: format!("object-add {mem} ({} MiB)", bytes >> 20),
            source,
        })?;
    if let Err(source) = qmp.execute_unit(&Command::pc_dimm(&dimm, &mem)).await {
        let _ = qmp
            .execute_unit(&Command::ObjectDel { id: mem.clone() })
            .await;
        return Err(ResourceError::Qmp {
            what: format!("device_add pc-dimm {dimm} on {mem}"),
            source,
        });
    }
    Ok(())
}

/// Hot-adds `n` vCPUs into free slots QEMU reports. Returns how many were plugged (also
/// when one failed, so the ledger stays true) and the outcome.
async fn plug_vcpus(vm: &Vm, ledger: &mut Ledger, n: u32) -> (u32, Result<(), ResourceError>) {
    use kata_hypervisor::qmp::Command;
    let qmp = vm.qmp();
    let slots = match qmp.query_hotpluggable_cpus().await {
        Ok(s) => s,
        Err(source) => {
            return (
                0,
                Err(ResourceError::Qmp {
                    what: "query-hotpluggable-cpus".into(),
                    source,
                }),
            )
        }
    };
    let free: Vec<_> = slots.iter().filter(|c| c.qom_path.is_none()).collect();
    if free.len() < n as usize {
        return (
            0,
            Err(ResourceError::NoCpuSlot {
                wanted: n,
                free: free.len(),
            }),
        );
    }
    let mut plugged = 0;
    // QEMU lists the slots highest first; plug the lowest free ones.
    for cpu in free.iter().rev().take(n as usize) {
        let id = format!("hpcpu{}", ledger.next_cpu_id);
        ledger.next_cpu_id += 1;
        if let Err(source) = qmp.execute_unit(&Command::cpu(&id, cpu)).await {
            return (
                plugged,
                Err(ResourceError::Qmp {
                    what: format!("device_add {} {id}", cpu.driver),
                    source,
                }),
            );
        }
        plugged += 1;
    }
    (plugged, Ok(()))
}

/// Undoes a partial [`Sandbox::create`].
struct Undo {
    paths: SandboxPaths,
    shared_mounted: bool,
    /// The pod network's tc setup to remove.
    network: Option<(PathBuf, Vec<crate::sandbox::network::Interface>)>,
}

impl Undo {
    async fn run(self, vm: Option<Vm>) {
        if let Some(vm) = vm {
            if let Err(error) = vm.stop(VM_STOP_TIMEOUT).await {
                tracing::warn!(error = %crate::report::chain(&error), "stopping VM after failed create");
            }
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
    pub async fn create(
        id: &str,
        config: &Config,
        netns: Option<&Path>,
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
        let mut undo = Undo {
            paths: paths.clone(),
            shared_mounted: false,
            network: None,
        };
        match Self::create_in(id, config, netns, &paths, &mut undo).await {
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
        let launch_started = std::time::Instant::now();
        let vm = Vm::start(vm_config)
            .await
            .map_err(|e| (SandboxError::Vm(e), None))?;
        let vm_launch_ms = launch_started.elapsed().as_millis() as u64;
        let record = StateRecord {
            sandbox_id: id.to_owned(),
            shim_pid: std::process::id(),
            qemu_pid: vm.pid(),
            qemu_start_time: proc_start_time(vm.pid()),
            vm_run_dir: paths.vm_run_dir.clone(),
            shared_dir: paths.shared_dir.clone(),
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
        Ok(Sandbox {
            id: id.to_owned(),
            paths: paths.clone(),
            agent,
            endpoint: vm.vsock_endpoint().clone(),
            vm_pid: vm.pid(),
            daemon_pids: vm.daemon_pids(),
            exit_rx: vm.exit_watch(),
            vm: Mutex::new(Some(vm)),
            resources: Mutex::new(ledger),
            network,
            stopping: AtomicBool::new(false),
            torn_down: Mutex::new(false),
        })
    }

    /// Makes room for container `id` with `limits` (new, or changed by Update):
    /// hot-adds memory and vCPUs as needed and waits until the guest has them online.
    /// Fails naming the numbers when the VM cannot grow that far.
    pub async fn reserve(&self, id: &str, limits: Limits) -> Result<(), ResourceError> {
        let mut ledger = self.resources.lock().await;
        self.reserve_locked(&mut ledger, id, limits).await
    }

    /// [`reserve`](Self::reserve) with the limits an Update sets over the current ones,
    /// in one step under the ledger's lock.
    pub async fn update_reservation(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), ResourceError> {
        let mut ledger = self.resources.lock().await;
        let limits = crate::sandbox::resources::updated(ledger.reserved(id), resources);
        self.reserve_locked(&mut ledger, id, limits).await
    }

    async fn reserve_locked(
        &self,
        ledger: &mut Ledger,
        id: &str,
        limits: Limits,
    ) -> Result<(), ResourceError> {
        let plan = ledger.plan(id, limits)?;
        if plan.add_memory_bytes > 0 || plan.add_vcpus > 0 || ledger.unconfirmed() {
            let started = std::time::Instant::now();
            {
                let vm = self.vm.lock().await;
                let vm = vm.as_ref().ok_or(ResourceError::VmGone)?;
                if plan.add_memory_bytes > 0 {
                    plug_memory(vm, ledger.dimms, plan.add_memory_bytes).await?;
                    ledger.plugged_memory(plan.add_memory_bytes);
                }
                if plan.add_vcpus > 0 {
                    let (plugged, result) = plug_vcpus(vm, ledger, plan.add_vcpus).await;
                    ledger.plugged_vcpus(plugged);
                    result?;
                }
            }
            let online = self
                .agent
                .online_resources(ledger.expected_blocks(), ledger.vcpus, ONLINE_TIMEOUT_MS)
                .await
                .map_err(ResourceError::Online)?;
            ledger.confirmed_blocks = ledger.expected_blocks();
            ledger.confirmed_vcpus = ledger.vcpus;
            tracing::info!(
                container = id,
                added_memory_mib = plan.add_memory_bytes >> 20,
                added_vcpus = plan.add_vcpus,
                guest_mem_total_kib = online.mem_total_kib,
                guest_cpus = online.online_cpus,
                hotplug_ms = started.elapsed().as_millis() as u64,
                "hotplugged"
            );
        }
        ledger.reserve(id, limits);
        Ok(())
    }

    /// What container `id` has reserved.
    pub async fn reserved(&self, id: &str) -> Limits {
        self.resources.lock().await.reserved(id)
    }

    /// Gives back container `id`'s reservation (the memory stays plugged for reuse).
    pub async fn release(&self, id: &str) {
        self.resources.lock().await.release(id);
    }

    /// The agent client.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// QEMU's pid: the pid containerd sees for every task of the sandbox (as in Kata).
    pub fn vm_pid(&self) -> u32 {
        self.vm_pid
    }

    /// The VM's helper daemons (virtiofsd, the hybrid vsock daemon) as (name, pid).
    pub fn daemon_pids(&self) -> &[(String, u32)] {
        &self.daemon_pids
    }

    /// The pod's network namespace (CNI's), when the sandbox has one.
    pub fn netns(&self) -> Option<&Path> {
        self.network.as_ref().map(|n| n.netns.as_path())
    }

    /// Where the host reaches the guest's vsock ports (the agent's URL).
    pub fn vsock_endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Turns `Some` when QEMU has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitReport>> {
        self.exit_rx.clone()
    }

    /// Whether [`Sandbox::teardown`] has begun (a VM exit is then expected).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// One new connection to the guest's stdio port.
    pub async fn connect_stdio(&self) -> Result<VsockStream, kata_hypervisor::vsock::VsockError> {
        self.endpoint
            .connect(kata_proto::STDIO_VSOCK_PORT, STDIO_CONNECT_TIMEOUT)
            .await
    }

    /// The guest console's last lines (empty once the VM is stopped).
    pub async fn console_tail(&self) -> Vec<String> {
        self.vm
            .lock()
            .await
            .as_ref()
            .map(Vm::console_tail)
            .unwrap_or_default()
    }

    /// Stops the agent and the VM, unmounts and removes the sandbox's directories.
    /// Idempotent, and a second caller waits for the first to finish; errors are logged,
    /// never returned: teardown must go to the end.
    pub async fn teardown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut done = self.torn_down.lock().await;
        if *done {
            return;
        }
        *done = true;
        tracing::info!(sandbox = %self.id, "tearing down sandbox");
        let vm = self.vm.lock().await.take();
        if let Some(vm) = vm {
            if vm.exit_watch().borrow().is_none() {
                match tokio::time::timeout(AGENT_SHUTDOWN_TIMEOUT, self.agent.shutdown()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %crate::report::chain(&e), "agent shutdown")
                    }
                    Err(_) => tracing::debug!("agent shutdown timed out"),
                }
            }
            if let Err(error) = vm.stop(VM_STOP_TIMEOUT).await {
                tracing::warn!(error = %crate::report::chain(&error), "stopping VM");
            }
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
    }
}
