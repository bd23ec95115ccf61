//! In-process round trip: the generated server and client talk over a unix socket, so a
//! broken codegen, a renamed method or an incompatible ttrpc version fails here first.

use std::sync::Arc;

use kata_proto::agent::{ReadFileRequest, ReadFileResponse};
use kata_proto::agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
use kata_proto::health::{health_check_response::ServingStatus, CheckRequest, HealthCheckResponse};
use kata_proto::health_ttrpc::{create_health, Health, HealthClient};
use ttrpc::asynchronous::{Client, Server, TtrpcContext};

struct Fake;

#[async_trait::async_trait]
impl Health for Fake {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        req: CheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        let mut resp = HealthCheckResponse::new();
        resp.status = if req.service.is_empty() {
            ServingStatus::SERVING
        } else {
            ServingStatus::NOT_SERVING
        }
        .into();
        Ok(resp)
    }
}

#[async_trait::async_trait]
impl AgentService for Fake {
    async fn read_file(
        &self,
        _ctx: &TtrpcContext,
        req: ReadFileRequest,
    ) -> ttrpc::Result<ReadFileResponse> {
        if req.path.starts_with('/') {
            let mut resp = ReadFileResponse::new();
            resp.data = req.path.into_bytes();
            Ok(resp)
        } else {
            Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("path {:?} is not absolute", req.path),
            )))
        }
    }
}

fn code_of(err: ttrpc::Error) -> ttrpc::Code {
    match err {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test]
async fn generated_client_and_server_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}/agent.sock", dir.path().display());
    let fake = Arc::new(Fake);
    let mut server = Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(create_health(fake.clone()))
        .register_service(create_agent_service(fake));
    server.start().await.unwrap();

    let client = Client::connect(&addr).await.unwrap();
    let health = HealthClient::new(client.clone());
    let agent = AgentServiceClient::new(client);
    let ctx = || ttrpc::context::with_timeout(5_000_000_000);

    let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
    let mut req = CheckRequest::new();
    req.service = "other".into();
    let resp = health.check(ctx(), &req).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::NOT_SERVING));

    // A method the server does not override answers with ttrpc's default status.
    let err = health
        .version(ctx(), &CheckRequest::new())
        .await
        .unwrap_err();
    assert_eq!(code_of(err), ttrpc::Code::NOT_FOUND);

    let mut req = ReadFileRequest::new();
    req.path = "/run/kata-containers/x".into();
    let resp = agent.read_file(ctx(), &req).await.unwrap();
    assert_eq!(resp.data, b"/run/kata-containers/x");
    req.path = "relative".into();
    let err = agent.read_file(ctx(), &req).await.unwrap_err();
    assert_eq!(code_of(err), ttrpc::Code::INVALID_ARGUMENT);

    server.shutdown().await.unwrap();
}
