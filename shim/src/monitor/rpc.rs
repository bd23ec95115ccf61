//! `kata_shim_rpc_durations_histogram_milliseconds{action}`: every Task API RPC timed on
//! its way through, by wrapping the service (the Task service itself knows nothing of
//! metrics). The action is the RPC's name in lower case, as Kata labels it.

use std::future::Future;
use std::time::Instant;

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::{Task, TtrpcContext};
use kata_metrics::RpcDurations;

/// A Task service whose every RPC is timed into `durations`.
#[derive(Debug, Clone)]
pub struct Timed<T> {
    inner: T,
    durations: RpcDurations,
}

impl<T> Timed<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, durations: RpcDurations) -> Self {
        Self { inner, durations }
    }

    async fn time<R>(&self, action: &str, rpc: impl Future<Output = R>) -> R {
        let started = Instant::now();
        let result = rpc.await;
        self.durations.observe(action, started.elapsed());
        result
    }
}

type Result<T> = ttrpc::Result<T>;

#[async_trait]
impl<T: Task + Send + Sync> Task for Timed<T> {
    async fn state(&self, ctx: &TtrpcContext, req: StateRequest) -> Result<StateResponse> {
        self.time("state", self.inner.state(ctx, req)).await
    }

    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse> {
        self.time("create", self.inner.create(ctx, req)).await
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> Result<StartResponse> {
        self.time("start", self.inner.start(ctx, req)).await
    }

    async fn delete(&self, ctx: &TtrpcContext, req: DeleteRequest) -> Result<DeleteResponse> {
        self.time("delete", self.inner.delete(ctx, req)).await
    }

    async fn pids(&self, ctx: &TtrpcContext, req: PidsRequest) -> Result<PidsResponse> {
        self.time("pids", self.inner.pids(ctx, req)).await
    }

    async fn pause(&self, ctx: &TtrpcContext, req: PauseRequest) -> Result<Empty> {
        self.time("pause", self.inner.pause(ctx, req)).await
    }

    async fn resume(&self, ctx: &TtrpcContext, req: ResumeRequest) -> Result<Empty> {
        self.time("resume", self.inner.resume(ctx, req)).await
    }

    async fn checkpoint(&self, ctx: &TtrpcContext, req: CheckpointTaskRequest) -> Result<Empty> {
        self.time("checkpoint", self.inner.checkpoint(ctx, req))
            .await
    }

    async fn kill(&self, ctx: &TtrpcContext, req: KillRequest) -> Result<Empty> {
        self.time("kill", self.inner.kill(ctx, req)).await
    }

    async fn exec(&self, ctx: &TtrpcContext, req: ExecProcessRequest) -> Result<Empty> {
        self.time("exec", self.inner.exec(ctx, req)).await
    }

    async fn resize_pty(&self, ctx: &TtrpcContext, req: ResizePtyRequest) -> Result<Empty> {
        self.time("resize_pty", self.inner.resize_pty(ctx, req))
            .await
    }

    async fn close_io(&self, ctx: &TtrpcContext, req: CloseIORequest) -> Result<Empty> {
        self.time("close_io", self.inner.close_io(ctx, req)).await
    }

    async fn update(&self, ctx: &TtrpcContext, req: UpdateTaskRequest) -> Result<Empty> {
        self.time("update", self.inner.update(ctx, req)).await
    }

    async fn wait(&self, ctx: &TtrpcContext, req: WaitRequest) -> Result<WaitResponse> {
        self.time("wait", self.inner.wait(ctx, req)).await
    }

    async fn stats(&self, ctx: &TtrpcContext, req: StatsRequest) -> Result<StatsResponse> {
        self.time("stats", self.inner.stats(ctx, req)).await
    }

    async fn connect(&self, ctx: &TtrpcContext, req: ConnectRequest) -> Result<ConnectResponse> {
        self.time("connect", self.inner.connect(ctx, req)).await
    }

    async fn shutdown(&self, ctx: &TtrpcContext, req: ShutdownRequest) -> Result<Empty> {
        self.time("shutdown", self.inner.shutdown(ctx, req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Task service that answers nothing itself (every RPC: the trait's "not implemented").
    struct Nothing;

    #[async_trait]
    impl Task for Nothing {}

    #[tokio::test]
    async fn every_rpc_is_timed_by_its_name_and_errors_pass_through() {
        let durations = RpcDurations::shim_rpc();
        let timed = Timed::new(Nothing, durations.clone());
        let ctx = TtrpcContext {
            mh: Default::default(),
            metadata: Default::default(),
            timeout_nano: 0,
        };
        assert!(timed.state(&ctx, StateRequest::default()).await.is_err());
        assert!(timed
            .create(&ctx, CreateTaskRequest::default())
            .await
            .is_err());
        assert!(timed
            .close_io(&ctx, CloseIORequest::default())
            .await
            .is_err());
        let mut text = String::new();
        kata_metrics::encode_into(&durations.families(), &mut text).unwrap();
        for action in ["state", "create", "close_io"] {
            assert!(
                text.contains(&format!(
                    "kata_shim_rpc_durations_histogram_milliseconds_count{{action=\"{action}\"}} 1\n"
                )),
                "{action}: {text}"
            );
        }
    }
}
