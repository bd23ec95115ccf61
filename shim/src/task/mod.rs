//! The Task service's state and its lifecycle operations: create, start, exec, delete and
//! sandbox teardown. The thin ttrpc layer is [`crate::task::service`].
//!
//! Locks: the container map and each process's state sit behind `std` mutexes held only
//! for lookups and updates, never across an `.await`. Creates are serialized by one async
//! lock (the first one builds the VM); start/exec/delete of one container by that
//! container's lifecycle lock. State, Wait, Kill and the other hot-path RPCs take neither.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::api::{CreateTaskRequest, DeleteResponse, ExecProcessRequest};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::ExitSignal;

pub mod container;
pub mod error;
pub mod events;
pub mod exits;
pub mod io;
pub mod oom;
pub mod remote;
pub mod service;
pub mod spec;

use crate::config::options;
use crate::monitor::ShimMonitor;
use crate::sandbox::health::Fault;
use crate::sandbox::mounts;
use crate::sandbox::{self, Sandbox};
use container::{Container, ExitInfo, Process, Status};
use error::TaskError;
use events::EventSender;
use exits::Waiter;
use io::StdioSpec;

/// Exit status reported for a process that was deleted without having exited.
const DELETED_STATUS: u32 = 128 + 9;
/// How long the agent gets to remove a container before the sandbox is ended instead.
const REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The shim's state: the sandbox and its containers.
pub struct TaskService {
    pub(crate) namespace: String,
    pub(crate) events: EventSender,
    pub(crate) exit: Arc<ExitSignal>,
    /// Serializes Create (and so sandbox creation).
    pub(crate) create_lock: tokio::sync::Mutex<()>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// QEMU's pid, kept after the VM is gone so State still answers with it.
    vm_pid: AtomicU32,
    /// `[runtime] disable_guest_seccomp` of the sandbox's configuration.
    disable_guest_seccomp: AtomicBool,
    /// The management server the sandbox is registered with once it runs.
    monitor: Option<Arc<ShimMonitor>>,
    /// Remote VMs: per container, the watcher keeping its copied volumes up to date.
    volume_watches: Mutex<HashMap<String, remote::VolumeWatch>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .field(
                "sandbox",
                &lock(&self.sandbox).as_ref().map(|s| s.id.clone()),
            )
            .field(
                "containers",
                &lock(&self.containers).keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks a container or exec id: non-empty, no path separators or whitespace.
pub fn validate_id(what: &str, id: &str) -> Result<(), TaskError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && !id
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(TaskError::InvalidArgument(format!(
            "invalid {what} id {id:?}"
        )))
    }
}

impl TaskService {
    pub fn new(namespace: String, events: EventSender, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            namespace,
            events,
            exit,
            create_lock: tokio::sync::Mutex::new(()),
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            vm_pid: AtomicU32::new(0),
            disable_guest_seccomp: AtomicBool::new(false),
            monitor: None,
            volume_watches: Mutex::new(HashMap::new()),
        }
    }

    /// Registers each new sandbox with `monitor` (its management server).
    pub fn with_monitor(mut self, monitor: Arc<ShimMonitor>) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// The pid containerd sees for every task (QEMU's, as in Kata).
    pub fn vm_pid(&self) -> u32 {
        self.vm_pid.load(Ordering::SeqCst)
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::ContainerNotFound(id.to_owned()))
    }

    /// The container and one of its processes (`exec_id` empty = init).
    pub fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), TaskError> {
        let c = self.container(id)?;
        let p = c
            .process(exec_id)
            .ok_or_else(|| TaskError::ProcessNotFound {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })?;
        Ok((c, p))
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers).values().cloned().collect()
    }

    pub fn has_containers(&self) -> bool {
        !lock(&self.containers).is_empty()
    }

    pub fn sandbox(&self) -> Result<Arc<Sandbox>, TaskError> {
        lock(&self.sandbox).clone().ok_or(TaskError::NoSandbox)
    }

    /// The sandbox, unless it was ended for a fault (then the error says why).
    pub fn live_sandbox(&self) -> Result<Arc<Sandbox>, TaskError> {
        let sandbox = self.sandbox()?;
        if let Some(fault) = sandbox.fault() {
            return Err(TaskError::SandboxDown {
                sandbox_id: sandbox.id.clone(),
                reason: fault.to_string(),
            });
        }
        Ok(sandbox)
    }

    /// Create: the sandbox on first use, then the container in the guest.
    pub async fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> Result<u32, TaskError> {
        validate_id("container", &req.id)?;
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(TaskError::InvalidArgument(format!(
                "bundle {:?} is not absolute",
                req.bundle
            )));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        let stdio = StdioSpec::new(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        let spec = spec::load(&bundle).await?;
        let role = spec::role(&spec, &req.id)?;
        let sandbox_id = spec::sandbox_id(Some(&spec), &req.id);
        // Without rootfs mounts (CRI-O, `ctr run --config`) root.path must already exist:
        // say so before a VM boots.
        let rootfs = bundle.join(spec::root_path(&spec));
        if req.rootfs.is_empty() && !tokio::fs::try_exists(&rootfs).await.unwrap_or(false) {
            return Err(TaskError::InvalidArgument(format!(
                "root.path {} does not exist (and no rootfs mounts were given)",
                rootfs.display()
            )));
        }

        let _create = self.create_lock.lock().await;
        if lock(&self.containers).contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        let existing = lock(&self.sandbox).clone();
        let (sandbox, new_sandbox) = match existing {
            Some(_) if role == spec::Role::Sandbox => {
                return Err(TaskError::AlreadyExists(format!(
                    "sandbox {sandbox_id} (this shim already runs it)"
                )))
            }
            Some(s) if s.id == sandbox_id => (s, false),
            Some(s) => {
                return Err(TaskError::InvalidArgument(format!(
                    "container {} belongs to sandbox {sandbox_id}, this shim serves {}",
                    req.id, s.id
                )))
            }
            None => {
                if let spec::Role::Container { sandbox_id } = &role {
                    // A pod container never boots a VM of its own.
                    return Err(TaskError::SandboxNotRunning {
                        container: req.id.clone(),
                        sandbox_id: sandbox_id.clone(),
                    });
                }
                (self.start_sandbox(&sandbox_id, req, &spec).await?, true)
            }
        };
        match self
            .create_container(&sandbox, req, bundle, spec, &role, stdio)
            .await
        {
            Ok(pid) => Ok(pid),
            Err(e) => {
                if new_sandbox {
                    self.teardown_sandbox().await;
                }
                Err(e)
            }
        }
    }

    async fn start_sandbox(
        self: &Arc<Self>,
        sandbox_id: &str,
        req: &CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<Arc<Sandbox>, TaskError> {
        let config_path = req.options.as_ref().and_then(options::config_path);
        let config = sandbox::load_config(config_path).await?;
        let no_annotations = std::collections::HashMap::new();
        let annotations = spec.annotations().as_ref().unwrap_or(&no_annotations);
        // A remote VM's sizing goes to the adaptor; a local one is sized here.
        let (config, vm_annotations) = if config.hypervisor.remote.is_some() {
            let vm = crate::config::annotations::remote_vm_annotations(&config, annotations)
                .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
            (config, vm)
        } else {
            let config = crate::config::annotations::apply(
                &config,
                annotations,
                crate::config::HostLimits::detect(),
            )
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
            (config, std::collections::HashMap::new())
        };
        config
            .validate()
            .map_err(|e| TaskError::InvalidArgument(format!("after pod annotations: {e}")))?;
        self.disable_guest_seccomp
            .store(config.runtime.disable_guest_seccomp, Ordering::SeqCst);
        crate::logging::set_debug_switches(
            config.runtime.enable_debug,
            config.hypervisor.qemu.enable_debug,
        );
        let netns = spec::network_namespace(spec);
        let host = sandbox::HostPlacement {
            cgroups_path: spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().as_ref())
                .map(|p| p.display().to_string())
                .filter(|p| !p.is_empty()),
            oom_score_adj: spec.process().as_ref().and_then(|p| p.oom_score_adj()),
        };
        let sandbox = Arc::new(
            Sandbox::create(sandbox_id, &config, netns.as_deref(), &host, vm_annotations).await?,
        );
        self.vm_pid.store(sandbox.vm_pid(), Ordering::SeqCst);
        *lock(&self.sandbox) = Some(sandbox.clone());
        if let Some(monitor) = &self.monitor {
            // Metrics are not worth failing a pod for.
            if let Err(error) = monitor
                .register(sandbox.clone(), Path::new(&req.bundle))
                .await
            {
                tracing::warn!(error = %crate::report::chain(&error), "management server not started");
            }
        }
        let this = Arc::downgrade(self);
        exits::watch_sandbox(sandbox.clone(), self.events.clone(), move || {
            this.upgrade().map(|s| s.containers()).unwrap_or_default()
        });
        let this = Arc::downgrade(self);
        oom::watch(sandbox.clone(), self.events.clone(), move |id| {
            this.upgrade().and_then(|s| s.container(id).ok())
        });
        Ok(sandbox)
    }

    async fn create_container(
        &self,
        sandbox: &Sandbox,
        req: &CreateTaskRequest,
        bundle: PathBuf,
        mut spec: oci_spec::runtime::Spec,
        role: &spec::Role,
        stdio: StdioSpec,
    ) -> Result<u32, TaskError> {
        if self.disable_guest_seccomp.load(Ordering::SeqCst) {
            spec::strip_seccomp(&mut spec);
        }
        // Deleting it ends the sandbox: the pod's pause container, or ctr's own container.
        let is_sandbox = !matches!(role, spec::Role::Container { .. });
        let id = req.id.as_str();
        let create_started = std::time::Instant::now();
        // containerd: "rootfs" in the bundle, mounted from req.rootfs; CRI-O: an absolute,
        // already populated path and no mounts.
        let rootfs = bundle.join(spec::root_path(&spec));
        let shared_dir = sandbox.paths.container_dir(id);
        // A remote VM pulls a pod container's image itself: that host rootfs stays unused.
        let remote = sandbox.is_remote();
        let mounted = if remote && matches!(role, spec::Role::Container { .. }) {
            false
        } else {
            mounts::mount_rootfs(req.rootfs.clone(), rootfs.clone()).await?
        };
        let limits = crate::sandbox::resources::limits(
            spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
        );
        let result = async {
            // Room in the VM first: a container that does not fit creates nothing.
            sandbox.resources().reserve(id, limits).await?;
            if remote {
                return self
                    .create_remote_container(sandbox, id, spec, role, &rootfs, &stdio)
                    .await;
            }
            mounts::bind_dir(rootfs.clone(), shared_dir.join("rootfs")).await?;
            let (json, binds) = spec::to_guest_json(spec, id, role)?;
            for bind in binds {
                let target = shared_dir.join(&bind.share_path);
                mounts::bind_host_path(bind, target).await?;
            }
            let pid = sandbox
                .agent()
                .create_container(id, json, stdio.agent_stdio(), *role == spec::Role::Sandbox)
                .await?;
            Ok::<u32, TaskError>(pid)
        }
        .await;
        let guest_pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                sandbox.resources().release(id);
                remove_container_mounts(&shared_dir, &rootfs, mounted).await;
                return Err(e);
            }
        };
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        let init = Process::new(id, None, stdio, guest_pid);
        let container = Container::new(
            id,
            bundle,
            init,
            is_sandbox,
            (rootfs.clone(), mounted),
            shared_dir,
        );
        lock(&self.containers).insert(id.to_owned(), Arc::new(container));
        // Rootfs shared and CreateContainer answered, in ms (hack/bench-ctr.sh reads it).
        let container_create_ms = create_started.elapsed().as_millis() as u64;
        tracing::info!(
            container = id,
            guest_pid,
            container_create_ms,
            "container created"
        );
        let pid = self.vm_pid();
        self.events.send(TaskCreate {
            container_id: id.to_owned(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(io).into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        });
        Ok(pid)
    }

    /// CreateContainer in a remote VM: root and volumes put in the guest first
    /// ([`remote::prepare`]); an image pulled for a container the agent then refuses is
    /// freed again.
    async fn create_remote_container(
        &self,
        sandbox: &Sandbox,
        id: &str,
        spec: oci_spec::runtime::Spec,
        role: &spec::Role,
        host_rootfs: &Path,
        stdio: &StdioSpec,
    ) -> Result<u32, TaskError> {
        let mut prepared = remote::prepare(sandbox, id, spec, role, host_rootfs).await?;
        let agent = sandbox.agent();
        let created = agent
            .create_container(
                id,
                std::mem::take(&mut prepared.json),
                stdio.agent_stdio(),
                *role == spec::Role::Sandbox,
            )
            .await;
        match created {
            Ok(pid) => {
                if let Some(watch) = prepared.watch(agent, id) {
                    lock(&self.volume_watches).insert(id.to_owned(), watch);
                }
                Ok(pid)
            }
            Err(e) => {
                if prepared.pulled {
                    remote::release(agent, id).await;
                }
                Err(e.into())
            }
        }
    }

    /// Start of an init or exec: attach stdio, start in the guest, emit the start event,
    /// then spawn the waiter.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let start_started = std::time::Instant::now();
        let (c, p) = self.process(id, exec_id)?;
        let sandbox = self.live_sandbox()?;
        let _lifecycle = c.lifecycle.lock().await;
        p.check_startable()?;
        if p.exec_id.is_some() {
            c.check_exec()?;
        }
        let sb = &*sandbox;
        let attached = io::attach(
            || async {
                sb.connect_stdio()
                    .await
                    .map_err(|e| io::IoError::Connect(Box::new(e)))
            },
            id,
            p.exec_id.as_deref(),
            &p.stdio,
            stdio_reattach(&sandbox),
        )
        .await?;
        p.set_io(attached);
        let agent = sandbox.agent();
        let started = match &p.exec_id {
            Some(e) => agent.start_process(id, e).await,
            None => agent.start_container(id).await.map(|()| 0),
        };
        let guest_pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                p.drop_io();
                return Err(e.into());
            }
        };
        p.set_running(guest_pid)?;
        let pid = self.vm_pid();
        match &p.exec_id {
            Some(e) => self.events.send(TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: e.clone(),
                pid,
                ..Default::default()
            }),
            None => self.events.send(TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            }),
        }
        // Stdio attached and the process started in the guest, in ms (hack/bench-ctr.sh).
        let start_ms = start_started.elapsed().as_millis() as u64;
        tracing::info!(process = %p.name(), guest_pid = p.pid(), start_ms, "process started");
        Waiter {
            sandbox,
            events: self.events.clone(),
        }
        .spawn(c.clone(), p);
        Ok(pid)
    }

    /// Exec: create the process in the guest (started later by Start).
    pub async fn exec(&self, req: &ExecProcessRequest) -> Result<(), TaskError> {
        validate_id("exec", &req.exec_id)?;
        let c = self.container(&req.id)?;
        let sandbox = self.live_sandbox()?;
        let spec = req.spec.as_ref().ok_or_else(|| {
            TaskError::InvalidArgument("exec request without a process spec".into())
        })?;
        let process = serde_json::from_slice::<oci_spec::runtime::Process>(&spec.value)
            .map_err(|e| TaskError::InvalidArgument(format!("invalid exec process spec: {e}")))?;
        spec::check_process_limits(&process)?;
        let stdio = StdioSpec::new(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        let _lifecycle = c.lifecycle.lock().await;
        c.check_exec()?;
        if c.process(&req.exec_id).is_some() {
            return Err(TaskError::AlreadyExists(format!(
                "exec {} in container {}",
                req.exec_id, req.id
            )));
        }
        sandbox
            .agent()
            .exec_process(
                &req.id,
                &req.exec_id,
                spec.value.clone(),
                stdio.agent_stdio(),
            )
            .await?;
        c.add_exec(Process::new(&req.id, Some(&req.exec_id), stdio, 0));
        self.events.send(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    /// Delete of an exec, or of a container (which ends the sandbox if it is the
    /// sandbox's container).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<DeleteResponse, TaskError> {
        let (c, p) = self.process(id, exec_id)?;
        let _lifecycle = c.lifecycle.lock().await;
        p.check_deletable()?;
        let exit = self.final_exit(&p);
        let response = DeleteResponse {
            pid: self.vm_pid(),
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            ..Default::default()
        };
        if let Some(exec) = &p.exec_id {
            if !p.started() {
                // Tell the agent to drop the created process.
                if let Ok(sandbox) = self.sandbox() {
                    let _ = sandbox.agent().signal_process(id, exec, 9, false).await;
                }
            }
            p.drop_io();
            c.remove_exec(exec);
            return Ok(response);
        }
        if let Ok(sandbox) = self.sandbox() {
            if !sandbox.is_stopping() && sandbox.fault().is_none() {
                let remove = sandbox.agent().remove_container(id);
                match tokio::time::timeout(REMOVE_TIMEOUT, remove).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(container = id, error = %crate::report::chain(&error), "agent RemoveContainer")
                    }
                    Err(_) => {
                        sandbox
                            .fence(Fault::Unresponsive {
                                request: "RemoveContainer",
                                timeout: REMOVE_TIMEOUT,
                            })
                            .await
                    }
                }
            }
        }
        lock(&self.volume_watches).remove(id);
        for exec in c.execs() {
            exec.drop_io();
        }
        p.drop_io();
        remove_container_mounts(&c.shared_dir, &c.rootfs, c.rootfs_mounted).await;
        if let Ok(sandbox) = self.sandbox() {
            sandbox.resources().release(id);
        }
        lock(&self.containers).remove(id);
        self.events.send(TaskDelete {
            container_id: id.to_owned(),
            pid: response.pid,
            exit_status: response.exit_status,
            exited_at: response.exited_at.clone(),
            id: id.to_owned(),
            ..Default::default()
        });
        tracing::info!(container = id, "container deleted");
        if c.is_sandbox {
            self.teardown_sandbox().await;
        }
        Ok(response)
    }

    /// The exit to report at delete: the recorded one, or a SIGKILL now for a process
    /// that never ran (or whose exit was never seen).
    fn final_exit(&self, p: &Process) -> ExitInfo {
        if p.status() == Status::Stopped {
            if let Some(exit) = p.exit() {
                return exit;
            }
        }
        exits::record_exit(&self.events, p, DELETED_STATUS, self.vm_pid());
        p.exit().unwrap_or_else(|| ExitInfo::now(DELETED_STATUS))
    }

    /// Stops the sandbox (if any); every process still alive is then reported exited by
    /// the VM watcher.
    pub async fn teardown_sandbox(&self) {
        let sandbox = lock(&self.sandbox).clone();
        if let Some(sandbox) = sandbox {
            sandbox.teardown().await;
            if let Some(monitor) = &self.monitor {
                monitor.unregister().await;
            }
        }
    }
}

/// Unmounts and removes a container's share directory and, if the shim mounted it, the
/// bundle rootfs. Errors are logged: cleanup goes on.
async fn remove_container_mounts(shared_dir: &Path, rootfs: &Path, rootfs_mounted: bool) {
    if let Err(error) = mounts::remove_dir(shared_dir.to_path_buf()).await {
        tracing::warn!(error = %crate::report::chain(&error), "removing {}", shared_dir.display());
    }
    if rootfs_mounted {
        if let Err(error) = mounts::unmount_all(rootfs.to_path_buf()).await {
            tracing::warn!(error = %crate::report::chain(&error), "unmounting {}", rootfs.display());
        }
    }
}

/// For a remote sandbox whose agent client redials: how output streams are attached again
/// after their connection through the adaptor ended.
fn stdio_reattach(sandbox: &Arc<Sandbox>) -> Option<io::Reattach<kata_hypervisor::VsockStream>> {
    if !sandbox.is_remote() {
        return None;
    }
    let bound = sandbox.agent().redial_bound()?;
    let connect = {
        let sandbox = sandbox.clone();
        Arc::new(move || {
            let sandbox = sandbox.clone();
            Box::pin(async move {
                sandbox
                    .connect_stdio()
                    .await
                    .map_err(|e| io::IoError::Connect(Box::new(e)))
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        })
    };
    let live = {
        let sandbox = Arc::downgrade(sandbox);
        Arc::new(move || {
            sandbox
                .upgrade()
                .is_some_and(|s| !s.is_stopping() && s.fault().is_none())
        })
    };
    Some(io::Reattach {
        connect,
        bound,
        live,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        validate_id("container", "c1").unwrap();
        validate_id("container", &"a".repeat(64)).unwrap();
        for bad in ["", ".", "..", "a/b", "a b", "a\nb"] {
            let e = validate_id("container", bad).unwrap_err();
            assert!(matches!(e, TaskError::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found() {
        let (events, _rx) = EventSender::channel();
        let svc = TaskService::new("ns".into(), events, Arc::default());
        assert!(matches!(
            svc.container("nope"),
            Err(TaskError::ContainerNotFound(_))
        ));
        assert!(matches!(
            svc.delete("nope", "").await,
            Err(TaskError::ContainerNotFound(_))
        ));
        assert!(matches!(
            svc.start("nope", "e").await,
            Err(TaskError::ContainerNotFound(_))
        ));
        assert!(matches!(svc.sandbox(), Err(TaskError::NoSandbox)));
    }
}
