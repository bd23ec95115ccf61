//! `configuration.toml`: the runtime's configuration, with Kata's key names for what we
//! implement.
//!
//! The file is read once per sandbox (from `KATA_CONF_FILE`, the runtime options'
//! ConfigPath, or [`DEFAULT_CONFIG_PATH`]). Unknown keys are rejected with a message naming
//! the key, and every value is checked here, at the edge, so that a bad configuration fails
//! sandbox creation before any process starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_hypervisor::{Accel, GuestRoot, SharedFsConfig, VmConfig, VsockMode};
use serde::Deserialize;

pub mod annotations;
pub mod options;

/// Where the configuration lives unless overridden.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kata-containers/configuration.toml";
/// Environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "KATA_CONF_FILE";
/// The firmware by default: qboot, a minimal BIOS that only loads the kernel (Debian ships
/// it with QEMU); SeaBIOS, QEMU's own default, spends longer initializing devices the guest
/// does not use.
/// QEMU's largest TCG translation cache on an x86_64 host, in MiB (it clamps larger
/// sizes silently).
const MAX_TCG_TB_SIZE_MIB: u32 = 2048;

pub const DEFAULT_FIRMWARE: &str = "/usr/share/qemu/qboot.rom";
/// The guest root filesystem image used when neither `image` nor `initrd` is set.
pub const DEFAULT_IMAGE: &str = "/usr/share/kata-containers/kata-containers.img";
/// QEMU's seccomp filter unless configured otherwise (Kata's default).
pub const DEFAULT_SECCOMP_SANDBOX: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

/// Configuration errors; each names the file, key or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{key}: file {path} does not exist")]
    MissingFile { key: &'static str, path: PathBuf },
    #[error("hypervisor.qemu.image = {path:?} and hypervisor.qemu.initrd = {initrd:?}: set one of them, not both")]
    ImageAndInitrd { path: PathBuf, initrd: PathBuf },
    #[error("hypervisor.qemu.image")]
    Image(#[source] kata_hypervisor::ConfigError),
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub hypervisor: HypervisorSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub runtime: Runtime,
}

/// `[hypervisor]`: a local QEMU (`[hypervisor.qemu]`) or, for peer pods, a remote
/// hypervisor (`[hypervisor.remote]`); a file names one of them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorSection {
    #[serde(default)]
    pub qemu: Qemu,
    pub remote: Option<Remote>,
}

/// `[hypervisor.remote]` (Kata's keys): the pod VM is created by a node-local peer pods
/// adaptor over its `hypervisor.Hypervisor` socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Remote {
    pub remote_hypervisor_socket: PathBuf,
    /// Seconds StartVM may take (at least 60).
    pub remote_hypervisor_timeout: u64,
    /// Annotation names (after `io.katacontainers.config.hypervisor.`) pods may set; they
    /// are passed to the adaptor.
    pub enable_annotations: Vec<String>,
    /// Seconds the shim keeps dialing the agent socket again after its connection broke
    /// (the adaptor restarting) before it ends the pod; 0: no redial.
    pub agent_reconnect_timeout: u64,
}

/// Most seconds `agent_reconnect_timeout` may be.
pub const MAX_AGENT_RECONNECT_TIMEOUT: u64 = 3600;

impl Default for Remote {
    fn default() -> Self {
        Self {
            remote_hypervisor_socket: "/run/peerpod/hypervisor.sock".into(),
            remote_hypervisor_timeout: 600,
            enable_annotations: ["machine_type", "default_memory", "default_vcpus", "image"]
                .map(String::from)
                .to_vec(),
            agent_reconnect_timeout: 60,
        }
    }
}

/// `[hypervisor.qemu]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Qemu {
    pub path: PathBuf,
    /// The firmware (`-bios`); empty: QEMU's default (SeaBIOS).
    pub firmware: PathBuf,
    pub kernel: PathBuf,
    /// The guest's root filesystem as a read-only image on a virtio-pmem device (shared by
    /// all VMs through the host's page cache). Unset or empty with `initrd` unset:
    /// [`DEFAULT_IMAGE`].
    pub image: Option<PathBuf>,
    /// The guest's root filesystem as an initrd (one copy in each VM); excludes `image`.
    pub initrd: Option<PathBuf>,
    /// Extra guest kernel parameters, space separated.
    pub kernel_params: String,
    /// `auto` | `kvm` | `tcg` (ours; Kata always uses KVM).
    pub accel: String,
    /// TCG's translation cache in MiB (ours; unused under KVM).
    pub tcg_tb_size: u32,
    pub default_vcpus: u32,
    /// 0 = the host's CPU count.
    pub default_maxvcpus: u32,
    /// MiB.
    pub default_memory: u32,
    pub memory_slots: u32,
    /// MiB; 0 = the host's memory.
    pub default_maxmemory: u32,
    /// Only `virtio-fs`.
    pub shared_fs: String,
    pub virtio_fs_daemon: PathBuf,
    /// `auto` | `always` | `never` (Kata's `none` is accepted as `never`).
    pub virtio_fs_cache: String,
    pub virtio_fs_extra_args: Vec<String>,
    /// `auto` | `vhost` | `hybrid` (ours).
    pub vsock: String,
    /// The hybrid vsock backend daemon.
    pub vsock_daemon: PathBuf,
    /// Guest kernel `debug` (instead of `quiet`) and every guest console line in the log.
    pub enable_debug: bool,
    /// Annotation names (after `io.katacontainers.config.hypervisor.`) pods may set.
    pub enable_annotations: Vec<String>,
    /// QEMU's seccomp filter (`-sandbox` value); empty turns it off.
    pub seccompsandbox: String,
}

/// Which root filesystem the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootChoice {
    /// `image` (or the default image).
    Image(PathBuf),
    /// `initrd`.
    Initrd(PathBuf),
}

impl Qemu {
    /// `image` or `initrd`, whichever is set (an empty path counts as unset), else the
    /// default image.
    pub fn root(&self) -> Result<RootChoice, ConfigError> {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        match (set(&self.image), set(&self.initrd)) {
            (Some(path), Some(initrd)) => Err(ConfigError::ImageAndInitrd { path, initrd }),
            (Some(path), None) => Ok(RootChoice::Image(path)),
            (None, Some(initrd)) => Ok(RootChoice::Initrd(initrd)),
            (None, None) => Ok(RootChoice::Image(DEFAULT_IMAGE.into())),
        }
    }
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            path: "/usr/bin/qemu-system-x86_64".into(),
            firmware: DEFAULT_FIRMWARE.into(),
            kernel: "/usr/share/kata-containers/vmlinux.container".into(),
            image: None,
            initrd: None,
            kernel_params: String::new(),
            accel: "auto".into(),
            tcg_tb_size: kata_hypervisor::config::DEFAULT_TCG_TB_SIZE_MIB,
            default_vcpus: 1,
            default_maxvcpus: 0,
            default_memory: 2048,
            memory_slots: 10,
            default_maxmemory: 0,
            shared_fs: "virtio-fs".into(),
            virtio_fs_daemon: "/opt/kata-deps/bin/virtiofsd".into(),
            virtio_fs_cache: "auto".into(),
            virtio_fs_extra_args: Vec::new(),
            vsock: "auto".into(),
            vsock_daemon: "/opt/kata-deps/bin/vhost-device-vsock".into(),
            enable_debug: false,
            enable_annotations: vec!["default_vcpus".into(), "default_memory".into()],
            seccompsandbox: DEFAULT_SECCOMP_SANDBOX.into(),
        }
    }
}

/// `[agent]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    #[serde(default)]
    pub kata: Agent,
}

/// `[agent.kata]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    /// The agent logs at debug level (`agent.log=debug`).
    pub enable_debug: bool,
    /// The agent serves a root shell in the guest on vsock port
    /// [`kata_proto::DEBUG_CONSOLE_VSOCK_PORT`] (`kata-ctl exec <sandbox-id>`).
    pub debug_console_enabled: bool,
    /// Seconds to wait for the agent after the VM starts.
    pub dial_timeout: u64,
    /// Seconds between health probes of a running agent (each bounded by the same time).
    pub health_check_interval: u64,
    /// Missed probes in a row after which the agent is lost and the sandbox is ended.
    pub health_check_failures: u32,
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            enable_debug: false,
            debug_console_enabled: false,
            dial_timeout: 60,
            health_check_interval: 10,
            health_check_failures: 3,
        }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// The shim logs at debug level.
    pub enable_debug: bool,
    /// Kata's meaning: `true` puts the shim, QEMU and its daemons in the sandbox's host
    /// cgroup (`linux.cgroupsPath`); `false` only QEMU's vCPU threads, the rest in
    /// `/kata_overhead/<sandbox>`.
    pub sandbox_cgroup_only: bool,
    pub static_sandbox_resource_mgmt: bool,
    /// Drop the container's seccomp profile instead of applying it in the guest.
    pub disable_guest_seccomp: bool,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            enable_debug: false,
            sandbox_cgroup_only: true,
            static_sandbox_resource_mgmt: false,
            disable_guest_seccomp: false,
        }
    }
}

/// Facts about the host that defaults depend on.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub cpus: u32,
    pub memory_mib: u32,
}

impl HostLimits {
    /// Reads the CPU count and MemTotal of this host.
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| u32::try_from(kib / 1024).unwrap_or(u32::MAX))
            .unwrap_or(0);
        Self { cpus, memory_mib }
    }
}

impl Config {
    /// The file to read: `explicit` (runtime options' ConfigPath), else `$KATA_CONF_FILE`,
    /// else [`DEFAULT_CONFIG_PATH`].
    pub fn path(explicit: Option<&Path>) -> PathBuf {
        explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; the error text names the offending key and line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        if config.hypervisor.remote.is_some() {
            // A file is for one backend: QEMU keys next to [hypervisor.remote] would be
            // silently ignored.
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
            let has_qemu = table
                .get("hypervisor")
                .and_then(|h| h.get("qemu"))
                .is_some();
            if has_qemu {
                return Err(
                    "[hypervisor.qemu] and [hypervisor.remote] exclude each other: a configuration is for a local or a remote (peer pods) VM"
                        .to_owned(),
                );
            }
        }
        Ok(config)
    }

    /// Checks values that the types alone do not constrain (files are checked by
    /// [`Config::check_files`], at sandbox creation).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.hypervisor.qemu;
        let invalid = |key: &'static str, value: &dyn std::fmt::Display, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                value: value.to_string(),
                reason: reason.to_owned(),
            })
        };
        if let Err(e) = q.accel.parse::<Accel>() {
            return invalid("hypervisor.qemu.accel", &q.accel, &e.to_string());
        }
        if let Err(e) = q.vsock.parse::<VsockMode>() {
            return invalid("hypervisor.qemu.vsock", &q.vsock, &e.to_string());
        }
        if q.shared_fs != "virtio-fs" {
            return invalid(
                "hypervisor.qemu.shared_fs",
                &q.shared_fs,
                "expected \"virtio-fs\"",
            );
        }
        if !matches!(
            q.virtio_fs_cache.as_str(),
            "auto" | "always" | "never" | "none"
        ) {
            return invalid(
                "hypervisor.qemu.virtio_fs_cache",
                &q.virtio_fs_cache,
                "expected auto, always or never",
            );
        }
        if !(1..=MAX_TCG_TB_SIZE_MIB).contains(&q.tcg_tb_size) {
            return invalid(
                "hypervisor.qemu.tcg_tb_size",
                &q.tcg_tb_size,
                "expected 1 to 2048 (MiB; QEMU's largest translation cache on x86_64 hosts)",
            );
        }
        if q.default_vcpus == 0 {
            return invalid("hypervisor.qemu.default_vcpus", &0, "expected at least 1");
        }
        if q.default_maxvcpus != 0 && q.default_maxvcpus < q.default_vcpus {
            return invalid(
                "hypervisor.qemu.default_maxvcpus",
                &q.default_maxvcpus,
                &format!("below default_vcpus = {}", q.default_vcpus),
            );
        }
        if q.default_memory < 128 {
            return invalid(
                "hypervisor.qemu.default_memory",
                &q.default_memory,
                "expected at least 128 (MiB)",
            );
        }
        if q.default_maxmemory != 0 && q.default_maxmemory < q.default_memory {
            return invalid(
                "hypervisor.qemu.default_maxmemory",
                &q.default_maxmemory,
                &format!("below default_memory = {}", q.default_memory),
            );
        }
        if q.memory_slots == 0 || q.memory_slots > 256 {
            return invalid(
                "hypervisor.qemu.memory_slots",
                &q.memory_slots,
                "expected 1 to 256",
            );
        }
        q.root()?;
        if self.agent.kata.dial_timeout == 0 {
            return invalid(
                "agent.kata.dial_timeout",
                &0,
                "expected at least 1 (seconds)",
            );
        }
        if self.agent.kata.health_check_interval == 0 {
            return invalid(
                "agent.kata.health_check_interval",
                &0,
                "expected at least 1 (seconds)",
            );
        }
        if self.agent.kata.health_check_failures == 0 {
            return invalid(
                "agent.kata.health_check_failures",
                &0,
                "expected at least 1",
            );
        }
        if let Some(arg) = weakening_virtiofsd_arg(&q.virtio_fs_extra_args) {
            return invalid(
                "hypervisor.qemu.virtio_fs_extra_args",
                &arg,
                "virtiofsd keeps its namespace sandbox and seccomp filter (remove this argument)",
            );
        }
        if let Some(r) = &self.hypervisor.remote {
            if r.remote_hypervisor_timeout == 0 {
                return invalid(
                    "hypervisor.remote.remote_hypervisor_timeout",
                    &0,
                    "expected at least 1 (seconds)",
                );
            }
            if r.agent_reconnect_timeout > MAX_AGENT_RECONNECT_TIMEOUT {
                return invalid(
                    "hypervisor.remote.agent_reconnect_timeout",
                    &r.agent_reconnect_timeout,
                    "expected 0 (no redial) to 3600 (seconds)",
                );
            }
            if self.agent.kata.debug_console_enabled {
                return invalid(
                    "agent.kata.debug_console_enabled",
                    &true,
                    "not available with [hypervisor.remote]: the peer pods VM's agent is reached through the adaptor, which forwards only the agent and stdio ports",
                );
            }
            if !self.runtime.static_sandbox_resource_mgmt {
                return invalid(
                    "runtime.static_sandbox_resource_mgmt",
                    &false,
                    "must be true with [hypervisor.remote]: a remote (peer pods) VM is sized once and cannot be hot-plugged",
                );
            }
        }
        if !q.seccompsandbox.is_empty() && !q.seccompsandbox.starts_with("on") {
            return invalid(
                "hypervisor.qemu.seccompsandbox",
                &q.seccompsandbox,
                "expected a QEMU -sandbox value starting with \"on\" (e.g. \"on,obsolete=deny\"), or \"\" to turn it off",
            );
        }
        Ok(())
    }

    /// Checks that the binaries and guest image the configuration names exist.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if self.hypervisor.remote.is_some() {
            // Nothing of the VM runs on this host.
            return Ok(());
        }
        let q = &self.hypervisor.qemu;
        let root = q.root()?;
        let root_file = match &root {
            RootChoice::Image(path) => ("hypervisor.qemu.image", path),
            RootChoice::Initrd(path) => ("hypervisor.qemu.initrd", path),
        };
        let mut files = vec![
            ("hypervisor.qemu.path", &q.path),
            ("hypervisor.qemu.kernel", &q.kernel),
            root_file,
            ("hypervisor.qemu.virtio_fs_daemon", &q.virtio_fs_daemon),
        ];
        if q.vsock != "vhost" {
            files.push(("hypervisor.qemu.vsock_daemon", &q.vsock_daemon));
        }
        if !q.firmware.as_os_str().is_empty() {
            files.push(("hypervisor.qemu.firmware", &q.firmware));
        }
        for (key, path) in files {
            if !path.is_file() {
                return Err(ConfigError::MissingFile {
                    key,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }

    /// How long to wait for the agent.
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_secs(self.agent.kata.dial_timeout)
    }

    /// How often the running agent is probed, and after how many misses it is lost.
    pub fn health_check(&self) -> (Duration, u32) {
        (
            Duration::from_secs(self.agent.kata.health_check_interval),
            self.agent.kata.health_check_failures,
        )
    }

    /// The largest guest the configuration allows on `host`: (vCPUs, MiB). A 0 ceiling
    /// means the host's size; boot sizes above a ceiling raise it (the operator's choice).
    pub fn ceilings(&self, host: HostLimits) -> (u32, u32) {
        let q = &self.hypervisor.qemu;
        let vcpus = match q.default_maxvcpus {
            0 => host.cpus,
            n => n,
        };
        let memory = match q.default_maxmemory {
            0 => host.memory_mib,
            n => n,
        };
        (vcpus.max(q.default_vcpus), memory.max(q.default_memory))
    }

    /// The VM for a sandbox: sizes resolved against `host`, sockets under `run_dir`,
    /// `shared_dir` exported through virtio-fs. Reads the root image's size.
    pub fn vm_config(
        &self,
        id: &str,
        run_dir: PathBuf,
        shared_dir: PathBuf,
        host: HostLimits,
    ) -> Result<VmConfig, ConfigError> {
        let q = &self.hypervisor.qemu;
        let (max_vcpus, max_memory_mib) = self.ceilings(host);
        // Kata's debug kernel parameter wins over the default `quiet` (it comes later);
        // the configured parameters come after it and win over both.
        let mut kernel_params: Vec<String> = q
            .enable_debug
            .then(|| "debug".to_owned())
            .into_iter()
            .chain(q.kernel_params.split_whitespace().map(str::to_owned))
            .collect();
        if self.agent.kata.enable_debug {
            kernel_params.push("agent.log=debug".into());
        }
        if self.agent.kata.debug_console_enabled {
            kernel_params.push("agent.debug_console".into());
            kernel_params.push(format!(
                "agent.debug_console_vport={}",
                kata_proto::DEBUG_CONSOLE_VSOCK_PORT
            ));
        }
        let cache = if q.virtio_fs_cache == "none" {
            "never".to_owned()
        } else {
            q.virtio_fs_cache.clone()
        };
        let root = match q.root()? {
            RootChoice::Image(path) => GuestRoot::image(path).map_err(ConfigError::Image)?,
            RootChoice::Initrd(path) => GuestRoot::Initrd(path),
        };
        Ok(VmConfig {
            id: id.to_owned(),
            qemu_path: q.path.clone(),
            firmware: Some(q.firmware.clone()).filter(|f| !f.as_os_str().is_empty()),
            kernel: q.kernel.clone(),
            root,
            kernel_params,
            memory_mib: q.default_memory,
            memory_slots: q.memory_slots,
            max_memory_mib,
            vcpus: q.default_vcpus,
            max_vcpus,
            tcg_tb_size_mib: q.tcg_tb_size,
            accel: q.accel.parse().map_err(|e: kata_hypervisor::ConfigError| {
                ConfigError::Invalid {
                    key: "hypervisor.qemu.accel",
                    value: q.accel.clone(),
                    reason: e.to_string(),
                }
            })?,
            vsock: q.vsock.parse().map_err(|e: kata_hypervisor::ConfigError| {
                ConfigError::Invalid {
                    key: "hypervisor.qemu.vsock",
                    value: q.vsock.clone(),
                    reason: e.to_string(),
                }
            })?,
            vsock_daemon: q.vsock_daemon.clone(),
            shared_fs: Some(SharedFsConfig {
                daemon: q.virtio_fs_daemon.clone(),
                shared_dir,
                cache,
                extra_args: q.virtio_fs_extra_args.clone(),
            }),
            net: Vec::new(),
            run_dir,
            start_timeout: Duration::from_secs(30),
            seccomp_sandbox: q.seccompsandbox.clone(),
            placement: Default::default(),
        })
    }
}

/// The first virtiofsd argument that would turn off its namespace sandbox or seccomp
/// filter (`--sandbox none|chroot`, `--seccomp none|log`, in `--x=v` or `--x v` form), or
/// an option of the C daemon's that does (`-o sandbox=...`).
fn weakening_virtiofsd_arg(args: &[String]) -> Option<String> {
    let weak = |flag: &str, value: &str| match flag {
        "--sandbox" => value != "namespace",
        "--seccomp" => value != "kill" && value != "trap",
        _ => false,
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if let Some((flag, value)) = arg.split_once('=') {
            if weak(flag, value) {
                return Some(arg.clone());
            }
        } else if arg == "--sandbox" || arg == "--seccomp" {
            let value = args.get(i + 1).map(String::as_str).unwrap_or("");
            if weak(arg, value) {
                return Some(format!("{arg} {value}"));
            }
            i += 1;
        } else if arg == "-o" {
            if let Some(opt) = args
                .get(i + 1)
                .filter(|o| o.contains("sandbox") || o.contains("seccomp"))
            {
                return Some(format!("-o {opt}"));
            }
            i += 1;
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configuration_is_valid_and_matches_the_defaults() {
        let shipped = Config::parse(include_str!("../../configuration.toml")).unwrap();
        shipped.validate().unwrap();
        let d = Config::default();
        let (s, d) = (&shipped.hypervisor.qemu, &d.hypervisor.qemu);
        assert_eq!(s.kernel, d.kernel);
        assert_eq!(s.root().unwrap(), d.root().unwrap());
        assert_eq!(s.root().unwrap(), RootChoice::Image(DEFAULT_IMAGE.into()));
        assert_eq!(s.virtio_fs_daemon, d.virtio_fs_daemon);
        assert_eq!(s.accel, "auto");
        assert_eq!(s.default_memory, 2048);
        // The guest applies seccomp unless told not to.
        assert!(!shipped.runtime.disable_guest_seccomp);
        assert!(!Config::default().runtime.disable_guest_seccomp);
        let off = Config::parse("[runtime]\ndisable_guest_seccomp = true\n").unwrap();
        assert!(off.runtime.disable_guest_seccomp);
    }

    #[test]
    fn shipped_remote_configuration_is_valid_with_kata_values() {
        let shipped = Config::parse(include_str!("../../configuration-remote.toml")).unwrap();
        shipped.validate().unwrap();
        shipped.check_files().unwrap();
        let r = shipped.hypervisor.remote.as_ref().unwrap();
        let d = Remote::default();
        assert_eq!(r.remote_hypervisor_socket, d.remote_hypervisor_socket);
        assert_eq!(r.remote_hypervisor_timeout, 600);
        assert_eq!(r.agent_reconnect_timeout, d.agent_reconnect_timeout);
        assert_eq!(r.enable_annotations, d.enable_annotations);
        assert!(shipped.runtime.static_sandbox_resource_mgmt);
    }

    #[test]
    fn empty_file_gives_kata_defaults() {
        let c = Config::parse("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.hypervisor.qemu.default_memory, 2048);
        assert_eq!(c.hypervisor.qemu.default_vcpus, 1);
        assert_eq!(c.hypervisor.qemu.memory_slots, 10);
        assert_eq!(c.agent.kata.dial_timeout, 60);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[hypervisor.qemu]\ndefault_memroy = 4096\n").unwrap_err();
        assert!(err.contains("default_memroy"), "{err}");
        let err = Config::parse("[runtimee]\n").unwrap_err();
        assert!(err.contains("runtimee"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[hypervisor.qemu]\ndefault_vcpus = \"two\"\n").unwrap_err();
        assert!(err.contains("default_vcpus"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let cases = [
            (
                "[hypervisor.qemu]\naccel = \"xen\"",
                "hypervisor.qemu.accel",
                "xen",
            ),
            (
                "[hypervisor.qemu]\ndefault_memory = 64",
                "default_memory",
                "64",
            ),
            (
                "[hypervisor.qemu]\ndefault_memory = 4096\ndefault_maxmemory = 1024",
                "default_maxmemory",
                "1024",
            ),
            (
                "[hypervisor.qemu]\nvirtio_fs_cache = \"sometimes\"",
                "virtio_fs_cache",
                "sometimes",
            ),
            (
                "[hypervisor.qemu]\nshared_fs = \"virtio-9p\"",
                "shared_fs",
                "virtio-9p",
            ),
            ("[agent.kata]\ndial_timeout = 0", "dial_timeout", "0"),
            (
                "[hypervisor.qemu]\ntcg_tb_size = 0",
                "hypervisor.qemu.tcg_tb_size",
                "0",
            ),
            (
                "[hypervisor.qemu]\ntcg_tb_size = 4096",
                "hypervisor.qemu.tcg_tb_size",
                "4096",
            ),
            (
                "[agent.kata]\nhealth_check_interval = 0",
                "health_check_interval",
                "0",
            ),
            (
                "[agent.kata]\nhealth_check_failures = 0",
                "health_check_failures",
                "0",
            ),
            (
                "[hypervisor.qemu]\nvirtio_fs_extra_args = [\"--sandbox\", \"none\"]",
                "virtio_fs_extra_args",
                "--sandbox none",
            ),
            (
                "[hypervisor.qemu]\nvirtio_fs_extra_args = [\"--seccomp=none\"]",
                "virtio_fs_extra_args",
                "--seccomp=none",
            ),
            (
                "[hypervisor.qemu]\nseccompsandbox = \"off\"",
                "seccompsandbox",
                "off",
            ),
        ];
        for (text, key, value) in cases {
            let err = Config::parse(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
    }

    #[test]
    fn missing_kernel_is_named() {
        let mut c = Config::default();
        c.hypervisor.qemu.path = "/bin/sh".into();
        c.hypervisor.qemu.kernel = "/nonexistent/vmlinuz".into();
        let err = c.check_files().unwrap_err().to_string();
        assert!(
            err.contains("hypervisor.qemu.kernel") && err.contains("/nonexistent/vmlinuz"),
            "{err}"
        );
    }

    #[test]
    fn image_or_initrd() {
        let parse = |t: &str| Config::parse(&format!("[hypervisor.qemu]\n{t}")).unwrap();
        let c = parse("initrd = \"/a/initrd.img\"");
        c.validate().unwrap();
        assert_eq!(
            c.hypervisor.qemu.root().unwrap(),
            RootChoice::Initrd("/a/initrd.img".into())
        );
        let c = parse("image = \"\"\ninitrd = \"/a/initrd.img\"");
        assert_eq!(
            c.hypervisor.qemu.root().unwrap(),
            RootChoice::Initrd("/a/initrd.img".into())
        );
        let c = parse("image = \"/a/root.img\"");
        assert_eq!(
            c.hypervisor.qemu.root().unwrap(),
            RootChoice::Image("/a/root.img".into())
        );
        let err = parse("image = \"/a/root.img\"\ninitrd = \"/a/initrd.img\"")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/a/root.img")
                && err.contains("/a/initrd.img")
                && err.contains("not both"),
            "{err}"
        );
    }

    #[test]
    fn image_size_is_checked_when_the_vm_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("root.img");
        std::fs::write(&image, b"not padded").unwrap();
        let c = Config::parse(&format!("[hypervisor.qemu]\nimage = {image:?}")).unwrap();
        let host = HostLimits {
            cpus: 2,
            memory_mib: 4096,
        };
        let err = c
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            text.contains("hypervisor.qemu.image") && text.contains("root.img"),
            "{text}"
        );
        std::fs::File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(kata_hypervisor::config::IMAGE_ALIGN)
            .unwrap();
        let vm = c
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap();
        assert_eq!(
            vm.root,
            GuestRoot::Image {
                path: image,
                size: kata_hypervisor::config::IMAGE_ALIGN
            }
        );
    }

    #[test]
    fn zero_maxima_follow_the_host() {
        let text = "[hypervisor.qemu]\ndefault_vcpus = 2\ninitrd = \"/x/initrd.img\"";
        let c = Config::parse(text).unwrap();
        let host = HostLimits {
            cpus: 8,
            memory_mib: 16384,
        };
        let vm = c
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap();
        assert_eq!((vm.vcpus, vm.max_vcpus), (2, 8));
        assert_eq!((vm.memory_mib, vm.max_memory_mib), (2048, 16384));
        assert_eq!(vm.shared_fs.unwrap().shared_dir, PathBuf::from("/run/y"));
        assert_eq!(vm.firmware, Some(PathBuf::from(DEFAULT_FIRMWARE)));
        assert_eq!(vm.tcg_tb_size_mib, 32);
        let c = Config::parse(&format!("{text}\nfirmware = \"\"")).unwrap();
        let vm = c
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap();
        assert_eq!(vm.firmware, None, "empty: QEMU's default");
    }

    #[test]
    fn virtiofsd_args_that_keep_the_sandbox_pass() {
        let ok = |a: &[&str]| {
            weakening_virtiofsd_arg(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(ok(&["--sandbox", "namespace", "--seccomp=kill"]), None);
        assert_eq!(ok(&["--log-level", "debug"]), None);
        assert_eq!(
            ok(&["--sandbox=chroot"]).as_deref(),
            Some("--sandbox=chroot")
        );
        assert_eq!(ok(&["--seccomp", "log"]).as_deref(), Some("--seccomp log"));
        assert_eq!(
            ok(&["-o", "sandbox=none"]).as_deref(),
            Some("-o sandbox=none")
        );
    }

    #[test]
    fn ceilings_never_exceed_the_configuration() {
        let host = HostLimits {
            cpus: 2,
            memory_mib: 24000,
        };
        let c = Config::parse("").unwrap();
        assert_eq!(c.ceilings(host), (2, 24000), "0 = the host's size");
        // An initrd: vm_config reads the size of an image, which is not installed here.
        let c = Config::parse(
            "[hypervisor.qemu]\ndefault_maxvcpus = 1\ndefault_maxmemory = 4096\ninitrd = \"/x/initrd.img\"",
        )
        .unwrap();
        assert_eq!(c.ceilings(host), (1, 4096));
        let vm = c
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap();
        assert_eq!((vm.max_vcpus, vm.max_memory_mib), (1, 4096));
        assert_eq!(vm.seccomp_sandbox, DEFAULT_SECCOMP_SANDBOX);
    }

    #[test]
    fn debug_switches_reach_the_guest_command_line() {
        let host = HostLimits {
            cpus: 2,
            memory_mib: 4096,
        };
        // An initrd: vm_config reads the size of an image, which is not installed here.
        let vm = |qemu: &str, rest: &str| {
            Config::parse(&format!(
                "[hypervisor.qemu]\ninitrd = \"/x/initrd.img\"\n{qemu}\n{rest}"
            ))
            .unwrap()
            .vm_config("s1", "/run/x".into(), "/run/y".into(), host)
            .unwrap()
            .kernel_params
        };
        assert!(vm("", "").is_empty());
        assert_eq!(
            vm("enable_debug = true\nkernel_params = \"loglevel=3\"", ""),
            ["debug", "loglevel=3"]
        );
        assert_eq!(
            vm("", "[agent.kata]\nenable_debug = true"),
            ["agent.log=debug"]
        );
        assert_eq!(
            vm("", "[agent.kata]\ndebug_console_enabled = true"),
            ["agent.debug_console", "agent.debug_console_vport=1027"]
        );
        assert!(!Config::parse("").unwrap().agent.kata.debug_console_enabled);
        let c = Config::parse("[runtime]\nenable_debug = true").unwrap();
        assert!(c.runtime.enable_debug);
    }

    #[test]
    fn a_remote_configuration_is_one_backend_and_statically_sized() {
        let c = Config::parse(
            "[hypervisor.remote]\nremote_hypervisor_socket = \"/run/x.sock\"\n[runtime]\nstatic_sandbox_resource_mgmt = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        c.check_files().unwrap();
        let mut console = c.clone();
        console.agent.kata.debug_console_enabled = true;
        let e = console.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("agent.kata.debug_console_enabled = \"true\""),
            "{e}"
        );
        let r = c.hypervisor.remote.clone().unwrap();
        assert_eq!(r.remote_hypervisor_socket, PathBuf::from("/run/x.sock"));
        assert_eq!(r.remote_hypervisor_timeout, 600);
        assert_eq!(r.agent_reconnect_timeout, 60);
        assert!(r.enable_annotations.contains(&"machine_type".to_owned()));
        let mut long = c.clone();
        if let Some(r) = long.hypervisor.remote.as_mut() {
            r.agent_reconnect_timeout = 3601;
        }
        let e = long.validate().unwrap_err().to_string();
        assert!(
            e.contains("agent_reconnect_timeout") && e.contains("3601") && e.contains("3600"),
            "{e}"
        );
        let e =
            Config::parse("[hypervisor.remote]\n[hypervisor.qemu]\naccel = \"tcg\"\n").unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
        let e = Config::parse("[hypervisor.remote]\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("static_sandbox_resource_mgmt"), "{e}");
    }

    #[test]
    fn load_reports_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("configuration.toml");
        std::fs::write(&path, "[hypervisor.qemu]\nbogus = 1\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("configuration.toml") && err.contains("bogus"),
            "{err}"
        );
        let err = Config::load(&dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }
}
