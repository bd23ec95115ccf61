//! The `hypervisor.Hypervisor` ttrpc service: the shim's face of the adaptor. Each method
//! hands its request to [`Adaptor`] and maps failures with [`to_ttrpc`].

use std::sync::Arc;

use async_trait::async_trait;
use kata_proto::hypervisor::{
    CreateVMRequest, CreateVMResponse, StartVMRequest, StartVMResponse, StopVMRequest,
    StopVMResponse, VersionRequest, VersionResponse,
};
use kata_proto::hypervisor_ttrpc::Hypervisor;
use ttrpc::asynchronous::TtrpcContext;

use crate::adaptor::Adaptor;
use crate::error::{to_ttrpc, AdaptorError};

/// The service.
#[derive(Debug, Clone)]
pub struct HypervisorService {
    adaptor: Arc<Adaptor>,
}

impl HypervisorService {
    pub fn new(adaptor: Arc<Adaptor>) -> Self {
        Self { adaptor }
    }
}

fn failure(method: &str, id: &str, e: AdaptorError) -> ttrpc::Error {
    tracing::warn!(method, sandbox = id, error = %crate::report::chain(&e), "request failed");
    to_ttrpc(&e)
}

#[async_trait]
impl Hypervisor for HypervisorService {
    async fn create_vm(
        &self,
        _ctx: &TtrpcContext,
        req: CreateVMRequest,
    ) -> ttrpc::Result<CreateVMResponse> {
        let id = req.id.clone();
        let socket = self
            .adaptor
            .create_vm(req)
            .await
            .map_err(|e| failure("CreateVM", &id, e))?;
        let mut resp = CreateVMResponse::new();
        resp.agentSocketPath = socket.display().to_string();
        Ok(resp)
    }

    async fn start_vm(
        &self,
        _ctx: &TtrpcContext,
        req: StartVMRequest,
    ) -> ttrpc::Result<StartVMResponse> {
        self.adaptor
            .start_vm(&req.id)
            .await
            .map_err(|e| failure("StartVM", &req.id, e))?;
        Ok(StartVMResponse::new())
    }

    async fn stop_vm(
        &self,
        _ctx: &TtrpcContext,
        req: StopVMRequest,
    ) -> ttrpc::Result<StopVMResponse> {
        self.adaptor
            .stop_vm(&req.id)
            .await
            .map_err(|e| failure("StopVM", &req.id, e))?;
        Ok(StopVMResponse::new())
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(resp)
    }
}
