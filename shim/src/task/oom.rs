//! OOM kills: every kill the guest counts in a container's cgroup (memory.events
//! `oom_kill`: the init, an exec, or any child of theirs) becomes one TaskOOM for containerd
//! (whose CRI then reports the container's reason as `OOMKilled`) and the bundle's `oom`
//! file for CRI-O.
//!
//! Two paths learn about kills, and a container's [`OomLedger`] makes them one:
//! - the sandbox's OOM watcher ([`watch`]): a long poll (`GetOOMEvents`) the agent answers
//!   as soon as a container's count grows, whether or not a process exits;
//! - a process's waiter ([`crate::task::exits`]): `WaitProcess` carries the count at the
//!   exit, and the waiter reports what the watcher has not before it records the exit.
//!
//! The ledger remembers how many kills were published and publishes only beyond that, so
//! nothing is published twice; it is closed right before the init's exit is recorded, so
//! no TaskOOM ever follows the container's TaskExit.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::protos::events::task::TaskOOM;

use crate::sandbox::agent::AgentError;
use crate::sandbox::Sandbox;
use crate::task::container::Container;
use crate::task::events::EventSender;

/// The most TaskOOM events one report publishes (a guest claiming more is not believed).
const MAX_EVENTS_PER_REPORT: u64 = 1000;
/// First wait before asking the agent again after a failed poll; doubled up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct LedgerState {
    /// Kills published so far.
    published: u64,
    /// The container's exit is being recorded: nothing more is published.
    closed: bool,
}

/// How many of a container's OOM kills were published.
#[derive(Debug, Default)]
pub struct OomLedger {
    state: Mutex<LedgerState>,
}

impl OomLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes one TaskOOM for `container_id` per kill of `kills` (the cgroup's count so
    /// far) not yet published, unless the ledger is closed. Returns how many it published.
    pub fn publish(&self, events: &EventSender, container_id: &str, kills: u64) -> u64 {
        let mut state = self.lock();
        if state.closed || kills <= state.published {
            return 0;
        }
        let new = kills - state.published;
        state.published = kills;
        let sent = new.min(MAX_EVENTS_PER_REPORT);
        if sent < new {
            tracing::warn!(
                container = container_id,
                new,
                sent,
                "implausibly many OOM kills reported at once; publishing only some"
            );
        }
        // Sent under the lock: a close waits for them, so they precede the exit.
        for _ in 0..sent {
            events.send(TaskOOM {
                container_id: container_id.to_owned(),
                ..Default::default()
            });
        }
        sent
    }

    /// Publishes nothing from now on; returns how many kills were published.
    pub fn close(&self) -> u64 {
        let mut state = self.lock();
        state.closed = true;
        state.published
    }
}

/// Reports `kills` (the cgroup's count so far) for `container`: TaskOOM for each new kill
/// ([`OomLedger::publish`]) and, when there was one, the bundle's `oom` file.
pub async fn report(events: &EventSender, container: &Container, kills: u64) {
    let new = container.oom.publish(events, &container.id, kills);
    if new > 0 {
        tracing::warn!(container = %container.id, kills, new, "the guest's OOM killer killed a process of the container");
        write_oom_file(&container.bundle).await;
    }
}

/// Creates `<bundle>/oom`: CRI-O's sign that a container saw an OOM kill.
pub async fn write_oom_file(bundle: &Path) {
    if let Err(error) = tokio::fs::write(bundle.join("oom"), b"").await {
        tracing::debug!(%error, bundle = %bundle.display(), "writing the bundle's oom file");
    }
}

/// What the watcher does after a failed poll.
#[derive(Debug, PartialEq, Eq)]
enum AfterError {
    /// The sandbox ended or the agent cannot answer this call: stop watching.
    Stop,
    /// Ask again later, from this cursor.
    Retry { after: u64 },
}

/// Decides what a failed `GetOOMEvents` means.
fn after_error(error: &AgentError, after: u64, sandbox_ending: bool) -> AfterError {
    if sandbox_ending || matches!(error, AgentError::SandboxDown { .. }) {
        return AfterError::Stop;
    }
    match error.agent_code() {
        Some(ttrpc::Code::UNIMPLEMENTED) => AfterError::Stop,
        // The agent does not know our cursor: start over (counts are cumulative, the
        // ledgers skip what was published).
        Some(ttrpc::Code::INVALID_ARGUMENT) => AfterError::Retry { after: 0 },
        _ => AfterError::Retry { after },
    }
}

/// Follows the OOM kills of `sandbox`'s containers until the sandbox ends (fenced, or its
/// VM stopped by a teardown), reporting each for the container `container(id)` finds.
pub fn watch(
    sandbox: Arc<Sandbox>,
    events: EventSender,
    container: impl Fn(&str) -> Option<Arc<Container>> + Send + 'static,
) {
    tokio::spawn(async move {
        let agent = sandbox.agent().clone();
        let mut stopped = sandbox.vm_stopped_watch();
        let mut after = 0;
        let mut retry = RETRY_FIRST;
        loop {
            let answer = tokio::select! {
                answer = agent.get_oom_events(after) => answer,
                _ = stopped.wait_for(|s| *s) => return,
            };
            let error = match answer {
                Ok(resp) => {
                    after = resp.seq;
                    retry = RETRY_FIRST;
                    for event in resp.events {
                        match container(&event.container_id) {
                            Some(c) => report(&events, &c, event.oom_kills).await,
                            None => tracing::debug!(
                                container = %event.container_id,
                                "OOM kill in a container this shim no longer has"
                            ),
                        }
                    }
                    continue;
                }
                Err(error) => error,
            };
            let ending = sandbox.is_stopping() || sandbox.fault().is_some();
            match after_error(&error, after, ending) {
                AfterError::Stop => {
                    if !ending && !matches!(error, AgentError::SandboxDown { .. }) {
                        tracing::warn!(error = %crate::report::chain(&error),
                            "the agent does not report OOM kills; only those ending a process are reported");
                    }
                    return;
                }
                AfterError::Retry { after: from } => {
                    tracing::warn!(error = %crate::report::chain(&error), retry_in = ?retry,
                        "following the guest's OOM kills failed; asking again");
                    after = from;
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stopped.wait_for(|s| *s) => return,
                    }
                    retry = (retry * 2).min(RETRY_CAP);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::events::Msg;
    use containerd_shim::protos::protobuf::Message;

    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Msg>) -> Vec<String> {
        let mut topics = Vec::new();
        while let Ok(Msg::Event(item)) = rx.try_recv() {
            if item.topic == "/tasks/oom" {
                let e =
                    TaskOOM::parse_from_bytes(&item.event.write_to_bytes_dyn().unwrap()).unwrap();
                topics.push(e.container_id);
            } else {
                topics.push(item.topic);
            }
        }
        topics
    }

    #[test]
    fn each_kill_is_published_once_whichever_path_reports_it() {
        let (events, mut rx) = EventSender::channel();
        let ledger = OomLedger::default();
        // The watcher saw the first kill; the waiter then reports the count at exit, 2.
        assert_eq!(ledger.publish(&events, "c1", 1), 1);
        assert_eq!(ledger.publish(&events, "c1", 2), 1);
        // A late watcher answer with an older count publishes nothing.
        assert_eq!(ledger.publish(&events, "c1", 1), 0);
        assert_eq!(ledger.publish(&events, "c1", 2), 0);
        assert_eq!(drain(&mut rx), ["c1", "c1"]);
        // Two kills in one report: two events.
        assert_eq!(ledger.publish(&events, "c1", 4), 2);
        assert_eq!(drain(&mut rx).len(), 2);
    }

    #[test]
    fn nothing_is_published_after_close() {
        let (events, mut rx) = EventSender::channel();
        let ledger = OomLedger::default();
        ledger.publish(&events, "c1", 1);
        assert_eq!(ledger.close(), 1);
        assert_eq!(ledger.publish(&events, "c1", 3), 0);
        assert_eq!(drain(&mut rx), ["c1"]);
    }

    #[test]
    fn an_absurd_count_is_capped() {
        let (events, mut rx) = EventSender::channel();
        let ledger = OomLedger::default();
        assert_eq!(
            ledger.publish(&events, "c1", u64::MAX),
            MAX_EVENTS_PER_REPORT
        );
        assert_eq!(drain(&mut rx).len() as u64, MAX_EVENTS_PER_REPORT);
        assert_eq!(ledger.publish(&events, "c1", u64::MAX), 0);
    }

    fn status(code: ttrpc::Code) -> AgentError {
        AgentError::Rpc {
            method: "GetOOMEvents",
            source: ttrpc::Error::RpcStatus(ttrpc::get_status(code, "x")),
        }
    }

    #[test]
    fn the_watcher_stops_quietly_when_the_sandbox_ends() {
        let down = AgentError::SandboxDown {
            method: "GetOOMEvents",
            reason: "qemu exited".into(),
        };
        assert_eq!(after_error(&down, 5, false), AfterError::Stop);
        let broken = AgentError::Rpc {
            method: "GetOOMEvents",
            source: ttrpc::Error::LocalClosed,
        };
        assert_eq!(after_error(&broken, 5, true), AfterError::Stop);
        assert_eq!(
            after_error(&broken, 5, false),
            AfterError::Retry { after: 5 }
        );
        assert_eq!(
            after_error(&status(ttrpc::Code::UNIMPLEMENTED), 5, false),
            AfterError::Stop
        );
        assert_eq!(
            after_error(&status(ttrpc::Code::INVALID_ARGUMENT), 5, false),
            AfterError::Retry { after: 0 }
        );
    }
}
