//! The whole agent path without a VM: a hybrid-vsock client (the shim's own code) on the
//! adaptor's per-pod socket, the adaptor's mutual-TLS relay, the agent's TLS front and its
//! real ttrpc and stdio services, all in-process over loopback. Certificates from the
//! adaptor's CA; a foreign client certificate, a wrong server name and an unserved port
//! are refused.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use kata_agent::mounts::SyscallMounter;
use kata_agent::service::{Agent, AgentOptions, ShutdownMode};
use kata_agent::stdio::{StreamKey, StreamKind};
use kata_hypervisor::vsock::hybrid_connect;
use kata_peerpod::proxy::{AgentEndpoint, PodProxy, ProxyError};
use kata_peerpod::tls::{client_config, server_name, Ca};
use kata_proto::health::{health_check_response::ServingStatus, CheckRequest};
use kata_proto::health_ttrpc::HealthClient;
use kata_proto::peerpod::AgentTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::asynchronous::{transport::Socket, Client};

const INSTANCE: &str = "podvm-test-relay-00000001";

struct Setup {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    ca: Ca,
    port: u16,
    socket: std::path::PathBuf,
    proxy: Option<PodProxy>,
    endpoint: AgentEndpoint,
    _server: ttrpc::asynchronous::Server,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let agent = Arc::new(Agent::new(AgentOptions {
        base_dir: base,
        shutdown: ShutdownMode::Exit,
        loaded_modules: Vec::new(),
        mounter: Arc::new(SyscallMounter),
    }));
    let ttrpc_socket = dir.path().join("ttrpc.sock");
    let server =
        kata_agent::server::start(&format!("unix://{}", ttrpc_socket.display()), agent.clone())
            .await
            .unwrap();

    let ca = Ca::load_or_create(dir.path()).unwrap();
    let pair = ca.issue_server(INSTANCE).unwrap();
    let mut tls = AgentTls::new();
    tls.ca_pem = ca.cert_pem().to_owned();
    tls.cert_pem = pair.cert_pem;
    tls.key_pem = pair.key_pem;
    let config = kata_agent::peerpod::tls::server_config(&tls).unwrap();
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(kata_agent::peerpod::front::serve(
        listener,
        tokio_rustls_acceptor(config),
        ttrpc_socket,
        agent.stdio().clone(),
    ));

    let client = ca.issue_client("0123456789abcdef").unwrap();
    let endpoint = AgentEndpoint::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        server_name(INSTANCE).unwrap(),
        client_config(ca.cert_pem(), &client).unwrap(),
    );
    endpoint.wait_ready(Duration::from_secs(10)).await.unwrap();
    let socket = dir.path().join("agent.ttrpc");
    let proxy = PodProxy::start(&socket, endpoint.clone()).unwrap();
    Setup {
        endpoint,
        _dir: dir,
        agent,
        ca,
        port,
        socket,
        proxy: Some(proxy),
        _server: server,
    }
}

fn tokio_rustls_acceptor(config: Arc<rustls::ServerConfig>) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttrpc_and_stdio_through_the_relay() {
    let mut s = setup().await;

    // ttrpc: the shim's hybrid handshake, then a real Health check.
    let stream = hybrid_connect(&s.socket, kata_proto::AGENT_VSOCK_PORT)
        .await
        .unwrap();
    let health = HealthClient::new(Client::new(Socket::new(stream)));
    let resp = health
        .check(
            ttrpc::context::with_timeout(5_000_000_000),
            &CheckRequest::new(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));

    // stdout: data then EOF, after the agent's own stdio header answer.
    let (r, w) = nix::unistd::pipe().unwrap();
    let done = s.agent.stdio().register(
        StreamKey {
            container_id: "c".into(),
            exec_id: String::new(),
            kind: StreamKind::Stdout,
        },
        r,
    );
    nix::unistd::write(&w, b"hello through TLS").unwrap();
    drop(w);
    let mut out = hybrid_connect(&s.socket, kata_proto::STDIO_VSOCK_PORT)
        .await
        .unwrap();
    out.write_all(b"c - stdout\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"OK\nhello through TLS");
    done.await.unwrap();

    // stdin: the client's half-close reaches the process side as EOF.
    let (r, w) = nix::unistd::pipe().unwrap();
    s.agent.stdio().register(
        StreamKey {
            container_id: "c".into(),
            exec_id: "e".into(),
            kind: StreamKind::Stdin,
        },
        w,
    );
    let mut inp = hybrid_connect(&s.socket, kata_proto::STDIO_VSOCK_PORT)
        .await
        .unwrap();
    inp.write_all(b"c e stdin\n").await.unwrap();
    let mut ok = [0u8; 3];
    inp.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"OK\n");
    inp.write_all(b"typed input").await.unwrap();
    inp.shutdown().await.unwrap();
    let received = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(r);
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        v
    });
    let received = tokio::time::timeout(Duration::from_secs(10), received)
        .await
        .expect("stdin EOF did not arrive")
        .unwrap();
    assert_eq!(received, b"typed input");

    // Stopping the proxy removes the socket; a client then fails to connect.
    s.proxy.take().unwrap().stop();
    assert!(!s.socket.exists());
    assert!(hybrid_connect(&s.socket, 1024).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_names_and_ports_are_refused() {
    let s = setup().await;
    let addr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    // A client certificate from another CA: the agent's handshake refuses it.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::load_or_create(other_dir.path()).unwrap();
    let foreign = other.issue_client("0123456789abcdef").unwrap();
    let ep = AgentEndpoint::new(
        addr,
        s.port,
        server_name(INSTANCE).unwrap(),
        client_config(s.ca.cert_pem(), &foreign).unwrap(),
    );
    let e = ep.connect(1024).await.unwrap_err();
    assert!(
        matches!(e, ProxyError::Handshake(..) | ProxyError::Header(..)),
        "{e:?}"
    );

    // The right CA but a certificate for another instance: the adaptor refuses the VM.
    let client = s.ca.issue_client("0123456789abcdef").unwrap();
    let ep = AgentEndpoint::new(
        addr,
        s.port,
        server_name("podvm-someone-else-00000002").unwrap(),
        client_config(s.ca.cert_pem(), &client).unwrap(),
    );
    let e = ep.connect(1024).await.unwrap_err();
    assert!(matches!(e, ProxyError::Handshake(..)), "{e:?}");

    // A port the agent does not serve.
    let ep = AgentEndpoint::new(
        addr,
        s.port,
        server_name(INSTANCE).unwrap(),
        client_config(s.ca.cert_pem(), &client).unwrap(),
    );
    match ep.connect(22).await.unwrap_err() {
        ProxyError::Refused {
            port: 22, answer, ..
        } => {
            assert!(answer.starts_with("ERR "), "{answer}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Through the socket, an unserved port gets no OK (the connection closes).
    assert!(hybrid_connect(&s.socket, 22).await.is_err());
}

/// An adaptor restart while a process writes: every relayed connection breaks (no TLS
/// close), the socket comes back, the client attaches the same stream again and gets the
/// output written meanwhile; ttrpc works on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_attached_again_after_an_adaptor_restart() {
    let mut s = setup().await;
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut done = s.agent.stdio().register(
        StreamKey {
            container_id: "c".into(),
            exec_id: "e".into(),
            kind: StreamKind::Stdout,
        },
        r,
    );
    nix::unistd::write(&w, b"one ").unwrap();
    let mut out = hybrid_connect(&s.socket, kata_proto::STDIO_VSOCK_PORT)
        .await
        .unwrap();
    out.write_all(b"c e stdout\n").await.unwrap();
    let mut first = vec![0u8; 7];
    out.read_exact(&mut first).await.unwrap();
    assert_eq!(first, b"OK\none ");

    // The adaptor goes away: its relays end without a TLS close.
    s.proxy.take().unwrap().stop();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    nix::unistd::write(&w, b"two ").unwrap();

    // ...and comes back on the same path.
    let proxy = PodProxy::start(&s.socket, s.endpoint.clone()).unwrap();
    let mut out = hybrid_connect(&s.socket, kata_proto::STDIO_VSOCK_PORT)
        .await
        .unwrap();
    out.write_all(b"c e stdout\n").await.unwrap();
    let mut again = vec![0u8; 7];
    tokio::time::timeout(Duration::from_secs(20), out.read_exact(&mut again))
        .await
        .expect("no answer to the re-attach")
        .unwrap();
    assert_eq!(again, b"OK\ntwo ");
    assert!(done.try_recv().is_err(), "the stream ended early");
    nix::unistd::write(&w, b"three").unwrap();
    drop(w);
    let mut tail = Vec::new();
    out.read_to_end(&mut tail).await.unwrap();
    assert_eq!(tail, b"three");
    done.await.unwrap();

    let stream = hybrid_connect(&s.socket, kata_proto::AGENT_VSOCK_PORT)
        .await
        .unwrap();
    let health = HealthClient::new(Client::new(Socket::new(stream)));
    health
        .check(
            ttrpc::context::with_timeout(5_000_000_000),
            &CheckRequest::new(),
        )
        .await
        .unwrap();
    proxy.stop();
}
