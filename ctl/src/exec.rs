//! `kata-ctl exec <sandbox-id>`: the guest's debug console, bridged to this terminal.
//!
//! The console exists only in VMs whose guest kernel command line carries
//! `agent.debug_console` (the shim adds it with `[agent.kata] debug_console_enabled =
//! true`); that is read from QEMU's own command line (`/proc/<pid>/cmdline`, the pid from
//! the shim's state record), so a sandbox started without it gets a clear error instead of
//! a refused connection. The address comes from the shim's management server
//! (`/agent-url`: the hybrid vsock socket, `CONNECT <port>`, or the guest's CID).
//!
//! With a terminal on stdin it is put in raw mode (restored on the way out) so keys reach
//! the guest's shell as typed; otherwise stdin is copied as it is (tests feed commands
//! through a pipe), and its end becomes an `exit` command, which ends the shell.
//! The session ends when the guest closes the connection (the shell exited).

use std::os::fd::AsFd;

use kata_hypervisor::vsock::{Endpoint, VsockError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sandboxes::{self, SandboxDir, SandboxError};

/// The key that turns the console on, as the error names it.
pub const ENABLE_KEY: &str = "[agent.kata] debug_console_enabled = true";

/// Failures of `kata-ctl exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The sandbox is unknown, not running, or its shim did not answer.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The VM was started without the console.
    #[error("the debug console of sandbox {id} is off: set {ENABLE_KEY} in configuration.toml and start the sandbox again (the guest kernel command line has no agent.debug_console)")]
    Disabled { id: String },
    /// QEMU's command line could not be read.
    #[error("cannot read the command line of QEMU (pid {pid}) of sandbox {id}")]
    QemuCmdline {
        id: String,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox's VM is not a local QEMU this tool can inspect.
    #[error("sandbox {id} has no local QEMU process (remote VM or a runtime this tool does not know): no debug console")]
    NoLocalVm { id: String },
    /// The console's port did not accept the connection.
    #[error("cannot connect to the debug console of sandbox {id} (vsock port {port})")]
    Connect {
        id: String,
        port: u32,
        #[source]
        source: VsockError,
    },
    /// Terminal settings could not be read or changed.
    #[error("cannot put the terminal in raw mode")]
    Terminal(#[source] nix::Error),
    /// Copying between the terminal and the guest failed.
    #[error("debug console I/O")]
    Io(#[source] std::io::Error),
}

/// The debug console's vsock port from the guest kernel command line inside QEMU's
/// arguments (`None`: the console is off).
pub fn console_port(qemu_args: &[String]) -> Option<u32> {
    let append = qemu_args
        .windows(2)
        .filter(|w| w[0] == "-append")
        .map(|w| w[1].as_str())
        .next_back()?;
    let words: Vec<&str> = append.split_whitespace().collect();
    if !words.contains(&"agent.debug_console") {
        return None;
    }
    let port = words
        .iter()
        .rev()
        .find_map(|w| w.strip_prefix("agent.debug_console_vport="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(kata_proto::DEBUG_CONSOLE_VSOCK_PORT);
    Some(port)
}

/// A process's arguments (`/proc/<pid>/cmdline`).
pub fn process_args(pid: u32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Where the console of `sandbox` is: the endpoint and the port, or why there is none.
pub async fn locate(sandbox: &SandboxDir) -> Result<(Endpoint, u32), ExecError> {
    let id = sandbox.id.clone();
    if !sandbox.running() {
        return Err(SandboxError::NotRunning {
            id,
            socket: sandbox.socket(),
        }
        .into());
    }
    let record = sandbox
        .record
        .as_ref()
        .filter(|r| r.remote.is_none() && r.qemu_pid != 0)
        .ok_or_else(|| ExecError::NoLocalVm { id: id.clone() })?;
    let pid = record.qemu_pid;
    if !sandboxes::same_process(pid, record.qemu_start_time) {
        return Err(ExecError::NoLocalVm { id });
    }
    let args = process_args(pid).map_err(|source| ExecError::QemuCmdline {
        id: id.clone(),
        pid,
        source,
    })?;
    let port = console_port(&args).ok_or(ExecError::Disabled { id: id.clone() })?;
    let (_, endpoint) = sandbox.endpoint().await?;
    Ok((endpoint, port))
}

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Raw mode on stdin when it is a terminal (`None` otherwise).
    fn enter() -> Result<Option<Self>, ExecError> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !nix::unistd::isatty(libc::STDIN_FILENO).unwrap_or(false) {
            return Ok(None);
        }
        let saved = tcgetattr(stdin.as_fd()).map_err(ExecError::Terminal)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(ExecError::Terminal)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Opens the debug console of sandbox `id` and bridges it to stdin/stdout until the guest
/// closes it.
pub async fn run(roots: &[std::path::PathBuf], id: &str) -> Result<(), ExecError> {
    let sandbox = sandboxes::find(roots, id)?;
    let (endpoint, port) = locate(&sandbox).await?;
    let stream = endpoint
        .connect_once(port)
        .await
        .map_err(|source| ExecError::Connect {
            id: sandbox.id.clone(),
            port,
            source,
        })?;
    let raw = RawMode::enter()?;
    let result = bridge(stream).await;
    drop(raw);
    result
}

/// Copies stdin to `stream` and `stream` to stdout; ends when `stream` ends.
async fn bridge<S>(stream: S) -> Result<(), ExecError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    // stdin -> guest. The end of stdin becomes an `exit` command (after a newline when the
    // last line had none), not a closed connection (the agent hangs the shell up when the
    // connection ends, and not every vsock transport carries a half-close): the shell
    // finishes what it was given and its last output still comes back. A `^D` would not
    // do: typed ahead before the shell's line editing starts, the pty drops it. Reading
    // stdin blocks a thread; it is abandoned when the guest side ends.
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        let mut at_line_start = true;
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    at_line_start = matches!(buf[n - 1], b'\n' | b'\r');
                    if to_guest.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let eof: &[u8] = if at_line_start {
            b"exit\n"
        } else {
            b"\nexit\n"
        };
        let _ = to_guest.write_all(eof).await;
        let _ = to_guest.flush().await;
        std::future::pending::<()>().await;
    });
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 4096];
    let result = loop {
        match from_guest.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = stdout.write_all(&buf[..n]).await {
                    break Err(ExecError::Io(e));
                }
                let _ = stdout.flush().await;
            }
            Err(e) => break Err(ExecError::Io(e)),
        }
    };
    input.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(append: &str) -> Vec<String> {
        ["qemu-system-x86_64", "-kernel", "/k", "-append", append]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn the_port_comes_from_the_guest_command_line() {
        assert_eq!(console_port(&args("console=ttyS0 quiet")), None);
        assert_eq!(
            console_port(&args(
                "console=ttyS0 agent.debug_console agent.debug_console_vport=1027"
            )),
            Some(1027)
        );
        assert_eq!(
            console_port(&args("agent.debug_console")),
            Some(kata_proto::DEBUG_CONSOLE_VSOCK_PORT)
        );
        assert_eq!(console_port(&["qemu".to_string()]), None);
    }

    #[test]
    fn disabled_names_the_key() {
        let e = ExecError::Disabled { id: "abc".into() }.to_string();
        assert!(e.contains("debug console of sandbox abc is off"), "{e}");
        assert!(
            e.contains("[agent.kata] debug_console_enabled = true"),
            "{e}"
        );
    }
}
