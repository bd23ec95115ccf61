//! The host side of the runtime: `containerd-shim-kata-v2`, one per pod.
//!
//! [`bootstrap`] is the process (flags, `start`, `delete`, server mode); [`service`] serves
//! containerd's Task API on top of [`task`] (containers and processes, [`container`]),
//! which runs a [`sandbox`] (the VM and the agent, [`agent`]) with rootfs [`mounts`], a
//! guest-ready [`spec`], the stdio proxy [`io`], [`exits`] and ordered [`events`].
//! Errors map to ttrpc codes in [`error`]; [`cleanup`] handles a dead shim's leftovers.

pub mod agent;
pub mod annotations;
pub mod bootstrap;
pub mod cleanup;
pub mod config;
pub mod container;
pub mod error;
pub mod events;
pub mod exits;
pub mod io;
pub mod mounts;
pub mod network;
pub mod options;
pub mod resources;
pub mod sandbox;
pub mod service;
pub mod spec;
pub mod task;
