//! `kata-ctl boot-check`: boots a VM with the installed guest image, waits for the agent,
//! reads what the guest reports, optionally shares a host directory through virtio-fs and
//! reads a file back through the agent, then stops the VM. It tells a VM or agent problem
//! from a container one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kata_hypervisor::{Accel, ConfigError, GuestRoot, SharedFsConfig, Vm, VmConfig, VsockMode};
use kata_shim::sandbox::agent::{shared_fs_storage, AgentClient, AgentError, GUEST_SHARED_DIR};

/// The probe file written into the shared directory.
const PROBE_FILE: &str = ".kata-ctl-probe";

/// The guest's root filesystem.
#[derive(Debug, Clone)]
pub enum BootRoot {
    /// A read-only image on virtio-pmem (our kernel).
    Image(PathBuf),
    /// An initrd (Debian's kernel needs one).
    Initrd(PathBuf),
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct Options {
    pub qemu: PathBuf,
    /// `-bios`; `None` for QEMU's default.
    pub firmware: Option<PathBuf>,
    pub kernel: PathBuf,
    pub root: BootRoot,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    pub vsock: VsockMode,
    pub vsock_daemon: PathBuf,
    /// Share this host directory and read a probe file back through the agent.
    pub shared_dir: Option<PathBuf>,
    pub virtiofsd: PathBuf,
    pub dial_timeout: Duration,
}

/// Errors of a boot check; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BootCheckError {
    #[error("cannot write a probe file into {}", .dir.display())]
    ProbeFile {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the root filesystem image")]
    Image(#[source] ConfigError),
    #[error("starting the VM")]
    Start(#[source] kata_hypervisor::Error),
    #[error("waiting for the agent; guest console:\n{console}")]
    Agent {
        console: String,
        #[source]
        source: AgentError,
    },
    #[error("asking the agent for its {what}")]
    AgentCall {
        what: &'static str,
        #[source]
        source: AgentError,
    },
    #[error("stopping the VM")]
    Stop(#[source] kata_hypervisor::Error),
}

/// What the guest reported, and how long each step took.
#[derive(Debug, Clone)]
pub struct BootReport {
    pub vm_id: String,
    pub qemu_pid: u32,
    pub accel: Accel,
    pub launched: Duration,
    pub agent_ready: Duration,
    pub stopped: Duration,
    pub exit: String,
    pub agent_version: String,
    pub protocol_version: String,
    pub kernel_release: String,
    pub mem_total_mib: u64,
    pub online_cpus: u32,
    pub mem_block_mib: u64,
    pub modules: Vec<String>,
    /// The probe file's content as read through the agent (with a shared directory).
    pub shared_probe: Option<String>,
}

impl BootReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "VM {} (QEMU pid {}, accel {:?})\n",
            self.vm_id, self.qemu_pid, self.accel
        );
        out.push_str(&format!(
            "  QEMU launched        {:>6} ms\n",
            self.launched.as_millis()
        ));
        out.push_str(&format!(
            "  agent answered Check {:>6} ms\n",
            self.agent_ready.as_millis()
        ));
        out.push_str(&format!(
            "  agent {} (protocol {})\n",
            self.agent_version, self.protocol_version
        ));
        out.push_str(&format!("  guest kernel {}\n", self.kernel_release));
        out.push_str(&format!(
            "  guest memory {} MiB, {} online CPU(s), memory block {} MiB\n",
            self.mem_total_mib, self.online_cpus, self.mem_block_mib
        ));
        out.push_str(&format!("  modules: {}\n", self.modules.join(" ")));
        if let Some(probe) = &self.shared_probe {
            out.push_str(&format!(
                "  virtio-fs: read {} bytes of {PROBE_FILE} from the share: {:?}\n",
                probe.len(),
                probe.trim()
            ));
        }
        out.push_str(&format!(
            "VM stopped in {} ms ({})\n",
            self.stopped.as_millis(),
            self.exit
        ));
        out
    }

    /// One machine-readable line of timings in milliseconds.
    pub fn timing_line(&self) -> String {
        format!(
            "launch_ms={} agent_ready_ms={} stop_ms={}",
            self.launched.as_millis(),
            self.agent_ready.as_millis(),
            self.stopped.as_millis()
        )
    }
}

/// Boots, asks, stops. The VM is stopped whatever the agent answered.
pub async fn run(opts: Options) -> Result<BootReport, BootCheckError> {
    let pid = std::process::id();
    let root = match opts.root {
        BootRoot::Image(path) => GuestRoot::image(path).map_err(BootCheckError::Image)?,
        BootRoot::Initrd(path) => GuestRoot::Initrd(path),
    };
    let config = VmConfig {
        id: format!("boot-check-{pid}"),
        qemu_path: opts.qemu,
        firmware: opts.firmware,
        kernel: opts.kernel,
        root,
        kernel_params: Vec::new(),
        memory_mib: opts.memory_mib,
        memory_slots: 10,
        max_memory_mib: opts.memory_mib.saturating_mul(4),
        vcpus: opts.vcpus,
        max_vcpus: opts.vcpus.max(1),
        accel: opts.accel,
        tcg_tb_size_mib: kata_hypervisor::config::DEFAULT_TCG_TB_SIZE_MIB,
        vsock: opts.vsock,
        vsock_daemon: opts.vsock_daemon,
        shared_fs: opts.shared_dir.as_ref().map(|dir| SharedFsConfig {
            daemon: opts.virtiofsd.clone(),
            shared_dir: dir.clone(),
            cache: "auto".into(),
            extra_args: Vec::new(),
        }),
        net: Vec::new(),
        run_dir: std::env::temp_dir().join(format!("kata-ctl-{pid}")),
        start_timeout: Duration::from_secs(20),
        seccomp_sandbox: String::new(),
        placement: Default::default(),
    };
    let probe_path = opts.shared_dir.as_ref().map(|d| d.join(PROBE_FILE));
    if let (Some(dir), Some(path)) = (&opts.shared_dir, &probe_path) {
        std::fs::write(path, format!("hello from the host, pid {pid}\n")).map_err(|source| {
            BootCheckError::ProbeFile {
                dir: dir.clone(),
                source,
            }
        })?;
    }
    let result = boot_and_ask(config, opts.dial_timeout, opts.shared_dir.is_some()).await;
    if let Some(path) = &probe_path {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn boot_and_ask(
    config: VmConfig,
    dial_timeout: Duration,
    shared: bool,
) -> Result<BootReport, BootCheckError> {
    let t0 = Instant::now();
    let vm = Vm::start(config).await.map_err(BootCheckError::Start)?;
    let launched = t0.elapsed();
    let agent = match AgentClient::connect(&vm, dial_timeout, Duration::from_secs(10)).await {
        Ok(a) => a,
        Err(source) => {
            let console = vm.console_tail().join("\n");
            let _ = vm.stop(Duration::from_secs(5)).await;
            return Err(BootCheckError::Agent { console, source });
        }
    };
    let agent_ready = t0.elapsed();
    let (vm_id, qemu_pid, accel) = (vm.config().id.clone(), vm.pid(), vm.accel());
    let answers = ask(&agent, shared).await;
    drop(agent);
    let t1 = Instant::now();
    let exit = vm
        .stop(Duration::from_secs(10))
        .await
        .map_err(BootCheckError::Stop)?;
    let stopped = t1.elapsed();
    let answers = answers?;
    Ok(BootReport {
        vm_id,
        qemu_pid,
        accel,
        launched,
        agent_ready,
        stopped,
        exit: format!("{exit:?}"),
        agent_version: answers.version.agent_version.clone(),
        protocol_version: answers.version.grpc_version.clone(),
        kernel_release: answers.details.kernel_release.clone(),
        mem_total_mib: answers.details.mem_total_kib / 1024,
        online_cpus: answers.details.online_cpus,
        mem_block_mib: answers.details.mem_block_size_bytes >> 20,
        modules: answers.details.loaded_modules.clone(),
        shared_probe: answers.probe,
    })
}

struct Answers {
    version: kata_proto::health::VersionCheckResponse,
    details: kata_proto::agent::GuestDetailsResponse,
    probe: Option<String>,
}

async fn ask(agent: &AgentClient, shared: bool) -> Result<Answers, BootCheckError> {
    let call = |what| move |source| BootCheckError::AgentCall { what, source };
    let version = agent.version().await.map_err(call("version"))?;
    let details = agent.guest_details().await.map_err(call("guest details"))?;
    let probe = if shared {
        agent
            .add_storages(vec![shared_fs_storage()])
            .await
            .map_err(call("shared directory mount"))?;
        let data = agent
            .read_file(&format!("{GUEST_SHARED_DIR}/{PROBE_FILE}"), 4096)
            .await
            .map_err(call("probe file through virtio-fs"))?;
        Some(String::from_utf8_lossy(&data).into_owned())
    } else {
        None
    };
    Ok(Answers {
        version,
        details,
        probe,
    })
}
