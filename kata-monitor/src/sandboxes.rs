//! Which sandboxes run on this node: one directory per sandbox, named by its id, under
//! `/run/kata` (ours, Kata's runtime-rs) and `/run/vc/sbs` (Kata's Go runtime). The list is
//! kept by filesystem notification (inotify on the roots), after one scan at start; a scan
//! again on a notification queue overflow and, as a safety net only, every minute.
//! A sandbox counts as running while its management socket exists.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// How often the list is rescanned even without notifications.
const SAFETY_RESCAN: Duration = Duration::from_secs(60);

/// Failures setting up the watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot set up inotify")]
    Init(#[source] std::io::Error),
    #[error("cannot watch {}", .path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One sandbox's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
}

impl Sandbox {
    /// Its shim's management socket.
    pub fn socket(&self) -> PathBuf {
        kata_metrics::names::management_socket(&self.dir)
    }
}

/// The sandboxes under the roots.
#[derive(Debug)]
pub struct Sandboxes {
    roots: Vec<PathBuf>,
    known: RwLock<BTreeMap<String, Sandbox>>,
}

/// Whether a directory name can be a sandbox id.
fn plausible_id(name: &OsStr) -> Option<String> {
    let name = name.to_str()?;
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    ok.then(|| name.to_owned())
}

impl Sandboxes {
    /// Sandboxes under `roots`, none known yet.
    pub fn new(roots: Vec<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            roots,
            known: RwLock::new(BTreeMap::new()),
        })
    }

    /// Every sandbox directory known, by id.
    pub fn list(&self) -> Vec<Sandbox> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The sandbox `id`, if known.
    pub fn get(&self, id: &str) -> Option<Sandbox> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The sandboxes whose management socket exists now.
    pub async fn running(&self) -> Vec<Sandbox> {
        let mut out = Vec::new();
        for s in self.list() {
            if tokio::fs::try_exists(s.socket()).await.unwrap_or(false) {
                out.push(s);
            }
        }
        out
    }

    fn add(&self, root: &Path, name: &OsStr) {
        if let Some(id) = plausible_id(name) {
            let dir = root.join(name);
            tracing::debug!(sandbox = %id, "sandbox appeared");
            self.known
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), Sandbox { id, dir });
        }
    }

    fn remove(&self, root: &Path, name: &OsStr) {
        if let Some(id) = plausible_id(name) {
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            // The same id under the other root stays.
            if known.get(&id).is_some_and(|s| s.dir == root.join(name)) {
                tracing::debug!(sandbox = %id, "sandbox gone");
                known.remove(&id);
            }
        }
    }

    /// Replaces the list with what the roots hold now.
    pub async fn scan(&self) {
        let mut found = BTreeMap::new();
        for root in &self.roots {
            let Ok(mut entries) = tokio::fs::read_dir(root).await else {
                continue;
            };
            while let Ok(Some(e)) = entries.next_entry().await {
                let is_dir = e.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
                if let (true, Some(id)) = (is_dir, plausible_id(&e.file_name())) {
                    found
                        .entry(id.clone())
                        .or_insert(Sandbox { id, dir: e.path() });
                }
            }
        }
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = found;
    }

    /// Watches the roots (creating the first one, ours, if missing), scans once, then
    /// follows the notifications until the task is dropped.
    pub async fn watch(self: Arc<Self>) -> Result<(), WatchError> {
        let inotify = Inotify::init().map_err(WatchError::Init)?;
        let mut roots: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
        for (i, root) in self.roots.iter().enumerate() {
            if i == 0 {
                let _ = tokio::fs::create_dir_all(root).await;
            }
            if !tokio::fs::try_exists(root).await.unwrap_or(false) {
                tracing::info!(root = %root.display(), "not watched: it does not exist");
                continue;
            }
            let mask = WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::ONLYDIR;
            let wd = inotify
                .watches()
                .add(root, mask)
                .map_err(|source| WatchError::Watch {
                    path: root.clone(),
                    source,
                })?;
            roots.insert(wd, root.clone());
        }
        self.scan().await;
        let mut events = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(WatchError::Init)?;
        let mut rescan = tokio::time::interval(SAFETY_RESCAN);
        rescan.tick().await;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(e)) => {
                        if e.mask.contains(EventMask::Q_OVERFLOW) {
                            tracing::warn!("inotify queue overflow: rescanning");
                            self.scan().await;
                            continue;
                        }
                        let (Some(root), Some(name)) = (roots.get(&e.wd), e.name.as_deref()) else {
                            continue;
                        };
                        if !e.mask.contains(EventMask::ISDIR) {
                            continue;
                        }
                        if e.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                            self.add(root, name);
                        } else if e.mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                            self.remove(root, name);
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "inotify read failed: rescanning");
                        self.scan().await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => return Ok(()),
                },
                _ = rescan.tick() => self.scan().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn wait_for(s: &Sandboxes, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ids: Vec<String> = s.list().into_iter().map(|s| s.id).collect();
            if ids == want || Instant::now() > deadline {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn directories_are_followed_by_notification() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kata");
        let other = dir.path().join("vc-sbs-absent");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(root.join("before")).unwrap();
        std::fs::write(root.join("a-file"), b"").unwrap();
        let s = Sandboxes::new(vec![root.clone(), other]);
        let watcher = tokio::spawn(s.clone().watch());
        assert_eq!(wait_for(&s, &["before"]).await, ["before"]);
        std::fs::create_dir(root.join("pod1")).unwrap();
        std::fs::create_dir(root.join(".hidden")).unwrap();
        assert_eq!(wait_for(&s, &["before", "pod1"]).await, ["before", "pod1"]);
        std::fs::remove_dir(root.join("before")).unwrap();
        assert_eq!(wait_for(&s, &["pod1"]).await, ["pod1"]);
        // Running = a management socket exists.
        assert!(s.running().await.is_empty());
        let _l =
            std::os::unix::net::UnixListener::bind(root.join("pod1/shim-monitor.sock")).unwrap();
        assert_eq!(s.running().await[0].id, "pod1");
        assert_eq!(s.get("pod1").unwrap().dir, root.join("pod1"));
        watcher.abort();
    }
}
