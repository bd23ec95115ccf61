//! The agent client of a remote VM across a restart of the socket's owner: a fake agent
//! (ttrpc) behind a fake adaptor socket (the hybrid-vsock `CONNECT` handshake, then bytes
//! relayed) that is killed — its relays cut, its socket removed — and started again. A call
//! in flight is repeated on the new connection; a socket not back within the bound ends
//! the call with an error that names the bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kata_hypervisor::vsock::Endpoint;
use kata_proto::agent::{WaitProcessRequest, WaitProcessResponse};
use kata_proto::agent_ttrpc::{create_container_service, ContainerService};
use kata_proto::health::{
    health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse,
};
use kata_proto::health_ttrpc::{create_health, Health};
use kata_shim::sandbox::agent::{AgentClient, AgentError, Redial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use ttrpc::asynchronous::transport::Listener;
use ttrpc::asynchronous::TtrpcContext;

/// Answers health checks; WaitProcess answers 7 once `exited` is true.
struct Agent {
    exited: watch::Receiver<bool>,
}

#[async_trait]
impl Health for Agent {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        Ok(HealthCheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _: &TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        Ok(VersionCheckResponse {
            grpc_version: kata_proto::PROTOCOL_VERSION.into(),
            agent_version: "fake".into(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl ContainerService for Agent {
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        _: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(|e| *e).await;
        Ok(WaitProcessResponse {
            status: 7,
            ..Default::default()
        })
    }
}

/// The socket's owner: accepts `CONNECT <port>`, answers `OK`, relays to the agent.
struct FakeAdaptor {
    socket: PathBuf,
    agent: PathBuf,
    tasks: JoinSet<()>,
}

impl FakeAdaptor {
    fn start(socket: &Path, agent: &Path) -> Self {
        let mut this = Self {
            socket: socket.to_owned(),
            agent: agent.to_owned(),
            tasks: JoinSet::new(),
        };
        this.serve();
        this
    }

    fn serve(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).unwrap();
        let agent = self.agent.clone();
        self.tasks.spawn(async move {
            // The relays belong to the accept loop: aborting it cuts them all.
            let mut relays = JoinSet::new();
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let agent = agent.clone();
                relays.spawn(async move {
                    let mut line = Vec::new();
                    while let Ok(b) = conn.read_u8().await {
                        if b == b'\n' {
                            break;
                        }
                        line.push(b);
                    }
                    if conn.write_all(b"OK 1\n").await.is_err() {
                        return;
                    }
                    let mut upstream = UnixStream::connect(&agent).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                });
            }
        });
    }

    /// As SIGKILL: every relay cut, the socket gone.
    async fn kill(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct World {
    _dir: tempfile::TempDir,
    _server: ttrpc::asynchronous::Server,
    adaptor: FakeAdaptor,
    exited: watch::Sender<bool>,
    endpoint: Endpoint,
}

impl World {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agent_sock = dir.path().join("agent.sock");
        let (exited, rx) = watch::channel(false);
        let agent = Arc::new(Agent { exited: rx });
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(Listener::from(UnixListener::bind(&agent_sock).unwrap()))
            .register_service(create_container_service(agent.clone()))
            .register_service(create_health(agent));
        server.start().await.unwrap();
        let socket = dir.path().join("pod.sock");
        let adaptor = FakeAdaptor::start(&socket, &agent_sock);
        Self {
            _dir: dir,
            _server: server,
            adaptor,
            exited,
            endpoint: Endpoint::Hybrid { uds: socket },
        }
    }

    async fn client(&self, bound: Duration) -> AgentClient {
        AgentClient::connect_endpoint(
            &self.endpoint,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .with_redial(Redial {
            endpoint: self.endpoint.clone(),
            bound,
        })
    }
}

#[tokio::test]
async fn a_wait_in_flight_is_repeated_once_the_socket_is_back() {
    let mut w = World::start().await;
    let agent = w.client(Duration::from_secs(30)).await;
    let waiting = tokio::spawn({
        let agent = agent.clone();
        async move { agent.wait_process("c1", "").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.adaptor.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the wait ended while the socket was gone"
    );
    w.adaptor.serve();
    // The redial happens; then the process exits.
    assert!(agent.health_check().await.unwrap());
    w.exited.send_replace(true);
    let exit = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the wait was not repeated")
        .unwrap()
        .unwrap();
    assert_eq!(exit.status, 7);
}

#[tokio::test]
async fn a_socket_not_back_within_the_bound_fails_the_call_naming_the_bound() {
    let mut w = World::start().await;
    let agent = w.client(Duration::from_secs(1)).await;
    let waiting = tokio::spawn({
        let agent = agent.clone();
        async move { agent.wait_process("c1", "").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.adaptor.kill().await;
    let error = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the redial is not bounded")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(error, AgentError::Reconnect { bound, .. } if bound == Duration::from_secs(1)),
        "{error:?}"
    );
    assert!(error.is_transport());
    assert!(error.to_string().contains("within 1s"), "{error}");
    // Later calls fail too (the sandbox is fenced by then), without hanging.
    let later = tokio::time::timeout(Duration::from_secs(20), agent.health_check()).await;
    assert!(matches!(later, Ok(Err(_))), "{later:?}");
}

#[tokio::test]
async fn a_client_without_redial_fails_at_once() {
    let mut w = World::start().await;
    let agent = AgentClient::connect_endpoint(
        &w.endpoint,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let waiting = tokio::spawn({
        let agent = agent.clone();
        async move { agent.wait_process("c1", "").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    w.adaptor.kill().await;
    w.adaptor.serve();
    let error = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(error.is_transport(), "{error:?}");
    assert!(!matches!(error, AgentError::Reconnect { .. }), "{error:?}");
}
