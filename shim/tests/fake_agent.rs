//! The agent client against a fake agent that answers badly: impossible values, no answer,
//! a dropped connection, bytes that are not ttrpc at all, an incompatible version. Each
//! must become a clear error naming the call — never a panic or a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kata_proto::agent::{
    GuestDetailsRequest, GuestDetailsResponse, OnlineResourcesRequest, OnlineResourcesResponse,
    ReadFileRequest, ReadFileResponse, SignalProcessRequest, WaitProcessRequest,
    WaitProcessResponse,
};
use kata_proto::agent_ttrpc::{
    create_agent_service, create_container_service, AgentService, ContainerService,
};
use kata_proto::health::{CheckRequest, VersionCheckResponse};
use kata_proto::health_ttrpc::{create_health, Health};
use kata_shim::sandbox::agent::{AgentClient, AgentError};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use ttrpc::asynchronous::transport::Listener;
use ttrpc::asynchronous::TtrpcContext;

/// Answers every call it implements with a value no real agent would send.
struct BadAgent;

#[async_trait]
impl AgentService for BadAgent {
    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(GuestDetailsResponse {
            mem_block_size_bytes: 0,
            ..Default::default()
        })
    }

    async fn online_resources(
        &self,
        _: &TtrpcContext,
        _: OnlineResourcesRequest,
    ) -> ttrpc::Result<OnlineResourcesResponse> {
        Ok(OnlineResourcesResponse {
            memory_blocks: 1,
            online_cpus: 1,
            ..Default::default()
        })
    }

    async fn read_file(
        &self,
        _: &TtrpcContext,
        _: ReadFileRequest,
    ) -> ttrpc::Result<ReadFileResponse> {
        Ok(ReadFileResponse {
            data: vec![b'x'; 4096],
            ..Default::default()
        })
    }
}

#[async_trait]
impl ContainerService for BadAgent {
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        if req.exec_id == "hang" {
            std::future::pending::<()>().await;
        }
        Ok(WaitProcessResponse {
            status: if req.exec_id == "ok" { 137 } else { -3 },
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        _: SignalProcessRequest,
    ) -> ttrpc::Result<kata_proto::agent::Empty> {
        // Never answers.
        std::future::pending().await
    }
}

#[async_trait]
impl Health for BadAgent {
    async fn version(
        &self,
        _: &TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        Ok(VersionCheckResponse {
            grpc_version: "99.0.0".into(),
            agent_version: "fake".into(),
            ..Default::default()
        })
    }
}

struct Fake {
    dir: tempfile::TempDir,
    _server: ttrpc::asynchronous::Server,
}

impl Fake {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let agent = Arc::new(BadAgent);
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(Listener::from(listener))
            .register_service(create_agent_service(agent.clone()))
            .register_service(create_container_service(agent.clone()))
            .register_service(create_health(agent));
        server.start().await.unwrap();
        Self {
            dir,
            _server: server,
        }
    }

    async fn client(&self, timeout: Duration) -> AgentClient {
        let stream = UnixStream::connect(self.dir.path().join("agent.sock"))
            .await
            .unwrap();
        AgentClient::over_stream(stream, timeout)
    }
}

fn malformed(e: AgentError, method: &str, needle: &str) {
    match &e {
        AgentError::Malformed { method: m, what } => {
            assert_eq!(*m, method);
            assert!(what.contains(needle), "{what}");
        }
        other => panic!("{method}: expected Malformed, got {other:?}"),
    }
    assert!(e.to_string().contains(method), "{e}");
}

#[tokio::test]
async fn impossible_answers_are_refused_by_name() {
    let fake = Fake::start().await;
    let agent = fake.client(Duration::from_secs(5)).await;
    malformed(
        agent.guest_details().await.unwrap_err(),
        "GetGuestDetails",
        "memory block size of 0 bytes",
    );
    malformed(
        agent.online_resources(4, 2, 100).await.unwrap_err(),
        "OnlineResources",
        "1 memory blocks and 1 CPUs online, fewer than the 4 and 2",
    );
    malformed(
        agent.read_file("/etc/hostname", 16).await.unwrap_err(),
        "ReadFile",
        "4096 bytes, more than the 16",
    );
    malformed(
        agent.wait_process("c1", "bad").await.unwrap_err(),
        "WaitProcess",
        "exit status -3",
    );
    assert_eq!(agent.wait_process("c1", "ok").await.unwrap().status, 137);
    match agent.ensure_compatible().await.unwrap_err() {
        AgentError::VersionMismatch { agent, .. } => assert_eq!(agent, "99.0.0"),
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    // Unimplemented calls come back as the agent's status, with the call's name.
    let e = agent.list_pids("c1").await.unwrap_err();
    assert!(
        e.agent_code().is_some() && e.to_string().contains("ListPids"),
        "{e}"
    );
    assert!(!e.is_transport());
}

#[tokio::test]
async fn an_agent_that_never_answers_times_out() {
    let fake = Fake::start().await;
    let agent = fake.client(Duration::from_millis(300)).await;
    let started = Instant::now();
    let e = agent.signal_process("c1", "", 9, false).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("SignalProcess"), "{e}");
    assert!(e.is_transport(), "a timeout is no answer: {e:?}");
}

#[tokio::test]
async fn a_call_in_flight_fails_at_once_when_the_sandbox_goes_down() {
    let fake = Fake::start().await;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let agent = fake
        .client(Duration::from_secs(30))
        .await
        .with_down_reason(rx);
    let wait = tokio::spawn(async move { agent.wait_process("c1", "hang").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send_replace(Some(Arc::from(
        "virtiofsd (pid 1) exited (killed by signal 9)",
    )));
    let e = tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .expect("the pending call ended")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, AgentError::SandboxDown { .. }), "{e:?}");
    assert!(e.to_string().contains("virtiofsd"), "{e}");
}

#[tokio::test]
async fn bytes_that_are_not_ttrpc_and_a_dropped_connection_are_errors() {
    // A peer that answers every request with garbage, then hangs up.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await;
                let _ = conn.write_all(&[0xff; 64]).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    let agent = AgentClient::over_stream(
        UnixStream::connect(&path).await.unwrap(),
        Duration::from_secs(5),
    );
    let started = Instant::now();
    let e = agent.guest_details().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("GetGuestDetails"), "{e}");
    assert!(e.is_transport(), "{e:?}");
}
