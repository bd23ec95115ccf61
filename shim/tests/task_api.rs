//! The Task API over a real ttrpc socket, in process, without a VM: the answers that do
//! not need a sandbox (codes for unknown ids, bad input, unsupported calls; Connect;
//! Shutdown ending the server).

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::{
    CheckpointTaskRequest, ConnectRequest, CreateTaskRequest, KillRequest, ShutdownRequest,
    StateRequest, WaitRequest,
};
use containerd_shim::protos::shim_async::{create_task, TaskClient};
use containerd_shim::ExitSignal;
use kata_shim::task::events::EventSender;
use kata_shim::task::service::Service;
use kata_shim::task::TaskService;
use ttrpc::asynchronous::transport::Listener;
use ttrpc::Code;

struct Harness {
    client: TaskClient,
    exit: Arc<ExitSignal>,
    _server: ttrpc::asynchronous::Server,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("shim.sock");
    let (events, _rx) = EventSender::channel();
    let exit = Arc::new(ExitSignal::default());
    let tasks = Arc::new(TaskService::new("test".into(), events, exit.clone()));
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut server = ttrpc::asynchronous::Server::new()
        .add_listener(Listener::from(listener))
        .register_service(create_task(Arc::new(Service(tasks))));
    server.start().await.unwrap();
    let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    Harness {
        client: TaskClient::new(client),
        exit,
        _server: server,
        _dir: dir,
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected a status, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let h = harness().await;
    let state = StateRequest {
        id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(h.client.state(ctx(), &state).await).0, Code::NOT_FOUND);
    let kill = KillRequest {
        id: "nope".into(),
        signal: 9,
        ..Default::default()
    };
    assert_eq!(code(h.client.kill(ctx(), &kill).await).0, Code::NOT_FOUND);
    let wait = WaitRequest {
        id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(code(h.client.wait(ctx(), &wait).await).0, Code::NOT_FOUND);
}

#[tokio::test]
async fn checkpoint_is_unimplemented() {
    let h = harness().await;
    let (c, msg) = code(
        h.client
            .checkpoint(ctx(), &CheckpointTaskRequest::default())
            .await,
    );
    assert_eq!(c, Code::UNIMPLEMENTED, "{msg}");
}

#[tokio::test]
async fn bad_create_requests_are_invalid_arguments() {
    let h = harness().await;
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(
        bundle.path().join("config.json"),
        r#"{"ociVersion":"1.0.2"}"#,
    )
    .unwrap();
    let base = CreateTaskRequest {
        id: "c1".into(),
        bundle: bundle.path().display().to_string(),
        ..Default::default()
    };
    let cases = [
        CreateTaskRequest {
            stdout: "binary:///usr/bin/logger".into(),
            ..base.clone()
        },
        CreateTaskRequest {
            bundle: "relative".into(),
            ..base.clone()
        },
        CreateTaskRequest {
            id: "a/b".into(),
            ..base.clone()
        },
    ];
    for req in cases {
        let (c, msg) = code(h.client.create(ctx(), &req).await);
        assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
    }
    let (c, msg) = code(
        h.client
            .create(
                ctx(),
                &CreateTaskRequest {
                    checkpoint: "/x".into(),
                    ..base
                },
            )
            .await,
    );
    assert_eq!(c, Code::UNIMPLEMENTED, "{msg}");
}

#[tokio::test]
async fn connect_reports_our_pid_and_shutdown_signals_exit() {
    let h = harness().await;
    let resp = h
        .client
        .connect(ctx(), &ConnectRequest::default())
        .await
        .unwrap();
    assert_eq!(resp.shim_pid, std::process::id());
    assert_eq!(resp.task_pid, 0);
    h.client
        .shutdown(ctx(), &ShutdownRequest::default())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), h.exit.wait())
        .await
        .expect("shutdown with no containers ends the shim");
}
