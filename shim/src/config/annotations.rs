//! Pod annotations that size the sandbox VM.
//!
//! `io.katacontainers.config.hypervisor.<name>` overrides `[hypervisor.qemu] <name>` for one
//! pod, only when `<name>` is listed in `enable_annotations` (a cluster user must not be able
//! to pick, say, the QEMU binary). With `static_sandbox_resource_mgmt` the VM is sized once
//! from CRI's sandbox annotations (the pod's summed limits) instead of hot-adding per
//! container.

use std::collections::HashMap;

use crate::config::{Config, HostLimits};

/// The prefix of the hypervisor overrides.
pub const HYPERVISOR_PREFIX: &str = "io.katacontainers.config.hypervisor.";
/// Every Kata annotation starts with this.
pub const KATA_PREFIX: &str = "io.katacontainers.";
/// CRI (containerd): the pod's memory limit in bytes.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// CRI (containerd): the pod's CPU quota.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// CRI (containerd): the pod's CPU period.
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Overrides we understand.
const SUPPORTED: &[&str] = &[
    "default_vcpus",
    "default_memory",
    "default_maxvcpus",
    "default_maxmemory",
    "memory_slots",
];

/// An annotation the pod may not set or that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key} is not allowed: {name:?} is not in [hypervisor.qemu] enable_annotations {allowed:?}")]
    NotAllowed {
        key: String,
        name: String,
        allowed: Vec<String>,
    },
    #[error("annotation {key} is not supported (supported: {HYPERVISOR_PREFIX}{{{}}})", SUPPORTED.join(","))]
    Unsupported { key: String },
    #[error("annotation {key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("annotation {key} is not supported with a remote (peer pods) VM (supported: {HYPERVISOR_PREFIX}{{{}}})", REMOTE_SUPPORTED.join(","))]
    UnsupportedRemote { key: String },
    #[error("annotation {key} is not allowed: {name:?} is not in [hypervisor.remote] enable_annotations {allowed:?}")]
    NotAllowedRemote {
        key: String,
        name: String,
        allowed: Vec<String>,
    },
    /// A size beyond what the configuration and the host allow.
    #[error("{what} = {value} {unit} exceeds the ceiling of {ceiling} {unit} ({why})")]
    AboveCeiling {
        what: String,
        value: u64,
        ceiling: u64,
        unit: &'static str,
        why: String,
    },
}

fn number(key: &str, value: &str) -> Result<u64, AnnotationError> {
    value.trim().parse().map_err(|_| AnnotationError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: "expected a non-negative integer",
    })
}

fn small(key: &str, value: &str) -> Result<u32, AnnotationError> {
    u32::try_from(number(key, value)?).map_err(|_| AnnotationError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: "too large",
    })
}

/// Annotations a remote VM (peer pods) may take, after `io.katacontainers.config.hypervisor.`.
const REMOTE_SUPPORTED: &[&str] = &["machine_type", "default_vcpus", "default_memory", "image"];
/// CRI's pod name and namespace, in containerd's and CRI-O's dialects, as the adaptor
/// wants them (containerd's names).
const POD_NAME_KEYS: &[(&str, &str)] = &[
    (
        "io.kubernetes.cri.sandbox-name",
        "io.kubernetes.cri.sandbox-name",
    ),
    (
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.cri.sandbox-namespace",
    ),
    (
        "io.kubernetes.cri-o.KubeName",
        "io.kubernetes.cri.sandbox-name",
    ),
    (
        "io.kubernetes.cri-o.Namespace",
        "io.kubernetes.cri.sandbox-namespace",
    ),
];

/// The CreateVM annotations of a remote VM: the pod's name and namespace, and the
/// `io.katacontainers.config.hypervisor.*` sizing the pod may set (only names in
/// `[hypervisor.remote] enable_annotations`; numbers checked). With no sizing annotation,
/// the pod's summed limits from CRI (`io.kubernetes.cri.sandbox-memory`, `-cpu-quota`,
/// `-cpu-period`) become `default_memory` (MiB) and `default_vcpus`; with neither the
/// adaptor picks its default size.
pub fn remote_vm_annotations(
    config: &Config,
    annotations: &HashMap<String, String>,
) -> Result<HashMap<String, String>, AnnotationError> {
    let allowed = config
        .hypervisor
        .remote
        .as_ref()
        .map(|r| r.enable_annotations.clone())
        .unwrap_or_default();
    let mut out = HashMap::new();
    for (from, to) in POD_NAME_KEYS {
        if let Some(v) = annotations.get(*from) {
            out.insert((*to).to_owned(), v.clone());
        }
    }
    let mut keys: Vec<&String> = annotations.keys().collect();
    keys.sort();
    for key in keys {
        if !key.starts_with(KATA_PREFIX) {
            continue;
        }
        let value = &annotations[key];
        let name = key
            .strip_prefix(HYPERVISOR_PREFIX)
            .filter(|n| REMOTE_SUPPORTED.contains(n))
            .ok_or_else(|| AnnotationError::UnsupportedRemote { key: key.clone() })?;
        if !allowed.iter().any(|a| a == name) {
            return Err(AnnotationError::NotAllowedRemote {
                key: key.clone(),
                name: name.to_owned(),
                allowed: allowed.clone(),
            });
        }
        if matches!(name, "default_vcpus" | "default_memory") {
            small(key, value)?;
        }
        if value.trim().is_empty() {
            return Err(AnnotationError::Invalid {
                key: key.clone(),
                value: value.clone(),
                reason: "expected a value",
            });
        }
        out.insert(key.clone(), value.trim().to_owned());
    }
    let sized = ["default_vcpus", "default_memory", "machine_type"]
        .iter()
        .any(|n| out.contains_key(&format!("{HYPERVISOR_PREFIX}{n}")));
    if !sized {
        if let Some(v) = annotations.get(CRI_SANDBOX_MEMORY) {
            let mib = number(CRI_SANDBOX_MEMORY, v)?.div_ceil(1024 * 1024);
            if mib > 0 {
                out.insert(
                    format!("{HYPERVISOR_PREFIX}default_memory"),
                    mib.to_string(),
                );
            }
        }
        if let (Some(q), Some(p)) = (
            annotations.get(CRI_SANDBOX_CPU_QUOTA),
            annotations.get(CRI_SANDBOX_CPU_PERIOD),
        ) {
            let quota: i64 = q.trim().parse().unwrap_or(-1);
            let period = number(CRI_SANDBOX_CPU_PERIOD, p)?;
            if quota > 0 && period > 0 {
                let vcpus = (quota as u64).div_ceil(period);
                out.insert(
                    format!("{HYPERVISOR_PREFIX}default_vcpus"),
                    vcpus.to_string(),
                );
            }
        }
    }
    Ok(out)
}

/// The configuration a sandbox boots with, given its spec's annotations, on `host`.
///
/// Annotations may lower the configured ceilings, never raise them: every size must stay
/// within `[hypervisor.qemu] default_maxvcpus` / `default_maxmemory` (0 = the host's size)
/// and the host's CPUs and memory, and `memory_slots` within the configured number.
pub fn apply(
    config: &Config,
    annotations: &HashMap<String, String>,
    host: HostLimits,
) -> Result<Config, AnnotationError> {
    let mut out = config.clone();
    let (max_vcpus, max_memory) = config.ceilings(host);
    let vcpu_ceiling = max_vcpus.min(host.cpus.max(config.hypervisor.qemu.default_vcpus));
    let memory_ceiling = max_memory.min(host.memory_mib.max(config.hypervisor.qemu.default_memory));
    let vcpu_why = format!(
        "[hypervisor.qemu] default_maxvcpus = {}, host CPUs = {}",
        config.hypervisor.qemu.default_maxvcpus, host.cpus
    );
    let memory_why = format!(
        "[hypervisor.qemu] default_maxmemory = {} MiB, host memory = {} MiB",
        config.hypervisor.qemu.default_maxmemory, host.memory_mib
    );
    let check = |what: &str, value: u32, ceiling: u32, unit, why: &str| {
        if value > ceiling {
            return Err(AnnotationError::AboveCeiling {
                what: what.to_owned(),
                value: value.into(),
                ceiling: ceiling.into(),
                unit,
                why: why.to_owned(),
            });
        }
        Ok(value)
    };
    let allowed = &config.hypervisor.qemu.enable_annotations;
    let mut keys: Vec<&String> = annotations.keys().collect();
    keys.sort();
    for key in keys {
        if !key.starts_with(KATA_PREFIX) {
            continue;
        }
        let value = &annotations[key];
        let Some(name) = key.strip_prefix(HYPERVISOR_PREFIX) else {
            return Err(AnnotationError::Unsupported { key: key.clone() });
        };
        if !SUPPORTED.contains(&name) {
            return Err(AnnotationError::Unsupported { key: key.clone() });
        }
        if !allowed.iter().any(|a| a == name) {
            return Err(AnnotationError::NotAllowed {
                key: key.clone(),
                name: name.to_owned(),
                allowed: allowed.clone(),
            });
        }
        let q = &mut out.hypervisor.qemu;
        let v = small(key, value)?;
        match name {
            "default_vcpus" => q.default_vcpus = check(key, v, vcpu_ceiling, "vCPUs", &vcpu_why)?,
            "default_memory" => {
                q.default_memory = check(key, v, memory_ceiling, "MiB", &memory_why)?
            }
            "default_maxvcpus" => {
                q.default_maxvcpus = check(key, v, vcpu_ceiling, "vCPUs", &vcpu_why)?
            }
            "default_maxmemory" => {
                q.default_maxmemory = check(key, v, memory_ceiling, "MiB", &memory_why)?
            }
            "memory_slots" => {
                let why = "[hypervisor.qemu] memory_slots";
                q.memory_slots = check(key, v, config.hypervisor.qemu.memory_slots, "slots", why)?
            }
            _ => unreachable!("checked against SUPPORTED"),
        }
    }
    if config.runtime.static_sandbox_resource_mgmt {
        let q = &mut out.hypervisor.qemu;
        if let Some(v) = annotations.get(CRI_SANDBOX_MEMORY) {
            let bytes = number(CRI_SANDBOX_MEMORY, v)?;
            let mib = u32::try_from(bytes.div_ceil(1024 * 1024)).unwrap_or(u32::MAX);
            q.default_memory = q.default_memory.saturating_add(mib);
        }
        let quota = annotations.get(CRI_SANDBOX_CPU_QUOTA);
        let period = annotations.get(CRI_SANDBOX_CPU_PERIOD);
        if let (Some(quota), Some(period)) = (quota, period) {
            // A quota of -1 (no limit) is not a number of ours.
            let quota: i64 = quota.trim().parse().map_err(|_| AnnotationError::Invalid {
                key: CRI_SANDBOX_CPU_QUOTA.into(),
                value: quota.clone(),
                reason: "expected an integer",
            })?;
            let period = number(CRI_SANDBOX_CPU_PERIOD, period)?;
            if quota > 0 && period > 0 {
                let vcpus = u32::try_from((quota as u64).div_ceil(period)).unwrap_or(u32::MAX);
                q.default_vcpus = q.default_vcpus.saturating_add(vcpus);
            }
        }
        let why = "the pod's limits from io.kubernetes.cri.sandbox-* plus the boot size";
        check("sandbox vCPUs", q.default_vcpus, vcpu_ceiling, "vCPUs", why)?;
        check(
            "sandbox memory",
            q.default_memory,
            memory_ceiling,
            "MiB",
            why,
        )?;
    }
    // Lowered ceilings must still hold the boot size.
    let q = &out.hypervisor.qemu;
    if q.default_maxvcpus != 0 && q.default_vcpus > q.default_maxvcpus {
        check(
            "default_vcpus",
            q.default_vcpus,
            q.default_maxvcpus,
            "vCPUs",
            "default_maxvcpus from the pod's annotations",
        )?;
    }
    if q.default_maxmemory != 0 && q.default_memory > q.default_maxmemory {
        check(
            "default_memory",
            q.default_memory,
            q.default_maxmemory,
            "MiB",
            "default_maxmemory from the pod's annotations",
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        cpus: 8,
        memory_mib: 16384,
    };

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn allowed_overrides_apply() {
        let c = Config::default();
        let out = apply(
            &c,
            &ann(&[
                ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
                ("io.katacontainers.config.hypervisor.default_memory", "1024"),
                ("other", "x"),
            ]),
            HOST,
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_vcpus, 2);
        assert_eq!(out.hypervisor.qemu.default_memory, 1024);
    }

    #[test]
    fn refusals_name_the_annotation() {
        let c = Config::default();
        let e = apply(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.memory_slots", "3")]),
            HOST,
        )
        .unwrap_err();
        assert!(matches!(e, AnnotationError::NotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("memory_slots"), "{e}");
        let e = apply(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.path", "/bin/sh")]),
            HOST,
        )
        .unwrap_err();
        assert!(matches!(e, AnnotationError::Unsupported { .. }), "{e}");
        let e = apply(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.default_vcpus", "two")]),
            HOST,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"two\""), "{e}");
    }

    #[test]
    fn static_mode_sizes_from_the_pod() {
        let mut c = Config::default();
        c.runtime.static_sandbox_resource_mgmt = true;
        let out = apply(
            &c,
            &ann(&[
                (CRI_SANDBOX_MEMORY, "268435456"),
                (CRI_SANDBOX_CPU_QUOTA, "150000"),
                (CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]),
            HOST,
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_memory, 2048 + 256);
        assert_eq!(out.hypervisor.qemu.default_vcpus, 1 + 2);
        // Without static mode the same annotations change nothing.
        let out = apply(
            &Config::default(),
            &ann(&[(CRI_SANDBOX_MEMORY, "268435456")]),
            HOST,
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_memory, 2048);
    }

    #[test]
    fn annotations_never_raise_the_ceilings() {
        let small_host = HostLimits {
            cpus: 2,
            memory_mib: 24000,
        };
        let mut c = Config::default();
        c.hypervisor.qemu.default_maxvcpus = 2;
        c.hypervisor.qemu.enable_annotations = [
            "default_vcpus",
            "default_memory",
            "default_maxvcpus",
            "default_maxmemory",
            "memory_slots",
        ]
        .map(String::from)
        .to_vec();
        let refused_by = |c: &Config, pairs: &[(&str, &str)]| {
            apply(c, &ann(pairs), small_host).unwrap_err().to_string()
        };
        let refused = |pairs: &[(&str, &str)]| refused_by(&c, pairs);
        let e = refused(&[("io.katacontainers.config.hypervisor.default_vcpus", "64")]);
        assert!(
            e.contains("default_vcpus = 64 vCPUs exceeds the ceiling of 2 vCPUs"),
            "{e}"
        );
        let e = refused(&[(
            "io.katacontainers.config.hypervisor.default_memory",
            "65536",
        )]);
        assert!(
            e.contains("65536 MiB exceeds the ceiling of 24000 MiB") && e.contains("host memory"),
            "{e}"
        );
        let e = refused(&[("io.katacontainers.config.hypervisor.default_maxvcpus", "8")]);
        assert!(e.contains("default_maxvcpus = 8"), "{e}");
        let e = refused(&[(
            "io.katacontainers.config.hypervisor.default_maxmemory",
            "100000",
        )]);
        assert!(e.contains("default_maxmemory = 100000"), "{e}");
        let e = refused(&[("io.katacontainers.config.hypervisor.memory_slots", "11")]);
        assert!(
            e.contains("memory_slots = 11 slots exceeds the ceiling of 10"),
            "{e}"
        );
        // Lowering is fine, and a lowered ceiling must still hold the boot size.
        let out = apply(
            &c,
            &ann(&[(
                "io.katacontainers.config.hypervisor.default_maxmemory",
                "4096",
            )]),
            small_host,
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_maxmemory, 4096);
        let e = refused(&[
            (
                "io.katacontainers.config.hypervisor.default_maxmemory",
                "1024",
            ),
            ("io.katacontainers.config.hypervisor.default_memory", "2048"),
        ]);
        assert!(
            e.contains("default_memory = 2048 MiB exceeds the ceiling of 1024 MiB"),
            "{e}"
        );
        // Static sizing from the pod's limits is held to the same ceilings.
        let mut c = c.clone();
        c.runtime.static_sandbox_resource_mgmt = true;
        let e = refused_by(
            &c,
            &[
                (CRI_SANDBOX_CPU_QUOTA, "400000"),
                (CRI_SANDBOX_CPU_PERIOD, "100000"),
            ],
        );
        assert!(
            e.contains("sandbox vCPUs = 5 vCPUs exceeds the ceiling of 2"),
            "{e}"
        );
    }

    #[test]
    fn remote_vms_get_the_pods_name_and_allowed_sizing() {
        let c = Config::parse(
            "[hypervisor.remote]\nenable_annotations = [\"machine_type\", \"default_vcpus\", \"default_memory\"]\n[runtime]\nstatic_sandbox_resource_mgmt = true\n",
        )
        .unwrap();
        let out = remote_vm_annotations(
            &c,
            &ann(&[
                ("io.kubernetes.cri-o.KubeName", "web"),
                ("io.kubernetes.cri-o.Namespace", "shop"),
                ("io.katacontainers.config.hypervisor.machine_type", "small"),
                ("other", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out["io.kubernetes.cri.sandbox-name"], "web");
        assert_eq!(out["io.kubernetes.cri.sandbox-namespace"], "shop");
        assert_eq!(
            out["io.katacontainers.config.hypervisor.machine_type"],
            "small"
        );
        // The pod's limits size it when it names no size.
        let out = remote_vm_annotations(
            &c,
            &ann(&[
                (CRI_SANDBOX_MEMORY, "268435456"),
                (CRI_SANDBOX_CPU_QUOTA, "150000"),
                (CRI_SANDBOX_CPU_PERIOD, "100000"),
            ]),
        )
        .unwrap();
        assert_eq!(
            out["io.katacontainers.config.hypervisor.default_memory"],
            "256"
        );
        assert_eq!(
            out["io.katacontainers.config.hypervisor.default_vcpus"],
            "2"
        );
        let e = remote_vm_annotations(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.image", "x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("image") && e.contains("enable_annotations"),
            "{e}"
        );
        let e = remote_vm_annotations(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.memory_slots", "2")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory_slots") && e.contains("remote"), "{e}");
        let e = remote_vm_annotations(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.default_vcpus", "lots")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"lots\""), "{e}");
    }
}
