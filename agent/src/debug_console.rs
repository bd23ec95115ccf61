//! The debug console, as Kata has it: a root shell in the guest, outside every container,
//! served on a vsock port only when the kernel command line asks for it
//! (`agent.debug_console agent.debug_console_vport=<port>`; the shim adds both when
//! `[agent.kata] debug_console_enabled = true`).
//!
//! Each connection gets its own shell (`/bin/sh`, busybox in the guest image) on a fresh
//! pty, started in a session of its own in the agent's namespaces (the guest's root
//! namespaces: the containers have their own). Bytes are copied both ways between the
//! connection and the pty master. When the shell exits the connection is closed; when the
//! connection ends (even half-closed) the shell's session is hung up (SIGHUP, SIGKILL
//! after a grace period): clients end a session by making the shell exit (`exit`, `^D`).
//! Exits are collected by the agent's reaper ([`Exits`]).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::reaper::Exits;

/// The shell the console runs.
pub const SHELL: &str = "/bin/sh";
/// The kernel command line word that turns the console on.
const ENABLE_WORD: &str = "agent.debug_console";
/// The kernel command line parameter naming the port.
const PORT_PARAM: &str = "agent.debug_console_vport=";
/// How long a hung-up shell gets to end before its session is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// A debug console request on the kernel command line that cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleConfigError {
    /// `agent.debug_console_vport=` is not a port number.
    #[error("agent.debug_console_vport={0:?}: expected a vsock port number (1-4294967294)")]
    Port(String),
}

/// Failures serving the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The vsock port could not be bound.
    #[error("cannot listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept on vsock port {port}")]
    Accept {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    /// No pty could be allocated.
    #[error("cannot allocate a pty")]
    Pty(#[source] nix::Error),
    /// A pty fd could not be duplicated.
    #[error("cannot duplicate the pty fd")]
    Dup(#[source] std::io::Error),
    /// The shell did not start.
    #[error("cannot start {SHELL}")]
    Spawn(#[source] std::io::Error),
}

/// The console's port when the kernel command line turns it on (`None`: off). Kata's words:
/// `agent.debug_console` turns it on, `agent.debug_console_vport=<port>` names the port
/// (default [`kata_proto::DEBUG_CONSOLE_VSOCK_PORT`]).
pub fn port_from_cmdline(cmdline: &str) -> Result<Option<u32>, ConsoleConfigError> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.contains(&ENABLE_WORD) {
        return Ok(None);
    }
    match words.iter().rev().find_map(|w| w.strip_prefix(PORT_PARAM)) {
        None => Ok(Some(kata_proto::DEBUG_CONSOLE_VSOCK_PORT)),
        Some(v) => match v.parse::<u32>() {
            Ok(p) if p != 0 && p != u32::MAX => Ok(Some(p)),
            _ => Err(ConsoleConfigError::Port(v.to_owned())),
        },
    }
}

/// Serves the console on vsock `port` until accepting fails.
pub async fn serve_vsock(port: u32, exits: Exits) -> Result<(), ConsoleError> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)
        .map_err(|source| ConsoleError::Listen { port, source })?;
    tracing::warn!(
        port,
        "debug console enabled: a root shell is served on this vsock port"
    );
    loop {
        let (conn, peer) = listener
            .accept()
            .await
            .map_err(|source| ConsoleError::Accept { port, source })?;
        tracing::info!(peer = %peer, "debug console connection");
        let exits = exits.clone();
        tokio::spawn(async move {
            if let Err(e) = session(conn, exits).await {
                tracing::warn!(error = %crate::logging::chain(&e), "debug console session failed");
            }
        });
    }
}

/// One shell on a fresh pty, bridged to `conn` until the shell exits.
pub async fn session<S>(conn: S, exits: Exits) -> Result<(), ConsoleError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let pty = nix::pty::openpty(None, None).map_err(ConsoleError::Pty)?;
    let (master, slave) = (pty.master, pty.slave);
    let pid = spawn_shell(slave)?;
    let exited = exits.watch(pid);
    // Two handles on the master, each owned by one direction: a blocking read never holds
    // up a write.
    let master_out = tokio::fs::File::from_std(std::fs::File::from(
        master.try_clone().map_err(ConsoleError::Dup)?,
    ));
    let mut master_in = tokio::fs::File::from_std(std::fs::File::from(master));
    let (mut conn_rd, mut conn_wr) = tokio::io::split(conn);

    // pty -> client: ends when the shell and everything holding the pty are gone (EIO).
    let mut to_client = tokio::spawn(async move {
        let mut master_out = master_out;
        let mut buf = vec![0u8; 4096];
        loop {
            match master_out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn_wr.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
            }
        }
        let _ = conn_wr.shutdown().await;
        true
    });
    // client -> pty, until the connection ends.
    let mut from_client = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = conn_rd.read(&mut buf).await {
            if n == 0 || master_in.write_all(&buf[..n]).await.is_err() {
                break;
            }
            let _ = master_in.flush().await;
        }
    });

    tokio::select! {
        alive = &mut to_client => {
            from_client.abort();
            if !alive.unwrap_or(false) {
                tracing::info!(pid = pid.as_raw(), "debug console client gone; killing its shell");
                let _ = killpg(pid, Signal::SIGKILL);
            }
        }
        _ = &mut from_client => {
            // The connection ended: hang up the shell's session as a terminal would, and
            // let its last output through.
            let _ = killpg(pid, Signal::SIGHUP);
            if tokio::time::timeout(HANGUP_GRACE, &mut to_client).await.is_err() {
                let _ = killpg(pid, Signal::SIGKILL);
                to_client.abort();
            }
        }
    }
    match tokio::time::timeout(Duration::from_secs(10), exited).await {
        Ok(Ok(exit)) => tracing::info!(code = exit.code(), "debug console shell exited"),
        _ => {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
    Ok(())
}

/// Starts [`SHELL`] on the pty `slave`, in a new session whose controlling terminal it is.
/// The child is reaped by the agent's reaper, never waited for here.
fn spawn_shell(slave: OwnedFd) -> Result<Pid, ConsoleError> {
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(ConsoleError::Dup);
    let (stdin, stdout, stderr) = (dup(&slave)?, dup(&slave)?, slave);
    let mut cmd = Command::new(SHELL);
    cmd.arg("-i")
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .env("TERM", "vt100")
        .env("PS1", "kata-guest# ")
        .current_dir("/")
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (setsid, ioctl) on fds that exist there (stdin is the pty).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(ConsoleError::Spawn)?;
    let pid = Pid::from_raw(child.id() as i32);
    // Dropping a Child neither kills nor waits for it: the reaper collects its exit.
    drop(child);
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_the_command_line_says_so() {
        assert_eq!(port_from_cmdline("console=ttyS0 quiet"), Ok(None));
        assert_eq!(
            port_from_cmdline("agent.debug_console_vport=1027"),
            Ok(None),
            "the port alone does not turn it on"
        );
        assert_eq!(port_from_cmdline("xagent.debug_console"), Ok(None));
    }

    #[test]
    fn port_defaults_and_the_last_one_wins() {
        assert_eq!(
            port_from_cmdline("quiet agent.debug_console\n"),
            Ok(Some(kata_proto::DEBUG_CONSOLE_VSOCK_PORT))
        );
        assert_eq!(
            port_from_cmdline(
                "agent.debug_console agent.debug_console_vport=2000 agent.debug_console_vport=1027"
            ),
            Ok(Some(1027))
        );
        assert_eq!(
            port_from_cmdline("agent.debug_console agent.debug_console_vport=x"),
            Err(ConsoleConfigError::Port("x".into()))
        );
        assert_eq!(
            port_from_cmdline("agent.debug_console agent.debug_console_vport=0"),
            Err(ConsoleConfigError::Port("0".into()))
        );
    }
}
