//! The pods' CRI identity (uid, name, namespace) by sandbox id, from the runtime's CRI
//! `ListPodSandbox` (containerd or CRI-O, over its unix socket).
//!
//! Cached; refreshed when a scrape meets a sandbox the cache does not know (at most once a
//! second, bounded in time), so a new pod has its labels from its first scrape on. Pods are
//! listed whatever their state: a stopped pod whose shim still answers keeps its labels.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::ListPodSandboxRequest;
use tonic::transport::{Channel, Endpoint, Uri};

/// Shortest time between two refreshes.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Deadline of one ListPodSandbox.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A failed refresh.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("ListPodSandbox on {} failed", .endpoint.display())]
    List {
        endpoint: PathBuf,
        #[source]
        source: tonic::Status,
    },
    #[error("ListPodSandbox on {} took longer than {CALL_TIMEOUT:?}", .endpoint.display())]
    Timeout { endpoint: PathBuf },
}

/// A pod's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Default)]
struct Cache {
    pods: HashMap<String, PodMeta>,
    refreshed: Option<Instant>,
}

/// The CRI client and its cache.
#[derive(Debug)]
pub struct Cri {
    endpoint: PathBuf,
    channel: Channel,
    cache: Mutex<Cache>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl Cri {
    /// A client of the CRI socket `endpoint`; connects on first use (and again after a
    /// failure).
    pub fn new(endpoint: &Path) -> Self {
        let socket = endpoint.to_path_buf();
        // The URI is not used: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }));
        Self {
            endpoint: endpoint.to_path_buf(),
            channel,
            cache: Mutex::new(Cache::default()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, ids: &[String]) -> (HashMap<String, PodMeta>, bool) {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut missing = false;
        let found = ids
            .iter()
            .filter_map(|id| match cache.pods.get(id) {
                Some(m) => Some((id.clone(), m.clone())),
                None => {
                    missing = true;
                    None
                }
            })
            .collect();
        let may_refresh = cache.refreshed.is_none_or(|t| t.elapsed() >= MIN_REFRESH);
        (found, missing && may_refresh)
    }

    /// The identities of `ids` (unknown ones are absent), refreshing the cache first when
    /// one is missing. A CRI failure is logged and leaves the cache as it was.
    pub async fn metadata(&self, ids: &[String]) -> HashMap<String, PodMeta> {
        let (found, refresh) = self.cached(ids);
        if !refresh {
            return found;
        }
        let _one = self.refreshing.lock().await;
        // Another scrape may have refreshed meanwhile.
        let (found, refresh) = self.cached(ids);
        if !refresh {
            return found;
        }
        if let Err(error) = self.refresh().await {
            tracing::warn!(error = %chain(&error), "CRI pod metadata unavailable");
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refreshed = Some(Instant::now());
        }
        self.cached(ids).0
    }

    async fn refresh(&self) -> Result<(), CriError> {
        let mut client = RuntimeServiceClient::new(self.channel.clone());
        let call = client.list_pod_sandbox(ListPodSandboxRequest { filter: None });
        let answer = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CriError::Timeout {
                endpoint: self.endpoint.clone(),
            })?
            .map_err(|source| CriError::List {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        let pods: HashMap<String, PodMeta> = answer
            .into_inner()
            .items
            .into_iter()
            .map(|p| {
                let m = p.metadata.unwrap_or_default();
                (
                    p.id,
                    PodMeta {
                        uid: m.uid,
                        name: m.name,
                        namespace: m.namespace,
                    },
                )
            })
            .collect();
        tracing::debug!(pods = pods.len(), "CRI pod metadata refreshed");
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Cache {
            pods,
            refreshed: Some(Instant::now()),
        };
        Ok(())
    }
}

/// An error and its causes on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_absent_runtime_leaves_labels_empty_and_is_not_hammered() {
        let dir = tempfile::tempdir().unwrap();
        let cri = Cri::new(&dir.path().join("none.sock"));
        let ids = vec!["pod1".to_owned()];
        assert!(cri.metadata(&ids).await.is_empty());
        // Refreshed (and failed) just now: the next lookup does not try again.
        assert!(!cri.cached(&ids).1);
    }
}
