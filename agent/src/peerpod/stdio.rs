//! Stdio connections in network mode, which survive an adaptor restart.
//!
//! The header, binding and byte streams are those of [`crate::stdio`]. What differs: the
//! connection runs through the adaptor, which may restart while a process runs; the shim
//! then redials and attaches the same stream again. So a connection that *breaks* (its
//! peer vanished without a TLS close, or an error) does not end the stream: the stream is
//! put back with whatever output was read but not delivered, and the next connection with
//! the same header takes it over (sending that output first). A connection whose peer
//! closed cleanly, or a process side that ended, ends the stream as over vsock. A new
//! connection that finds the stream still attached (the old peer's death not noticed yet)
//! waits a moment for it to be put back.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::stdio::{parse_header, read_header, Pending, Pty, Registry, StreamKind};

/// How long a new connection waits for a stream still attached to a broken connection.
const ATTACH_WAIT: Duration = Duration::from_secs(10);
/// Bytes moved per read.
const CHUNK: usize = 32 * 1024;

/// How a copy ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The stream is complete (process side at its end, or the peer closed cleanly).
    Done,
    /// The connection broke; the stream waits for a re-attach.
    Broken,
}

/// One event of the output loop.
enum Event {
    Output(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Flushed(std::io::Result<()>),
    Input(std::io::Result<usize>),
}

/// Copies process output to the connection (sending `unsent` first) and, for a tty,
/// connection input to `input`. Returns with `unsent` holding what was read from the
/// process but not written to the connection.
async fn pump<C, R, W>(
    conn: C,
    output: &mut R,
    mut input: Option<&mut W>,
    unsent: &mut Vec<u8>,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(conn);
    let mut chunk = vec![0u8; CHUNK];
    let mut inbuf = vec![0u8; CHUNK];
    // The peer's write side: open, closed cleanly (TLS close_notify), or broken.
    let mut peer_open = true;
    let mut need_flush = false;
    loop {
        let watching = peer_open;
        let conn_read = async {
            if watching {
                cr.read(&mut inbuf).await
            } else {
                std::future::pending().await
            }
        };
        let event = if !unsent.is_empty() {
            tokio::select! {
                r = cw.write(unsent) => Event::Wrote(r),
                r = conn_read => Event::Input(r),
            }
        } else if need_flush {
            tokio::select! {
                r = cw.flush() => Event::Flushed(r),
                r = conn_read => Event::Input(r),
            }
        } else {
            tokio::select! {
                r = output.read(&mut chunk) => Event::Output(r),
                r = conn_read => Event::Input(r),
            }
        };
        match event {
            Event::Output(Ok(0)) | Event::Output(Err(_)) => {
                let _ = cw.shutdown().await;
                return Ended::Done;
            }
            Event::Output(Ok(n)) => unsent.extend_from_slice(&chunk[..n]),
            Event::Wrote(Ok(n)) if n > 0 => {
                unsent.drain(..n);
                need_flush = true;
            }
            Event::Flushed(Ok(())) => need_flush = false,
            Event::Wrote(_) | Event::Flushed(Err(_)) => {
                // A peer that closed cleanly went away on purpose.
                return if peer_open {
                    Ended::Broken
                } else {
                    Ended::Done
                };
            }
            Event::Input(Ok(0)) => peer_open = false,
            Event::Input(Ok(n)) => {
                if let Some(w) = input.as_mut() {
                    if w.write_all(&inbuf[..n]).await.is_err() {
                        input = None;
                    }
                }
            }
            Event::Input(Err(_)) => return Ended::Broken,
        }
    }
}

/// Copies connection input to a stdin pipe: a clean end of input closes the pipe, a
/// broken connection keeps it for a re-attach.
async fn pump_input<C: AsyncRead + Unpin>(mut conn: C, pipe: &mut pipe::Sender) -> Ended {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => return Ended::Done,
            Ok(n) => {
                // The process closed its stdin: nothing more can be delivered.
                if pipe.write_all(&buf[..n]).await.is_err() {
                    return Ended::Done;
                }
            }
            Err(_) => return Ended::Broken,
        }
    }
}

/// Handles one network-mode stdio connection (see the module docs).
pub async fn handle<S>(mut conn: S, registry: Registry)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = match read_header(&mut conn).await.map(|l| parse_header(&l)) {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "stdio header");
            return;
        }
    };
    let Some(pending) = registry.take_waiting(&key, ATTACH_WAIT).await else {
        let _ = conn
            .write_all(b"ERR no such process stream (or already attached)\n")
            .await;
        return;
    };
    let Pending {
        fd,
        mut done,
        mut unsent,
        reattach,
    } = pending;
    if reattach {
        tracing::info!(stream = ?key, unsent = unsent.len(), "stdio stream attached again");
    }
    if conn.write_all(b"OK\n").await.is_err() {
        registry.put_back(
            key,
            Pending {
                fd,
                done,
                unsent,
                reattach,
            },
        );
        return;
    }
    let (ended, fd) = match key.kind {
        StreamKind::Stdout | StreamKind::Stderr => match pipe::Receiver::from_owned_fd(fd) {
            Ok(mut r) => {
                let ended = pump::<_, _, pipe::Sender>(conn, &mut r, None, &mut unsent).await;
                (ended, r.into_nonblocking_fd())
            }
            Err(e) => (Ended::Done, Err(e)),
        },
        StreamKind::Stdin => match pipe::Sender::from_owned_fd(fd) {
            Ok(mut w) => {
                let ended = pump_input(conn, &mut w).await;
                (ended, w.into_nonblocking_fd())
            }
            Err(e) => (Ended::Done, Err(e)),
        },
        StreamKind::Tty => match Pty::new(fd) {
            Ok(pty) => {
                let (mut r, mut w) = tokio::io::split(pty);
                let ended = pump(conn, &mut r, Some(&mut w), &mut unsent).await;
                (ended, Ok(r.unsplit(w).into_fd()))
            }
            Err(e) => (Ended::Done, Err(e)),
        },
    };
    match (ended, fd) {
        (Ended::Broken, Ok(fd)) => {
            tracing::info!(stream = ?key, unsent = unsent.len(), "stdio connection broke; the stream waits for a re-attach");
            registry.put_back(
                key,
                Pending {
                    fd,
                    done: done.take(),
                    unsent,
                    reattach: true,
                },
            );
        }
        (_, fd) => {
            if let Err(e) = fd {
                tracing::debug!(stream = ?key, error = %e, "stdio stream ended");
            }
            registry.release(&key);
            if let Some(tx) = done.take() {
                let _ = tx.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stdio::StreamKey;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn key(kind: StreamKind) -> StreamKey {
        StreamKey {
            container_id: "c".into(),
            exec_id: String::new(),
            kind,
        }
    }

    /// A connection through an adaptor that dies: its clean end of stream becomes an error
    /// (a TLS peer gone without close_notify).
    struct DiesUncleanly(tokio::io::DuplexStream);

    impl AsyncRead for DiesUncleanly {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()))
                }
                other => other,
            }
        }
    }

    impl AsyncWrite for DiesUncleanly {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A connection that takes the header and answers nothing more: reads never complete
    /// and every write after the header's answer fails.
    struct WritesFail(Vec<u8>);

    impl AsyncRead for WritesFail {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.0.is_empty() {
                Poll::Pending
            } else {
                let b = self.0.remove(0);
                buf.put_slice(&[b]);
                Poll::Ready(Ok(()))
            }
        }
    }

    impl AsyncWrite for WritesFail {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(if buf == b"OK\n" {
                Ok(buf.len())
            } else {
                Err(std::io::ErrorKind::BrokenPipe.into())
            })
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn attach(
        reg: &Registry,
        header: &[u8],
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(handle(DiesUncleanly(server), reg.clone()));
        client.write_all(header).await.unwrap();
        (client, task)
    }

    /// Output written while the adaptor is gone arrives on the next connection with the
    /// same header, and that connection may come before the old one noticed anything; the
    /// stream ends only at the process's EOF.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_survives_an_adaptor_restart() {
        let reg = Registry::default();
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut done = reg.register(key(StreamKind::Stdout), r);
        nix::unistd::write(&w, b"before ").unwrap();
        let (mut old, old_task) = attach(&reg, b"c - stdout\n").await;
        let mut first = vec![0u8; 10];
        old.read_exact(&mut first).await.unwrap();
        assert_eq!(first, b"OK\nbefore ");

        // The new connection arrives while the old one is still attached...
        let (mut new, _new_task) = attach(&reg, b"c - stdout\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...and gets the stream once the old one breaks.
        drop(old);
        old_task.await.unwrap();
        assert!(
            done.try_recv().is_err(),
            "the stream ended with the broken connection"
        );
        nix::unistd::write(&w, b"after").unwrap();
        drop(w);
        let mut got = Vec::new();
        new.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"OK\nafter");
        done.await.unwrap();
    }

    /// Output read from the process but not delivered is sent first on re-attach.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undelivered_output_is_sent_first_on_reattach() {
        let reg = Registry::default();
        let (r, w) = nix::unistd::pipe().unwrap();
        let done = reg.register(key(StreamKind::Stderr), r);
        nix::unistd::write(&w, b"kept").unwrap();
        handle(WritesFail(b"c - stderr\n".to_vec()), reg.clone()).await;
        drop(w);
        let (mut client, _task) = attach(&reg, b"c - stderr\n").await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"OK\nkept");
        done.await.unwrap();
    }

    /// A broken stdin connection keeps the pipe open for the next one; a clean end of input
    /// closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_closes_only_on_a_clean_end() {
        let reg = Registry::default();
        let (r, w) = nix::unistd::pipe().unwrap();
        reg.register(key(StreamKind::Stdin), w);
        let (mut old, old_task) = attach(&reg, b"c - stdin\n").await;
        let mut ok = [0u8; 3];
        old.read_exact(&mut ok).await.unwrap();
        old.write_all(b"one ").await.unwrap();
        drop(old);
        old_task.await.unwrap();
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(handle(server, reg.clone()));
        client.write_all(b"c - stdin\n").await.unwrap();
        client.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"OK\n");
        client.write_all(b"two").await.unwrap();
        client.shutdown().await.unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::from(r);
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut v).unwrap();
            v
        })
        .await
        .unwrap();
        assert_eq!(got, b"one two");
    }

    /// A stream nobody holds is refused at once.
    #[tokio::test]
    async fn an_unknown_stream_is_refused() {
        let reg = Registry::default();
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(handle(server, reg.clone()));
        client.write_all(b"c - stdout\n").await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("ERR "), "{got}");
    }
}
