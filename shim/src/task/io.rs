//! Stdio proxy between containerd's fifos and a guest process.
//!
//! Every stream a process has travels on its own vsock connection to
//! [`kata_proto::STDIO_VSOCK_PORT`]: the shim writes `"<container_id> <exec_id|-> <stream>\n"`
//! and waits for `OK` (or `ERR <reason>`), then copies raw bytes. A terminal process has
//! one `tty` stream carrying stdin one way and the pty output the other.
//!
//! Output fifos are opened read-write so that the open never blocks and a restarted reader
//! (containerd) never turns our writes into EPIPE. The stdin fifo is opened read-only on the
//! blocking pool, because that open waits for a writer; end of file there half-closes the
//! connection, which the agent turns into end of file on the process's stdin.
//!
//! [`Outputs::wait`] returns once every output byte has been written to its
//! fifo, so that an exit is reported only after the output.
//!
//! A remote VM's stdout and stderr streams run through the peer pods adaptor, which may
//! restart: with a [`Reattach`], an output connection that ends is dialed again with the
//! same header, and the agent hands over the stream it kept (or answers `ERR` when the
//! stream is complete).

use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long the agent may take to answer a stream header.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted from the agent.
const MAX_REPLY: usize = 512;

/// Errors attaching stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A stdio URI uses a scheme we do not support.
    #[error("unsupported stdio URI scheme {scheme:?} in {uri:?} (only fifo paths and file://)")]
    UnsupportedScheme { scheme: String, uri: String },
    /// A stdio path is not absolute.
    #[error("stdio path {0:?} is not absolute")]
    RelativePath(String),
    /// An output target could not be opened.
    #[error("cannot open {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The vsock connection to the stdio port failed.
    #[error("cannot connect to the guest stdio port")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Writing the header or reading the reply failed.
    #[error("stdio handshake for {stream} failed")]
    Handshake {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
    /// The agent refused the stream.
    #[error("agent refused the {stream} stream: {reason}")]
    Refused {
        stream: &'static str,
        reason: String,
    },
    /// The agent answered something else than `OK` or `ERR`.
    #[error("unexpected stdio reply for {stream}: {reply:?}")]
    Protocol { stream: &'static str, reply: String },
}

/// One stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// The pty: stdin in, output out.
    Tty,
}

impl StreamKind {
    /// The name used in the header line.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Tty => "tty",
        }
    }
}

/// The header line that binds a connection to a stream (`exec_id` `None` = init).
pub fn header(container_id: &str, exec_id: Option<&str>, kind: StreamKind) -> String {
    format!(
        "{container_id} {} {}\n",
        exec_id.filter(|e| !e.is_empty()).unwrap_or("-"),
        kind.as_str()
    )
}

/// Interprets the agent's reply line (without the newline).
pub fn parse_reply(stream: StreamKind, line: &str) -> Result<(), IoError> {
    let line = line.trim_end_matches('\r');
    if line == "OK" {
        return Ok(());
    }
    if let Some(reason) = line.strip_prefix("ERR") {
        return Err(IoError::Refused {
            stream: stream.as_str(),
            reason: reason.trim().to_owned(),
        });
    }
    Err(IoError::Protocol {
        stream: stream.as_str(),
        reply: line.to_owned(),
    })
}

/// Writes the header and reads the reply byte by byte, so that no stream byte after the
/// reply is consumed.
pub async fn handshake<S>(stream: &mut S, header: &str, kind: StreamKind) -> Result<(), IoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io_err = |source| IoError::Handshake {
        stream: kind.as_str(),
        source,
    };
    let exchange = async {
        stream.write_all(header.as_bytes()).await?;
        stream.flush().await?;
        let mut line = Vec::new();
        loop {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                break;
            }
            if line.len() >= MAX_REPLY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
            }
            line.push(b);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    };
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| io_err(io::ErrorKind::TimedOut.into()))?
        .map_err(io_err)?;
    parse_reply(kind, &line)
}

/// Where one of containerd's stdio fields points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Empty string: the process has no such stream.
    None,
    /// A fifo (or any path) containerd reads from / writes to.
    Fifo(PathBuf),
    /// `file://` URI: output appended to a regular file.
    File(PathBuf),
}

impl Target {
    /// Parses a stdio field of CreateTaskRequest / ExecProcessRequest.
    pub fn parse(s: &str) -> Result<Target, IoError> {
        if s.is_empty() {
            return Ok(Target::None);
        }
        let (scheme, path) = match s.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("fifo", s),
        };
        let target = match scheme {
            "fifo" => Target::Fifo(PathBuf::from(path)),
            "file" => Target::File(PathBuf::from(path)),
            other => {
                return Err(IoError::UnsupportedScheme {
                    scheme: other.to_owned(),
                    uri: s.to_owned(),
                })
            }
        };
        match &target {
            Target::Fifo(p) | Target::File(p) if !p.is_absolute() => {
                Err(IoError::RelativePath(s.to_owned()))
            }
            _ => Ok(target),
        }
    }

    fn is_some(&self) -> bool {
        !matches!(self, Target::None)
    }
}

/// A process's stdio as containerd gave it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    stdin_t: Target,
    stdout_t: Target,
    stderr_t: Target,
}

impl StdioSpec {
    /// Validates containerd's fields. `file://` is accepted for output only.
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Result<Self, IoError> {
        let stdin_t = Target::parse(stdin)?;
        if let Target::File(_) = stdin_t {
            return Err(IoError::UnsupportedScheme {
                scheme: "file".into(),
                uri: stdin.to_owned(),
            });
        }
        Ok(StdioSpec {
            stdin: stdin.to_owned(),
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
            terminal,
            stdin_t,
            stdout_t: Target::parse(stdout)?,
            stderr_t: Target::parse(stderr)?,
        })
    }

    /// Which streams the agent should expect.
    pub fn agent_stdio(&self) -> Stdio {
        Stdio {
            stdin: self.stdin_t.is_some(),
            stdout: self.stdout_t.is_some(),
            stderr: !self.terminal && self.stderr_t.is_some(),
            terminal: self.terminal,
            ..Default::default()
        }
    }

    /// Whether the process has any stream to attach.
    pub fn is_empty(&self) -> bool {
        !self.stdin_t.is_some() && !self.stdout_t.is_some() && !self.stderr_t.is_some()
    }
}

/// The copy tasks of one process.
#[derive(Debug, Default)]
pub struct ProcessIo {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<StdinCtl>,
}

#[derive(Debug)]
struct StdinCtl {
    path: PathBuf,
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Opens one fresh connection to the guest stdio port, for a later re-attach.
pub type Connector<S> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<S, IoError>> + Send>> + Send + Sync>;

/// How an output stream whose connection ended is attached again (remote VMs: the adaptor
/// relaying it may restart; the agent keeps a broken stream, with its undelivered output,
/// for the next connection with the same header).
pub struct Reattach<S> {
    pub connect: Connector<S>,
    /// How long after the end a new connection may take.
    pub bound: Duration,
    /// False once the sandbox ended: nothing to attach to any more.
    pub live: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl<S> Clone for Reattach<S> {
    fn clone(&self) -> Self {
        Self {
            connect: self.connect.clone(),
            bound: self.bound,
            live: self.live.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Reattach<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reattach")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reattach<S> {
    /// A new connection bound to the stream `header` names; `None` when the agent says
    /// the stream is complete (or gone), the sandbox ended, or the bound passed.
    async fn open(&self, header: &str, kind: StreamKind) -> Option<S> {
        let deadline = tokio::time::Instant::now() + self.bound;
        let mut pause = Duration::from_millis(100);
        loop {
            if !(self.live)() {
                return None;
            }
            let attempt = async {
                let mut conn = (self.connect)().await?;
                handshake(&mut conn, header, kind).await?;
                Ok::<S, IoError>(conn)
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(conn)) => return Some(conn),
                // The agent has no such stream: it ended (the usual case) or went away.
                Ok(Err(IoError::Refused { .. })) => return None,
                Ok(Err(error)) => {
                    tracing::debug!(error = %crate::report::chain(&error), stream = header.trim_end(), "stdio re-attach attempt failed");
                }
                Err(_) => break,
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        tracing::warn!(stream = header.trim_end(), bound = ?self.bound, "stdio stream not attached again within the bound; its output ends here");
        None
    }
}

/// Connects every stream of `spec` for process `(container_id, exec_id)` and starts the
/// copies. `connect` opens one fresh connection to the guest stdio port. With `reattach`,
/// a stdout or stderr stream (not a tty) whose connection ends is attached again.
pub async fn attach<C, F, S>(
    connect: C,
    container_id: &str,
    exec_id: Option<&str>,
    spec: &StdioSpec,
    reattach: Option<Reattach<S>>,
) -> Result<ProcessIo, IoError>
where
    C: Fn() -> F,
    F: Future<Output = Result<S, IoError>>,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut io = ProcessIo::default();
    let connect = &connect;
    let open = |kind| async move {
        let mut conn = connect().await?;
        handshake(&mut conn, &header(container_id, exec_id, kind), kind).await?;
        Ok::<S, IoError>(conn)
    };
    if spec.terminal {
        if !spec.stdout_t.is_some() && !spec.stdin_t.is_some() {
            return Ok(io);
        }
        let out = open_output(&spec.stdout_t).await?;
        let conn = open(StreamKind::Tty).await?;
        let (reader, writer) = tokio::io::split(conn);
        match &spec.stdin_t {
            Target::Fifo(path) => {
                io.stdin = Some(spawn_stdin(path.clone(), writer));
                io.outputs.push(spawn_output(reader, out, None::<S>));
            }
            _ => io.outputs.push(spawn_output(reader, out, Some(writer))),
        }
        return Ok(io);
    }
    // Open every target before connecting, so a bad path fails before the agent binds.
    let stdout = open_output(&spec.stdout_t).await?;
    let stderr = open_output(&spec.stderr_t).await?;
    if let Target::Fifo(path) = &spec.stdin_t {
        let conn = open(StreamKind::Stdin).await?;
        io.stdin = Some(spawn_stdin(path.clone(), conn));
    }
    for (target, writer, kind) in [
        (&spec.stdout_t, stdout, StreamKind::Stdout),
        (&spec.stderr_t, stderr, StreamKind::Stderr),
    ] {
        if target.is_some() {
            let conn = open(kind).await?;
            io.outputs.push(match &reattach {
                Some(again) => spawn_output_again(
                    conn,
                    writer,
                    again.clone(),
                    header(container_id, exec_id, kind),
                    kind,
                ),
                None => spawn_output(conn, writer, None::<S>),
            });
        }
    }
    Ok(io)
}

/// An output sink: a fifo (opened read-write), a file, or nothing.
type Sink = Option<Box<dyn AsyncWrite + Send + Unpin>>;

async fn open_output(target: &Target) -> Result<Sink, IoError> {
    let open_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IoError::Open { path, source }
    };
    match target {
        Target::None => Ok(None),
        Target::Fifo(path) => {
            let meta = tokio::fs::metadata(path).await.map_err(open_err(path))?;
            if std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
                let sender = tokio::net::unix::pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(path)
                    .map_err(open_err(path))?;
                Ok(Some(Box::new(sender)))
            } else {
                let file = tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .await
                    .map_err(open_err(path))?;
                Ok(Some(Box::new(file)))
            }
        }
        Target::File(path) => {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .await
                .map_err(open_err(path))?;
            Ok(Some(Box::new(file)))
        }
    }
}

/// Copies `reader` to `sink` until end of file; `keep` is held until then (the unused
/// write half of a tty connection).
fn spawn_output<R, K>(mut reader: R, sink: Sink, keep: Option<K>) -> JoinHandle<()>
where
    R: AsyncRead + Send + Unpin + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        let _keep = keep;
        let result = match sink {
            Some(mut sink) => {
                let r = tokio::io::copy(&mut reader, &mut sink).await;
                let _ = sink.flush().await;
                r
            }
            None => tokio::io::copy(&mut reader, &mut tokio::io::sink()).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "stdio output copy ended");
        }
    })
}

/// Copies `conn` to `sink` until end of file, then attaches the stream again (see
/// [`Reattach`]) and goes on, until the agent says the stream is complete.
fn spawn_output_again<S>(
    mut conn: S,
    mut sink: Sink,
    again: Reattach<S>,
    header: String,
    kind: StreamKind,
) -> JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        loop {
            let result = match sink.as_mut() {
                Some(sink) => {
                    let r = tokio::io::copy(&mut conn, sink).await;
                    let _ = sink.flush().await;
                    r
                }
                None => tokio::io::copy(&mut conn, &mut tokio::io::sink()).await,
            };
            if let Err(error) = result {
                tracing::debug!(%error, "stdio output connection ended");
            }
            match again.open(&header, kind).await {
                Some(next) => {
                    tracing::info!(stream = header.trim_end(), "stdio stream attached again");
                    conn = next;
                }
                None => return,
            }
        }
    })
}

fn spawn_stdin<W>(path: PathBuf, mut conn: W) -> StdinCtl
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    let fifo = path.clone();
    let reopen = path.clone();
    let task = tokio::spawn(async move {
        let open =
            tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().read(true).open(&fifo));
        let file = tokio::select! {
            r = open => r,
            _ = &mut close_rx => {
                let _ = conn.shutdown().await;
                return;
            }
        };
        let file = match file {
            Ok(Ok(f)) => f,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot open stdin");
                let _ = conn.shutdown().await;
                return;
            }
            Err(_) => return,
        };
        let mut reader: Box<dyn AsyncRead + Send + Unpin> =
            match tokio::net::unix::pipe::Receiver::from_file(file) {
                Ok(r) => Box::new(r),
                // A regular file: read it with the blocking-pool backed file type.
                Err(_) => match tokio::fs::File::open(&reopen).await {
                    Ok(f) => Box::new(f),
                    Err(_) => return,
                },
            };
        tokio::select! {
            r = tokio::io::copy(&mut reader, &mut conn) => {
                if let Err(error) = r {
                    tracing::debug!(%error, "stdin copy ended");
                }
            }
            _ = &mut close_rx => {}
        }
        // End of stdin for the process.
        let _ = conn.shutdown().await;
    });
    StdinCtl {
        path,
        close: Some(close_tx),
        task,
    }
}

/// The output copy tasks of a process, taken out of its [`ProcessIo`].
#[derive(Debug, Default)]
pub struct Outputs(Vec<JoinHandle<()>>);

impl Outputs {
    /// Waits until every output stream has been copied to the end, at most `timeout`.
    /// Returns false on timeout (the copies go on in the background).
    pub async fn wait(self, timeout: Duration) -> bool {
        let all = async {
            for h in self.0 {
                let _ = h.await;
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }
}

impl ProcessIo {
    /// Hands out the output copies, to be awaited without holding any lock.
    pub fn take_outputs(&mut self) -> Outputs {
        Outputs(std::mem::take(&mut self.outputs))
    }

    /// Whether a stdin stream is attached.
    pub fn has_stdin(&self) -> bool {
        self.stdin.is_some()
    }

    /// Ends the process's stdin: stops reading the fifo and half-closes the connection.
    pub fn close_stdin(&mut self) {
        let Some(ctl) = self.stdin.as_mut() else {
            return;
        };
        if let Some(tx) = ctl.close.take() {
            let _ = tx.send(());
        }
        // If the fifo open is still waiting for a writer, become that writer for a moment
        // so the blocking open returns.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&ctl.path);
    }

    /// Stops every copy now.
    pub fn abort(&mut self) {
        self.close_stdin();
        if let Some(ctl) = self.stdin.take() {
            ctl.task.abort();
        }
        for h in self.outputs.drain(..) {
            h.abort();
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_process_and_stream() {
        assert_eq!(header("c1", None, StreamKind::Stdout), "c1 - stdout\n");
        assert_eq!(header("c1", Some(""), StreamKind::Tty), "c1 - tty\n");
        assert_eq!(header("c1", Some("e1"), StreamKind::Stdin), "c1 e1 stdin\n");
    }

    #[test]
    fn replies_are_ok_err_or_protocol_errors() {
        assert!(parse_reply(StreamKind::Stdout, "OK").is_ok());
        assert!(parse_reply(StreamKind::Stdout, "OK\r").is_ok());
        let e = parse_reply(StreamKind::Stderr, "ERR no such process").unwrap_err();
        assert!(matches!(e, IoError::Refused { ref reason, .. } if reason == "no such process"));
        assert!(matches!(
            parse_reply(StreamKind::Stdin, "HELLO"),
            Err(IoError::Protocol { .. })
        ));
    }

    #[test]
    fn targets_parse_paths_and_uris() {
        assert_eq!(Target::parse("").unwrap(), Target::None);
        assert_eq!(
            Target::parse("/run/f/stdout").unwrap(),
            Target::Fifo("/run/f/stdout".into())
        );
        assert_eq!(
            Target::parse("fifo:///run/f").unwrap(),
            Target::Fifo("/run/f".into())
        );
        assert_eq!(
            Target::parse("file:///var/log/x").unwrap(),
            Target::File("/var/log/x".into())
        );
        let e = Target::parse("binary:///usr/bin/logger?x=1").unwrap_err();
        assert!(e.to_string().contains("binary"), "{e}");
        assert!(Target::parse("relative/path").is_err());
        assert!(StdioSpec::new("file:///x", "", "", false).is_err());
    }

    #[test]
    fn agent_stdio_follows_terminal() {
        let s = StdioSpec::new("/i", "/o", "", true).unwrap();
        let a = s.agent_stdio();
        assert!(a.stdin && a.stdout && !a.stderr && a.terminal);
        let s = StdioSpec::new("", "/o", "/e", false).unwrap();
        let a = s.agent_stdio();
        assert!(!a.stdin && a.stdout && a.stderr && !a.terminal);
        assert!(StdioSpec::new("", "", "", false).unwrap().is_empty());
    }

    #[tokio::test]
    async fn handshake_reads_only_the_reply_line() {
        let (mut ours, mut agent) = tokio::io::duplex(256);
        let fake = tokio::spawn(async move {
            let mut buf = vec![0u8; 64];
            let n = agent.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"c1 e1 stdout\n");
            agent.write_all(b"OK\nhello").await.unwrap();
            agent
        });
        handshake(
            &mut ours,
            &header("c1", Some("e1"), StreamKind::Stdout),
            StreamKind::Stdout,
        )
        .await
        .unwrap();
        let mut rest = [0u8; 5];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
        drop(fake.await.unwrap());
    }

    #[tokio::test]
    async fn output_reaches_the_fifo_before_wait_outputs_returns() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let spec = StdioSpec::new("", fifo.to_str().unwrap(), "", false).unwrap();
        let (ours, agent) = tokio::io::duplex(64);
        let slot = std::sync::Mutex::new(Some(ours));
        let connect = || {
            let conn = slot.lock().unwrap().take();
            async move { conn.ok_or_else(|| IoError::Connect("only one stream".into())) }
        };
        let agent_side = tokio::spawn(async move {
            let mut agent = agent;
            let mut line = Vec::new();
            loop {
                let b = agent.read_u8().await.unwrap();
                if b == b'\n' {
                    break;
                }
                line.push(b);
            }
            assert_eq!(line, b"c1 - stdout");
            agent.write_all(b"OK\n").await.unwrap();
            agent.write_all(b"output line\n").await.unwrap();
            // Dropping closes the stream: end of output.
        });
        // The reader containerd would have.
        let reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .unwrap();
        let mut io = attach(
            connect,
            "c1",
            None,
            &spec,
            None::<Reattach<tokio::io::DuplexStream>>,
        )
        .await
        .unwrap();
        agent_side.await.unwrap();
        assert!(io.take_outputs().wait(Duration::from_secs(5)).await);
        let mut buf = vec![0u8; 12];
        let mut reader = reader;
        reader.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"output line\n");
    }

    /// The agent side of one stdio connection: reads the header, answers `reply`, then
    /// writes `output` and closes.
    async fn fake_agent(mut agent: tokio::io::DuplexStream, reply: &str, output: &[u8]) -> String {
        let mut line = Vec::new();
        loop {
            let b = agent.read_u8().await.unwrap();
            if b == b'\n' {
                break;
            }
            line.push(b);
        }
        agent.write_all(reply.as_bytes()).await.unwrap();
        agent.write_all(output).await.unwrap();
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn an_ended_output_connection_is_attached_again_until_the_agent_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdout");
        std::fs::write(&out, b"").unwrap();
        let spec = StdioSpec::new("", out.to_str().unwrap(), "", false).unwrap();
        let (first, first_agent) = tokio::io::duplex(64);
        let slot = std::sync::Mutex::new(Some(first));
        let connect = || {
            let conn = slot.lock().unwrap().take();
            async move { conn.ok_or_else(|| IoError::Connect("only one stream".into())) }
        };
        // Later connections: the first fails (the adaptor still down), the second gets
        // the stream back, the third is refused (the stream is complete).
        let (second, second_agent) = tokio::io::duplex(64);
        let (third, third_agent) = tokio::io::duplex(64);
        let later = Arc::new(std::sync::Mutex::new(vec![Some(third), Some(second), None]));
        let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reattach = Reattach {
            connect: {
                let later = later.clone();
                let dials = dials.clone();
                Arc::new(move || {
                    dials.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let conn = later.lock().unwrap().pop().flatten();
                    Box::pin(
                        async move { conn.ok_or_else(|| IoError::Connect("adaptor down".into())) },
                    ) as Pin<Box<dyn Future<Output = _> + Send>>
                })
            },
            bound: Duration::from_secs(30),
            live: Arc::new(|| true),
        };
        let agent = tokio::spawn(async move {
            let h1 = fake_agent(first_agent, "OK\n", b"one\n").await;
            let h2 = fake_agent(second_agent, "OK\n", b"two\n").await;
            let h3 = fake_agent(third_agent, "ERR no such process stream\n", b"").await;
            (h1, h2, h3)
        });
        let mut io = attach(connect, "c1", None, &spec, Some(reattach))
            .await
            .unwrap();
        let (h1, h2, h3) = agent.await.unwrap();
        assert!(io.take_outputs().wait(Duration::from_secs(10)).await);
        assert_eq!(
            (h1.as_str(), h2.as_str(), h3.as_str()),
            ("c1 - stdout", "c1 - stdout", "c1 - stdout")
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\ntwo\n");
        assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn no_reattach_once_the_sandbox_ended() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("stdout");
        std::fs::write(&out, b"").unwrap();
        let spec = StdioSpec::new("", out.to_str().unwrap(), "", false).unwrap();
        let (first, first_agent) = tokio::io::duplex(64);
        let slot = std::sync::Mutex::new(Some(first));
        let connect = || {
            let conn = slot.lock().unwrap().take();
            async move { conn.ok_or_else(|| IoError::Connect("only one stream".into())) }
        };
        let reattach = Reattach::<tokio::io::DuplexStream> {
            connect: Arc::new(|| {
                Box::pin(async { Err(IoError::Connect("must not dial".into())) })
                    as Pin<Box<dyn Future<Output = _> + Send>>
            }),
            bound: Duration::from_secs(3600),
            live: Arc::new(|| false),
        };
        let agent = tokio::spawn(fake_agent(first_agent, "OK\n", b"only\n"));
        let mut io = attach(connect, "c1", None, &spec, Some(reattach))
            .await
            .unwrap();
        agent.await.unwrap();
        assert!(io.take_outputs().wait(Duration::from_secs(10)).await);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "only\n");
    }
}
