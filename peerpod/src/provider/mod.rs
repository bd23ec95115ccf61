//! Providers: where pod VMs are created. A cloud's API in production; [`local`] boots them
//! with QEMU on this host. The adaptor sees only [`Provider`]: create an instance from an
//! image, a size and user data; delete one; list them.

pub mod local;

use std::net::IpAddr;

use async_trait::async_trait;
use kata_proto::peerpod::UserData;

use crate::annotations::GpuRequest;

/// vCPUs and memory of an instance (sizing: [`crate::sizing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// What the adaptor asks a provider to create.
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    /// The instance's name ([`crate::naming::instance_name`]): unique, traces back to the pod.
    pub name: String,
    /// The pod's sandbox id, kept with the instance (a cloud's tags) so orphans can be told.
    pub sandbox_id: String,
    /// The image's name as the provider knows it.
    pub image: String,
    /// The instance type chosen for the pod ([`crate::sizing`]).
    pub instance_type: String,
    /// Its vCPUs and memory.
    pub size: InstanceSize,
    /// The user data; the provider fills in what only it knows (the VM's own NIC).
    pub user_data: UserData,
}

/// An instance as a provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub sandbox_id: String,
    /// The address the node reaches it at (the agent's TLS port, the VXLAN's far end).
    pub address: IpAddr,
    /// Whether it is running.
    pub running: bool,
}

/// The network between the node and its pod VMs, as the provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    /// The node's address on it (the VXLAN's node end, as the VMs reach it).
    pub node_address: IpAddr,
    /// Its MTU: a pod MTU plus the VXLAN overhead must fit.
    pub mtu: u32,
}

/// A provider failure.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The request names something the provider does not have or cannot do.
    #[error("{0}")]
    Invalid(String),
    /// Out of addresses, quota or capacity.
    #[error("{0}")]
    Exhausted(String),
    /// The provider failed.
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ProviderError {
    /// A failure with its cause.
    pub fn failed(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ProviderError::Failed {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// Where pod VMs are created.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// The provider's name (`local`).
    fn name(&self) -> &'static str;

    /// The network between node and instances.
    fn underlay(&self) -> Underlay;

    /// The image used when the pod names none.
    fn default_image(&self) -> &str;

    /// Checks a request's image and GPUs before anything is created.
    fn check(&self, image: &str, gpus: Option<&GpuRequest>) -> Result<(), ProviderError>;

    /// Creates and boots an instance; returns once it exists (not when its agent answers).
    async fn create_instance(&self, req: InstanceRequest) -> Result<Instance, ProviderError>;

    /// Deletes an instance and everything the provider made for it. An unknown name
    /// succeeds.
    async fn delete_instance(&self, name: &str) -> Result<(), ProviderError>;

    /// Every instance this provider made (on this node).
    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError>;

    /// A hint for an operator when an instance's agent does not answer (e.g. where its
    /// console is).
    fn diagnostics(&self, name: &str) -> String;
}
