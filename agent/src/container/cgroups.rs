//! A container's cgroup v2 directory (`/sys/fs/cgroup/kata/<id>`): made with the spec's
//! limits and device program before any process joins, read for pids and OOM kills,
//! frozen, killed and removed. File contents come from [`crate::cgroup`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{cg_err, devices, send_signal, ContainerError, Result};
use crate::cgroup;

/// Controllers enabled for containers.
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// Creates the cgroup `<root>/<id>` with the spec's limits and its device program.
pub fn create(root: &Path, id: &str, resources: Option<&serde_json::Value>) -> Result<PathBuf> {
    let files = match resources {
        Some(r) => cgroup::resource_files(r.to_string().as_bytes())?,
        None => Vec::new(),
    };
    let device_rules = devices::rules(resources)?;
    let top = root.parent().unwrap_or(Path::new("/"));
    enable_controllers(top);
    std::fs::create_dir_all(root).map_err(cg_err(root))?;
    enable_controllers(root);
    let dir = root.join(id);
    if dir.exists() {
        // A leftover of a container that failed half way: it must be empty.
        if let Err(e) = std::fs::remove_dir(&dir) {
            return Err(ContainerError::Cgroup {
                path: dir,
                source: e,
            });
        }
    }
    std::fs::create_dir(&dir).map_err(cg_err(&dir))?;
    for (name, value) in files {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, &value) {
            let _ = std::fs::remove_dir(&dir);
            return Err(ContainerError::Cgroup { path, source: e });
        }
    }
    // Before any process joins: cgroup v2 device rules are a BPF program.
    if let Err(e) = devices::attach(&dir, &device_rules) {
        let _ = std::fs::remove_dir(&dir);
        return Err(e.into());
    }
    Ok(dir)
}

/// Enables the container controllers for the children of `dir` (each on its own, so one
/// missing controller does not block the others).
pub fn enable_controllers(dir: &Path) {
    let file = dir.join("cgroup.subtree_control");
    for c in CONTROLLERS {
        if let Err(e) = std::fs::write(&file, format!("+{c}")) {
            tracing::debug!(controller = c, dir = %dir.display(), error = %e, "enable controller");
        }
    }
}

pub async fn read_procs(cgroup: &Path) -> Vec<u32> {
    tokio::fs::read_to_string(cgroup.join("cgroup.procs"))
        .await
        .map(|t| cgroup::parse_procs(&t))
        .unwrap_or_default()
}

pub async fn oom_kills(cgroup: &Path) -> u64 {
    let text = tokio::fs::read_to_string(cgroup.join("memory.events"))
        .await
        .unwrap_or_default();
    cgroup::parse_flat_keyed(&text)
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

/// SIGKILLs everything in the cgroup (`cgroup.kill`, or pid by pid on old kernels).
pub async fn kill_cgroup(cgroup: &Path) {
    if tokio::fs::write(cgroup.join("cgroup.kill"), "1")
        .await
        .is_ok()
    {
        return;
    }
    // A frozen cgroup must be thawed for the kill to be acted on.
    let _ = tokio::fs::write(cgroup.join("cgroup.freeze"), "0").await;
    for pid in read_procs(cgroup).await {
        let _ = send_signal(pid as i32, libc::SIGKILL);
    }
}

/// Removes a cgroup and the child cgroups the container made, deepest first, retrying
/// while the kernel still counts dying tasks.
pub async fn remove_cgroup(cgroup: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(mut rd) = tokio::fs::read_dir(&d).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if e.file_type().await.map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    // Children after their parent in `dirs`: remove in reverse.
    for dir in dirs.iter().rev() {
        let mut removed = false;
        for _ in 0..100 {
            match tokio::fs::remove_dir(dir).await {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    removed = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        if !removed {
            tracing::warn!(cgroup = %dir.display(), "cannot remove cgroup");
        }
    }
}

/// Whether the container's cgroup is frozen (paused).
pub async fn is_frozen(cgroup: &Path) -> bool {
    tokio::fs::read_to_string(cgroup.join("cgroup.freeze"))
        .await
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}
