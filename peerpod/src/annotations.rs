//! CreateVM's annotations, checked once: the pod's CRI name and namespace (required) and
//! the sizing annotations the shim lets through (`io.katacontainers.config.hypervisor.` +
//! `machine_type`, `default_vcpus`, `default_memory`, `image`) and GPUs (`default_gpus`,
//! `default_gpu_model` or `gpu_model`), which the provider accepts or refuses
//! ([`crate::provider::Provider::check`]). `cc_init_data` is refused by name. Other
//! annotations are ignored. An empty value (or `0` for numbers) means unset, as Kata's shim
//! sends the keys it knows even when they are not set.

use std::collections::HashMap;

/// The CRI sandbox name.
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// The CRI sandbox namespace.
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// The prefix of Kata's hypervisor annotations.
pub const HYPERVISOR_PREFIX: &str = "io.katacontainers.config.hypervisor.";

/// An annotation the adaptor cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {0} is missing (the CRI sets it for every pod)")]
    Missing(&'static str),
    #[error("annotation {key}={value:?}: {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("annotation {key}={value:?}: {what} is not supported by peer pods here")]
    Unsupported {
        key: String,
        value: String,
        what: &'static str,
    },
}

/// GPUs a pod asks for, with the annotations that asked (for messages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuRequest {
    /// `default_gpus` (0 when only a model is named).
    pub count: u32,
    /// `default_gpu_model` / `gpu_model`.
    pub model: Option<String>,
    /// The annotations as `key=value`.
    pub annotations: Vec<String>,
}

/// What CreateVM's annotations ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAnnotations {
    pub name: String,
    pub namespace: String,
    pub machine_type: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub image: Option<String>,
    pub gpus: Option<GpuRequest>,
}

fn key(suffix: &str) -> String {
    format!("{HYPERVISOR_PREFIX}{suffix}")
}

/// Reads and checks the annotations.
pub fn parse(a: &HashMap<String, String>) -> Result<PodAnnotations, AnnotationError> {
    let required = |k: &'static str| {
        a.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or(AnnotationError::Missing(k))
    };
    let get = |suffix: &str| -> Option<(String, String)> {
        let k = key(suffix);
        a.get(&k)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (k, v.trim().to_owned()))
    };
    let mut out = PodAnnotations {
        name: required(SANDBOX_NAME)?,
        namespace: required(SANDBOX_NAMESPACE)?,
        ..Default::default()
    };
    if let Some((_, v)) = get("machine_type") {
        out.machine_type = Some(v);
    }
    if let Some((_, v)) = get("image") {
        out.image = Some(v);
    }
    if let Some((k, v)) = get("default_vcpus") {
        // Kata allows fractions (0.5); a VM gets whole vCPUs.
        let n: f64 = v
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0 && *n <= 1024.0)
            .ok_or_else(|| AnnotationError::Invalid {
                key: k.clone(),
                value: v.clone(),
                expected: "a number of vCPUs (0-1024)",
            })?;
        if n > 0.0 {
            out.vcpus = Some(n.ceil() as u32);
        }
    }
    if let Some((k, v)) = get("default_memory") {
        let n: u32 = v.parse().map_err(|_| AnnotationError::Invalid {
            key: k.clone(),
            value: v.clone(),
            expected: "a whole number of MiB",
        })?;
        if n > 0 {
            out.memory_mib = Some(n);
        }
    }
    if let Some((k, v)) = get("default_gpus") {
        let n: u32 = v.parse().map_err(|_| AnnotationError::Invalid {
            key: k.clone(),
            value: v.clone(),
            expected: "a whole number of GPUs",
        })?;
        if n > 0 {
            let gpus = out.gpus.get_or_insert_with(GpuRequest::default);
            gpus.count = n;
            gpus.annotations.push(format!("{k}={v}"));
        }
    }
    for suffix in ["default_gpu_model", "gpu_model"] {
        if let Some((k, v)) = get(suffix) {
            let gpus = out.gpus.get_or_insert_with(GpuRequest::default);
            gpus.model.get_or_insert(v.clone());
            gpus.annotations.push(format!("{k}={v}"));
        }
    }
    if let Some((k, v)) = get("cc_init_data") {
        return Err(AnnotationError::Unsupported {
            key: k,
            value: v.chars().take(32).collect(),
            what: "confidential-computing init data",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_the_pod_and_its_sizing() {
        let a = parse(&map(&[
            (SANDBOX_NAME, "web"),
            (SANDBOX_NAMESPACE, "shop"),
            ("io.katacontainers.config.hypervisor.default_vcpus", "1.5"),
            ("io.katacontainers.config.hypervisor.default_memory", "2048"),
            ("io.katacontainers.config.hypervisor.machine_type", ""),
            ("io.katacontainers.config.hypervisor.default_gpus", "0"),
            ("io.kubernetes.cri.sandbox-uid", "u"),
        ]))
        .unwrap();
        assert_eq!(a.name, "web");
        assert_eq!(a.namespace, "shop");
        assert_eq!(a.vcpus, Some(2));
        assert_eq!(a.memory_mib, Some(2048));
        assert_eq!(a.machine_type, None);
        assert_eq!(a.gpus, None);
    }

    #[test]
    fn gpu_requests_are_read_for_the_provider() {
        let a = parse(&map(&[
            (SANDBOX_NAME, "web"),
            (SANDBOX_NAMESPACE, "shop"),
            ("io.katacontainers.config.hypervisor.default_gpus", "2"),
            (
                "io.katacontainers.config.hypervisor.default_gpu_model",
                "a100",
            ),
        ]))
        .unwrap();
        assert_eq!(
            a.gpus,
            Some(GpuRequest {
                count: 2,
                model: Some("a100".into()),
                annotations: vec![
                    "io.katacontainers.config.hypervisor.default_gpus=2".into(),
                    "io.katacontainers.config.hypervisor.default_gpu_model=a100".into()
                ]
            })
        );
    }

    #[test]
    fn bad_annotations_are_named() {
        assert_eq!(
            parse(&map(&[(SANDBOX_NAME, "web")])),
            Err(AnnotationError::Missing(SANDBOX_NAMESPACE))
        );
        let base = [(SANDBOX_NAME, "web"), (SANDBOX_NAMESPACE, "ns")];
        for (k, v, needle) in [
            ("default_memory", "lots", "default_memory"),
            ("default_vcpus", "-1", "default_vcpus"),
            ("default_gpus", "x", "GPUs"),
            ("cc_init_data", "abc", "init data"),
        ] {
            let mut m = map(&base);
            m.insert(key(k), v.into());
            let e = parse(&m).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains(k), "{k}: {e}");
        }
    }
}
