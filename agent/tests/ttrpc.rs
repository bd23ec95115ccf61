//! The agent's services over a real ttrpc connection on a unix socket: in-process, and
//! the binary run by hand (not PID 1) down to Shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_agent::mounts::SyscallMounter;
use kata_agent::service::{Agent, AgentOptions, ShutdownMode};
use kata_proto::agent::{
    AddStoragesRequest, GuestDetailsRequest, ReadFileRequest, ShutdownRequest, Storage,
};
use kata_proto::agent_ttrpc::AgentServiceClient;
use kata_proto::health::{health_check_response::ServingStatus, CheckRequest};
use kata_proto::health_ttrpc::HealthClient;
use ttrpc::asynchronous::Client;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

fn code_of(err: ttrpc::Error) -> ttrpc::Code {
    match err {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn read_req(path: String, max_bytes: u64) -> ReadFileRequest {
    let mut r = ReadFileRequest::new();
    r.path = path;
    r.max_bytes = max_bytes;
    r
}

#[tokio::test]
async fn services_round_trip_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("hello"), b"hi there").unwrap();
    let addr = format!("unix://{}/agent.sock", dir.path().display());
    let agent = Arc::new(Agent::new(AgentOptions {
        base_dir: base.clone(),
        shutdown: ShutdownMode::Exit,
        loaded_modules: vec!["vsock".into(), "virtiofs".into()],
        mounter: Arc::new(SyscallMounter),
    }));
    let mut server = kata_agent::server::start(&addr, agent).await.unwrap();

    let client = Client::connect(&addr).await.unwrap();
    let health = HealthClient::new(client.clone());
    let svc = AgentServiceClient::new(client);

    let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
    let v = health.version(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.grpc_version, kata_proto::PROTOCOL_VERSION);

    let d = svc
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(!d.kernel_release.is_empty());
    assert!(d.mem_total_kib > 0 && d.online_cpus > 0);
    assert_eq!(d.loaded_modules, ["vsock", "virtiofs"]);

    let ok = svc
        .read_file(ctx(), &read_req(format!("{}/hello", base.display()), 64))
        .await
        .unwrap();
    assert_eq!(ok.data, b"hi there");
    for (path, max, code) in [
        (
            format!("{}/../agent.sock", base.display()),
            64,
            ttrpc::Code::INVALID_ARGUMENT,
        ),
        ("relative".to_string(), 64, ttrpc::Code::INVALID_ARGUMENT),
        (
            "/etc/passwd".to_string(),
            1 << 20,
            ttrpc::Code::INVALID_ARGUMENT,
        ),
        (
            format!("{}/hello", base.display()),
            3,
            ttrpc::Code::INVALID_ARGUMENT,
        ),
        (
            format!("{}/missing", base.display()),
            64,
            ttrpc::Code::NOT_FOUND,
        ),
    ] {
        let err = svc
            .read_file(ctx(), &read_req(path.clone(), max))
            .await
            .unwrap_err();
        assert_eq!(code_of(err), code, "{path}");
    }

    let mut storage = Storage::new();
    storage.driver = "9p".into();
    let mut req = AddStoragesRequest::new();
    req.storages.push(storage);
    let err = svc.add_storages(ctx(), &req).await.unwrap_err();
    let ttrpc::Error::RpcStatus(status) = err else {
        panic!("{err:?}")
    };
    assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT);
    assert!(status.message().contains("\"9p\""), "{}", status.message());

    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn binary_run_by_hand_serves_and_exits_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix://{}", sock.display());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kata-agent"))
        .args(["--listen", &addr, "--base-dir"])
        .arg(dir.path())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match Client::connect(&addr).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("agent never listened: {e:?}"),
        }
    };
    let health = HealthClient::new(client.clone());
    let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));

    AgentServiceClient::new(client)
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("agent did not exit after Shutdown")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
