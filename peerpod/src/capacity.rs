//! The node's `kata.peerpods.io/vm` capacity: the adaptor's pod VM limit, advertised to the
//! Kubernetes API with [`kata_peerpods_k8s::node_capacity`] so that the scheduler places at
//! most that many peer pods on the node.
//!
//! Advertised only when an API server is configured: `[kubernetes] api_server` or the
//! in-cluster environment (`KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`), with the
//! node's name from `[kubernetes] node_name` or `NODE_NAME` and the service account in
//! `[kubernetes] service_account_dir`. Without one nothing is sent. A negative limit sends
//! nothing either (upstream's meaning of "unlimited"). The patch is retried in the
//! background until the API server takes it; serving pods never waits for it.

use std::time::Duration;

use kata_peerpods_k8s::node_capacity::{Error, NodeCapacity};

use crate::config::KubernetesSettings;

/// The first retry's delay; doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// The advertisement for this node, or `None` when no API server is configured (or
/// `advertise_capacity = false`). Errors name the missing or bad setting.
pub fn for_node(k: &KubernetesSettings) -> Result<Option<NodeCapacity>, Error> {
    if !k.advertise_capacity {
        return Ok(None);
    }
    let (host, port) = match &k.api_server {
        Some(a) => (Some(a.host.clone()), Some(a.port.to_string())),
        None => (None, None),
    };
    let node = k.node_name.clone();
    let env = move |key: &str| match key {
        "KUBERNETES_SERVICE_HOST" if host.is_some() => host.clone(),
        "KUBERNETES_SERVICE_PORT" if port.is_some() => port.clone(),
        "NODE_NAME" if node.is_some() => node.clone(),
        other => std::env::var(other).ok(),
    };
    NodeCapacity::from_env(env, &k.service_account_dir)
}

/// Advertises `limit` until the API server takes it (or the task is aborted).
pub fn advertise(capacity: NodeCapacity, limit: i64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = FIRST_RETRY;
        loop {
            match capacity.advertise(limit).await {
                Ok(done) => {
                    tracing::debug!(node = capacity.node(), ?done, "node capacity");
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = capacity.node(), error = %crate::report::chain(&e),
                        retry_secs = delay.as_secs(), "advertising the pod VM capacity failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdaptorConfig, ApiServerAddress};

    #[test]
    fn nothing_without_an_api_server_or_when_switched_off() {
        let mut k = AdaptorConfig::defaults().kubernetes;
        // The test process runs outside a cluster.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert!(for_node(&k).unwrap().is_none());
        }
        k.api_server = Some(ApiServerAddress {
            host: "127.0.0.1".into(),
            port: 6443,
        });
        k.advertise_capacity = false;
        assert!(for_node(&k).unwrap().is_none());
    }

    #[test]
    fn a_configured_api_server_needs_the_node_and_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = AdaptorConfig::defaults().kubernetes;
        k.api_server = Some(ApiServerAddress {
            host: "127.0.0.1".into(),
            port: 6443,
        });
        k.service_account_dir = dir.path().to_owned();
        k.node_name = Some("Not_A_Node".into());
        let e = for_node(&k).unwrap_err();
        assert!(e.to_string().contains("Not_A_Node"), "{e}");
        k.node_name = Some("node-a".into());
        let e = for_node(&k).unwrap_err();
        assert!(matches!(e, Error::ReadCa { .. }), "{e}");
    }
}
