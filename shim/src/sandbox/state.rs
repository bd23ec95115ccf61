//! Where a sandbox lives on the host and the small record that outlives its shim.
//!
//! [`SandboxPaths`] names a sandbox's state directory (`/run/kata/<key>`: the state record
//! and the VM's run directory) and its shared directory (exported to the guest). The
//! [`StateRecord`] lists the host processes, so the `delete` command can clean up after a
//! shim that died ([`super::cleanup`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Parent of the per-sandbox state directories (short: the VM run dir must stay <= 90 bytes).
pub const STATE_ROOT: &str = "/run/kata";
/// Parent of the per-sandbox directories shared with the guest through virtio-fs.
pub const SHARED_ROOT: &str = "/run/kata-containers/shared/sandboxes";

/// The host directories of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    /// `/run/kata/<key>`: state record and the VM's run directory.
    pub state_dir: PathBuf,
    /// `<state_dir>/vm`: sockets of QEMU and its daemons (removed by the VM itself).
    pub vm_run_dir: PathBuf,
    /// `/run/kata-containers/shared/sandboxes/<key>`: exported to the guest.
    pub shared_dir: PathBuf,
}

impl SandboxPaths {
    /// The standard locations for `sandbox_id`.
    pub fn new(sandbox_id: &str) -> Self {
        Self::with_roots(Path::new(STATE_ROOT), Path::new(SHARED_ROOT), sandbox_id)
    }

    /// Locations under other roots (tests).
    pub fn with_roots(state_root: &Path, shared_root: &Path, sandbox_id: &str) -> Self {
        let key = dir_key(sandbox_id);
        let state_dir = state_root.join(&key);
        SandboxPaths {
            vm_run_dir: state_dir.join("vm"),
            state_dir,
            shared_dir: shared_root.join(&key),
        }
    }

    /// The state record's path.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    /// A container's directory in the share.
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.shared_dir.join(container_id)
    }
}

/// A directory name (and VM id) for a sandbox id: the id itself when it is short and
/// plain, else a hash of it.
pub fn dir_key(sandbox_id: &str) -> String {
    let plain = !sandbox_id.is_empty()
        && sandbox_id.len() <= 64
        && !sandbox_id.starts_with('.')
        && sandbox_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if plain {
        sandbox_id.to_owned()
    } else {
        hex::encode(Sha256::digest(sandbox_id.as_bytes()))[..32].to_owned()
    }
}

/// What the `delete` command needs to clean up after a dead shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub sandbox_id: String,
    pub shim_pid: u32,
    pub qemu_pid: u32,
    /// Start time of QEMU (clock ticks since boot, /proc/<pid>/stat field 22), so a
    /// recycled pid is never killed.
    pub qemu_start_time: Option<u64>,
    pub vm_run_dir: PathBuf,
    pub shared_dir: PathBuf,
    /// Host cgroup directories the sandbox created (leaf first).
    #[serde(default)]
    pub cgroup_dirs: Vec<PathBuf>,
    /// For a remote VM (peer pods): where to ask for its deletion.
    #[serde(default)]
    pub remote: Option<RemoteRecord>,
}

/// How to reach the adaptor that owns a remote VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    /// The adaptor's socket.
    pub socket: PathBuf,
    /// The VM's id there (the sandbox id).
    pub id: String,
}

/// A process's start time from /proc/<pid>/stat.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a /proc/<pid>/stat line (the command may contain spaces and parentheses).
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after comm start at field 3; starttime is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Writes `record` to `path` atomically (a temporary file renamed over it).
pub async fn write_record(path: &Path, record: &StateRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    tokio::fs::write(&tmp, json).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Reads a state record (the `delete` command).
pub fn read_record(path: &Path) -> Option<StateRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_ids_are_used_as_is_and_odd_ones_hashed() {
        let cri = "a".repeat(64);
        assert_eq!(dir_key(&cri), cri);
        assert_eq!(dir_key("c1"), "c1");
        let long = "x".repeat(76);
        let k = dir_key(&long);
        assert_eq!(k.len(), 32);
        assert_eq!(k, dir_key(&long), "deterministic");
        assert_eq!(dir_key("a/b").len(), 32);
        assert_eq!(dir_key("..").len(), 32);
    }

    #[test]
    fn vm_run_dir_fits_the_hypervisor_limit() {
        let p = SandboxPaths::new(&"f".repeat(64));
        assert!(
            p.vm_run_dir.as_os_str().len() <= 90,
            "{}",
            p.vm_run_dir.display()
        );
        assert_eq!(
            p.container_dir("c1"),
            PathBuf::from(format!("{SHARED_ROOT}/{}/c1", "f".repeat(64)))
        );
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert!(proc_start_time(std::process::id()).is_some());
    }

    #[test]
    fn state_record_round_trips() {
        let r = StateRecord {
            sandbox_id: "s".into(),
            shim_pid: 1,
            qemu_pid: 2,
            qemu_start_time: Some(3),
            vm_run_dir: "/run/kata/s/vm".into(),
            shared_dir: "/run/kata-containers/shared/sandboxes/s".into(),
            cgroup_dirs: vec!["/sys/fs/cgroup/memory/kata-test/s".into()],
            remote: Some(RemoteRecord {
                socket: "/run/peerpod/hypervisor.sock".into(),
                id: "s".into(),
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(read_record(&path), Some(r));
    }
}
