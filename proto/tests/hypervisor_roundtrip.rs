//! In-process round trip of the remote hypervisor service (`hypervisor.Hypervisor`): the
//! generated server and client over a unix socket, and the method paths and field numbers
//! Kata's Go runtime uses on the wire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kata_proto::hypervisor::{
    CreateVMRequest, CreateVMResponse, StartVMRequest, StartVMResponse, StopVMRequest,
    StopVMResponse, VersionRequest, VersionResponse,
};
use kata_proto::hypervisor_ttrpc::{create_hypervisor, Hypervisor, HypervisorClient};
use protobuf::Message;
use ttrpc::asynchronous::{Client, Server, TtrpcContext};

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Hypervisor for Fake {
    async fn create_vm(
        &self,
        _ctx: &TtrpcContext,
        req: CreateVMRequest,
    ) -> ttrpc::Result<CreateVMResponse> {
        self.calls.lock().unwrap().push(format!(
            "create {} {} {}",
            req.id, req.annotations["io.kubernetes.cri.sandbox-name"], req.networkNamespacePath
        ));
        let mut resp = CreateVMResponse::new();
        resp.agentSocketPath = format!("/run/peerpod/pods/{}/agent.ttrpc", req.id);
        Ok(resp)
    }

    async fn start_vm(
        &self,
        _ctx: &TtrpcContext,
        req: StartVMRequest,
    ) -> ttrpc::Result<StartVMResponse> {
        if req.id == "unknown" {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                "no such pod",
            )));
        }
        Ok(StartVMResponse::new())
    }

    async fn stop_vm(
        &self,
        _ctx: &TtrpcContext,
        req: StopVMRequest,
    ) -> ttrpc::Result<StopVMResponse> {
        self.calls.lock().unwrap().push(format!("stop {}", req.id));
        Ok(StopVMResponse::new())
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.version = format!("server for {}", req.version);
        Ok(resp)
    }
}

#[tokio::test]
async fn hypervisor_service_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}/hypervisor.sock", dir.path().display());
    let fake = Arc::new(Fake::default());
    let mut server = Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(create_hypervisor(fake.clone()));
    server.start().await.unwrap();

    let client = HypervisorClient::new(Client::connect(&addr).await.unwrap());
    let ctx = || ttrpc::context::with_timeout(5_000_000_000);

    let mut req = CreateVMRequest::new();
    req.id = "sb1".into();
    req.annotations = HashMap::from([(
        "io.kubernetes.cri.sandbox-name".to_owned(),
        "web".to_owned(),
    )]);
    req.networkNamespacePath = "/var/run/netns/cni-1".into();
    let resp = client.create_vm(ctx(), &req).await.unwrap();
    assert_eq!(resp.agentSocketPath, "/run/peerpod/pods/sb1/agent.ttrpc");

    let mut start = StartVMRequest::new();
    start.id = "sb1".into();
    client.start_vm(ctx(), &start).await.unwrap();
    start.id = "unknown".into();
    match client.start_vm(ctx(), &start).await.unwrap_err() {
        ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::NOT_FOUND),
        other => panic!("expected a status, got {other:?}"),
    }
    let mut stop = StopVMRequest::new();
    stop.id = "sb1".into();
    client.stop_vm(ctx(), &stop).await.unwrap();
    let mut v = VersionRequest::new();
    v.version = "0.1".into();
    assert_eq!(
        client.version(ctx(), &v).await.unwrap().version,
        "server for 0.1"
    );

    // The service and method names Kata's Go client sends, by hand.
    let raw = Client::connect(&addr).await.unwrap();
    let mut call = ttrpc::Request::new();
    call.service = "hypervisor.Hypervisor".into();
    call.method = "CreateVM".into();
    call.timeout_nano = 5_000_000_000;
    call.payload = req.write_to_bytes().unwrap();
    let answer = raw.request(call).await.unwrap();
    let resp = CreateVMResponse::parse_from_bytes(&answer.payload).unwrap();
    assert_eq!(resp.agentSocketPath, "/run/peerpod/pods/sb1/agent.ttrpc");

    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "create sb1 web /var/run/netns/cni-1",
            "stop sb1",
            "create sb1 web /var/run/netns/cni-1"
        ]
    );
    server.shutdown().await.unwrap();
}

/// The bytes Kata's Go runtime puts on the wire for CreateVMRequest (field 1 string id,
/// field 2 map entries {1: key, 2: value}, field 3 string networkNamespacePath), decoded
/// by our generated type, and our encoding of the response (field 1 string).
#[test]
fn create_vm_wire_format_matches_kata() {
    let mut wire = Vec::new();
    wire.extend_from_slice(&[0x0a, 3]);
    wire.extend_from_slice(b"sb1");
    // Map entry: key "k" (field 1), value "v" (field 2).
    wire.extend_from_slice(&[0x12, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
    wire.extend_from_slice(&[0x1a, 4]);
    wire.extend_from_slice(b"/n/1");
    let req = CreateVMRequest::parse_from_bytes(&wire).unwrap();
    assert_eq!(req.id, "sb1");
    assert_eq!(req.annotations["k"], "v");
    assert_eq!(req.networkNamespacePath, "/n/1");

    let mut resp = CreateVMResponse::new();
    resp.agentSocketPath = "/s".into();
    assert_eq!(resp.write_to_bytes().unwrap(), [0x0a, 2, b'/', b's']);
    let mut v = VersionResponse::new();
    v.version = "1".into();
    assert_eq!(v.write_to_bytes().unwrap(), [0x0a, 1, b'1']);
}
