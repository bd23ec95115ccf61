//! The zombie reaper of PID 1, and the table that hands exits to whoever waits for them.
//!
//! Every orphan in the guest becomes our child. On each SIGCHLD the reaper calls
//! `waitpid(-1, WNOHANG)` until nothing is left and delivers each exit to the watcher of
//! that pid ([`Exits::watch`]). An exit nobody watches yet is kept (bounded) so that a
//! process which exits before its watcher registers is not lost: container processes are
//! forked by a helper and their pid is learnt only afterwards.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How many unclaimed exits are kept.
const UNCLAIMED_CAPACITY: usize = 1024;

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

#[derive(Debug, Default)]
struct Table {
    watchers: HashMap<Pid, oneshot::Sender<Exit>>,
    unclaimed: HashMap<Pid, Exit>,
    order: VecDeque<Pid>,
}

/// The exit table shared by the reaper and the process owners.
#[derive(Debug, Clone, Default)]
pub struct Exits {
    table: Arc<Mutex<Table>>,
}

impl Exits {
    /// Delivers `pid`'s exit once it is reaped (or at once if it already was). Register
    /// while the process is known to be ours: an unclaimed exit of an older process with
    /// the same pid is told apart because our process still exists (`/proc/<pid>`).
    pub fn watch(&self, pid: Pid) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.lock();
        if let Some(exit) = t.unclaimed.remove(&pid) {
            t.order.retain(|p| *p != pid);
            let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            if gone {
                let _ = tx.send(exit);
                return rx;
            }
        }
        t.watchers.insert(pid, tx);
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reaps every child that has exited and delivers its exit. The table stays locked
    /// while reaping so that [`watch`](Self::watch) sees a consistent picture.
    fn reap_all(&self) {
        let mut t = self.lock();
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return };
                    tracing::debug!(%pid, ?status, "reaped");
                    let exit = Exit { pid, status };
                    match t.watchers.remove(&pid) {
                        // A dropped receiver means nobody cares any more.
                        Some(tx) => {
                            let _ = tx.send(exit);
                        }
                        None => {
                            if t.unclaimed.insert(pid, exit).is_none() {
                                t.order.push_back(pid);
                            }
                            while t.order.len() > UNCLAIMED_CAPACITY {
                                if let Some(old) = t.order.pop_front() {
                                    t.unclaimed.remove(&old);
                                }
                            }
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(errno = %e, "waitpid");
                    return;
                }
            }
        }
    }
}

/// Installs the SIGCHLD handler and spawns the reaping task on the current runtime.
pub fn start(exits: Exits) -> Result<(), ReaperError> {
    let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
    tokio::spawn(async move {
        loop {
            // Children that exited before the handler was installed are reaped on the
            // first pass.
            exits.reap_all();
            if sigchld.recv().await.is_none() {
                tracing::error!("SIGCHLD stream ended; reaper stops");
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // One test drives the process-wide reaper: two reapers in one test binary would steal
    // each other's children.
    #[tokio::test]
    async fn delivers_exits_to_watchers_registered_before_or_after_reaping() {
        let exits = Exits::default();
        start(exits.clone()).unwrap();
        // The reaper under test collects these children, not `Child::wait`.
        #[allow(clippy::zombie_processes)]
        let spawn = |script: &str| {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            Pid::from_raw(child.id() as i32)
        };
        // Watched before it exits.
        let pid = spawn("sleep 0.2; exit 3");
        let rx = exits.watch(pid);
        let exit = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), 3);
        // Reaped before anyone watches: kept, then delivered at once.
        let pid = spawn("exit 5");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !exits.lock().unclaimed.contains_key(&pid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(exits.watch(pid).await.unwrap().code(), 5);
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
