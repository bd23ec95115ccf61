//! Stdio over vsock (port [`kata_proto::STDIO_VSOCK_PORT`]): the shim opens one
//! connection per stream and writes a header line
//! `"<container_id> <exec_id|-> <stdin|stdout|stderr|tty>\n"`; the agent binds it to the
//! named process's pending stream and answers `OK\n` (or `ERR <reason>\n` and closes).
//!
//! A pending stream is not read until its connection arrives, so a process writing to an
//! unattached pipe blocks instead of losing data.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::pipe;
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
    /// Output read from the process but not delivered when its connection broke; sent
    /// first on re-attach (network mode, [`crate::peerpod::stdio`]).
    pub unsent: Vec<u8>,
    /// Put back after its connection broke: kept for a re-attach also once the process
    /// exited (until the container is removed).
    pub reattach: bool,
}

#[derive(Debug, Default)]
struct Streams {
    pending: HashMap<StreamKey, Pending>,
    /// Streams a connection is copying now.
    attached: HashSet<StreamKey>,
}

/// Streams waiting for their connection, by key.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    streams: Arc<Mutex<Streams>>,
    /// Woken when a stream is put back for a re-attach.
    put_back: Arc<tokio::sync::Notify>,
}

impl Registry {
    /// Registers a stream; returns a receiver that fires when it has been fully copied.
    pub fn register(&self, key: StreamKey, fd: OwnedFd) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().pending.insert(
            key,
            Pending {
                fd,
                done: Some(tx),
                unsent: Vec::new(),
                reattach: false,
            },
        );
        rx
    }

    /// Forgets every pending stream of a container (closing the fds).
    pub fn forget_container(&self, container_id: &str) {
        self.lock()
            .pending
            .retain(|k, _| k.container_id != container_id);
    }

    /// Forgets the pending (never attached) streams of one process, closing their fds.
    pub fn forget_process(&self, container_id: &str, exec_id: &str) {
        self.lock()
            .pending
            .retain(|k, p| p.reattach || k.container_id != container_id || k.exec_id != exec_id);
    }

    /// Forgets one pending stream, closing its fd; false if it was not pending.
    pub fn forget(&self, key: &StreamKey) -> bool {
        self.lock().pending.remove(key).is_some()
    }

    fn take(&self, key: &StreamKey) -> Option<Pending> {
        let mut s = self.lock();
        let p = s.pending.remove(key)?;
        s.attached.insert(key.clone());
        Some(p)
    }

    /// Takes a pending stream; when a connection is still copying it (its peer gone but
    /// not noticed yet), waits up to `timeout` for that connection to put it back.
    pub(crate) async fn take_waiting(
        &self,
        key: &StreamKey,
        timeout: std::time::Duration,
    ) -> Option<Pending> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.put_back.notified();
            if let Some(p) = self.take(key) {
                return Some(p);
            }
            if !self.lock().attached.contains(key) {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The connection copying `key` is done with it.
    pub(crate) fn release(&self, key: &StreamKey) {
        self.lock().attached.remove(key);
    }

    /// The connection copying `key` broke: the stream waits for a re-attach.
    pub(crate) fn put_back(&self, key: StreamKey, mut pending: Pending) {
        pending.reattach = true;
        let mut s = self.lock();
        s.attached.remove(&key);
        s.pending.insert(key, pending);
        drop(s);
        self.put_back.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
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
        registry.release(&key);
        return;
    }
    let copied = match key.kind {
        StreamKind::Stdout | StreamKind::Stderr => {
            copy_output(pipe::Receiver::from_owned_fd(pending.fd), &mut conn).await
        }
        StreamKind::Stdin => match pipe::Sender::from_owned_fd(pending.fd) {
            Ok(mut w) => tokio::io::copy(&mut conn, &mut w).await.map(drop),
            Err(e) => Err(e),
        },
        StreamKind::Tty => match Pty::new(pending.fd) {
            Ok(pty) => copy_tty(pty, conn).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = copied {
        tracing::debug!(stream = ?key, error = %e, "stdio copy ended");
    }
    registry.release(&key);
    if let Some(tx) = pending.done.take() {
        let _ = tx.send(());
    }
}

async fn copy_output<C>(
    reader: std::io::Result<pipe::Receiver>,
    conn: &mut C,
) -> std::io::Result<()>
where
    C: AsyncWrite + Unpin,
{
    let mut reader = reader?;
    let r = tokio::io::copy(&mut reader, conn).await.map(drop);
    let _ = conn.shutdown().await;
    r
}

/// Both directions over the pty master; done once the output side ends (the pty hangs up
/// when the last slave fd closes).
async fn copy_tty<S>(pty: Pty, conn: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(conn);
    let (mut pr, mut pw) = tokio::io::split(pty);
    let out = async {
        let r = tokio::io::copy(&mut pr, &mut cw).await.map(drop);
        let _ = cw.shutdown().await;
        r
    };
    let inp = async {
        let _ = tokio::io::copy(&mut cr, &mut pw).await;
        // Input ended; keep copying output.
        std::future::pending::<std::io::Result<()>>().await
    };
    tokio::select! {
        r = out => r,
        r = inp => r,
    }
}

/// A pty master driven by readiness (non-blocking), so reads and writes proceed
/// independently. (`tokio::fs::File` runs one operation at a time and drops a read in
/// flight when a write comes in, which corrupts a full-duplex pty.)
pub(crate) struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    /// Gives the pty master back.
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.0.into_inner()
    }

    pub(crate) fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an open pty master the AsyncFd owns from now on.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Self(fd))
    }
}

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.as_raw_fd(), unfilled).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: every slave fd is closed; that is the end of the output.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd, data).map_err(std::io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
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

    /// Input and output cross a pty at the same time, and nothing is lost (a blocking-file
    /// wrapper dropped output whenever input arrived).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tty_carries_both_directions() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let reg = Registry::default();
        let done = reg.register(
            StreamKey {
                container_id: "c".into(),
                exec_id: "e".into(),
                kind: StreamKind::Tty,
            },
            pty.master,
        );
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::spawn(handle(server, reg.clone()));
        client.write_all(b"c e tty\n").await.unwrap();
        let slave = std::fs::File::from(pty.slave);
        let mut reader = slave.try_clone().unwrap();
        let echo = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while reader.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let mut w = &slave;
            for i in 0..200 {
                write!(w, "out{i} ").unwrap();
            }
            writeln!(w, "got {}", String::from_utf8_lossy(&line)).unwrap();
            // Closing the last slave fd ends the stream.
            drop(reader);
        });
        client.write_all(b"ping\n").await.unwrap();
        tokio::task::spawn_blocking(move || echo.join().unwrap())
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("OK\n"), "{got}");
        assert!(got.contains("out0 out1 "), "{got}");
        assert!(got.contains("out199 got ping"), "{got}");
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
