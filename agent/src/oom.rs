//! OOM kills in the containers' cgroups, as events for the host.
//!
//! A container's cgroup v2 `memory.events` counts the kernel OOM killer's kills among its
//! processes (`oom_kill`, descendant cgroups included), whichever process it picked: the
//! init, an exec or any child of theirs. The kernel signals every change to that file as an
//! inotify modify event, so [`OomWatch::watch`] gives each container a task that sleeps on
//! an inotify descriptor of its own, re-reads the count on each event and, when it grew,
//! records it under a new sequence number. No polling loop.
//!
//! [`OomWatch::changes_after`] is the long poll behind `GetOOMEvents`: it answers with every
//! container whose count grew after the sequence number the caller last saw, waiting until
//! there is one. Counts are cumulative, so an answer lost on the way is made good by the
//! next one, and the host tells kills it already reported (`WaitProcess` carries the count
//! too) from new ones.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, watch};

use crate::cgroup;

/// The cgroup file whose `oom_kill` line counts the kills.
pub const EVENTS_FILE: &str = "memory.events";

/// Why a container's OOM kills cannot be followed, or a poll is refused.
#[derive(Debug, thiserror::Error)]
pub enum OomError {
    /// inotify_init1 failed (a kernel without CONFIG_INOTIFY_USER, or out of instances).
    #[error("create an inotify instance")]
    Init(#[source] nix::Error),
    /// The events file cannot be watched.
    #[error("watch {}", .path.display())]
    Watch {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The descriptor cannot join the runtime's reactor.
    #[error("register the inotify descriptor")]
    Register(#[source] std::io::Error),
    /// The caller claims to have seen answers the agent never gave.
    #[error("OOM event cursor {after} is ahead of the agent's last sequence number {current}")]
    Cursor {
        /// The caller's `after`.
        after: u64,
        /// The last sequence number handed out.
        current: u64,
    },
}

/// One container's count.
#[derive(Debug)]
struct Entry {
    /// Tells this container from an earlier one with the same id.
    generation: u64,
    /// Kills counted so far.
    kills: u64,
    /// The sequence number of the last growth (0: none yet).
    seq: u64,
    /// Dropping it ends the container's watch task.
    _stop: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct State {
    containers: HashMap<String, Entry>,
    next_generation: u64,
}

/// The OOM kill counts of this guest's containers.
#[derive(Debug)]
pub struct OomWatch {
    state: Mutex<State>,
    /// The last sequence number handed out; long polls wait on it.
    seq: watch::Sender<u64>,
}

impl Default for OomWatch {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            seq: watch::channel(0).0,
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The inotify instance as the reactor takes it.
struct WatchFd(Inotify);

impl AsRawFd for WatchFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The `oom_kill` count in a `memory.events` text (0 when absent).
pub fn parse_kills(text: &str) -> u64 {
    cgroup::parse_flat_keyed(text)
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

impl OomWatch {
    /// Follows the OOM kills of container `id` in the cgroup directory `cgroup` until
    /// [`forget`](Self::forget) (or the cgroup's removal). Runs on the current tokio runtime.
    pub fn watch(self: &Arc<Self>, id: &str, cgroup: &Path) -> Result<(), OomError> {
        let file = cgroup.join(EVENTS_FILE);
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(OomError::Init)?;
        inotify
            .add_watch(&file, AddWatchFlags::IN_MODIFY)
            .map_err(|source| OomError::Watch {
                path: file.clone(),
                source,
            })?;
        // SAFETY: the inotify fd is open and owned by the `WatchFd` the AsyncFd owns, so it
        // stays open (and `as_raw_fd` returns it) until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(WatchFd(inotify), Interest::READABLE) }
            .map_err(|e| OomError::Register(e.into()))?;
        let (stop, stopped) = oneshot::channel();
        let generation = {
            let mut state = lock(&self.state);
            state.next_generation += 1;
            let generation = state.next_generation;
            state.containers.insert(
                id.to_owned(),
                Entry {
                    generation,
                    kills: 0,
                    seq: 0,
                    _stop: stop,
                },
            );
            generation
        };
        tokio::spawn(
            self.clone()
                .follow(id.to_owned(), generation, file, fd, stopped),
        );
        Ok(())
    }

    /// Stops following container `id` and drops its count.
    pub fn forget(&self, id: &str) {
        lock(&self.state).containers.remove(id);
    }

    /// The kills counted for container `id` so far.
    pub fn kills(&self, id: &str) -> Option<u64> {
        lock(&self.state).containers.get(id).map(|e| e.kills)
    }

    /// Waits until some container's count grew after sequence number `after`; returns the
    /// new sequence number and every such container with its count now.
    pub async fn changes_after(&self, after: u64) -> Result<(u64, Vec<(String, u64)>), OomError> {
        let current = *self.seq.borrow();
        if after > current {
            return Err(OomError::Cursor { after, current });
        }
        let mut rx = self.seq.subscribe();
        let mut seen = after;
        loop {
            // The sender lives as long as `self`: waiting cannot fail.
            let _ = rx.wait_for(|s| *s > seen).await.map(drop);
            let state = lock(&self.state);
            let seq = *self.seq.borrow();
            let mut changed: Vec<(String, u64)> = state
                .containers
                .iter()
                .filter(|(_, e)| e.seq > after)
                .map(|(id, e)| (id.clone(), e.kills))
                .collect();
            if !changed.is_empty() {
                changed.sort();
                return Ok((seq, changed));
            }
            // Only containers removed since: wait for the next growth.
            seen = seq;
        }
    }

    /// Records `kills` for the container `id` of `generation` if it grew; true if so.
    fn record(&self, id: &str, generation: u64, kills: u64) -> bool {
        let mut state = lock(&self.state);
        let Some(entry) = state
            .containers
            .get_mut(id)
            .filter(|e| e.generation == generation)
        else {
            return false;
        };
        if kills <= entry.kills {
            return false;
        }
        // Numbered under the state lock, so sequence numbers follow the records' order.
        let seq = *self.seq.borrow() + 1;
        entry.kills = kills;
        entry.seq = seq;
        self.seq.send_replace(seq);
        true
    }

    async fn reread(&self, id: &str, generation: u64, file: &Path) {
        let text = match tokio::fs::read_to_string(file).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(container = id, file = %file.display(), error = %e, "read OOM events");
                return;
            }
        };
        let kills = parse_kills(&text);
        if self.record(id, generation, kills) {
            tracing::warn!(
                container = id,
                oom_kills = kills,
                "the OOM killer killed a process of the container"
            );
        }
    }

    /// The watch task of one container.
    async fn follow(
        self: Arc<Self>,
        id: String,
        generation: u64,
        file: PathBuf,
        fd: AsyncFd<WatchFd>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        // A kill between the cgroup's creation and the watch.
        self.reread(&id, generation, &file).await;
        loop {
            let mut ready = tokio::select! {
                _ = &mut stopped => return,
                ready = fd.readable() => match ready {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(container = %id, error = %e, "OOM watch failed");
                        return;
                    }
                },
            };
            let events = match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(Into::into)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) => {
                    tracing::error!(container = %id, error = %e, "OOM watch failed");
                    return;
                }
                // Nothing to read after all; readiness was cleared.
                Err(_) => continue,
            };
            if events.iter().any(|e| {
                e.mask
                    .intersects(AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_Q_OVERFLOW)
            }) {
                self.reread(&id, generation, &file).await;
            }
            if events
                .iter()
                .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
            {
                // The cgroup is gone: nothing more to count.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fake cgroup directory whose `memory.events` the test writes.
    fn cgroup_dir(kills: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_kills(dir.path(), kills);
        dir
    }

    fn write_kills(dir: &Path, kills: u64) {
        let text =
            format!("low 0\nhigh 0\nmax 3\noom {kills}\noom_kill {kills}\noom_group_kill 0\n");
        std::fs::write(dir.join(EVENTS_FILE), text).unwrap();
    }

    async fn next(w: &OomWatch, after: u64) -> (u64, Vec<(String, u64)>) {
        tokio::time::timeout(Duration::from_secs(10), w.changes_after(after))
            .await
            .expect("an OOM change within 10 s")
            .unwrap()
    }

    #[test]
    fn kills_are_read_from_memory_events() {
        assert_eq!(parse_kills("oom 2\noom_kill 1\n"), 1);
        assert_eq!(parse_kills("low 0\n"), 0);
        assert_eq!(parse_kills(""), 0);
    }

    #[test]
    fn only_growth_of_the_current_generation_is_recorded() {
        let w = OomWatch::default();
        let (stop, _stopped) = oneshot::channel();
        lock(&w.state).containers.insert(
            "c1".into(),
            Entry {
                generation: 7,
                kills: 0,
                seq: 0,
                _stop: stop,
            },
        );
        assert!(!w.record("c1", 7, 0), "no growth");
        assert!(w.record("c1", 7, 2));
        assert!(!w.record("c1", 7, 2), "same count again");
        assert!(!w.record("c1", 6, 5), "an earlier container of the same id");
        assert!(!w.record("c2", 7, 1), "unknown container");
        assert_eq!(*w.seq.borrow(), 1);
        assert_eq!(w.kills("c1"), Some(2));
    }

    #[tokio::test]
    async fn a_growing_count_is_reported_once_per_change() {
        let w = Arc::new(OomWatch::default());
        let (a, b) = (cgroup_dir(0), cgroup_dir(0));
        w.watch("a", a.path()).unwrap();
        w.watch("b", b.path()).unwrap();
        write_kills(a.path(), 1);
        let (seq, changed) = next(&w, 0).await;
        assert_eq!(changed, [("a".to_owned(), 1)]);
        // Two kills before the next poll come as one change with the total.
        write_kills(b.path(), 2);
        let (seq2, changed) = next(&w, seq).await;
        assert!(seq2 > seq);
        assert_eq!(changed, [("b".to_owned(), 2)]);
        // Every container that grew since an older cursor.
        let (_, changed) = next(&w, 0).await;
        assert_eq!(changed, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
    }

    #[tokio::test]
    async fn a_count_present_before_the_watch_is_reported() {
        let w = Arc::new(OomWatch::default());
        let dir = cgroup_dir(3);
        w.watch("c", dir.path()).unwrap();
        assert_eq!(next(&w, 0).await.1, [("c".to_owned(), 3)]);
    }

    #[tokio::test]
    async fn forgotten_containers_are_not_reported() {
        let w = Arc::new(OomWatch::default());
        let (gone, kept) = (cgroup_dir(0), cgroup_dir(0));
        w.watch("gone", gone.path()).unwrap();
        w.watch("kept", kept.path()).unwrap();
        w.forget("gone");
        write_kills(gone.path(), 1);
        write_kills(kept.path(), 1);
        assert_eq!(next(&w, 0).await.1, [("kept".to_owned(), 1)]);
        assert_eq!(w.kills("gone"), None);
    }

    #[tokio::test]
    async fn a_cursor_from_the_future_is_refused() {
        let w = OomWatch::default();
        let e = w.changes_after(5).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "OOM event cursor 5 is ahead of the agent's last sequence number 0"
        );
    }

    #[test]
    fn a_missing_cgroup_is_named() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let w = Arc::new(OomWatch::default());
        let e = w.watch("c", Path::new("/nonexistent/cgroup")).unwrap_err();
        assert_eq!(e.to_string(), "watch /nonexistent/cgroup/memory.events");
    }
}
