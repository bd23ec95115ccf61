//! `kata-agent`: PID 1 of the guest VM and the ttrpc service the shim talks to.
//!
//! As PID 1 the agent mounts the pseudo filesystems ([`mounts`]), sets up logging to the
//! console ([`logging`]), loads the kernel modules the image lists ([`modules`]), reaps
//! orphans ([`reaper`]), follows the containers' OOM kills ([`oom`]) and then serves the agent protocol on vsock ([`server`],
//! [`service`]), plus, when the kernel command line asks for it, a root shell for operators
//! ([`debug_console`]). Run by hand (not PID 1) it only serves, on an address of the caller's
//! choice, which is how the service is tested on a host.
//!
//! In a peer pod VM (kernel parameter `agent.mode=peerpod`) the agent is reached over
//! mutual TLS on the network instead of vsock ([`peerpod`]) and pulls container images
//! itself ([`image`]).

pub mod cgroup;
pub mod config;
pub mod container;
pub mod copy;
pub mod debug_console;
pub mod files;
pub mod guest;
pub mod image;
pub mod init;
pub mod logging;
pub mod metrics;
pub mod modules;
pub mod mounts;
pub mod network;
pub mod oom;
pub mod passwd;
pub mod paths;
pub mod peerpod;
pub mod reaper;
pub mod resolve;
pub mod server;
pub mod service;
pub mod stdio;
pub mod storage;
