//! Sizing the sandbox VM for its containers (Kata's model): the VM boots with its default
//! size, and each container's memory limit is hot-added as pc-DIMMs (on a shared memfd, so
//! virtio-fs keeps working) and its CPU limit as vCPUs, before the container starts.
//!
//! [`Ledger`] is the pure bookkeeping: what a container needs beyond what is plugged, and
//! whether the VM can grow that far. Memory and vCPUs of deleted containers stay plugged
//! and are reused by later ones (unplugging needs the guest to give the memory back, which
//! often fails; reuse never does).

use std::collections::HashMap;

use oci_spec::runtime::LinuxResources;

const MIB: u64 = 1024 * 1024;

/// A container that does not fit, or a hotplug that failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("container {container} needs {need_mib} MiB more memory, but the VM can grow by only {room_mib} MiB (default_maxmemory {max_mib} MiB, {used_mib} MiB already in the VM)")]
    Memory {
        container: String,
        need_mib: u64,
        room_mib: u64,
        max_mib: u64,
        used_mib: u64,
    },
    #[error(
        "container {container} needs another memory DIMM, but all {slots} memory_slots are used"
    )]
    Slots { container: String, slots: u32 },
    #[error("container {container} needs {want} vCPUs in the VM, but default_maxvcpus is {max}")]
    Vcpus {
        container: String,
        want: u32,
        max: u32,
    },
    #[error("QEMU has no free vCPU slot for {wanted} more vCPUs ({free} free)")]
    NoCpuSlot { wanted: u32, free: usize },
    #[error("hotplug: {what}")]
    Qmp {
        what: String,
        #[source]
        source: kata_hypervisor::qmp::QmpError,
    },
    #[error("the guest did not bring the hot-added resources online")]
    Online(#[source] crate::sandbox::agent::AgentError),
    /// The VM cannot grow (a remote VM, peer pods): it was sized for the pod at creation.
    #[error("container {container} needs {memory_mib} MiB more memory and {vcpus} more vCPUs than its VM has; a remote (peer pods) VM cannot be hot-plugged: size the pod VM for it (the pod's limits or io.katacontainers.config.hypervisor.default_memory / default_vcpus / machine_type)")]
    NoHotplug {
        container: String,
        memory_mib: u64,
        vcpus: u32,
    },
    /// The sandbox was fenced; the reason.
    #[error("the sandbox is down: {0}")]
    VmGone(String),
}

/// What a container asks of the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Its memory limit (0: none).
    pub memory_bytes: u64,
    /// `ceil(quota / period)` of its CPU limit (0: none).
    pub vcpus: u32,
}

/// The limits in an OCI `LinuxResources`.
pub fn limits(resources: Option<&LinuxResources>) -> Limits {
    let Some(r) = resources else {
        return Limits::default();
    };
    let memory_bytes = r
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64)
        .unwrap_or(0);
    let vcpus = r
        .cpu()
        .as_ref()
        .and_then(|c| match (c.quota(), c.period()) {
            (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p) as u32),
            _ => None,
        })
        .unwrap_or(0);
    Limits {
        memory_bytes,
        vcpus,
    }
}

/// `old` with what an Update's `resources` sets (fields it leaves out keep their value).
pub fn updated(old: Limits, resources: &LinuxResources) -> Limits {
    let mut new = old;
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()) {
        new.memory_bytes = if limit > 0 { limit as u64 } else { 0 };
    }
    if let Some(c) = resources.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            new.vcpus = limits(Some(resources)).vcpus;
        }
    }
    new
}

/// What to hot-add for a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// Bytes of memory (a multiple of the guest's block size), one DIMM.
    pub add_memory_bytes: u64,
    /// vCPUs.
    pub add_vcpus: u32,
}

/// The VM's size and the containers' reservations.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// The guest's memory block size (0: no memory hotplug in the guest).
    pub block_bytes: u64,
    /// Boot memory.
    pub base_mib: u64,
    /// `maxmem`.
    pub max_mib: u64,
    /// DIMM slots.
    pub slots: u32,
    /// Hot-added memory so far.
    pub plugged_bytes: u64,
    /// DIMMs added so far.
    pub dimms: u32,
    /// Boot vCPUs.
    pub base_vcpus: u32,
    /// `maxcpus`.
    pub max_vcpus: u32,
    /// vCPUs now (boot + hot-added).
    pub vcpus: u32,
    /// Online memory blocks at boot.
    pub base_blocks: u32,
    /// `static_sandbox_resource_mgmt`: the VM was sized for the pod at boot; nothing is
    /// hot-added.
    pub fixed: bool,
    /// Memory blocks and vCPUs the guest has confirmed online (a plug the guest did not
    /// online yet is retried before anything relies on it).
    pub confirmed_blocks: u32,
    pub confirmed_vcpus: u32,
    /// The next vCPU device id (never reused, even after a failed plug).
    pub next_cpu_id: u32,
    reserved: HashMap<String, Limits>,
}

impl Ledger {
    /// A VM as booted.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        block_bytes: u64,
        base_mib: u64,
        max_mib: u64,
        slots: u32,
        base_vcpus: u32,
        max_vcpus: u32,
        base_blocks: u32,
    ) -> Self {
        Self {
            block_bytes,
            base_mib,
            max_mib,
            slots,
            plugged_bytes: 0,
            dimms: 0,
            base_vcpus,
            max_vcpus,
            vcpus: base_vcpus,
            base_blocks,
            fixed: false,
            confirmed_blocks: base_blocks,
            confirmed_vcpus: base_vcpus,
            next_cpu_id: 0,
            reserved: HashMap::new(),
        }
    }

    /// What must be hot-added so that `id` (new, or with new limits) fits next to the
    /// other containers, or why it cannot.
    pub fn plan(&self, id: &str, limits: Limits) -> Result<Plan, ResourceError> {
        if self.fixed {
            return Ok(Plan::default());
        }
        let others = self.reserved.iter().filter(|(k, _)| k.as_str() != id);
        let (mut memory, mut vcpus) = (limits.memory_bytes, limits.vcpus);
        for (_, l) in others {
            memory += l.memory_bytes;
            vcpus += l.vcpus;
        }
        let mut plan = Plan::default();
        if self.block_bytes > 0 {
            let need = memory.div_ceil(self.block_bytes) * self.block_bytes;
            let add = need.saturating_sub(self.plugged_bytes);
            if add > 0 {
                let used = self.base_mib * MIB + self.plugged_bytes;
                let room = (self.max_mib * MIB).saturating_sub(used);
                if add > room {
                    return Err(ResourceError::Memory {
                        container: id.to_owned(),
                        need_mib: add / MIB,
                        room_mib: room / MIB,
                        max_mib: self.max_mib,
                        used_mib: used / MIB,
                    });
                }
                if self.dimms >= self.slots {
                    return Err(ResourceError::Slots {
                        container: id.to_owned(),
                        slots: self.slots,
                    });
                }
                plan.add_memory_bytes = add;
            }
        }
        let want = self.base_vcpus + vcpus;
        if want > self.max_vcpus {
            return Err(ResourceError::Vcpus {
                container: id.to_owned(),
                want,
                max: self.max_vcpus,
            });
        }
        plan.add_vcpus = want.saturating_sub(self.vcpus);
        Ok(plan)
    }

    /// Records hot-added memory (one DIMM).
    pub fn plugged_memory(&mut self, bytes: u64) {
        self.plugged_bytes += bytes;
        self.dimms += 1;
    }

    /// Records hot-added vCPUs.
    pub fn plugged_vcpus(&mut self, n: u32) {
        self.vcpus += n;
    }

    /// Whether something plugged is not confirmed online yet.
    pub fn unconfirmed(&self) -> bool {
        self.expected_blocks() > self.confirmed_blocks || self.vcpus > self.confirmed_vcpus
    }

    /// Online memory blocks the guest must have once everything plugged is online.
    pub fn expected_blocks(&self) -> u32 {
        match self.block_bytes {
            0 => self.base_blocks,
            b => self.base_blocks + (self.plugged_bytes / b) as u32,
        }
    }

    /// Reserves `limits` for `id` (replacing its previous ones).
    pub fn reserve(&mut self, id: &str, limits: Limits) {
        self.reserved.insert(id.to_owned(), limits);
    }

    /// What `id` has reserved.
    pub fn reserved(&self, id: &str) -> Limits {
        self.reserved.get(id).copied().unwrap_or_default()
    }

    /// Forgets `id`'s reservation; what was plugged stays for later containers.
    pub fn release(&mut self, id: &str) {
        self.reserved.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Ledger {
        // 128 MiB blocks, 2048 MiB boot, 4096 MiB max, 2 slots, 1 vCPU of 2.
        Ledger::new(128 * MIB, 2048, 4096, 2, 1, 2, 16)
    }

    #[test]
    fn limits_from_resources() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":100000000},"cpu":{"quota":150000,"period":100000}}"#,
        )
        .unwrap();
        assert_eq!(
            limits(Some(&r)),
            Limits {
                memory_bytes: 100_000_000,
                vcpus: 2
            }
        );
        let none: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":-1}}"#).unwrap();
        assert_eq!(limits(Some(&none)), Limits::default());
        assert_eq!(limits(None), Limits::default());
    }

    #[test]
    fn memory_is_rounded_to_blocks_and_reused() {
        let mut l = ledger();
        let c1 = Limits {
            memory_bytes: 200 * MIB,
            vcpus: 0,
        };
        let p = l.plan("c1", c1).unwrap();
        assert_eq!(p.add_memory_bytes, 256 * MIB);
        l.plugged_memory(p.add_memory_bytes);
        l.reserve("c1", c1);
        assert_eq!(l.expected_blocks(), 18);
        // Within what is plugged: nothing to add.
        let c2 = Limits {
            memory_bytes: 50 * MIB,
            vcpus: 0,
        };
        assert_eq!(l.plan("c2", c2).unwrap(), Plan::default());
        // After c1 is gone its memory is reused.
        l.release("c1");
        assert_eq!(l.plan("c3", c1).unwrap(), Plan::default());
    }

    #[test]
    fn limits_beyond_the_vm_name_both_numbers() {
        let mut l = ledger();
        let big = Limits {
            memory_bytes: 3000 * MIB,
            vcpus: 0,
        };
        let e = l.plan("big", big).unwrap_err().to_string();
        assert!(
            e.contains("3072 MiB more") && e.contains("only 2048 MiB"),
            "{e}"
        );
        let cpu = Limits {
            memory_bytes: 0,
            vcpus: 2,
        };
        let e = l.plan("cpu", cpu).unwrap_err().to_string();
        assert!(
            e.contains("3 vCPUs") && e.contains("default_maxvcpus is 2"),
            "{e}"
        );
        // Slots run out.
        for i in 0..2 {
            let c = Limits {
                memory_bytes: 128 * MIB,
                vcpus: 0,
            };
            let id = format!("s{i}");
            let p = l.plan(&id, c).unwrap();
            l.plugged_memory(p.add_memory_bytes);
            l.reserve(&id, c);
        }
        let c = Limits {
            memory_bytes: 128 * MIB,
            vcpus: 0,
        };
        let e = l.plan("s3", c).unwrap_err().to_string();
        assert!(e.contains("all 2 memory_slots"), "{e}");
    }

    #[test]
    fn a_fixed_vm_never_grows() {
        let mut l = ledger();
        l.fixed = true;
        let huge = Limits {
            memory_bytes: 100_000 * MIB,
            vcpus: 64,
        };
        assert_eq!(l.plan("c", huge).unwrap(), Plan::default());
    }

    #[test]
    fn updates_keep_what_they_leave_out() {
        let old = Limits {
            memory_bytes: 64 * MIB,
            vcpus: 1,
        };
        let cpu_only: LinuxResources =
            serde_json::from_str(r#"{"cpu":{"quota":200000,"period":100000}}"#).unwrap();
        assert_eq!(
            updated(old, &cpu_only),
            Limits {
                memory_bytes: 64 * MIB,
                vcpus: 2
            }
        );
        let mem_only: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":134217728}}"#).unwrap();
        assert_eq!(updated(old, &mem_only).memory_bytes, 128 * MIB);
    }

    #[test]
    fn vcpus_follow_the_sum_of_limits() {
        let mut l = ledger();
        let c = Limits {
            memory_bytes: 0,
            vcpus: 1,
        };
        assert_eq!(l.plan("c", c).unwrap().add_vcpus, 1);
        l.plugged_vcpus(1);
        l.reserve("c", c);
        assert_eq!(l.plan("c", c).unwrap().add_vcpus, 0);
    }
}
