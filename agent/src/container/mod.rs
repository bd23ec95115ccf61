//! Containers in the guest: the process table behind `ContainerService`.
//!
//! Each container has a cgroup (`/sys/fs/cgroup/kata/<id>`), an init process and execs.
//! Processes are created by the helper ([`child`]), which reports over a control channel
//! ([`channel`]); their exits come from the reaper ([`crate::reaper::Exits`]) and their
//! stdio is bound to vsock connections by [`crate::stdio`]. A process counts as finished
//! for `WaitProcess` once it has exited and all its output has been copied.

pub mod caps;
pub mod cgroups;
pub mod channel;
pub mod child;
pub mod devices;
pub mod fs;
pub mod mountfd;
pub mod seccomp;
pub mod spec;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_proto::agent::{StatsContainerResponse, Stdio};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::cgroup;
use crate::oom::OomWatch;
use crate::reaper::{Exit, Exits};
use crate::stdio::{Registry, StreamKey, StreamKind};
use cgroups::{is_frozen, kill_cgroup, oom_kills, read_procs, remove_cgroup};
use channel::{AgentEnd, ChannelError, FromChild, ToChild};
use child::{Mode, Plan, HELPER_ARG};
use spec::SpecError;

/// Where container cgroups live.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/kata";
/// How long a helper may take to set a process up (virtio-fs under TCG is slow). Below the
/// shim's 30 s request deadline, so our own message reaches it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long RemoveContainer waits for the container's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// A container request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The spec or process cannot be run.
    #[error("invalid request")]
    Spec(#[from] SpecError),
    /// An id that is empty or not a single path component.
    #[error("invalid {what} id {id:?}")]
    BadId {
        /// `container` or `exec`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// The root filesystem is not there.
    #[error("container root {path} is not a usable directory: {reason}")]
    NoRoot {
        /// root.path.
        path: String,
        /// What stat said.
        reason: String,
    },
    /// The resources document is unusable.
    #[error("linux.resources")]
    Resources(#[from] cgroup::ResourcesError),
    /// The device rules cannot be applied.
    #[error("device cgroup")]
    Devices(#[from] devices::DeviceError),
    /// A cgroup file operation failed.
    #[error("cgroup {}", .path.display())]
    Cgroup {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper could not be started.
    #[error("spawn container helper")]
    Spawn(#[source] std::io::Error),
    /// The control channel failed.
    #[error("container helper channel")]
    Channel(#[from] ChannelError),
    /// The helper or the process reported a failure.
    #[error("{process}: {message}")]
    Setup {
        /// Which process.
        process: String,
        /// The helper's message.
        message: String,
    },
    /// The step took too long.
    #[error("{0} timed out")]
    Timeout(String),
    /// The process is in the wrong state for the request.
    #[error("{0}")]
    State(String),
    /// A signal could not be sent.
    #[error("signal {signal} to pid {pid}")]
    Kill {
        /// The signal.
        signal: i32,
        /// The pid.
        pid: i32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
}

type Result<T> = std::result::Result<T, ContainerError>;

/// What `WaitProcess` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Exit code or 128 + signal.
    pub status: i32,
    /// The cgroup's OOM killer ended it.
    pub oom_killed: bool,
    /// The container cgroup's OOM kill count once the process finished.
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Alive,
    Exited,
    Done(Finished),
}

/// One process of a container.
#[derive(Debug)]
struct Proc {
    exec_id: String,
    pid: Pid,
    /// The helper channel, until Start.
    ctl: tokio::sync::Mutex<Option<AgentEnd>>,
    /// Set before Start is sent: from then on the process is not "created" any more.
    started: std::sync::atomic::AtomicBool,
    /// A copy of the pty master, for resizing; released at exit.
    tty: Mutex<Option<OwnedFd>>,
    phase: watch::Sender<Phase>,
}

impl Proc {
    fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn alive(&self) -> bool {
        *self.phase.borrow() == Phase::Alive
    }
}

#[derive(Debug)]
struct Container {
    /// The pod's sandbox container: the pod's namespaces are bound from its init.
    sandbox: bool,
    /// The pod namespace files bound from this (sandbox) container.
    pod_ns: Vec<PathBuf>,
    /// Serializes exec creation with removal (a helper must not join a dying cgroup).
    lifecycle: tokio::sync::Mutex<()>,
    /// Set by RemoveContainer.
    removing: std::sync::atomic::AtomicBool,
    cgroup: PathBuf,
    namespaces: Vec<String>,
    /// The compiled seccomp profile, for the init and every exec.
    seccomp: Option<seccomp::Compiled>,
    /// The init's `process.oomScoreAdj`: an exec's when its own process has none.
    oom_score_adj: Option<i32>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

/// The containers of this guest.
#[derive(Debug)]
pub struct Containers {
    exits: Exits,
    stdio: Registry,
    shared_base: PathBuf,
    pod_ns_dir: PathBuf,
    pod_shm: PathBuf,
    /// Whether the pod's shm tmpfs is mounted.
    pod_shm_mounted: tokio::sync::Mutex<bool>,
    cgroup_root: PathBuf,
    table: Mutex<HashMap<String, Arc<Container>>>,
    /// The containers' OOM kill counts.
    oom: Arc<OomWatch>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_id(what: &'static str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 256
        && !id.contains(['/', ' ', '\n', '\0']);
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadId {
            what,
            id: id.to_owned(),
        })
    }
}

fn cg_err(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Cgroup {
        path: path.to_owned(),
        source,
    }
}

impl Containers {
    /// A table for the agent's base directory (`/run/kata-containers`): roots lie under
    /// `shared/containers`, a pod's namespaces and shm under `sandbox/`.
    pub fn new(exits: Exits, stdio: Registry, base_dir: &Path) -> Self {
        Self {
            exits,
            stdio,
            shared_base: base_dir.join(crate::paths::SHARED_CONTAINERS),
            pod_ns_dir: base_dir.join("sandbox/ns"),
            pod_shm: base_dir.join("sandbox/shm"),
            pod_shm_mounted: tokio::sync::Mutex::new(false),
            cgroup_root: PathBuf::from(CGROUP_ROOT),
            table: Mutex::default(),
            oom: Arc::default(),
        }
    }

    /// The containers' OOM kill counts (`GetOOMEvents`).
    pub fn oom(&self) -> &OomWatch {
        &self.oom
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let init = c.init.clone();
            return Ok((c, init));
        }
        let p = lock(&c.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("exec {exec_id} in container {id}")))?;
        Ok((c, p))
    }

    /// Creates a container whose init waits for [`start`](Self::start); returns its pid.
    ///
    /// The work runs in its own task: if the caller goes away (the request's deadline
    /// passed), the container is removed again instead of being left half made.
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        spec_json: &[u8],
        stdio: &Stdio,
        sandbox: bool,
    ) -> Result<u32> {
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let (id, json, stdio) = (id.to_owned(), spec_json.to_vec(), stdio.clone());
        tokio::spawn(async move {
            let result = this.create_inner(&id, &json, &stdio, sandbox).await;
            if let Err(Ok(_)) = tx.send(result) {
                tracing::warn!(container = %id, "CreateContainer abandoned by the caller; removing");
                if let Err(e) = this.remove(&id).await {
                    tracing::warn!(container = %id, error = %crate::logging::chain(&e), "remove");
                }
            }
        });
        rx.await
            .map_err(|_| ContainerError::State("create task lost (see the agent log)".into()))?
    }

    async fn create_inner(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: &Stdio,
        sandbox: bool,
    ) -> Result<u32> {
        check_id("container", id)?;
        {
            let table = lock(&self.table);
            if table.contains_key(id) {
                return Err(ContainerError::AlreadyExists(format!("container {id}")));
            }
            if sandbox {
                if let Some((other, _)) = table.iter().find(|(_, c)| c.sandbox) {
                    return Err(ContainerError::AlreadyExists(format!(
                        "a sandbox container ({other}) in this VM"
                    )));
                }
            }
        }
        let spec = spec::parse_spec(spec_json, &self.shared_base, &self.pod_ns_dir)?;
        let seccomp = match &spec.linux.seccomp {
            Some(profile) => Some(seccomp::compile(profile).map_err(SpecError::from)?),
            None => None,
        };
        let shm = self.pod_shm.to_string_lossy();
        if sandbox
            || spec
                .mounts
                .iter()
                .any(|m| m.source.as_deref() == Some(&*shm))
        {
            self.ensure_pod_shm().await?;
        }
        let root = spec
            .root
            .as_ref()
            .map(|r| r.path.clone())
            .unwrap_or_default();
        match tokio::fs::metadata(&root).await {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ContainerError::NoRoot {
                    path: root,
                    reason: "not a directory".into(),
                })
            }
            Err(e) => {
                return Err(ContainerError::NoRoot {
                    path: root,
                    reason: e.to_string(),
                })
            }
        }
        let cgroup = cgroups::create(&self.cgroup_root, id, spec.linux.resources.as_ref())?;
        let namespaces: Vec<String> = spec
            .linux
            .namespaces
            .iter()
            .map(|n| n.typ.clone())
            .collect();
        let oom_score_adj = spec.process.as_ref().and_then(|p| p.oom_score_adj);
        let plan = Plan {
            container_id: id.to_owned(),
            cgroup: cgroup.clone(),
            process: spec.process.clone().unwrap_or_default(),
            seccomp: seccomp.clone(),
            mode: Mode::Init(Box::new(spec)),
        };
        let init = match self.launch(id, "", plan, stdio).await {
            Ok(p) => p,
            Err(e) => {
                remove_cgroup(&cgroup).await;
                return Err(e);
            }
        };
        let pid = init.pid.as_raw() as u32;
        let pod_ns = if sandbox {
            // All four, new or not: a sandbox without its own network namespace (the VM is
            // the pod's network) still gives the pod the one it is in.
            let pod_types = ["ipc", "uts", "network", "pid"].map(String::from);
            match self.bind_pod_namespaces(init.pid, &pod_types).await {
                Ok(bound) => bound,
                Err(e) => {
                    let _ = nix::sys::signal::kill(init.pid, Signal::SIGKILL);
                    let mut rx = init.phase.subscribe();
                    let _ = tokio::time::timeout(KILL_TIMEOUT, rx.wait_for(|p| *p != Phase::Alive))
                        .await;
                    remove_cgroup(&cgroup).await;
                    self.stdio.forget_container(id);
                    return Err(e);
                }
            }
        } else {
            Vec::new()
        };
        let container = Arc::new(Container {
            sandbox,
            pod_ns,
            lifecycle: tokio::sync::Mutex::new(()),
            removing: std::sync::atomic::AtomicBool::new(false),
            cgroup,
            namespaces,
            seccomp,
            oom_score_adj,
            init,
            execs: Mutex::default(),
        });
        // Before the init can run (it waits for Start): no kill goes unseen.
        if let Err(e) = self.oom.watch(id, &container.cgroup) {
            tracing::error!(container = id, error = %crate::logging::chain(&e),
                "cannot follow the container's OOM kills; only those ending its init or an exec are reported");
        }
        lock(&self.table).insert(id.to_owned(), container);
        tracing::info!(container = id, pid, "container created");
        Ok(pid)
    }

    /// Mounts the pod's shm (a tmpfs shared by the pod's containers) once.
    async fn ensure_pod_shm(&self) -> Result<()> {
        let mut mounted = self.pod_shm_mounted.lock().await;
        if *mounted {
            return Ok(());
        }
        let dir = self.pod_shm.clone();
        let err = |source: std::io::Error| ContainerError::Cgroup {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        nix::mount::mount(
            Some("shm"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=1777,size=65536k"),
        )
        .map_err(|e| err(e.into()))?;
        *mounted = true;
        Ok(())
    }

    /// Binds the sandbox init's new ipc/uts/net/pid namespaces where pod containers join
    /// them (the bind also keeps them alive).
    async fn bind_pod_namespaces(&self, pid: Pid, types: &[String]) -> Result<Vec<PathBuf>> {
        let mut bound = Vec::new();
        std::fs::create_dir_all(&self.pod_ns_dir).map_err(cg_err(&self.pod_ns_dir))?;
        for typ in types {
            if !matches!(typ.as_str(), "ipc" | "uts" | "network" | "pid") {
                continue;
            }
            let Some(file) = spec::namespace_file(typ) else {
                continue;
            };
            let target = self.pod_ns_dir.join(file);
            let source = PathBuf::from(format!("/proc/{pid}/ns/{file}"));
            let result = std::fs::File::create(&target)
                .map_err(cg_err(&target))
                .and_then(|_| {
                    nix::mount::mount(
                        Some(&source),
                        &target,
                        None::<&str>,
                        nix::mount::MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| ContainerError::Cgroup {
                        path: target.clone(),
                        source: e.into(),
                    })
                });
            if let Err(e) = result {
                for f in &bound {
                    let _ = nix::mount::umount2(f, nix::mount::MntFlags::MNT_DETACH);
                }
                return Err(e);
            }
            bound.push(target);
        }
        Ok(bound)
    }

    /// Spawns a helper for `plan` and drives it to Ready.
    async fn launch(
        &self,
        id: &str,
        exec_id: &str,
        plan: Plan,
        stdio: &Stdio,
    ) -> Result<Arc<Proc>> {
        let name = if exec_id.is_empty() {
            format!("container {id} init")
        } else {
            format!("exec {exec_id} in container {id}")
        };
        let terminal = plan.process.terminal;
        let (agent_end, helper_end) = channel::pair()?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg(HELPER_ARG).env_clear();
        let mut streams: Vec<(StreamKind, OwnedFd)> = Vec::new();
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
        if !terminal && stdio.stdin {
            let (r, w) = pipe().map_err(ContainerError::Spawn)?;
            cmd.stdin(r);
            streams.push((StreamKind::Stdin, w));
        } else {
            cmd.stdin(std::process::Stdio::null());
        }
        if !terminal && stdio.stdout {
            let (r, w) = pipe().map_err(ContainerError::Spawn)?;
            cmd.stdout(w);
            streams.push((StreamKind::Stdout, r));
        } else {
            cmd.stdout(std::process::Stdio::null());
        }
        if !terminal && stdio.stderr {
            let (r, w) = pipe().map_err(ContainerError::Spawn)?;
            cmd.stderr(w);
            streams.push((StreamKind::Stderr, r));
        } else {
            cmd.stderr(std::process::Stdio::null());
        }
        let raw = helper_end.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the forked child
        // before exec.
        unsafe {
            cmd.pre_exec(move || {
                if raw == child::CHANNEL_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, child::CHANNEL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let helper = cmd.spawn().map_err(ContainerError::Spawn)?;
        // The reaper collects the helper; nobody needs its status.
        drop(self.exits.watch(Pid::from_raw(helper.id() as i32)));
        drop(helper);
        // Close our copies of the child's ends, or EOF would never come.
        drop(cmd);
        drop(helper_end);
        let end = AgentEnd::new(agent_end).map_err(ContainerError::Spawn)?;
        end.send_large(&plan)?;

        let mut pid = None;
        let mut exit_rx = None;
        let mut tty = None;
        let setup = async {
            loop {
                match end.recv().await? {
                    Some((FromChild::Pid(p), _)) => {
                        let p = Pid::from_raw(p);
                        exit_rx = Some(self.exits.watch(p));
                        pid = Some(p);
                    }
                    Some((FromChild::Tty, fd)) => tty = fd,
                    Some((FromChild::Ready, _)) => return Ok(()),
                    Some((FromChild::Error(message), _)) => {
                        return Err(ContainerError::Setup {
                            process: name.clone(),
                            message,
                        })
                    }
                    None => {
                        return Err(ContainerError::Setup {
                            process: name.clone(),
                            message: "the helper exited without reporting".into(),
                        })
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
            Ok(r) => r,
            Err(_) => Err(ContainerError::Timeout(format!("setting up {name}"))),
        };
        let (pid, exit_rx) = match (outcome, pid, exit_rx) {
            (Ok(()), Some(pid), Some(rx)) => (pid, rx),
            (outcome, pid, rx) => {
                if let (Some(pid), Some(rx)) = (pid, rx) {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    let _ = tokio::time::timeout(KILL_TIMEOUT, rx).await;
                }
                return Err(outcome.err().unwrap_or_else(|| ContainerError::Setup {
                    process: name,
                    message: "ready without a pid".into(),
                }));
            }
        };
        let mut done = Vec::new();
        let key = |kind| StreamKey {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            kind,
        };
        let mut resize = None;
        if let Some(master) = tty {
            resize =
                nix::fcntl::fcntl(master.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
                    .ok()
                    .map(|fd| {
                        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that we own.
                        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                    });
            done.push(self.stdio.register(key(StreamKind::Tty), master));
        }
        for (kind, fd) in streams {
            let rx = self.stdio.register(key(kind), fd);
            if kind != StreamKind::Stdin {
                done.push(rx);
            }
        }
        let (phase, _) = watch::channel(Phase::Alive);
        let proc = Arc::new(Proc {
            exec_id: exec_id.to_owned(),
            pid,
            ctl: tokio::sync::Mutex::new(Some(end)),
            started: std::sync::atomic::AtomicBool::new(false),
            tty: Mutex::new(resize),
            phase,
        });
        self.spawn_exit_watch(id, proc.clone(), exit_rx, done);
        Ok(proc)
    }

    /// Waits for the process's exit and its output, then publishes `Done`.
    fn spawn_exit_watch(
        &self,
        id: &str,
        proc: Arc<Proc>,
        exit_rx: oneshot::Receiver<Exit>,
        outputs: Vec<oneshot::Receiver<()>>,
    ) {
        let stdio = self.stdio.clone();
        let id = id.to_owned();
        let cgroup = self.cgroup_root.join(&id);
        tokio::spawn(async move {
            // A dropped sender cannot happen while the reaper runs; treat it as killed.
            let status = exit_rx.await.map(|e| e.code()).unwrap_or(137);
            proc.phase.send_replace(Phase::Exited);
            if proc.exec_id.is_empty() {
                // The container ends with its init, as with runc: in a pod's shared pid
                // namespace nothing else would kill what it left behind (and their open
                // output would keep the exit from being reported).
                kill_cgroup(&cgroup).await;
            }
            lock(&proc.tty).take();
            // Streams never attached will never be copied: release them.
            stdio.forget_process(&id, &proc.exec_id);
            for rx in outputs {
                let _ = rx.await;
            }
            let kills = oom_kills(&cgroup).await;
            let oom_killed = status == 137 && kills > 0;
            tracing::info!(container = %id, exec = %proc.exec_id, pid = %proc.pid, status, oom_killed, "process finished");
            proc.phase.send_replace(Phase::Done(Finished {
                status,
                oom_killed,
                oom_kills: kills,
            }));
        });
    }

    /// Starts a created init or exec; returns its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (c, p) = self.process(id, exec_id)?;
        let name = process_name(id, exec_id);
        if is_frozen(&c.cgroup).await {
            return Err(ContainerError::State(format!(
                "container {id} is paused: resume it first"
            )));
        }
        let mut ctl = p.ctl.lock().await;
        let Some(end) = ctl.take() else {
            return Err(ContainerError::State(format!("{name} was already started")));
        };
        if !p.alive() {
            return Err(ContainerError::State(format!("{name} has exited")));
        }
        p.started.store(true, std::sync::atomic::Ordering::SeqCst);
        end.send(&ToChild::Start)?;
        let reply = tokio::time::timeout(SETUP_TIMEOUT, end.recv())
            .await
            .map_err(|_| ContainerError::Timeout(format!("starting {name}")))??;
        match reply {
            // Close-on-exec closed the channel: the program runs.
            None => Ok(p.pid.as_raw() as u32),
            Some((FromChild::Error(message), _)) => Err(ContainerError::Setup {
                process: name,
                message,
            }),
            Some((other, _)) => Err(ContainerError::Setup {
                process: name,
                message: format!("unexpected {other:?} after start"),
            }),
        }
    }

    /// Creates an exec process in a running container (started later). Like
    /// [`create`](Self::create), an abandoned request does not leave the process behind.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        process: &[u8],
        stdio: &Stdio,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let (id, exec_id, process, stdio) = (
            id.to_owned(),
            exec_id.to_owned(),
            process.to_vec(),
            stdio.clone(),
        );
        tokio::spawn(async move {
            let result = this.exec_inner(&id, &exec_id, &process, &stdio).await;
            if let Err(Ok(())) = tx.send(result) {
                tracing::warn!(container = %id, exec = %exec_id, "ExecProcess abandoned by the caller; discarding");
                let _ = this
                    .signal(&id, &exec_id, libc::SIGKILL as u32, false)
                    .await;
            }
        });
        rx.await
            .map_err(|_| ContainerError::State("exec task lost (see the agent log)".into()))?
    }

    async fn exec_inner(
        &self,
        id: &str,
        exec_id: &str,
        process: &[u8],
        stdio: &Stdio,
    ) -> Result<()> {
        check_id("exec", exec_id)?;
        let c = self.container(id)?;
        let _lifecycle = c.lifecycle.lock().await;
        if c.removing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ContainerError::State(format!(
                "container {id} is being removed"
            )));
        }
        if is_frozen(&c.cgroup).await {
            return Err(ContainerError::State(format!(
                "container {id} is paused: resume it first"
            )));
        }
        if !c.init.alive() {
            return Err(ContainerError::State(format!(
                "container {id} is not running"
            )));
        }
        if let Some(old) = lock(&c.execs).get(exec_id) {
            // An exec id may be reused once its process is gone.
            if old.alive() {
                return Err(ContainerError::AlreadyExists(format!(
                    "exec {exec_id} in container {id}"
                )));
            }
        }
        let mut process = spec::parse_process(process)?;
        // As runc: the container's value unless the exec names its own.
        process.oom_score_adj = process.oom_score_adj.or(c.oom_score_adj);
        let plan = Plan {
            container_id: id.to_owned(),
            cgroup: c.cgroup.clone(),
            process,
            seccomp: c.seccomp.clone(),
            mode: Mode::Exec {
                init_pid: c.init.pid.as_raw(),
                namespaces: c.namespaces.clone(),
            },
        };
        let p = self.launch(id, exec_id, plan, stdio).await?;
        lock(&c.execs).insert(exec_id.to_owned(), p);
        Ok(())
    }

    /// Sends a signal to a process, or with `all` to every process of the container. An
    /// exec that was created but never started is discarded.
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = signal as i32;
        if all {
            let c = self.container(id)?;
            for pid in read_procs(&c.cgroup).await {
                send_signal(pid as i32, sig)?;
            }
            return Ok(());
        }
        let (c, p) = self.process(id, exec_id)?;
        if !exec_id.is_empty() && !p.started() && p.alive() {
            send_signal(p.pid.as_raw(), libc::SIGKILL)?;
            lock(&c.execs).remove(exec_id);
            return Ok(());
        }
        if p.alive() {
            send_signal(p.pid.as_raw(), sig)?;
        }
        Ok(())
    }

    /// Waits until the process has exited and its output is copied.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Finished> {
        let (c, p) = self.process(id, exec_id)?;
        let mut rx = p.phase.subscribe();
        let finished = {
            let phase = rx
                .wait_for(|ph| matches!(ph, Phase::Done(_)))
                .await
                .map_err(|_| ContainerError::State("process table dropped".into()))?;
            match *phase {
                Phase::Done(f) => f,
                _ => unreachable!("wait_for returned a phase it was not waiting for"),
            }
        };
        if !exec_id.is_empty() {
            // Its status is delivered: the exec's entry is not needed any more.
            let mut execs = lock(&c.execs);
            if execs.get(exec_id).is_some_and(|e| Arc::ptr_eq(e, &p)) {
                execs.remove(exec_id);
            }
        }
        Ok(finished)
    }

    /// Kills every process of the container and forgets it.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        c.removing.store(true, std::sync::atomic::Ordering::SeqCst);
        let _lifecycle = c.lifecycle.lock().await;
        kill_cgroup(&c.cgroup).await;
        let mut rx = c.init.phase.subscribe();
        let _ = tokio::time::timeout(KILL_TIMEOUT, rx.wait_for(|p| *p != Phase::Alive)).await;
        let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
        while !read_procs(&c.cgroup).await.is_empty() {
            if tokio::time::Instant::now() > deadline {
                return Err(ContainerError::Timeout(format!(
                    "killing the processes of container {id}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        remove_cgroup(&c.cgroup).await;
        for f in &c.pod_ns {
            let _ = nix::mount::umount2(f, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(f);
        }
        self.stdio.forget_container(id);
        self.oom.forget(id);
        lock(&self.table).remove(id);
        tracing::info!(container = id, "container removed");
        Ok(())
    }

    /// Pids in the container's cgroup.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.container(id)?;
        Ok(read_procs(&c.cgroup).await)
    }

    /// Freezes (`true`) or thaws the container's cgroup and waits until it is done.
    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let c = self.container(id)?;
        let file = c.cgroup.join("cgroup.freeze");
        tokio::fs::write(&file, if frozen { "1" } else { "0" })
            .await
            .map_err(cg_err(&file))?;
        let events = c.cgroup.join("cgroup.events");
        let want = if frozen { 1 } else { 0 };
        let deadline = tokio::time::Instant::now() + KILL_TIMEOUT;
        loop {
            let text = tokio::fs::read_to_string(&events)
                .await
                .map_err(cg_err(&events))?;
            if cgroup::parse_flat_keyed(&text).get("frozen") == Some(&want) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ContainerError::Timeout(format!(
                    "{} container {id}",
                    if frozen { "freezing" } else { "thawing" }
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Applies new limits.
    pub async fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let c = self.container(id)?;
        for (name, value) in cgroup::resource_files(resources)? {
            let path = c.cgroup.join(name);
            tokio::fs::write(&path, value)
                .await
                .map_err(cg_err(&path))?;
        }
        Ok(())
    }

    /// The cgroup counters.
    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let c = self.container(id)?;
        let read = |name: &str| {
            let path = c.cgroup.join(name);
            async move { tokio::fs::read_to_string(path).await.unwrap_or_default() }
        };
        let cpu = cgroup::parse_flat_keyed(&read("cpu.stat").await);
        let mem = cgroup::parse_flat_keyed(&read("memory.stat").await);
        let events = cgroup::parse_flat_keyed(&read("memory.events").await);
        let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        Ok(StatsContainerResponse {
            cpu_usage_usec: get(&cpu, "usage_usec"),
            cpu_user_usec: get(&cpu, "user_usec"),
            cpu_system_usec: get(&cpu, "system_usec"),
            cpu_nr_periods: get(&cpu, "nr_periods"),
            cpu_nr_throttled: get(&cpu, "nr_throttled"),
            cpu_throttled_usec: get(&cpu, "throttled_usec"),
            memory_usage: cgroup::parse_single(&read("memory.current").await),
            memory_limit: cgroup::parse_single(&read("memory.max").await),
            memory_anon: get(&mem, "anon"),
            memory_file: get(&mem, "file"),
            memory_inactive_file: get(&mem, "inactive_file"),
            memory_events_oom: get(&events, "oom"),
            memory_events_oom_kill: get(&events, "oom_kill"),
            pids_current: cgroup::parse_single(&read("pids.current").await),
            pids_limit: cgroup::parse_single(&read("pids.max").await),
            ..Default::default()
        })
    }

    /// Sets a process's pty size.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let (_, p) = self.process(id, exec_id)?;
        let tty = lock(&p.tty);
        let Some(fd) = tty.as_ref() else {
            return Err(ContainerError::State(format!(
                "{} has no terminal",
                process_name(id, exec_id)
            )));
        };
        let ws = libc::winsize {
            ws_row: rows.min(u16::MAX as u32) as u16,
            ws_col: cols.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(ContainerError::State(format!(
                "resize pty: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Closes a process's stdin if its stream was never attached (an attached stream ends
    /// when the shim half-closes the connection).
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?;
        self.stdio.forget(&StreamKey {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            kind: StreamKind::Stdin,
        });
        Ok(())
    }
}

fn process_name(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id} init")
    } else {
        format!("exec {exec_id} in container {id}")
    }
}

pub(crate) fn send_signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill with plain integers.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        let errno = nix::errno::Errno::last();
        // Already gone: nothing to signal.
        if errno != nix::errno::Errno::ESRCH {
            return Err(ContainerError::Kill {
                signal: sig,
                pid,
                source: errno,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_single_components() {
        check_id("container", "c1").unwrap();
        for bad in ["", ".", "..", "a/b", "a b", "a\nb"] {
            assert!(check_id("exec", bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unknown_containers_are_not_found() {
        let t = Arc::new(Containers::new(
            Exits::default(),
            Registry::default(),
            Path::new("/x"),
        ));
        assert!(matches!(
            t.start("nope", "").await,
            Err(ContainerError::NotFound(_))
        ));
        assert!(matches!(
            t.wait("nope", "e").await,
            Err(ContainerError::NotFound(_))
        ));
        assert!(matches!(
            t.remove("nope").await,
            Err(ContainerError::NotFound(_))
        ));
        let e = t
            .create("a/b", b"{}", &Stdio::default(), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("\"a/b\""), "{e}");
    }
}
