//! Ownership of child processes: spawn, readiness, graceful stop, reaping.
//!
//! Each child is owned by one supervisor task that holds the `tokio::process::Child`. It
//! is the only place that waits for (reaps) the child and the only place that sends it
//! signals, so a signal can never hit a recycled pid. The [`ChildProcess`] handle talks to
//! it through channels; dropping the handle makes the supervisor terminate (SIGTERM, then
//! SIGKILL after a second) and reap the child. Exit is published on a watch channel as an [`ExitReport`].
//!
//! Every child leads a process group of its own, and the group is the unit: signals go to
//! the group, and when the leader exits whatever it forked (virtiofsd's namespace sandbox
//! runs the file server in a forked child) is killed before the exit is published, so no
//! helper of a VM outlives the process the sandbox watches. The leader is reaped only
//! after that (its pidfd says when it exited), which keeps its pid, and so the group id,
//! from being reused while we signal it.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::console::{spawn_line_reader, LineRing, LogAs};

/// How long to wait for a child to die after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a child whose handle was dropped gets between SIGTERM and SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(1);
/// Lines of stderr kept per child.
const STDERR_LINES: usize = 100;
/// How long the rest of a child's process group gets to die after its leader exited.
const GROUP_WAIT: Duration = Duration::from_secs(1);
/// Poll interval of readiness checks.
const POLL: Duration = Duration::from_millis(10);

/// Errors owning a child process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be executed.
    #[error("cannot start {}", .program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The child exited while we waited for it to become ready.
    #[error("{name} exited during start ({status}): {stderr}")]
    Exited {
        name: String,
        status: ExitReport,
        stderr: String,
    },
    /// The child did not become ready in time.
    #[error("{what} not ready after {timeout:?}")]
    ReadinessTimeout { what: String, timeout: Duration },
    /// A cgroup to place the child in is unusable.
    #[error("cannot place the child in cgroup file {}", .path.display())]
    Placement {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The child survived SIGKILL for too long (stuck in the kernel?).
    #[error("{name} did not exit after SIGKILL")]
    StopTimeout { name: String },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitReport {
    /// Shell-style status: the exit code, or 128 + signal for a signal death (never 0 then).
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (_, Some(signal)) => 128 + signal,
            (Some(code), None) => code,
            (None, None) => 255,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }
}

impl From<ExitStatus> for ExitReport {
    fn from(status: ExitStatus) -> Self {
        ExitReport {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (_, Some(n)) => match Signal::try_from(n) {
                Ok(sig) => write!(f, "killed by signal {n} ({sig})"),
                Err(_) => write!(f, "killed by signal {n}"),
            },
            (Some(code), None) => write!(f, "exit code {code}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Where a child's stdout goes.
#[derive(Debug)]
pub enum Stdout {
    /// Discarded.
    Null,
    /// Captured line by line into a ring and logged.
    Lines(LineRing, LogAs),
}

/// Handle to a supervised child process.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    pid: u32,
    signals: mpsc::UnboundedSender<Signal>,
    exit: watch::Receiver<Option<ExitReport>>,
    stderr: LineRing,
    stderr_done: watch::Receiver<bool>,
}

/// Makes the child get SIGKILL when the thread that spawned it ends, so a VM never outlives
/// a shim that was killed (SIGKILL leaves no chance to stop it). Children are spawned from
/// the tokio worker threads, which live as long as the process's runtime.
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only calls prctl and getppid,
    // which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would send it.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Makes the child join the cgroups whose `cgroup.procs` files are `procs` before it execs
/// (memory a process charges stays with the cgroup it was charged to, so children start
/// in theirs), and set its `oom_score_adj` when asked (a host that does not allow lowering
/// it leaves it as inherited: check `/proc/<pid>/oom_score_adj` after the spawn).
pub fn place_on_exec(
    command: &mut Command,
    procs: &[PathBuf],
    oom_score_adj: Option<i32>,
) -> Result<(), ProcessError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let files: Vec<CString> = procs
        .iter()
        .map(|p| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| ProcessError::Placement {
                path: p.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })
        })
        .collect::<Result<_, _>>()?;
    let oom = oom_score_adj.map(|v| CString::new(v.to_string()).expect("digits have no NUL"));
    // SAFETY: the closure runs between fork and exec and only calls open, write and close,
    // which are async-signal-safe, on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            for file in &files {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            if let Some(value) = &oom {
                let path = b"/proc/self/oom_score_adj\0";
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    // Lowering may be refused (EACCES): the inherited value stays.
                    libc::write(fd, value.as_ptr().cast(), value.as_bytes().len());
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    Ok(())
}

impl ChildProcess {
    /// Spawns `command` as `name` (for logs and errors) of VM `vm`: stdin is null, stderr
    /// is captured, stdout goes to `stdout`. Must run inside a tokio runtime.
    pub fn spawn(
        name: &str,
        vm: &str,
        mut command: Command,
        stdout: Stdout,
    ) -> Result<ChildProcess, ProcessError> {
        let program = PathBuf::from(command.as_std().get_program());
        command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command.stdout(match stdout {
            Stdout::Null => Stdio::null(),
            Stdout::Lines(..) => Stdio::piped(),
        });
        die_with_parent(&mut command);
        command.process_group(0);
        let mut child = command
            .spawn()
            .map_err(|source| ProcessError::Spawn { program, source })?;
        let pid = child.id().unwrap_or_default();
        tracing::debug!(vm, name, pid, "started child process");

        let stderr = LineRing::new(STDERR_LINES);
        let log = LogAs::Stderr {
            vm: vm.to_owned(),
            name: name.to_owned(),
        };
        let (_, stderr_done) = match child.stderr.take() {
            Some(pipe) => spawn_line_reader(pipe, stderr.clone(), log),
            None => (tokio::spawn(async {}), watch::channel(true).1),
        };
        if let (Stdout::Lines(ring, log), Some(pipe)) = (stdout, child.stdout.take()) {
            spawn_line_reader(pipe, ring, log);
        }

        let (signals, signal_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(supervise(child, name.to_owned(), signal_rx, exit_tx));
        Ok(ChildProcess {
            name: name.to_owned(),
            pid,
            signals,
            exit,
            stderr,
            stderr_done,
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid (it may have exited since).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it exited, if it has.
    pub fn exit_status(&self) -> Option<ExitReport> {
        *self.exit.borrow()
    }

    /// A watch that turns `Some` when the child has exited and been reaped.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitReport>> {
        self.exit.clone()
    }

    /// Waits until the child has exited and been reaped.
    pub async fn wait(&self) -> ExitReport {
        let mut exit = self.exit.clone();
        let report = exit.wait_for(Option::is_some).await.ok().and_then(|r| *r);
        report.unwrap_or(ExitReport {
            code: None,
            signal: None,
        })
    }

    /// Waits up to `timeout` for the child to exit.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<ExitReport> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    /// Sends `signal` unless the child has already been reaped.
    pub fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }

    /// The last lines of the child's stderr.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// The child's stderr once the pipe is drained (for a child that has exited); waits
    /// at most a second for the reader to reach EOF.
    pub async fn final_stderr(&self) -> String {
        let mut done = self.stderr_done.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
        self.stderr.text()
    }

    /// SIGTERM, up to `grace` for it to exit, then SIGKILL. Returns how it exited.
    pub async fn terminate(&self, grace: Duration) -> Result<ExitReport, ProcessError> {
        if let Some(report) = self.exit_status() {
            return Ok(report);
        }
        self.signal(Signal::SIGTERM);
        if let Some(report) = self.wait_timeout(grace).await {
            return Ok(report);
        }
        self.kill().await
    }

    /// SIGKILL and wait for the reap.
    pub async fn kill(&self) -> Result<ExitReport, ProcessError> {
        tracing::warn!(name = %self.name, pid = self.pid, "killing child process");
        self.signal(Signal::SIGKILL);
        self.wait_timeout(KILL_WAIT)
            .await
            .ok_or_else(|| ProcessError::StopTimeout {
                name: self.name.clone(),
            })
    }

    /// Waits until `path` exists (a vhost-user backend's socket), failing if the child
    /// exits first or `timeout` passes. Does not connect: vhost-user backends serve one
    /// connection, which belongs to QEMU.
    pub async fn wait_for_path(&self, path: &Path, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::fs::try_exists(path).await.unwrap_or(false) {
                return Ok(());
            }
            self.check_alive().await?;
            if Instant::now() >= deadline {
                let what = format!("{} socket {}", self.name, path.display());
                return Err(ProcessError::ReadinessTimeout { what, timeout });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `Err(Exited)` with the drained stderr if the child has exited.
    pub async fn check_alive(&self) -> Result<(), ProcessError> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(ProcessError::Exited {
                name: self.name.clone(),
                status,
                stderr: self.final_stderr().await,
            }),
        }
    }
}

/// Owns `child`: reaps it, forwards signals while it lives, kills it when the handle is
/// dropped.
async fn supervise(
    mut child: Child,
    name: String,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    exit: watch::Sender<Option<ExitReport>>,
) {
    let group = child
        .id()
        .map(|pid| Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)));
    let exited = exit_notice(group);
    tokio::pin!(exited);
    let status = loop {
        tokio::select! {
            biased;
            () = &mut exited => {
                // The leader is a zombie: its pid still names the group.
                if let Some(group) = group {
                    end_group(group, &name).await;
                }
                break child.wait().await;
            }
            signal = signals.recv() => match (signal, group) {
                (Some(signal), Some(group)) => {
                    if let Err(error) = killpg(group, signal) {
                        tracing::debug!(%name, %error, ?signal, "signal failed");
                    }
                }
                (Some(_), None) => {}
                (None, _) => break stop_orphaned(&mut child, group, &name).await,
            },
        }
    };
    let report = match status {
        Ok(status) => ExitReport::from(status),
        Err(error) => {
            tracing::warn!(%name, %error, "waiting for child failed");
            ExitReport {
                code: None,
                signal: None,
            }
        }
    };
    tracing::debug!(%name, %report, "child process exited");
    exit.send_replace(Some(report));
}

/// Resolves when the process `pid` has exited, without reaping it: its pidfd turns
/// readable. Without pidfds (kernels before 5.3) it never resolves and the supervisor
/// learns of the exit by reaping.
async fn exit_notice(pid: Option<Pid>) {
    use std::os::fd::{FromRawFd, OwnedFd};
    use tokio::io::unix::AsyncFd;
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return std::future::pending().await;
    };
    if fd < 0 {
        return std::future::pending().await;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the OwnedFd is moved into the AsyncFd, which closes it only when dropped.
    match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// The leader of `group` exited: SIGKILL what is left of its group and wait (bounded)
/// until the group is empty.
async fn end_group(group: Pid, name: &str) {
    if killpg(group, Signal::SIGKILL).is_err() {
        return;
    }
    let deadline = Instant::now() + GROUP_WAIT;
    // Members other than the zombie leader: reaped by init once they die.
    while group_has_live_members(group) {
        if Instant::now() >= deadline {
            tracing::warn!(
                name,
                pgid = group.as_raw(),
                "processes of the child's group survived SIGKILL"
            );
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a process other than the leader and other than a zombie is in `group`.
fn group_has_live_members(group: Pid) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            return false;
        };
        if pid == group.as_raw() {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|s| s.parse::<i32>().ok());
        pgrp == Some(group.as_raw()) && state != Some("Z") && state != Some("X")
    })
}

/// The handle was dropped: SIGTERM to the group (a forking daemon can then take its
/// children down), up to [`DROP_GRACE`] to exit, then SIGKILL; reaps.
async fn stop_orphaned(
    child: &mut Child,
    group: Option<Pid>,
    name: &str,
) -> std::io::Result<ExitStatus> {
    if let Some(group) = group {
        tracing::debug!(
            name,
            pid = group.as_raw(),
            "handle dropped, terminating child"
        );
        let _ = killpg(group, Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(DROP_GRACE, child.wait()).await {
            return status;
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
    let _ = child.start_kill();
    child.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn exit_codes() {
        let killed = ExitReport {
            code: None,
            signal: Some(9),
        };
        assert_eq!(killed.exit_code(), 137);
        assert!(!killed.success());
        assert_eq!(killed.to_string(), "killed by signal 9 (SIGKILL)");
        let ok = ExitReport {
            code: Some(0),
            signal: None,
        };
        assert_eq!(ok.exit_code(), 0);
        assert!(ok.success());
        assert_eq!(
            ExitReport {
                code: Some(3),
                signal: None
            }
            .exit_code(),
            3
        );
        assert_ne!(
            ExitReport {
                code: None,
                signal: None
            }
            .exit_code(),
            0
        );
    }

    #[tokio::test]
    async fn early_exit_carries_stderr() {
        let child =
            ChildProcess::spawn("d", "t", sh("echo boom >&2; exit 3"), Stdout::Null).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = child
            .wait_for_path(&dir.path().join("never"), Duration::from_secs(5))
            .await
            .unwrap_err();
        match err {
            ProcessError::Exited { status, stderr, .. } => {
                assert_eq!(status.code, Some(3));
                assert_eq!(stderr, "boom");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn readiness_by_path_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let script = format!("sleep 0.1; touch {}; exec sleep 30", path.display());
        let child = ChildProcess::spawn("d", "t", sh(&script), Stdout::Null).unwrap();
        child
            .wait_for_path(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let err = child
            .wait_for_path(&dir.path().join("other"), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProcessError::ReadinessTimeout { .. }),
            "{err}"
        );
        let report = child.terminate(Duration::from_secs(5)).await.unwrap();
        assert_eq!(report.signal, Some(libc::SIGTERM));
        assert_eq!(report.exit_code(), 128 + libc::SIGTERM);
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
    }

    /// A forked helper (virtiofsd's sandbox child) dies with the process we watch, before
    /// its exit is published, whichever of the two was killed.
    #[tokio::test]
    async fn what_the_child_forked_dies_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grandchild");
        let script = format!("sleep 300 & echo $! > {}; exec sleep 300", file.display());
        let child = ChildProcess::spawn("d", "t", sh(&script), Stdout::Null).unwrap();
        child
            .wait_for_path(&file, Duration::from_secs(5))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let grandchild: i32 = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(grandchild));
        // Killed from outside, as a fault would: only the watched process gets the signal.
        nix::sys::signal::kill(Pid::from_raw(child.pid() as i32), Signal::SIGKILL).unwrap();
        let report = child.wait_timeout(Duration::from_secs(5)).await.unwrap();
        assert_eq!(report.signal, Some(libc::SIGKILL));
        assert!(!alive(grandchild), "the forked helper outlived the exit");
    }

    #[tokio::test]
    async fn sigterm_ignored_then_killed() {
        let child =
            ChildProcess::spawn("d", "t", sh("trap '' TERM; exec sleep 30"), Stdout::Null).unwrap();
        // Let the shell install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = child.terminate(Duration::from_millis(200)).await.unwrap();
        assert_eq!(report.signal, Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn drop_terminates_and_reaps() {
        let child = ChildProcess::spawn("d", "t", sh("exec sleep 30"), Stdout::Null).unwrap();
        let mut exit = child.exit_watch();
        let pid = child.pid();
        drop(child);
        let report = exit.wait_for(Option::is_some).await.unwrap().unwrap();
        assert_eq!(report.signal, Some(libc::SIGTERM));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn placement_sets_oom_score_adj_and_fails_on_a_missing_cgroup() {
        let ring = LineRing::new(4);
        let mut cmd = sh("cat /proc/self/oom_score_adj");
        place_on_exec(&mut cmd, &[], Some(789)).unwrap();
        let child = ChildProcess::spawn(
            "c",
            "t",
            cmd,
            Stdout::Lines(ring.clone(), LogAs::GuestConsole { vm: "t".into() }),
        )
        .unwrap();
        assert!(child.wait().await.success());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ring.tail(), ["789"]);

        let mut cmd = sh("true");
        place_on_exec(
            &mut cmd,
            &[PathBuf::from("/nonexistent/cgroup.procs")],
            None,
        )
        .unwrap();
        let err = ChildProcess::spawn("c", "t", cmd, Stdout::Null).unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn spawn_failure_names_program() {
        let err = ChildProcess::spawn("d", "t", Command::new("/nonexistent/prog"), Stdout::Null)
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/prog"), "{err}");
    }
}
