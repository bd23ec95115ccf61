//! Task events to containerd, in the order they were emitted.
//!
//! The service emits into an unbounded channel (emitting never blocks an RPC or an exit
//! path); one forwarder task publishes them through containerd's `RemotePublisher`, one at a
//! time, so containerd sees them in emission order. Without a publisher (CRI-O starts shims
//! with an empty TTRPC_ADDRESS) events are dropped after a debug log line.
//!
//! Ordering guarantees (TaskStart before TaskExit, exec exits before the init's) come from
//! *when* the service emits; this module only preserves order.

use std::time::Duration;

use containerd_shim::event::Event;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Per-event publish timeout.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// One queued event.
pub struct Item {
    /// containerd's topic, e.g. `/tasks/exit`.
    pub topic: String,
    /// The event message (`containerd.events.*`).
    pub event: Box<dyn MessageDyn>,
}

/// What travels to the forwarder.
#[derive(Debug)]
pub enum Msg {
    Event(Item),
    /// Answered once every earlier event has been handled.
    Flush(oneshot::Sender<()>),
}

/// Where the service emits events. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item").field("topic", &self.topic).finish()
    }
}

impl EventSender {
    /// Queues `event` for publishing.
    pub fn send<E: Event + MessageDyn>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(%topic, "event");
        if self
            .tx
            .send(Msg::Event(Item {
                topic,
                event: Box::new(event),
            }))
            .is_err()
        {
            tracing::debug!("event forwarder is gone; dropping event");
        }
    }

    /// A sender whose events land in the returned receiver (tests, custom forwarders).
    pub fn channel() -> (EventSender, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSender { tx }, rx)
    }

    /// Waits until every event sent so far has been published (or dropped), at most
    /// `timeout`. Used before the shim exits.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).is_err() {
            return true;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }
}

/// Starts the forwarder; returns the sender and the task (which ends when every sender
/// is dropped and the queue is drained).
pub fn start(
    publisher: Option<RemotePublisher>,
    namespace: String,
) -> (EventSender, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let item = match msg {
                Msg::Event(item) => item,
                Msg::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            let Some(publisher) = &publisher else {
                tracing::debug!(topic = %item.topic, "no event publisher; event dropped");
                continue;
            };
            let ctx = containerd_shim::Context {
                timeout_nano: i64::try_from(PUBLISH_TIMEOUT.as_nanos()).unwrap_or(i64::MAX),
                ..Default::default()
            };
            if let Err(error) = publisher
                .publish(ctx, &item.topic, &namespace, item.event)
                .await
            {
                tracing::error!(topic = %item.topic, %error, "publishing event failed");
            }
        }
    });
    (EventSender { tx }, task)
}
