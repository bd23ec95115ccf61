//! The shim process's life: flags, the `start` and `delete` commands, and server mode.
//!
//! Built from containerd-shim's public pieces rather than its `run()`, which exits when
//! TTRPC_ADDRESS is empty (CRI-O), parses stdin as runc options, and installs a SIGCHLD
//! reaper whose `waitpid(-1)` would steal the exit statuses of QEMU and its daemons (those
//! are owned and reaped through tokio).
//!
//! - `start` (cwd = bundle): groups by the CRI sandbox id, prints the address of the pod's
//!   live shim or spawns a new server and prints its address once it serves.
//! - `delete`: cleans up after a dead shim ([`crate::sandbox::cleanup`]) and prints a DeleteResponse.
//! - server (`-socket <address>`): subreaper, logging ([`crate::logging`]: the bundle's
//!   `log` fifo and the journal), optional event publisher, the Task service (timed for
//!   metrics) and the management server ([`crate::monitor`]); runs until Shutdown or
//!   SIGTERM/SIGINT, then tears the sandbox down.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::monitor::rpc::Timed;
use crate::monitor::ShimMonitor;
use crate::sandbox::cleanup;
use crate::task::container::{to_timestamp, ExitInfo};
use crate::task::events;
use crate::task::service::Service;
use crate::task::spec;
use crate::task::TaskService;

/// The name containerd knows us by.
pub const BINARY_NAME: &str = "containerd-shim-kata-v2";
/// How long queued log lines get to be written before the process exits.
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long queued events get to go out before the server exits.
const EVENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors of the shim process itself (not of RPCs).
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("invalid arguments")]
    Flags(#[source] containerd_shim::Error),
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    #[error("-socket is required in server mode")]
    NoSocket,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the shim server exited during start ({status}): {output}")]
    ServerDied {
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("cannot connect to containerd's event service at {address}")]
    Publisher {
        address: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("ttrpc server")]
    Ttrpc(#[source] ttrpc::Error),
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] nix::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let what = what.into();
    move |source| BootstrapError::Io { what, source }
}

/// Entry point of the binary; returns the exit code.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut server_mode = false;
    let result = containerd_shim::parse(&args)
        .map_err(BootstrapError::Flags)
        .and_then(|flags| {
            if flags.version {
                println!(
                    "{BINARY_NAME} version {} (agent protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    kata_proto::PROTOCOL_VERSION
                );
                return Ok(());
            }
            match flags.action.as_str() {
                "start" => start(&flags),
                "delete" => delete(&flags),
                "" => {
                    server_mode = true;
                    serve(&flags)
                }
                other => Err(BootstrapError::UnknownAction(other.to_owned())),
            }
        });
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            // In `start` stderr goes to containerd as the error text. A server that fails
            // before it is ready still has the `start` process's pipe as stdout.
            let message = crate::report::chain(&e);
            tracing::error!(error = %message, "shim failed");
            if server_mode {
                println!("{message}");
            } else {
                eprintln!("{BINARY_NAME}: {message}");
            }
            1
        }
    };
    // The log threads get a moment to write what is queued (not forever: a stalled reader).
    crate::logging::flush(LOG_FLUSH_TIMEOUT);
    code
}

/// The filesystem path of a `unix://` address.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn socket_alive(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Writes `<bundle>/address` atomically.
fn write_address_file(bundle: &Path, address: &str) -> Result<(), BootstrapError> {
    let tmp = bundle.join(".address");
    let path = bundle.join("address");
    std::fs::write(&tmp, address).map_err(io_err("cannot write the address file"))?;
    std::fs::rename(&tmp, &path).map_err(io_err("cannot write the address file"))
}

/// `start`: print the pod shim's address, spawning the server if none serves it yet.
fn start(flags: &Flags) -> Result<(), BootstrapError> {
    // Runtime options may arrive on stdin; the server receives them again with Create.
    let mut options = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut options);
    let bundle = std::env::current_dir().map_err(io_err("cannot read the bundle directory"))?;
    let spec = spec::load_sync(&bundle).ok();
    let grouping = spec::sandbox_id(spec.as_ref(), &flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &grouping);
    let path = socket_path(&address).to_owned();
    if !socket_alive(&path) {
        let pid = spawn_server(flags, &bundle, &address)?;
        // As runc's shim does: tools find the shim of a task here.
        std::fs::write(bundle.join("shim.pid"), pid.to_string())
            .map_err(io_err("cannot write shim.pid"))?;
    }
    write_address_file(&bundle, &address)?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())
        .and_then(|()| out.flush())
        .map_err(io_err("cannot print the address"))
}

/// Starts ourselves in server mode and waits until it serves (it closes its stdout) or
/// dies. Returns the server's pid.
fn spawn_server(flags: &Flags, bundle: &Path, address: &str) -> Result<u32, BootstrapError> {
    let exe = std::env::current_exe().map_err(io_err("cannot find our own binary"))?;
    let mut cmd = Command::new(exe);
    cmd.current_dir(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", address]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    let mut child = cmd
        .spawn()
        .map_err(io_err("cannot spawn the shim server"))?;
    // EOF once the server signalled readiness (dup2 over stdout) or exited; before that
    // it writes only its fatal error there.
    let mut output = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut output);
    }
    // The server closes the pipe right before exiting on error: give it a moment.
    let mut status = child.try_wait();
    for _ in 0..50 {
        if !matches!(status, Ok(None)) || output.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        status = child.try_wait();
    }
    match status {
        // Exit 0: another shim serves this address (a concurrent start won the race).
        Ok(Some(status)) if !status.success() => Err(BootstrapError::ServerDied {
            status,
            output: String::from_utf8_lossy(&output).trim().to_owned(),
        }),
        _ => Ok(child.id()),
    }
}

/// `delete`: clean up after a dead shim, print the DeleteResponse.
fn delete(flags: &Flags) -> Result<(), BootstrapError> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(io_err("cannot read the bundle directory"))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    // containerd shows our stderr when delete fails; the journal keeps it either way.
    init_logging(&bundle, &flags.id, flags.debug, None);
    let response = delete_action(&bundle, &flags.id);
    let bytes = response.write_to_bytes().map_err(|e| BootstrapError::Io {
        what: "cannot encode the delete response".into(),
        source: std::io::Error::other(e),
    })?;
    let mut out = std::io::stdout();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(io_err("cannot print the delete response"))
}

/// What `delete` reports: killed by SIGKILL.
pub const DELETED_EXIT_STATUS: u32 = 128 + 9;

/// The `delete` command for container `container_id` with bundle `bundle`: kills and
/// removes what a dead shim left behind and returns the response to print.
pub fn delete_action(bundle: &Path, container_id: &str) -> DeleteResponse {
    let spec = spec::load_sync(bundle).ok();
    let sandbox_id = spec::sandbox_id(spec.as_ref(), container_id);
    let paths = crate::sandbox::SandboxPaths::new(&sandbox_id);
    if sandbox_id == container_id {
        cleanup::cleanup_sandbox(&paths);
    } else {
        cleanup::cleanup_container(&paths, container_id);
    }
    if let Err(error) = crate::sandbox::mounts::unmount_under(&bundle.join("rootfs")) {
        tracing::warn!(error = %crate::report::chain(&error), "unmounting bundle rootfs");
    }
    let exit = ExitInfo::now(DELETED_EXIT_STATUS);
    DeleteResponse {
        pid: 0,
        exit_status: exit.status,
        exited_at: Some(to_timestamp(exit.at)).into(),
        ..Default::default()
    }
}

/// Logs to `fifo` (else stderr) and the journal, as sandbox `id`'s shim (the pod's id
/// from the bundle's spec, else `id`).
fn init_logging(bundle: &Path, id: &str, debug: bool, fifo: Option<std::fs::File>) {
    let spec = spec::load_sync(bundle).ok();
    crate::logging::init(crate::logging::Settings {
        sandbox_id: spec::sandbox_id(spec.as_ref(), id),
        debug: debug || std::env::var_os("KATA_SHIM_DEBUG").is_some(),
        fifo,
        journal_socket: crate::logging::journal::JOURNAL_SOCKET.into(),
    });
}

/// The bundle's `log` fifo (containerd or CRI-O hold its reader), opened for writing
/// without waiting for a reader; `None` when there is none. The writes themselves may
/// block: a logging thread of its own does them ([`crate::logging`]).
fn open_log_fifo() -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok()?;
    nix::fcntl::fcntl(
        f.as_raw_fd(),
        nix::fcntl::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .ok()?;
    Some(f)
}

/// Server mode.
fn serve(flags: &Flags) -> Result<(), BootstrapError> {
    if flags.socket.is_empty() {
        return Err(BootstrapError::NoSocket);
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(BootstrapError::Subreaper)?;
    let bundle = std::env::current_dir().map_err(io_err("cannot read the bundle directory"))?;
    init_logging(&bundle, &flags.id, flags.debug, open_log_fifo());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err("cannot start the async runtime"))?;
    let result = runtime.block_on(serve_async(flags));
    // A stdin fifo open may still wait for a writer on the blocking pool.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

enum Bound {
    Listener(UnixListener),
    /// Another live shim serves this socket.
    Taken,
}

fn bind(path: &str) -> Result<Bound, BootstrapError> {
    if let Some(parent) = Path::new(path).parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(Bound::Listener(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if socket_alive(path) {
                return Ok(Bound::Taken);
            }
            tracing::info!(socket = path, "removing stale socket");
            std::fs::remove_file(path)
                .map_err(io_err(format!("cannot remove stale socket {path}")))?;
            UnixListener::bind(path)
                .map(Bound::Listener)
                .map_err(io_err(format!("cannot listen on {path}")))
        }
        Err(e) => Err(io_err(format!("cannot listen on {path}"))(e)),
    }
}

/// Tells the `start` process we serve: our stdout (its pipe) becomes our stderr.
fn signal_ready() {
    if let Err(error) = nix::unistd::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) {
        tracing::warn!(%error, "cannot close the start pipe");
    }
}

async fn serve_async(flags: &Flags) -> Result<(), BootstrapError> {
    let path = socket_path(&flags.socket).to_owned();
    let listener = match bind(&path)? {
        Bound::Listener(l) => l,
        Bound::Taken => {
            tracing::info!(socket = %path, "another shim already serves this socket");
            signal_ready();
            return Ok(());
        }
    };
    let publisher = match std::env::var("TTRPC_ADDRESS") {
        Ok(address) if !address.is_empty() => Some(
            RemotePublisher::new(&address)
                .await
                .map_err(|source| BootstrapError::Publisher { address, source })?,
        ),
        _ => {
            tracing::info!("TTRPC_ADDRESS is empty: events are not published");
            None
        }
    };
    let exit = Arc::new(ExitSignal::default());
    let (events, _forwarder) = events::start(publisher, flags.namespace.clone());
    let monitor = ShimMonitor::new();
    let tasks = Arc::new(
        TaskService::new(flags.namespace.clone(), events.clone(), exit.clone())
            .with_monitor(monitor.clone()),
    );
    let service = create_task(Arc::new(Timed::new(
        Service(tasks.clone()),
        monitor.rpc_durations().clone(),
    )));
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(ttrpc::asynchronous::transport::Listener::from(listener))
        .register_service(service);
    server.start().await.map_err(BootstrapError::Ttrpc)?;
    tracing::info!(socket = %path, id = %flags.id, "shim serving");
    signal_ready();

    let mut term = signal(SignalKind::terminate()).map_err(io_err("cannot handle SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("cannot handle SIGINT"))?;
    tokio::select! {
        () = exit.wait() => tracing::info!("shutdown requested"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    tasks.teardown_sandbox().await;
    if !events.flush(EVENT_FLUSH_TIMEOUT).await {
        tracing::warn!("some events were not published before exit");
    }
    if let Err(error) = server.shutdown().await {
        tracing::debug!(%error, "ttrpc server shutdown");
    }
    if let Err(error) = std::fs::remove_file(&path) {
        tracing::debug!(%error, "removing socket");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_drop_the_scheme() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/abc"),
            "/run/containerd/s/abc"
        );
        assert_eq!(socket_path("/x"), "/x");
    }

    #[test]
    fn grouping_uses_the_sandbox_id_for_the_address() {
        let spec = spec::parse(
            br#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-id":"pod"}}"#,
        )
        .unwrap();
        let a = containerd_shim::socket_address(
            "/run/containerd/containerd.sock",
            "k8s.io",
            &spec::sandbox_id(Some(&spec), "ctr1"),
        );
        let b = containerd_shim::socket_address("/run/containerd/containerd.sock", "k8s.io", "pod");
        assert_eq!(a, b);
        assert!(a.starts_with("unix:///run/containerd/s/"));
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s").join("sock");
        let path = path.to_str().unwrap();
        let Bound::Listener(live) = bind(path).unwrap() else {
            panic!("fresh bind");
        };
        assert!(matches!(bind(path).unwrap(), Bound::Taken));
        drop(live);
        // The socket file stays behind, with nobody listening.
        assert!(Path::new(path).exists());
        assert!(matches!(bind(path).unwrap(), Bound::Listener(_)));
    }
}
