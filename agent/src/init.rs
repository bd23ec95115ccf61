//! The boot sequence of PID 1, and the plain serving mode used when run by hand.
//!
//! PID 1 must never exit (the kernel panics): every failure here is logged and either
//! skipped (mounts, modules) or retried (runtime, server).

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::logging::{self, chain};
use crate::modules::{load_from_list, KernelModuleLoader, MODULE_LIST};
use crate::mounts::{mount_all, SyscallMounter, BOOT_MOUNTS};
use crate::server::{self, serve_forever, ServerError};
use crate::service::{Agent, AgentOptions, ShutdownMode};

/// Environment variable with the log level when not PID 1 (`debug`, `info`, ...).
pub const ENV_LOG: &str = "KATA_AGENT_LOG";

/// A failure of the agent run by hand (PID 1 never fails).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The tokio runtime could not be built.
    #[error("build tokio runtime")]
    Runtime(#[source] std::io::Error),
    /// The server could not start.
    #[error("serve")]
    Server(#[from] ServerError),
    /// Termination signals could not be caught.
    #[error("install signal handler")]
    Signal(#[source] std::io::Error),
}

/// Runs the agent. As PID 1 this never returns; otherwise it serves until SIGINT or
/// SIGTERM.
pub fn run(cfg: Config) -> Result<(), InitError> {
    if cfg.pid1 {
        run_pid1(cfg)
    } else {
        run_by_hand(cfg)
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run_pid1(cfg: Config) -> ! {
    // A root filesystem mounted from a disk (the pmem image) is pivotable as it is.
    let root_error = if root_is_initramfs() {
        make_root_pivotable().err()
    } else {
        None
    };
    let mount_errors = mount_all(&SyscallMounter, BOOT_MOUNTS);
    ensure_std_fds();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    logging::init(true, &cmdline);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "kata-agent starting as PID 1"
    );
    if let Some(e) = root_error {
        tracing::error!(error = %e, "cannot move / onto a bind mount; containers cannot pivot_root");
    }
    for e in &mount_errors {
        tracing::error!(error = %chain(e), "boot mount failed");
    }
    let loaded_modules = load_from_list(&KernelModuleLoader, Path::new(MODULE_LIST));
    // Peer pod VM: the agent is reached over TLS on the network (see `crate::peerpod`).
    let network = crate::peerpod::requested(&cmdline).then(crate::peerpod::boot_or_power_off);
    let agent = Arc::new(Agent::new(AgentOptions {
        base_dir: cfg.base_dir.clone(),
        shutdown: ShutdownMode::PowerOff,
        loaded_modules,
        mounter: Arc::new(SyscallMounter),
    }));
    let listen = match &network {
        Some(n) => {
            crate::peerpod::configure_images(n, agent.images());
            format!("unix://{}", crate::peerpod::TTRPC_SOCKET)
        }
        None => cfg.listen.clone(),
    };
    // A panic that unwinds out of main would end PID 1 and panic the kernel: log it to the
    // console and start the runtime again instead.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "kata-agent panicked");
    }));
    loop {
        match runtime() {
            Ok(rt) => {
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rt.block_on(async {
                        if let Err(e) = crate::reaper::start(agent.exits().clone()) {
                            tracing::error!(error = %chain(&e), "no zombie reaper");
                        }
                        match &network {
                            Some(n) => crate::peerpod::spawn_front(n, agent.stdio().clone()),
                            None => spawn_stdio_listener(agent.stdio().clone()),
                        }
                        spawn_debug_console(&cmdline, agent.exits().clone());
                        serve_forever(&listen, agent.clone()).await
                    })
                }));
                if served.is_err() {
                    tracing::error!("agent runtime panicked; restarting it in 1s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot build tokio runtime; retrying in 1s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Whether `/` is the initramfs (ramfs or tmpfs) rather than a filesystem mounted from a
/// device; when in doubt, initramfs.
fn root_is_initramfs() -> bool {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; neither libc nor nix names it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    statfs("/").map_or(true, |s| {
        s.filesystem_type() == RAMFS_MAGIC || s.filesystem_type() == TMPFS_MAGIC
    })
}

/// The initramfs root has no parent mount, and `pivot_root(2)` refuses such a root
/// ("not attached"), so containers could not pivot. Like `switch_root`, move onto a mount
/// of our own first: bind `/` at `/sysroot`, move that bind onto `/` and chroot into it.
/// Everything mounted later lands on the bind.
fn make_root_pivotable() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    const SYSROOT: &str = "/sysroot";
    let step = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    match std::fs::create_dir(SYSROOT) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {SYSROOT}: {e}")),
    }
    step(
        "bind / on /sysroot",
        mount(
            Some("/"),
            SYSROOT,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    step("chdir /sysroot", nix::unistd::chdir(SYSROOT))?;
    step(
        "move /sysroot onto /",
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
    )?;
    step("chroot", nix::unistd::chroot("."))?;
    step("chdir /", nix::unistd::chdir("/"))
}

/// Serves stdio connections on vsock for as long as the runtime lives; a failure to bind
/// or accept is logged and retried every second.
fn spawn_stdio_listener(registry: crate::stdio::Registry) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = crate::stdio::serve_vsock(registry.clone()).await {
                tracing::error!(error = %e, "stdio listener failed; retrying in 1s");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Serves the debug console when the kernel command line turns it on; a failure to bind
/// or accept is logged and retried every second.
fn spawn_debug_console(cmdline: &str, exits: crate::reaper::Exits) {
    let port = match crate::debug_console::port_from_cmdline(cmdline) {
        Ok(Some(port)) => port,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "debug console not started");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            if let Err(e) = crate::debug_console::serve_vsock(port, exits.clone()).await {
                tracing::error!(error = %chain(&e), "debug console failed; retrying in 1s");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Makes sure fds 0-2 are open: without `/dev/console` in the initramfs the kernel
/// starts init with none, and the first files opened would silently become stdio.
fn ensure_std_fds() {
    for fd in 0..=2 {
        if fcntl(fd, FcntlArg::F_GETFD) != Err(Errno::EBADF) {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        let Ok(file) = file else { continue };
        if file.as_raw_fd() == fd {
            // The lowest free fd was the one missing: keep it open for good.
            let _: RawFd = file.into_raw_fd();
        } else {
            let _ = nix::unistd::dup2(file.as_raw_fd(), fd);
        }
    }
}

fn run_by_hand(cfg: Config) -> Result<(), InitError> {
    let level = std::env::var(ENV_LOG)
        .map(|v| format!("agent.log={v}"))
        .unwrap_or_default();
    logging::init(false, &level);
    let rt = runtime().map_err(InitError::Runtime)?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(InitError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(InitError::Signal)?;
        let agent = Arc::new(Agent::new(AgentOptions {
            base_dir: cfg.base_dir.clone(),
            shutdown: ShutdownMode::Exit,
            loaded_modules: Vec::new(),
            mounter: Arc::new(SyscallMounter),
        }));
        // Processes the agent runs are reparented to it, as they would be to PID 1.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if let Err(e) = crate::reaper::start(agent.exits().clone()) {
            tracing::warn!(error = %chain(&e), "no reaper: container exits will not be seen");
        }
        let mut server = server::start(&cfg.listen, agent).await?;
        tracing::info!(addr = %cfg.listen, base_dir = %cfg.base_dir.display(), "serving ttrpc (not PID 1)");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("terminating");
        let _ = server.shutdown().await;
        Ok(())
    })
}
