//! The remote hypervisor backend (peer pods, RuntimeClass `kata-remote`): the pod's VM is an
//! instance a node-local adaptor creates elsewhere (a cloud; in tests the adaptor's local
//! provider), driven over Kata's `hypervisor.Hypervisor` ttrpc service on the adaptor's
//! socket. CreateVM answers a unix socket that speaks the hybrid-vsock handshake to the
//! VM's agent, so the agent client and stdio reach a remote agent exactly as a local one
//! behind `vhost-device-vsock`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_hypervisor::vsock::Endpoint;
use kata_proto::hypervisor::{CreateVMRequest, StartVMRequest, StopVMRequest};
use kata_proto::hypervisor_ttrpc::HypervisorClient;
use ttrpc::asynchronous::Client;

/// How long StopVM may take before the sandbox's teardown goes on without it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests other than StartVM.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The least StartVM gets, whatever the configuration says (Kata's floor).
const MIN_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the remote hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The adaptor's socket does not exist or refuses connections.
    #[error("cannot reach the remote hypervisor (peer pods adaptor) at {}: is the adaptor running?", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: ttrpc::Error,
    },
    /// A request to the adaptor failed.
    #[error("remote hypervisor {method} for sandbox {id} failed")]
    Rpc {
        method: &'static str,
        id: String,
        #[source]
        source: ttrpc::Error,
    },
    /// The adaptor answered without an agent socket.
    #[error("remote hypervisor CreateVM for sandbox {id} answered no agent socket")]
    NoAgentSocket { id: String },
}

impl RemoteError {
    /// The adaptor's status code, when it refused the request.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            RemoteError::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            } => Some(s.code()),
            _ => None,
        }
    }
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// A pod VM created through the adaptor.
#[derive(Clone)]
pub struct RemoteVm {
    client: HypervisorClient,
    /// The sandbox id, the adaptor's key for the VM.
    pub id: String,
    /// The adaptor's socket.
    pub socket: PathBuf,
    /// Where the VM's agent is reached (hybrid-vsock handshake).
    pub agent_socket: PathBuf,
    /// True once StopVM succeeded.
    stopped: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl std::fmt::Debug for RemoteVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteVm")
            .field("id", &self.id)
            .field("socket", &self.socket)
            .field("agent_socket", &self.agent_socket)
            .finish_non_exhaustive()
    }
}

async fn connect(socket: &Path) -> Result<HypervisorClient, RemoteError> {
    let address = format!("unix://{}", socket.display());
    let client = Client::connect(&address)
        .await
        .map_err(|source| RemoteError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(HypervisorClient::new(client))
}

impl RemoteVm {
    /// CreateVM then StartVM: returns once the VM's agent is reachable through the
    /// adaptor. `start_timeout` bounds StartVM (at least 60 s). A failed StartVM is
    /// followed by StopVM, so the adaptor releases what CreateVM prepared.
    pub async fn start(
        socket: &Path,
        id: &str,
        annotations: HashMap<String, String>,
        netns: Option<&Path>,
        start_timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let client = connect(socket).await?;
        let rpc = |method| {
            move |source| RemoteError::Rpc {
                method,
                id: id.to_owned(),
                source,
            }
        };
        let req = CreateVMRequest {
            id: id.to_owned(),
            annotations,
            networkNamespacePath: netns.map(|p| p.display().to_string()).unwrap_or_default(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let created = client
            .create_vm(ctx(REQUEST_TIMEOUT), &req)
            .await
            .map_err(rpc("CreateVM"))?;
        let create_vm_ms = started.elapsed().as_millis() as u64;
        if created.agentSocketPath.is_empty() {
            return Err(RemoteError::NoAgentSocket { id: id.to_owned() });
        }
        let this = Self {
            client,
            id: id.to_owned(),
            socket: socket.to_path_buf(),
            agent_socket: PathBuf::from(&created.agentSocketPath),
            stopped: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
        };
        let req = StartVMRequest {
            id: id.to_owned(),
            ..Default::default()
        };
        let timeout = start_timeout.max(MIN_START_TIMEOUT);
        if let Err(source) = this.client.start_vm(ctx(timeout), &req).await {
            if let Err(error) = this.stop().await {
                tracing::warn!(sandbox = id, error = %crate::report::chain(&error), "StopVM after a failed StartVM");
            }
            return Err(rpc("StartVM")(source));
        }
        // In ms (hack/bench-peerpod.sh reads them).
        tracing::info!(
            sandbox = id,
            create_vm_ms,
            start_vm_ms = started.elapsed().as_millis() as u64 - create_vm_ms,
            "remote VM started"
        );
        Ok(this)
    }

    /// The agent's endpoint: the adaptor's per-pod socket, hybrid-vsock style.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Hybrid {
            uds: self.agent_socket.clone(),
        }
    }

    /// StopVM: the adaptor deletes the instance and everything it made for the pod.
    /// A connection that broke (the adaptor restarted) is dialed again for it.
    pub async fn stop(&self) -> Result<(), RemoteError> {
        match stop_vm(&self.client, &self.id).await {
            Err(RemoteError::Rpc {
                source:
                    ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed | ttrpc::Error::Socket(_),
                ..
            }) => {
                tracing::info!(sandbox = %self.id, "the adaptor connection broke (adaptor restarted?); StopVM on a new one");
                stop_vm(&connect(&self.socket).await?, &self.id).await?;
            }
            result => result?,
        }
        self.stopped.send_replace(true);
        Ok(())
    }

    /// Turns true once StopVM succeeded.
    pub fn stopped_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopped.subscribe()
    }
}

async fn stop_vm(client: &HypervisorClient, id: &str) -> Result<(), RemoteError> {
    let req = StopVMRequest {
        id: id.to_owned(),
        ..Default::default()
    };
    client
        .stop_vm(ctx(STOP_TIMEOUT), &req)
        .await
        .map(drop)
        .map_err(|source| RemoteError::Rpc {
            method: "StopVM",
            id: id.to_owned(),
            source,
        })
}

/// StopVM for sandbox `id` on a fresh connection to the adaptor at `socket` (the dead-shim
/// cleanup, which has no client of its own).
pub async fn stop_by_id(socket: &Path, id: &str) -> Result<(), RemoteError> {
    let client = connect(socket).await?;
    stop_vm(&client, id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use kata_proto::hypervisor::{CreateVMResponse, StartVMResponse, StopVMResponse};
    use kata_proto::hypervisor_ttrpc::{create_hypervisor, Hypervisor};
    use std::sync::{Arc, Mutex};
    use ttrpc::asynchronous::TtrpcContext;

    /// An adaptor that records calls; StartVM fails for the id "refuse".
    #[derive(Default)]
    struct Adaptor(Mutex<Vec<String>>);

    #[async_trait]
    impl Hypervisor for Adaptor {
        async fn create_vm(
            &self,
            _: &TtrpcContext,
            req: CreateVMRequest,
        ) -> ttrpc::Result<CreateVMResponse> {
            let mut keys: Vec<_> = req.annotations.keys().cloned().collect();
            keys.sort();
            self.0.lock().unwrap().push(format!(
                "CreateVM {} {keys:?} {}",
                req.id, req.networkNamespacePath
            ));
            Ok(CreateVMResponse {
                agentSocketPath: format!("/run/peerpod/pods/{}/agent.ttrpc", req.id),
                ..Default::default()
            })
        }

        async fn start_vm(
            &self,
            _: &TtrpcContext,
            req: StartVMRequest,
        ) -> ttrpc::Result<StartVMResponse> {
            self.0.lock().unwrap().push(format!("StartVM {}", req.id));
            if req.id == "refuse" {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::RESOURCE_EXHAUSTED,
                    "pod VM limit 2 reached",
                )));
            }
            Ok(StartVMResponse::default())
        }

        async fn stop_vm(
            &self,
            _: &TtrpcContext,
            req: StopVMRequest,
        ) -> ttrpc::Result<StopVMResponse> {
            self.0.lock().unwrap().push(format!("StopVM {}", req.id));
            Ok(StopVMResponse::default())
        }
    }

    async fn serve(dir: &Path) -> (Arc<Adaptor>, ttrpc::asynchronous::Server, PathBuf) {
        let socket = dir.join("hypervisor.sock");
        let adaptor = Arc::new(Adaptor::default());
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let mut server = ttrpc::asynchronous::Server::new()
            .add_listener(ttrpc::asynchronous::transport::Listener::from(listener))
            .register_service(create_hypervisor(adaptor.clone()));
        server.start().await.unwrap();
        (adaptor, server, socket)
    }

    #[tokio::test]
    async fn create_start_stop_and_a_refused_start_stops_again() {
        let dir = tempfile::tempdir().unwrap();
        let (adaptor, _server, socket) = serve(dir.path()).await;
        let ann = HashMap::from([
            (
                "io.kubernetes.cri.sandbox-name".to_owned(),
                "web".to_owned(),
            ),
            (
                "io.kubernetes.cri.sandbox-namespace".to_owned(),
                "default".to_owned(),
            ),
        ]);
        let vm = RemoteVm::start(
            &socket,
            "sb1",
            ann.clone(),
            Some(Path::new("/var/run/netns/x")),
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert_eq!(
            vm.endpoint(),
            Endpoint::Hybrid {
                uds: "/run/peerpod/pods/sb1/agent.ttrpc".into()
            }
        );
        vm.stop().await.unwrap();
        let e = RemoteVm::start(&socket, "refuse", ann, None, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ttrpc::Code::RESOURCE_EXHAUSTED));
        assert!(
            crate::report::chain(&e).contains("pod VM limit 2 reached"),
            "{e}"
        );
        stop_by_id(&socket, "gone").await.unwrap();
        assert_eq!(
            *adaptor.0.lock().unwrap(),
            [
                "CreateVM sb1 [\"io.kubernetes.cri.sandbox-name\", \"io.kubernetes.cri.sandbox-namespace\"] /var/run/netns/x",
                "StartVM sb1",
                "StopVM sb1",
                "CreateVM refuse [\"io.kubernetes.cri.sandbox-name\", \"io.kubernetes.cri.sandbox-namespace\"] ",
                "StartVM refuse",
                "StopVM refuse",
                "StopVM gone",
            ]
        );
    }

    #[tokio::test]
    async fn a_missing_adaptor_is_named() {
        let e = RemoteVm::start(
            Path::new("/nonexistent/hypervisor.sock"),
            "sb",
            HashMap::new(),
            None,
            Duration::ZERO,
        )
        .await
        .unwrap_err();
        let text = crate::report::chain(&e);
        assert!(
            text.contains("/nonexistent/hypervisor.sock") && text.contains("adaptor"),
            "{text}"
        );
    }
}
