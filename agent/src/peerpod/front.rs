//! The agent's TCP front in network mode: accepts mutual-TLS connections, reads the
//! `CONNECT <port>` header ([`kata_proto::network_mode`]) and hands the stream to the same
//! code paths vsock connections reach: port 1024 is relayed to the agent's own ttrpc
//! listener (a unix socket), port 1026 goes to the stdio service.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kata_proto::network_mode::{ok_line, parse_connect, MAX_HEADER_LINE};
use kata_proto::AGENT_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;

/// How long a client has for the TLS handshake and its header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle time before TCP keepalive probes start (a node that vanished is noticed).
const KEEPALIVE_IDLE_SECS: libc::c_int = 30;

/// A connection that ended before it was handed over.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("TLS handshake")]
    Handshake(#[source] std::io::Error),
    #[error("no header within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("read header")]
    Header(#[source] std::io::Error),
    #[error("bad header")]
    BadHeader(#[from] kata_proto::network_mode::HeaderError),
    #[error("connect to the agent's ttrpc socket {}", .0.display())]
    Ttrpc(PathBuf, #[source] std::io::Error),
    #[error("answer the client")]
    Answer(#[source] std::io::Error),
}

/// Serves the front until accepting fails.
pub async fn serve(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    ttrpc_socket: PathBuf,
    stdio: crate::stdio::Registry,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let ttrpc_socket = Arc::new(ttrpc_socket);
    loop {
        let (tcp, peer) = listener.accept().await?;
        keepalive(&tcp);
        let acceptor = acceptor.clone();
        let ttrpc_socket = ttrpc_socket.clone();
        let stdio = stdio.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(tcp, acceptor, &ttrpc_socket, stdio).await {
                tracing::warn!(%peer, error = %crate::logging::chain(&e), "network connection refused");
            }
        });
    }
}

fn keepalive(tcp: &TcpStream) {
    let fd = tcp.as_fd().as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ] {
        // SAFETY: fd is an open socket borrowed for the call; the option value is a live
        // c_int of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Reads a line byte by byte (nothing after the newline is consumed).
async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, FrontError> {
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await.map_err(FrontError::Header)?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_HEADER_LINE {
            return Err(FrontError::Header(std::io::Error::other("header too long")));
        }
        line.push(b);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

async fn handle(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    ttrpc_socket: &Path,
    stdio: crate::stdio::Registry,
) -> Result<(), FrontError> {
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor.accept(tcp).await.map_err(FrontError::Handshake)?;
        let line = read_line(&mut tls).await?;
        Ok::<_, FrontError>((tls, line))
    })
    .await
    .map_err(|_| FrontError::Timeout)?;
    let (mut tls, line) = accepted?;
    let port = match parse_connect(&line) {
        Ok(p) => p,
        Err(e) => {
            let _ = tls.write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = tls.shutdown().await;
            return Err(e.into());
        }
    };
    match port {
        AGENT_VSOCK_PORT => {
            let mut agent = match UnixStream::connect(ttrpc_socket).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tls.write_all(b"ERR agent not serving yet\n").await;
                    let _ = tls.shutdown().await;
                    return Err(FrontError::Ttrpc(ttrpc_socket.to_owned(), e));
                }
            };
            tls.write_all(ok_line(port).as_bytes())
                .await
                .map_err(FrontError::Answer)?;
            // Half-closes travel through; errors only end this connection.
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut agent).await;
        }
        // parse_connect admits only the two served ports: this is STDIO_VSOCK_PORT.
        _ => {
            tls.write_all(ok_line(port).as_bytes())
                .await
                .map_err(FrontError::Answer)?;
            super::stdio::handle(tls, stdio).await;
        }
    }
    Ok(())
}
