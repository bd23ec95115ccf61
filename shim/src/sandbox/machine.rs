//! The pod's VM as the sandbox sees it: a local QEMU the shim owns ([`Vm`]), or a remote
//! instance a peer pods adaptor owns ([`RemoteVm`]). One sandbox lifecycle drives either
//! through this small interface; what only a local VM can do (hotplug over QMP, host
//! cgroups for its processes, console, child deaths and panic events) is asked of
//! [`Machine::local`].

use std::sync::Arc;
use std::time::Duration;

use kata_hypervisor::qmp::Event;
use kata_hypervisor::vm::ChildDeath;
use kata_hypervisor::vsock::Endpoint;
use kata_hypervisor::Vm;
use tokio::sync::{broadcast, watch};

use super::remote::RemoteVm;

/// A sandbox's VM.
#[derive(Debug, Clone)]
pub enum Machine {
    /// QEMU on this host, started and owned by the shim.
    Local(Arc<Vm>),
    /// An instance created through the remote hypervisor (peer pods).
    Remote(Arc<RemoteVm>),
}

impl Machine {
    /// The local VM, if this is one.
    pub fn local(&self) -> Option<&Arc<Vm>> {
        match self {
            Machine::Local(vm) => Some(vm),
            Machine::Remote(_) => None,
        }
    }

    /// Where the agent's vsock ports are reached.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Machine::Local(vm) => vm.vsock_endpoint().clone(),
            Machine::Remote(vm) => vm.endpoint(),
        }
    }

    /// The pid containerd sees for the sandbox's tasks: QEMU's, or (remote) the shim's
    /// own, as Kata does.
    pub fn task_pid(&self) -> u32 {
        match self {
            Machine::Local(vm) => vm.pid(),
            Machine::Remote(_) => std::process::id(),
        }
    }

    /// The guest console's last lines (none for a remote VM).
    pub fn console_tail(&self) -> Vec<String> {
        match self {
            Machine::Local(vm) => vm.console_tail(),
            Machine::Remote(_) => Vec::new(),
        }
    }

    /// Host processes of the VM by name (none for a remote VM).
    pub fn pids(&self) -> Vec<(String, u32)> {
        match self {
            Machine::Local(vm) => vm.pids(),
            Machine::Remote(_) => Vec::new(),
        }
    }

    /// QMP events (none for a remote VM).
    pub fn events(&self) -> Option<broadcast::Receiver<Event>> {
        self.local().map(|vm| vm.qmp().events())
    }

    /// Resolves when a host process of the VM dies; never for a remote VM.
    pub async fn wait_child_death(&self) -> ChildDeath {
        match self {
            Machine::Local(vm) => vm.wait_child_death().await,
            Machine::Remote(_) => std::future::pending().await,
        }
    }

    /// Fences the VM: a local one is SIGKILLed and reaped; a remote one deleted (StopVM).
    pub async fn kill(&self) {
        match self {
            Machine::Local(vm) => vm.kill().await,
            Machine::Remote(vm) => {
                if let Err(error) = vm.stop().await {
                    tracing::error!(error = %crate::report::chain(&error), "StopVM while fencing");
                }
            }
        }
    }

    /// Stops the VM for a teardown (`step` bounds each escalation step of a local one).
    pub async fn stop(&self, step: Duration) {
        match self {
            Machine::Local(vm) => {
                if let Err(error) = vm.stop(step).await {
                    tracing::warn!(error = %crate::report::chain(&error), "stopping VM");
                }
            }
            Machine::Remote(vm) => {
                if let Err(error) = vm.stop().await {
                    tracing::warn!(error = %crate::report::chain(&error), "StopVM");
                }
            }
        }
    }

    /// Whether the VM is known to have exited already (a local QEMU).
    pub fn exited(&self) -> bool {
        match self {
            Machine::Local(vm) => vm.exit_watch().borrow().is_some(),
            Machine::Remote(_) => false,
        }
    }

    /// Turns true once the VM was stopped.
    pub fn stopped_watch(&self) -> watch::Receiver<bool> {
        match self {
            Machine::Local(vm) => vm.stopped_watch(),
            Machine::Remote(vm) => vm.stopped_watch(),
        }
    }
}
