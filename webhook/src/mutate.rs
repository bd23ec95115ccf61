//! The mutation of a peer pod, as a JSON patch.
//!
//! For a pod of the target runtime class outside the skipped namespaces: the pod's size
//! ([`crate::sizing`]) goes into the `default_vcpus`, `default_memory` (MiB) and
//! `default_gpus` annotations (each only when above zero; an existing value is
//! replaced), every `resources` block of the containers and init containers (and the
//! pod-level one) is removed, and the first container gets `kata.peerpods.io/vm: 1` as
//! request and limit. A pod that already asks for `kata.peerpods.io/vm` anywhere is left
//! as it is, so a second pass (`reinvocationPolicy: IfNeeded`) changes nothing.
//!
//! The patch names only what changes, by position in the object the API server sent, so
//! fields this build's Kubernetes types do not know are never touched.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation};
use k8s_openapi::api::core::v1::{Container, Pod};
use kata_peerpods_k8s::{GPUS_ANNOTATION, MEMORY_ANNOTATION, POD_VM_RESOURCE, VCPUS_ANNOTATION};
use serde_json::{json, Value};

use crate::config::Config;
use crate::sizing::{pod_size, PodSize, SizingError};

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unchanged {
    /// The namespace is skipped.
    SkippedNamespace(String),
    /// The pod's runtime class is not the target one.
    OtherRuntimeClass(Option<String>),
    /// A container already asks for `kata.peerpods.io/vm`.
    AlreadyMutated,
}

impl std::fmt::Display for Unchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SkippedNamespace(ns) => write!(f, "namespace {ns} is skipped"),
            Self::OtherRuntimeClass(None) => write!(f, "no runtimeClassName"),
            Self::OtherRuntimeClass(Some(class)) => write!(f, "runtimeClassName {class}"),
            Self::AlreadyMutated => write!(f, "already requests {POD_VM_RESOURCE}"),
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Unchanged(Unchanged),
    Patch { patch: Patch, size: PodSize },
}

/// A pod of the target runtime class that cannot be mutated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutateError {
    #[error("the pod has no spec")]
    NoSpec,
    #[error("the pod has no containers to carry the {POD_VM_RESOURCE} request")]
    NoContainers,
    #[error("the pod's resources cannot size a pod VM")]
    Sizing(#[from] SizingError),
}

/// The plan for `pod`, created in `namespace`.
pub fn plan(config: &Config, namespace: &str, pod: &Pod) -> Result<Plan, MutateError> {
    if config.skips_namespace(namespace) {
        return Ok(Plan::Unchanged(Unchanged::SkippedNamespace(
            namespace.to_owned(),
        )));
    }
    let spec = pod.spec.as_ref().ok_or(MutateError::NoSpec)?;
    if spec.runtime_class_name.as_deref() != Some(config.target_runtime_class()) {
        return Ok(Plan::Unchanged(Unchanged::OtherRuntimeClass(
            spec.runtime_class_name.clone(),
        )));
    }
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if spec
        .containers
        .iter()
        .chain(init_containers)
        .any(asks_for_pod_vm)
    {
        return Ok(Plan::Unchanged(Unchanged::AlreadyMutated));
    }
    if spec.containers.is_empty() {
        return Err(MutateError::NoContainers);
    }
    let size = pod_size(spec)?;

    let mut ops = annotation_ops(pod.metadata.annotations.as_ref(), size);
    if spec.resources.is_some() {
        ops.push(remove(&["spec", "resources"]));
    }
    for (i, container) in init_containers.iter().enumerate() {
        if container.resources.is_some() {
            ops.push(remove(&[
                "spec",
                "initContainers",
                &i.to_string(),
                "resources",
            ]));
        }
    }
    for (i, container) in spec.containers.iter().enumerate().skip(1) {
        if container.resources.is_some() {
            ops.push(remove(&["spec", "containers", &i.to_string(), "resources"]));
        }
    }
    // `add` replaces the first container's block whole if it has one.
    ops.push(add(
        &["spec", "containers", "0", "resources"],
        json!({"requests": {POD_VM_RESOURCE: "1"}, "limits": {POD_VM_RESOURCE: "1"}}),
    ));
    Ok(Plan::Patch {
        patch: Patch(ops),
        size,
    })
}

/// Whether a container's requests or limits name `kata.peerpods.io/vm`.
fn asks_for_pod_vm(container: &Container) -> bool {
    container.resources.as_ref().is_some_and(|resources| {
        [&resources.requests, &resources.limits]
            .into_iter()
            .flatten()
            .any(|list| list.contains_key(POD_VM_RESOURCE))
    })
}

/// The sizing annotations that are above zero, as patch operations.
fn annotation_ops(
    existing: Option<&BTreeMap<String, String>>,
    size: PodSize,
) -> Vec<PatchOperation> {
    let values: Vec<(&str, String)> = [
        (VCPUS_ANNOTATION, size.vcpus),
        (MEMORY_ANNOTATION, size.memory_mib),
        (GPUS_ANNOTATION, size.gpus),
    ]
    .into_iter()
    .filter(|(_, value)| *value > 0)
    .map(|(key, value)| (key, value.to_string()))
    .collect();
    if values.is_empty() {
        return Vec::new();
    }
    match existing {
        // No annotations map yet: a member cannot be added below a missing one.
        None => {
            let map: serde_json::Map<String, Value> = values
                .into_iter()
                .map(|(key, value)| (key.to_owned(), Value::String(value)))
                .collect();
            vec![add(&["metadata", "annotations"], Value::Object(map))]
        }
        Some(_) => values
            .into_iter()
            .map(|(key, value)| add(&["metadata", "annotations", key], Value::String(value)))
            .collect(),
    }
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn remove(tokens: &[&str]) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn patched(config: &Config, namespace: &str, original: Value) -> (Value, PodSize) {
        match plan(config, namespace, &pod(original.clone())).unwrap() {
            Plan::Patch { patch, size } => {
                let mut doc = original;
                json_patch::patch(&mut doc, &patch).unwrap();
                (doc, size)
            }
            other => panic!("expected a patch, got {other:?}"),
        }
    }

    #[test]
    fn strips_every_block_and_requests_one_pod_vm() {
        let original = json!({
            "metadata": {"name": "p", "annotations": {"team": "x", VCPUS_ANNOTATION: "9"}},
            "spec": {
                "runtimeClassName": "kata-remote",
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}],
                "containers": [
                    {"name": "a", "image": "busybox", "resources": {"limits": {"cpu": "2", "memory": "1Gi"}}},
                    {"name": "b", "image": "busybox"},
                    {"name": "c", "image": "busybox", "resources": {"requests": {"memory": "1Gi"}}},
                ],
            }
        });
        let (doc, size) = patched(&Config::default(), "default", original);
        assert_eq!(
            size,
            PodSize {
                vcpus: 2,
                memory_mib: 2048,
                gpus: 0
            }
        );
        assert_eq!(
            doc,
            json!({
                "metadata": {"name": "p", "annotations": {
                    "team": "x", VCPUS_ANNOTATION: "2", MEMORY_ANNOTATION: "2048"}},
                "spec": {
                    "runtimeClassName": "kata-remote",
                    "initContainers": [{"name": "i"}],
                    "containers": [
                        {"name": "a", "image": "busybox", "resources": {
                            "requests": {"kata.peerpods.io/vm": "1"}, "limits": {"kata.peerpods.io/vm": "1"}}},
                        {"name": "b", "image": "busybox"},
                        {"name": "c", "image": "busybox"},
                    ],
                }
            })
        );
    }

    #[test]
    fn annotations_map_is_created_when_missing_and_zeroes_are_left_out() {
        let original = json!({"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote",
            "containers": [{"name": "a", "resources": {"requests": {"memory": "100Mi"}}}]}});
        let (doc, _) = patched(&Config::default(), "default", original);
        assert_eq!(
            doc["metadata"]["annotations"],
            json!({MEMORY_ANNOTATION: "100"})
        );

        let original = json!({"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote",
            "containers": [{"name": "a"}]}});
        let (doc, size) = patched(&Config::default(), "default", original);
        assert_eq!(size, PodSize::default());
        assert!(doc["metadata"].get("annotations").is_none());
    }

    #[test]
    fn pods_left_alone() {
        let config = Config::new("kata-remote", "kube-system", Some("peerpods")).unwrap();
        let remote =
            json!({"spec": {"runtimeClassName": "kata-remote", "containers": [{"name": "a"}]}});
        for ns in ["kube-system", "peerpods"] {
            assert_eq!(
                plan(&config, ns, &pod(remote.clone())).unwrap(),
                Plan::Unchanged(Unchanged::SkippedNamespace(ns.to_owned()))
            );
        }
        let kata = json!({"spec": {"runtimeClassName": "kata", "containers": [{"name": "a"}]}});
        assert_eq!(
            plan(&config, "default", &pod(kata)).unwrap(),
            Plan::Unchanged(Unchanged::OtherRuntimeClass(Some("kata".to_owned())))
        );
        let runc = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(
            plan(&config, "default", &pod(runc)).unwrap(),
            Plan::Unchanged(Unchanged::OtherRuntimeClass(None))
        );
        let done = json!({"spec": {"runtimeClassName": "kata-remote", "containers": [
            {"name": "a", "resources": {"limits": {"kata.peerpods.io/vm": "1"}}}]}});
        assert_eq!(
            plan(&config, "default", &pod(done)).unwrap(),
            Plan::Unchanged(Unchanged::AlreadyMutated)
        );
    }

    #[test]
    fn a_second_pass_changes_nothing() {
        let original = json!({"metadata": {"name": "p"}, "spec": {"runtimeClassName": "kata-remote",
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}]}});
        let (doc, _) = patched(&Config::default(), "default", original);
        assert_eq!(
            plan(&Config::default(), "default", &pod(doc)).unwrap(),
            Plan::Unchanged(Unchanged::AlreadyMutated)
        );
    }

    #[test]
    fn unmutable_pods_are_refused() {
        let empty = json!({"spec": {"runtimeClassName": "kata-remote", "containers": []}});
        assert_eq!(
            plan(&Config::default(), "default", &pod(empty)).unwrap_err(),
            MutateError::NoContainers
        );
        assert_eq!(
            plan(
                &Config::default(),
                "default",
                &pod(json!({"metadata": {"name": "p"}}))
            )
            .unwrap_err(),
            MutateError::NoSpec
        );
    }

    #[test]
    fn annotation_keys_with_slashes_would_be_escaped() {
        let op = add(&["metadata", "annotations", "a/b"], Value::Null);
        let PatchOperation::Add(op) = op else {
            unreachable!()
        };
        assert_eq!(op.path.as_str(), "/metadata/annotations/a~1b");
    }
}
