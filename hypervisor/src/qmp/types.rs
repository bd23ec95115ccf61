//! QMP message types: commands with their arguments, and typed replies and events.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A QMP command with its arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case")]
pub enum Command {
    /// Leave capabilities negotiation mode.
    #[serde(rename = "qmp_capabilities")]
    QmpCapabilities,
    /// Terminate QEMU.
    Quit,
    /// Whether the guest runs.
    QueryStatus,
    /// Pause the guest.
    Stop,
    /// Resume the guest.
    Cont,
    /// Press the ACPI power button.
    #[serde(rename = "system_powerdown")]
    SystemPowerdown,
    /// Create a QOM object (e.g. a memory backend).
    ObjectAdd {
        #[serde(rename = "qom-type")]
        qom_type: String,
        id: String,
        #[serde(flatten)]
        props: Map<String, Value>,
    },
    /// Delete a QOM object.
    ObjectDel { id: String },
    /// Hotplug a device.
    #[serde(rename = "device_add")]
    DeviceAdd {
        driver: String,
        id: String,
        #[serde(flatten)]
        props: Map<String, Value>,
    },
    /// Unplug a device.
    #[serde(rename = "device_del")]
    DeviceDel { id: String },
    /// The CPU slots and which ones are occupied.
    QueryHotpluggableCpus,
    /// Plugged memory devices (DIMMs, virtio-mem).
    QueryMemoryDevices,
    /// The vCPUs and their host threads.
    QueryCpusFast,
}

/// One vCPU of `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// The vCPU's index.
    pub cpu_index: u32,
    /// The host thread running it.
    pub thread_id: u32,
}

impl Command {
    /// `object-add memory-backend-memfd` of `size_bytes`, shared when `share`.
    pub fn memfd_backend(id: impl Into<String>, size_bytes: u64, share: bool) -> Command {
        let mut props = Map::new();
        props.insert("size".into(), size_bytes.into());
        props.insert("share".into(), share.into());
        Command::ObjectAdd {
            qom_type: "memory-backend-memfd".into(),
            id: id.into(),
            props,
        }
    }

    /// `device_add pc-dimm` backed by the memory backend `memdev`.
    pub fn pc_dimm(id: impl Into<String>, memdev: impl Into<String>) -> Command {
        let mut props = Map::new();
        props.insert("memdev".into(), Value::String(memdev.into()));
        Command::DeviceAdd {
            driver: "pc-dimm".into(),
            id: id.into(),
            props,
        }
    }

    /// `device_add` of a vCPU into the slot described by `cpu` (from
    /// [`Qmp::query_hotpluggable_cpus`]).
    pub fn cpu(id: impl Into<String>, cpu: &HotpluggableCpu) -> Command {
        let props = match serde_json::to_value(&cpu.props) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        Command::DeviceAdd {
            driver: cpu.driver.clone(),
            id: id.into(),
            props,
        }
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The greeting QEMU sends on connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    pub version: QemuVersion,
    pub package: String,
    pub capabilities: Vec<String>,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// Topology ids of a CPU slot; absent ids are omitted.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInstanceProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub die_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
}

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HotpluggableCpu {
    /// The device driver to `device_add` (e.g. `max-x86_64-cpu`).
    #[serde(rename = "type")]
    pub driver: String,
    #[serde(rename = "vcpus-count")]
    pub vcpus_count: u32,
    pub props: CpuInstanceProperties,
    /// Set when the slot is occupied.
    #[serde(rename = "qom-path", default)]
    pub qom_path: Option<String>,
}

/// One entry of `query-memory-devices`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryDeviceInfo {
    /// `dimm`, `nvdimm`, `virtio-mem`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub data: MemoryDeviceData,
}

/// The fields of a memory device we use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryDeviceData {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub addr: u64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub memdev: Option<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`.
    pub event: String,
    #[serde(default)]
    pub data: Value,
}
