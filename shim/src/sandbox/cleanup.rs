//! Cleanup after a shim that is gone (the `delete` command), and of stale state found when
//! a sandbox is created again.
//!
//! The host processes of a sandbox (QEMU, virtiofsd, the vsock daemon) are found through
//! the state record (QEMU's pid, checked against its start time) and by their command
//! lines, which all name the sandbox's VM run directory. They are killed, the shared
//! directory is unmounted and removed, and so is the state directory. A remote VM (peer
//! pods) the record names is deleted with StopVM through the adaptor. Everything here is
//! synchronous: the `delete` command is a short-lived process with nothing else to do (the
//! StopVM call runs on a thread of its own with a current-thread runtime, so this also
//! works from a blocking task of the shim's runtime).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::mounts;
use super::state::{proc_start_time, read_record, SandboxPaths};

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(3);
/// Kills the sandbox's host processes and removes its directories.
pub fn cleanup_sandbox(paths: &SandboxPaths) {
    let mut pids = Vec::new();
    let record = read_record(&paths.state_file());
    if let Some(record) = &record {
        let alive_same = record.qemu_pid != 0
            && record.qemu_start_time.is_some()
            && proc_start_time(record.qemu_pid) == record.qemu_start_time;
        if alive_same {
            pids.push(record.qemu_pid);
        }
    }
    for pid in pids_mentioning(&paths.vm_run_dir) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    kill_and_wait(&pids);
    if let Some(remote) = record.as_ref().and_then(|r| r.remote.as_ref()) {
        stop_remote_vm(&remote.socket, &remote.id);
    }
    // A systemd scope empties with its processes and systemd removes it.
    if let Some(record) = &record {
        super::placement::remove_dirs(&record.cgroup_dirs);
    }
    for dir in [&paths.shared_dir, &paths.state_dir] {
        if let Err(error) = mounts::remove_dir_sync(dir) {
            tracing::warn!(error = %crate::report::chain(&error), "removing {}", dir.display());
        }
    }
}

/// StopVM for the remote VM of sandbox `id` through the adaptor at `socket`; failures are
/// logged (the adaptor deletes instances whose pod is gone when it reconciles).
fn stop_remote_vm(socket: &Path, id: &str) {
    let (socket, id) = (socket.to_path_buf(), id.to_owned());
    let stopped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime
            .block_on(super::remote::stop_by_id(&socket, &id))
            .map_err(|e| crate::report::chain(&e))
    })
    .join();
    match stopped {
        Ok(Ok(())) => tracing::info!("remote VM deleted (StopVM)"),
        Ok(Err(error)) => tracing::warn!(%error, "StopVM for a dead shim's remote VM"),
        Err(_) => tracing::warn!("StopVM thread panicked"),
    }
}

/// Unmounts and removes one container's directory in the share.
pub fn cleanup_container(paths: &SandboxPaths, container_id: &str) {
    let dir = paths.container_dir(container_id);
    if let Err(error) = mounts::remove_dir_sync(&dir) {
        tracing::warn!(error = %crate::report::chain(&error), "removing {}", dir.display());
    }
}

/// Pids (other than ours) whose command line mentions `dir`.
fn pids_mentioning(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(PathBuf::from(format!("/proc/{pid}/cmdline")))
                .map(|cmd| mentions(&cmd, needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether a NUL-separated command line mentions `dir` as a path (itself or below it).
pub fn mentions(cmdline: &[u8], dir: &[u8]) -> bool {
    if dir.is_empty() {
        return false;
    }
    cmdline.windows(dir.len()).enumerate().any(|(i, w)| {
        w == dir
            && matches!(
                cmdline.get(i + dir.len()),
                None | Some(b'/') | Some(0) | Some(b',') | Some(b' ')
            )
    })
}

fn kill_and_wait(pids: &[u32]) {
    let targets: Vec<(u32, Option<u64>)> = pids.iter().map(|&p| (p, proc_start_time(p))).collect();
    for &(pid, _) in &targets {
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        tracing::info!(pid, "killing leftover sandbox process");
        let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
    let deadline = Instant::now() + KILL_WAIT;
    while Instant::now() < deadline {
        let alive = targets.iter().any(|&(pid, start)| {
            start.is_some() && proc_start_time(pid) == start && !is_zombie(pid)
        });
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(?pids, "leftover sandbox processes did not exit in time");
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_mentions_match_whole_path_components() {
        let dir = b"/run/kata/s1/vm";
        assert!(mentions(
            b"qemu\0-chardev\0socket,path=/run/kata/s1/vm/qmp.sock\0",
            dir
        ));
        assert!(mentions(
            b"virtiofsd\0--socket-path=/run/kata/s1/vm/virtiofsd.sock",
            dir
        ));
        assert!(mentions(b"x\0/run/kata/s1/vm", dir));
        assert!(!mentions(
            b"qemu\0/run/kata/s10/vm/qmp.sock",
            b"/run/kata/s1"
        ));
        assert!(!mentions(b"qemu\0/run/kata/s1/vmx", dir));
        assert!(!mentions(b"anything", b""));
    }

    #[test]
    fn cleanup_of_a_missing_sandbox_is_quiet() {
        let root = tempfile::tempdir().unwrap();
        let paths =
            SandboxPaths::with_roots(&root.path().join("st"), &root.path().join("sh"), "s1");
        std::fs::create_dir_all(paths.container_dir("c1")).unwrap();
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        cleanup_container(&paths, "c1");
        assert!(!paths.container_dir("c1").exists());
        cleanup_sandbox(&paths);
        assert!(!paths.shared_dir.exists() && !paths.state_dir.exists());
    }

    /// An adaptor that records the ids it is asked to stop.
    #[derive(Default)]
    struct Adaptor(std::sync::Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl kata_proto::hypervisor_ttrpc::Hypervisor for Adaptor {
        async fn stop_vm(
            &self,
            _: &ttrpc::asynchronous::TtrpcContext,
            req: kata_proto::hypervisor::StopVMRequest,
        ) -> ttrpc::Result<kata_proto::hypervisor::StopVMResponse> {
            self.0.lock().unwrap().push(req.id);
            Ok(Default::default())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorded_remote_vm_is_stopped() {
        let root = tempfile::tempdir().unwrap();
        let socket = root.path().join("hypervisor.sock");
        let adaptor = std::sync::Arc::new(Adaptor::default());
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::from(
                tokio::net::UnixListener::bind(&socket).unwrap(),
            ))
            .register_service(kata_proto::hypervisor_ttrpc::create_hypervisor(
                adaptor.clone(),
            ));
        server.start().await.unwrap();
        let paths =
            SandboxPaths::with_roots(&root.path().join("st"), &root.path().join("sh"), "rs1");
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        let record = super::super::state::StateRecord {
            sandbox_id: "rs1".into(),
            shim_pid: 1,
            qemu_pid: 0,
            qemu_start_time: None,
            vm_run_dir: paths.vm_run_dir.clone(),
            shared_dir: paths.shared_dir.clone(),
            cgroup_dirs: Vec::new(),
            remote: Some(super::super::state::RemoteRecord {
                socket: socket.clone(),
                id: "rs1".into(),
            }),
        };
        super::super::state::write_record(&paths.state_file(), &record)
            .await
            .unwrap();
        let cleaned = paths.clone();
        tokio::task::spawn_blocking(move || cleanup_sandbox(&cleaned))
            .await
            .unwrap();
        assert_eq!(*adaptor.0.lock().unwrap(), ["rs1"]);
        assert!(!paths.state_dir.exists());
        // An adaptor that is gone is logged, not fatal.
        drop(server);
        std::fs::remove_file(&socket).unwrap();
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        super::super::state::write_record(&paths.state_file(), &record)
            .await
            .unwrap();
        let cleaned = paths.clone();
        tokio::task::spawn_blocking(move || cleanup_sandbox(&cleaned))
            .await
            .unwrap();
        assert!(!paths.state_dir.exists());
    }
}
