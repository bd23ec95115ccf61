//! The host side of the runtime: `containerd-shim-kata-v2`, one per pod.
//!
//! Modules by job, dependencies pointing down the list only:
//! - [`bootstrap`]: the process (flags, `start`, `delete`, server mode);
//! - [`task`]: containerd's Task API — the ttrpc service, containers and processes, stdio,
//!   exits and ordered events, the guest-ready spec, and the one error-to-code mapping;
//! - [`sandbox`]: one VM per pod and everything of it on the host — the VM, the agent
//!   client, its health and fencing, resources, pod network, host mounts, state record and
//!   the cleanup after a dead shim;
//! - [`monitor`]: the management server (`/metrics`, `/agent-url` on the sandbox's
//!   socket), Task RPC timing and the pod overhead; it reads the sandbox, and the Task
//!   service only registers the sandbox with it;
//! - [`config`]: `configuration.toml`, pod annotations and runtime options;
//! - [`logging`]: Kata's log lines to containerd's fifo and the journal, never blocking;
//! - [`report`]: error chains as one line of text.

pub mod bootstrap;
pub mod config;
pub mod logging;
pub mod monitor;
pub mod report;
pub mod sandbox;
pub mod task;
