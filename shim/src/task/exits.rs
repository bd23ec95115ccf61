//! Process exits: the per-process waiter, the VM-death handler, and the rules that order
//! TaskExit events.
//!
//! - A waiter starts right after a process's TaskStart/TaskExecStarted was emitted, so its
//!   TaskExit can never precede them.
//! - Output is drained to the fifos before an exit is recorded, so `ctr` sees all output.
//! - The init's exit is recorded only after every exec of the container has exited (they
//!   are killed when the init dies), so no exec's TaskExit follows the init's.
//! - An exit is recorded once ([`Process::set_exited`]); whoever records it emits TaskExit,
//!   and only for processes that ran.
//! - OOM kills the agent counted in the container's cgroup by the time a process finished
//!   (`WaitProcess` carries the count) are reported ([`crate::task::oom`]) before its exit,
//!   and none after the init's exit.
//! - When the sandbox ends — fenced for a fault (its VM killed and reaped first, see
//!   [`crate::sandbox::health`]) or stopped by a teardown — every process still alive is
//!   recorded as killed (128 + 9): execs first, then the pod's containers, the sandbox
//!   container last.
//! - A waiter whose connection to the agent breaks while the VM runs cannot follow its
//!   process any more: it fences the sandbox rather than report an exit while the process
//!   may still run. For a remote VM the agent client first dials again (the adaptor may be
//!   restarting) and repeats WaitProcess; only a redial that failed within its bound fences.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::events::task::TaskExit;

use crate::sandbox::health::Fault;
use crate::sandbox::Sandbox;
use crate::task::container::{Container, Process, Status};
use crate::task::events::EventSender;
use crate::task::oom;

/// How long output may take to drain after the agent reported an exit.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long execs get to exit after their container's init did, before SIGKILL.
const EXEC_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long after a failed WaitProcess we wait for a fault or a teardown to explain it.
const VM_EXIT_GRACE: Duration = Duration::from_secs(2);
/// Exit status of a process the agent could not report on (it answered with an error).
pub const UNKNOWN_EXIT: u32 = 255;
const SIGKILL: u32 = 9;
/// Exit status of every process of a sandbox that ended: killed.
pub const KILLED: u32 = 128 + SIGKILL;

/// Records `status` for `process` and emits TaskExit if this call made the transition.
pub fn record_exit(events: &EventSender, process: &Process, status: u32, vm_pid: u32) {
    let Some(info) = process.set_exited(status) else {
        return;
    };
    tracing::info!(process = %process.name(), status, "process exited");
    if !process.started() {
        return;
    }
    events.send(TaskExit {
        container_id: process.container_id.clone(),
        id: process.event_id().to_owned(),
        pid: vm_pid,
        exit_status: info.status,
        exited_at: Some(info.timestamp()).into(),
        ..Default::default()
    });
}

/// Everything a waiter needs.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub sandbox: Arc<Sandbox>,
    pub events: EventSender,
}

impl Waiter {
    /// Spawns the waiter of a just-started `process` of `container`.
    pub fn spawn(self, container: Arc<Container>, process: Arc<Process>) {
        tokio::spawn(async move { self.run(container, process).await });
    }

    async fn run(self, container: Arc<Container>, process: Arc<Process>) {
        let agent = self.sandbox.agent();
        let status = match agent
            .wait_process(&process.container_id, process.agent_exec_id())
            .await
        {
            Ok(resp) => {
                if resp.oom_killed {
                    tracing::warn!(process = %process.name(), "killed by the OOM killer");
                }
                // Every kill so far, before this exit (the watcher may not have said yet).
                let kills = resp.oom_kills.max(u64::from(resp.oom_killed));
                oom::report(&self.events, &container, kills).await;
                u32::try_from(resp.status).unwrap_or(UNKNOWN_EXIT)
            }
            Err(error) => {
                if self.sandbox_end_explains().await {
                    // The sandbox watcher records this exit.
                    return;
                }
                if error.is_transport() {
                    // The connection broke while the VM runs: the process may still run
                    // and nobody can tell when it ends. End the sandbox instead.
                    let error = crate::report::chain(&error);
                    self.sandbox
                        .fence(Fault::AgentConnectionLost { error })
                        .await;
                    return;
                }
                tracing::error!(
                    process = %process.name(),
                    error = %crate::report::chain(&error),
                    "the agent could not report the process's exit; reporting it as exited"
                );
                UNKNOWN_EXIT
            }
        };
        let outputs = process.with_io(|io| io.take_outputs()).unwrap_or_default();
        if !outputs.wait(OUTPUT_DRAIN_TIMEOUT).await {
            tracing::warn!(process = %process.name(), "output still draining; reporting exit anyway");
        }
        if process.exec_id.is_none() {
            self.execs_exit_first(&container).await;
            // No TaskOOM after the container's TaskExit; CRI-O finds the oom file first.
            if container.oom.close() > 0 {
                oom::write_oom_file(&container.bundle).await;
            }
        }
        record_exit(&self.events, &process, status, self.sandbox.vm_pid());
    }

    /// Whether the sandbox is ending (then its watcher reports every exit).
    async fn sandbox_end_explains(&self) -> bool {
        if self.sandbox.is_stopping() {
            return true;
        }
        let mut rx = self.sandbox.fault_watch();
        let faulted = tokio::time::timeout(VM_EXIT_GRACE, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        faulted || self.sandbox.is_stopping()
    }

    /// Before the init's exit is recorded: waits for the container's execs, killing them
    /// if they outlive the grace period, and records any that still hang as killed.
    async fn execs_exit_first(&self, container: &Container) {
        let running = |c: &Container| -> Vec<Arc<Process>> {
            c.execs()
                .into_iter()
                .filter(|p| matches!(p.status(), Status::Running | Status::Paused))
                .collect()
        };
        let execs = running(container);
        if execs.is_empty() {
            return;
        }
        let all_exit = |execs: Vec<Arc<Process>>| async move {
            for p in execs {
                p.wait().await;
            }
        };
        if tokio::time::timeout(EXEC_EXIT_GRACE, all_exit(execs))
            .await
            .is_ok()
        {
            return;
        }
        let agent = self.sandbox.agent();
        if let Err(error) = agent.signal_process(&container.id, "", SIGKILL, true).await {
            tracing::debug!(error = %crate::report::chain(&error), "killing leftover execs");
        }
        let execs = running(container);
        if tokio::time::timeout(EXEC_EXIT_GRACE, all_exit(execs))
            .await
            .is_ok()
        {
            return;
        }
        for p in running(container) {
            tracing::warn!(process = %p.name(), "exec did not exit after its init; reporting it killed");
            record_exit(&self.events, &p, 128 + SIGKILL, self.sandbox.vm_pid());
        }
    }
}

/// Waits until the sandbox ends — fenced for a fault, or its VM stopped by a teardown —
/// then records every live process of `containers()` as killed, in order: execs, the pod's
/// containers, the sandbox container. After a fault it also releases the sandbox's host
/// resources (containerd still deletes the tasks).
pub fn watch_sandbox(
    sandbox: Arc<Sandbox>,
    events: EventSender,
    containers: impl Fn() -> Vec<Arc<Container>> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut faults = sandbox.fault_watch();
        let mut stopped = sandbox.vm_stopped_watch();
        let fault = tokio::select! {
            fault = faults.wait_for(Option::is_some) => match fault {
                Ok(fault) => fault.clone(),
                Err(_) => return,
            },
            stopped = stopped.wait_for(|s| *s) => {
                if stopped.is_err() {
                    return;
                }
                None
            }
        };
        let vm_pid = sandbox.vm_pid();
        let mut all = containers();
        // The sandbox container's exit means the pod is gone: report it last.
        all.sort_by_key(|c| c.is_sandbox);
        for c in &all {
            for p in c.execs() {
                record_exit(&events, &p, KILLED, vm_pid);
            }
        }
        for c in &all {
            c.oom.close();
            record_exit(&events, &c.init, KILLED, vm_pid);
        }
        if let Some(fault) = fault {
            tracing::error!(sandbox = %sandbox.id, reason = %fault, "sandbox ended: every process reported killed");
            // Nothing runs any more: release the host resources now.
            sandbox.teardown().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::io::StdioSpec;
    use containerd_shim::protos::protobuf::Message;

    fn started(exec: Option<&str>) -> Process {
        let p = Process::new("c1", exec, StdioSpec::new("", "", "", false).unwrap(), 3);
        p.set_running(3).unwrap();
        p
    }

    fn exit_of(msg: crate::task::events::Msg) -> TaskExit {
        let crate::task::events::Msg::Event(item) = msg else {
            panic!("not an event");
        };
        assert_eq!(item.topic, "/tasks/exit");
        TaskExit::parse_from_bytes(&item.event.write_to_bytes_dyn().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn exit_is_emitted_once_with_the_event_id() {
        let (events, mut rx) = EventSender::channel();
        let init = started(None);
        record_exit(&events, &init, 0, 99);
        record_exit(&events, &init, 1, 99);
        let exec = started(Some("e1"));
        record_exit(&events, &exec, 137, 99);
        let first = exit_of(rx.recv().await.unwrap());
        assert_eq!(
            (first.id.as_str(), first.exit_status, first.pid),
            ("c1", 0, 99)
        );
        let second = exit_of(rx.recv().await.unwrap());
        assert_eq!((second.id.as_str(), second.exit_status), ("e1", 137));
        assert!(rx.try_recv().is_err(), "no duplicate exit");
    }

    #[tokio::test]
    async fn a_process_that_never_ran_has_no_task_exit() {
        let (events, mut rx) = EventSender::channel();
        let p = Process::new("c1", None, StdioSpec::new("", "", "", false).unwrap(), 3);
        record_exit(&events, &p, 137, 1);
        assert_eq!(p.status(), Status::Stopped);
        assert!(rx.try_recv().is_err());
    }
}
