//! The ttrpc server: binding the listen address and registering the services.

use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent_ttrpc::{create_agent_service, create_container_service};
use kata_proto::health_ttrpc::create_health;
use kata_proto::image_ttrpc::create_image_service;
use ttrpc::asynchronous::Server;

use crate::logging::chain;
use crate::service::Agent;

/// The address PID 1 serves on: any CID, the agent port.
pub fn default_listen_address() -> String {
    format!("vsock://-1:{}", kata_proto::AGENT_VSOCK_PORT)
}

/// A failure to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
    /// The server did not start.
    #[error("start server on {addr}")]
    Start {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
}

/// Binds `addr` (`vsock://cid:port` or `unix:///path`), registers `Health`,
/// `AgentService`, `ContainerService` and `ImageService` backed by `agent`, and starts serving. Keep the returned server alive.
pub async fn start(addr: &str, agent: Arc<Agent>) -> Result<Server, ServerError> {
    let mut server = Server::new()
        .bind(addr)
        .map_err(|source| ServerError::Bind {
            addr: addr.to_owned(),
            source,
        })?
        .register_service(create_health(agent.clone()))
        .register_service(create_agent_service(agent.clone()))
        .register_service(create_container_service(agent.clone()))
        .register_service(create_image_service(agent));
    server.start().await.map_err(|source| ServerError::Start {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(server)
}

/// Serves forever: a failure to bind or start is logged and retried every second.
pub async fn serve_forever(addr: &str, agent: Arc<Agent>) -> ! {
    let _server = loop {
        match start(addr, agent.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::error!(error = %chain(&e), "cannot serve; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    // The host waits for this line before it dials (kata_proto::AGENT_READY_MARKER).
    tracing::info!(addr, "{}", kata_proto::AGENT_READY_MARKER);
    std::future::pending().await
}
