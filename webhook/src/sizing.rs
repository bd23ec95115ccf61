//! A pod's effective CPU, memory and GPUs, computed as Kubernetes computes a pod's request.
//!
//! Per container, its limit counts where it has one, else its request (a VM sized to the
//! limits lets every container use what it may). Over the pod (the scheduler's rule, with
//! KEP-753 sidecars):
//! - app containers run together: their needs add up;
//! - init containers with `restartPolicy: Always` (sidecars) start in order and keep
//!   running: each adds to the app containers' sum, and to every init container after it;
//! - other init containers run one at a time before the app containers: each needs its own
//!   amount plus the sidecars started before it;
//! - the pod needs, per resource, the larger of the running sum and the largest init step.
//!
//! Pod-level resources (`spec.resources`), where set for CPU or memory, replace the
//! containers' figure for that resource, as they do for the scheduler (limit preferred).
//! The pod overhead is not counted: it is spent on the node, not in the pod's VM.
//!
//! Results are whole units, rounded up: vCPUs, MiB, GPUs. Quantities are validated here:
//! one that does not parse, is negative, or a request above its limit, is refused with the
//! container, field and value named.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use kata_peerpods_k8s::GPU_RESOURCE;

use crate::quantity::{Quantity, QuantityError};

/// The resources that size a pod VM, in [`Need`] order.
const SIZED: [&str; 3] = ["cpu", "memory", GPU_RESOURCE];

/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

/// What a pod's VM needs, in whole units rounded up; 0 where the pod names nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodSize {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub gpus: u64,
}

/// A quantity in a pod that cannot size a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("{owner}: {field}.{resource}")]
    Unreadable {
        owner: String,
        field: &'static str,
        resource: String,
        #[source]
        source: QuantityError,
    },
    #[error("{owner}: {field}.{resource} is negative ({value})")]
    Negative {
        owner: String,
        field: &'static str,
        resource: String,
        value: String,
    },
    #[error("{owner}: requests.{resource} {request} is more than limits.{resource} {limit}")]
    RequestAboveLimit {
        owner: String,
        resource: String,
        request: String,
        limit: String,
    },
    #[error("the pod's {resource} adds up beyond what can be counted")]
    Overflow { resource: &'static str },
}

/// Per resource of [`SIZED`], an amount in that resource's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Need([Quantity; 3]);

impl Need {
    fn add(self, other: Self) -> Result<Self, SizingError> {
        let mut sum = self;
        for (i, resource) in SIZED.iter().enumerate() {
            sum.0[i] = self.0[i]
                .checked_add(other.0[i])
                .ok_or(SizingError::Overflow { resource })?;
        }
        Ok(sum)
    }

    fn max(self, other: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i].max(other.0[i])))
    }
}

/// The size of the VM for a pod with this spec.
pub fn pod_size(spec: &PodSpec) -> Result<PodSize, SizingError> {
    let mut running = Need::default();
    for container in &spec.containers {
        running = running.add(container_need(container, "container")?)?;
    }
    let mut sidecars = Need::default();
    let mut init_peak = Need::default();
    for container in spec.init_containers.iter().flatten() {
        let need = container_need(container, "init container")?;
        if container.restart_policy.as_deref() == Some("Always") {
            running = running.add(need)?;
            sidecars = sidecars.add(need)?;
            init_peak = init_peak.max(sidecars);
        } else {
            init_peak = init_peak.max(need.add(sidecars)?);
        }
    }
    let mut pod = running.max(init_peak);
    if let Some(resources) = &spec.resources {
        let pod_level = preferred(resources, "pod")?;
        // Pod-level resources cover CPU and memory only.
        for (total, value) in pod.0.iter_mut().zip(pod_level).take(2) {
            if let Some(value) = value {
                *total = value;
            }
        }
    }
    Ok(PodSize {
        vcpus: pod.0[0].ceil_units(1),
        memory_mib: pod.0[1].ceil_units(MIB),
        gpus: pod.0[2].ceil_units(1),
    })
}

/// What one container needs: its limit per resource, else its request, else nothing.
fn container_need(container: &Container, what: &str) -> Result<Need, SizingError> {
    let Some(resources) = &container.resources else {
        return Ok(Need::default());
    };
    let owner = format!("{what} {:?}", container.name);
    let values = preferred(resources, &owner)?;
    Ok(Need(values.map(Option::unwrap_or_default)))
}

/// Per resource of [`SIZED`], the limit if set, else the request if set.
fn preferred(
    resources: &ResourceRequirements,
    owner: &str,
) -> Result<[Option<Quantity>; 3], SizingError> {
    let limits = read_list(resources.limits.as_ref(), owner, "limits")?;
    let requests = read_list(resources.requests.as_ref(), owner, "requests")?;
    for (i, resource) in SIZED.iter().enumerate() {
        if let (Some(request), Some(limit)) = (requests[i], limits[i]) {
            if request > limit {
                return Err(SizingError::RequestAboveLimit {
                    owner: owner.to_owned(),
                    resource: (*resource).to_owned(),
                    request: request.to_string(),
                    limit: limit.to_string(),
                });
            }
        }
    }
    Ok(std::array::from_fn(|i| limits[i].or(requests[i])))
}

/// The [`SIZED`] entries of a requests or limits list, parsed and checked.
fn read_list(
    list: Option<&BTreeMap<String, K8sQuantity>>,
    owner: &str,
    field: &'static str,
) -> Result<[Option<Quantity>; 3], SizingError> {
    let mut values = [None; 3];
    let Some(list) = list else {
        return Ok(values);
    };
    for (i, resource) in SIZED.iter().enumerate() {
        let Some(K8sQuantity(text)) = list.get(*resource) else {
            continue;
        };
        let value = Quantity::parse(text).map_err(|source| SizingError::Unreadable {
            owner: owner.to_owned(),
            field,
            resource: (*resource).to_owned(),
            source,
        })?;
        if value.is_negative() {
            return Err(SizingError::Negative {
                owner: owner.to_owned(),
                field,
                resource: (*resource).to_owned(),
                value: text.clone(),
            });
        }
        values[i] = Some(value);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size(spec: serde_json::Value) -> Result<PodSize, SizingError> {
        pod_size(&serde_json::from_value(spec).unwrap())
    }

    fn sized(vcpus: u64, memory_mib: u64, gpus: u64) -> PodSize {
        PodSize {
            vcpus,
            memory_mib,
            gpus,
        }
    }

    #[test]
    fn nothing_requested_is_zero() {
        let spec = json!({"containers": [{"name": "a"}, {"name": "b", "resources": {}}]});
        assert_eq!(size(spec).unwrap(), PodSize::default());
    }

    #[test]
    fn app_containers_add_up_and_round_up() {
        let spec = json!({"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "500M"}}},
            {"name": "b", "resources": {"requests": {"cpu": "1.5", "memory": "129e6"}}},
        ]});
        // 2 CPUs; 500e6 + 129e6 bytes = 599.86 MiB
        assert_eq!(size(spec).unwrap(), sized(2, 600, 0));
    }

    #[test]
    fn limits_are_preferred_per_container() {
        let spec = json!({"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "3", "memory": "1Gi"}}},
            {"name": "b", "resources": {"requests": {"cpu": "1", "memory": "256Mi"}}},
        ]});
        assert_eq!(size(spec).unwrap(), sized(4, 1280, 0));
    }

    #[test]
    fn the_largest_init_container_counts_when_larger() {
        let spec = json!({
            "initContainers": [
                {"name": "i1", "resources": {"requests": {"cpu": "3", "memory": "100Mi"}}},
                {"name": "i2", "resources": {"limits": {"memory": "2Gi"}}},
            ],
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
        });
        assert_eq!(size(spec).unwrap(), sized(3, 2048, 0));
    }

    #[test]
    fn sidecars_run_with_the_app_and_the_later_init_containers() {
        let spec = json!({
            "initContainers": [
                {"name": "before", "resources": {"requests": {"cpu": "2"}}},
                {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"cpu": "1", "memory": "128Mi"}}},
                {"name": "migrate", "resources": {"requests": {"cpu": "2500m", "memory": "64Mi"}}},
            ],
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "256Mi"}}}],
        });
        // running: a + proxy = 2 CPUs, 384 MiB; init steps: before 2; proxy 1/128Mi;
        // migrate + proxy = 3.5 CPUs, 192 MiB. Pod: 3.5 -> 4 CPUs, 384 MiB.
        assert_eq!(size(spec).unwrap(), sized(4, 384, 0));
    }

    #[test]
    fn gpus_follow_the_same_rule() {
        let spec = json!({
            "initContainers": [{"name": "warm", "resources": {"limits": {"nvidia.com/gpu": "2"}}}],
            "containers": [
                {"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}},
                {"name": "b", "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}},
            ],
        });
        assert_eq!(size(spec).unwrap(), sized(0, 0, 2));
    }

    #[test]
    fn pod_level_resources_replace_the_containers_figure() {
        let spec = json!({
            "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "3Gi"}},
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}}}],
        });
        assert_eq!(size(spec).unwrap(), sized(2, 3072, 1));
    }

    #[test]
    fn other_resources_do_not_size_the_vm() {
        let spec = json!({"containers": [{"name": "a", "resources": {
            "requests": {"ephemeral-storage": "1Gi", "hugepages-2Mi": "4Mi", "example.com/foo": "1"}}}]});
        assert_eq!(size(spec).unwrap(), PodSize::default());
    }

    #[test]
    fn bad_quantities_are_named() {
        let err = size(
            json!({"containers": [{"name": "app", "resources": {"requests": {"cpu": "lots"}}}]}),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "container \"app\": requests.cpu");
        assert!(matches!(err, SizingError::Unreadable { .. }));

        let err = size(
            json!({"initContainers": [{"name": "i", "resources": {"limits": {"memory": "-1Gi"}}}],
                              "containers": [{"name": "a"}]}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "init container \"i\": limits.memory is negative (-1Gi)"
        );

        let err = size(json!({"containers": [{"name": "a", "resources": {
            "requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}}]}))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "container \"a\": requests.cpu 2 is more than limits.cpu 1.5"
        );
    }

    #[test]
    fn overflow_is_refused() {
        let big = json!({"requests": {"memory": "100000000000Ei"}});
        let err = size(json!({"containers": [
            {"name": "a", "resources": big}, {"name": "b", "resources": big}]}))
        .unwrap_err();
        assert_eq!(err, SizingError::Overflow { resource: "memory" });
    }
}
