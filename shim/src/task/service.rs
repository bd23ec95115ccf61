//! The containerd Task API (`containerd.task.v2.Task`) over ttrpc: every RPC, mapped onto
//! [`TaskService`]. Lifecycle RPCs delegate to [`crate::task`]; the small ones are here.
//! Errors become ttrpc statuses through [`TaskError`]'s one mapping.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{EnumOrUnknown, Message};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext};
use kata_proto::agent::StatsContainerResponse;

use crate::sandbox::agent::AgentError;
use crate::sandbox::health::Fault;
use crate::task::container::Status;
use crate::task::error::TaskError;
use crate::task::TaskService;

/// containerd 1.6 matches metrics by this bare type URL (no `type.googleapis.com/`).
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";
/// Highest signal number accepted by Kill.
const MAX_SIGNAL: u32 = 64;
/// How long the agent gets to deliver a signal before the sandbox is ended instead (a
/// hung guest must not make Kill, and `ctr task delete -f`, hang).
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a Kill on a sandbox that just went down waits for the exit to be recorded.
const DOWN_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The ttrpc face of [`TaskService`].
#[derive(Debug, Clone)]
pub struct Service(pub Arc<TaskService>);

type TtrpcResult<T> = ttrpc::Result<T>;

fn ok<T>(r: Result<T, TaskError>) -> TtrpcResult<T> {
    r.map_err(ttrpc::Error::from)
}

impl Service {
    async fn kill(&self, req: &KillRequest) -> Result<(), TaskError> {
        let (c, p) = self.0.process(&req.id, &req.exec_id)?;
        // Signal 0 is a liveness probe (CRI-O's IsContainerAlive): answered like any other.
        if req.signal > MAX_SIGNAL {
            return Err(TaskError::InvalidArgument(format!(
                "invalid signal {}",
                req.signal
            )));
        }
        if p.status() == Status::Stopped {
            return Err(TaskError::ProcessFinished);
        }
        let sandbox = self.0.sandbox()?;
        let signal = sandbox
            .agent()
            .signal_process(&c.id, p.agent_exec_id(), req.signal, req.all);
        let Ok(result) = tokio::time::timeout(KILL_TIMEOUT, signal).await else {
            // The guest does not answer: end the sandbox, which kills the process.
            sandbox
                .fence(Fault::Unresponsive {
                    request: "SignalProcess",
                    timeout: KILL_TIMEOUT,
                })
                .await;
            return Ok(());
        };
        if let Err(e) = result {
            if matches!(e, AgentError::SandboxDown { .. }) {
                // Its exit is being recorded as the sandbox ends.
                let _ = tokio::time::timeout(DOWN_EXIT_WAIT, p.wait()).await;
            }
            if p.status() == Status::Stopped || e.agent_code() == Some(ttrpc::Code::NOT_FOUND) {
                return Err(TaskError::ProcessFinished);
            }
            return Err(e.into());
        }
        if p.status() == Status::Created && matches!(req.signal, 9 | 15) {
            // Never started: no waiter will see it die.
            p.set_exited(128 + req.signal);
        }
        Ok(())
    }

    async fn pause_resume(&self, id: &str, pause: bool) -> Result<(), TaskError> {
        let c = self.0.container(id)?;
        let want = if pause {
            Status::Running
        } else {
            Status::Paused
        };
        let status = c.init.status();
        if status != want {
            return Err(
                crate::task::container::StateError::WrongStatus(id.to_owned(), status).into(),
            );
        }
        let sandbox = self.0.sandbox()?;
        if pause {
            sandbox.agent().pause_container(id).await?;
        } else {
            sandbox.agent().resume_container(id).await?;
        }
        for p in std::iter::once(c.init.clone()).chain(c.execs()) {
            // Execs that already exited keep their state.
            let _ = p.set_paused(pause);
        }
        if pause {
            self.0.events.send(TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            });
        } else {
            self.0.events.send(TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            });
        }
        Ok(())
    }

    async fn close_io(&self, req: &CloseIORequest) -> Result<(), TaskError> {
        let (c, p) = self.0.process(&req.id, &req.exec_id)?;
        if !req.stdin {
            return Ok(());
        }
        let closed = p
            .with_io(|io| {
                let had = io.has_stdin();
                io.close_stdin();
                had
            })
            .unwrap_or(false);
        if !closed {
            let sandbox = self.0.sandbox()?;
            sandbox
                .agent()
                .close_stdin(&c.id, p.agent_exec_id())
                .await?;
        }
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<Any, TaskError> {
        let c = self.0.container(id)?;
        let sandbox = self.0.sandbox()?;
        let s = sandbox.agent().stats_container(&c.id).await?;
        let metrics = metrics_v2(&s);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| TaskError::InvalidArgument(format!("cannot encode metrics: {e}")))?;
        Ok(Any {
            type_url: METRICS_V2_TYPE_URL.to_owned(),
            value,
            ..Default::default()
        })
    }
}

/// The agent's cgroup v2 counters as containerd's v2 `Metrics`.
pub fn metrics_v2(s: &StatsContainerResponse) -> Metrics {
    let cpu = CPUStat {
        usage_usec: s.cpu_usage_usec,
        user_usec: s.cpu_user_usec,
        system_usec: s.cpu_system_usec,
        nr_periods: s.cpu_nr_periods,
        nr_throttled: s.cpu_nr_throttled,
        throttled_usec: s.cpu_throttled_usec,
        ..Default::default()
    };
    let memory = MemoryStat {
        usage: s.memory_usage,
        usage_limit: if s.memory_limit == 0 {
            u64::MAX
        } else {
            s.memory_limit
        },
        anon: s.memory_anon,
        file: s.memory_file,
        inactive_file: s.memory_inactive_file,
        ..Default::default()
    };
    let pids = PidsStat {
        current: s.pids_current,
        limit: s.pids_limit,
        ..Default::default()
    };
    let memory_events = MemoryEvents {
        oom: s.memory_events_oom,
        oom_kill: s.memory_events_oom_kill,
        ..Default::default()
    };
    Metrics {
        pids: Some(pids).into(),
        cpu: Some(cpu).into(),
        memory: Some(memory).into(),
        memory_events: Some(memory_events).into(),
        ..Default::default()
    }
}

#[async_trait]
impl Task for Service {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let (c, p) = ok(self.0.process(&req.id, &req.exec_id))?;
        let exit = p.exit();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: self.0.vm_pid(),
            status: EnumOrUnknown::new(p.status().into()),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "create");
        let pid = ok(self.0.create(&req).await)?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = ok(self.0.start(&req.id, &req.exec_id).await)?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        ok(self.0.delete(&req.id, &req.exec_id).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let c = ok(self.0.container(&req.id))?;
        let sandbox = ok(self.0.sandbox())?;
        let pids = ok(sandbox
            .agent()
            .list_pids(&c.id)
            .await
            .map_err(TaskError::from))?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        ok(self.pause_resume(&req.id, true).await)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        ok(self.pause_resume(&req.id, false).await)?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        ok(Err(TaskError::Unimplemented("checkpoint")))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        ok(Service::kill(self, &req).await)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        ok(self.0.exec(&req).await)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (c, p) = ok(self.0.process(&req.id, &req.exec_id))?;
        let sandbox = ok(self.0.sandbox())?;
        ok(sandbox
            .agent()
            .resize_tty(&c.id, p.agent_exec_id(), req.height, req.width)
            .await
            .map_err(TaskError::from))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        ok(Service::close_io(self, &req).await)?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let c = ok(self.0.container(&req.id))?;
        let Some(resources) = req.resources.as_ref() else {
            return Ok(Empty::new());
        };
        let parsed = ok(serde_json::from_slice::<oci_spec::runtime::LinuxResources>(
            &resources.value,
        )
        .map_err(|e| TaskError::InvalidArgument(format!("invalid resources: {e}"))))?;
        let sandbox = ok(self.0.sandbox())?;
        // Serialized with Delete, which releases the reservation.
        let _lifecycle = c.lifecycle.lock().await;
        // Grow the VM first when the new limits need it.
        ok(sandbox
            .resources()
            .update(&c.id, &parsed)
            .await
            .map_err(TaskError::from))?;
        ok(sandbox
            .agent()
            .update_container(&c.id, resources.value.clone())
            .await
            .map_err(TaskError::from))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let (_, p) = ok(self.0.process(&req.id, &req.exec_id))?;
        let exit = p.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let stats = ok(Service::stats(self, &req.id).await)?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = match self.0.container(&req.id) {
            Ok(_) => self.0.vm_pid(),
            Err(_) => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        // A Create in flight decides whether anything is left: wait for it.
        let _create = self.0.create_lock.lock().await;
        if self.0.has_containers() && !req.now {
            tracing::debug!("shutdown ignored: containers remain");
            return Ok(Empty::new());
        }
        tracing::info!(now = req.now, "shutdown");
        self.0.teardown_sandbox().await;
        self.0.exit.signal();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_map_agent_counters() {
        let s = StatsContainerResponse {
            cpu_usage_usec: 10,
            memory_usage: 4096,
            memory_limit: 0,
            memory_inactive_file: 1024,
            pids_current: 3,
            memory_events_oom_kill: 1,
            ..Default::default()
        };
        let m = metrics_v2(&s);
        assert_eq!(m.cpu.usage_usec, 10);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX, "0 = unlimited");
        assert_eq!(m.memory.inactive_file, 1024);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.memory_events.oom_kill, 1);
        let bytes = m.write_to_bytes().unwrap();
        assert_eq!(Metrics::parse_from_bytes(&bytes).unwrap(), m);
    }
}
