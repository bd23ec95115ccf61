//! The shim's management server and metrics.
//!
//! One [`ShimMonitor`] per shim process. It times every Task API RPC ([`rpc::Timed`]
//! wraps the service) and, once the sandbox is up ([`ShimMonitor::register`]), serves
//! HTTP/1.1 on `/run/kata/<sandbox-id>/shim-monitor.sock` (root only, 0600; the address is
//! also in the bundle's `monitor_address` file): `GET /metrics` answers with the shim's,
//! the hypervisor's, virtiofsd's, the agent's and the guest's metrics read at that moment
//! ([`scrape`]), `GET /agent-url` with the agent's vsock address, `GET /console` with the
//! guest console's last lines.
//!
//! Dependencies point one way: the monitor reads the sandbox ([`crate::sandbox`]); the
//! Task service only holds a monitor to register the sandbox with; the sandbox knows
//! nothing of it. `KATA_SHIM_NO_MANAGEMENT_SERVER=1` leaves the server out (the metrics
//! benchmark measures the shim without it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kata_metrics::RpcDurations;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

pub mod overhead;
pub mod rpc;
pub mod scrape;
pub mod server;

use crate::sandbox::Sandbox;

/// Set (to anything) to run without the management server.
pub const DISABLE_ENV: &str = "KATA_SHIM_NO_MANAGEMENT_SERVER";

/// Failures starting the management server.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The socket could not be created.
    #[error("cannot listen on {}", .path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bundle's `monitor_address` file could not be written.
    #[error("cannot write {}", .path.display())]
    AddressFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The server of a registered sandbox.
#[derive(Debug)]
struct Serving {
    socket: PathBuf,
    task: JoinHandle<()>,
}

/// The shim's metrics and its management server.
#[derive(Debug)]
pub struct ShimMonitor {
    rpc: RpcDurations,
    agent_failures: AtomicU64,
    overhead: overhead::Overhead,
    serving: Mutex<Option<Serving>>,
    enabled: bool,
}

impl ShimMonitor {
    /// A monitor; the server is left out when [`DISABLE_ENV`] is set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            rpc: RpcDurations::shim_rpc(),
            agent_failures: AtomicU64::new(0),
            overhead: overhead::Overhead::default(),
            serving: Mutex::new(None),
            enabled: std::env::var_os(DISABLE_ENV).is_none(),
        })
    }

    /// The Task API latency histogram (shared with [`rpc::Timed`]).
    pub fn rpc_durations(&self) -> &RpcDurations {
        &self.rpc
    }

    fn count_agent_failure(&self) {
        self.agent_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn agent_failures(&self) -> u64 {
        self.agent_failures.load(Ordering::Relaxed)
    }

    fn overhead(&self) -> &overhead::Overhead {
        &self.overhead
    }

    /// Serves `sandbox` on its management socket and writes the socket's address to
    /// `<bundle>/monitor_address`.
    pub async fn register(
        self: &Arc<Self>,
        sandbox: Arc<Sandbox>,
        bundle: &Path,
    ) -> Result<(), MonitorError> {
        if !self.enabled {
            return Ok(());
        }
        let socket = kata_metrics::names::management_socket(&sandbox.paths.state_dir);
        let listen = |source| MonitorError::Listen {
            path: socket.clone(),
            source,
        };
        match tokio::fs::remove_file(&socket).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&socket).map_err(listen)?;
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(listen)?;
        }
        let address = bundle.join(kata_metrics::names::MONITOR_ADDRESS_FILE);
        let tmp = bundle.join(".monitor_address");
        let write = async {
            tokio::fs::write(&tmp, format!("unix://{}", socket.display())).await?;
            tokio::fs::rename(&tmp, &address).await
        };
        write.await.map_err(|source| MonitorError::AddressFile {
            path: address.clone(),
            source,
        })?;
        let task = tokio::spawn(server::serve(listener, self.clone(), sandbox));
        tracing::info!(socket = %socket.display(), "management server listening");
        let old = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Serving { socket, task });
        if let Some(old) = old {
            old.task.abort();
        }
        Ok(())
    }

    /// Stops serving (the sandbox is gone) and removes the socket.
    pub async fn unregister(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = serving {
            s.task.abort();
            // Usually gone already with the sandbox's state directory.
            let _ = tokio::fs::remove_file(&s.socket).await;
        }
    }
}
