//! The per-pod agent socket (`<pods_dir>/<sandbox id>/agent.ttrpc`).
//!
//! It speaks the hybrid-vsock handshake the shim already speaks: for every accepted
//! connection the client writes `CONNECT <port>\n` (1024 ttrpc, 1026 a stdio stream). The
//! adaptor then opens its own mutual-TLS TCP connection to the VM's agent, sends the same
//! line there and waits for the agent's `OK <port>\n`; only then does it answer
//! `OK <port>\n` to the client and relay bytes both ways (half-closes included). A port the
//! agent refuses, or a VM that cannot be reached, closes the client's connection without
//! an answer; hybrid clients retry.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kata_proto::network_mode::{connect_line, ok_line, parse_connect, MAX_HEADER_LINE};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Upper bound of one connection to the agent (TCP, TLS handshake, header exchange).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send its `CONNECT` line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness attempts.
const READY_RETRY: Duration = Duration::from_millis(250);

/// A connection or socket failure.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connect to {0}")]
    Tcp(SocketAddr, #[source] std::io::Error),
    #[error("TLS handshake with {0}")]
    Handshake(SocketAddr, #[source] std::io::Error),
    #[error("header exchange with {0}")]
    Header(SocketAddr, #[source] std::io::Error),
    #[error("agent at {addr} refused port {port}: {answer:?}")]
    Refused {
        addr: SocketAddr,
        port: u32,
        answer: String,
    },
    #[error("no answer from {0} within {CONNECT_TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error("the agent at {addr} did not answer within {waited:?}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        #[source]
        last: Box<ProxyError>,
    },
    #[error("{what} {}", .path.display())]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("client header")]
    ClientHeader(#[source] std::io::Error),
    #[error("client header")]
    BadClientHeader(#[from] kata_proto::network_mode::HeaderError),
}

/// Where and how the adaptor reaches one VM's agent.
#[derive(Clone)]
pub struct AgentEndpoint {
    addr: SocketAddr,
    name: ServerName<'static>,
    connector: TlsConnector,
}

/// Reads one line (without its newline), byte by byte so nothing after it is consumed.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_HEADER_LINE {
            return Err(std::io::Error::other("header line too long"));
        }
        line.push(b);
    }
}

impl std::fmt::Debug for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEndpoint")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AgentEndpoint {
    /// The agent at `address:port`, whose certificate must name `name`.
    pub fn new(
        address: IpAddr,
        port: u16,
        name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            addr: SocketAddr::new(address, port),
            name,
            connector: TlsConnector::from(tls),
        }
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One connection to guest port `port`, ready for its byte stream.
    pub async fn connect(&self, port: u32) -> Result<TlsStream<TcpStream>, ProxyError> {
        let addr = self.addr;
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ProxyError::Tcp(addr, e))?;
            let _ = tcp.set_nodelay(true);
            let mut tls = self
                .connector
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|e| ProxyError::Handshake(addr, e))?;
            tls.write_all(connect_line(port).as_bytes())
                .await
                .map_err(|e| ProxyError::Header(addr, e))?;
            let answer = read_line(&mut tls)
                .await
                .map_err(|e| ProxyError::Header(addr, e))?;
            if answer == ok_line(port).trim_end() {
                Ok(tls)
            } else {
                Err(ProxyError::Refused { addr, port, answer })
            }
        })
        .await
        .map_err(|_| ProxyError::Timeout(addr))?
    }

    /// Waits until the agent accepts a ttrpc connection, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ProxyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, self.connect(kata_proto::AGENT_VSOCK_PORT)).await;
            let last = match attempt {
                Ok(Ok(mut tls)) => {
                    let _ = tls.shutdown().await;
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(_) => ProxyError::Timeout(self.addr),
            };
            if tokio::time::Instant::now() + READY_RETRY >= deadline {
                return Err(ProxyError::NotReady {
                    addr: self.addr,
                    waited: timeout,
                    last: Box::new(last),
                });
            }
            tracing::trace!(addr = %self.addr, error = %crate::report::chain(&last), "agent not ready yet");
            tokio::time::sleep(READY_RETRY).await;
        }
    }
}

/// A pod's agent socket being served. Dropping it stops the listener and every relayed
/// connection; [`PodProxy::stop`] also removes the socket file.
#[derive(Debug)]
pub struct PodProxy {
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl PodProxy {
    /// Binds `socket` (a stale file is replaced; mode 0600) and serves it.
    pub fn start(socket: &Path, endpoint: AgentEndpoint) -> Result<Self, ProxyError> {
        let err = |what, source| ProxyError::Socket {
            what,
            path: socket.to_owned(),
            source,
        };
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove stale", e)),
        }
        let listener = UnixListener::bind(socket).map_err(|e| err("bind", e))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err("chmod", e))?;
        let endpoint = Arc::new(endpoint);
        let task = tokio::spawn(serve(listener, endpoint));
        Ok(Self {
            socket: socket.to_owned(),
            task,
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: UnixListener, endpoint: Arc<AgentEndpoint>) {
    // Owned here: aborting this task drops the set, which aborts every relay.
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let endpoint = endpoint.clone();
                    relays.spawn(async move {
                        if let Err(e) = relay(conn, &endpoint).await {
                            tracing::debug!(agent = %endpoint.addr(), error = %crate::report::chain(&e), "agent connection not relayed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

async fn relay(mut client: UnixStream, endpoint: &AgentEndpoint) -> Result<(), ProxyError> {
    let line = tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut client))
        .await
        .map_err(|_| ProxyError::ClientHeader(std::io::ErrorKind::TimedOut.into()))?
        .map_err(ProxyError::ClientHeader)?;
    let port = parse_connect(&line)?;
    let mut agent = endpoint.connect(port).await?;
    client
        .write_all(ok_line(port).as_bytes())
        .await
        .map_err(ProxyError::ClientHeader)?;
    // Errors here only end this connection (a client or the VM went away).
    let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    Ok(())
}
