//! `kata-ctl env`: what a bug report needs — versions, paths, the configuration in effect
//! and the host facts the runtime depends on.
//!
//! The configuration is the shim's (`kata_shim::config`): the same file lookup
//! (`--config`, `KATA_CONF_FILE`, `/etc/kata-containers/configuration.toml`), validation
//! and sizing against this host, so the values shown are the ones a new sandbox gets. A
//! configuration that does not load is reported with its error; the rest of the report
//! is still printed. Output is TOML (sections like Kata's `kata-runtime env`) or JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use kata_shim::config::{Config, HostLimits, RootChoice};
use kata_shim::report::chain;
use serde::Serialize;

use crate::check::{evaluate, Facts};
use crate::host::HostRoot;

/// The shim's binary name.
const SHIM_BINARY: &str = "containerd-shim-kata-v2";

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct EnvReport {
    pub meta: Meta,
    pub runtime: RuntimeInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<HypervisorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    pub host: HostInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// Version of the report's layout.
    pub format_version: u32,
    pub kata_ctl_version: &'static str,
}

/// An executable: where, whether it is there, and what `--version` says.
#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    pub path: PathBuf,
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A file of the guest image.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub path: PathBuf,
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    pub shim: Binary,
    pub config_path: PathBuf,
    /// Where the path came from: `--config`, `KATA_CONF_FILE` or `default`.
    pub config_source: &'static str,
    /// Why the configuration does not load (then the configuration sections are absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_debug: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_cgroup_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_sandbox_resource_mgmt: Option<bool>,
}

/// `[hypervisor.qemu]` in effect, sizes resolved against this host.
#[derive(Debug, Clone, Serialize)]
pub struct HypervisorInfo {
    /// QEMU.
    pub binary: Binary,
    /// As configured: `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// What `auto` resolves to here (`kvm` or `tcg`).
    pub accel_auto: String,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_mib: u32,
    pub max_memory_mib: u32,
    pub memory_slots: u32,
    pub kernel_params: String,
    pub shared_fs: String,
    pub virtio_fs_cache: String,
    pub virtio_fs_daemon: Binary,
    pub vsock: String,
    pub vsock_daemon: Binary,
    pub enable_debug: bool,
    pub enable_annotations: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    pub kernel: FileInfo,
    /// The root filesystem image (virtio-pmem), when the configuration boots from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<FileInfo>,
    /// The initrd, when the configuration boots from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<FileInfo>,
    /// `-bios`, unless QEMU's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FileInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub dial_timeout_s: u64,
    pub enable_debug: bool,
    pub debug_console_enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub kernel: String,
    pub os: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// `v2`, `hybrid` (v1 controllers, an empty v2 mount) or `v1`.
    pub cgroups: &'static str,
    /// `usable`, or why `/dev/kvm` is not.
    pub kvm: String,
    pub vhost_vsock: bool,
    pub running_nested: bool,
    /// `kata-ctl check` passes.
    pub vm_container_capable: bool,
    /// The checks that fail, by id.
    pub failed_checks: Vec<String>,
}

impl EnvReport {
    /// Gathers the report; `config` overrides the configuration file.
    pub fn gather(config: Option<&Path>, host: &HostRoot) -> EnvReport {
        let (config_path, config_source) = match config {
            Some(p) => (p.to_path_buf(), "--config"),
            None if std::env::var_os(kata_shim::config::CONFIG_ENV).is_some() => {
                (Config::path(None), "KATA_CONF_FILE")
            }
            None => (Config::path(None), "default"),
        };
        let loaded = Config::load(&config_path);
        let (host_info, accel_auto) = host_info(host);
        let mut runtime = RuntimeInfo {
            shim: binary(&find_shim(), &["--version"]),
            config_path: config_path.clone(),
            config_source,
            config_error: None,
            enable_debug: None,
            sandbox_cgroup_only: None,
            static_sandbox_resource_mgmt: None,
        };
        let config = match loaded {
            Ok(c) => c,
            Err(e) => {
                runtime.config_error = Some(chain(&e));
                return EnvReport {
                    meta: meta(),
                    runtime,
                    hypervisor: None,
                    guest: None,
                    agent: None,
                    host: host_info,
                };
            }
        };
        runtime.enable_debug = Some(config.runtime.enable_debug);
        runtime.sandbox_cgroup_only = Some(config.runtime.sandbox_cgroup_only);
        runtime.static_sandbox_resource_mgmt = Some(config.runtime.static_sandbox_resource_mgmt);
        let q = &config.hypervisor.qemu;
        let limits = HostLimits::detect();
        // Sizes as a sandbox would get them (0 = host CPUs / memory resolved here). They do
        // not depend on the root image, whose presence `guest` reports: sized with an
        // initrd so that a guest not installed yet is not a configuration error.
        let mut sizing = config.clone();
        if let Ok(RootChoice::Image(_)) = q.root() {
            sizing.hypervisor.qemu.image = None;
            sizing.hypervisor.qemu.initrd = Some(PathBuf::from("/dev/null"));
        }
        let sized = sizing.vm_config(
            "env",
            PathBuf::from("/run/kata/env/vm"),
            PathBuf::from("/run/kata-containers/shared/sandboxes/env"),
            limits,
        );
        let (vcpus, max_vcpus, memory_mib, max_memory_mib) = match &sized {
            Ok(vm) => (vm.vcpus, vm.max_vcpus, vm.memory_mib, vm.max_memory_mib),
            Err(_) => (
                q.default_vcpus,
                q.default_maxvcpus,
                q.default_memory,
                q.default_maxmemory,
            ),
        };
        if let Err(e) = &sized {
            runtime.config_error = Some(chain(e));
        }
        EnvReport {
            meta: meta(),
            runtime,
            hypervisor: Some(HypervisorInfo {
                binary: binary(&q.path, &["--version"]),
                accel: q.accel.clone(),
                accel_auto,
                vcpus,
                max_vcpus,
                memory_mib,
                max_memory_mib,
                memory_slots: q.memory_slots,
                kernel_params: q.kernel_params.clone(),
                shared_fs: q.shared_fs.clone(),
                virtio_fs_cache: q.virtio_fs_cache.clone(),
                virtio_fs_daemon: binary(&q.virtio_fs_daemon, &["--version"]),
                vsock: q.vsock.clone(),
                vsock_daemon: binary(&q.vsock_daemon, &["--version"]),
                enable_debug: q.enable_debug,
                enable_annotations: q.enable_annotations.clone(),
            }),
            guest: Some(GuestInfo {
                kernel: file_info(&q.kernel),
                // Both set is a configuration error `load` already refused.
                image: match q.root() {
                    Ok(RootChoice::Image(path)) => Some(file_info(&path)),
                    _ => None,
                },
                initrd: match q.root() {
                    Ok(RootChoice::Initrd(path)) => Some(file_info(&path)),
                    _ => None,
                },
                firmware: Some(&q.firmware)
                    .filter(|f| !f.as_os_str().is_empty())
                    .map(|f| file_info(f)),
            }),
            agent: Some(AgentInfo {
                dial_timeout_s: config.agent.kata.dial_timeout,
                enable_debug: config.agent.kata.enable_debug,
                debug_console_enabled: config.agent.kata.debug_console_enabled,
            }),
            host: host_info,
        }
    }

    /// The report as TOML text.
    pub fn render(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render the report: {e}\n"))
    }
}

fn meta() -> Meta {
    Meta {
        format_version: 1,
        kata_ctl_version: env!("CARGO_PKG_VERSION"),
    }
}

/// Host facts, and what `accel = "auto"` resolves to.
fn host_info(host: &HostRoot) -> (HostInfo, String) {
    let limits = HostLimits::detect();
    let (cpu_vendor, cpu_model, kvm, running_nested, capable, failed, accel_auto) =
        match Facts::gather(host) {
            Ok(facts) => {
                let report = evaluate(&facts);
                (
                    facts.cpu.vendor_id.clone(),
                    facts.cpu.model.clone(),
                    match facts.kvm.usable() {
                        Ok(()) => "usable".to_owned(),
                        Err(e) => chain(&e),
                    },
                    facts.cpu.running_nested(),
                    report.capable,
                    report.failed().iter().map(|s| (*s).to_owned()).collect(),
                    report.accel_auto,
                )
            }
            Err(e) => {
                let reason = chain(&e);
                (
                    reason.clone(),
                    String::new(),
                    String::new(),
                    false,
                    false,
                    vec![reason],
                    "tcg".to_owned(),
                )
            }
        };
    let info = HostInfo {
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        os: os_release(),
        cpu_vendor,
        cpu_model,
        cpus: limits.cpus,
        memory_mib: limits.memory_mib,
        cgroups: cgroup_layout(Path::new("/sys/fs/cgroup")),
        kvm,
        vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        running_nested,
        vm_container_capable: capable,
        failed_checks: failed,
    };
    (info, accel_auto)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `PRETTY_NAME` of /etc/os-release.
fn os_release() -> String {
    parse_os_release(&std::fs::read_to_string("/etc/os-release").unwrap_or_default())
}

fn parse_os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// The cgroup layout under `root` (normally /sys/fs/cgroup).
fn cgroup_layout(root: &Path) -> &'static str {
    if root.join("cgroup.controllers").exists() {
        "v2"
    } else if root.join("unified").is_dir() {
        "hybrid"
    } else {
        "v1"
    }
}

/// The shim next to this program, else the first on PATH, else its install location.
fn find_shim() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(SHIM_BINARY)));
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(SHIM_BINARY))
            .find(|p| p.is_file())
    });
    beside
        .filter(|p| p.is_file())
        .or(on_path)
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin").join(SHIM_BINARY))
}

/// A binary's path, presence and the first line of its version output.
fn binary(path: &Path, version_args: &[&str]) -> Binary {
    let present = path.is_file();
    let version = present
        .then(|| Command::new(path).args(version_args).output().ok())
        .flatten()
        .filter(|out| out.status.success())
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().next().map(|l| l.trim().to_owned())
        });
    Binary {
        path: path.to_path_buf(),
        present,
        version,
    }
}

fn file_info(path: &Path) -> FileInfo {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file());
    FileInfo {
        path: path.to_path_buf(),
        present: meta.is_some(),
        size_bytes: meta.map(|m| m.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(parse_os_release(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(parse_os_release(""), "");
    }

    #[test]
    fn cgroup_layouts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_layout(dir.path()), "v1");
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        assert_eq!(cgroup_layout(dir.path()), "hybrid");
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        assert_eq!(cgroup_layout(dir.path()), "v2");
    }

    #[test]
    fn a_configuration_that_does_not_load_is_reported_and_the_rest_still_is() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("configuration.toml");
        std::fs::write(&bad, "[hypervisor.qemu]\nno_such_key = 1\n").unwrap();
        let report = EnvReport::gather(Some(&bad), &HostRoot::real());
        let error = report.runtime.config_error.as_deref().unwrap();
        assert!(error.contains("no_such_key"), "{error}");
        assert!(report.hypervisor.is_none());
        let text = report.render();
        assert!(text.contains("[host]"), "{text}");
        assert!(text.contains("config_source = \"--config\""), "{text}");
    }

    #[test]
    fn the_configuration_in_effect_is_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("configuration.toml");
        std::fs::write(
            &path,
            "[hypervisor.qemu]\ndefault_memory = 512\ndefault_maxvcpus = 0\naccel = \"tcg\"\n",
        )
        .unwrap();
        let report = EnvReport::gather(Some(&path), &HostRoot::real());
        assert_eq!(report.runtime.config_error, None);
        let hv = report.hypervisor.as_ref().unwrap();
        assert_eq!(hv.memory_mib, 512);
        assert_eq!(hv.accel, "tcg");
        assert_eq!(
            hv.max_vcpus,
            HostLimits::detect().cpus.max(1),
            "0 = host CPUs"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["hypervisor"]["memory_mib"], 512);
        let text = report.render();
        assert!(text.contains("[hypervisor.binary]"), "{text}");
    }
}
