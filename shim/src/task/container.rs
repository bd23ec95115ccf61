//! The container and process model the Task service answers from.
//!
//! A [`Container`] has an init [`Process`] and a map of exec processes. Each process keeps
//! its status, guest pid and exit behind a short-lived `std` mutex (never held across an
//! `.await`), and publishes its exit on a `watch` channel so that any number of `Wait` RPCs
//! (ctr sends one before `Start`) just await it. State transitions are checked here, so an
//! RPC that is invalid in the current state fails with a precise [`StateError`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use containerd_shim::api::Status as ApiStatus;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::task::io::{ProcessIo, StdioSpec};

/// Requests that are invalid in the process's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Start of a process that is not `created`.
    #[error("process {0} cannot start: it is {1}")]
    CannotStart(String, Status),
    /// Delete of a process that is still running.
    #[error("process {0} cannot be deleted: it is {1}")]
    CannotDelete(String, Status),
    /// Pause of a container that is not running, or resume of one that is not paused.
    #[error("container {0} is {1}")]
    WrongStatus(String, Status),
    /// An exec into a container whose init is not running.
    #[error("cannot exec in container {0}: it is {1}")]
    CannotExec(String, Status),
}

/// A process's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

impl From<Status> for ApiStatus {
    fn from(s: Status) -> ApiStatus {
        match s {
            Status::Created => ApiStatus::CREATED,
            Status::Running => ApiStatus::RUNNING,
            Status::Paused => ApiStatus::PAUSED,
            Status::Stopped => ApiStatus::STOPPED,
        }
    }
}

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

impl ExitInfo {
    /// An exit now with `status`.
    pub fn now(status: u32) -> Self {
        ExitInfo {
            status,
            at: SystemTime::now(),
        }
    }

    /// `at` as a protobuf timestamp.
    pub fn timestamp(&self) -> Timestamp {
        to_timestamp(self.at)
    }
}

/// Converts a wall-clock time to a protobuf timestamp.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}

#[derive(Debug)]
struct ProcState {
    status: Status,
    /// Guest pid; 0 until known.
    pid: u32,
    exit: Option<ExitInfo>,
    /// Whether the process ever ran (a TaskExit is published only then).
    started: bool,
}

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    pub container_id: String,
    /// `None` for the init process.
    pub exec_id: Option<String>,
    pub stdio: StdioSpec,
    state: Mutex<ProcState>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    io: Mutex<Option<ProcessIo>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Process {
    /// A process in state `created`.
    pub fn new(container_id: &str, exec_id: Option<&str>, stdio: StdioSpec, pid: u32) -> Self {
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            stdio,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid,
                exit: None,
                started: false,
            }),
            exit_tx: watch::channel(None).0,
            io: Mutex::new(None),
        }
    }

    /// `<container>` or `<container>/<exec>`, for messages.
    pub fn name(&self) -> String {
        match &self.exec_id {
            Some(e) => format!("{}/{e}", self.container_id),
            None => self.container_id.clone(),
        }
    }

    /// The id containerd uses in TaskExit: the exec id, or the container id for the init.
    pub fn event_id(&self) -> &str {
        self.exec_id.as_deref().unwrap_or(&self.container_id)
    }

    /// The exec id as the agent wants it ("" = init).
    pub fn agent_exec_id(&self) -> &str {
        self.exec_id.as_deref().unwrap_or("")
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    /// Guest pid (0 before the agent reported one).
    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        lock(&self.state).exit
    }

    /// Whether the process ever ran.
    pub fn started(&self) -> bool {
        lock(&self.state).started
    }

    /// Checks that the process may start now.
    pub fn check_startable(&self) -> Result<(), StateError> {
        match self.status() {
            Status::Created => Ok(()),
            s => Err(StateError::CannotStart(self.name(), s)),
        }
    }

    /// `created` -> `running` with the guest pid (unless an exit raced in first).
    pub fn set_running(&self, pid: u32) -> Result<(), StateError> {
        let mut st = lock(&self.state);
        match st.status {
            Status::Created => {
                st.status = Status::Running;
                st.started = true;
                if pid != 0 {
                    st.pid = pid;
                }
                Ok(())
            }
            s => Err(StateError::CannotStart(self.name(), s)),
        }
    }

    /// `running` <-> `paused`.
    pub fn set_paused(&self, paused: bool) -> Result<(), StateError> {
        let mut st = lock(&self.state);
        match (st.status, paused) {
            (Status::Running, true) => st.status = Status::Paused,
            (Status::Paused, false) => st.status = Status::Running,
            (s, _) => return Err(StateError::WrongStatus(self.container_id.clone(), s)),
        }
        Ok(())
    }

    /// Records the exit. Returns it when this call made the transition (the caller then
    /// publishes TaskExit), `None` when the process had already stopped.
    pub fn set_exited(&self, status: u32) -> Option<ExitInfo> {
        let info = {
            let mut st = lock(&self.state);
            if st.status == Status::Stopped {
                return None;
            }
            let info = ExitInfo::now(status);
            st.status = Status::Stopped;
            st.exit = Some(info);
            info
        };
        self.exit_tx.send_replace(Some(info));
        Some(info)
    }

    /// Waits until the process has stopped.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; unreachable in practice.
                return ExitInfo::now(255);
            }
        }
    }

    /// Whether a delete may proceed: not running or paused.
    pub fn check_deletable(&self) -> Result<(), StateError> {
        match self.status() {
            s @ (Status::Running | Status::Paused) => Err(StateError::CannotDelete(self.name(), s)),
            _ => Ok(()),
        }
    }

    /// Stores the attached stdio.
    pub fn set_io(&self, io: ProcessIo) {
        *lock(&self.io) = Some(io);
    }

    /// Runs `f` on the attached stdio, if any.
    pub fn with_io<T>(&self, f: impl FnOnce(&mut ProcessIo) -> T) -> Option<T> {
        lock(&self.io).as_mut().map(f)
    }

    /// Drops the stdio copies (delete).
    pub fn drop_io(&self) {
        lock(&self.io).take();
    }
}

/// A container: its init, its execs and where its rootfs is mounted on the host.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    /// Whether this is the sandbox's first container (its delete ends the sandbox).
    pub is_sandbox: bool,
    /// The host rootfs: `root.path` of the spec (relative to the bundle, as containerd
    /// writes it, or absolute, as CRI-O does).
    pub rootfs: PathBuf,
    /// Whether the shim mounted the rootfs from containerd's mount list (and so must
    /// unmount it); a rootfs that came populated is never touched.
    pub rootfs_mounted: bool,
    /// `<shared dir>/<id>`: the container's directory in the virtio-fs share.
    pub shared_dir: PathBuf,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Serializes lifecycle RPCs (start, exec start, delete) of this container.
    pub lifecycle: tokio::sync::Mutex<()>,
    /// The OOM kills published for this container.
    pub oom: crate::task::oom::OomLedger,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        init: Process,
        is_sandbox: bool,
        (rootfs, rootfs_mounted): (PathBuf, bool),
        shared_dir: PathBuf,
    ) -> Self {
        Container {
            id: id.to_owned(),
            bundle,
            init: Arc::new(init),
            is_sandbox,
            rootfs,
            rootfs_mounted,
            shared_dir,
            execs: Mutex::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            oom: Default::default(),
        }
    }

    /// The init (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            Some(self.init.clone())
        } else {
            lock(&self.execs).get(exec_id).cloned()
        }
    }

    /// Adds an exec; false if the id is taken.
    pub fn add_exec(&self, process: Process) -> bool {
        let Some(id) = process.exec_id.clone() else {
            return false;
        };
        let mut execs = lock(&self.execs);
        if execs.contains_key(&id) {
            return false;
        }
        execs.insert(id, Arc::new(process));
        true
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).remove(exec_id)
    }

    /// Every exec process.
    pub fn execs(&self) -> Vec<Arc<Process>> {
        lock(&self.execs).values().cloned().collect()
    }

    /// Checks that an exec may be added.
    pub fn check_exec(&self) -> Result<(), StateError> {
        match self.init.status() {
            Status::Running => Ok(()),
            s => Err(StateError::CannotExec(self.id.clone(), s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc() -> Process {
        Process::new("c1", None, StdioSpec::new("", "", "", false).unwrap(), 7)
    }

    #[test]
    fn start_twice_is_a_precondition_failure() {
        let p = proc();
        p.check_startable().unwrap();
        p.set_running(42).unwrap();
        assert_eq!(p.pid(), 42);
        assert_eq!(
            p.set_running(43),
            Err(StateError::CannotStart("c1".into(), Status::Running))
        );
        assert!(p.check_startable().is_err());
    }

    #[test]
    fn exit_is_recorded_once() {
        let p = proc();
        p.set_running(0).unwrap();
        assert_eq!(p.pid(), 7, "a zero pid keeps the known one");
        let first = p.set_exited(3).unwrap();
        assert_eq!(first.status, 3);
        assert!(p.set_exited(9).is_none());
        assert_eq!(p.exit().unwrap().status, 3);
        assert_eq!(p.status(), Status::Stopped);
        assert!(p.set_running(1).is_err(), "a stopped process cannot start");
    }

    #[test]
    fn delete_needs_a_stopped_or_created_process() {
        let p = proc();
        p.check_deletable().unwrap();
        p.set_running(1).unwrap();
        assert!(p.check_deletable().is_err());
        p.set_paused(true).unwrap();
        assert!(p.check_deletable().is_err());
        assert!(p.set_paused(true).is_err());
        p.set_paused(false).unwrap();
        p.set_exited(0);
        p.check_deletable().unwrap();
        assert!(p.set_paused(true).is_err());
    }

    #[tokio::test]
    async fn wait_returns_after_exit_and_for_late_waiters() {
        let p = Arc::new(proc());
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await }
        });
        tokio::task::yield_now().await;
        p.set_running(5).unwrap();
        p.set_exited(137);
        assert_eq!(waiter.await.unwrap().status, 137);
        assert_eq!(p.wait().await.status, 137);
    }

    #[test]
    fn execs_are_unique_and_need_a_running_init() {
        let c = Container::new(
            "c1",
            "/b".into(),
            proc(),
            true,
            ("/b/rootfs".into(), false),
            "/s/c1".into(),
        );
        assert!(c.check_exec().is_err());
        c.init.set_running(1).unwrap();
        c.check_exec().unwrap();
        let stdio = StdioSpec::new("", "", "", false).unwrap();
        assert!(c.add_exec(Process::new("c1", Some("e1"), stdio.clone(), 0)));
        assert!(!c.add_exec(Process::new("c1", Some("e1"), stdio, 0)));
        assert_eq!(c.process("e1").unwrap().event_id(), "e1");
        assert_eq!(c.process("").unwrap().event_id(), "c1");
        assert!(c.process("e2").is_none());
        assert_eq!(c.execs().len(), 1);
    }
}
