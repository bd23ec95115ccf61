//! An async QMP (QEMU Machine Protocol) client.
//!
//! [`Qmp::handshake`] takes any `AsyncRead + AsyncWrite` stream (QEMU's unix socket in
//! production, `tokio::io::duplex` in tests), reads the greeting and negotiates
//! capabilities. Commands are typed ([`Command`]) and carry an id; a reader task matches
//! replies to waiting callers by id and publishes asynchronous events on a broadcast
//! channel ([`Qmp::events`]), so events are never confused with replies. A writer task owns
//! the write half, so no lock is held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

mod types;

pub use types::{
    Command, CpuInfoFast, CpuInstanceProperties, Event, Greeting, HotpluggableCpu,
    MemoryDeviceData, MemoryDeviceInfo, QemuVersion, StatusInfo,
};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io(#[source] std::io::Error),
    /// The connection closed before the reply arrived.
    #[error("QMP connection closed")]
    Closed,
    /// The first line was not a QMP greeting.
    #[error("unexpected QMP greeting {line:?}")]
    Greeting {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// A reply did not have the expected shape.
    #[error("cannot decode QMP reply")]
    Decode(#[source] serde_json::Error),
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// QEMU did not answer within [`COMMAND_TIMEOUT`].
    #[error("QMP command {command} got no reply within {timeout:?}")]
    TimedOut {
        command: String,
        timeout: std::time::Duration,
    },
}

/// How long a command may wait for its reply: a wedged QEMU turns into an error instead of
/// a hung caller.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `execute` name of `command`, for error messages.
fn command_name(command: &Command) -> String {
    serde_json::to_value(command)
        .ok()
        .and_then(|v| v.get("execute").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

#[derive(Debug, Serialize)]
struct Request<'a> {
    #[serde(flatten)]
    command: &'a Command,
    id: u64,
}

#[derive(Debug, Deserialize)]
struct GreetingLine {
    #[serde(rename = "QMP")]
    qmp: GreetingInner,
}

#[derive(Debug, Deserialize)]
struct GreetingInner {
    version: GreetingVersion,
    capabilities: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Incoming {
    Return {
        #[serde(rename = "return")]
        value: Value,
        id: Option<u64>,
    },
    Error {
        error: ErrorBody,
        id: Option<u64>,
    },
    Event(Event),
}

type Reply = Result<Value, QmpError>;

#[derive(Debug, Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
}

/// A connected QMP session.
pub struct Qmp {
    greeting: Greeting,
    next_id: AtomicU64,
    pending: Arc<Mutex<Pending>>,
    writer: mpsc::UnboundedSender<Vec<u8>>,
    events: broadcast::Sender<Event>,
    reader: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("greeting", &self.greeting)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Reads the greeting from `stream`, starts the reader and writer tasks and leaves
    /// capabilities negotiation mode. Must run inside a tokio runtime.
    pub async fn handshake<S>(stream: S) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        let mut line = String::new();
        if read.read_line(&mut line).await.map_err(QmpError::Io)? == 0 {
            return Err(QmpError::Closed);
        }
        let greeting: GreetingLine =
            serde_json::from_str(&line).map_err(|source| QmpError::Greeting {
                line: line.trim_end().to_owned(),
                source,
            })?;
        let greeting = Greeting {
            version: greeting.qmp.version.qemu,
            package: greeting.qmp.version.package,
            capabilities: greeting.qmp.capabilities,
        };

        let pending = Arc::new(Mutex::new(Pending::default()));
        let (events, _) = broadcast::channel(64);
        let (writer, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, rx));
        let reader = tokio::spawn(read_loop(read, pending.clone(), events.clone()));
        let qmp = Qmp {
            greeting,
            next_id: AtomicU64::new(1),
            pending,
            writer,
            events,
            reader,
        };
        qmp.execute_unit(&Command::QmpCapabilities).await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Subscribes to QMP events received from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Sends `command` and decodes its `return` value as `R`.
    pub async fn execute<R: DeserializeOwned>(&self, command: &Command) -> Result<R, QmpError> {
        let value = self.execute_raw(command).await?;
        serde_json::from_value(value).map_err(QmpError::Decode)
    }

    /// Sends `command` and ignores its (empty) return value.
    pub async fn execute_unit(&self, command: &Command) -> Result<(), QmpError> {
        self.execute_raw(command).await.map(drop)
    }

    async fn execute_raw(&self, command: &Command) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&Request { command, id }).map_err(QmpError::Decode)?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.closed {
                return Err(QmpError::Closed);
            }
            pending.waiters.insert(id, tx);
        }
        tracing::debug!(?command, id, "QMP command");
        if self.writer.send(line).is_err() {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .waiters
                .remove(&id);
            return Err(QmpError::Closed);
        }
        let reply = match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(reply) => reply.unwrap_or(Err(QmpError::Closed)),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .waiters
                    .remove(&id);
                return Err(QmpError::TimedOut {
                    command: command_name(command),
                    timeout: COMMAND_TIMEOUT,
                });
            }
        };
        reply.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command_name(command),
                class,
                desc,
            },
            other => other,
        })
    }

    /// Asks QEMU to exit. A connection closed before the reply counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute_unit(&Command::Quit).await {
            Err(QmpError::Closed) => Ok(()),
            other => other,
        }
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute(&Command::QueryStatus).await
    }

    /// `query-hotpluggable-cpus`.
    pub async fn query_hotpluggable_cpus(&self) -> Result<Vec<HotpluggableCpu>, QmpError> {
        self.execute(&Command::QueryHotpluggableCpus).await
    }

    /// Host thread ids of the vCPUs (`query-cpus-fast`).
    pub async fn vcpu_thread_ids(&self) -> Result<Vec<u32>, QmpError> {
        let cpus: Vec<CpuInfoFast> = self.execute(&Command::QueryCpusFast).await?;
        Ok(cpus.into_iter().map(|c| c.thread_id).collect())
    }

    /// `query-memory-devices`.
    pub async fn query_memory_devices(&self) -> Result<Vec<MemoryDeviceInfo>, QmpError> {
        self.execute(&Command::QueryMemoryDevices).await
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn write_loop<W: AsyncWrite>(write: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    tokio::pin!(write);
    while let Some(line) = rx.recv().await {
        if let Err(error) = write.write_all(&line).await {
            tracing::debug!(%error, "QMP write failed");
            return;
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut read: BufReader<R>,
    pending: Arc<Mutex<Pending>>,
    events: broadcast::Sender<Event>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "QMP read failed");
                break;
            }
        }
        let (id, reply) = match serde_json::from_str::<Incoming>(&line) {
            Ok(Incoming::Return { value, id }) => (id, Ok(value)),
            Ok(Incoming::Error { error, id }) => (
                id,
                Err(QmpError::Command {
                    // Filled in by the caller, which knows what it sent.
                    command: String::new(),
                    class: error.class,
                    desc: error.desc,
                }),
            ),
            Ok(Incoming::Event(event)) => {
                tracing::debug!(event = %event.event, data = %event.data, "QMP event");
                let _ = events.send(event);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, line = line.trim_end(), "unexpected QMP message");
                continue;
            }
        };
        let waiter = id.and_then(|id| {
            pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .waiters
                .remove(&id)
        });
        match waiter {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::warn!(?id, "QMP reply without a waiting command"),
        }
    }
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    pending.closed = true;
    pending.waiters.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    /// The QEMU side of a fake QMP connection.
    struct FakeQemu {
        read: BufReader<ReadHalf<DuplexStream>>,
        write: WriteHalf<DuplexStream>,
    }

    impl FakeQemu {
        async fn recv(&mut self) -> Value {
            let mut line = String::new();
            self.read.read_line(&mut line).await.unwrap();
            serde_json::from_str(&line).unwrap()
        }

        async fn send(&mut self, value: Value) {
            let mut line = serde_json::to_vec(&value).unwrap();
            line.push(b'\n');
            self.write.write_all(&line).await.unwrap();
        }

        /// Answers `qmp_capabilities`.
        async fn negotiate(&mut self) {
            let cmd = self.recv().await;
            assert_eq!(cmd["execute"], "qmp_capabilities");
            self.send(json!({"return": {}, "id": cmd["id"]})).await;
        }
    }

    async fn connect() -> (Qmp, FakeQemu) {
        let (client, server) = tokio::io::duplex(4096);
        let (read, mut write) = tokio::io::split(server);
        write
            .write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let mut fake = FakeQemu {
            read: BufReader::new(read),
            write,
        };
        let (qmp, ()) = tokio::join!(Qmp::handshake(client), fake.negotiate());
        (qmp.unwrap(), fake)
    }

    #[test]
    fn commands_serialize_as_qmp() {
        let line = |c: &Command| serde_json::to_value(Request { command: c, id: 9 }).unwrap();
        assert_eq!(
            line(&Command::QmpCapabilities),
            json!({"execute": "qmp_capabilities", "id": 9})
        );
        assert_eq!(
            line(&Command::QueryHotpluggableCpus),
            json!({"execute": "query-hotpluggable-cpus", "id": 9})
        );
        assert_eq!(
            line(&Command::memfd_backend("mem1", 1 << 27, true)),
            json!({"execute": "object-add", "id": 9, "arguments":
                {"qom-type": "memory-backend-memfd", "id": "mem1", "size": 134217728u64, "share": true}})
        );
        assert_eq!(
            line(&Command::pc_dimm("dimm1", "mem1")),
            json!({"execute": "device_add", "id": 9, "arguments":
                {"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}})
        );
        let cpu: HotpluggableCpu = serde_json::from_value(json!({"type": "max-x86_64-cpu",
            "vcpus-count": 1, "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}}))
        .unwrap();
        assert_eq!(
            line(&Command::cpu("cpu1", &cpu)),
            json!({"execute": "device_add", "id": 9, "arguments": {"driver": "max-x86_64-cpu",
                "id": "cpu1", "socket-id": 1, "core-id": 0, "thread-id": 0}})
        );
    }

    #[tokio::test]
    async fn greeting_and_capabilities() {
        let (qmp, _fake) = connect().await;
        assert_eq!(
            qmp.greeting().version,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(qmp.greeting().capabilities, ["oob"]);
    }

    #[tokio::test]
    async fn bad_greeting_is_an_error() {
        let (client, mut server) = tokio::io::duplex(4096);
        server.write_all(b"hello\n").await.unwrap();
        let err = Qmp::handshake(client).await.unwrap_err();
        assert!(matches!(err, QmpError::Greeting { .. }), "{err}");
    }

    #[tokio::test]
    async fn reply_matched_by_id_with_event_interleaved() {
        let (qmp, mut fake) = connect().await;
        let mut events = qmp.events();
        let server = async {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "query-status");
            fake.send(json!({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}))
                .await;
            fake.send(json!({"return": {"running": true, "status": "running"}, "id": cmd["id"]}))
                .await;
        };
        let (status, ()) = tokio::join!(qmp.query_status(), server);
        assert_eq!(
            status.unwrap(),
            StatusInfo {
                running: true,
                status: "running".into()
            }
        );
        assert_eq!(events.recv().await.unwrap().event, "RESUME");
    }

    #[tokio::test]
    async fn replies_out_of_order() {
        let (qmp, mut fake) = connect().await;
        let server = async {
            let first = fake.recv().await;
            let second = fake.recv().await;
            fake.send(json!({"return": [], "id": second["id"]})).await;
            fake.send(json!({"return": {"running": false, "status": "paused"}, "id": first["id"]}))
                .await;
        };
        let (status, devices, ()) =
            tokio::join!(qmp.query_status(), qmp.query_memory_devices(), server);
        assert_eq!(status.unwrap().status, "paused");
        assert!(devices.unwrap().is_empty());
    }

    #[tokio::test]
    async fn error_reply_carries_class_and_desc() {
        let (qmp, mut fake) = connect().await;
        let server = async {
            let cmd = fake.recv().await;
            fake.send(
                json!({"error": {"class": "GenericError", "desc": "Duplicate ID 'dimm1'"},
                "id": cmd["id"]}),
            )
            .await;
        };
        let dimm = Command::pc_dimm("dimm1", "m");
        let (result, ()) = tokio::join!(qmp.execute_unit(&dimm), server);
        match result.unwrap_err() {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, "device_add");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Duplicate ID 'dimm1'");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_command_times_out_naming_it() {
        let (qmp, mut fake) = connect().await;
        let server = async {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "query-status");
            // Never answer; keep the connection open.
            fake
        };
        let (result, _fake) = tokio::join!(qmp.query_status(), server);
        match result.unwrap_err() {
            QmpError::TimedOut { command, timeout } => {
                assert_eq!(command, "query-status");
                assert_eq!(timeout, COMMAND_TIMEOUT);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn close_fails_pending_and_quit_tolerates_it() {
        let (qmp, mut fake) = connect().await;
        let server = async {
            let cmd = fake.recv().await;
            assert_eq!(cmd["execute"], "quit");
            drop(fake);
        };
        let (result, ()) = tokio::join!(qmp.quit(), server);
        result.unwrap();
        assert!(matches!(
            qmp.query_status().await.unwrap_err(),
            QmpError::Closed
        ));
    }
}
