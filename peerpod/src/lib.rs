//! `peerpod-adaptor`: the node-local daemon of peer pods. It serves Kata's remote
//! hypervisor service (`hypervisor.Hypervisor`, [`service`]) on a unix socket; for each pod
//! it creates a VM through a provider ([`provider`]; here [`provider::local`], QEMU on this
//! host), hands the VM its certificates and network in user data ([`tls`], [`userdata`]),
//! tunnels the pod network to it ([`tunnel`]) and serves a per-pod agent socket that relays
//! the shim's hybrid-vsock connections over mutual TLS ([`proxy`]). Its state on disk
//! ([`state`]) lets a restarted adaptor find its pods and delete orphans ([`adaptor`],
//! [`liveness`]).

pub mod adaptor;
pub mod annotations;
pub mod capacity;
pub mod config;
pub mod error;
pub mod liveness;
pub mod naming;
pub mod netlink;
pub mod provider;
pub mod proxy;
pub mod report;
pub mod server;
pub mod service;
pub mod sizing;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod userdata;
