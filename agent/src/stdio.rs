//! Stdio over vsock (port [`kata_proto::STDIO_VSOCK_PORT`]): the shim opens one
//! connection per stream and writes a header line
//! `"<container_id> <exec_id|-> <stdin|stdout|stderr|tty>\n"`; the agent binds it to the
//! named process's pending stream and answers `OK\n` (or `ERR <reason>\n` and closes).
//!
//! A pending stream is not read until its connection arrives, so a process writing to an
//! unattached pipe blocks instead of losing data.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// Longest header accepted, in bytes.
const MAX_HEADER: usize = 512;

/// Which stream of a process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Connection -> process.
    Stdin,
    /// Process -> connection.
    Stdout,
    /// Process -> connection.
    Stderr,
    /// Both ways over the pty master.
    Tty,
}

/// The parsed header of a stdio connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamKey {
    /// The container.
    pub container_id: String,
    /// The exec id; empty for the container's init process.
    pub exec_id: String,
    /// The stream.
    pub kind: StreamKind,
}

/// A header that cannot be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Not three space-separated fields.
    #[error("header must be \"<container_id> <exec_id|-> <stream>\"")]
    Fields,
    /// An unknown stream name.
    #[error("unknown stream {0:?}")]
    Stream(String),
}

/// Parses one header line (without its newline).
pub fn parse_header(line: &str) -> Result<StreamKey, HeaderError> {
    let mut it = line.split(' ');
    let (Some(cid), Some(eid), Some(kind), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(HeaderError::Fields);
    };
    if cid.is_empty() || eid.is_empty() {
        return Err(HeaderError::Fields);
    }
    let kind = match kind {
        "stdin" => StreamKind::Stdin,
        "stdout" => StreamKind::Stdout,
        "stderr" => StreamKind::Stderr,
        "tty" => StreamKind::Tty,
        other => return Err(HeaderError::Stream(other.to_owned())),
    };
    Ok(StreamKey {
        container_id: cid.to_owned(),
        exec_id: if eid == "-" {
            String::new()
        } else {
            eid.to_owned()
        },
        kind,
    })
}

/// Reads a header line byte by byte (so nothing after it is consumed).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if buf.len() >= MAX_HEADER {
            return Err(std::io::Error::other("header too long"));
        }
        buf.push(b);
    }
    String::from_utf8(buf).map_err(|_| std::io::Error::other("header is not UTF-8"))
}

/// One stream waiting for its connection.
#[derive(Debug)]
pub struct Pending {
    /// The agent's end: pipe read end (output), pipe write end (stdin), or pty master.
    pub fd: OwnedFd,
    /// Fired when the copy finished and the connection is closed.
    pub done: Option<oneshot::Sender<()>>,
}

/// Streams waiting for their connection, by key.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    pending: Arc<Mutex<HashMap<StreamKey, Pending>>>,
}

impl Registry {
    /// Registers a stream; returns a receiver that fires when it has been fully copied.
    pub fn register(&self, key: StreamKey, fd: OwnedFd) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(key, Pending { fd, done: Some(tx) });
        rx
    }

    /// Forgets every pending stream of a container (closing the fds).
    pub fn forget_container(&self, container_id: &str) {
        self.lock().retain(|k, _| k.container_id != container_id);
    }

    /// Forgets the pending (never attached) streams of one process, closing their fds.
    pub fn forget_process(&self, container_id: &str, exec_id: &str) {
        self.lock()
            .retain(|k, _| k.container_id != container_id || k.exec_id != exec_id);
    }

    /// Forgets one pending stream, closing its fd; false if it was not pending.
    pub fn forget(&self, key: &StreamKey) -> bool {
        self.lock().remove(key).is_some()
    }

    fn take(&self, key: &StreamKey) -> Option<Pending> {
        self.lock().remove(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handles one connection: header, binding, copying.
pub async fn handle<S>(mut conn: S, registry: Registry)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = match read_header(&mut conn).await {
        Ok(line) => match parse_header(&line) {
            Ok(k) => k,
            Err(e) => {
                let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
                return;
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "stdio header");
            return;
        }
    };
    let Some(mut pending) = registry.take(&key) else {
        let _ = conn
            .write_all(b"ERR no such process stream (or already attached)\n")
            .await;
        return;
    };
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    let file = tokio::fs::File::from_std(File::from(pending.fd));
    match key.kind {
        StreamKind::Stdout | StreamKind::Stderr => {
            let mut file = file;
            let _ = tokio::io::copy(&mut file, &mut conn).await;
            let _ = conn.shutdown().await;
        }
        StreamKind::Stdin => {
            let mut file = file;
            let _ = tokio::io::copy(&mut conn, &mut file).await;
            let _ = file.flush().await;
            drop(file);
        }
        StreamKind::Tty => {
            let (mut cr, mut cw) = tokio::io::split(conn);
            let (mut fr, mut fw) = tokio::io::split(file);
            let out = async {
                let _ = tokio::io::copy(&mut fr, &mut cw).await;
                let _ = cw.shutdown().await;
            };
            let inp = async {
                let _ = tokio::io::copy(&mut cr, &mut fw).await;
            };
            // Output end decides: once the pty hangs up, the stream is done.
            tokio::select! {
                () = out => {}
                () = async { inp.await; std::future::pending::<()>().await } => {}
            }
        }
    }
    if let Some(tx) = pending.done.take() {
        let _ = tx.send(());
    }
}

/// Accepts stdio connections on vsock forever.
pub async fn serve_vsock(registry: Registry) -> std::io::Result<()> {
    let addr =
        tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, kata_proto::STDIO_VSOCK_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    tracing::info!(port = kata_proto::STDIO_VSOCK_PORT, "serving stdio");
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(handle(conn, registry.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        assert_eq!(
            parse_header("c1 - stdout").unwrap(),
            StreamKey {
                container_id: "c1".into(),
                exec_id: String::new(),
                kind: StreamKind::Stdout
            }
        );
        assert_eq!(parse_header("c1 e2 tty").unwrap().exec_id, "e2");
        assert_eq!(parse_header("c1 e2").unwrap_err(), HeaderError::Fields);
        assert_eq!(
            parse_header("c1 e2 tty x").unwrap_err(),
            HeaderError::Fields
        );
        assert_eq!(
            parse_header("c1 - foo").unwrap_err(),
            HeaderError::Stream("foo".into())
        );
    }

    #[tokio::test]
    async fn copies_stdout_after_ok_and_signals_done() {
        let reg = Registry::default();
        let (r, w) = nix::unistd::pipe().unwrap();
        let done = reg.register(
            StreamKey {
                container_id: "c".into(),
                exec_id: String::new(),
                kind: StreamKind::Stdout,
            },
            r,
        );
        nix::unistd::write(&w, b"hello").unwrap();
        drop(w);
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(handle(server, reg.clone()));
        client.write_all(b"c - stdout\n").await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"OK\nhello");
        done.await.unwrap();
    }

    #[tokio::test]
    async fn unknown_stream_is_err() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(handle(server, Registry::default()));
        client.write_all(b"c - stdin\n").await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("ERR "), "{got}");
    }
}
