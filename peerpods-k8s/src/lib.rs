//! What peer pods tell Kubernetes, shared by the admission webhook and the adaptor.
//!
//! A peer pod's CPU and memory are spent in a VM beside the node, not on it, so the
//! scheduler counts pod VMs instead: every node advertises the extended resource
//! [`POD_VM_RESOURCE`] (its pod VM limit, see [`node_capacity`]) and the admission webhook
//! gives every peer pod a request of one, moving the pod's own requests into the sizing
//! annotations below, which the runtime passes to the adaptor's CreateVM.

pub mod node_capacity;

/// The extended resource that counts pod VMs on a node: one per peer pod.
pub const POD_VM_RESOURCE: &str = "kata.peerpods.io/vm";

/// The number of pod VMs a node takes when nothing else is configured.
pub const DEFAULT_POD_VM_LIMIT: i64 = 10;

/// The pod's vCPUs for its VM, an integer (the pod's CPU rounded up).
pub const VCPUS_ANNOTATION: &str = "io.katacontainers.config.hypervisor.default_vcpus";

/// The pod's memory for its VM in MiB, an integer (rounded up).
pub const MEMORY_ANNOTATION: &str = "io.katacontainers.config.hypervisor.default_memory";

/// The number of GPUs the pod's VM needs, an integer.
pub const GPUS_ANNOTATION: &str = "io.katacontainers.config.hypervisor.default_gpus";

/// An instance size named by the pod itself (checked against the adaptor's allow-list).
pub const MACHINE_TYPE_ANNOTATION: &str = "io.katacontainers.config.hypervisor.machine_type";

/// The container resource whose count becomes [`GPUS_ANNOTATION`].
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
