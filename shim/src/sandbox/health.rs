//! One rule for a sandbox's health: when the VM can no longer be trusted to run the pod,
//! the sandbox is *fenced* — QEMU and every daemon are killed and reaped — and only then is
//! the fault published, so that the task layer reports every process exited. There is
//! never a stopped task whose VM still runs, and nothing of the guest writes to host
//! volumes after its processes were reported dead (virtiofsd carries the guest's queued
//! writes, so it dies with QEMU).
//!
//! Faults, each detected by an event rather than by polling process state:
//! - a child of the VM (QEMU, virtiofsd, the vsock daemon) exits: its reaper (SIGCHLD);
//! - the guest kernel panics: QMP `GUEST_PANICKED` from the pvpanic device, or QEMU's exit
//!   after a panic line on the console (a guest without the pvpanic driver reboots, and
//!   `-no-reboot` turns that into an exit);
//! - the agent is lost: `failures` health probes in a row, `interval` apart and each
//!   bounded by `interval`, unanswered on a connection of their own;
//! - a caller gives up on the guest (a Kill or Delete the agent did not answer in time):
//!   [`Fencer::fence`] with [`Fault::Unresponsive`].
//!
//! The first fault wins; a teardown in progress (a normal stop) suppresses them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kata_hypervisor::vm::ChildDeath;
use tokio::sync::{broadcast, watch};

use super::machine::Machine;

use super::agent::{AgentClient, AgentError, DownReason};
use super::placement::SandboxCgroups;

/// A console line that marks a guest kernel panic.
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// Why a sandbox was ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// QEMU or a daemon of the VM exited on its own.
    ChildExited(ChildDeath),
    /// The guest kernel panicked; the console's panic line when there was one.
    GuestPanicked { line: Option<String> },
    /// The agent missed `misses` health probes in a row.
    AgentLost {
        misses: u32,
        interval: Duration,
        last_error: String,
    },
    /// A request the guest had to answer got no answer in time.
    Unresponsive {
        request: &'static str,
        timeout: Duration,
    },
    /// The main agent connection broke while the VM still ran.
    AgentConnectionLost { error: String },
    /// The host's OOM killer killed a VM process in the pod's host cgroup: the pod's
    /// memory limit does not cover the VM.
    HostOutOfMemory {
        death: ChildDeath,
        cgroup: String,
        /// The directory whose limit applies, and the limit in bytes.
        limit: Option<(std::path::PathBuf, u64)>,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::ChildExited(death) => write!(f, "{death}"),
            Fault::GuestPanicked { line: Some(line) } => {
                write!(f, "the guest kernel panicked: {line}")
            }
            Fault::GuestPanicked { line: None } => f.write_str("the guest kernel panicked"),
            Fault::AgentLost {
                misses,
                interval,
                last_error,
            } => write!(
                f,
                "the agent did not answer {misses} health checks {interval:?} apart (last: {last_error})"
            ),
            Fault::Unresponsive { request, timeout } => write!(
                f,
                "the agent did not answer {request} within {timeout:?}"
            ),
            Fault::AgentConnectionLost { error } => {
                write!(f, "the agent connection broke: {error}")
            }
            Fault::HostOutOfMemory {
                death,
                cgroup,
                limit,
            } => {
                write!(f, "{death}: the host's OOM killer in the pod's host cgroup {cgroup}")?;
                if let Some((dir, bytes)) = limit {
                    write!(
                        f,
                        " (memory limit {} MiB set on {}) — the limit does not cover the VM; raise the pod's limit or the RuntimeClass overhead",
                        bytes >> 20,
                        dir.display()
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// How the running agent is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time between probes; also each probe's bound.
    pub interval: Duration,
    /// Misses in a row that make the agent lost.
    pub failures: u32,
}

/// Fences a sandbox's VM once and publishes why.
#[derive(Debug)]
pub struct Fencer {
    vm: Machine,
    sandbox_id: String,
    started: AtomicBool,
    /// `Some(reason)` once the VM is fenced; what every later guest-bound call fails with.
    fault: watch::Sender<Option<Arc<Fault>>>,
    /// The same reason as text, for the agent client.
    reason: watch::Sender<Option<Arc<str>>>,
    /// True once a normal teardown began: faults are expected then and ignored.
    stopping: watch::Sender<bool>,
}

impl Fencer {
    /// A fencer for `vm`, with no fault yet.
    pub fn new(vm: Machine, sandbox_id: &str) -> Self {
        Self {
            vm,
            sandbox_id: sandbox_id.to_owned(),
            started: AtomicBool::new(false),
            fault: watch::channel(None).0,
            reason: watch::channel(None).0,
            stopping: watch::channel(false).0,
        }
    }

    /// What agent clients watch to fail fast once the sandbox is down.
    pub fn down_reason(&self) -> DownReason {
        self.reason.subscribe()
    }

    /// Turns `Some` once the VM is fenced (killed and reaped).
    pub fn fault_watch(&self) -> watch::Receiver<Option<Arc<Fault>>> {
        self.fault.subscribe()
    }

    /// The fault, if the sandbox was fenced.
    pub fn fault(&self) -> Option<Arc<Fault>> {
        self.fault.borrow().clone()
    }

    /// Marks the start of a normal teardown: later faults are not reported.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true once a normal teardown began.
    pub fn stopping_watch(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Whether a normal teardown began.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Ends the sandbox for `fault`: kills and reaps QEMU and its daemons, then publishes
    /// the fault. The first caller does it; later callers wait until it is published.
    /// Does nothing during a normal teardown.
    pub async fn fence(&self, fault: Fault) {
        if self.is_stopping() {
            tracing::info!(sandbox = %self.sandbox_id, %fault, "ignored during teardown");
            return;
        }
        if self.started.swap(true, Ordering::SeqCst) {
            let mut published = self.fault.subscribe();
            let _ = published.wait_for(Option::is_some).await;
            return;
        }
        let tail = self.vm.console_tail();
        let start = tail.len().saturating_sub(30);
        tracing::error!(
            sandbox = %self.sandbox_id,
            reason = %fault,
            console = %tail[start..].join("\n"),
            "sandbox failed: stopping its VM; every process is reported killed"
        );
        let started = std::time::Instant::now();
        self.vm.kill().await;
        tracing::info!(
            sandbox = %self.sandbox_id,
            fence_ms = started.elapsed().as_millis() as u64,
            "VM fenced"
        );
        let fault = Arc::new(fault);
        self.reason.send_replace(Some(Arc::from(fault.to_string())));
        self.fault.send_replace(Some(fault));
    }
}

/// Watches `fencer`'s VM and `agent` (a connection of its own, see
/// [`AgentClient::probe_connection`]) until a fault or a teardown; fences on a fault.
/// `cgroups` tells a host OOM kill apart from other deaths.
pub async fn monitor(
    fencer: Arc<Fencer>,
    agent: Option<AgentClient>,
    liveness: Liveness,
    cgroups: Option<Arc<SandboxCgroups>>,
) {
    let mut stopping = fencer.stopping.subscribe();
    let mut events = fencer.vm.events();
    let fault = tokio::select! {
        biased;
        _ = stopping.wait_for(|s| *s) => return,
        death = fencer.vm.wait_child_death() => {
            let host_oom = match &cgroups {
                Some(c) if death.status.signal == Some(9) => c.host_oom(),
                _ => None,
            };
            match host_oom {
                Some((cgroup, limit)) => Fault::HostOutOfMemory { death, cgroup, limit },
                None => classify_death(death, events.as_mut(), &fencer.vm.console_tail()),
            }
        }
        line = panic_event(events.as_mut()) => Fault::GuestPanicked {
            line: line.or_else(|| panic_line(&fencer.vm.console_tail())),
        },
        fault = agent_lost(agent, liveness) => fault,
    };
    fencer.fence(fault).await;
}

/// A child's death, or a panic when QEMU died after a GUEST_PANICKED event or a console
/// panic line.
fn classify_death(
    death: ChildDeath,
    events: Option<&mut broadcast::Receiver<kata_hypervisor::qmp::Event>>,
    console: &[String],
) -> Fault {
    if death.name == "qemu" {
        let mut panicked = false;
        if let Some(events) = events {
            while let Ok(event) = events.try_recv() {
                panicked |= event.event == "GUEST_PANICKED";
            }
        }
        let line = panic_line(console);
        if panicked || line.is_some() {
            return Fault::GuestPanicked { line };
        }
    }
    Fault::ChildExited(death)
}

/// The last console line that reports a kernel panic.
fn panic_line(console: &[String]) -> Option<String> {
    console
        .iter()
        .rev()
        .find(|l| l.contains(PANIC_MARKER))
        .map(|l| l.trim().to_owned())
}

/// Resolves when QEMU reports GUEST_PANICKED; never when QMP closes (QEMU's exit is then
/// the event that counts) or there is no QEMU (a remote VM).
async fn panic_event(
    events: Option<&mut broadcast::Receiver<kata_hypervisor::qmp::Event>>,
) -> Option<String> {
    let Some(events) = events else {
        return std::future::pending().await;
    };
    loop {
        match events.recv().await {
            Ok(event) if event.event == "GUEST_PANICKED" => return None,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// Probes the agent every `interval`; resolves once `failures` probes in a row failed.
/// Without a probe connection it never resolves.
async fn agent_lost(agent: Option<AgentClient>, liveness: Liveness) -> Fault {
    let Some(agent) = agent else {
        return std::future::pending().await;
    };
    let mut misses = 0;
    let mut ticker = tokio::time::interval(liveness.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match agent.probe(liveness.interval).await {
            Ok(()) => misses = 0,
            // A remote VM's connection broke and was not dialed again within its bound (a
            // probe waits while the redial runs, so none is missed meanwhile).
            Err(error @ AgentError::Reconnect { .. }) => {
                return Fault::AgentConnectionLost {
                    error: crate::report::chain(&error),
                };
            }
            Err(error) => {
                misses += 1;
                let last_error = crate::report::chain(&error);
                tracing::warn!(misses, error = %last_error, "agent health check failed");
                if misses >= liveness.failures {
                    return Fault::AgentLost {
                        misses,
                        interval: liveness.interval,
                        last_error,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_hypervisor::ExitReport;

    fn death(name: &str) -> ChildDeath {
        ChildDeath {
            name: name.into(),
            pid: 42,
            status: ExitReport {
                code: None,
                signal: Some(9),
            },
        }
    }

    #[test]
    fn reasons_name_the_culprit() {
        let f = Fault::ChildExited(death("virtiofsd"));
        assert_eq!(
            f.to_string(),
            "virtiofsd (pid 42) exited (killed by signal 9 (SIGKILL))"
        );
        let f = Fault::AgentLost {
            misses: 3,
            interval: Duration::from_secs(10),
            last_error: "timeout".into(),
        };
        assert!(f.to_string().contains("3 health checks 10s apart"), "{f}");
        let f = Fault::Unresponsive {
            request: "SignalProcess",
            timeout: Duration::from_secs(5),
        };
        assert!(f.to_string().contains("SignalProcess within 5s"), "{f}");
    }

    #[test]
    fn qemu_dying_after_a_panic_is_a_panic() {
        let (tx, mut rx) = broadcast::channel(4);
        let console = vec![
            "[    1.0] sysrq: Trigger a crash".to_owned(),
            "[    1.1] Kernel panic - not syncing: sysrq triggered crash".to_owned(),
        ];
        let f = classify_death(death("qemu"), Some(&mut rx), &console);
        assert_eq!(
            f,
            Fault::GuestPanicked {
                line: Some("[    1.1] Kernel panic - not syncing: sysrq triggered crash".into())
            }
        );
        tx.send(kata_hypervisor::qmp::Event {
            event: "GUEST_PANICKED".into(),
            data: serde_json::json!({}),
        })
        .unwrap();
        let f = classify_death(death("qemu"), Some(&mut rx), &[]);
        assert_eq!(f, Fault::GuestPanicked { line: None });
        // A daemon's death is never a panic; QEMU's without evidence neither.
        assert_eq!(
            classify_death(death("virtiofsd"), Some(&mut rx), &console),
            Fault::ChildExited(death("virtiofsd"))
        );
        assert_eq!(
            classify_death(death("qemu"), Some(&mut rx), &[]),
            Fault::ChildExited(death("qemu"))
        );
    }
}
