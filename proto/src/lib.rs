//! The agent protocol shared by the shim (client) and `kata-agent` (server).
//!
//! Message types and async ttrpc services are generated at build time from `protos/`
//! and used directly: there are no hand-written mirror types.
//! [`limits`] holds the checks both sides apply to what a container process is given;
//! [`network_mode`] the framing shared by the peer pods adaptor and the agent when the agent
//! is reached over TLS instead of vsock.

pub mod limits;
pub mod network_mode;

/// Liveness and version.
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}
/// ttrpc client and server for [`health`].
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}
/// Sandbox-level requests: storages, guest details, shutdown.
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}
/// ttrpc client and server for [`agent`].
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// In-guest image pull (peer pods).
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod image {
    include!(concat!(env!("OUT_DIR"), "/image.rs"));
}
/// ttrpc client and server for [`image`].
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod image_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/image_ttrpc.rs"));
}
/// The remote hypervisor service (Kata's `hypervisor.Hypervisor`), spoken by the shim to the peer pods adaptor.
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod hypervisor {
    include!(concat!(env!("OUT_DIR"), "/hypervisor.rs"));
}
/// ttrpc client and server for [`hypervisor`].
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod hypervisor_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/hypervisor_ttrpc.rs"));
}
/// The user data a peer pod VM gets from the adaptor (see [`network_mode`]).
#[allow(
    clippy::all,
    unused_mut,
    unused_imports,
    unknown_lints,
    missing_debug_implementations,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case
)]
pub mod peerpod {
    include!(concat!(env!("OUT_DIR"), "/peerpod.rs"));
}

/// The vsock port the agent serves ttrpc on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol version; the major must match between shim and agent.
pub const PROTOCOL_VERSION: &str = "0.1.0";

/// The vsock port on which the agent accepts one connection per process stdio stream.
pub const STDIO_VSOCK_PORT: u32 = 1026;

/// The vsock port of the agent's debug console when the kernel command line turns it on
/// (`agent.debug_console agent.debug_console_vport=1027`). Kata uses 1026, which our stdio
/// port already holds.
pub const DEBUG_CONSOLE_VSOCK_PORT: u32 = 1027;

/// The agent logs a line with this text on the guest console once it accepts ttrpc
/// connections; the host waits for it before its first hybrid-vsock dial (an early CONNECT
/// racing the guest's vsock driver start was seen to leave vhost-device-vsock unanswering).
pub const AGENT_READY_MARKER: &str = "serving ttrpc";
