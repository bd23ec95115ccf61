//! Where a sandbox's host processes run: its host cgroups ([`super::cgroups`], Kata's
//! `sandbox_cgroup_only`) and QEMU's OOM priority, from the sandbox container's spec.

use std::path::PathBuf;

use kata_hypervisor::{Placement, Vm};

use super::cgroups::{self, Cgroup, CgroupError, Mode, OVERHEAD_PARENT};
use super::systemd::{self, Manager, Scope};

/// What the sandbox container's spec says about placement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPlacement {
    /// `linux.cgroupsPath` (cgroupfs path or systemd `slice:prefix:name`).
    pub cgroups_path: Option<String>,
    /// `process.oomScoreAdj` (the pod's QoS class): QEMU gets it where the host allows.
    pub oom_score_adj: Option<i32>,
}

/// The host cgroups a sandbox made; removed at teardown.
#[derive(Debug)]
pub struct SandboxCgroups {
    pub mode: Mode,
    /// The pod's: `linux.cgroupsPath`.
    pub sandbox: Cgroup,
    /// `/kata_overhead/<sandbox>` when only vCPU threads go in the sandbox's.
    pub overhead: Option<Cgroup>,
    /// The systemd scope, with the systemd driver.
    pub scope: Option<Scope>,
    /// OOM kills in the sandbox cgroup before the VM started.
    pub oom_kills_at_start: u64,
}

impl SandboxCgroups {
    /// Creates the sandbox's cgroups for `path` and moves this shim where its mode says.
    pub async fn setup(key: &str, path: &str, mode: Mode) -> Result<Self, CgroupError> {
        let scope = if systemd::is_systemd_path(path) {
            let scope = Scope::parse(path)?;
            systemd::Dbus
                .start_scope(&scope, std::process::id())
                .await?;
            Some(scope)
        } else {
            None
        };
        let cgroup_path = scope
            .as_ref()
            .map(|s| s.cgroup_path.clone())
            .unwrap_or_else(|| path.to_owned());
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let sandbox = cgroups::resolve_on_host(&cgroup_path)?;
            sandbox.create()?;
            let overhead = match mode {
                Mode::SandboxOnly => {
                    sandbox.add_process(std::process::id())?;
                    None
                }
                Mode::VcpusOnly => {
                    let overhead = cgroups::resolve_on_host(&format!("{OVERHEAD_PARENT}/{key}"))?;
                    overhead.create()?;
                    overhead.add_process(std::process::id())?;
                    Some(overhead)
                }
            };
            let oom_kills_at_start = sandbox.oom_kills().unwrap_or(0);
            Ok(Self {
                mode,
                sandbox,
                overhead,
                scope,
                oom_kills_at_start,
            })
        })
        .await
        .expect("cgroup setup task panicked")
    }

    /// The children's placement: all in the sandbox cgroup, or in the overhead one.
    pub fn placement(&self, oom_score_adj: Option<i32>) -> Placement {
        let target = self.overhead.as_ref().unwrap_or(&self.sandbox);
        Placement {
            qemu_cgroup_procs: target.procs_files(),
            daemon_cgroup_procs: target.procs_files(),
            qemu_oom_score_adj: oom_score_adj,
        }
    }

    /// With only vCPUs in the sandbox cgroup: moves QEMU's vCPU threads there.
    pub async fn place_vcpus(&self, vm: &Vm) -> Result<(), String> {
        if self.mode != Mode::VcpusOnly {
            return Ok(());
        }
        let tids = vm
            .qmp()
            .vcpu_thread_ids()
            .await
            .map_err(|e| crate::report::chain(&e))?;
        let sandbox = self.sandbox.clone();
        let pid = vm.pid();
        tokio::task::spawn_blocking(move || sandbox.add_threads(pid, &tids))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::report::chain(&e))
    }

    /// Whether the host's OOM killer struck in the sandbox cgroup since the VM started,
    /// and the memory limit that applies (the pod's, set on an ancestor by the kubelet).
    pub fn host_oom(&self) -> Option<(String, Option<(PathBuf, u64)>)> {
        let kills = self.sandbox.oom_kills()?;
        (kills > self.oom_kills_at_start)
            .then(|| (self.sandbox.path.clone(), self.sandbox.memory_limit()))
    }

    /// Every directory this sandbox made (for the state record).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.sandbox
            .dirs
            .iter()
            .chain(self.overhead.iter().flat_map(|o| o.dirs.iter()))
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Removes the cgroups (this shim leaves them first) and the systemd scope.
    pub async fn remove(&self) {
        let groups: Vec<Cgroup> = std::iter::once(self.sandbox.clone())
            .chain(self.overhead.clone())
            .collect();
        let left = tokio::task::spawn_blocking(move || {
            groups.iter().flat_map(Cgroup::remove).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if !left.is_empty() {
            tracing::warn!(?left, "sandbox cgroups still busy; not removed");
        }
        if let Some(scope) = &self.scope {
            if let Err(error) = systemd::Dbus.stop_unit(&scope.unit).await {
                tracing::warn!(error = %crate::report::chain(&error), "stopping the sandbox's systemd scope");
            }
        }
    }
}

/// Removes cgroup directories a dead shim's record lists (the `delete` command): leaf
/// directories, retried briefly while killed processes leave.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(error) if tries >= 50 => {
                    tracing::warn!(%error, dir = %dir.display(), "cannot remove cgroup");
                    break;
                }
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
}
