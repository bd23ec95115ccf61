//! kata-monitor: the node daemon between Prometheus and the kata shims.
//!
//! It keeps the list of sandboxes by filesystem notification ([`sandboxes`]), scrapes every
//! running shim's management socket concurrently with a per-shim deadline when it is
//! scraped itself ([`scrape`]), adds the pod's CRI identity (`sandbox_id`, `cri_uid`,
//! `cri_name`, `cri_namespace`) to every sample ([`cri`]), merges the families by name and
//! adds its own `kata_monitor_*` ones. A shim that dies mid-scrape costs a failed count,
//! never the monitor. HTTP endpoints: [`server`]. Flags: [`flags`].

pub mod cri;
pub mod flags;
pub mod sandboxes;
pub mod scrape;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;

/// Failures of the daemon itself.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot listen on {address}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the sandbox directories")]
    Watch(#[from] sandboxes::WatchError),
}

/// The daemon's state, shared by the endpoints.
#[derive(Debug)]
pub struct Monitor {
    pub sandboxes: Arc<sandboxes::Sandboxes>,
    pub cri: cri::Cri,
    pub stats: scrape::Stats,
}

/// Runs kata-monitor with `config` until the future is dropped or the watch fails.
pub async fn run(config: flags::Config) -> Result<(), MonitorError> {
    let roots = kata_metrics::names::SANDBOX_ROOTS
        .iter()
        .map(PathBuf::from)
        .collect();
    let monitor = Arc::new(Monitor {
        sandboxes: sandboxes::Sandboxes::new(roots),
        cri: cri::Cri::new(&config.runtime_endpoint),
        stats: scrape::Stats::default(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| MonitorError::Listen {
            address: config.listen,
            source,
        })?;
    tracing::info!(
        listen = %config.listen,
        runtime_endpoint = %config.runtime_endpoint.display(),
        "kata-monitor serving"
    );
    let server = tokio::spawn(server::serve(listener, monitor.clone()));
    let result = monitor.sandboxes.clone().watch().await;
    server.abort();
    result.map_err(MonitorError::from)
}
