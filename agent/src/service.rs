//! The ttrpc services: `Health` and `AgentService`, and the one place where agent errors
//! become ttrpc status codes ([`to_ttrpc`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kata_proto::agent::{
    AddStoragesRequest, CloseStdinRequest, ConfigureNetworkRequest, CopyFileRequest,
    CreateContainerRequest, CreateContainerResponse, Empty, ExecProcessRequest, GetMetricsRequest,
    GuestDetailsRequest, GuestDetailsResponse, ListPidsRequest, ListPidsResponse, Metrics,
    OnlineResourcesRequest, OnlineResourcesResponse, PauseContainerRequest, ReadFileRequest,
    ReadFileResponse, RemoveContainerRequest, ResizeTtyRequest, ResumeContainerRequest,
    ShutdownRequest, SignalProcessRequest, StartContainerRequest, StartProcessRequest,
    StartProcessResponse, StatsContainerRequest, StatsContainerResponse, UpdateContainerRequest,
    WaitProcessRequest, WaitProcessResponse,
};
use kata_proto::agent_ttrpc::{AgentService, ContainerService};
use kata_proto::health::{
    health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse,
};
use kata_proto::health_ttrpc::Health;
use ttrpc::asynchronous::TtrpcContext;
use ttrpc::Code;

use crate::container::{ContainerError, Containers};
use crate::files::{read_file, FileError};
use crate::guest::{guest_details, GuestError};
use crate::logging::chain;
use crate::mounts::Mounter;
use crate::storage::{mount_storage, validate, Outcome, StorageError};

/// How long Shutdown waits after replying before powering off.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(50);

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// AddStorages failed.
    #[error("add storage")]
    Storage(#[from] StorageError),
    /// ReadFile failed.
    #[error("read file")]
    File(#[from] FileError),
    /// GetGuestDetails failed.
    #[error("guest details")]
    Guest(#[from] GuestError),
    /// A blocking task panicked or was cancelled.
    #[error("blocking task")]
    Join(#[from] tokio::task::JoinError),
    /// ConfigureNetwork failed.
    #[error("configure network")]
    Network(#[from] crate::network::NetworkError),
    /// A container or process request failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// PullImage failed (or freeing a container's image rootfs).
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// GetMetrics failed.
    #[error("metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
    /// CopyFile failed.
    #[error("copy file")]
    Copy(#[from] crate::copy::CopyError),
    /// GetOOMEvents was refused.
    #[error("OOM events")]
    Oom(#[from] crate::oom::OomError),
}

/// Maps an error to a ttrpc status; the message is the whole error chain.
pub fn to_ttrpc(err: &ServiceError) -> ttrpc::Error {
    let code = match err {
        ServiceError::Storage(e) if e.is_invalid_request() => Code::INVALID_ARGUMENT,
        ServiceError::Storage(StorageError::Busy { .. } | StorageError::Symlink { .. }) => {
            Code::FAILED_PRECONDITION
        }
        ServiceError::File(
            FileError::Path(_) | FileError::TooLarge { .. } | FileError::LimitTooLarge { .. },
        ) => Code::INVALID_ARGUMENT,
        ServiceError::File(FileError::NotRegular(_) | FileError::Escapes(_)) => {
            Code::INVALID_ARGUMENT
        }
        ServiceError::File(FileError::NotFound(_)) => Code::NOT_FOUND,
        ServiceError::Copy(e) if e.is_invalid_request() => Code::INVALID_ARGUMENT,
        ServiceError::Container(e) => match e {
            ContainerError::Spec(_)
            | ContainerError::BadId { .. }
            | ContainerError::NoRoot { .. }
            | ContainerError::Resources(_) => Code::INVALID_ARGUMENT,
            ContainerError::Devices(d) if d.is_invalid() => Code::INVALID_ARGUMENT,
            ContainerError::Devices(_) => Code::INTERNAL,
            ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ContainerError::NotFound(_) => Code::NOT_FOUND,
            ContainerError::Setup { .. } | ContainerError::State(_) => Code::FAILED_PRECONDITION,
            ContainerError::Timeout(_) => Code::DEADLINE_EXCEEDED,
            ContainerError::Cgroup { .. }
            | ContainerError::Spawn(_)
            | ContainerError::Channel(_)
            | ContainerError::Kill { .. } => Code::INTERNAL,
        },
        ServiceError::Guest(GuestError::NotOnline { .. }) => Code::DEADLINE_EXCEEDED,
        ServiceError::Network(e) if e.is_invalid() => Code::INVALID_ARGUMENT,
        ServiceError::Network(crate::network::NetworkError::NoNic { .. }) => Code::NOT_FOUND,
        ServiceError::Network(_) => Code::INTERNAL,
        ServiceError::Image(e) => match e.kind() {
            crate::image::ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
            crate::image::ErrorKind::NotFound => Code::NOT_FOUND,
            crate::image::ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
            crate::image::ErrorKind::Unauthenticated => Code::UNAUTHENTICATED,
            crate::image::ErrorKind::Unavailable => Code::UNAVAILABLE,
            crate::image::ErrorKind::DataLoss => Code::DATA_LOSS,
            crate::image::ErrorKind::Internal => Code::INTERNAL,
        },
        ServiceError::Oom(crate::oom::OomError::Cursor { .. }) => Code::INVALID_ARGUMENT,
        ServiceError::Oom(_) => Code::INTERNAL,
        ServiceError::Storage(_)
        | ServiceError::File(FileError::Io { .. })
        | ServiceError::Guest(_)
        | ServiceError::Metrics(_)
        | ServiceError::Copy(_)
        | ServiceError::Join(_) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, chain(err)))
}

/// What Shutdown does after replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// PID 1: sync, unmount the storages, power the VM off.
    PowerOff,
    /// Run by hand: exit the process.
    Exit,
}

/// How to build an [`Agent`].
#[derive(Clone)]
pub struct AgentOptions {
    /// Requests may only name paths below this directory (`/run/kata-containers`).
    pub base_dir: PathBuf,
    /// What Shutdown does.
    pub shutdown: ShutdownMode,
    /// Modules loaded at boot, for GetGuestDetails.
    pub loaded_modules: Vec<String>,
    /// The mount calls.
    pub mounter: Arc<dyn Mounter>,
}

impl std::fmt::Debug for AgentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentOptions")
            .field("base_dir", &self.base_dir)
            .field("shutdown", &self.shutdown)
            .field("loaded_modules", &self.loaded_modules)
            .finish_non_exhaustive()
    }
}

/// The state behind both services.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    /// Mount points of the storages mounted so far, in mount order.
    storages: Arc<Mutex<Vec<PathBuf>>>,
    /// Process streams waiting for their stdio connection.
    stdio: crate::stdio::Registry,
    /// Serializes "is it mounted? then mount": two concurrent AddStorages for the same mount
    /// point must not stack two mounts.
    mounting: tokio::sync::Mutex<()>,
    /// Exits of our children, fed by the reaper.
    exits: crate::reaper::Exits,
    /// The containers.
    containers: Arc<Containers>,
    /// Images pulled in the guest (peer pods).
    images: Arc<crate::image::ImageStore>,
}

impl Agent {
    /// The registry of pending stdio streams, shared with the stdio listener.
    pub fn stdio(&self) -> &crate::stdio::Registry {
        &self.stdio
    }

    /// The exit table the reaper must feed (see [`crate::reaper::start`]).
    pub fn exits(&self) -> &crate::reaper::Exits {
        &self.exits
    }

    /// The in-guest image store (PullImage).
    pub fn images(&self) -> &Arc<crate::image::ImageStore> {
        &self.images
    }

    /// Creates the agent state.
    pub fn new(opts: AgentOptions) -> Self {
        let stdio = crate::stdio::Registry::default();
        let exits = crate::reaper::Exits::default();
        let containers = Arc::new(Containers::new(
            exits.clone(),
            stdio.clone(),
            &opts.base_dir,
        ));
        let images = Arc::new(crate::image::ImageStore::new(&opts.base_dir));
        Self {
            images,
            opts,
            storages: Arc::default(),
            stdio,
            mounting: tokio::sync::Mutex::new(()),
            exits,
            containers,
        }
    }

    async fn add_storages(&self, req: AddStoragesRequest) -> Result<(), ServiceError> {
        // Validate all before mounting any.
        let specs = req
            .storages
            .iter()
            .map(|s| validate(s, &self.opts.base_dir))
            .collect::<Result<Vec<_>, _>>()?;
        let _serialized = self.mounting.lock().await;
        for spec in specs {
            let mounter = self.opts.mounter.clone();
            let (spec, outcome) = tokio::task::spawn_blocking(move || {
                let outcome = mount_storage(mounter.as_ref(), &spec);
                (spec, outcome)
            })
            .await?;
            match outcome? {
                Outcome::Mounted => {
                    tracing::info!(tag = %spec.source, path = %spec.mount_point.display(), "storage mounted");
                    self.storages
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(spec.mount_point);
                }
                Outcome::AlreadyMounted => {
                    tracing::debug!(path = %spec.mount_point.display(), "storage already mounted");
                }
            }
        }
        Ok(())
    }

    fn schedule_shutdown(&self) {
        let mode = self.opts.shutdown;
        let mounter = self.opts.mounter.clone();
        let storages = self.storages.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            if mode == ShutdownMode::Exit {
                tracing::info!("shutdown requested; exiting");
                std::process::exit(0);
            }
            let points = std::mem::take(&mut *storages.lock().unwrap_or_else(|e| e.into_inner()));
            let _ = tokio::task::spawn_blocking(move || power_off(mounter.as_ref(), &points)).await;
        });
    }
}

/// Syncs, lazily unmounts `points` (last first) and powers off. Returns only on failure.
fn power_off(mounter: &dyn Mounter, points: &[PathBuf]) {
    tracing::info!("shutdown requested; powering off");
    nix::unistd::sync();
    for p in points.iter().rev() {
        if let Err(e) = mounter.umount_lazy(p) {
            tracing::warn!(path = %p.display(), errno = %e, "unmount storage");
        }
    }
    nix::unistd::sync();
    if let Some(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF).err() {
        tracing::error!(errno = %e, "power off failed");
    }
}

pub(crate) fn log_failure(method: &str, err: ServiceError) -> ttrpc::Error {
    tracing::warn!(method, error = %chain(&err), "request failed");
    to_ttrpc(&err)
}

#[async_trait]
impl Health for Agent {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        let mut resp = HealthCheckResponse::new();
        resp.status = ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        let mut resp = VersionCheckResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.grpc_version = kata_proto::PROTOCOL_VERSION.to_owned();
        Ok(resp)
    }
}

#[async_trait]
impl AgentService for Agent {
    async fn add_storages(
        &self,
        _ctx: &TtrpcContext,
        req: AddStoragesRequest,
    ) -> ttrpc::Result<Empty> {
        self.add_storages(req)
            .await
            .map_err(|e| log_failure("AddStorages", e))?;
        Ok(Empty::new())
    }

    async fn read_file(
        &self,
        _ctx: &TtrpcContext,
        req: ReadFileRequest,
    ) -> ttrpc::Result<ReadFileResponse> {
        let data = read_file(&self.opts.base_dir, &req.path, req.max_bytes)
            .await
            .map_err(|e| log_failure("ReadFile", e.into()))?;
        let mut resp = ReadFileResponse::new();
        resp.data = data;
        Ok(resp)
    }

    async fn copy_file(&self, _ctx: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        use kata_proto::agent::FileKind;
        let kind = match req.kind.enum_value_or_default() {
            FileKind::REGULAR => crate::copy::Kind::File,
            FileKind::DIRECTORY => crate::copy::Kind::Dir,
            FileKind::SYMLINK => crate::copy::Kind::Symlink,
        };
        let copy = crate::copy::Copy {
            path: req.path,
            kind,
            mode: req.mode,
            uid: req.uid,
            gid: req.gid,
            data: req.data,
            offset: req.offset,
            last: req.last,
            target: req.symlink_target,
        };
        let base = self.opts.base_dir.join("shared/containers");
        crate::copy::copy_file(&base, copy)
            .await
            .map_err(|e| log_failure("CopyFile", e.into()))?;
        Ok(Empty::new())
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        guest_details(&self.opts.loaded_modules)
            .await
            .map_err(|e| log_failure("GetGuestDetails", e.into()))
    }

    async fn online_resources(
        &self,
        _ctx: &TtrpcContext,
        req: OnlineResourcesRequest,
    ) -> ttrpc::Result<OnlineResourcesResponse> {
        crate::guest::online_resources(&req)
            .await
            .map_err(|e| log_failure("OnlineResources", e.into()))
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        crate::network::configure(&req)
            .await
            .map_err(|e| log_failure("ConfigureNetwork", e.into()))?;
        Ok(Empty::new())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        self.schedule_shutdown();
        Ok(Empty::new())
    }

    async fn get_metrics(
        &self,
        _ctx: &TtrpcContext,
        _req: GetMetricsRequest,
    ) -> ttrpc::Result<Metrics> {
        match tokio::task::spawn_blocking(crate::metrics::answer).await {
            Ok(answer) => answer.map_err(|e| log_failure("GetMetrics", e.into())),
            Err(e) => Err(log_failure("GetMetrics", e.into())),
        }
    }
}

fn container_failure(method: &str, err: ContainerError) -> ttrpc::Error {
    log_failure(method, err.into())
}

#[async_trait]
impl ContainerService for Agent {
    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec, &stdio, req.sandbox)
            .await
            .map_err(|e| container_failure("CreateContainer", e))?;
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .start(&req.container_id, "")
            .await
            .map_err(|e| container_failure("StartContainer", e))?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let stdio = req.stdio.clone().unwrap_or_default();
        self.containers
            .exec(&req.container_id, &req.exec_id, &req.process, &stdio)
            .await
            .map_err(|e| container_failure("ExecProcess", e))?;
        Ok(Empty::new())
    }

    async fn start_process(
        &self,
        _ctx: &TtrpcContext,
        req: StartProcessRequest,
    ) -> ttrpc::Result<StartProcessResponse> {
        let pid = self
            .containers
            .start(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| container_failure("StartProcess", e))?;
        Ok(StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(|e| container_failure("SignalProcess", e))?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let f = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| container_failure("WaitProcess", e))?;
        Ok(WaitProcessResponse {
            status: f.status,
            oom_killed: f.oom_killed,
            oom_kills: f.oom_kills,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let removed = self.containers.remove(&req.container_id).await;
        // An image rootfs pulled for the container goes with it (also when the container
        // itself never got created).
        if matches!(removed, Ok(()) | Err(ContainerError::NotFound(_))) {
            if let Err(e) = self.images.release(&req.container_id).await {
                tracing::warn!(container = %req.container_id, error = %chain(&e), "free image rootfs");
            }
        }
        removed.map_err(|e| container_failure("RemoveContainer", e))?;
        Ok(Empty::new())
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ListPidsRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        let pids = self
            .containers
            .pids(&req.container_id)
            .await
            .map_err(|e| container_failure("ListPids", e))?;
        Ok(ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    async fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        self.containers
            .resize(&req.container_id, &req.exec_id, req.rows, req.columns)
            .map_err(|e| container_failure("ResizeTty", e))?;
        Ok(Empty::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(|e| container_failure("CloseStdin", e))?;
        Ok(Empty::new())
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .freeze(&req.container_id, true)
            .await
            .map_err(|e| container_failure("PauseContainer", e))?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .freeze(&req.container_id, false)
            .await
            .map_err(|e| container_failure("ResumeContainer", e))?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .update(&req.container_id, &req.resources)
            .await
            .map_err(|e| container_failure("UpdateContainer", e))?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.containers
            .stats(&req.container_id)
            .await
            .map_err(|e| container_failure("StatsContainer", e))
    }

    async fn get_oom_events(
        &self,
        _ctx: &TtrpcContext,
        req: kata_proto::agent::GetOOMEventsRequest,
    ) -> ttrpc::Result<kata_proto::agent::GetOOMEventsResponse> {
        let (seq, changed) = self
            .containers
            .oom()
            .changes_after(req.after)
            .await
            .map_err(|e| log_failure("GetOOMEvents", e.into()))?;
        Ok(kata_proto::agent::GetOOMEventsResponse {
            events: changed
                .into_iter()
                .map(|(container_id, oom_kills)| kata_proto::agent::OOMEvent {
                    container_id,
                    oom_kills,
                    ..Default::default()
                })
                .collect(),
            seq,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::PathError;

    fn code(e: ServiceError) -> Code {
        match to_ttrpc(&e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_codes() {
        assert_eq!(
            code(StorageError::UnknownDriver("9p".into()).into()),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(FileError::Path(PathError::Empty).into()),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            code(FileError::NotFound("/x".into()).into()),
            Code::NOT_FOUND
        );
        let io = std::io::Error::other("boom");
        assert_eq!(code(StorageError::MountInfo(io).into()), Code::INTERNAL);
        let cursor = crate::oom::OomError::Cursor {
            after: 5,
            current: 0,
        };
        assert_eq!(code(cursor.into()), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn status_message_carries_the_chain() {
        let e: ServiceError = StorageError::UnknownDriver("9p".into()).into();
        let ttrpc::Error::RpcStatus(s) = to_ttrpc(&e) else {
            panic!()
        };
        assert_eq!(s.message(), "add storage: unknown storage driver \"9p\"");
    }
}
