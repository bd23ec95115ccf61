//! [`Vm`]: one running QEMU with its daemons, QMP session, console and vsock endpoint.
//!
//! Start order: run directory, vsock (CID or hybrid daemon), virtiofsd, QEMU, QMP
//! handshake. Every step has a timeout and races the children's exit, and a failed start
//! leaves nothing behind. [`Vm::stop`] asks QEMU to quit over QMP, then escalates to
//! SIGTERM and SIGKILL, stops the daemons, reaps everything and removes the run directory;
//! [`Vm::kill`] SIGKILLs QEMU and every daemon at once and reaps them (fencing a sick VM);
//! [`Vm::wait_child_death`] tells which child died first. Dropping a [`Vm`] terminates
//! (SIGTERM, then SIGKILL) and reaps whatever is still alive. Every method takes `&self`,
//! so a VM can be shared by its sandbox's tasks; stop and kill are idempotent.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::accel::{self, AccelError, HostCaps};
use crate::cmdline::{qemu_args, QemuArgs, VsockDevice};
use crate::config::{Accel, ConfigError, VmConfig, VsockMode};
use crate::console::{LineRing, LogAs};
use crate::process::{place_on_exec, ChildProcess, ExitReport, ProcessError, Stdout};
use crate::qmp::{Qmp, QmpError};
use crate::virtiofsd::{self, VirtiofsdError};
use crate::vsock::{self, Endpoint, VhostVsock, VsockError, VsockStream};

/// Guest console lines kept for errors and [`Vm::console_tail`].
pub const CONSOLE_LINES: usize = 200;
/// Console lines shown in error messages.
const CONSOLE_LINES_IN_ERRORS: usize = 15;

const QMP_SOCKET: &str = "qmp.sock";
/// A second QMP monitor for operators and diagnostics (the shim holds the first).
pub const QMP_DEBUG_SOCKET: &str = "qmp-debug.sock";
const VHOST_USER_VSOCK_SOCKET: &str = "vhost-vsock.sock";
const HYBRID_VSOCK_SOCKET: &str = "vsock.sock";
const VIRTIOFSD_SOCKET: &str = "virtiofsd.sock";

/// How long a failed start waits for QEMU to finish exiting before blaming something else.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long [`Vm::kill`] waits for each child to be reaped after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// Name under which the hybrid vsock daemon runs (logs, errors).
const VSOCK_DAEMON_NAME: &str = "vhost-device-vsock";
/// How long a daemon that exits by itself when QEMU disconnects (virtiofsd) gets for
/// that at stop before it is terminated.
const DAEMON_EXIT_GRACE: Duration = Duration::from_millis(100);

/// Errors starting, using or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    /// No usable accelerator.
    #[error("cannot choose an accelerator")]
    Accel(#[from] AccelError),
    /// The host probe task panicked or was cancelled.
    #[error("host probe task failed")]
    Probe(#[source] tokio::task::JoinError),
    /// The run directory already holds files.
    #[error("run directory {} exists and is not empty", .path.display())]
    RunDirNotEmpty { path: PathBuf },
    /// Creating or removing the run directory failed.
    #[error("cannot create or remove run directory {}", .path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting up the vsock device failed.
    #[error("vsock setup failed")]
    Vsock(#[source] VsockError),
    /// The virtio-fs daemon could not be identified.
    #[error("virtio-fs daemon check failed")]
    Virtiofsd(#[from] VirtiofsdError),
    /// A child process failed to start, become ready or stop.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// QEMU exited before it was ready.
    #[error("QEMU exited during start ({status}): {stderr}")]
    QemuExited { status: ExitReport, stderr: String },
    /// The hybrid vsock daemon died, so no guest port can be reached.
    #[error("vsock daemon {name} exited ({status}) while connecting to port {port}: {stderr}")]
    VsockDaemonExited {
        name: String,
        port: u32,
        status: ExitReport,
        stderr: String,
    },
    /// A QMP exchange failed.
    #[error("QMP failed")]
    Qmp(#[from] QmpError),
    /// Connecting to a guest vsock port timed out.
    #[error("cannot connect to guest vsock port {port}{}", console_excerpt(.console_tail))]
    Connect {
        port: u32,
        #[source]
        source: VsockError,
        /// The last guest console lines at the time of failure.
        console_tail: Vec<String>,
    },
    /// QEMU exited while connecting to a guest port.
    #[error("QEMU exited ({status}) while connecting to guest vsock port {port}{}", console_excerpt(.console_tail))]
    GuestExited {
        port: u32,
        status: ExitReport,
        console_tail: Vec<String>,
    },
}

fn console_excerpt(tail: &[String]) -> String {
    if tail.is_empty() {
        return "; guest console is empty".to_owned();
    }
    let start = tail.len().saturating_sub(CONSOLE_LINES_IN_ERRORS);
    let mut text = String::from("; guest console tail:");
    for line in &tail[start..] {
        text.push_str("\n  | ");
        text.push_str(line);
    }
    text
}

/// A running VM. See the module docs for its lifecycle.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    accel: Accel,
    qemu: ChildProcess,
    /// vsock daemon and/or virtiofsd, in start order.
    daemons: Vec<ChildProcess>,
    qmp: Qmp,
    console: LineRing,
    endpoint: Endpoint,
    /// False once [`Vm::stop`] has cleaned up.
    owns_run_dir: AtomicBool,
    /// Set by the first [`Vm::stop`]; later callers wait for `stopped`.
    stop_started: AtomicBool,
    stopped: watch::Sender<bool>,
}

/// A child of the VM that died: QEMU or one of its daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildDeath {
    /// `qemu`, `virtiofsd` or the vsock daemon's name.
    pub name: String,
    /// The child's pid.
    pub pid: u32,
    /// How it ended.
    pub status: ExitReport,
}

impl std::fmt::Display for ChildDeath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) exited ({})",
            self.name, self.pid, self.status
        )
    }
}

/// Resources of a start in progress; dropping it kills the children and removes the run
/// directory, so a failed or cancelled start leaves nothing behind.
#[derive(Debug)]
struct Starting {
    run_dir: PathBuf,
    children: Vec<ChildProcess>,
    armed: bool,
}

impl Starting {
    async fn abort(mut self) {
        for child in self.children.drain(..).rev() {
            if let Err(error) = child.kill().await {
                tracing::warn!(%error, "cleanup after failed start");
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.armed {
            remove_dir_logged(&self.run_dir);
        }
    }
}

impl Vm {
    /// Starts a VM. On failure every child is killed and reaped and the run directory
    /// removed.
    pub async fn start(config: VmConfig) -> Result<Vm, Error> {
        let probe_config = config.clone();
        let (accel, vhost) = tokio::task::spawn_blocking(move || probe_host(&probe_config))
            .await
            .map_err(Error::Probe)??;
        tracing::info!(vm = %config.id, %accel, vhost_vsock = vhost.is_some(), "starting VM");

        create_run_dir(&config.run_dir).await?;
        let mut starting = Starting {
            run_dir: config.run_dir.clone(),
            children: Vec::new(),
            armed: true,
        };
        match start_children(&config, accel, vhost, &mut starting).await {
            Ok((qmp, console, endpoint)) => {
                starting.armed = false;
                let mut children = std::mem::take(&mut starting.children);
                let qemu = children.pop().expect("QEMU is the last child started");
                tracing::info!(vm = %config.id, pid = qemu.pid(), "VM started");
                Ok(Vm {
                    config,
                    accel,
                    qemu,
                    daemons: children,
                    qmp,
                    console,
                    endpoint,
                    owns_run_dir: AtomicBool::new(true),
                    stop_started: AtomicBool::new(false),
                    stopped: watch::channel(false).0,
                })
            }
            Err(error) => {
                starting.abort().await;
                Err(error)
            }
        }
    }

    /// Connects to guest vsock `port`, retrying with backoff until `timeout`. Fails early
    /// if QEMU or the hybrid vsock daemon exits.
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<VsockStream, Error> {
        let vsock_daemon = self.daemons.iter().find(|d| d.name() == VSOCK_DAEMON_NAME);
        let daemon_exit = async {
            match vsock_daemon {
                Some(d) => (d, d.wait().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // A dead daemon is the most precise explanation; check it first.
            biased;
            (daemon, status) = daemon_exit => Err(Error::VsockDaemonExited {
                name: daemon.name().to_owned(),
                port,
                status,
                stderr: daemon.final_stderr().await,
            }),
            status = self.qemu.wait() => {
                Err(Error::GuestExited { port, status, console_tail: self.console.tail() })
            }
            result = self.endpoint.connect(port, timeout) => result.map_err(|source| {
                Error::Connect { port, source, console_tail: self.console.tail() }
            }),
        }
    }

    /// The QMP session.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// The helper daemons (virtiofsd, the hybrid vsock daemon) as (name, pid).
    pub fn daemon_pids(&self) -> Vec<(String, u32)> {
        self.daemons
            .iter()
            .map(|d| (d.name().to_owned(), d.pid()))
            .collect()
    }

    /// The accelerator in use ([`Accel::Kvm`] or [`Accel::Tcg`]).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The configuration the VM was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where the host connects to reach guest vsock ports.
    pub fn vsock_endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The last [`CONSOLE_LINES`] lines of the guest serial console.
    pub fn console_tail(&self) -> Vec<String> {
        self.console.tail()
    }

    /// QEMU's stderr so far (last lines).
    pub fn qemu_stderr(&self) -> String {
        self.qemu.stderr_text()
    }

    /// A watch that turns `Some` when QEMU has exited and been reaped.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitReport>> {
        self.qemu.exit_watch()
    }

    /// A watch that turns true once [`Vm::stop`] has finished.
    pub fn stopped_watch(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// Waits until QEMU exits (guest poweroff, panic with `-no-reboot`, crash, ...).
    pub async fn wait_exit(&self) -> ExitReport {
        self.qemu.wait().await
    }

    /// Pids of QEMU and its daemons, by name (for metrics and diagnostics).
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::iter::once(&self.qemu)
            .chain(&self.daemons)
            .map(|c| (c.name().to_owned(), c.pid()))
            .collect()
    }

    /// Waits until QEMU or any daemon exits and says which (the first seen). Driven by the
    /// children's reapers (SIGCHLD), not by polling.
    pub async fn wait_child_death(&self) -> ChildDeath {
        use std::future::Future;
        use std::pin::Pin;
        type Death<'a> = Pin<Box<dyn Future<Output = ChildDeath> + Send + 'a>>;
        let deaths: Vec<Death<'_>> = std::iter::once(&self.qemu)
            .chain(&self.daemons)
            .map(|child| {
                Box::pin(async move {
                    let status = child.wait().await;
                    ChildDeath {
                        name: child.name().to_owned(),
                        pid: child.pid(),
                        status,
                    }
                }) as Death<'_>
            })
            .collect();
        futures::future::select_all(deaths).await.0
    }

    /// Fences the VM: SIGKILL to QEMU and every daemon at once, then waits until each is
    /// reaped. Nothing of the guest runs or writes to host files afterwards (virtiofsd
    /// carries the guest's queued writes, so it dies with QEMU). Idempotent; the run
    /// directory stays for [`Vm::stop`].
    pub async fn kill(&self) {
        let children: Vec<&ChildProcess> =
            std::iter::once(&self.qemu).chain(&self.daemons).collect();
        for child in &children {
            if child.exit_status().is_none() {
                child.signal(nix::sys::signal::Signal::SIGKILL);
            }
        }
        for child in children {
            match child.wait_timeout(KILL_WAIT).await {
                Some(status) => {
                    tracing::debug!(vm = %self.config.id, name = child.name(), %status, "fenced")
                }
                None => {
                    tracing::error!(vm = %self.config.id, name = child.name(), pid = child.pid(), "did not exit after SIGKILL")
                }
            }
        }
    }

    /// Stops the VM: QMP `quit`, then SIGTERM, then SIGKILL, each given `timeout`; then
    /// the daemons (SIGTERM, then SIGKILL); all reaped; the run directory removed.
    /// Returns how QEMU exited. A second call waits for the first to finish.
    pub async fn stop(&self, timeout: Duration) -> Result<ExitReport, Error> {
        if self.stop_started.swap(true, Ordering::SeqCst) {
            let mut stopped = self.stopped.subscribe();
            let _ = stopped.wait_for(|s| *s).await;
            return Ok(self.qemu.exit_status().unwrap_or(ExitReport {
                code: None,
                signal: None,
            }));
        }
        let result = self.stop_once(timeout).await;
        self.stopped.send_replace(true);
        result
    }

    async fn stop_once(&self, timeout: Duration) -> Result<ExitReport, Error> {
        let report = self.stop_qemu(timeout).await;
        // All at once. virtiofsd exits by itself once QEMU disconnects and gets a moment
        // for that; the vsock daemon waits for the next frontend forever and is stopped
        // at once.
        futures::future::join_all(self.daemons.iter().map(|daemon| async move {
            let grace = if daemon.name() == VSOCK_DAEMON_NAME {
                Duration::ZERO
            } else {
                DAEMON_EXIT_GRACE
            };
            let status = match daemon.wait_timeout(grace).await {
                Some(status) => Ok(status),
                None => daemon.terminate(timeout).await,
            };
            match status {
                Ok(status) => tracing::debug!(name = daemon.name(), %status, "daemon stopped"),
                Err(error) => tracing::warn!(%error, "stopping daemon"),
            }
        }))
        .await;
        self.owns_run_dir.store(false, Ordering::SeqCst);
        let run_dir = self.config.run_dir.clone();
        match tokio::fs::remove_dir_all(&run_dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::RunDir {
                    path: run_dir,
                    source,
                })
            }
        }
        let report = report?;
        tracing::info!(vm = %self.config.id, %report, "VM stopped");
        Ok(report)
    }

    async fn stop_qemu(&self, timeout: Duration) -> Result<ExitReport, Error> {
        if let Some(report) = self.qemu.exit_status() {
            return Ok(report);
        }
        match tokio::time::timeout(timeout, self.qmp.quit()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(vm = %self.config.id, %error, "QMP quit failed"),
            Err(_) => tracing::warn!(vm = %self.config.id, "QMP quit timed out"),
        }
        if let Some(report) = self.qemu.wait_timeout(timeout).await {
            return Ok(report);
        }
        tracing::warn!(vm = %self.config.id, "QEMU ignored quit, sending SIGTERM");
        Ok(self.qemu.terminate(timeout).await?)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The children's handles drop after this: their supervisors terminate and reap them.
        if *self.owns_run_dir.get_mut() {
            tracing::warn!(vm = %self.config.id, "VM dropped without stop, killing it");
            remove_dir_logged(&self.config.run_dir);
        }
    }
}

/// Validates the config, resolves the accelerator and the vsock flavour. Blocking.
fn probe_host(config: &VmConfig) -> Result<(Accel, Option<VhostVsock>), Error> {
    config.validate()?;
    let accel = match config.accel {
        Accel::Tcg => Accel::Tcg,
        requested => accel::choose(requested, &HostCaps::probe())?,
    };
    let use_vhost = match config.vsock {
        VsockMode::Vhost => true,
        VsockMode::Hybrid => false,
        VsockMode::Auto => vsock::vhost_available(),
    };
    if !use_vhost && config.vsock == VsockMode::Auto && !config.vsock_daemon.is_file() {
        return Err(ConfigError::VsockDaemonNotFound {
            path: config.vsock_daemon.clone(),
        }
        .into());
    }
    let vhost = if use_vhost {
        Some(VhostVsock::open().map_err(Error::Vsock)?)
    } else {
        None
    };
    Ok((accel, vhost))
}

/// Starts the daemons and QEMU, pushing each child into `starting` (QEMU last).
async fn start_children(
    config: &VmConfig,
    accel: Accel,
    vhost: Option<VhostVsock>,
    starting: &mut Starting,
) -> Result<(Qmp, LineRing, Endpoint), Error> {
    let run_dir = &config.run_dir;
    let timeout = config.start_timeout;
    let (device, endpoint) = match &vhost {
        Some(v) => (
            VsockDevice::Vhost {
                fd: v.raw_fd(),
                cid: v.cid(),
            },
            Endpoint::Vhost { cid: v.cid() },
        ),
        None => {
            let socket = run_dir.join(VHOST_USER_VSOCK_SOCKET);
            let uds = run_dir.join(HYBRID_VSOCK_SOCKET);
            let mut cmd = Command::new(&config.vsock_daemon);
            cmd.args(vsock::hybrid_daemon_args(&socket, &uds));
            place_on_exec(&mut cmd, &config.placement.daemon_cgroup_procs, None)?;
            let daemon = ChildProcess::spawn(VSOCK_DAEMON_NAME, &config.id, cmd, Stdout::Null)?;
            starting.children.push(daemon);
            let daemon = starting.children.last().expect("just pushed");
            daemon.wait_for_path(&socket, timeout).await?;
            (VsockDevice::Hybrid { socket }, Endpoint::Hybrid { uds })
        }
    };

    let virtiofs_socket = match &config.shared_fs {
        Some(fs) => {
            let flavor = virtiofsd::detect_flavor(&fs.daemon, timeout).await?;
            let socket = run_dir.join(VIRTIOFSD_SOCKET);
            let mut cmd = Command::new(&fs.daemon);
            cmd.args(virtiofsd::daemon_args(flavor, &socket, fs));
            place_on_exec(&mut cmd, &config.placement.daemon_cgroup_procs, None)?;
            let daemon = ChildProcess::spawn("virtiofsd", &config.id, cmd, Stdout::Null)?;
            starting.children.push(daemon);
            let daemon = starting.children.last().expect("just pushed");
            daemon.wait_for_path(&socket, timeout).await?;
            Some(socket)
        }
        None => None,
    };

    let qmp_socket = run_dir.join(QMP_SOCKET);
    let args = qemu_args(&QemuArgs {
        config,
        accel,
        qmp_socket: &qmp_socket,
        qmp_debug_socket: &run_dir.join(QMP_DEBUG_SOCKET),
        vsock: &device,
        virtiofs_socket: virtiofs_socket.as_deref(),
    });
    tracing::debug!(vm = %config.id, ?args, "QEMU command line");
    let mut cmd = Command::new(&config.qemu_path);
    cmd.args(&args);
    place_on_exec(
        &mut cmd,
        &config.placement.qemu_cgroup_procs,
        config.placement.qemu_oom_score_adj,
    )?;
    if let VsockDevice::Vhost { fd, .. } = device {
        inherit_fd(&mut cmd, fd);
    }
    for net in &config.net {
        use std::os::fd::AsRawFd;
        inherit_fd(&mut cmd, net.tap.as_raw_fd());
    }
    let console = LineRing::new(CONSOLE_LINES);
    let stdout = Stdout::Lines(
        console.clone(),
        LogAs::GuestConsole {
            vm: config.id.clone(),
        },
    );
    let qemu = ChildProcess::spawn("qemu", &config.id, cmd, stdout)?;
    // QEMU has its own copy of the vhost fd now.
    drop(vhost);
    starting.children.push(qemu);
    let qemu = starting.children.last().expect("just pushed");

    let deadline = Instant::now() + timeout;
    let qmp = async {
        qemu.wait_for_path(&qmp_socket, timeout).await?;
        let stream = loop {
            match UnixStream::connect(&qmp_socket).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    qemu.check_alive().await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => {
                    let what = format!("QMP socket {}", qmp_socket.display());
                    return Err(ProcessError::ReadinessTimeout { what, timeout }.into());
                }
            }
        };
        match tokio::time::timeout_at(deadline, Qmp::handshake(stream)).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(ProcessError::ReadinessTimeout {
                what: "QMP greeting".into(),
                timeout,
            }
            .into()),
        }
    };
    match qmp.await {
        Ok(qmp) => {
            restrict_sockets(run_dir).await?;
            Ok((qmp, console, endpoint))
        }
        // Whatever failed, a dead QEMU is the real cause; its stderr says why. QEMU may be
        // still on its way out (it closed QMP while exiting), so give it a moment.
        Err(error) => match qemu.wait_timeout(EXIT_GRACE).await {
            Some(status) => Err(Error::QemuExited {
                status,
                stderr: qemu.final_stderr().await,
            }),
            None => Err(error),
        },
    }
}

/// Makes every socket in the run directory owner-only (0600); the directory itself is
/// 0700 already, this keeps the sockets private if it is ever loosened.
async fn restrict_sockets(run_dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| Error::RunDir {
        path: run_dir.to_path_buf(),
        source,
    };
    let mut entries = tokio::fs::read_dir(run_dir).await.map_err(err)?;
    while let Some(entry) = entries.next_entry().await.map_err(err)? {
        if entry.file_type().await.map_err(err)?.is_socket() {
            let perms = std::fs::Permissions::from_mode(0o600);
            tokio::fs::set_permissions(entry.path(), perms)
                .await
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Lets the child inherit `fd` (close-on-exec in the parent) under the same number.
fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: the closure runs between fork and exec and only calls fcntl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Creates `path` (and its parents) owner-only (0700); an existing directory must be
/// empty.
async fn create_run_dir(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::RunDir {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(err)?;
    }
    let private = || std::fs::Permissions::from_mode(0o700);
    match tokio::fs::create_dir(path).await {
        Ok(()) => tokio::fs::set_permissions(path, private())
            .await
            .map_err(err),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mut entries = tokio::fs::read_dir(path).await.map_err(err)?;
            if entries.next_entry().await.map_err(err)?.is_some() {
                return Err(Error::RunDirNotEmpty {
                    path: path.to_path_buf(),
                });
            }
            tokio::fs::set_permissions(path, private())
                .await
                .map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Removes a run directory from a synchronous context (drop paths); small and local.
fn remove_dir_logged(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(path = %path.display(), %error, "cannot remove run directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>(_: &T) {}

    #[test]
    fn vm_and_its_futures_are_send() {
        fn check(vm: &Vm) {
            assert_send_sync(vm);
            assert_send_sync(&vm.connect(1, Duration::ZERO));
            assert_send_sync(&vm.wait_exit());
        }
        let _ = check;
        let config = VmConfig::new("t", PathBuf::new(), PathBuf::new(), PathBuf::new());
        assert_send_sync(&Vm::start(config));
    }

    #[test]
    fn connect_error_shows_console_tail() {
        let tail: Vec<String> = (0..40).map(|i| format!("line {i}")).collect();
        let err = Error::Connect {
            port: 1024,
            source: VsockError::Rejected("NO".into()),
            console_tail: tail,
        };
        let text = err.to_string();
        assert!(text.starts_with("cannot connect to guest vsock port 1024; guest console tail:"));
        assert!(
            text.contains("\n  | line 39") && text.contains("line 25") && !text.contains("line 24")
        );
        let err = Error::GuestExited {
            port: 1,
            status: ExitReport {
                code: None,
                signal: Some(9),
            },
            console_tail: vec![],
        };
        assert!(err.to_string().contains("killed by signal 9"), "{err}");
    }

    #[tokio::test]
    async fn run_dir_must_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("a/b");
        create_run_dir(&run).await.unwrap();
        create_run_dir(&run).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&run).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "run directories are owner-only");
        std::fs::write(run.join("x"), b"").unwrap();
        let err = create_run_dir(&run).await.unwrap_err();
        assert!(matches!(err, Error::RunDirNotEmpty { .. }), "{err}");
    }

    fn write_script(path: &Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn failed_start_removes_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let script = dir.path().join("qemu.sh");
        write_script(&script, "echo 'qemu: bad option' >&2\nexit 1\n");
        // A fake vhost-user backend: creates its socket path and waits.
        let daemon = dir.path().join("vsockd.sh");
        write_script(
            &daemon,
            "for a; do case $a in guest-cid=*) s=${a#*socket=}; s=${s%%,*};; esac; done\n\
             touch \"$s\"\nexec sleep 30\n",
        );

        let run_dir = dir.path().join("run");
        let mut config = VmConfig::new("t", kernel.clone(), kernel, run_dir.clone());
        config.qemu_path = script;
        config.accel = Accel::Tcg;
        config.vsock = VsockMode::Hybrid;
        config.vsock_daemon = daemon;
        config.memory_mib = 128;
        config.max_memory_mib = 128;
        match Vm::start(config).await.unwrap_err() {
            Error::QemuExited { status, stderr } => {
                assert_eq!(status.code, Some(1));
                assert_eq!(stderr, "qemu: bad option");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!run_dir.exists());
    }
}
