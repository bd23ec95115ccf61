//! Pod annotations that size the sandbox VM.
//!
//! `io.katacontainers.config.hypervisor.<name>` overrides `[hypervisor.qemu] <name>` for one
//! pod, only when `<name>` is listed in `enable_annotations` (a cluster user must not be able
//! to pick, say, the QEMU binary). With `static_sandbox_resource_mgmt` the VM is sized once
//! from CRI's sandbox annotations (the pod's summed limits) instead of hot-adding per
//! container.

use std::collections::HashMap;

use crate::config::Config;

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

/// The configuration a sandbox boots with, given its spec's annotations.
pub fn apply(
    config: &Config,
    annotations: &HashMap<String, String>,
) -> Result<Config, AnnotationError> {
    let mut out = config.clone();
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
        match name {
            "default_vcpus" => q.default_vcpus = small(key, value)?,
            "default_memory" => q.default_memory = small(key, value)?,
            "default_maxvcpus" => q.default_maxvcpus = small(key, value)?,
            "default_maxmemory" => q.default_maxmemory = small(key, value)?,
            "memory_slots" => q.memory_slots = small(key, value)?,
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
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        )
        .unwrap_err();
        assert!(matches!(e, AnnotationError::NotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("memory_slots"), "{e}");
        let e = apply(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.path", "/bin/sh")]),
        )
        .unwrap_err();
        assert!(matches!(e, AnnotationError::Unsupported { .. }), "{e}");
        let e = apply(
            &c,
            &ann(&[("io.katacontainers.config.hypervisor.default_vcpus", "two")]),
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
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_memory, 2048 + 256);
        assert_eq!(out.hypervisor.qemu.default_vcpus, 1 + 2);
        // Without static mode the same annotations change nothing.
        let out = apply(
            &Config::default(),
            &ann(&[(CRI_SANDBOX_MEMORY, "268435456")]),
        )
        .unwrap();
        assert_eq!(out.hypervisor.qemu.default_memory, 2048);
    }
}
