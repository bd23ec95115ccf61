//! The control channel between the agent and a container helper: a `SOCK_SEQPACKET`
//! socketpair carrying one JSON message per packet, and a pty master fd with the `Tty`
//! message (`SCM_RIGHTS`).
//!
//! Agent -> helper: the [`Plan`](super::child::Plan) first, later [`ToChild::Start`]. The
//! plan carries the spec, whose environment alone may take megabytes: it travels in a
//! sealed memfd ([`send_large`]), and the packet only carries its size and the fd.
//! Helper -> agent: `Pid` of the process it forked; then, from that process, `Tty` (when it
//! has a terminal), `Ready` (set up, waiting for Start) or `Error`. After Start the channel
//! closes when `execve` succeeds (close-on-exec) or carries an `Error`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// Largest packet. Only small messages travel as packets; the plan goes through a memfd.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest message sent through a memfd (the agent protocol's own messages are smaller).
pub const MAX_LARGE: usize = 64 << 20;

/// The packet announcing a message in a memfd (the fd comes with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct InMemfd {
    /// Bytes of JSON in the memfd.
    bytes: usize,
}

/// Agent -> helper, after the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToChild {
    /// Run the process now.
    Start,
}

/// Helper -> agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromChild {
    /// The helper forked the process: its pid in the agent's pid namespace.
    Pid(i32),
    /// The pty master comes with this message.
    Tty,
    /// Everything is set up; the process waits for Start.
    Ready,
    /// Setup (or, after Start, exec) failed.
    Error(String),
}

/// A channel failure.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket call failed.
    #[error("control socket")]
    Io(#[from] Errno),
    /// A message does not parse.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A message is larger than [`MAX_MESSAGE`] (or, in a memfd, [`MAX_LARGE`]).
    #[error("control message of {size} bytes is larger than {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// The memfd carrying a large message could not be made, written or read.
    #[error("control message memfd")]
    Memfd(#[source] std::io::Error),
}

/// A socketpair for one helper: (agent end, helper end). Both close-on-exec.
pub fn pair() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends one message, with an optional fd.
pub fn send<T: Serialize>(sock: RawFd, msg: &T, fd: Option<RawFd>) -> Result<(), ChannelError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| ChannelError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ChannelError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE,
        });
    }
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    loop {
        match sendmsg::<()>(
            sock,
            &[IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Sends a message of any size up to [`MAX_LARGE`]: its JSON goes into a memfd, sealed
/// against any change, and the packet carries the size and the fd.
pub fn send_large<T: Serialize>(sock: RawFd, msg: &T) -> Result<(), ChannelError> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::Write;
    let bytes = serde_json::to_vec(msg).map_err(|e| ChannelError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_LARGE {
        return Err(ChannelError::TooLarge {
            size: bytes.len(),
            limit: MAX_LARGE,
        });
    }
    let memfd = memfd_create(
        c"kata-plan",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| ChannelError::Memfd(e.into()))?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&bytes).map_err(ChannelError::Memfd)?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| ChannelError::Memfd(e.into()))?;
    send(
        sock,
        &InMemfd { bytes: bytes.len() },
        Some(file.as_raw_fd()),
    )
}

/// Blocking receive of a [`send_large`] message (helper side). `None` when the agent closed
/// its end.
pub fn recv_large<T: for<'de> Deserialize<'de>>(sock: RawFd) -> Result<Option<T>, ChannelError> {
    use std::os::unix::fs::FileExt;
    let Some((head, fd)) = recv::<InMemfd>(sock)? else {
        return Ok(None);
    };
    let fd =
        fd.ok_or_else(|| ChannelError::Malformed("a large message without its memfd".into()))?;
    if head.bytes > MAX_LARGE {
        return Err(ChannelError::TooLarge {
            size: head.bytes,
            limit: MAX_LARGE,
        });
    }
    let file = std::fs::File::from(fd);
    let mut bytes = vec![0u8; head.bytes];
    // The agent's writes left the shared offset at the end: read from 0.
    file.read_exact_at(&mut bytes, 0)
        .map_err(ChannelError::Memfd)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ChannelError::Malformed(e.to_string()))
}

/// One received packet: `None` at end of stream.
type Packet = Option<(Vec<u8>, Option<OwnedFd>)>;

fn recv_packet(sock: RawFd, flags: MsgFlags) -> Result<Packet, Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut cmsg),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed this fd for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    if len == 0 && fd.is_none() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fd)))
}

fn decode<T: for<'de> Deserialize<'de>>(
    packet: Packet,
) -> Result<Option<(T, Option<OwnedFd>)>, ChannelError> {
    match packet {
        None => Ok(None),
        Some((bytes, fd)) => {
            let msg = serde_json::from_slice(&bytes)
                .map_err(|e| ChannelError::Malformed(e.to_string()))?;
            Ok(Some((msg, fd)))
        }
    }
}

/// Blocking receive (helper side). `None` when the agent closed its end.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: RawFd,
) -> Result<Option<(T, Option<OwnedFd>)>, ChannelError> {
    let packet = loop {
        match recv_packet(sock, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    decode(packet)
}

/// The agent's end, driven by tokio.
#[derive(Debug)]
pub struct AgentEnd {
    fd: AsyncFd<OwnedFd>,
}

impl AgentEnd {
    /// Wraps the agent's end of [`pair`] (made non-blocking).
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `fd` is an open socket that the AsyncFd owns from now on; its number
        // cannot change while owned.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }

    /// Sends a message (packets are small; the socket buffer takes them at once).
    pub fn send<T: Serialize>(&self, msg: &T) -> Result<(), ChannelError> {
        send(self.fd.as_fd().as_raw_fd(), msg, None)
    }

    /// Sends a message of any size through a memfd (see [`send_large`]).
    pub fn send_large<T: Serialize>(&self, msg: &T) -> Result<(), ChannelError> {
        send_large(self.fd.as_fd().as_raw_fd(), msg)
    }

    /// Receives the next message from the helper; `None` once it closed its end.
    pub async fn recv(&self) -> Result<Option<(FromChild, Option<OwnedFd>)>, ChannelError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| {
                ChannelError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            })?;
            match guard.try_io(|inner| {
                recv_packet(inner.as_raw_fd(), MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)
            }) {
                Ok(Ok(packet)) => return decode(packet),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Ok(Err(e)) => {
                    return Err(ChannelError::Io(Errno::from_raw(
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )))
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_and_fds_cross_and_eof_is_none() {
        let (agent, helper) = pair().unwrap();
        let agent = AgentEnd::new(agent).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send(helper.as_raw_fd(), &FromChild::Pid(42), None).unwrap();
        send(helper.as_raw_fd(), &FromChild::Tty, Some(r.as_raw_fd())).unwrap();
        agent.send(&ToChild::Start).unwrap();
        let got: Option<(ToChild, _)> = recv(helper.as_raw_fd()).unwrap();
        assert_eq!(got.unwrap().0, ToChild::Start);
        drop(helper);
        let (m, fd) = agent.recv().await.unwrap().unwrap();
        assert_eq!(m, FromChild::Pid(42));
        assert!(fd.is_none());
        let (m, fd) = agent.recv().await.unwrap().unwrap();
        assert_eq!(m, FromChild::Tty);
        assert!(fd.is_some());
        assert!(agent.recv().await.unwrap().is_none());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let (a, _b) = pair().unwrap();
        let big = FromChild::Error("x".repeat(MAX_MESSAGE + 1));
        assert!(matches!(
            send(a.as_raw_fd(), &big, None),
            Err(ChannelError::TooLarge { .. })
        ));
    }

    #[test]
    fn large_messages_cross_in_a_sealed_memfd() {
        let (a, b) = pair().unwrap();
        // Far beyond a packet and the socket buffer: 4 MiB of environment.
        let env: Vec<String> = (0..4096)
            .map(|i| format!("V{i}={}", "x".repeat(1024)))
            .collect();
        send_large(a.as_raw_fd(), &env).unwrap();
        send(a.as_raw_fd(), &ToChild::Start, None).unwrap();
        let got: Vec<String> = recv_large(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(got, env);
        let next: Option<(ToChild, _)> = recv(b.as_raw_fd()).unwrap();
        assert_eq!(next.unwrap().0, ToChild::Start);
        drop(a);
        assert!(recv_large::<Vec<String>>(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn a_large_message_without_its_memfd_is_malformed() {
        let (a, b) = pair().unwrap();
        send(a.as_raw_fd(), &InMemfd { bytes: 10 }, None).unwrap();
        assert!(matches!(
            recv_large::<Vec<String>>(b.as_raw_fd()),
            Err(ChannelError::Malformed(_))
        ));
    }
}
