//! The host side of the runtime: the agent client today; the containerd Task service,
//! sandbox model, configuration and IO arrive with the shim issue.

pub mod agent;
pub mod config;
