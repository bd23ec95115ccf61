//! Host side of the guest's vsock: device setup and connecting to guest ports.
//!
//! Two flavours, one stream type ([`VsockStream`]):
//! - vhost: the kernel's `/dev/vhost-vsock`; we pick a free guest CID with the
//!   `VHOST_VSOCK_SET_GUEST_CID` ioctl ([`VhostVsock::open`]) and connect with AF_VSOCK.
//! - hybrid: the `vhost-device-vsock` daemon; the host connects to its unix socket, writes
//!   `CONNECT <port>\n` and reads `OK <n>\n` before the stream starts.
//!
//! [`Endpoint::connect`] retries with exponential backoff (10 ms doubling, capped at
//! 50 ms) because the guest's listener appears some time after boot; a low cap keeps the
//! delay between "agent listening" and "host connected" small, and a failed attempt is
//! cheap (a local socket or vsock RST).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Path of the kernel vhost-vsock device.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";
/// Guest CID used with hybrid vsock (each VM has its own daemon).
pub const HYBRID_GUEST_CID: u32 = 3;
/// First guest CID tried with vhost-vsock (0-2 are reserved).
const FIRST_GUEST_CID: u32 = 3;
/// How many CIDs to try before giving up.
const CID_ATTEMPTS: u32 = 4096;
/// Longest reply line accepted from the hybrid vsock daemon.
const MAX_REPLY_LEN: usize = 64;
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_CAP: Duration = Duration::from_millis(50);
/// Upper bound of one connect attempt (socket connect plus the hybrid handshake). Long: a
/// CONNECT sent before the guest's vsock driver is up is answered once it is (OK, or a reset
/// while the agent is not listening yet, which is retried at once). Closing attempts after
/// 1 s instead piled up dozens of pending requests in vhost-device-vsock during slow
/// boots, after which it was seen to stop answering altogether.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

nix::ioctl_write_ptr!(vhost_vsock_set_guest_cid, 0xAF, 0x60, u64);

/// Errors setting up vsock or connecting through it.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Opening `/dev/vhost-vsock` failed.
    #[error("cannot open {VHOST_VSOCK_DEVICE}")]
    OpenVhost(#[source] io::Error),
    /// Setting the guest CID failed with something other than "in use".
    #[error("cannot set guest CID {cid}")]
    SetCid {
        cid: u32,
        #[source]
        source: nix::Error,
    },
    /// Every CID tried was in use.
    #[error("no free guest CID in {FIRST_GUEST_CID}..{}", FIRST_GUEST_CID + CID_ATTEMPTS)]
    NoFreeCid,
    /// Connecting to the hybrid vsock unix socket failed.
    #[error("cannot connect to {}", .path.display())]
    UnixConnect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The `CONNECT` exchange failed at the I/O level (e.g. the daemon closed the socket).
    #[error("hybrid vsock handshake failed")]
    Handshake(#[source] io::Error),
    /// The daemon answered something other than `OK ...`.
    #[error("hybrid vsock CONNECT rejected: {0:?}")]
    Rejected(String),
    /// Connecting with AF_VSOCK failed.
    #[error("cannot connect to vsock {cid}:{port}")]
    VsockConnect {
        cid: u32,
        port: u32,
        #[source]
        source: io::Error,
    },
    /// Retries ran out; the last failure is the source.
    #[error("gave up after {timeout:?}")]
    TimedOut {
        timeout: Duration,
        #[source]
        last: Box<VsockError>,
    },
}

/// A byte stream to a guest vsock port.
#[derive(Debug)]
pub enum VsockStream {
    /// Through the hybrid vsock daemon, after the `CONNECT` handshake.
    Unix(UnixStream),
    /// A kernel AF_VSOCK stream.
    Vsock(tokio_vsock::VsockStream),
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            VsockStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            VsockStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_flush(cx),
            VsockStream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            VsockStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where the host connects to reach a guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The hybrid vsock daemon's host-side unix socket (`uds-path`).
    Hybrid { uds: PathBuf },
    /// The guest's CID, for AF_VSOCK.
    Vhost { cid: u32 },
}

impl Endpoint {
    /// One connection attempt to `port`.
    pub async fn connect_once(&self, port: u32) -> Result<VsockStream, VsockError> {
        match self {
            Endpoint::Hybrid { uds } => hybrid_connect(uds, port).await.map(VsockStream::Unix),
            Endpoint::Vhost { cid } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, port);
                tokio_vsock::VsockStream::connect(addr)
                    .await
                    .map(VsockStream::Vsock)
                    .map_err(|source| VsockError::VsockConnect {
                        cid: *cid,
                        port,
                        source,
                    })
            }
        }
    }

    /// Connects to `port`, retrying with backoff until `timeout` has passed.
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<VsockStream, VsockError> {
        let deadline = Instant::now() + timeout;
        let mut delay = BACKOFF_START;
        let mut last = None;
        loop {
            // One attempt may hang (a CONNECT sent before the guest's vsock driver is up can
            // go unanswered): bound each attempt so the loop keeps retrying.
            let attempt_deadline = (Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
            match tokio::time::timeout_at(attempt_deadline, self.connect_once(port)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = Some(e),
                Err(_) if attempt_deadline < deadline => {
                    last = Some(VsockError::Handshake(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer to a connect to port {port} within {ATTEMPT_TIMEOUT:?}"),
                    )))
                }
                // An attempt cut short by the overall deadline: the previous failure says more.
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let last = last.unwrap_or(VsockError::Handshake(io::ErrorKind::TimedOut.into()));
                return Err(VsockError::TimedOut {
                    timeout,
                    last: Box::new(last),
                });
            }
            if let Some(error) = &last {
                tracing::trace!(port, %error, "vsock connect attempt failed, retrying");
            }
            tokio::time::sleep_until((now + delay).min(deadline)).await;
            delay = (delay * 2).min(BACKOFF_CAP);
        }
    }
}

/// Connects to the hybrid vsock daemon at `uds` and performs the `CONNECT` handshake.
pub async fn hybrid_connect(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| VsockError::UnixConnect {
            path: uds.to_path_buf(),
            source,
        })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(VsockError::Handshake)?;
    // Byte by byte: anything after the newline already belongs to the guest's stream.
    let mut reply = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(VsockError::Handshake)?;
        if byte == b'\n' {
            break;
        }
        reply.push(byte);
        if reply.len() > MAX_REPLY_LEN {
            return Err(VsockError::Rejected(
                String::from_utf8_lossy(&reply).into_owned(),
            ));
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if reply.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(VsockError::Rejected(reply))
    }
}

/// Arguments of `vhost-device-vsock` serving one VM.
pub fn hybrid_daemon_args(socket: &Path, uds: &Path) -> Vec<OsString> {
    let mut vm = OsString::from(format!("guest-cid={HYBRID_GUEST_CID},socket="));
    vm.push(socket);
    vm.push(",uds-path=");
    vm.push(uds);
    vec!["--vm".into(), vm]
}

/// Whether `/dev/vhost-vsock` exists and opens. Blocking.
pub fn vhost_available() -> bool {
    open_vhost().is_ok()
}

fn open_vhost() -> io::Result<std::fs::File> {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK_DEVICE)
}

/// An open `/dev/vhost-vsock` with a guest CID claimed; QEMU inherits the fd.
#[derive(Debug)]
pub struct VhostVsock {
    fd: OwnedFd,
    cid: u32,
}

impl VhostVsock {
    /// Opens the device and claims the first free CID from 3. Blocking (quick ioctls).
    pub fn open() -> Result<VhostVsock, VsockError> {
        let fd = OwnedFd::from(open_vhost().map_err(VsockError::OpenVhost)?);
        for cid in FIRST_GUEST_CID..FIRST_GUEST_CID + CID_ATTEMPTS {
            let value = u64::from(cid);
            // SAFETY: fd is an open vhost-vsock descriptor and the ioctl reads one u64
            // from a pointer to a live local.
            match unsafe { vhost_vsock_set_guest_cid(fd.as_raw_fd(), &value) } {
                Ok(_) => return Ok(VhostVsock { fd, cid }),
                Err(nix::Error::EADDRINUSE) => continue,
                Err(source) => return Err(VsockError::SetCid { cid, source }),
            }
        }
        Err(VsockError::NoFreeCid)
    }

    /// The claimed guest CID.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The raw fd (close-on-exec; the spawner clears that flag in the child only).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A fake hybrid vsock daemon: replies `reply` to the CONNECT line, then echoes.
    fn fake_daemon(path: &Path, reply: &'static str, expected_port: u32) {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    assert_eq!(line, format!("CONNECT {expected_port}\n"));
                    // The reply and the first stream bytes in one write: the client must
                    // not swallow the stream bytes.
                    let first = format!("{reply}hello ");
                    stream.get_mut().write_all(first.as_bytes()).await.unwrap();
                    let (mut r, mut w) = stream.into_inner().into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }

    #[tokio::test]
    async fn hybrid_handshake_then_stream() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        fake_daemon(&uds, "OK 1024\n", 1024);
        let endpoint = Endpoint::Hybrid { uds };
        let mut stream = endpoint
            .connect(1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello ");
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn hybrid_rejection_is_retried_until_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        fake_daemon(&uds, "NO\n", 7);
        let endpoint = Endpoint::Hybrid { uds };
        let err = endpoint
            .connect(7, Duration::from_millis(200))
            .await
            .unwrap_err();
        match err {
            VsockError::TimedOut { last, .. } => {
                assert!(
                    matches!(*last, VsockError::Rejected(ref r) if r == "NO"),
                    "{last}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn missing_socket_times_out_with_cause() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Hybrid {
            uds: dir.path().join("absent.sock"),
        };
        let start = std::time::Instant::now();
        let err = endpoint
            .connect(1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        match err {
            VsockError::TimedOut { last, .. } => {
                assert!(matches!(*last, VsockError::UnixConnect { .. }), "{last}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn daemon_args() {
        let args = hybrid_daemon_args(
            Path::new("/run/vm/vhost-vsock.sock"),
            Path::new("/run/vm/vsock.sock"),
        );
        assert_eq!(
            args,
            [
                "--vm",
                "guest-cid=3,socket=/run/vm/vhost-vsock.sock,uds-path=/run/vm/vsock.sock"
            ]
        );
    }

    fn assert_stream_traits<T: AsyncRead + AsyncWrite + Send + Sync + Unpin>() {}

    #[test]
    fn stream_is_send_sync_unpin() {
        assert_stream_traits::<VsockStream>();
    }
}
