//! The VM's resources as containers come and go. One task owns the [`Ledger`] and does every
//! hot-add in turn (requests arrive on a channel, so no lock is held while QEMU and the
//! guest work): a container's memory limit becomes one pc-DIMM on a shared memfd backend,
//! its CPU limit vCPUs in free slots, and the guest onlines them before the request is
//! answered.

use std::sync::Arc;

use kata_hypervisor::Vm;
use oci_spec::runtime::LinuxResources;
use tokio::sync::{mpsc, oneshot};

use super::agent::{AgentClient, AgentError};
use super::resources::{self, Ledger, Limits, ResourceError};

/// How long the guest may take to online hot-added resources.
const ONLINE_TIMEOUT_MS: u32 = 20_000;

/// The ledger of a freshly booted VM: its configured size and the guest's memory block
/// size and online blocks.
pub async fn boot_ledger(
    agent: &AgentClient,
    config: &kata_hypervisor::VmConfig,
) -> Result<Ledger, AgentError> {
    let details = agent.guest_details().await?;
    let online = agent.online_resources(0, 0, 0).await?;
    Ok(Ledger::new(
        details.mem_block_size_bytes,
        config.memory_mib.into(),
        config.max_memory_mib.into(),
        config.memory_slots,
        config.vcpus,
        config.max_vcpus.max(config.vcpus),
        online.memory_blocks,
    ))
}

/// Hot-adds `bytes` of memory as DIMM number `n`: a shared memfd backend (virtio-fs needs
/// guest RAM shared) and a pc-dimm on it. A failed device_add removes the backend again.
async fn plug_memory(vm: &Vm, n: u32, bytes: u64) -> Result<(), ResourceError> {
    use kata_hypervisor::qmp::Command;
    let (mem, dimm) = (format!("hpmem{n}"), format!("hpdimm{n}"));
    let qmp = vm.qmp();
    qmp.execute_unit(&Command::memfd_backend(&mem, bytes, true))
        .await
        .map_err(|source| ResourceError::Qmp {
            what: format!("object-add {mem} ({} MiB)", bytes >> 20),
            source,
        })?;
    if let Err(source) = qmp.execute_unit(&Command::pc_dimm(&dimm, &mem)).await {
        let _ = qmp
            .execute_unit(&Command::ObjectDel { id: mem.clone() })
            .await;
        return Err(ResourceError::Qmp {
            what: format!("device_add pc-dimm {dimm} on {mem}"),
            source,
        });
    }
    Ok(())
}

/// Hot-adds `n` vCPUs into free slots QEMU reports. Returns how many were plugged (also
/// when one failed, so the ledger stays true) and the outcome.
async fn plug_vcpus(vm: &Vm, ledger: &mut Ledger, n: u32) -> (u32, Result<(), ResourceError>) {
    use kata_hypervisor::qmp::Command;
    let qmp = vm.qmp();
    let slots = match qmp.query_hotpluggable_cpus().await {
        Ok(s) => s,
        Err(source) => {
            return (
                0,
                Err(ResourceError::Qmp {
                    what: "query-hotpluggable-cpus".into(),
                    source,
                }),
            )
        }
    };
    let free: Vec<_> = slots.iter().filter(|c| c.qom_path.is_none()).collect();
    if free.len() < n as usize {
        return (
            0,
            Err(ResourceError::NoCpuSlot {
                wanted: n,
                free: free.len(),
            }),
        );
    }
    let mut plugged = 0;
    // QEMU lists the slots highest first; plug the lowest free ones.
    for cpu in free.iter().rev().take(n as usize) {
        let id = format!("hpcpu{}", ledger.next_cpu_id);
        ledger.next_cpu_id += 1;
        if let Err(source) = qmp.execute_unit(&Command::cpu(&id, cpu)).await {
            return (
                plugged,
                Err(ResourceError::Qmp {
                    what: format!("device_add {} {id}", cpu.driver),
                    source,
                }),
            );
        }
        plugged += 1;
    }
    (plugged, Ok(()))
}

/// A change of a container's reservation.
#[derive(Debug)]
enum Change {
    /// New limits (Create).
    Set(Limits),
    /// The limits an Update sets over the current ones.
    Update(Box<LinuxResources>),
}

#[derive(Debug)]
enum Request {
    Reserve {
        id: String,
        change: Change,
        reply: oneshot::Sender<Result<(), ResourceError>>,
    },
    Reserved {
        id: String,
        reply: oneshot::Sender<Limits>,
    },
    Release {
        id: String,
    },
}

/// The handle of the task that owns a VM's ledger.
#[derive(Debug, Clone)]
pub struct Resources {
    tx: mpsc::UnboundedSender<Request>,
}

/// The task stopped (the sandbox is gone).
fn gone() -> ResourceError {
    ResourceError::VmGone("the sandbox's resource task ended".into())
}

impl Resources {
    /// Starts the task for `vm`, whose agent is `agent`; it ends with the last handle.
    /// Without a local VM (peer pods) nothing can be hot-added: a container must fit in
    /// the VM as it was sized.
    pub fn start(ledger: Ledger, vm: Option<Arc<Vm>>, agent: AgentClient) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(ledger, vm, agent, rx));
        Self { tx }
    }

    async fn ask(&self, id: &str, change: Change) -> Result<(), ResourceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Reserve {
                id: id.to_owned(),
                change,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Makes room for container `id` with `limits`: hot-adds memory and vCPUs as needed
    /// and waits until the guest has them online. Fails naming the numbers when the VM
    /// cannot grow that far.
    pub async fn reserve(&self, id: &str, limits: Limits) -> Result<(), ResourceError> {
        self.ask(id, Change::Set(limits)).await
    }

    /// [`reserve`](Self::reserve) with the limits an Update sets over the current ones,
    /// computed and applied in one step.
    pub async fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), ResourceError> {
        self.ask(id, Change::Update(Box::new(resources.clone())))
            .await
    }

    /// What container `id` has reserved.
    pub async fn reserved(&self, id: &str) -> Limits {
        let (reply, rx) = oneshot::channel();
        let asked = self.tx.send(Request::Reserved {
            id: id.to_owned(),
            reply,
        });
        match asked {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => Limits::default(),
        }
    }

    /// Gives back container `id`'s reservation (what was plugged stays for reuse).
    pub fn release(&self, id: &str) {
        let _ = self.tx.send(Request::Release { id: id.to_owned() });
    }
}

/// The task: answers requests one at a time.
async fn run(
    mut ledger: Ledger,
    vm: Option<Arc<Vm>>,
    agent: AgentClient,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    while let Some(request) = rx.recv().await {
        match request {
            Request::Reserve { id, change, reply } => {
                let old = ledger.reserved(&id);
                let (limits, update) = match change {
                    Change::Set(limits) => (limits, false),
                    Change::Update(r) => (resources::updated(old, &r), true),
                };
                // A VM that cannot be hot-plugged was sized for the pod: an Update may
                // not ask for more than the container had.
                let result = if update
                    && vm.is_none()
                    && (limits.memory_bytes > old.memory_bytes || limits.vcpus > old.vcpus)
                {
                    Err(ResourceError::NoHotplug {
                        container: id.clone(),
                        memory_mib: limits.memory_bytes.saturating_sub(old.memory_bytes) >> 20,
                        vcpus: limits.vcpus.saturating_sub(old.vcpus),
                    })
                } else {
                    reserve(&mut ledger, vm.as_deref(), &agent, &id, limits).await
                };
                let _ = reply.send(result);
            }
            Request::Reserved { id, reply } => {
                let _ = reply.send(ledger.reserved(&id));
            }
            Request::Release { id } => ledger.release(&id),
        }
    }
}

async fn reserve(
    ledger: &mut Ledger,
    vm: Option<&Vm>,
    agent: &AgentClient,
    id: &str,
    limits: Limits,
) -> Result<(), ResourceError> {
    let plan = ledger.plan(id, limits)?;
    if plan.add_memory_bytes > 0 || plan.add_vcpus > 0 || ledger.unconfirmed() {
        let Some(vm) = vm else {
            return Err(ResourceError::NoHotplug {
                container: id.to_owned(),
                memory_mib: plan.add_memory_bytes >> 20,
                vcpus: plan.add_vcpus,
            });
        };
        let started = std::time::Instant::now();
        if plan.add_memory_bytes > 0 {
            plug_memory(vm, ledger.dimms, plan.add_memory_bytes).await?;
            ledger.plugged_memory(plan.add_memory_bytes);
        }
        if plan.add_vcpus > 0 {
            let (plugged, result) = plug_vcpus(vm, ledger, plan.add_vcpus).await;
            ledger.plugged_vcpus(plugged);
            result?;
        }
        let online = agent
            .online_resources(ledger.expected_blocks(), ledger.vcpus, ONLINE_TIMEOUT_MS)
            .await
            .map_err(|e| match e {
                AgentError::SandboxDown { reason, .. } => ResourceError::VmGone(reason),
                e => ResourceError::Online(e),
            })?;
        ledger.confirmed_blocks = ledger.expected_blocks();
        ledger.confirmed_vcpus = ledger.vcpus;
        tracing::info!(
            container = id,
            added_memory_mib = plan.add_memory_bytes >> 20,
            added_vcpus = plan.add_vcpus,
            guest_mem_total_kib = online.mem_total_kib,
            guest_cpus = online.online_cpus,
            hotplug_ms = started.elapsed().as_millis() as u64,
            "hotplugged"
        );
    }
    ledger.reserve(id, limits);
    Ok(())
}
