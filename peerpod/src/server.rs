//! Running the adaptor: provider, state, reconciliation, the node's pod VM capacity
//! ([`crate::capacity`]), then the ttrpc server on the hypervisor socket until
//! SIGTERM/SIGINT.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use kata_proto::hypervisor_ttrpc::create_hypervisor;
use tokio::signal::unix::{signal, SignalKind};

use crate::adaptor::Adaptor;
use crate::config::AdaptorConfig;
use crate::error::AdaptorError;
use crate::provider::local::LocalProvider;
use crate::provider::ProviderError;
use crate::service::HypervisorService;

/// The adaptor could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("local provider")]
    Provider(#[source] ProviderError),
    #[error("adaptor")]
    Adaptor(#[from] AdaptorError),
    #[error("{what} {}", .path.display())]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve ttrpc on {}", .0.display())]
    Serve(PathBuf, #[source] ttrpc::Error),
    #[error("install signal handlers")]
    Signal(#[source] std::io::Error),
    #[error("node capacity ([kubernetes] settings)")]
    Capacity(#[source] kata_peerpods_k8s::node_capacity::Error),
}

/// Starts everything and serves until SIGTERM or SIGINT. The pods' VMs keep running when
/// the adaptor stops; their agent sockets go away and come back with the next start.
pub async fn run(cfg: AdaptorConfig) -> Result<(), RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let capacity = crate::capacity::for_node(&cfg.kubernetes).map_err(RunError::Capacity)?;
    let limit = cfg.limit_per_node;
    let withdraw = cfg.kubernetes.withdraw_capacity_on_shutdown;
    let advertise = cfg.kubernetes.advertise_capacity;
    let provider = Arc::new(
        LocalProvider::new(cfg.local.clone())
            .await
            .map_err(RunError::Provider)?,
    );
    let socket = cfg.socket.clone();
    let c = cfg.clone();
    let adaptor = Arc::new(
        tokio::task::spawn_blocking(move || Adaptor::new(c, provider))
            .await
            .map_err(AdaptorError::from)??,
    );
    adaptor.reconcile().await?;
    let err = |what, source| RunError::Socket {
        what,
        path: socket.clone(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| err("create the directory of", e))?;
    }
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("remove stale", e)),
    }
    let addr = format!("unix://{}", socket.display());
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&addr)
        .map_err(|e| RunError::Serve(socket.clone(), e))?
        .register_service(create_hypervisor(Arc::new(HypervisorService::new(
            adaptor.clone(),
        ))));
    server
        .start()
        .await
        .map_err(|e| RunError::Serve(socket.clone(), e))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("chmod", e))?;
    let advertising = capacity
        .clone()
        .map(|c| crate::capacity::advertise(c, limit));
    if capacity.is_none() {
        let why = if advertise {
            "no Kubernetes API server configured"
        } else {
            "[kubernetes] advertise_capacity = false"
        };
        tracing::info!("{why}: the node's pod VM capacity is not advertised");
    }
    tracing::info!(socket = %socket.display(), limit_per_node = limit, pods_dir = %adaptor.pods_dir().display(), version = env!("CARGO_PKG_VERSION"), "serving hypervisor.Hypervisor");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("terminating; pod VMs keep running");
    let _ = server.shutdown().await;
    adaptor.shutdown().await;
    if let Some(task) = advertising {
        task.abort();
    }
    if let (Some(c), true) = (&capacity, withdraw && limit >= 0) {
        if let Err(e) = c.withdraw().await {
            tracing::warn!(node = c.node(), error = %crate::report::chain(&e), "withdrawing the pod VM capacity failed");
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
