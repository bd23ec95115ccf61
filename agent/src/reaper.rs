//! The zombie reaper of PID 1.
//!
//! Every orphan in the guest becomes our child. On each SIGCHLD the reaper calls
//! `waitpid(-1, WNOHANG)` until nothing is left and publishes each exit on a broadcast
//! channel, so a process table can claim the statuses of its own pids by subscribing
//! (before it spawns, so that no exit is missed).

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// How many exits a slow subscriber may lag behind.
const CHANNEL_CAPACITY: usize = 1024;

/// A failure to start the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The SIGCHLD handler could not be installed.
    #[error("install SIGCHLD handler")]
    Signal(#[source] std::io::Error),
}

/// One reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The child's pid.
    pub pid: Pid,
    /// How it ended.
    pub status: WaitStatus,
}

impl Exit {
    /// The shell-style exit code: the exit status, or 128 + signal for a signal death.
    pub fn code(&self) -> i32 {
        match self.status {
            WaitStatus::Exited(_, c) => c,
            WaitStatus::Signaled(_, s, _) => 128 + s as i32,
            _ => 0,
        }
    }
}

/// A handle to subscribe to exits.
#[derive(Debug, Clone)]
pub struct Reaper {
    tx: broadcast::Sender<Exit>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and spawns the reaping task on the current runtime.
    pub fn start() -> Result<Self, ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let reaper = Self { tx: tx.clone() };
        tokio::spawn(async move {
            loop {
                // Children that exited before the handler was installed are reaped on the
                // first pass.
                reap_all(&tx);
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; reaper stops");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Exits reaped from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Exit> {
        self.tx.subscribe()
    }
}

/// Reaps every child that has exited and publishes it.
fn reap_all(tx: &broadcast::Sender<Exit>) {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => {
                let Some(pid) = status.pid() else { return };
                tracing::debug!(%pid, ?status, "reaped");
                // No subscriber is normal: an orphan nobody waits for.
                let _ = tx.send(Exit { pid, status });
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(errno = %e, "waitpid");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn publishes_exit_codes_of_children() {
        let reaper = Reaper::start().unwrap();
        let mut rx = reaper.subscribe();
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // The reaper, not `Child::wait`, collects the status.
        std::mem::forget(child);
        let exit = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let e = rx.recv().await.unwrap();
                if e.pid == pid {
                    return e;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(exit.code(), 3);
    }

    #[test]
    fn signal_death_is_128_plus_signal() {
        let pid = Pid::from_raw(7);
        let e = Exit {
            pid,
            status: WaitStatus::Signaled(pid, nix::sys::signal::SIGKILL, false),
        };
        assert_eq!(e.code(), 137);
    }
}
